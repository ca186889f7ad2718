//! The fetcher pool: copies stripes from the source to the base disk.
//!
//! The crash-safe order of one fetch is source read -> base write -> base fdatasync ->
//! metadata sector write -> metadata fdatasync -> FETCHED set in memory. Guest writes reach a
//! stripe only once FETCHED is set, so after a crash the metadata never calls a stripe fetched
//! whose data is not durable, and a stripe the metadata calls unfetched holds no guest data
//! (re-fetching it loses nothing).
//!
//! WRITTEN bits are persisted by their own thread ([`persister`]), never behind a fetch: a
//! FLUSH does not wait for a fetcher when every fetcher waits for a slow source.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::persist::MetaStore;
use super::queue::{lock, FetchQueue, Job};
use super::source::StripeSource;
use super::states::StripeStates;
use crate::block::{run_sync, BlockDevice, IoBuf, IoChannel, IoOp, IoVecs, SECTOR_SHIFT};

/// Staged copies kept for reuse.
const STAGED_SPARES: usize = 4;

/// Longest a queue's worker waits for a stripe it fetches itself (see [`Shared::fetch_here`]);
/// its other requests wait as long. A near stripe server answers a 1 MiB stripe in 0.3–1.3 ms.
const FETCH_HERE_WITHIN: Duration = Duration::from_millis(10);

/// An own fetch slower than this one (a far or busy source) pauses own fetches as a failed
/// one does: such a source gains little from two wake-ups less, and the worker's other
/// requests would wait as long each time.
const FETCH_HERE_SLOW: Duration = Duration::from_millis(5);

/// After a worker's own fetch failed or was slow, workers leave every fetch to the pool this
/// long.
const FETCH_HERE_PAUSE: Duration = Duration::from_secs(10);

/// State shared by the device, its channels and the fetchers.
pub(crate) struct Shared {
    pub source: Arc<dyn StripeSource>,
    pub stripes: StripeStates,
    pub queue: FetchQueue,
    pub meta: MetaStore,
    pub copy_on_read: bool,
    /// Failed fetches since start.
    pub errors: AtomicU64,
    /// The last failed fetch's error (for `status`).
    pub last_error: Mutex<Option<String>>,
    /// Stripes a guest waits for whose content is read from the source but not yet durable
    /// on the base disk (see [`Shared::staged`]); at most one per fetcher.
    pub staged: Mutex<Vec<(usize, Arc<IoBuf>)>>,
    /// Staged copies no longer used, for the next demand fetch.
    pub staged_free: Mutex<Vec<Arc<IoBuf>>>,
    /// Stripe buffers of idle fetchers. Shared, not one per thread: a waiting fetcher is
    /// woken in FIFO order, so a demand fetch rarely runs on the thread that ran the last
    /// one, and a fresh 1 MiB buffer costs its page faults (measured: ~0.3 ms a fetch).
    pub bufs: Mutex<Vec<IoBuf>>,
    /// Until when workers leave every fetch to the pool (see [`Shared::fetch_here`]).
    pub here_paused_until: Mutex<Option<Instant>>,
    /// Set at shutdown: requests still waiting for fetches then fail (see
    /// [`Shared::shutting_down`]).
    pub shutdown: Mutex<Option<Instant>>,
}

impl Shared {
    /// Asks the pool to fetch `stripe` ahead of background work, unless it is fetched or
    /// already on its way.
    pub fn request(&self, stripe: usize) {
        if self.stripes.claim(stripe) {
            self.queue.demand(stripe);
        }
    }

    /// The source is known down and it is not a request's turn to probe it: requests for
    /// unfetched stripes fail at once instead of waiting for a fetch.
    pub fn source_refuses(&self) -> bool {
        self.source
            .outage()
            .is_some_and(|o| o.probing || Instant::now() < o.probe_at)
    }

    /// The shutdown deadline has passed: requests waiting for fetches fail.
    pub fn shutting_down(&self) -> bool {
        lock(&self.shutdown).is_some_and(|t| Instant::now() >= t)
    }

    /// Whether a queue's worker may fetch a stripe itself now: no fetch is queued or running
    /// (the pool sleeps), fetches are not held (the disk is another process's), the source is
    /// not down, and no such fetch failed or took over [`FETCH_HERE_SLOW`] in the last
    /// [`FETCH_HERE_PAUSE`].
    pub fn may_fetch_here(&self) -> bool {
        self.queue.idle()
            && !self.source_refuses()
            && !self.shutting_down()
            && lock(&self.here_paused_until).is_none_or(|t| Instant::now() >= t)
    }

    /// A queue's worker fetching `stripe` (which it claimed) for a lone guest read: handing it
    /// to a sleeping fetcher and back would cost two wake-ups, each a hypervisor exit on an
    /// idle host (0.1–0.3 ms here, against 0.3–1 ms for the transfer). Reads it from the
    /// source on this thread, bounded by [`FETCH_HERE_WITHIN`], and stages it: true if it
    /// did. Either way the caller then queues the stripe ([`FetchQueue::demand`]): the pool
    /// stores a staged stripe as any demand fetch's (the crash-safety order is unchanged), or
    /// fetches it.
    pub fn fetch_here(&self, stripe: usize) -> bool {
        let (first, sectors) = self.stripes.sectors_of(stripe);
        let (start, len) = (first << SECTOR_SHIFT, (sectors << SECTOR_SHIFT) as usize);
        if start >= self.source.bytes() {
            // Past the source's end: the pool writes zeros without reading.
            return false;
        }
        let mut staged = self.staging_buffer(len);
        let started = Instant::now();
        let read = Arc::get_mut(&mut staged)
            .and_then(|buf| self.source.read_now(start, buf, FETCH_HERE_WITHIN));
        let pause = || *lock(&self.here_paused_until) = Some(Instant::now() + FETCH_HERE_PAUSE);
        match read {
            Some(Ok(())) => {
                self.stage(stripe, staged);
                if started.elapsed() > FETCH_HERE_SLOW {
                    pause();
                }
                true
            }
            Some(Err(e)) => {
                self.unstage(staged);
                pause();
                // At most once per pause (per queue): not a flood.
                info!(
                    "stripe {stripe}: a queue's own fetch failed ({e}); the fetchers take it, and \
                     every fetch for the next {} s",
                    FETCH_HERE_PAUSE.as_secs()
                );
                false
            }
            None => {
                self.unstage(staged);
                false
            }
        }
    }

    /// Records guest writes into (fetched) stripes; made durable before the next FLUSH
    /// completes (see [`Shared::request_persist`]).
    pub fn mark_written(&self, first: usize, last: usize) {
        self.meta.mark_written(&self.stripes, first, last);
    }

    /// If WRITTEN bits wait to be persisted, asks the persister to write them and returns the
    /// request to wait for (see [`MetaStore::persisted`]); `None` if there is nothing to do.
    pub fn request_persist(&self) -> Option<u64> {
        if !self.meta.written_dirty() {
            return None;
        }
        Some(self.queue.want_persist(|| self.meta.new_ticket()))
    }

    /// Writes the WRITTEN bits set so far (for a sync of the whole device).
    pub fn persist_written(&self) -> io::Result<()> {
        self.meta.persist_written(&self.stripes)
    }

    /// The content of `stripe` if a demand fetch has read it from the source and not yet
    /// finished: parked reads wholly inside it are served from here at once, instead of
    /// after the base disk write, its fdatasync and the metadata update (most of a demand
    /// fetch's latency when the source is near). Only reads: a write still waits for FETCHED,
    /// so nothing a guest writes can be lost to a fetch that fails later, and a read served
    /// here returned the source's bytes, which is what the stripe holds until FETCHED.
    pub fn staged(&self, stripe: usize) -> Option<Arc<IoBuf>> {
        lock(&self.staged)
            .iter()
            .find(|(s, _)| *s == stripe)
            .map(|(_, data)| data.clone())
    }

    /// A buffer of `len` bytes to read a demand fetch's stripe into and then stage: a spare
    /// if one is free (and nothing still reads it), else a new one.
    fn staging_buffer(&self, len: usize) -> Arc<IoBuf> {
        let spare = lock(&self.staged_free).pop();
        spare
            .filter(|s| s.len() == len && Arc::strong_count(s) == 1)
            .unwrap_or_else(|| Arc::new(IoBuf::new(len)))
    }

    /// Keeps `copy`, a staged stripe no longer used, for the next demand fetch.
    fn unstage(&self, copy: Arc<IoBuf>) {
        let mut free = lock(&self.staged_free);
        if free.len() < STAGED_SPARES {
            free.push(copy);
        }
    }

    /// Stages `data`, the content of `stripe` read from the source, and wakes the channels
    /// waiting.
    fn stage(&self, stripe: usize, data: Arc<IoBuf>) {
        lock(&self.staged).push((stripe, data));
        self.queue.wake_parked();
    }

    fn finish(&self, stripe: usize, background: bool, result: io::Result<()>) {
        // FETCHED is set (or the fetch failed): reads go to the base disk (or fail) now.
        let mut staged = lock(&self.staged);
        if let Some(i) = staged.iter().position(|(s, _)| *s == stripe) {
            let (_, copy) = staged.swap_remove(i);
            drop(staged);
            self.unstage(copy);
        } else {
            drop(staged);
        }
        // Off the running count first, so `status` never shows complete with work pending.
        self.queue.finished(background);
        match result {
            Ok(()) => {
                let n = self.stripes.count();
                let done = self.stripes.count_fetched();
                if done == n {
                    info!("lazy fetch complete: all {n} stripes are on the base disk");
                } else if done * 10 / n > (done - 1) * 10 / n {
                    info!(
                        "lazy fetch: {done} of {n} stripes fetched ({}%)",
                        done * 100 / n
                    );
                }
            }
            Err(e) => {
                self.stripes.unclaim(stripe);
                if self.source.outage().is_some() {
                    // Down: the requests queued behind this one fail now, not one fetcher
                    // slot at a time.
                    let queued = self.queue.take_demand();
                    if !queued.is_empty() {
                        warn!(
                            "the source is down: failing the requests waiting for {} stripes",
                            queued.len()
                        );
                    }
                    for s in queued {
                        self.stripes.unclaim(s);
                    }
                }
                let count = self.errors.fetch_add(1, SeqCst) + 1;
                *lock(&self.last_error) = Some(format!("stripe {stripe}: {e}"));
                if count <= 10 || count.is_power_of_two() {
                    error!("fetching stripe {stripe} failed ({count} failures so far): {e}");
                }
            }
        }
        self.queue.wake_parked();
    }
}

/// One fetcher thread: takes jobs from the queue until told to stop. `channel` is its own
/// path to the base disk (made by the caller, so a failure shows at start-up).
pub(crate) fn fetcher(
    shared: Arc<Shared>,
    base: Arc<dyn BlockDevice>,
    mut channel: Box<dyn IoChannel>,
    source: Arc<dyn StripeSource>,
) {
    // Woken for guest demand: run at once beside CPU-bound neighbours (see set_slice).
    let _ = crate::sys::sched::set_slice(crate::sys::sched::SHORT_SLICE_NS);
    while let Some(Job(stripe, background)) = shared.queue.next_job(&shared.stripes, &*source) {
        let result = fetch(
            &shared,
            &*base,
            &mut *channel,
            &*source,
            (stripe, background),
        );
        shared.finish(stripe, background, result);
    }
}

/// The persister thread: writes WRITTEN bits when a FLUSH asks, until told to stop.
pub(crate) fn persister(shared: Arc<Shared>) {
    while shared.queue.next_persist() {
        shared.meta.serve(&shared.stripes);
        shared.queue.wake_parked();
    }
}

/// Writes a staged stripe to the base disk at `sector`: straight from the staged copy where
/// the disk takes caller memory (the copy is page-aligned), else from a copy of it.
fn write_staged(
    (shared, base): (&Shared, &dyn BlockDevice),
    channel: &mut dyn IoChannel,
    sector: u64,
    staged: Arc<IoBuf>,
) -> (Result<(), i32>, Option<IoBuf>) {
    let direct = base.iovec_align().is_some_and(|a| {
        (staged.as_ptr() as usize).is_multiple_of(a) && staged.len().is_multiple_of(a)
    });
    if !direct {
        let spare = lock(&shared.bufs).pop().filter(|b| b.len() == staged.len());
        let mut buf = spare.unwrap_or_else(|| IoBuf::new(staged.len()));
        buf.copy_from_slice(&staged);
        return run_sync(channel, IoOp::Write { sector, buf });
    }
    let iov = vec![libc::iovec {
        iov_base: staged.as_ptr() as *mut libc::c_void,
        iov_len: staged.len(),
    }];
    // SAFETY: the vector covers the staged copy, which `staged` (the owner) keeps allocated
    // until the write is done; for a write the memory is only read, as the channels reading
    // the staged copy do.
    let iov = unsafe { IoVecs::new(iov, staged) };
    run_sync(channel, IoOp::WriteVec { sector, iov })
}

fn fetch(
    shared: &Shared,
    base: &dyn BlockDevice,
    channel: &mut dyn IoChannel,
    source: &dyn StripeSource,
    (stripe, background): (usize, bool),
) -> io::Result<()> {
    let (first, sectors) = shared.stripes.sectors_of(stripe);
    let len = (sectors << SECTOR_SHIFT) as usize;
    let start = first << SECTOR_SHIFT;
    let (result, back) = if start >= source.bytes() {
        // Wholly past the source's end: zeros, without moving a buffer of them (a hole in a
        // plain file; encrypted zeros through the encryption layer).
        run_sync(
            channel,
            IoOp::WriteZeroes {
                sector: first,
                sectors,
            },
        )
    } else {
        let read_err = |e: io::Error| {
            io::Error::new(e.kind(), format!("reading the image at byte {start}: {e}"))
        };
        // Past the source's end the disk reads as zeros; read_at never leaves stale bytes.
        if background {
            let spare = lock(&shared.bufs).pop().filter(|b| b.len() == len);
            let mut buf = spare.unwrap_or_else(|| IoBuf::new(len));
            source.read_at(start, &mut buf).map_err(read_err)?;
            run_sync(channel, IoOp::Write { sector: first, buf })
        } else if let Some(staged) = shared.staged(stripe) {
            // Read and staged by a queue's worker (see Shared::fetch_here): stored here.
            write_staged((shared, base), channel, first, staged)
        } else {
            // A guest waits: read into the staged copy and let its reads go before the write
            // and the syncs below.
            let mut staged = shared.staging_buffer(len);
            // Not shared (see staging_buffer): no copy is made here.
            let Some(buf) = Arc::get_mut(&mut staged) else {
                return Err(io::Error::other("a staging buffer still in use"));
            };
            if let Err(e) = source.read_at(start, buf) {
                shared.unstage(staged);
                return Err(read_err(e));
            }
            shared.stage(stripe, staged.clone());
            write_staged((shared, base), channel, first, staged)
        }
    };
    if let Some(buf) = back {
        lock(&shared.bufs).push(buf);
    }
    result.map_err(|errno| {
        let e = io::Error::from_raw_os_error(errno);
        io::Error::new(
            e.kind(),
            format!("writing the base disk at sector {first}: {e}"),
        )
    })?;
    base.sync()
        .map_err(|e| io::Error::new(e.kind(), format!("syncing the base disk: {e}")))?;
    shared
        .meta
        .persist_fetched(&shared.stripes, stripe)
        .map_err(|e| io::Error::new(e.kind(), format!("updating the metadata: {e}")))
}
