//! One virtqueue of a [`super::Client`] ([`QueueIo`]): a submit/reap API for many requests in
//! flight, and synchronous helpers.

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkioq, Completion, ReqFlags};

use super::IoResult;

/// One virtqueue plus its slice of the shared buffer region. `Send`, so it can be driven from a
/// (scoped) thread: `std::thread::scope(|s| for q in client.queues_mut() { s.spawn(...) })`.
pub struct QueueIo {
    pub(super) q: Blkioq,
    pub(super) index: usize,
    pub(super) buf_addr: usize,
    pub(super) buf_len: usize,
    pub(super) completions: Vec<MaybeUninit<Completion>>,
    pub(super) in_flight: usize,
    pub(super) io_timeout: Option<Duration>,
}

/// One completed request: `user_data` as submitted and `ret` (0 or negative errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

impl QueueIo {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Size of this queue's buffer area.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// This queue's buffer area (inside the driver's mapped memory region).
    pub fn buf(&self) -> &[u8] {
        // SAFETY: [buf_addr, +buf_len) is this queue's part of the Client's region, a zero-filled
        // shared memfd mapping that stays mapped until the Client (which owns this QueueIo and
        // only lends it out) drops its Blkio; no other queue's area overlaps it. The device
        // writes into it only for requests in flight, which callers reap before reading it.
        unsafe { std::slice::from_raw_parts(self.buf_addr as *const u8, self.buf_len) }
    }

    pub fn buf_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `buf`; `&mut self` makes this the only slice of the area in this process.
        unsafe { std::slice::from_raw_parts_mut(self.buf_addr as *mut u8, self.buf_len) }
    }

    /// Requests submitted but not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn ptr(&self, buf_off: usize, len: usize) -> *mut u8 {
        assert!(
            buf_off
                .checked_add(len)
                .is_some_and(|end| end <= self.buf_len),
            "buffer [{buf_off}, +{len}) exceeds queue buffer area of {} bytes; raise ClientOptions::mem_size",
            self.buf_len
        );
        (self.buf_addr + buf_off) as *mut u8
    }

    // ----- asynchronous API: submit_*() then reap() -----

    /// Queues a read of `len` bytes at disk `offset` into `buf()[buf_off..]`.
    pub fn submit_read(&mut self, offset: u64, buf_off: usize, len: usize, user_data: usize) {
        let p = self.ptr(buf_off, len);
        self.q.read(offset, p, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Queues a write of `buf()[buf_off..buf_off+len]` to disk `offset`.
    pub fn submit_write(&mut self, offset: u64, buf_off: usize, len: usize, user_data: usize) {
        self.submit_write_flags(offset, buf_off, len, user_data, ReqFlags::empty());
    }

    /// `flags` may contain `ReqFlags::FUA` (libblkio emulates it with a flush after the write).
    pub fn submit_write_flags(
        &mut self,
        offset: u64,
        buf_off: usize,
        len: usize,
        user_data: usize,
        flags: ReqFlags,
    ) {
        let p = self.ptr(buf_off, len);
        self.q.write(offset, p, len, user_data, flags);
        self.in_flight += 1;
    }

    /// Queues a scatter-gather read; `iov` must stay alive until the request completes (libblkio
    /// keeps the pointer if the ring is full).
    pub fn submit_readv_raw(&mut self, offset: u64, iov: &[libc::iovec], user_data: usize) {
        self.q.readv(
            offset,
            iov.as_ptr(),
            iov.len() as u32,
            user_data,
            ReqFlags::empty(),
        );
        self.in_flight += 1;
    }

    /// Queues a scatter-gather write; `iov` must stay alive until the request completes.
    pub fn submit_writev_raw(&mut self, offset: u64, iov: &[libc::iovec], user_data: usize) {
        self.q.writev(
            offset,
            iov.as_ptr(),
            iov.len() as u32,
            user_data,
            ReqFlags::empty(),
        );
        self.in_flight += 1;
    }

    pub fn submit_flush(&mut self, user_data: usize) {
        self.q.flush(user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    pub fn submit_discard(&mut self, offset: u64, len: u64, user_data: usize) {
        self.q.discard(offset, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// `unmap`: allow the device to deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, user_data: usize) {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, user_data, flags);
        self.in_flight += 1;
    }

    /// Kicks the device and reaps between `min` and `out.len()`-limited completions, blocking
    /// on the completion eventfd (no busy polling) until at least `min` are available.
    /// Appends to `out` and returns how many were appended. `timeout`: `None` waits forever.
    pub fn reap(
        &mut self,
        min: usize,
        out: &mut Vec<Done>,
        timeout: Option<Duration>,
    ) -> IoResult<usize> {
        let min = min.min(self.in_flight);
        let cap = self.in_flight.max(1);
        if self.completions.len() < cap {
            self.completions.resize_with(cap, MaybeUninit::uninit);
        }
        let mut t = timeout;
        let n = self
            .q
            .do_io(&mut self.completions[..cap], min, t.as_mut(), None)
            .map_err(|e| e.errno().raw_os_error())?;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialized the first `n` entries of the slice it was given.
            let c = unsafe { c.assume_init_ref() };
            out.push(Done {
                user_data: c.user_data,
                ret: c.ret,
            });
        }
        self.in_flight -= n;
        Ok(n)
    }

    /// Fast-path variant of [`reap`](Self::reap) for benchmarks: calls `f(user_data, ret)` for
    /// each completion without allocating. Returns `Err(ETIME)` on timeout.
    pub fn reap_with(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        mut f: impl FnMut(usize, i32),
    ) -> IoResult<usize> {
        let min = min.min(self.in_flight);
        let cap = self.in_flight.max(1);
        if self.completions.len() < cap {
            self.completions.resize_with(cap, MaybeUninit::uninit);
        }
        let mut t = timeout;
        let n = self
            .q
            .do_io(&mut self.completions[..cap], min, t.as_mut(), None)
            .map_err(|e| e.errno().raw_os_error())?;
        self.in_flight -= n;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialized the first `n` entries of the slice it was given.
            let c = unsafe { c.assume_init_ref() };
            f(c.user_data, c.ret);
        }
        Ok(n)
    }

    /// Waits for everything in flight; returns the completions.
    pub fn drain(&mut self) -> IoResult<Vec<Done>> {
        let mut out = Vec::new();
        while self.in_flight > 0 {
            let want = self.in_flight;
            self.reap(want, &mut out, None)?;
        }
        Ok(out)
    }

    /// Submit-then-wait for a single request (nothing else must be in flight).
    fn wait_one(&mut self) -> IoResult<()> {
        assert_eq!(
            self.in_flight, 1,
            "sync helper used with requests in flight"
        );
        let done = self.drain()?;
        assert_eq!(done.len(), 1);
        if done[0].ret < 0 {
            Err(-done[0].ret)
        } else {
            Ok(())
        }
    }

    // ----- synchronous helpers (use the start of this queue's buffer area) -----

    pub fn read(&mut self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        self.submit_read(offset, 0, len, 0);
        self.wait_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.buf_mut()[..data.len()].copy_from_slice(data);
        self.submit_write(offset, 0, data.len(), 0);
        self.wait_one()
    }

    /// Write with `ReqFlags::FUA`.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.buf_mut()[..data.len()].copy_from_slice(data);
        self.submit_write_flags(offset, 0, data.len(), 0, ReqFlags::FUA);
        self.wait_one()
    }

    /// Scatter-gather write where the caller chooses each segment's position in the buffer
    /// area: `segs` = [(buf_off, data)]. Segments are written to disk back to back from
    /// `offset`.
    pub fn writev_at(&mut self, offset: u64, segs: &[(usize, &[u8])]) -> IoResult<()> {
        let mut iov = Vec::with_capacity(segs.len());
        for (buf_off, data) in segs {
            let p = self.ptr(*buf_off, data.len());
            // SAFETY: ptr() checked that [buf_off, +len) lies in this queue's mapped area (see
            // `buf`); `data` cannot borrow that area while we hold `&mut self`, so no overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            iov.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: data.len(),
            });
        }
        self.submit_writev_raw(offset, &iov, 0);
        self.wait_one()
    }

    /// Scatter-gather write; segments are placed at odd multiples of 512 in the buffer area
    /// (see [`scattered_offsets`]), so they are neither page aligned nor adjacent.
    pub fn writev(&mut self, offset: u64, bufs: &[&[u8]]) -> IoResult<()> {
        let offs = scattered_offsets(bufs.iter().map(|b| b.len()));
        let segs: Vec<(usize, &[u8])> = offs.into_iter().zip(bufs.iter().copied()).collect();
        self.writev_at(offset, &segs)
    }

    /// Scatter-gather read into caller-chosen positions: `segs` = [(buf_off, len)].
    pub fn readv_at(&mut self, offset: u64, segs: &[(usize, usize)]) -> IoResult<Vec<Vec<u8>>> {
        let iov: Vec<libc::iovec> = segs
            .iter()
            .map(|&(off, len)| libc::iovec {
                iov_base: self.ptr(off, len) as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        self.submit_readv_raw(offset, &iov, 0);
        self.wait_one()?;
        let buf = self.buf();
        Ok(segs
            .iter()
            .map(|&(off, len)| buf[off..off + len].to_vec())
            .collect())
    }

    /// Scatter-gather read into segments of the given lengths placed like [`writev`](Self::writev).
    pub fn readv(&mut self, offset: u64, lens: &[usize]) -> IoResult<Vec<Vec<u8>>> {
        let offs = scattered_offsets(lens.iter().copied());
        let segs: Vec<(usize, usize)> = offs.into_iter().zip(lens.iter().copied()).collect();
        self.readv_at(offset, &segs)
    }

    pub fn flush(&mut self) -> IoResult<()> {
        self.submit_flush(0);
        self.wait_one()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> IoResult<()> {
        self.submit_discard(offset, len, 0);
        self.wait_one()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        self.submit_write_zeroes(offset, len, unmap, 0);
        self.wait_one()
    }
}

/// Buffer offsets for segments of the given lengths: always odd multiples of 512 (so never
/// page aligned), first at 512, each next one at least 512 bytes after the previous segment.
pub fn scattered_offsets(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut off = 512usize;
    let mut out = Vec::new();
    for len in lens {
        out.push(off);
        off = (off + len + 512).div_ceil(512) * 512;
        if (off / 512).is_multiple_of(2) {
            off += 512;
        }
    }
    out
}
