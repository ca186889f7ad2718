//! The dirty log of a live migration (vhost-user "Migration"): one bit per 4 KiB page of
//! guest-physical address space, in a memfd shared with SET_LOG_BASE (LOG_SHMFD), which the
//! backend sets for every guest page it writes while `VHOST_F_LOG_ALL` is acked.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use vhost::VhostUserDirtyLogRegion;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use super::error::{io_err, Error, Result};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// The log, mapped here as the backend maps it.
pub struct DirtyLog {
    map: MmapRegion,
    /// Keeps the memfd open (its descriptor goes with SET_LOG_BASE).
    file: File,
}

impl DirtyLog {
    /// A clear log for guest-physical addresses `0..mem_end`, sized as QEMU sizes it (whole
    /// 64-bit words).
    pub fn new(mem_end: u64) -> Result<DirtyLog> {
        let pages = mem_end.div_ceil(LOG_PAGE);
        let size = pages.div_ceil(64) * 8;
        // SAFETY: a valid NUL-terminated name; the returned fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io_err("memfd_create for the dirty log")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(io_err("sizing the dirty log memfd"))?;
        let len = usize::try_from(size).map_err(|e| Error::Memory(format!("log size: {e}")))?;
        let dup = file.try_clone().map_err(io_err("duplicating the log fd"))?;
        let map = MmapRegion::from_file(FileOffset::new(dup, 0), len)
            .map_err(|e| Error::Memory(format!("mapping the dirty log: {e:?}")))?;
        Ok(DirtyLog { map, file })
    }

    /// What SET_LOG_BASE sends (the descriptor is borrowed from this log).
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.map.size() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        self.map.get_atomic_ref::<AtomicU8>(i).ok()
    }

    /// Whether the page holding guest-physical address `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }

    /// The guest-physical addresses of the marked pages, cleared as they are read (as QEMU
    /// syncs the log: a page the backend marks meanwhile is in this answer or the next).
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for i in 0..self.map.size() {
            let Some(bits) = self.byte(i).map(|b| b.swap(0, Ordering::AcqRel)) else {
                break;
            };
            pages.extend(
                (0..8u64)
                    .filter(|bit| bits & (1 << bit) != 0)
                    .map(|bit| (i as u64 * 8 + bit) * LOG_PAGE),
            );
        }
        pages
    }
}
