//! The fetcher pool's work queue: guest demand ahead of background work (autofetch, paced and
//! retried, paused to one probe every few seconds while the source is down), WRITTEN
//! persistence requests (served by their own thread, never behind fetches), and the wake-ups
//! of channels whose requests wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::source::StripeSource;
use super::states::StripeStates;
use crate::block::Notifier;

/// After a full pass that left stripes behind (in flight elsewhere, or failed), wait this long
/// before the next pass.
const AUTOFETCH_RETRY: Duration = Duration::from_secs(1);

/// While the source is down, autofetch probes it with one fetch at most this often (plus up
/// to as much again of jitter), and never before the source's own next probe time.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Locks `m`, ignoring poisoning: every critical section leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wakes one channel that has requests waiting for fetches (see `LazyChannel`).
pub(crate) struct Waker {
    /// The channel's notifier, which its worker watches.
    pub notifier: Notifier,
    /// Requests the channel has parked; only channels with some are woken.
    pub parked: AtomicUsize,
}

/// What a fetcher does next: fetch a stripe; `true` for background work.
pub(crate) struct Job(pub usize, pub bool);

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
    /// While the source is down: earliest start of the next background probe.
    next_probe: Option<Instant>,
    auto_done: bool,
    /// A FLUSH waits for WRITTEN bits to be persisted.
    persist_wanted: bool,
    /// The disk is another process's (handed over, or not yet taken over): no fetch starts.
    held: bool,
    stop: bool,
}

pub(crate) struct FetchQueue {
    queue: Mutex<Queue>,
    cond: Condvar,
    /// Wakes the persister thread.
    persist_cond: Condvar,
    pub autofetch: bool,
    /// Background fetches running at once; the rest of the pool stays free for guest demand.
    background: usize,
    /// Bytes per second for background fetches; `None`: as fast as the pool goes.
    autofetch_rate: Option<u64>,
    /// Bumped after every finished job (success or failure); channels re-check parked
    /// requests when it moves.
    pub generation: AtomicU64,
    wakers: Mutex<Vec<Weak<Waker>>>,
}

impl FetchQueue {
    /// A queue handing out work at once, or (`held`) only after [`FetchQueue::unhold`].
    pub fn new(
        autofetch: bool,
        background: usize,
        autofetch_rate: Option<u64>,
        held: bool,
    ) -> Self {
        FetchQueue {
            queue: Mutex::new(Queue {
                held,
                ..Queue::default()
            }),
            cond: Condvar::new(),
            persist_cond: Condvar::new(),
            autofetch,
            background,
            autofetch_rate,
            generation: AtomicU64::new(0),
            wakers: Mutex::default(),
        }
    }

    /// Queues a stripe a guest waits for (the caller claimed it).
    pub fn demand(&self, stripe: usize) {
        lock(&self.queue).demand.push_back(stripe);
        self.cond.notify_one();
    }

    /// Takes the stripes queued for guests out of the queue (the source is down: their
    /// requests fail instead of waiting for a fetcher); the caller unclaims them.
    pub fn take_demand(&self) -> VecDeque<usize> {
        std::mem::take(&mut lock(&self.queue).demand)
    }

    /// Asks the persister to persist WRITTEN bits; `ticket` runs under the queue lock, so the
    /// request it hands out is covered by the next persistence job.
    pub fn want_persist(&self, ticket: impl FnOnce() -> u64) -> u64 {
        let mut q = lock(&self.queue);
        let t = ticket();
        q.persist_wanted = true;
        self.persist_cond.notify_one();
        t
    }

    /// Waits until WRITTEN bits are to be persisted (true) or the pool stops (false).
    pub fn next_persist(&self) -> bool {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return false;
            }
            if q.persist_wanted {
                q.persist_wanted = false;
                return true;
            }
            q = self.persist_cond.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops the fetchers after their current job, and the persister.
    pub fn stop(&self) {
        lock(&self.queue).stop = true;
        self.cond.notify_all();
        self.persist_cond.notify_all();
    }

    /// Starts no more fetches and waits for those running to finish (the disk is being handed
    /// to another process: nothing of ours may write it afterwards).
    pub fn hold(&self) {
        let mut q = lock(&self.queue);
        q.held = true;
        while q.running > 0 {
            q = self.cond.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Hands out work again, background work from the first stripe (the previous owner may
    /// have fetched some of what was left).
    pub fn unhold(&self) {
        let mut q = lock(&self.queue);
        q.held = false;
        q.cursor = 0;
        q.auto_done = false;
        q.next_auto = None;
        self.cond.notify_all();
    }

    /// The next job; `None`: stop.
    pub fn next_job(&self, states: &StripeStates, source: &dyn StripeSource) -> Option<Job> {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            if q.held {
                q = self.cond.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if let Some(s) = q.demand.pop_front() {
                q.running += 1;
                return Some(Job(s, false));
            }
            if self.autofetch && !q.auto_done && q.auto_running < self.background {
                let now = Instant::now();
                // The source is down: one background fetch at a time, a probe every few
                // seconds (a demand may probe sooner).
                let outage = source.outage();
                if let Some(o) = &outage {
                    let at = o.probe_at.max(q.next_probe.unwrap_or(now));
                    let wait = if q.auto_running > 0 || o.probing {
                        PROBE_INTERVAL
                    } else {
                        at.saturating_duration_since(now)
                    };
                    if !wait.is_zero() {
                        q = self
                            .cond
                            .wait_timeout(q, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        continue;
                    }
                }
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
                if let Some(s) = claim_next(states, &mut q.cursor) {
                    q.running += 1;
                    q.auto_running += 1;
                    q.next_probe = outage.map(|_| now + PROBE_INTERVAL.mul_f64(1.0 + jitter()));
                    if let Some(rate) = self.autofetch_rate {
                        let pace =
                            Duration::from_secs_f64(states.stripe_bytes() as f64 / rate as f64);
                        q.next_auto = Some(q.next_auto.map_or(now, |t| t.max(now)) + pace);
                    }
                    return Some(Job(s, true));
                }
                // A full pass is done.
                if states.fetched_count() == states.count() {
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

    /// Takes a finished fetch off the running count.
    pub fn finished(&self, background: bool) {
        let mut q = lock(&self.queue);
        q.running -= 1;
        if background {
            q.auto_running -= 1;
        }
        if q.held && q.running == 0 {
            // `hold` waits for this.
            self.cond.notify_all();
        } else if background {
            self.cond.notify_one();
        }
    }

    /// No fetch queued or running, and fetches not held (see [`FetchQueue::hold`]: the disk
    /// is another process's).
    pub fn idle(&self) -> bool {
        let q = lock(&self.queue);
        q.demand.is_empty() && q.running == 0 && !q.held
    }

    /// Stripes waiting in the demand queue plus fetches running.
    pub fn pending(&self) -> usize {
        let q = lock(&self.queue);
        q.demand.len() + q.running
    }

    pub fn register(&self, waker: &Arc<Waker>) {
        let mut wakers = lock(&self.wakers);
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }

    /// Tells every channel with parked requests that a job finished.
    pub fn wake_parked(&self) {
        self.generation.fetch_add(1, SeqCst);
        for w in lock(&self.wakers).iter().filter_map(Weak::upgrade) {
            if w.parked.load(SeqCst) > 0 {
                w.notifier.notify();
            }
        }
    }
}

/// A number in [0, 1) that differs between calls (probes of several disks on one source
/// should not line up).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// Claims the first stripe at or after `cursor` that nobody fetched or claimed.
fn claim_next(states: &StripeStates, cursor: &mut usize) -> Option<usize> {
    while *cursor < states.count() {
        let s = *cursor;
        *cursor += 1;
        if states.claim(s) {
            return Some(s);
        }
    }
    None
}
