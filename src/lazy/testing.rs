//! Test helpers: [`MemSource`], an in-memory stripe source that can fail or delay chosen
//! stripes, as [`MemDevice`](crate::block::testing::MemDevice) does for devices.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

use super::source::{SourceIdentity, SourceKind};
use super::StripeSource;
pub use crate::block::testing::Fault;

/// An image in a `Vec<u8>`, served as a [`StripeSource`] without read-through (reads of
/// unfetched stripes wait for their fetch). A read touching a stripe with a [`Fault`] fails
/// with its errno ([`Fault::Fail`]) or sleeps its delay first ([`Fault::Delay`], so the
/// fetcher thread is held that long); the fault stays until [`MemSource::clear`]. With
/// [`MemSource::offer_read_now`] it also makes [`StripeSource::read_now`] reads (recorded
/// apart, with their threads, delayed as other reads, and failing with
/// [`MemSource::fail_now`]).
pub struct MemSource {
    data: Vec<u8>,
    stripe_bytes: u64,
    faults: Mutex<HashMap<u64, Fault>>,
    /// Reads that touched each stripe, failed or not.
    reads: Mutex<HashMap<u64, u64>>,
    /// `read_now` offered, and the errno it fails with (0: none).
    now: Mutex<Option<i32>>,
    /// The stripes `read_now` read, and on which threads.
    now_reads: Mutex<Vec<(u64, std::thread::ThreadId)>>,
    /// Bytes of the reads that succeeded.
    bytes_read: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemSource {
    /// `data` as a source whose stripes (for [`MemSource::set`]) are `stripe_bytes` long: the
    /// stripe size of the lazy disk it serves.
    pub fn new(data: Vec<u8>, stripe_bytes: u64) -> Self {
        assert!(stripe_bytes > 0, "stripes of 0 bytes");
        MemSource {
            data,
            stripe_bytes,
            faults: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
            now: Mutex::new(None),
            now_reads: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
        }
    }

    /// Makes `read_now` reads from now on.
    pub fn offer_read_now(&self) {
        lock(&self.now).get_or_insert(0);
    }

    /// Later `read_now` reads fail with `errno` (0: they succeed again).
    pub fn fail_now(&self, errno: i32) {
        *lock(&self.now) = Some(errno);
    }

    /// The stripes `read_now` was asked for, and the threads that asked.
    pub fn now_reads(&self) -> Vec<(u64, std::thread::ThreadId)> {
        lock(&self.now_reads).clone()
    }

    /// Fills `buf` with the bytes at `offset`, zeros past the end.
    fn copy_out(&self, offset: u64, buf: &mut [u8]) {
        let start = usize::try_from(offset).map_or(self.data.len(), |o| o.min(self.data.len()));
        let n = (self.data.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        buf[n..].fill(0);
    }

    /// Applies `fault` to every later read touching `stripe` (replacing its earlier fault).
    pub fn set(&self, stripe: u64, fault: Fault) {
        lock(&self.faults).insert(stripe, fault);
    }

    /// Reads of `stripe` behave again.
    pub fn clear(&self, stripe: u64) {
        lock(&self.faults).remove(&stripe);
    }

    /// How many reads touched `stripe`, failed ones included.
    pub fn reads(&self, stripe: u64) -> u64 {
        lock(&self.reads).get(&stripe).copied().unwrap_or(0)
    }

    /// Bytes of all successful reads (zeros past the end included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(SeqCst)
    }
}

impl fmt::Display for MemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memory")
    }
}

impl StripeSource for MemSource {
    fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let last = offset + (buf.len() as u64).max(1) - 1;
        let stripes = offset / self.stripe_bytes..=last / self.stripe_bytes;
        let faults: Vec<Fault> = {
            let mut reads = lock(&self.reads);
            let faults = lock(&self.faults);
            stripes
                .filter_map(|s| {
                    *reads.entry(s).or_default() += 1;
                    faults.get(&s).copied()
                })
                .collect()
        };
        for fault in &faults {
            if let Fault::Delay(d) = fault {
                std::thread::sleep(*d);
            }
        }
        if let Some(Fault::Fail(errno)) = faults.iter().find(|f| matches!(f, Fault::Fail(_))) {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        self.copy_out(offset, buf);
        self.bytes_read.fetch_add(buf.len() as u64, SeqCst);
        Ok(())
    }

    fn read_now(
        &self,
        offset: u64,
        buf: &mut [u8],
        _within: std::time::Duration,
    ) -> Option<io::Result<()>> {
        let errno = (*lock(&self.now))?;
        let stripe = offset / self.stripe_bytes;
        lock(&self.now_reads).push((stripe, std::thread::current().id()));
        if let Some(Fault::Delay(d)) = lock(&self.faults).get(&stripe).copied() {
            std::thread::sleep(d);
        }
        if errno != 0 {
            return Some(Err(io::Error::from_raw_os_error(errno)));
        }
        self.copy_out(offset, buf);
        Some(Ok(()))
    }

    fn identity(&self) -> SourceIdentity {
        // A content hash (FNV-1a) as its version: a test reopening a disk on other data is
        // refused as a changed source would be.
        let hash = self.data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        SourceIdentity::new(SourceKind::File, "memory", self.bytes())
            .with("fnv", format!("{hash:016x}"))
    }
}
