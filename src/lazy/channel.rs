//! The lazy layer's per-queue channel.
//!
//! Per request, on the channel's own thread:
//! - every stripe touched is fetched: the request goes straight down (the fast path);
//! - a write (or discard, write-zeroes), or a read with `copy_on_read` or from a source
//!   without read-through, touching an unfetched stripe is parked: its stripes are queued for
//!   the fetcher pool and the request goes down once they are all fetched (or fails with EIO
//!   if a fetch failed). Fetchers wake the channel through its completion eventfd, so a
//!   waiting queue sleeps instead of spinning. While the source is known down (and it is not
//!   a request's turn to probe it), such a request fails at once with EIO instead, and so do
//!   parked ones at shutdown once its short grace is over;
//! - any other read is split ([`super::split`]): fetched runs from the base disk, the rest
//!   through the source's read-through channel (zeros past its end); nothing is fetched.

use std::io;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use super::fetch::Shared;
use super::persist::WaitState;
use super::queue::Waker;
use super::split::{Dest, Piece, Pieces, SourceEnd};
use crate::block::{Below, BufPool, Completion, IoChannel, IoOp, Notifier, Slab, SECTOR_SHIFT};
use crate::sys::sched::{set_slice, SHORT_SLICE_NS};

/// A request waiting for its stripes, or a FLUSH waiting for WRITTEN bits to be durable.
struct Parked {
    id: u64,
    op: IoOp,
    wait: Wait,
}

enum Wait {
    Stripes {
        first: usize,
        last: usize,
        write: bool,
    },
    Persist(u64),
}

enum Kind {
    /// Went down whole: hand the completion up as is.
    Pass,
    /// A read assembled from `parts` pieces.
    Split(Dest),
}

struct Op {
    id: u64,
    kind: Kind,
    parts: u32,
    result: Result<(), i32>,
}

/// Pieces of split reads carry their byte offset (in sectors) in the id's high half.
const OFFSET_SHIFT: u32 = 32;

/// The requests gone down (whole, or in pieces to the base disk and the source), by key.
#[derive(Default)]
struct Ops {
    slab: Slab<Op>,
    /// The pieces' buffers.
    pool: BufPool,
}

impl Ops {
    fn insert(&mut self, id: u64, kind: Kind, parts: u32) -> usize {
        self.slab.insert(Op {
            id,
            kind,
            parts,
            result: Ok(()),
        })
    }

    /// Takes op `key` out, as the completion to hand up.
    fn take(&mut self, key: usize) -> Option<Completion> {
        let op = self.slab.remove(key)?;
        let buf = match op.kind {
            Kind::Split(Dest::Buf(b)) => Some(b),
            _ => None,
        };
        Some(Completion {
            id: op.id,
            result: op.result,
            buf,
        })
    }

    /// Accounts one completion from below; pushes the request it finishes onto `out`.
    fn reap(&mut self, c: Completion, out: &mut Vec<Completion>) {
        let key = (c.id & ((1 << OFFSET_SHIFT) - 1)) as usize;
        let offset = ((c.id >> OFFSET_SHIFT) << SECTOR_SHIFT) as usize;
        let Some(op) = self.slab.get_mut(key) else {
            return;
        };
        match &mut op.kind {
            Kind::Pass => {
                let id = op.id;
                self.slab.remove(key);
                out.push(Completion {
                    id,
                    result: c.result,
                    buf: c.buf,
                });
            }
            Kind::Split(dest) => {
                if let Some(piece) = c.buf {
                    if c.result.is_ok() {
                        dest.put(offset, piece.len(), Some(&piece));
                    }
                    self.pool.put(piece);
                }
                if c.result.is_err() {
                    op.result = c.result;
                }
                op.parts -= 1;
                if op.parts == 0 {
                    out.extend(self.take(key));
                }
            }
        }
    }
}

pub(crate) struct LazyChannel {
    shared: Arc<Shared>,
    source_end: SourceEnd,
    /// The base disk's channel, and the requests finished here (failed fetches, reads served
    /// from zeros).
    below: Below,
    /// The source's read-through channel (its completions reaped as the base disk's; nothing
    /// is finished on it); `None`: reads of unfetched stripes park.
    image: Option<Below>,
    waker: Arc<Waker>,
    seen_generation: u64,
    ops: Ops,
    parked: Vec<Parked>,
    /// See [`LazyChannel::update_slice`].
    short_slice: bool,
}

/// Failed if one of the stripes' fetch failed, else still pending (the stripes are not all
/// fetched).
fn stripe_state(shared: &Shared, first: usize, last: usize) -> WaitState {
    if shared.stripes.any_abandoned(first, last) {
        WaitState::Failed
    } else {
        WaitState::Pending
    }
}

/// The stripes `op` touches and whether it modifies them; `None` for operations the layer
/// passes down untouched (flush, empty, or out of range, which the layer below rejects).
fn span(op: &IoOp, shared: &Shared) -> Option<(usize, usize, bool)> {
    let (sector, sectors, write) = match op {
        IoOp::Read { sector, buf } => (*sector, (buf.len() >> SECTOR_SHIFT) as u64, false),
        IoOp::ReadVec { sector, iov } => (*sector, (iov.len() >> SECTOR_SHIFT) as u64, false),
        IoOp::Write { sector, buf } => (*sector, (buf.len() >> SECTOR_SHIFT) as u64, true),
        IoOp::WriteVec { sector, iov } => (*sector, (iov.len() >> SECTOR_SHIFT) as u64, true),
        IoOp::Discard { sector, sectors } | IoOp::WriteZeroes { sector, sectors } => {
            (*sector, *sectors, true)
        }
        IoOp::Flush => return None,
    };
    let end = sector.checked_add(sectors)?;
    if sectors == 0 || end > shared.stripes.disk_sectors() {
        return None;
    }
    let stripes = &shared.stripes;
    Some((stripes.stripe_of(sector), stripes.stripe_of(end - 1), write))
}

impl LazyChannel {
    pub fn new(
        shared: Arc<Shared>,
        source_end: SourceEnd,
        inner: Box<dyn IoChannel>,
        image: Option<Box<dyn IoChannel>>,
        waker: Arc<Waker>,
    ) -> Self {
        LazyChannel {
            shared,
            source_end,
            below: Below::new(inner),
            image: image.map(Below::new),
            waker,
            seen_generation: 0,
            ops: Ops::default(),
            parked: Vec::new(),
            short_slice: false,
        }
    }

    fn pass(&mut self, id: u64, op: IoOp) {
        let key = self.ops.insert(id, Kind::Pass, 1);
        self.below.add(key as u64, op);
    }

    /// While the disk is still filling from its source, or requests are parked (waiting for
    /// fetches, or a FLUSH for WRITTEN bits), this thread (the queue's worker) asks for a short
    /// time slice: its wake-ups (a guest's kick, a fetch's completion) then run it at once
    /// beside CPU-bound neighbours (see [`crate::sys::sched::set_slice`]). Not once the disk is
    /// complete: always on, a worker sharing its core with a busy-polling client lost a third
    /// of its IOPS to the extra preemptions.
    fn update_slice(&mut self) {
        let stripes = &self.shared.stripes;
        let on = !self.parked.is_empty() || stripes.fetched_count() < stripes.count();
        if self.short_slice != on {
            self.short_slice = on;
            let _ = set_slice(if on { SHORT_SLICE_NS } else { 0 });
        }
    }

    fn park(&mut self, id: u64, op: IoOp, wait: Wait) {
        // Announce the wait before queuing: a fetcher finishing now must see it and wake us.
        self.waker.parked.store(self.parked.len() + 1, SeqCst);
        if let Wait::Stripes { first, last, .. } = wait {
            for s in first..=last {
                self.shared.request(s);
            }
        }
        self.parked.push(Parked { id, op, wait });
        self.update_slice();
    }

    /// Sends down the parked requests that can go; fails those whose fetch (or WRITTEN
    /// persistence) failed.
    fn retry_parked(&mut self) {
        let mut sent = false;
        for mut p in std::mem::take(&mut self.parked) {
            let state = match p.wait {
                Wait::Stripes { first, last, write } => {
                    let stripes = &self.shared.stripes;
                    if stripes.all_fetched(first, last) {
                        if write {
                            self.shared.mark_written(first, last);
                        }
                        WaitState::Ready
                    } else if !write && first == last {
                        match self.serve_staged(p, first) {
                            Ok(()) => continue,
                            Err(back) => {
                                p = back;
                                stripe_state(&self.shared, first, last)
                            }
                        }
                    } else {
                        stripe_state(&self.shared, first, last)
                    }
                }
                Wait::Persist(ticket) => self.shared.meta.persisted(ticket),
            };
            match state {
                WaitState::Ready => {
                    self.pass(p.id, p.op);
                    sent = true;
                }
                WaitState::Failed => self.fail(p.id, p.op),
                WaitState::Pending
                    if matches!(p.wait, Wait::Stripes { .. }) && self.shared.shutting_down() =>
                {
                    self.fail(p.id, p.op)
                }
                WaitState::Pending => self.parked.push(p),
            }
        }
        self.waker.parked.store(self.parked.len(), SeqCst);
        self.update_slice();
        if sent {
            let _ = self.below.submit();
        }
    }

    /// Completes `op` with EIO.
    fn fail(&mut self, id: u64, op: IoOp) {
        let buf = match op {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            _ => None,
        };
        self.below.finish(id, Err(libc::EIO), buf);
    }

    /// Fetches `stripe` on this thread and serves read `p` (wholly inside it) from it, when
    /// nothing else waits for a fetch here or anywhere (see [`Shared::fetch_here`]): a lone
    /// demand read on a quiet disk skips two wake-ups. Several at once, or beside autofetch,
    /// go to the pool, which runs them side by side. Gives `p` back unless served.
    fn fetch_here(&mut self, p: Parked, stripe: usize) -> Result<(), Parked> {
        let shared = &self.shared;
        if !self.parked.is_empty() || !shared.may_fetch_here() || !shared.stripes.claim(stripe) {
            return Err(p);
        }
        let served = match shared.fetch_here(stripe) {
            true => self.serve_staged(p, stripe),
            false => Err(p),
        };
        // Queued after the read is served: the fetch that stores it then unstages it.
        self.shared.queue.demand(stripe);
        served
    }

    /// Completes parked read `p`, wholly inside `stripe`, from the stripe's staged content
    /// (see [`Shared::staged`]); gives `p` back if there is none.
    fn serve_staged(&mut self, p: Parked, stripe: usize) -> Result<(), Parked> {
        let Some(data) = self.shared.staged(stripe) else {
            return Err(p);
        };
        let (sector, len) = match &p.op {
            IoOp::Read { sector, buf } => (*sector, buf.len()),
            IoOp::ReadVec { sector, iov } => (*sector, iov.len()),
            _ => return Err(p),
        };
        let from = ((sector - self.shared.stripes.sectors_of(stripe).0) << SECTOR_SHIFT) as usize;
        // The request lies inside the stripe and the staged copy is all of it; checked anyway.
        let Some(src) = data.get(from..from + len) else {
            return Err(p);
        };
        let mut dest = match p.op {
            IoOp::Read { buf, .. } => Dest::Buf(buf),
            IoOp::ReadVec { iov, .. } => Dest::Vecs(iov),
            op => return Err(Parked { op, ..p }),
        };
        dest.put(0, len, Some(src));
        let buf = match dest {
            Dest::Buf(b) => Some(b),
            Dest::Vecs(_) => None,
        };
        self.below.finish(p.id, Ok(()), buf);
        Ok(())
    }

    /// Serves a read without fetching, through the source's read-through channel.
    fn read_split(&mut self, id: u64, sector: u64, dest: Dest) {
        let Some(image) = self.image.as_mut() else {
            // `add` parks such reads instead.
            let buf = match dest {
                Dest::Buf(b) => Some(b),
                Dest::Vecs(_) => None,
            };
            return self.below.finish(id, Err(libc::EIO), buf);
        };
        let end = sector + (dest.len() >> SECTOR_SHIFT) as u64;
        let key = self.ops.insert(id, Kind::Split(dest), 0);
        let mut parts = 0;
        for piece in Pieces::new(&self.shared.stripes, &self.source_end, sector, end) {
            let (channel, from, to) = match piece {
                Piece::Base(from, to) => (&mut self.below, from, to),
                Piece::Source(from, to) => (&mut *image, from, to),
                Piece::Zeros(from, to) => {
                    if let Some(Op {
                        kind: Kind::Split(dest),
                        ..
                    }) = self.ops.slab.get_mut(key)
                    {
                        self.source_end.fill(dest, sector, from, to);
                    }
                    continue;
                }
            };
            let buf = self.ops.pool.get(((to - from) << SECTOR_SHIFT) as usize);
            let piece_id = key as u64 | ((from - sector) << OFFSET_SHIFT);
            channel.add(piece_id, IoOp::Read { sector: from, buf });
            parts += 1;
        }
        if let Some(op) = self.ops.slab.get_mut(key) {
            op.parts = parts;
        }
        if parts == 0 {
            if let Some(c) = self.ops.take(key) {
                self.below.finish(c.id, c.result, c.buf);
            }
        }
    }
}

impl IoChannel for LazyChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        self.update_slice();
        if let IoOp::Flush = op {
            // WRITTEN bits set before this FLUSH become durable before it completes.
            if let Some(ticket) = self.shared.request_persist() {
                return self.park(id, op, Wait::Persist(ticket));
            }
        }
        let Some((first, last, write)) = span(&op, &self.shared) else {
            return self.pass(id, op);
        };
        if self.shared.stripes.all_fetched(first, last) {
            if write {
                self.shared.mark_written(first, last);
            }
            return self.pass(id, op);
        }
        if write || self.shared.copy_on_read || self.image.is_none() {
            let needs_fetch = self.shared.stripes.any_abandoned(first, last);
            if needs_fetch && self.shared.source_refuses() || self.shared.shutting_down() {
                // No fetch will come soon: fail now rather than after a budget.
                return self.fail(id, op);
            }
            let wait = Wait::Stripes { first, last, write };
            if !write && first == last {
                // Staged before this read arrived: no later wake-up would bring it back.
                let p = Parked { id, op, wait };
                return match self
                    .serve_staged(p, first)
                    .or_else(|p| self.fetch_here(p, first))
                {
                    Ok(()) => (),
                    Err(p) => self.park(p.id, p.op, p.wait),
                };
            }
            return self.park(id, op, wait);
        }
        match op {
            IoOp::Read { sector, buf } => self.read_split(id, sector, Dest::Buf(buf)),
            IoOp::ReadVec { sector, iov } => self.read_split(id, sector, Dest::Vecs(iov)),
            other => self.pass(id, other),
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if let Some(image) = &mut self.image {
            image.submit()?;
        }
        self.below.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        if !self.parked.is_empty() {
            let generation = self.shared.queue.generation.load(SeqCst);
            if generation != self.seen_generation || self.shared.shutting_down() {
                self.seen_generation = generation;
                self.retry_parked();
            }
        }
        let ops = &mut self.ops;
        self.below.poll(out, |c, out| ops.reap(c, out));
        if let Some(image) = &mut self.image {
            image.poll(out, |c, out| ops.reap(c, out));
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        // Finished here, or in flight on the base disk.
        if self.below.in_flight() > 0 {
            return self.below.wait();
        }
        if let Some(image) = self.image.as_mut().filter(|i| i.in_flight() > 0) {
            return image.wait();
        }
        if !self.parked.is_empty() {
            // Only fetches are outstanding: sleep until a fetcher signals (bounded, to
            // re-check even if a wake-up raced with the generation check).
            self.waker.notifier.wait(Duration::from_millis(100));
            self.waker.notifier.ack();
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.ops.slab.len() + self.parked.len() + self.below.finished()
    }

    fn notifier(&self) -> &Notifier {
        self.below.notifier()
    }
}
