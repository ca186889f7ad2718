//! The shared "guest RAM" and where the rings, headers, status bytes and data go in it.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::error::{io_err, Error, Result};
use super::{Geometry, GUEST_BASE};

/// Bytes of a split-ring descriptor.
pub(super) const DESC_SIZE: u64 = 16;
/// Bytes of a virtio-blk request header (type, reserved, sector).
pub(super) const HEADER_LEN: u64 = 16;

/// Offsets (from [`GUEST_BASE`]) of everything in the shared region.
#[derive(Debug, Clone)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub headers: u64,
    pub status: u64,
    pub data: u64,
    pub size: u64,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    pub fn new(g: &Geometry) -> Layout {
        let q = u64::from(g.queue_size);
        let desc = 0;
        let avail = desc + DESC_SIZE * q;
        // flags, idx, ring[q], used_event
        let used = align(avail + 4 + 2 * q + 2, 4096);
        // flags, idx, ring[q] of {id u32, len u32}, avail_event
        let headers = align(used + 4 + 8 * q + 2, 4096);
        let status = headers + HEADER_LEN * u64::from(g.slots);
        let data = align(status + u64::from(g.slots), 4096);
        let size = align(data + u64::from(g.chunk) * u64::from(g.slots), 4096);
        Layout {
            desc,
            avail,
            used,
            headers,
            status,
            data,
            size,
        }
    }
}

/// The "guest RAM": one memfd mapped shared, so the backend can map it too.
pub struct SharedMemory {
    pub mem: GuestMemoryMmap,
    pub info: VhostUserMemoryRegionInfo,
}

impl SharedMemory {
    pub fn new(size: u64) -> Result<SharedMemory> {
        let size = align(size.max(4096), 4096);
        // SAFETY: a valid NUL-terminated name; the returned fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io_err("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(io_err("sizing the memfd"))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(GUEST_BASE),
            usize::try_from(size).map_err(|e| Error::Memory(format!("memory size: {e}")))?,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| Error::Memory(format!("mapping the memfd: {e:?}")))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(&region)
            .map_err(|e| Error::Memory(format!("describing the memory region: {e:?}")))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::Memory(format!("building guest memory: {e:?}")))?;
        Ok(SharedMemory { mem, info })
    }

    /// SET_VRING_ADDR's data for a queue of `queue_size` laid out as `layout` at [`GUEST_BASE`].
    pub(super) fn vring_config(&self, layout: &Layout, queue_size: u16) -> Result<VringConfigData> {
        Ok(VringConfigData {
            queue_max_size: queue_size,
            queue_size,
            flags: 0,
            desc_table_addr: self.user_addr(GUEST_BASE + layout.desc)?,
            used_ring_addr: self.user_addr(GUEST_BASE + layout.used)?,
            avail_ring_addr: self.user_addr(GUEST_BASE + layout.avail)?,
            log_addr: None,
        })
    }

    /// The address of guest address `gpa` in this process (what SET_VRING_ADDR wants).
    pub(super) fn user_addr(&self, gpa: u64) -> Result<u64> {
        let off = gpa
            .checked_sub(self.info.guest_phys_addr)
            .filter(|&o| o < self.info.memory_size)
            .ok_or_else(|| Error::Memory(format!("address {gpa:#x} outside guest memory")))?;
        Ok(self.info.userspace_addr + off)
    }
}
