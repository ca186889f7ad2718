//! The lazy-fetch layer: a [`BlockDevice`] over the base disk that serves stripes not yet
//! copied from the source ([`StripeSource`]), with the fetcher pool that copies them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use log::{info, warn};

use super::channel::LazyChannel;
use super::fetch::{fetcher, persister, Shared};
use super::metadata::{Metadata, WRITTEN};
use super::persist::{MetaFile, MetaStore};
use super::queue::{lock, FetchQueue, Waker};
use super::source::{self, SourceIdentity, SourceKind, SourceSpec, StripeSource};
use super::split::SourceEnd;
use super::states::StripeStates;
use super::{Error, LazyStatus};
use crate::block::{BlockDevice, IoChannel, Notifier, SECTOR_SHIFT};
use crate::crypto::keys::Kek;
use crate::crypto::Xts;
use crate::remote::RemoteOptions;

/// Fetcher threads for a local source: enough to overlap source reads, base writes and syncs
/// of several stripes.
const LOCAL_FETCHERS: usize = 4;

/// What [`LazyDevice::stripe_map`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeMap {
    pub shift: u8,
    /// Per stripe: [`super::metadata::FETCHED`], [`super::metadata::WRITTEN`].
    pub bits: Vec<u8>,
    /// Stripes `0..source_stripes` have content in the source.
    pub source_stripes: usize,
}

/// What the lazy layer needs from the configuration.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    pub source: SourceSpec,
    /// Fetcher threads (`fetch_connections`); `None`: 4 for a local source, 16 for a remote one.
    pub fetchers: Option<usize>,
    /// For remote sources: timeouts, retries, S3 settings.
    pub remote: RemoteOptions,
    pub metadata_path: PathBuf,
    pub copy_on_read: bool,
    pub autofetch: bool,
    /// Background fetch rate limit in MiB/s; `None`: unlimited.
    pub autofetch_mib_per_sec: Option<u32>,
    /// The KEK (`--kek`), which unwraps an `archive_url` archive's key.
    pub archive_kek: Option<Arc<Kek>>,
    /// Another process owns the disk (a live migration's source): fetch nothing until
    /// [`LazyDevice::take_over`].
    pub standby: bool,
}

/// Of `fetchers` threads, how many background work (autofetch) may use at once: a quarter
/// (at least one) stays free for guest demand. With 4 local fetchers, 2 (so a local
/// autofetch leaves the disk's bandwidth to the guest); with 16 remote ones, 12 (remote
/// throughput comes from concurrency).
fn background_fetchers(fetchers: usize) -> usize {
    if fetchers <= LOCAL_FETCHERS {
        fetchers.div_ceil(2)
    } else {
        fetchers - fetchers / 4
    }
}

impl LazyOptions {
    /// Fetching from `source` on demand only, copy-on-read off, default remote settings.
    pub fn new(source: SourceSpec, metadata_path: PathBuf) -> Self {
        LazyOptions {
            source,
            fetchers: None,
            remote: RemoteOptions::default(),
            metadata_path,
            copy_on_read: false,
            autofetch: false,
            autofetch_mib_per_sec: None,
            archive_kek: None,
            standby: false,
        }
    }
}

pub struct LazyDevice {
    inner: Arc<dyn BlockDevice>,
    pub(super) source: Arc<dyn StripeSource>,
    source_end: SourceEnd,
    pub(super) shared: Arc<Shared>,
    fetchers: Vec<JoinHandle<()>>,
    /// `metadata_path`, for errors.
    pub(super) metadata_path: PathBuf,
}

impl LazyDevice {
    /// Opens the source the options name and the metadata (decrypted with `xts` when given)
    /// and starts the fetcher pool. `inner` is the base disk, encryption included;
    /// `ring_entries` sizes the source's read-through rings. Errors name the field.
    pub fn open(
        inner: Arc<dyn BlockDevice>,
        xts: Option<Arc<Xts>>,
        opts: &LazyOptions,
        ring_entries: u32,
    ) -> Result<Self, Error> {
        let meta = open_metadata(&opts.metadata_path, inner.sectors(), xts)?;
        if let Some(source) = unopened_if_complete(opts, &meta.1, inner.sectors())? {
            return Self::start(inner, meta, source, opts, false);
        }
        let source = source::open(opts, ring_entries)?;
        Self::start(inner, meta, source, opts, true)
    }

    /// [`LazyDevice::open`] with the source already open (`opts.source` is not used).
    pub fn with_source(
        inner: Arc<dyn BlockDevice>,
        xts: Option<Arc<Xts>>,
        source: Arc<dyn StripeSource>,
        opts: &LazyOptions,
    ) -> Result<Self, Error> {
        let meta = open_metadata(&opts.metadata_path, inner.sectors(), xts)?;
        Self::start(inner, meta, source, opts, true)
    }

    /// `pin`: check the source against the one pinned for the disk (and pin it).
    fn start(
        inner: Arc<dyn BlockDevice>,
        (meta, md): (MetaFile, Metadata),
        source: Arc<dyn StripeSource>,
        opts: &LazyOptions,
        pin: bool,
    ) -> Result<Self, Error> {
        let disk_sectors = inner.sectors();
        let (bytes, disk_bytes) = (source.bytes(), disk_sectors << SECTOR_SHIFT);
        let fetchers = opts
            .fetchers
            .unwrap_or(if opts.source.is_remote() {
                opts.remote.connections
            } else {
                LOCAL_FETCHERS
            })
            .max(1);
        if bytes > disk_bytes && !source.may_exceed_disk() {
            return Err(Error::SourceTooLarge {
                field: source.identity().kind.field(),
                source_name: source.to_string(),
                bytes,
                disk_bytes,
            });
        }
        if bytes > disk_bytes {
            warn!(
                "image {source} is {bytes} bytes, larger than the {disk_bytes}-byte disk: \
                 the rest is ignored"
            );
        }
        // Before any fetch can start: a disk never holds stripes of two versions.
        if pin {
            super::pin::check_and_pin(&opts.metadata_path, &md, &source.identity())?;
        }
        let source_end = SourceEnd::read(&*source, disk_sectors).map_err(|e| Error::ImageTail {
            image: source.to_string(),
            source: e,
        })?;
        let shared = Arc::new(Shared {
            source: source.clone(),
            stripes: StripeStates::new(&md, disk_sectors),
            queue: FetchQueue::new(
                opts.autofetch,
                background_fetchers(fetchers),
                opts.autofetch_mib_per_sec.map(|m| u64::from(m) << 20),
                opts.standby,
            ),
            meta: MetaStore::new(meta),
            copy_on_read: opts.copy_on_read,
            errors: AtomicU64::new(0),
            last_error: Mutex::default(),
            staged: Mutex::default(),
            staged_free: Mutex::default(),
            bufs: Mutex::default(),
            here_paused_until: Mutex::default(),
            shutdown: Mutex::default(),
        });
        info!(
            "lazy fetch from {source}: {} of {} stripes of {} KiB fetched, copy_on_read {}, \
             autofetch {}",
            shared.stripes.fetched_count(),
            shared.stripes.count(),
            shared.stripes.stripe_bytes() >> 10,
            opts.copy_on_read,
            opts.autofetch
        );
        // A fetcher waits for each write: it runs on the fetcher's thread (Notifier::inline).
        let channels = (0..fetchers)
            .map(|_| inner.new_channel_with(Notifier::inline()?))
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::FetcherChannels)?;
        let mut fetchers = Vec::new();
        for (i, channel) in channels.into_iter().enumerate() {
            let (shared, base, source) = (shared.clone(), inner.clone(), source.clone());
            let handle = std::thread::Builder::new()
                .name(format!("fetch-{i}"))
                .spawn(move || fetcher(shared, base, channel, source))
                .map_err(|source| Error::Thread {
                    what: "a fetcher thread",
                    source,
                })?;
            fetchers.push(handle);
        }
        let persist = shared.clone();
        let handle = std::thread::Builder::new()
            .name("persist".into())
            .spawn(move || persister(persist))
            .map_err(|source| Error::Thread {
                what: "the metadata persister thread",
                source,
            })?;
        fetchers.push(handle);
        Ok(LazyDevice {
            inner,
            source,
            source_end,
            shared,
            fetchers,
            metadata_path: opts.metadata_path.clone(),
        })
    }

    /// Shutting down (SIGTERM): requests still waiting for fetches `grace` from now fail
    /// with EIO, so that a stop never waits for a slow or silent source beyond that.
    pub fn shutdown(&self, grace: Duration) {
        *lock(&self.shared.shutdown) = Some(Instant::now() + grace);
        self.shared.queue.wake_parked();
    }

    /// Hands the disk to another process (live migration): starts no more fetches and waits
    /// for those running (each durable on its own). Until [`LazyDevice::take_over`], nothing
    /// here writes the disk or the metadata but a sync, which persists the WRITTEN bits: the
    /// caller syncs the device next. Call with no guest request in flight.
    pub fn hand_over(&self) {
        self.shared.queue.hold();
    }

    /// Takes the disk (back) from the process it was handed to: adds what that process
    /// fetched and wrote, as its metadata file says, to the stripe states, then fetches again.
    pub fn take_over(&self) -> Result<(), Error> {
        let md = self
            .shared
            .meta
            .reread(self.inner.sectors())
            .map_err(|source| Error::BadMetadata {
                path: self.metadata_path.clone(),
                source,
            })?;
        self.shared.stripes.merge(&md);
        self.shared.queue.unhold();
        Ok(())
    }

    /// The stripes as a stripe server shows them: their size (2^shift sectors), each one's
    /// FETCHED and WRITTEN bits now, and how many the source covers (the stripes from there
    /// on, unfetched, read as zeros).
    pub fn stripe_map(&self) -> StripeMap {
        StripeMap {
            shift: self.shared.stripes.shift,
            source_stripes: self.source_stripes(),
            bits: self.shared.stripes.bits(),
        }
    }

    /// [`LazyDevice::stripe_map`] of one stripe, without copying the others: its size (as a
    /// shift), its bits, and whether the source covers it; `None` past the last stripe.
    pub fn stripe_state(&self, stripe: usize) -> Option<(u8, u8, bool)> {
        let bits = self.shared.stripes.bits_of(stripe)?;
        Some((
            self.shared.stripes.shift,
            bits,
            stripe < self.source_stripes(),
        ))
    }

    /// Reads stripe `stripe` from the source into `buf` (its first `buf.len()` bytes; zeros
    /// past the source's end) if it is not fetched, without storing it: nothing of this disk
    /// is written, so a disk handed over stays as it was. `None`: the stripe is fetched (or
    /// past the last one); read the disk.
    pub fn read_unfetched(&self, stripe: usize, buf: &mut [u8]) -> Option<io::Result<()>> {
        let s = &self.shared.stripes;
        if stripe >= s.count() || s.is_fetched(stripe) {
            return None;
        }
        let start = s.sectors_of(stripe).0 << SECTOR_SHIFT;
        Some(self.source.read_at(start, buf))
    }

    fn source_stripes(&self) -> usize {
        let s = &self.shared.stripes;
        let covered = self.source.bytes().div_ceil(s.stripe_bytes());
        usize::try_from(covered).map_or(s.count(), |c| c.min(s.count()))
    }

    pub fn status(&self) -> LazyStatus {
        let s = &self.shared;
        let outage = self.source.outage();
        let (stripes, fetched) = (s.stripes.count(), s.stripes.fetched_count());
        LazyStatus {
            stripes,
            fetched,
            written: s.stripes.count_with(WRITTEN),
            fetching: s.queue.pending(),
            fetch_errors: s.errors.load(SeqCst),
            complete: fetched == stripes,
            stripe_bytes: s.stripes.stripe_bytes(),
            copy_on_read: s.copy_on_read,
            autofetch: s.queue.autofetch,
            source: self.source.to_string(),
            fetch_retries: self.source.retries(),
            last_fetch_error: lock(&s.last_error).clone(),
            source_down: outage.is_some(),
            source_down_since: outage.map(|o| {
                o.since
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            }),
        }
    }
}

/// A remote source is not opened for a disk whose stripes are all fetched: nothing will be
/// read from it, and its host may be gone (see [`source::Unopened`]).
fn unopened_if_complete(
    opts: &LazyOptions,
    md: &Metadata,
    disk_sectors: u64,
) -> Result<Option<Arc<dyn StripeSource>>, Error> {
    // The metadata's stripe count is the disk's: it is derived from the disk's size.
    if !opts.source.is_remote() || md.fetched_count() < md.stripe_count() {
        return Ok(None);
    }
    let (kind, name) = match &opts.source {
        SourceSpec::Url(u) if u.starts_with("s3://") => (SourceKind::S3, u.clone()),
        SourceSpec::Url(u) => (SourceKind::Http, crate::remote::http::redact(u).to_string()),
        SourceSpec::StripeServer { url, .. } => (SourceKind::StripeServer, url.clone()),
        SourceSpec::Archive(u) => (SourceKind::Archive, u.clone()),
        SourceSpec::File(_) => return Ok(None),
    };
    let identity = super::pin::pinned(&opts.metadata_path)?
        .unwrap_or_else(|| SourceIdentity::new(kind, name.clone(), disk_sectors << SECTOR_SHIFT));
    info!(
        "{name}: all {} stripes are fetched: the disk needs its source no more, which is not \
         opened",
        md.stripe_count()
    );
    Ok(Some(Arc::new(source::Unopened::new(name, identity))))
}

/// Opens and validates the metadata file.
fn open_metadata(
    path: &Path,
    disk_sectors: u64,
    xts: Option<Arc<Xts>>,
) -> Result<(MetaFile, Metadata), Error> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::OpenMetadata {
            path: path.to_owned(),
            source,
        })?;
    let md = Metadata::read_from(&file, disk_sectors, xts.as_deref()).map_err(|source| {
        Error::BadMetadata {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok((MetaFile { file, xts }, md))
}

impl Drop for LazyDevice {
    fn drop(&mut self) {
        self.shared.queue.stop();
        for h in self.fetchers.drain(..) {
            let _ = h.join();
        }
    }
}

impl BlockDevice for LazyDevice {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }

    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
        // The source's read-through reads and the fetchers' wake-ups signal the base channel's
        // notifier too, so the worker watches a single descriptor.
        let inner = self.inner.new_channel_with(notifier.clone())?;
        let image = self.source.read_through(notifier.clone()).transpose()?;
        let waker = Arc::new(Waker {
            notifier,
            parked: AtomicUsize::new(0),
        });
        self.shared.queue.register(&waker);
        Ok(Box::new(LazyChannel::new(
            self.shared.clone(),
            self.source_end.clone(),
            inner,
            image,
            waker,
        )))
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()?;
        self.shared.persist_written()
    }

    fn iovec_align(&self) -> Option<usize> {
        // Vectors only ever go to the base disk's channel (source reads use our buffers).
        self.inner.iovec_align()
    }
}
