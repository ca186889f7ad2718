//! Keeps the metadata file in step with the stripe states: one sector write + fdatasync per
//! fetched stripe, and the WRITTEN bits guests set, written (dirty sectors only) before the
//! FLUSH that follows them completes.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use log::error;

use super::metadata::{self, Metadata, FETCHED, SECTOR_SIZE};
use super::queue::lock;
use super::states::StripeStates;
use crate::crypto::Xts;

/// The metadata file and the key it is encrypted with.
pub(crate) struct MetaFile {
    pub file: File,
    pub xts: Option<Arc<Xts>>,
}

impl MetaFile {
    fn write_sector(&self, n: u64, plaintext: [u8; SECTOR_SIZE]) -> io::Result<()> {
        metadata::write_sector(&self.file, n, plaintext, self.xts.as_deref())
    }
}

/// Where something a parked request waits for (its stripes' fetches, or WRITTEN bits being
/// persisted) stands.
pub(crate) enum WaitState {
    Pending,
    Ready,
    Failed,
}

pub(crate) struct MetaStore {
    /// Serializes sector writes: each writes the sector as durable so far plus its change.
    file: Mutex<MetaFile>,
    /// Metadata sectors holding WRITTEN bits set in memory and not yet on disk.
    dirty: Mutex<BTreeSet<u64>>,
    /// WRITTEN persistence for guest FLUSHes: requests handed out, and the latest request
    /// served (successfully, or not).
    requested: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
}

impl MetaStore {
    pub fn new(file: MetaFile) -> Self {
        MetaStore {
            file: Mutex::new(file),
            dirty: Mutex::default(),
            requested: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Records guest writes into (fetched) stripes; made durable before the next FLUSH
    /// completes.
    pub fn mark_written(&self, states: &StripeStates, first: usize, last: usize) {
        for s in first..=last {
            if states.set_written(s) {
                lock(&self.dirty).insert(Metadata::sector_of_stripe_byte(s));
            }
        }
    }

    /// WRITTEN bits wait to be persisted.
    pub fn written_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// Hands out a persistence request to wait for with [`MetaStore::persisted`].
    pub fn new_ticket(&self) -> u64 {
        self.requested.fetch_add(1, SeqCst) + 1
    }

    pub fn persisted(&self, ticket: u64) -> WaitState {
        if self.done.load(SeqCst) >= ticket {
            WaitState::Ready
        } else if self.failed.load(SeqCst) >= ticket {
            WaitState::Failed
        } else {
            WaitState::Pending
        }
    }

    /// The metadata as the file holds it now.
    pub fn reread(&self, disk_sectors: u64) -> Result<Metadata, metadata::MetadataError> {
        let meta = lock(&self.file);
        Metadata::read_from(&meta.file, disk_sectors, meta.xts.as_deref())
    }

    /// Makes "stripe fetched" durable, then lets guest I/O use the stripe.
    pub fn persist_fetched(&self, states: &StripeStates, stripe: usize) -> io::Result<()> {
        let meta = lock(&self.file);
        let n = Metadata::sector_of_stripe_byte(stripe);
        let mut sector = states.encode_sector(n);
        sector[stripe % SECTOR_SIZE] |= FETCHED;
        meta.write_sector(n, sector)?;
        meta.file.sync_data()?;
        states.set_fetched(stripe);
        Ok(())
    }

    /// Step 1 of growing the disk to `count` stripes: writes the metadata sectors from the one
    /// holding the first new stripe's byte to the new end, the new stripes fetched, and
    /// fdatasyncs; from then on every sector written shows them fetched
    /// ([`StripeStates::begin_grow`]), so a later save of the boundary sector cannot unmark
    /// them. Until the disk itself has grown, a restart ignores the new stripes
    /// ([`Metadata::from_bytes`] accepts them as a grow that did not finish). On failure the
    /// new stripes are forgotten and a regular file gets its old length back.
    pub fn begin_grow(&self, states: &StripeStates, count: usize) -> io::Result<()> {
        let meta = lock(&self.file);
        let old = states.count();
        if count <= old {
            return Ok(());
        }
        let first = Metadata::sector_of_stripe_byte(old);
        let end = metadata::file_len(count as u64) / SECTOR_SIZE as u64;
        let old_len = meta.file.metadata()?.len();
        states.begin_grow(count);
        let result = (|| {
            let mut bytes = Vec::with_capacity(((end - first) as usize) * SECTOR_SIZE);
            for n in first..end {
                let mut sector = states.encode_sector(n);
                if let Some(xts) = &meta.xts {
                    xts.encrypt(n, &mut sector);
                }
                bytes.extend_from_slice(&sector);
            }
            meta.file.write_all_at(&bytes, first * SECTOR_SIZE as u64)?;
            meta.file.sync_data()
        })();
        if result.is_err() {
            states.abort_grow();
            if meta
                .file
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() > old_len)
            {
                let _ = meta.file.set_len(old_len);
            }
        }
        result
    }

    /// The size of the metadata's block device; `None` for a regular file (which grows).
    pub fn device_bytes(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::FileTypeExt;
        let meta = lock(&self.file);
        if !meta.file.metadata()?.file_type().is_block_device() {
            return Ok(None);
        }
        crate::block::device_size(&meta.file).map(Some)
    }

    /// The disk did not grow after [`MetaStore::begin_grow`]: the new stripes are no longer
    /// encoded (those on the file are ignored, as after a crash).
    pub fn abort_grow(&self, states: &StripeStates) {
        let _meta = lock(&self.file);
        states.abort_grow();
    }

    /// Writes the metadata sectors whose WRITTEN bits changed, then fdatasyncs.
    pub fn persist_written(&self, states: &StripeStates) -> io::Result<()> {
        let meta = lock(&self.file);
        let sectors = std::mem::take(&mut *lock(&self.dirty));
        if sectors.is_empty() {
            return Ok(());
        }
        let result = sectors
            .iter()
            .try_for_each(|&n| meta.write_sector(n, states.encode_sector(n)))
            .and_then(|()| meta.file.sync_data());
        if result.is_err() {
            // Still dirty: the next FLUSH or sync tries again.
            lock(&self.dirty).extend(sectors);
        }
        result
    }

    /// Serves every persistence request handed out so far (their dirty sectors were recorded
    /// before they were handed out, so before the dirty set is taken here).
    pub fn serve(&self, states: &StripeStates) {
        let ticket = self.requested.load(SeqCst);
        match self.persist_written(states) {
            Ok(()) => self.done.fetch_max(ticket, SeqCst),
            Err(e) => {
                error!("writing WRITTEN bits to the metadata failed: {e}");
                self.failed.fetch_max(ticket, SeqCst)
            }
        };
    }
}
