//! The per-queue data path: turns parsed requests into block-device operations and finished
//! operations into status bytes and guest data.

use log::{debug, warn};
use std::sync::Arc;
use std::time::Instant;
use virtio_bindings::virtio_blk::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::request::{gather, scatter, Op, ParseError, Region, Request};
use crate::block::{BufPool, Completion, IoChannel, IoOp, IoVecs, Slab, SECTOR_SHIFT};
use crate::virtio_blk::stats::OpKind;

/// Device-wide facts every queue needs.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub limits: super::request::Limits,
    pub readonly: bool,
    pub skip_sync: bool,
    /// Alignment guest buffers need to go to the device without a bounce copy; `None` if the
    /// device stack always needs our own buffers (e.g. to encrypt them).
    pub iovec_align: Option<usize>,
    pub device_id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// A request whose used-ring entry is ready: descriptor head and bytes written, and what the
/// statistics record once the entry is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub head: u16,
    pub len: u32,
    pub kind: OpKind,
    /// Whether the status is OK.
    pub ok: bool,
    /// Data moved (reads, writes) or range covered (discard, write-zeroes).
    pub bytes: u64,
    /// When the request was taken off the avail ring.
    pub started: Instant,
}

struct InFlight {
    head: u16,
    req: Request,
    pending: u32,
    failed: bool,
    started: Instant,
    /// The device reads straight into guest memory, behind vm-memory's dirty bitmap: the
    /// buffers are marked at completion ([`mark_written`]).
    direct_read: bool,
}

/// State of one virtqueue's worker: its device channel and the requests it has started.
pub struct QueueWorker {
    info: Arc<DeviceInfo>,
    channel: Box<dyn IoChannel>,
    pool: BufPool,
    slots: Slab<InFlight>,
    completions: Vec<Completion>,
    /// Device errors seen by this worker (one connection's queue): the first is logged at warn,
    /// the others at debug, so a failing disk logs one warning, not one per request.
    device_errors: u64,
    /// `device_errors` when [`QueueWorker::log_error_summary`] last reported it.
    reported_errors: u64,
}

impl QueueWorker {
    pub fn new(info: Arc<DeviceInfo>, channel: Box<dyn IoChannel>) -> Self {
        QueueWorker {
            info,
            channel,
            pool: BufPool::default(),
            slots: Slab::default(),
            completions: Vec::new(),
            device_errors: 0,
            reported_errors: 0,
        }
    }

    /// Device errors (operations the block device failed) since this worker was created.
    pub fn device_errors(&self) -> u64 {
        self.device_errors
    }

    /// Logs (warn) how many device errors this worker saw beyond the first, which was logged
    /// when it happened; once per new batch, e.g. at the end of a connection.
    pub fn log_error_summary(&mut self, queue: usize) {
        if self.device_errors > self.reported_errors.max(1) {
            warn!(
                "queue {queue}: {} device errors in all (the first logged above, the others at debug)",
                self.device_errors
            );
        }
        self.reported_errors = self.device_errors;
    }

    pub fn channel(&self) -> &dyn IoChannel {
        self.channel.as_ref()
    }

    /// Clears the completion fd's readiness after it woke us (see [`crate::block::Notifier::ack`]).
    pub fn ack_completion_fd(&mut self) {
        self.channel.notifier().ack();
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Starts a parsed request. Returns its completion when it finished at once (errors,
    /// GET_ID, ...); otherwise it is returned later by [`QueueWorker::reap`].
    ///
    /// `mem` is shared so that guest buffers handed to the device stay mapped until it is done.
    pub fn start<M: GuestMemory + Send + Sync + 'static>(
        &mut self,
        mem: &Arc<M>,
        head: u16,
        parsed: Result<Request, ParseError>,
    ) -> Option<Finished> {
        self.start_at(mem, head, parsed, Instant::now())
    }

    /// [`QueueWorker::start`] of a request taken off the avail ring at `started`.
    pub fn start_at<M: GuestMemory + Send + Sync + 'static>(
        &mut self,
        mem: &Arc<M>,
        head: u16,
        parsed: Result<Request, ParseError>,
        started: Instant,
    ) -> Option<Finished> {
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                debug!("request {head}: {e}");
                let len = match e.status {
                    Some(addr) if mem.as_ref().write_obj(e.code, addr).is_ok() => 1,
                    _ => 0,
                };
                return Some(Finished {
                    head,
                    len,
                    kind: OpKind::Other,
                    ok: false,
                    bytes: 0,
                    started,
                });
            }
        };
        let ops = match self.build_ops(mem, &req) {
            Ok(ops) => ops,
            Err(code) => return Some(complete(mem.as_ref(), head, &req, code, started)),
        };
        if ops.is_empty() {
            let ok = VIRTIO_BLK_S_OK as u8;
            return Some(complete(mem.as_ref(), head, &req, ok, started));
        }
        let slot = InFlight {
            head,
            req,
            pending: ops.len() as u32,
            failed: false,
            started,
            direct_read: matches!(ops.first(), Some(IoOp::ReadVec { .. })),
        };
        let idx = self.slots.insert(slot);
        for op in ops {
            self.channel.add(idx as u64, op);
        }
        None
    }

    /// The device operations for `req`, or a status to complete it with right away.
    fn build_ops<M: GuestMemory + Send + Sync + 'static>(
        &mut self,
        mem: &Arc<M>,
        req: &Request,
    ) -> Result<Vec<IoOp>, u8> {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let writes = matches!(
            req.op,
            Op::Write { .. } | Op::Discard(_) | Op::WriteZeroes(_)
        );
        if writes && self.info.readonly {
            return Err(ioerr);
        }
        let len = req.data_len as usize;
        Ok(match &req.op {
            Op::Read { .. } | Op::Write { .. } if len == 0 => Vec::new(),
            Op::Read { sector } | Op::Write { sector } => {
                let write = matches!(req.op, Op::Write { .. });
                let direct = self
                    .info
                    .iovec_align
                    .and_then(|align| guest_iovecs(mem, &req.data, align, write));
                vec![match direct {
                    Some(iov) if write => IoOp::WriteVec {
                        sector: *sector,
                        iov,
                    },
                    Some(iov) => IoOp::ReadVec {
                        sector: *sector,
                        iov,
                    },
                    None => self.bounced(mem.as_ref(), req, *sector, write)?,
                }]
            }
            Op::Flush if self.info.skip_sync => Vec::new(),
            Op::Flush => vec![IoOp::Flush],
            Op::GetId => {
                if !scatter(mem.as_ref(), &req.data, &self.info.device_id) {
                    return Err(ioerr);
                }
                Vec::new()
            }
            Op::Discard(ranges) | Op::WriteZeroes(ranges) => ranges
                .iter()
                .filter(|r| r.sectors > 0)
                .map(|r| match req.op {
                    Op::Discard(_) => IoOp::Discard {
                        sector: r.sector,
                        sectors: r.sectors,
                    },
                    _ => IoOp::WriteZeroes {
                        sector: r.sector,
                        sectors: r.sectors,
                    },
                })
                .collect(),
        })
    }

    /// A read or write through one of our buffers (copying the guest's data for writes).
    fn bounced<M: GuestMemory>(
        &mut self,
        mem: &M,
        req: &Request,
        sector: u64,
        write: bool,
    ) -> Result<IoOp, u8> {
        let mut buf = self.pool.get(req.data_len as usize);
        if !write {
            return Ok(IoOp::Read { sector, buf });
        }
        if !gather(mem, &req.data, &mut buf) {
            self.pool.put(buf);
            return Err(VIRTIO_BLK_S_IOERR as u8);
        }
        Ok(IoOp::Write { sector, buf })
    }

    /// Submits everything started since the last call.
    pub fn submit(&mut self) {
        if let Err(e) = self.channel.submit() {
            log::error!("io submission failed: {e}");
        }
    }

    /// Collects finished requests into `out` without blocking.
    pub fn reap<M: GuestMemory>(&mut self, mem: &M, out: &mut Vec<Finished>) {
        let mut completions = std::mem::take(&mut self.completions);
        self.channel.poll(&mut completions);
        for c in completions.drain(..) {
            let idx = c.id as usize;
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            if let Err(errno) = c.result {
                slot.failed = true;
                note_device_error(&mut self.device_errors, slot.head, &slot.req, errno);
            }
            if let Some(buf) = c.buf {
                if !slot.failed
                    && matches!(slot.req.op, Op::Read { .. })
                    && !scatter(mem, &slot.req.data, &buf)
                {
                    slot.failed = true;
                }
                self.pool.put(buf);
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                if let Some(slot) = self.slots.remove(idx) {
                    if slot.direct_read {
                        // Even a failed read may have written part of the buffers.
                        for r in &slot.req.data {
                            mark_written(mem, r.addr, r.len as usize);
                        }
                    }
                    let code = if slot.failed {
                        VIRTIO_BLK_S_IOERR
                    } else {
                        VIRTIO_BLK_S_OK
                    };
                    out.push(complete(
                        mem,
                        slot.head,
                        &slot.req,
                        code as u8,
                        slot.started,
                    ));
                }
            }
        }
        self.completions = completions;
    }

    /// Waits for every started request to finish, collecting them into `out`.
    pub fn drain<M: GuestMemory>(&mut self, mem: &M, out: &mut Vec<Finished>) {
        self.submit();
        while self.in_flight() > 0 {
            self.reap(mem, out);
            if self.in_flight() == 0 {
                break;
            }
            if let Err(e) = self.channel.wait() {
                log::error!("waiting for io failed: {e}");
                break;
            }
        }
    }
}

/// Counts a failed device operation and logs it: the first one at warn, the rest at debug.
fn note_device_error(count: &mut u64, head: u16, req: &Request, errno: i32) {
    *count += 1;
    let err = std::io::Error::from_raw_os_error(errno);
    let what = OpDesc(req);
    if *count == 1 {
        warn!(
            "device error on {what}: {err}; the request fails with IOERR (further device \
             errors on this queue are counted and logged at debug)"
        );
    } else {
        debug!(
            "request {head}: device error on {what}: {err} ({} on this queue)",
            *count
        );
    }
}

/// How logs name a request's operation: the operation and where it starts.
struct OpDesc<'a>(&'a Request);

impl std::fmt::Display for OpDesc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.data_len;
        match &self.0.op {
            Op::Read { sector } => write!(f, "read of {len} bytes at sector {sector}"),
            Op::Write { sector } => write!(f, "write of {len} bytes at sector {sector}"),
            Op::Flush => f.write_str("flush"),
            Op::GetId => f.write_str("get-id"),
            Op::Discard(r) | Op::WriteZeroes(r) => {
                let name = if matches!(self.0.op, Op::Discard(_)) {
                    "discard"
                } else {
                    "write-zeroes"
                };
                match r.first() {
                    Some(first) => write!(
                        f,
                        "{name} at sector {} ({} range{})",
                        first.sector,
                        r.len(),
                        if r.len() == 1 { "" } else { "s" }
                    ),
                    None => f.write_str(name),
                }
            }
        }
    }
}

/// Host addresses of `regions`, if every piece is `align`-aligned in address and length (and
/// so can go to the device directly); `None` means use a bounce buffer.
fn guest_iovecs<M: GuestMemory + Send + Sync + 'static>(
    mem: &Arc<M>,
    regions: &[Region],
    align: usize,
    device_reads_guest: bool,
) -> Option<IoVecs> {
    let access = if device_reads_guest {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let mut iov = Vec::with_capacity(regions.len());
    for r in regions {
        for slice in mem.get_slices(r.addr, r.len as usize, access).ok()? {
            let slice = slice.ok()?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            if !(ptr as usize).is_multiple_of(align) || slice.len() % align != 0 {
                return None;
            }
            iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: slice.len(),
            });
        }
    }
    // SAFETY: the vectors point into guest memory mapped by `mem`; the IoVecs holds a reference
    // to `mem`, so the mapping outlives the operation.
    Some(unsafe { IoVecs::new(iov, mem.clone()) })
}

/// Marks guest memory the device wrote behind vm-memory's back (io_uring reading into guest
/// buffers) in the memory's dirty bitmap, for live migration. Called when the request
/// completes, before its used entry is published: a mark made at submission could be cleared
/// by the migration's log sync before the data lands.
fn mark_written<M: GuestMemory>(mem: &M, addr: GuestAddress, len: usize) {
    let Ok(slices) = mem.get_slices(addr, len, Permissions::Write) else {
        return;
    };
    for slice in slices.flatten() {
        slice.bitmap().mark_dirty(0, slice.len());
    }
}

/// Writes the status byte and returns the used-ring entry.
fn complete<M: GuestMemory>(
    mem: &M,
    head: u16,
    req: &Request,
    code: u8,
    started: Instant,
) -> Finished {
    let (kind, bytes) = accounting(req);
    let ok = code == VIRTIO_BLK_S_OK as u8;
    let mut f = Finished {
        head,
        len: 0,
        kind,
        ok: false,
        bytes,
        started,
    };
    if mem.write_obj(code, req.status).is_err() {
        return f;
    }
    f.ok = ok;
    f.len = if ok { req.used_len() } else { 1 };
    f
}

/// What the statistics count a request as: its kind and its bytes (data moved, or the range a
/// discard or write-zeroes covers).
fn accounting(req: &Request) -> (OpKind, u64) {
    let ranges = |r: &[super::request::SectorRange]| {
        r.iter()
            .fold(0u64, |a, r| a.saturating_add(r.sectors << SECTOR_SHIFT))
    };
    match &req.op {
        Op::Read { .. } => (OpKind::Read, u64::from(req.data_len)),
        Op::Write { .. } => (OpKind::Write, u64::from(req.data_len)),
        Op::Flush => (OpKind::Flush, 0),
        Op::GetId => (OpKind::Other, 0),
        Op::Discard(r) => (OpKind::Discard, ranges(r)),
        Op::WriteZeroes(r) => (OpKind::WriteZeroes, ranges(r)),
    }
}
