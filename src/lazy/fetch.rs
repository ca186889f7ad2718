//! Stripe state and the fetcher pool: copies stripes from the image to the base disk.
//!
//! Every stripe has one in-memory state byte: the metadata bits (FETCHED, WRITTEN) plus QUEUED
//! while a fetch is pending or running. The crash-safe order of one fetch is
//! image read -> base write -> base fdatasync -> metadata sector write -> metadata fdatasync ->
//! FETCHED set in memory. Guest writes reach a stripe only once FETCHED is set, so after a crash
//! the metadata never calls a stripe fetched whose data is not durable, and a stripe the
//! metadata calls unfetched holds no guest data (re-fetching it loses nothing).

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{error, info};
use vmm_sys_util::eventfd::EventFd;

use super::metadata::{self, Metadata, FETCHED, SECTOR_SIZE, WRITTEN};
use crate::block::{run_sync, BlockDevice, IoBuf, IoChannel, IoOp, SECTOR_SHIFT};
use crate::crypto::Xts;

/// In memory only: a fetch of the stripe is queued or running.
pub(crate) const QUEUED: u8 = 1 << 7;
/// Background fetches running at once; the rest of the pool stays free for guest demand.
const AUTOFETCH_CONCURRENCY: usize = 2;
/// After a full pass that left stripes behind (in flight elsewhere, or failed), wait this long
/// before the next pass.
const AUTOFETCH_RETRY: Duration = Duration::from_secs(1);

/// Locks `m`, ignoring poisoning: every critical section leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wakes one channel that has requests waiting for fetches (see `LazyChannel`).
pub(crate) struct Waker {
    /// A duplicate of the channel's completion eventfd, which its worker watches.
    pub fd: EventFd,
    /// Requests the channel has parked; only channels with some are woken.
    pub parked: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    /// Stripes guests are waiting for, in request order.
    demand: VecDeque<usize>,
    /// Next stripe the background pass looks at.
    cursor: usize,
    /// Fetches running, and how many of them are background work.
    running: usize,
    auto_running: usize,
    /// Earliest start of the next background fetch (rate limit, retry delay).
    next_auto: Option<Instant>,
    auto_done: bool,
    /// A FLUSH waits for WRITTEN bits to be persisted.
    persist_wanted: bool,
    stop: bool,
}

/// The metadata file and the key it is encrypted with.
pub(crate) struct MetaFile {
    pub file: File,
    pub xts: Option<Arc<Xts>>,
}

impl MetaFile {
    fn write_sector(&self, n: u64, plaintext: [u8; SECTOR_SIZE]) -> io::Result<()> {
        metadata::write_sector(&self.file, n, plaintext, self.xts.as_deref())
    }
}

/// State shared by the device, its channels and the fetchers.
pub(crate) struct Shared {
    states: Box<[AtomicU8]>,
    pub shift: u8,
    pub disk_sectors: u64,
    pub copy_on_read: bool,
    pub autofetch: bool,
    /// Bytes per second for background fetches; `None`: as fast as the pool goes.
    autofetch_rate: Option<u64>,
    queue: Mutex<Queue>,
    cond: Condvar,
    meta: Mutex<MetaFile>,
    fetched: AtomicUsize,
    pub errors: AtomicU64,
    /// Bumped after every finished fetch (success or failure); channels re-check parked
    /// requests when it moves.
    pub generation: AtomicU64,
    wakers: Mutex<Vec<Weak<Waker>>>,
    /// Metadata sectors holding WRITTEN bits set in memory and not yet on disk.
    dirty: Mutex<BTreeSet<u64>>,
    /// WRITTEN persistence for guest FLUSHes: requests handed out, and the latest request
    /// served (successfully, or not).
    persist_requested: AtomicU64,
    persist_done: AtomicU64,
    persist_failed: AtomicU64,
}

/// What a fetcher does next.
pub(crate) enum Job {
    /// Fetch a stripe; `true` for background work.
    Fetch(usize, bool),
    /// Write the dirty WRITTEN bits, serving persistence requests up to this one.
    Persist(u64),
}

/// Where something a parked request waits for (its stripes' fetches, or WRITTEN bits being
/// persisted) stands.
pub(crate) enum WaitState {
    Pending,
    Ready,
    Failed,
}

impl Shared {
    pub fn new(
        md: &Metadata,
        disk_sectors: u64,
        meta: MetaFile,
        copy_on_read: bool,
        autofetch: bool,
        autofetch_rate: Option<u64>,
    ) -> Self {
        let states: Box<[AtomicU8]> = md.stripes.iter().map(|&b| AtomicU8::new(b)).collect();
        Shared {
            fetched: AtomicUsize::new(md.fetched_count()),
            states,
            shift: md.stripe_shift,
            disk_sectors,
            copy_on_read,
            autofetch,
            autofetch_rate,
            queue: Mutex::default(),
            cond: Condvar::new(),
            meta: Mutex::new(meta),
            errors: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            wakers: Mutex::default(),
            dirty: Mutex::default(),
            persist_requested: AtomicU64::new(0),
            persist_done: AtomicU64::new(0),
            persist_failed: AtomicU64::new(0),
        }
    }

    pub fn stripe_count(&self) -> usize {
        self.states.len()
    }

    pub fn stripe_bytes(&self) -> u64 {
        (SECTOR_SIZE as u64) << self.shift
    }

    pub fn fetched_count(&self) -> usize {
        self.fetched.load(SeqCst)
    }

    pub fn count_with(&self, bit: u8) -> usize {
        self.states
            .iter()
            .filter(|s| s.load(SeqCst) & bit != 0)
            .count()
    }

    /// The stripe holding `sector`.
    pub fn stripe_of(&self, sector: u64) -> usize {
        (sector >> self.shift) as usize
    }

    pub fn is_fetched(&self, stripe: usize) -> bool {
        self.states[stripe].load(SeqCst) & FETCHED != 0
    }

    pub fn all_fetched(&self, first: usize, last: usize) -> bool {
        (first..=last).all(|s| self.is_fetched(s))
    }

    /// True when one of the stripes is neither fetched nor being fetched: its fetch failed.
    pub fn any_abandoned(&self, first: usize, last: usize) -> bool {
        (first..=last).any(|s| self.states[s].load(SeqCst) & (FETCHED | QUEUED) == 0)
    }

    /// Records guest writes into (fetched) stripes; made durable before the next FLUSH
    /// completes (see [`Shared::request_persist`]).
    pub fn mark_written(&self, first: usize, last: usize) {
        for s in first..=last {
            if self.states[s].load(SeqCst) & WRITTEN == 0 {
                self.states[s].fetch_or(WRITTEN, SeqCst);
                lock(&self.dirty).insert(Metadata::sector_of_stripe_byte(s));
            }
        }
    }

    /// If WRITTEN bits wait to be persisted, asks a fetcher to write them and returns the
    /// request to wait for (see [`Shared::persisted`]); `None` if there is nothing to do.
    pub fn request_persist(&self) -> Option<u64> {
        if !self.written_dirty() {
            return None;
        }
        let mut q = lock(&self.queue);
        let ticket = self.persist_requested.fetch_add(1, SeqCst) + 1;
        q.persist_wanted = true;
        self.cond.notify_one();
        Some(ticket)
    }

    /// WRITTEN bits wait to be persisted.
    pub fn written_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    pub fn persisted(&self, ticket: u64) -> WaitState {
        if self.persist_done.load(SeqCst) >= ticket {
            WaitState::Ready
        } else if self.persist_failed.load(SeqCst) >= ticket {
            WaitState::Failed
        } else {
            WaitState::Pending
        }
    }

    /// Asks the pool to fetch `stripe` ahead of background work, unless it is fetched or
    /// already on its way.
    pub fn request(&self, stripe: usize) {
        if self.claim(stripe) {
            lock(&self.queue).demand.push_back(stripe);
            self.cond.notify_one();
        }
    }

    /// Sets QUEUED if the stripe is neither fetched nor queued; true if this call set it.
    fn claim(&self, stripe: usize) -> bool {
        self.states[stripe]
            .fetch_update(SeqCst, SeqCst, |v| {
                (v & (FETCHED | QUEUED) == 0).then_some(v | QUEUED)
            })
            .is_ok()
    }

    pub fn register(&self, waker: &Arc<Waker>) {
        let mut wakers = lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }

    /// Tells every channel with parked requests that a fetch finished.
    fn wake_parked(&self) {
        self.generation.fetch_add(1, SeqCst);
        for w in lock(&self.wakers).iter().filter_map(Weak::upgrade) {
            if w.parked.load(SeqCst) > 0 {
                let _ = w.fd.write(1);
            }
        }
    }

    /// Plaintext of metadata sector `n` (>= 1) from the in-memory state, as durable so far.
    fn encode_sector(&self, n: u64) -> [u8; SECTOR_SIZE] {
        let mut out = [0u8; SECTOR_SIZE];
        let start = (n as usize - 1) * SECTOR_SIZE;
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(s) = self.states.get(start + i) {
                *b = s.load(SeqCst) & (FETCHED | WRITTEN);
            }
        }
        out
    }

    /// Makes "stripe fetched" durable, then lets guest I/O use the stripe.
    fn persist_fetched(&self, stripe: usize) -> io::Result<()> {
        let meta = lock(&self.meta);
        let n = Metadata::sector_of_stripe_byte(stripe);
        let mut sector = self.encode_sector(n);
        sector[(SECTOR_SIZE + stripe) % SECTOR_SIZE] |= FETCHED;
        meta.write_sector(n, sector)?;
        meta.file.sync_data()?;
        self.states[stripe]
            .fetch_update(SeqCst, SeqCst, |v| Some((v | FETCHED) & !QUEUED))
            .ok();
        Ok(())
    }

    /// Writes the metadata sectors whose WRITTEN bits changed, then fdatasyncs.
    pub fn persist_written(&self) -> io::Result<()> {
        let meta = lock(&self.meta);
        let sectors = std::mem::take(&mut *lock(&self.dirty));
        if sectors.is_empty() {
            return Ok(());
        }
        let result = sectors
            .iter()
            .try_for_each(|&n| meta.write_sector(n, self.encode_sector(n)))
            .and_then(|()| meta.file.sync_data());
        if result.is_err() {
            // Still dirty: the next FLUSH or sync tries again.
            lock(&self.dirty).extend(sectors);
        }
        result
    }

    /// Serves WRITTEN persistence requests up to `ticket`.
    fn persist(&self, ticket: u64) {
        match self.persist_written() {
            Ok(()) => self.persist_done.fetch_max(ticket, SeqCst),
            Err(e) => {
                error!("writing WRITTEN bits to the metadata failed: {e}");
                self.persist_failed.fetch_max(ticket, SeqCst)
            }
        };
        self.wake_parked();
    }

    /// Stops the fetchers after their current stripe.
    pub fn stop(&self) {
        lock(&self.queue).stop = true;
        self.cond.notify_all();
    }

    /// The next job; `None`: stop.
    fn next_job(&self) -> Option<Job> {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            if q.persist_wanted {
                q.persist_wanted = false;
                return Some(Job::Persist(self.persist_requested.load(SeqCst)));
            }
            if let Some(s) = q.demand.pop_front() {
                q.running += 1;
                return Some(Job::Fetch(s, false));
            }
            if self.autofetch && !q.auto_done && q.auto_running < AUTOFETCH_CONCURRENCY {
                let now = Instant::now();
                match q.next_auto {
                    Some(t) if t > now => {
                        q = self
                            .cond
                            .wait_timeout(q, t - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        continue;
                    }
                    _ => {}
                }
                if let Some(s) = self.claim_next(&mut q.cursor) {
                    q.running += 1;
                    q.auto_running += 1;
                    if let Some(rate) = self.autofetch_rate {
                        let pace =
                            Duration::from_secs_f64(self.stripe_bytes() as f64 / rate as f64);
                        q.next_auto = Some(q.next_auto.map_or(now, |t| t.max(now)) + pace);
                    }
                    return Some(Job::Fetch(s, true));
                }
                // A full pass is done.
                if self.fetched_count() == self.stripe_count() {
                    q.auto_done = true;
                } else {
                    q.cursor = 0;
                    q.next_auto = Some(now + AUTOFETCH_RETRY);
                }
                continue;
            }
            q = self.cond.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Claims the first stripe at or after `cursor` that nobody fetched or claimed.
    fn claim_next(&self, cursor: &mut usize) -> Option<usize> {
        while *cursor < self.stripe_count() {
            let s = *cursor;
            *cursor += 1;
            if self.claim(s) {
                return Some(s);
            }
        }
        None
    }

    fn finish(&self, stripe: usize, background: bool, result: io::Result<()>) {
        // Off the running count first, so `status` never shows complete with work pending.
        {
            let mut q = lock(&self.queue);
            q.running -= 1;
            if background {
                q.auto_running -= 1;
                self.cond.notify_one();
            }
        }
        match result {
            Ok(()) => {
                let n = self.stripe_count();
                let done = self.fetched.fetch_add(1, SeqCst) + 1;
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
                self.states[stripe].fetch_and(!QUEUED, SeqCst);
                let count = self.errors.fetch_add(1, SeqCst) + 1;
                if count <= 10 || count.is_power_of_two() {
                    error!("fetching stripe {stripe} failed ({count} failures so far): {e}");
                }
            }
        }
        self.wake_parked();
    }

    /// Stripes waiting in the demand queue plus fetches running.
    pub fn pending(&self) -> usize {
        let q = lock(&self.queue);
        q.demand.len() + q.running
    }
}

/// The source image: fetchers read it with plain positioned reads.
pub(crate) struct Image {
    pub file: File,
    pub bytes: u64,
}

/// One fetcher thread: takes stripes from the queue until told to stop. `channel` is its own
/// path to the base disk (made by the caller, so a failure shows at start-up).
pub(crate) fn fetcher(
    shared: Arc<Shared>,
    base: Arc<dyn BlockDevice>,
    mut channel: Box<dyn IoChannel>,
    image: Arc<Image>,
) {
    let mut spare: Option<IoBuf> = None;
    while let Some(job) = shared.next_job() {
        match job {
            Job::Fetch(stripe, background) => {
                let result = fetch(&shared, &*base, &mut *channel, &image, stripe, &mut spare);
                shared.finish(stripe, background, result);
            }
            Job::Persist(ticket) => shared.persist(ticket),
        }
    }
}

fn fetch(
    shared: &Shared,
    base: &dyn BlockDevice,
    channel: &mut dyn IoChannel,
    image: &Image,
    stripe: usize,
    spare: &mut Option<IoBuf>,
) -> io::Result<()> {
    let first = (stripe as u64) << shared.shift;
    let sectors = (1u64 << shared.shift).min(shared.disk_sectors - first);
    let len = (sectors << SECTOR_SHIFT) as usize;
    let start = first << SECTOR_SHIFT;
    let avail = image.bytes.saturating_sub(start).min(len as u64) as usize;
    let (result, back) = if avail == 0 {
        // Wholly past the image's end: zeros, without moving a buffer of them (a hole in a
        // plain file; encrypted zeros through the encryption layer).
        run_sync(
            channel,
            IoOp::WriteZeroes {
                sector: first,
                sectors,
            },
        )
    } else {
        let mut buf = match spare.take() {
            Some(b) if b.len() == len => b,
            _ => IoBuf::new(len),
        };
        image
            .file
            .read_exact_at(&mut buf[..avail], start)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("reading the image at byte {start}: {e}"))
            })?;
        // Past the image's end the disk reads as zeros; never leave stale buffer bytes.
        buf[avail..].fill(0);
        run_sync(channel, IoOp::Write { sector: first, buf })
    };
    if back.is_some() {
        *spare = back;
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
        .persist_fetched(stripe)
        .map_err(|e| io::Error::new(e.kind(), format!("updating the metadata: {e}")))
}
