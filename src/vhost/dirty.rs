//! Dirty-page logging for live migration (vhost-user `VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): while QEMU migrates the guest's RAM, every guest page the
//! backend writes must be marked in the log QEMU shares with `SET_LOG_BASE` (one bit per 4 KiB
//! page of guest-physical address space), or the destination gets the page's old content.
//!
//! [`DirtyBitmap`] is the bitmap of each guest memory region: vm-memory marks it on every write
//! through its API (status bytes, used ring, bounce-buffer copies). What vm-memory cannot see,
//! io_uring reading straight into guest buffers, the data path marks itself when the request
//! completes, before its used entry is published (`virtio_blk::worker`).
//!
//! vhost-user-backend's own `BitmapMmapRegion` is not used because (0.24) it keeps logging
//! after migration ends, leaves regions added after `SET_LOG_BASE` unlogged, and clones an
//! `Arc` and takes a lock on every guest memory access even with no migration running; here
//! an idle log costs one relaxed atomic load per access.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::bitmap::{BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// vhost's log page (`VHOST_LOG_PAGE`).
const LOG_PAGE: u64 = 0x1000;

/// Where one region's pages sit in QEMU's log.
pub struct RegionLog {
    log: Arc<MmapLogReg>,
    /// Guest-physical address of the region's first byte.
    start: u64,
    /// Guest-physical address of its last byte.
    last: u64,
}

impl fmt::Debug for RegionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionLog({:#x}..={:#x})", self.start, self.last)
    }
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, log: Arc<MmapLogReg>) -> io::Result<Self> {
        // The crate's own bitmap checks that the log covers the region's last page; a log
        // too short for the memory is refused (SET_LOG_BASE fails) instead of indexing past
        // the mapping.
        <vhost_user_backend::bitmap::AtomicBitmapMmap as MemRegionBitmap>::new(
            region,
            log.clone(),
        )?;
        let start = region.start_addr().raw_value();
        let last = start
            .checked_add(region.len() - 1)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        Ok(RegionLog { log, start, last })
    }
}

impl RegionLog {
    /// Marks `len` bytes at `offset` into the region.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let Some(first) = self.start.checked_add(offset as u64) else {
            return;
        };
        let end = first.saturating_add(len as u64 - 1).min(self.last);
        if first > end {
            return;
        }
        for page in first / LOG_PAGE..=end / LOG_PAGE {
            // In bounds: `new` checked that the byte holding the last page's bit is mapped.
            self.log[(page / 8) as usize].fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        let Some(addr) = self.start.checked_add(offset as u64) else {
            return false;
        };
        if addr > self.last {
            return false;
        }
        let page = addr / LOG_PAGE;
        self.log[(page / 8) as usize].load(Ordering::Relaxed) & (1 << (page % 8)) != 0
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Whether `log` is set: the only thing an access reads while no migration runs.
    active: AtomicBool,
    log: RwLock<Option<RegionLog>>,
}

impl Shared {
    #[inline]
    fn mark(&self, offset: usize, len: usize) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        self.mark_logged(offset, len);
    }

    #[cold]
    #[inline(never)]
    fn mark_logged(&self, offset: usize, len: usize) {
        if let Some(log) = self.log.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            log.mark(offset, len);
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        self.active.load(Ordering::Acquire)
            && self
                .log
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|l| l.is_marked(offset))
    }
}

/// The dirty bitmap of one guest memory region: QEMU's log while a migration runs, nothing
/// otherwise.
#[derive(Debug, Default, Clone)]
pub struct DirtyBitmap(Arc<Shared>);

impl DirtyBitmap {
    /// The log this region writes to, if logging.
    fn log(&self) -> Option<Arc<MmapLogReg>> {
        let guard = self.0.log.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|l| l.log.clone())
    }

    /// Stops logging this region (migration over or cancelled).
    fn stop(&self) {
        self.0.active.store(false, Ordering::Release);
        *self.0.log.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn is_logging(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }
}

impl BitmapReplace for DirtyBitmap {
    type InnerBitmap = RegionLog;

    fn replace(&self, log: RegionLog) {
        *self.0.log.write().unwrap_or_else(|p| p.into_inner()) = Some(log);
        self.0.active.store(true, Ordering::Release);
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = DirtySlice<'a>;
}

impl Bitmap for DirtyBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.is_marked(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> DirtySlice<'_> {
        DirtySlice {
            shared: &self.0,
            base: offset,
        }
    }
}

/// A region's bitmap seen from `base` bytes into the region (what vm-memory's slices carry):
/// a borrow, so making a slice costs no reference count.
#[derive(Clone, Copy)]
pub struct DirtySlice<'a> {
    shared: &'a Shared,
    base: usize,
}

impl fmt::Debug for DirtySlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtySlice(+{:#x})", self.base)
    }
}

impl WithBitmapSlice<'_> for DirtySlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtySlice<'_> {}

impl Bitmap for DirtySlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.shared.mark(self.base.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.shared.is_marked(self.base.saturating_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        DirtySlice {
            shared: self.shared,
            base: self.base.saturating_add(offset),
        }
    }
}

/// Guest memory whose regions carry a [`DirtyBitmap`].
pub type LoggedMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// A region's own bitmap (the mapping's; `GuestMemoryRegion::bitmap` gives a slice of it).
fn bitmap_of(region: &GuestRegionMmap<DirtyBitmap>) -> &DirtyBitmap {
    MmapRegion::bitmap(region)
}

/// After a memory table change: regions that are not logged while others (in `mem` or in the
/// table it replaced, whose bitmaps are `previous`) are get the same log, so pages in memory
/// added during a migration are logged too.
pub fn extend_log(mem: &LoggedMemory, previous: &[DirtyBitmap]) -> io::Result<()> {
    let log = mem
        .iter()
        .map(bitmap_of)
        .chain(previous)
        .find_map(|b| b.log());
    let Some(log) = log else {
        return Ok(());
    };
    for region in mem.iter().filter(|r| !bitmap_of(r).is_logging()) {
        bitmap_of(region).replace(RegionLog::new(region, log.clone())?);
    }
    Ok(())
}

/// Stops logging every region of `mem` (`SET_FEATURES` without `VHOST_F_LOG_ALL`).
pub fn stop_logging(mem: &LoggedMemory) {
    for region in mem.iter() {
        bitmap_of(region).stop();
    }
}

/// The bitmaps of `mem`'s regions (kept to find the log when a new table replaces it).
pub fn bitmaps(mem: &LoggedMemory) -> Vec<DirtyBitmap> {
    mem.iter().map(|r| bitmap_of(r).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::LoggedMemory;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

    /// What one 4 KiB read costs the data path with no migration running: the status byte
    /// and used-ring writes through vm-memory, plus the completion-time marking of the
    /// buffer (`virtio_blk::worker`), on memory with our bitmap, vhost-user-backend's, and none.
    /// A measurement, not a check: `cargo test --release --lib dirty_log_cost -- --ignored
    /// --nocapture`. Measured here: ours adds 6 to 85 ns per request over none, depending on
    /// how the compiler inlines vm-memory's accessors for a bitmap that is not `()` (the
    /// difference stays with `mark` reduced to nothing); vhost-user-backend's adds ~200 ns.
    #[test]
    #[ignore]
    fn dirty_log_cost() {
        fn per_request<M: GuestMemory>(mem: &M, n: u64) -> f64 {
            let start = std::time::Instant::now();
            for i in 0..n {
                let buf = GuestAddress((i % 64) * 4096);
                if let Ok(slices) = mem.get_slices(buf, 4096, Permissions::Write) {
                    for s in slices.flatten() {
                        s.bitmap().mark_dirty(0, s.len());
                    }
                }
                // Status byte, used element, used index.
                let _ = mem.write_obj(0u8, GuestAddress(0x40_0000 + i % 128));
                let _ = mem.write_obj(i, GuestAddress(0x41_0000 + (i % 128) * 8));
                let _ = mem.write_obj(i as u16, GuestAddress(0x42_0000));
            }
            start.elapsed().as_secs_f64() * 1e9 / n as f64
        }
        const N: u64 = 20_000_000;
        let ranges = [(GuestAddress(0), 8 << 20)];
        let logged = LoggedMemory::from_ranges(&ranges).unwrap();
        let plain = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        let upstream =
            GuestMemoryMmap::<vhost_user_backend::bitmap::BitmapMmapRegion>::from_ranges(&ranges)
                .unwrap();
        for _ in 0..2 {
            eprintln!(
                "no bitmap: {:.1} ns, DirtyBitmap (not logging): {:.1} ns, vhost-user-backend's \
                 BitmapMmapRegion (not logging): {:.1} ns per request",
                per_request(&plain, N),
                per_request(&logged, N),
                per_request(&upstream, N)
            );
        }
    }
}
