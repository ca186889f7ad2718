//! Queue 0: a split virtqueue laid out in the shared memory, driven like a guest driver.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::error::{ensure, io_err, mem_err, Error, Result};
use super::memory::{DESC_SIZE, HEADER_LEN};
use super::{Geometry, Layout, SharedMemory, GUEST_BASE};

/// Status value written before a request is submitted, so a backend that completes a request
/// without writing its status is caught.
const STATUS_UNSET: u8 = 0xff;

/// Queue 0's state once stage 3 ran.
pub(super) struct Ring {
    pub(super) geometry: Geometry,
    pub(super) layout: Layout,
    kick: EventFd,
    call: EventFd,
    /// Next avail index we publish (free-running).
    pub(super) avail_idx: u16,
    /// Next used index we consume (free-running).
    used_idx: u16,
}
/// A status byte as text.
pub fn status_name(s: u8) -> String {
    match u32::from(s) {
        VIRTIO_BLK_S_OK => "0 (OK)".into(),
        VIRTIO_BLK_S_IOERR => "1 (IOERR)".into(),
        VIRTIO_BLK_S_UNSUPP => "2 (UNSUPP)".into(),
        _ if s == STATUS_UNSET => format!("{s:#x} (never written by the backend)"),
        _ => format!("{s:#x} (invalid)"),
    }
}

impl Ring {
    /// A fresh ring (both indexes 0) laid out as `layout`, notified through `kick` and `call`.
    pub(super) fn new(geometry: Geometry, layout: Layout, kick: EventFd, call: EventFd) -> Ring {
        Ring {
            geometry,
            layout,
            kick,
            call,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    pub(super) fn eventfds(&self) -> (&EventFd, &EventFd) {
        (&self.kick, &self.call)
    }

    /// The used index as the backend left it in memory (not what was consumed of it).
    pub(super) fn used_idx_in_memory(&self, mem: &SharedMemory) -> Result<u16> {
        let idx: u16 = mem
            .mem
            .load(
                GuestAddress(GUEST_BASE + self.layout.used + 2),
                Ordering::Acquire,
            )
            .map_err(mem_err("reading the used index"))?;
        Ok(u16::from_le(idx))
    }

    fn desc_addr(&self, i: u16) -> GuestAddress {
        GuestAddress(GUEST_BASE + self.layout.desc + DESC_SIZE * u64::from(i))
    }

    pub(super) fn data_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(
            GUEST_BASE + self.layout.data + u64::from(self.geometry.chunk) * u64::from(slot),
        )
    }

    fn status_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(GUEST_BASE + self.layout.status + u64::from(slot))
    }

    /// Fails with [`Error::Status`] (showing `used_len` if given) unless the backend wrote OK
    /// into the status byte of the read of `len` bytes at `sector` in `slot`.
    pub(super) fn check_status(
        &self,
        mem: &SharedMemory,
        slot: u16,
        sector: u64,
        len: u32,
        used_len: Option<u32>,
    ) -> Result<()> {
        let status: u8 = mem
            .mem
            .read_obj(self.status_addr(slot))
            .map_err(mem_err("reading a status byte"))?;
        if status != VIRTIO_BLK_S_OK as u8 {
            return Err(Error::Status {
                sector,
                len,
                status,
                used_len,
            });
        }
        Ok(())
    }

    /// The slot whose chain starts at descriptor `id`, if `id` is such a head.
    pub(super) fn slot_of(&self, id: u32) -> Result<u16> {
        let per = u32::from(self.geometry.descs_per_req);
        ensure!(
            id < u32::from(self.geometry.queue_size),
            Backend,
            "backend returned descriptor id {id}, queue size is {}",
            self.geometry.queue_size
        );
        ensure!(
            id.is_multiple_of(per) && id / per < u32::from(self.geometry.slots),
            Backend,
            "backend returned descriptor id {id}, which is not the head of a request"
        );
        Ok((id / per) as u16)
    }

    fn write_desc(
        &self,
        mem: &SharedMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; DESC_SIZE as usize];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.mem
            .write_slice(&d, self.desc_addr(i))
            .map_err(mem_err("writing a descriptor"))
    }

    /// Builds an IN request for `len` bytes at `sector` in `slot` and makes it available.
    pub(super) fn submit_read(
        &mut self,
        mem: &SharedMemory,
        slot: u16,
        sector: u64,
        len: u32,
    ) -> Result<()> {
        self.submit_read_at(mem, slot, sector, len, 0)
    }

    /// [`Ring::submit_read`] with the data buffer `data_off` bytes into the slot's (page
    /// aligned) data area, e.g. 1 for a buffer no device can read into directly.
    pub(super) fn submit_read_at(
        &mut self,
        mem: &SharedMemory,
        slot: u16,
        sector: u64,
        len: u32,
        data_off: u32,
    ) -> Result<()> {
        let g = &self.geometry;
        ensure!(
            u64::from(data_off) + u64::from(len) <= u64::from(g.chunk),
            Options,
            "a {len}-byte buffer at offset {data_off} does not fit a {}-byte slot",
            g.chunk
        );
        let head = slot * g.descs_per_req;
        let hdr_addr = GUEST_BASE + self.layout.headers + HEADER_LEN * u64::from(slot);
        let status_addr = self.status_addr(slot).0;
        let mut hdr = [0u8; HEADER_LEN as usize];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.mem
            .write_slice(&hdr, GuestAddress(hdr_addr))
            .map_err(mem_err("writing a request header"))?;
        mem.mem
            .write_obj(STATUS_UNSET, GuestAddress(status_addr))
            .map_err(mem_err("writing a status byte"))?;

        let next_flag = VRING_DESC_F_NEXT as u16;
        let write_flag = VRING_DESC_F_WRITE as u16;
        self.write_desc(mem, head, hdr_addr, HEADER_LEN as u32, next_flag, head + 1)?;
        let data = self.data_addr(slot).0 + u64::from(data_off);
        let mut i = head + 1;
        let mut off = 0u32;
        while off < len {
            let n = (len - off).min(g.seg_len);
            self.write_desc(
                mem,
                i,
                data + u64::from(off),
                n,
                write_flag | next_flag,
                i + 1,
            )?;
            off += n;
            i += 1;
        }
        self.write_desc(mem, i, status_addr, 1, write_flag, 0)?;

        // avail->ring[avail_idx % q] = head, then publish the new index.
        let q = g.queue_size;
        let avail = GUEST_BASE + self.layout.avail;
        let entry = avail + 4 + 2 * u64::from(self.avail_idx % q);
        mem.mem
            .write_obj(head.to_le(), GuestAddress(entry))
            .map_err(mem_err("writing the avail ring"))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(avail + 2),
                Ordering::Release,
            )
            .map_err(mem_err("publishing the avail index"))?;
        Ok(())
    }

    /// A hostile guest's move: publishes `idx` as the avail index, whatever the ring holds,
    /// and kicks regardless of VRING_USED_F_NO_NOTIFY.
    pub(super) fn force_avail_index(&self, mem: &SharedMemory, idx: u16) -> Result<()> {
        mem.mem
            .store(
                idx.to_le(),
                GuestAddress(GUEST_BASE + self.layout.avail + 2),
                Ordering::Release,
            )
            .map_err(mem_err("publishing the avail index"))?;
        self.kick.write(1).map_err(io_err("kicking the backend"))
    }

    /// Kicks the backend unless it asked not to be (VRING_USED_F_NO_NOTIFY), like a Linux guest.
    pub(super) fn notify(&self, mem: &SharedMemory) -> Result<()> {
        // The avail index store must be visible before we look at the used flags; pairs with
        // the backend's barrier between clearing NO_NOTIFY and re-checking the avail index.
        fence(Ordering::SeqCst);
        let flags: u16 = mem
            .mem
            .load(
                GuestAddress(GUEST_BASE + self.layout.used),
                Ordering::Acquire,
            )
            .map_err(mem_err("reading the used flags"))?;
        if u16::from_le(flags) & VRING_USED_F_NO_NOTIFY as u16 == 0 {
            self.kick.write(1).map_err(io_err("kicking the backend"))?;
        }
        Ok(())
    }

    /// Waits (on the call eventfd, up to `timeout` without progress) until the backend put at
    /// least one entry on the used ring; returns the new (id, len) entries.
    pub(super) fn wait_used(
        &mut self,
        mem: &SharedMemory,
        in_flight: usize,
        timeout: Duration,
    ) -> Result<Vec<(u32, u32)>> {
        let used = GUEST_BASE + self.layout.used;
        let deadline = Instant::now() + timeout;
        loop {
            let idx: u16 = mem
                .mem
                .load(GuestAddress(used + 2), Ordering::Acquire)
                .map_err(mem_err("reading the used index"))?;
            let idx = u16::from_le(idx);
            let new = idx.wrapping_sub(self.used_idx);
            if new > 0 {
                ensure!(
                    usize::from(new) <= in_flight,
                    Backend,
                    "backend advanced the used index by {new} with only {in_flight} requests in \
                     flight (used idx {} -> {idx})",
                    self.used_idx
                );
                let q = self.geometry.queue_size;
                let mut out = Vec::with_capacity(usize::from(new));
                for _ in 0..new {
                    let elem = used + 4 + 8 * u64::from(self.used_idx % q);
                    let mut e = [0u8; 8];
                    mem.mem
                        .read_slice(&mut e, GuestAddress(elem))
                        .map_err(mem_err("reading the used ring"))?;
                    let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                    let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                    out.push((id, len));
                    self.used_idx = self.used_idx.wrapping_add(1);
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    timeout,
                    in_flight,
                    avail_idx: self.avail_idx,
                    used_idx: idx,
                });
            }
            wait_readable(&self.call, deadline - now)?;
            // Consume the notification; the used index is re-read above either way.
            match self.call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err("reading the call eventfd")(e)),
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passed.
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid, writable pollfd of ours (nfds = 1) for the duration of the
    // call; its fd is borrowed from `fd`, open throughout.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("poll on the call eventfd")(e));
        }
    }
    Ok(())
}
