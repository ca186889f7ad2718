//! When a queue worker busy-polls its ring and when it sleeps on the kick eventfd.
//!
//! Polling wins when the worker has a core to itself: a request is seen within a microsecond
//! instead of after a kick and a wake-up. It loses badly when the core is shared. A polling
//! thread is runnable, so a kick cannot wake it sooner: every time it hands the core to another
//! runnable task (a CPU-bound neighbour, a busy-polling client thread) the requests that arrive
//! meanwhile wait a whole scheduler slice (milliseconds). A sleeping worker, in contrast, is
//! woken by the kick and preempts a CPU hog at once. So the policy:
//!
//! - **Adaptive window** (like QEMU's `poll-max-ns`): after the last activity the worker polls
//!   for `window`, 0..=`max`. After a sleep the window grows (×2) when the sleep was shorter
//!   than `max` (polling longer would have caught that event) and shrinks (÷2) when it was
//!   longer (polling would only have burnt CPU). A disk with one request every few milliseconds
//!   thus stops polling; a busy one polls up to `max`.
//! - **Contention back-off**: between polls the worker yields its core, so that io-wq workers
//!   and a client thread on the same core run at once. A yield that returns only after
//!   [`PREEMPTED`] means another task held the core for a slice: the core is contended. The
//!   worker stops polling right away (notifications back on, the ring re-checked, then sleep)
//!   and does not poll again for a back-off period that doubles while contention persists
//!   ([`BACKOFF_MIN`]..=[`BACKOFF_MAX`]) and halves after each session that polled without
//!   being preempted. A probe that meets contention costs one slice; probes get rarer as the
//!   contention lasts.
//!
//! Time is passed in, so the policy is tested without a clock.

use std::time::{Duration, Instant};

/// Smallest non-zero window; a shrink below it turns polling off until a short sleep grows it.
pub const WINDOW_MIN: Duration = Duration::from_micros(4);
/// A yield that took longer than this means another task ran a scheduler slice on our core
/// (slices are ≥ 0.7 ms; an io-wq worker or a client handing back is done in tens of µs).
pub const PREEMPTED: Duration = Duration::from_micros(200);
/// First back-off after contention is seen.
pub const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest back-off: how long polling may stay off after contention has gone.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One queue's polling state; lives across the worker's wake-ups.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    /// When the worker last went to sleep with a poll session behind it, if it did.
    slept_at: Option<Instant>,
    /// Current back-off length; zero while no contention has been seen lately.
    backoff: Duration,
    /// No polling before this instant.
    paused_until: Option<Instant>,
    /// The current session polled and was not preempted.
    clean_session: bool,
    stats: PollStats,
}

/// What the policy did, for the debug log and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Wake-ups of the worker.
    pub wakeups: u64,
    /// Wake-ups after which the worker polled.
    pub polled: u64,
    /// Yields after which the core had been taken for a slice (each pauses polling).
    pub preemptions: u64,
}

impl AdaptivePoll {
    /// `max` = `poll_queue_timeout_us`; zero turns polling off for good.
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: max.min(WINDOW_MIN),
            slept_at: None,
            backoff: Duration::ZERO,
            paused_until: None,
            clean_session: false,
            stats: PollStats::default(),
        }
    }

    #[cfg(test)]
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// The worker woke at `now` (kick or completion): adapt the window to how long it slept.
    pub fn woke(&mut self, now: Instant) {
        self.stats.wakeups += 1;
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        let slept = now.saturating_duration_since(slept_at);
        if slept > self.max {
            self.window /= 2;
            if self.window < WINDOW_MIN {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max {
            self.window = (self.window * 2).clamp(WINDOW_MIN, self.max);
        }
    }

    /// Whether to start (or go on) polling at `now`, `idle` after the last activity.
    pub fn keep_polling(&mut self, now: Instant, idle: Duration) -> bool {
        if let Some(until) = self.paused_until {
            if now < until {
                return false;
            }
            self.paused_until = None;
        }
        let poll = idle < self.window;
        if poll && !self.clean_session {
            self.stats.polled += 1;
            self.clean_session = true;
        }
        poll
    }

    /// A yield between polls ran from `before` to `after`. Returns false when the core turned
    /// out to be contended: stop polling now.
    pub fn yielded(&mut self, before: Instant, after: Instant) -> bool {
        if after.saturating_duration_since(before) <= PREEMPTED {
            return true;
        }
        self.stats.preemptions += 1;
        self.clean_session = false;
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.paused_until = Some(after + self.backoff);
        false
    }

    /// The worker goes to sleep at `now`.
    pub fn sleeping(&mut self, now: Instant) {
        if std::mem::take(&mut self.clean_session) && self.backoff > Duration::ZERO {
            self.backoff /= 2;
            if self.backoff < BACKOFF_MIN {
                self.backoff = Duration::ZERO;
            }
        }
        // A sleep while paused says nothing about the window: it was not polled.
        self.slept_at = self.paused_until.is_none().then_some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(500);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// One wake-up: woke at `t`, polled (if the policy says so) and slept `slept` later.
    fn session(p: &mut AdaptivePoll, t: &mut Instant, slept: Duration) {
        p.woke(*t);
        p.keep_polling(*t, Duration::ZERO);
        p.sleeping(*t);
        *t += slept;
    }

    /// A policy whose sleeps were short: the window is at `MAX`.
    fn busy() -> (AdaptivePoll, Instant) {
        let mut p = AdaptivePoll::new(MAX);
        let mut t = Instant::now();
        for _ in 0..20 {
            session(&mut p, &mut t, us(30));
        }
        assert_eq!(p.window(), MAX);
        (p, t)
    }

    #[test]
    fn zero_max_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for _ in 0..20 {
            session(&mut p, &mut t, us(1));
            assert!(!p.keep_polling(t, Duration::ZERO));
        }
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn short_sleeps_grow_the_window_to_max() {
        let (mut p, t) = busy();
        assert!(p.keep_polling(t, us(499)));
        assert!(!p.keep_polling(t, us(500)));
    }

    #[test]
    fn long_sleeps_turn_polling_off_and_short_ones_back_on() {
        let (mut p, mut t) = busy();
        for _ in 0..20 {
            session(&mut p, &mut t, Duration::from_millis(10));
        }
        assert_eq!(p.window(), Duration::ZERO);
        assert!(!p.keep_polling(t, Duration::ZERO));
        // Load returns: sleeps get short again (kicks arrive quickly) and polling comes back.
        for _ in 0..20 {
            session(&mut p, &mut t, us(20));
        }
        assert_eq!(p.window(), MAX);
    }

    #[test]
    fn a_slow_yield_pauses_polling_with_growing_backoff() {
        let (mut p, mut t) = busy();
        // Fast yields: keep polling.
        assert!(p.keep_polling(t, us(1)));
        assert!(p.yielded(t, t + us(50)));
        // A yield that lost the core for 2 ms: stop, and no polling for BACKOFF_MIN.
        assert!(!p.yielded(t, t + Duration::from_millis(2)));
        t += Duration::from_millis(2);
        p.sleeping(t);
        assert!(!p.keep_polling(t + BACKOFF_MIN - us(1), Duration::ZERO));
        t += BACKOFF_MIN;
        p.woke(t);
        assert!(p.keep_polling(t, Duration::ZERO));
        // Contended again at once: the pause doubles.
        assert!(!p.yielded(t, t + Duration::from_millis(2)));
        t += Duration::from_millis(2);
        p.sleeping(t);
        assert!(!p.keep_polling(t + BACKOFF_MIN * 2 - us(1), Duration::ZERO));
        assert!(p.keep_polling(t + BACKOFF_MIN * 2, Duration::ZERO));
        assert_eq!(p.stats().preemptions, 2);
    }

    #[test]
    fn backoff_is_bounded_and_decays_after_clean_sessions() {
        let (mut p, mut t) = busy();
        for _ in 0..20 {
            t += BACKOFF_MAX + Duration::from_millis(2);
            assert!(p.keep_polling(t, Duration::ZERO));
            assert!(!p.yielded(t, t + Duration::from_millis(2)));
            p.sleeping(t);
        }
        // The pause never exceeds BACKOFF_MAX.
        t += Duration::from_millis(2);
        assert!(p.keep_polling(t + BACKOFF_MAX, Duration::ZERO));
        // Contention gone: each clean polling session halves the back-off, down to none.
        t += BACKOFF_MAX;
        for _ in 0..10 {
            session(&mut p, &mut t, us(30));
        }
        assert!(!p.yielded(t, t + Duration::from_millis(2)));
        assert!(p.keep_polling(t + Duration::from_millis(2) + BACKOFF_MIN, Duration::ZERO));
    }

    #[test]
    fn sleeps_while_paused_do_not_shrink_the_window() {
        let (mut p, mut t) = busy();
        assert!(p.keep_polling(t, Duration::ZERO));
        assert!(!p.yielded(t, t + Duration::from_millis(2)));
        p.sleeping(t);
        session(&mut p, &mut t, Duration::from_millis(50));
        assert_eq!(p.window(), MAX);
    }
}
