//! The encryption layer: AES-256-XTS over another device, like dm-crypt over a disk.
//!
//! Writes are encrypted in their (already private) bounce buffer before they go down; reads
//! are decrypted when they come back up. Nothing the layer below stores is plaintext.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use super::{
    BlockDevice, BufPool, Completion, IoChannel, IoOp, IoVecs, Slab, SECTOR_SHIFT, SECTOR_SIZE,
};
use crate::crypto::Xts;

/// WRITE_ZEROES becomes writes of encrypted zeros, in pieces of at most this many bytes.
const ZERO_CHUNK: usize = 1 << 20;

pub struct CryptDevice {
    inner: Arc<dyn BlockDevice>,
    xts: Arc<Xts>,
}

impl CryptDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, xts: impl Into<Arc<Xts>>) -> Self {
        CryptDevice {
            inner,
            xts: xts.into(),
        }
    }
}

impl BlockDevice for CryptDevice {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }

    fn new_channel(&self) -> io::Result<Box<dyn IoChannel>> {
        Ok(Box::new(CryptChannel {
            inner: self.inner.new_channel()?,
            xts: self.xts.clone(),
            ops: Slab::default(),
            pool: BufPool::default(),
            below: Vec::new(),
            refused: Vec::new(),
        }))
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn iovec_align(&self) -> Option<usize> {
        // Caller memory is only read or written by the cipher (never by the kernel), which
        // needs each 512-byte data unit in one piece.
        Some(SECTOR_SIZE)
    }
}

/// Runs the cipher between caller vectors and our buffer, one vector at a time.
fn transform_vecs(xts: &Xts, sector: u64, iov: &IoVecs, buf: &mut [u8], to_buf: bool) {
    let mut off = 0;
    for v in iov.as_slice() {
        let len = v.iov_len.min(buf.len() - off) / SECTOR_SIZE * SECTOR_SIZE;
        let at = sector + (off / SECTOR_SIZE) as u64;
        let ours = buf[off..].as_mut_ptr();
        let theirs = v.iov_base.cast::<u8>();
        // SAFETY: IoVecs guarantees its vectors are valid for `iov_len` bytes while it lives;
        // `ours` has at least `len` bytes left. The two never overlap (ours is our heap).
        unsafe {
            if to_buf {
                xts.apply(at, theirs, ours, len, true);
            } else {
                xts.apply(at, ours, theirs, len, false);
            }
        }
        off += len;
    }
}

enum Kind {
    /// Decrypt the data, which starts at this sector, on the way up.
    Read(u64),
    /// Decrypt our buffer into the caller's memory on the way up; the buffer is ours.
    ReadVec(u64, IoVecs),
    /// The buffer below is ours (the caller's data, encrypted): recycle it.
    WriteVec,
    /// The buffers below are ours (encrypted zeros): recycle them.
    Zeroes,
    /// Pass the buffer (if any) back up as is.
    Other,
}

/// An operation of ours, made of `parts` operations below.
struct Op {
    id: u64,
    kind: Kind,
    parts: u32,
    result: Result<(), i32>,
}

struct CryptChannel {
    inner: Box<dyn IoChannel>,
    xts: Arc<Xts>,
    ops: Slab<Op>,
    pool: BufPool,
    below: Vec<Completion>,
    /// Operations refused at `add`, reported by the next `poll`.
    refused: Vec<Completion>,
}

impl CryptChannel {
    fn track(&mut self, op: Op) -> u64 {
        self.ops.insert(op) as u64
    }
}

impl CryptChannel {
    /// Fails operation `id` (reported by the next poll) without touching the device.
    fn refuse(&mut self, id: u64) {
        self.refused.push(Completion {
            id,
            result: Err(libc::EINVAL),
            buf: None,
        });
    }
}

impl IoChannel for CryptChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        let mut tracked = Op {
            id,
            kind: Kind::Other,
            parts: 1,
            result: Ok(()),
        };
        match op {
            IoOp::Read { sector, buf } => {
                tracked.kind = Kind::Read(sector);
                let key = self.track(tracked);
                self.inner.add(key, IoOp::Read { sector, buf });
            }
            IoOp::Write { sector, mut buf } => {
                self.xts.encrypt(sector, &mut buf);
                let key = self.track(tracked);
                self.inner.add(key, IoOp::Write { sector, buf });
            }
            IoOp::WriteZeroes { sector, sectors } => {
                // A hole below would read back as decrypted garbage: store encrypted zeros.
                let chunk = (ZERO_CHUNK >> SECTOR_SHIFT) as u64;
                tracked.kind = Kind::Zeroes;
                tracked.parts = sectors.div_ceil(chunk).max(1) as u32;
                let key = self.track(tracked);
                let mut at = sector;
                while at < sector + sectors {
                    let n = (sector + sectors - at).min(chunk);
                    let mut buf = self.pool.get((n << SECTOR_SHIFT) as usize);
                    buf.fill(0);
                    self.xts.encrypt(at, &mut buf);
                    self.inner.add(key, IoOp::Write { sector: at, buf });
                    at += n;
                }
                if sectors == 0 {
                    self.inner.add(key, IoOp::Flush);
                }
            }
            IoOp::WriteVec { sector, iov } => {
                if iov.as_slice().iter().any(|v| v.iov_len % SECTOR_SIZE != 0) {
                    return self.refuse(id);
                }
                // Encrypt straight from the caller's memory into our buffer: one pass.
                let mut buf = self.pool.get(iov.len());
                transform_vecs(&self.xts, sector, &iov, &mut buf, true);
                tracked.kind = Kind::WriteVec;
                let key = self.track(tracked);
                self.inner.add(key, IoOp::Write { sector, buf });
            }
            IoOp::ReadVec { sector, iov } => {
                if iov.as_slice().iter().any(|v| v.iov_len % SECTOR_SIZE != 0) {
                    return self.refuse(id);
                }
                let buf = self.pool.get(iov.len());
                tracked.kind = Kind::ReadVec(sector, iov);
                let key = self.track(tracked);
                self.inner.add(key, IoOp::Read { sector, buf });
            }
            // Discarded sectors read back as unspecified data, which virtio allows.
            op @ (IoOp::Flush | IoOp::Discard { .. }) => {
                let key = self.track(tracked);
                self.inner.add(key, op);
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.inner.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.refused);
        let mut below = std::mem::take(&mut self.below);
        self.inner.poll(&mut below);
        for c in below.drain(..) {
            let key = c.id as usize;
            let Some(op) = self.ops.get_mut(key) else {
                continue;
            };
            if c.result.is_err() {
                op.result = c.result;
            }
            op.parts -= 1;
            let mut buf = c.buf;
            match (&op.kind, buf.as_mut()) {
                (Kind::Read(sector), Some(b)) if op.result.is_ok() => self.xts.decrypt(*sector, b),
                (Kind::ReadVec(sector, iov), Some(b)) if op.result.is_ok() => {
                    transform_vecs(&self.xts, *sector, iov, b, false);
                }
                _ => {}
            }
            if matches!(op.kind, Kind::Zeroes | Kind::WriteVec | Kind::ReadVec(..)) {
                if let Some(b) = buf.take() {
                    self.pool.put(b);
                }
            }
            if op.parts == 0 {
                if let Some(op) = self.ops.remove(key) {
                    out.push(Completion {
                        id: op.id,
                        result: op.result,
                        buf,
                    });
                }
            }
        }
        self.below = below;
    }

    fn wait(&mut self) -> io::Result<()> {
        self.inner.wait()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.refused.len()
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn ack_completion_fd(&mut self) {
        self.inner.ack_completion_fd()
    }
}
