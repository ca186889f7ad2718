//! The retry policy of every remote request: exponential backoff with full jitter inside a
//! time budget.
//!
//! A guest request that needs an unfetched stripe waits for the fetch, so the budget bounds
//! how long a guest waits during an outage: no attempt starts after `budget` from the first
//! one, and each attempt's timeout is clamped to what is left of it. Permanent failures (a
//! 403, an image that changed) end the loop at once: retrying them only delays the error.
//!
//! A circuit breaker, shared like the counters by every request of one source or store, keeps
//! requests from queuing up behind an outage: once a request has spent its whole budget on
//! transient failures, the source is known down ([`RetryPolicy::outage`]). Requests still
//! retrying give up at their next failure (their backoff sleep is cut short), and new ones
//! fail at once without an attempt, except one *probe* at a time: a single attempt (no
//! retries) allowed once the last failed attempt's duration has passed again (so probes keep
//! at most half of one connection busy against a silent server, and a refused connection is
//! probed again at once). Any successful attempt closes the breaker, and an attempt answered
//! with a permanent failure (the server is up) does too; requests then go as before, at the
//! callers' own concurrency (no herd: nothing was queued inside the policy).

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{warn, Level};

use crate::sys::ratelog::{RateLimiter, Verdict};

/// The first wait's upper bound; it doubles per failed attempt up to [`MAX_WAIT`].
pub const FIRST_WAIT: Duration = Duration::from_millis(100);
/// Longest wait between two attempts (a `Retry-After` is capped to it too).
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// An attempt with less time than this left in the budget is not started: it could not
/// finish a request, only turn the last real error into a timeout.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// Why one attempt failed, and whether another may succeed.
#[derive(Debug)]
pub struct Failure {
    pub error: io::Error,
    /// Worth another attempt (connection errors, timeouts, 5xx, 408, 429).
    pub transient: bool,
    /// What the server asked us to wait (`Retry-After`), before capping.
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn transient(error: io::Error) -> Self {
        Failure {
            error,
            transient: true,
            retry_after: None,
        }
    }

    pub fn permanent(error: io::Error) -> Self {
        Failure {
            error,
            transient: false,
            retry_after: None,
        }
    }
}

/// Time as the policy sees it; tests pass a fake one.
pub trait Clock {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration);
    /// Sleeps `d`, or less if `breaker` opens meanwhile; a fake clock just sleeps.
    fn sleep_unless_open(&self, d: Duration, breaker: &Breaker) {
        let _ = breaker;
        self.sleep(d);
    }
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
    fn sleep_unless_open(&self, d: Duration, breaker: &Breaker) {
        let deadline = Instant::now() + d;
        let mut state = breaker.lock();
        while state.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = breaker
                .opened
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A source known down, as [`RetryPolicy::outage`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// When a request first spent its whole budget (wall clock, for `status`).
    pub since: SystemTime,
    /// The next probe may start then (see the module documentation).
    pub probe_at: Instant,
    /// A probe is running.
    pub probing: bool,
    /// The last failure, for the errors of requests refused meanwhile.
    last_error: String,
    last_kind: io::ErrorKind,
}

/// The circuit breaker of one source or store (see the module documentation); `None`: closed.
#[derive(Default)]
pub struct Breaker {
    state: Mutex<Option<Outage>>,
    /// Mirrors `state.is_some()`, so the closed case costs no lock.
    open: AtomicBool,
    /// Notified when the breaker opens (sleeping retries give up).
    opened: Condvar,
}

/// What a request may do, the breaker consulted.
enum Admit {
    /// Closed: retry within the budget as usual.
    Run,
    /// Open: one attempt, whose outcome closes the breaker or schedules the next probe.
    Probe,
    /// Open, and not this request's turn to probe: fail at once.
    Refuse(io::Error),
}

impl Breaker {
    fn lock(&self) -> MutexGuard<'_, Option<Outage>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_open(&self) -> bool {
        self.open.load(Relaxed)
    }

    fn admit(&self, now: Instant) -> Admit {
        if !self.is_open() {
            return Admit::Run;
        }
        let mut state = self.lock();
        let Some(o) = state.as_mut() else {
            return Admit::Run;
        };
        if o.probing || now < o.probe_at {
            let down = SystemTime::now()
                .duration_since(o.since)
                .unwrap_or_default()
                .as_secs_f64();
            return Admit::Refuse(io::Error::new(
                o.last_kind,
                format!(
                    "not tried: the source is down (for {down:.1} s; the last error: {})",
                    o.last_error
                ),
            ));
        }
        o.probing = true;
        Admit::Probe
    }

    /// A request spent its budget (or a probe failed) on `e`, whose last attempt took
    /// `took`: the source is down, the next probe after `took` more.
    /// `probe`: this was the probe (else a probe may still be running).
    fn failed(&self, now: Instant, took: Duration, e: &io::Error, probe: bool) {
        let mut state = self.lock();
        let was_open = state.is_some();
        let since = state.as_ref().map_or_else(SystemTime::now, |o| o.since);
        let probing = !probe && state.as_ref().is_some_and(|o| o.probing);
        *state = Some(Outage {
            since,
            probe_at: now + took,
            probing,
            last_error: e.to_string(),
            last_kind: e.kind(),
        });
        self.open.store(true, Relaxed);
        if !was_open {
            warn!("the source is down ({e}): requests fail at once until a probe succeeds");
            self.opened.notify_all();
        }
    }

    /// An attempt got an answer: the source is up.
    fn close(&self) {
        if !self.is_open() {
            return;
        }
        let mut state = self.lock();
        if let Some(o) = state.take() {
            let down = SystemTime::now()
                .duration_since(o.since)
                .unwrap_or_default()
                .as_secs_f64();
            log::info!("the source answers again after {down:.1} s down");
        }
        self.open.store(false, Relaxed);
    }
}

/// How long to keep trying, and the counters and log limiter shared by every request of one
/// source or store.
pub struct RetryPolicy {
    /// Longest single attempt.
    pub attempt_timeout: Duration,
    /// No attempt starts later than this after the first; zero: one attempt only.
    pub budget: Duration,
    /// Attempts that failed and were retried.
    retries: AtomicU64,
    /// Failed attempts are logged at most 10 per 10 s, then counted.
    log: Mutex<RateLimiter>,
    breaker: Breaker,
}

impl RetryPolicy {
    pub fn new(attempt_timeout: Duration, budget: Duration) -> Self {
        RetryPolicy {
            attempt_timeout,
            budget,
            retries: AtomicU64::new(0),
            log: Mutex::new(RateLimiter::new(
                crate::sys::ratelog::BURST,
                crate::sys::ratelog::WINDOW,
            )),
            breaker: Breaker::default(),
        }
    }

    /// `Some` while the source is known down (see the module documentation).
    pub fn outage(&self) -> Option<Outage> {
        if !self.breaker.is_open() {
            return None;
        }
        self.breaker.lock().clone()
    }

    /// Attempts that failed and were followed by another, since start.
    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    /// Runs `attempt` (given its timeout) until it succeeds, fails permanently, or the budget
    /// is spent; returns the last error. Errors name their request themselves (without
    /// secrets): they are logged as they are.
    pub fn run<T>(&self, attempt: impl FnMut(Duration) -> Result<T, Failure>) -> io::Result<T> {
        self.run_with(&SystemClock, attempt)
    }

    pub fn run_with<T>(
        &self,
        clock: &dyn Clock,
        mut attempt: impl FnMut(Duration) -> Result<T, Failure>,
    ) -> io::Result<T> {
        match self.breaker.admit(clock.now()) {
            Admit::Run => {}
            Admit::Probe => return self.probe(clock, attempt),
            Admit::Refuse(e) => return Err(e),
        }
        let start = clock.now();
        let deadline = start + self.budget;
        let mut rng = Jitter::seeded();
        let mut failed = 0u32;
        loop {
            let timeout = if self.budget.is_zero() {
                self.attempt_timeout
            } else {
                self.attempt_timeout
                    .min(deadline.saturating_duration_since(clock.now()))
            };
            let attempt_start = clock.now();
            let failure = match attempt(timeout) {
                Ok(v) => {
                    self.breaker.close();
                    return Ok(v);
                }
                Err(f) => f,
            };
            failed += 1;
            if !failure.transient {
                return Err(failure.error);
            }
            // The last wait is cut short so that the last attempt starts before the
            // deadline: a fetch fails after about the budget, whatever the jitter drew.
            let left = deadline.saturating_duration_since(clock.now());
            let wait = backoff(failed, failure.retry_after, &mut rng)
                .min(left.saturating_sub(MIN_ATTEMPT));
            if self.budget.is_zero() || left < MIN_ATTEMPT * 2 {
                // The whole budget went on transient failures: the source is down.
                let took = clock.now().saturating_duration_since(attempt_start);
                self.breaker
                    .failed(clock.now(), took, &failure.error, false);
                return Err(gave_up(
                    failure.error,
                    failed,
                    clock.now().saturating_duration_since(start),
                ));
            }
            self.retries.fetch_add(1, Relaxed);
            self.log_retry(clock, &failure.error, wait);
            clock.sleep_unless_open(wait, &self.breaker);
            if self.breaker.is_open() {
                // Another request found the source down: no more attempts for this one.
                return Err(gave_up(
                    failure.error,
                    failed,
                    clock.now().saturating_duration_since(start),
                ));
            }
        }
    }

    /// The one attempt of a probe while the source is down, with the usual attempt timeout
    /// (clamped to the budget).
    fn probe<T>(
        &self,
        clock: &dyn Clock,
        mut attempt: impl FnMut(Duration) -> Result<T, Failure>,
    ) -> io::Result<T> {
        let timeout = if self.budget.is_zero() {
            self.attempt_timeout
        } else {
            self.attempt_timeout.min(self.budget)
        };
        let start = clock.now();
        match attempt(timeout) {
            Ok(v) => {
                self.breaker.close();
                Ok(v)
            }
            // Answered: up, even if this request is refused (a 403, a changed image).
            Err(f) if !f.transient => {
                self.breaker.close();
                Err(f.error)
            }
            Err(f) => {
                let took = clock.now().saturating_duration_since(start);
                self.breaker.failed(clock.now(), took, &f.error, true);
                Err(f.error)
            }
        }
    }

    /// A warning per failed attempt, at most [`crate::sys::ratelog::BURST`] per window: an outage
    /// makes every fetcher fail every few seconds, which must not flood the log.
    fn log_retry(&self, clock: &dyn Clock, e: &io::Error, wait: Duration) {
        let verdict = self.log.lock().unwrap_or_else(|p| p.into_inner()).check(
            "retry",
            Level::Warn,
            clock.now(),
        );
        match verdict {
            Verdict::Pass { suppressed } => {
                if suppressed > 0 {
                    warn!("{suppressed} more failed attempts of remote requests not logged");
                }
                warn!("{e}; retrying in {} ms", wait.as_millis());
            }
            Verdict::StartSuppressing => {
                warn!("many remote requests are failing: logging the next failures only as a count")
            }
            Verdict::Drop => {}
        }
    }
}

/// The error of a request that gives up after `failed` attempts in `spent`.
fn gave_up(error: io::Error, failed: u32, spent: Duration) -> io::Error {
    if failed == 1 {
        return error;
    }
    io::Error::new(
        error.kind(),
        format!(
            "{error} (gave up after {failed} attempts in {:.1} s)",
            spent.as_secs_f64()
        ),
    )
}

/// The wait before attempt `failed + 1`: a uniform draw in [0, min(MAX_WAIT, FIRST_WAIT *
/// 2^(failed-1))] (full jitter spreads the fetchers' retries after an outage), but at least
/// the server's `Retry-After`, capped at [`MAX_WAIT`].
fn backoff(failed: u32, retry_after: Option<Duration>, rng: &mut Jitter) -> Duration {
    let ceiling = FIRST_WAIT
        .saturating_mul(1u32 << failed.saturating_sub(1).min(16))
        .min(MAX_WAIT);
    let drawn = ceiling.mul_f64(rng.unit());
    drawn.max(retry_after.unwrap_or(Duration::ZERO).min(MAX_WAIT))
}

/// xorshift64*: jitter needs spread between threads, not cryptographic randomness.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::thread::current().id().hash(&mut h);
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .hash(&mut h);
        // xorshift never leaves zero.
        Jitter(h.finish() | 1)
    }

    /// A number in [0, 1].
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Parses a `Retry-After` in seconds (the HTTP-date form is rare for these servers and is
/// ignored: the backoff applies).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Time that moves only when the policy sleeps or an attempt "takes" time.
    struct FakeClock {
        base: Instant,
        elapsed: RefCell<Duration>,
        sleeps: RefCell<Vec<Duration>>,
    }

    impl FakeClock {
        fn new() -> Self {
            FakeClock {
                base: Instant::now(),
                elapsed: RefCell::new(Duration::ZERO),
                sleeps: RefCell::default(),
            }
        }
        fn advance(&self, d: Duration) {
            *self.elapsed.borrow_mut() += d;
        }
        fn elapsed(&self) -> Duration {
            *self.elapsed.borrow()
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.base + *self.elapsed.borrow()
        }
        fn sleep(&self, d: Duration) {
            self.sleeps.borrow_mut().push(d);
            self.advance(d);
        }
    }

    fn err(msg: &str) -> io::Error {
        io::Error::other(msg.to_string())
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::from_secs(30));
        let mut n = 0;
        let r = p.run_with(&clock, |_| {
            n += 1;
            if n < 4 {
                Err(Failure::transient(err("reset")))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap(), 4);
        assert_eq!(p.retries(), 3);
        let sleeps = clock.sleeps.borrow();
        // Full jitter: each wait is at most the doubling ceiling.
        for (i, s) in sleeps.iter().enumerate() {
            assert!(*s <= FIRST_WAIT * (1 << i), "{i}: {s:?}");
        }
    }

    #[test]
    fn permanent_failures_end_at_once() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::from_secs(30));
        let mut n = 0;
        let r: io::Result<()> = p.run_with(&clock, |_| {
            n += 1;
            Err(Failure::permanent(err("403")))
        });
        assert_eq!(r.unwrap_err().to_string(), "403");
        assert_eq!((n, p.retries()), (1, 0));
        assert!(clock.sleeps.borrow().is_empty());
    }

    #[test]
    fn zero_budget_is_one_attempt_with_the_full_timeout() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::ZERO);
        let mut timeouts = vec![];
        let r: io::Result<()> = p.run_with(&clock, |t| {
            timeouts.push(t);
            Err(Failure::transient(err("refused")))
        });
        assert!(r.is_err());
        assert_eq!(timeouts, [Duration::from_secs(10)]);
        assert_eq!(p.retries(), 0);
    }

    /// An outage: every attempt times out; no attempt starts after the budget, each one's
    /// timeout fits in what is left, and the whole call ends within the budget.
    #[test]
    fn the_budget_bounds_the_total_time_and_each_attempt() {
        let clock = FakeClock::new();
        let budget = Duration::from_secs(30);
        let p = RetryPolicy::new(Duration::from_secs(10), budget);
        let mut starts = vec![];
        let r: io::Result<()> = p.run_with(&clock, |t| {
            starts.push((clock.elapsed(), t));
            assert!(
                clock.elapsed() + t <= budget,
                "{:?} + {t:?}",
                clock.elapsed()
            );
            clock.advance(t);
            Err(Failure::transient(err("timed out")))
        });
        let e = r.unwrap_err();
        assert!(e.to_string().contains("gave up after"), "{e}");
        assert!(clock.elapsed() <= budget, "{:?}", clock.elapsed());
        assert!(starts.len() >= 3, "{starts:?}");
        assert_eq!(p.retries() as usize, starts.len() - 1);
    }

    /// Fast failures (connection refused) are retried with growing waits, never more than
    /// MAX_WAIT apart, until the budget ends.
    #[test]
    fn fast_failures_back_off_up_to_the_cap() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::from_secs(60));
        let r: io::Result<()> = p.run_with(&clock, |_| Err(Failure::transient(err("refused"))));
        assert!(r.is_err());
        let sleeps = clock.sleeps.borrow();
        assert!(sleeps.iter().all(|s| *s <= MAX_WAIT), "{sleeps:?}");
        // ... and the budget is used: the last attempt starts just before its end.
        let elapsed = clock.elapsed();
        assert!(elapsed <= Duration::from_secs(60), "{elapsed:?}");
        assert!(elapsed >= Duration::from_secs(59), "{elapsed:?}");
        // 60 s of waits of at most 5 s each: at least 12 of them.
        assert!(sleeps.len() >= 12, "{}", sleeps.len());
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(10), Duration::from_secs(60));
        let mut n = 0;
        let r = p.run_with(&clock, |_| {
            n += 1;
            match n {
                1 => Err(Failure {
                    retry_after: Some(Duration::from_secs(3)),
                    ..Failure::transient(err("503 SlowDown"))
                }),
                2 => Err(Failure {
                    retry_after: Some(Duration::from_secs(3600)),
                    ..Failure::transient(err("429"))
                }),
                _ => Ok(()),
            }
        });
        assert!(r.is_ok());
        let sleeps = clock.sleeps.borrow();
        assert!(sleeps[0] >= Duration::from_secs(3), "{sleeps:?}");
        assert_eq!(sleeps[1], MAX_WAIT);
    }

    /// A request that spends its budget opens the breaker: the next ones fail without an
    /// attempt until the probe time (the last attempt's length later), then one makes a single
    /// attempt (a probe); a failed probe keeps it open, a successful one closes it.
    #[test]
    fn a_spent_budget_opens_the_breaker_and_a_probe_closes_it() {
        let clock = FakeClock::new();
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(3));
        let r: io::Result<()> = p.run_with(&clock, |t| {
            clock.advance(t);
            Err(Failure::transient(err("timed out")))
        });
        assert!(r.is_err());
        assert!(p.outage().is_some_and(|o| !o.probing));
        let mut attempts = 0;
        let r: io::Result<()> = p.run_with(&clock, |_| {
            attempts += 1;
            Ok(())
        });
        let e = r.unwrap_err();
        assert!(e.to_string().contains("not tried") && e.to_string().contains("timed out"));
        assert_eq!(attempts, 0);

        clock.advance(Duration::from_secs(1));
        let r: io::Result<()> = p.run_with(&clock, |_| {
            attempts += 1;
            clock.advance(Duration::from_millis(10));
            Err(Failure::transient(err("refused")))
        });
        assert_eq!(r.unwrap_err().to_string(), "refused");
        assert_eq!(attempts, 1, "a probe is one attempt");
        assert!(p.outage().is_some());

        clock.advance(Duration::from_millis(10));
        let r = p.run_with(&clock, |_| {
            attempts += 1;
            Ok(7)
        });
        assert_eq!((r.unwrap(), attempts), (7, 2));
        assert!(p.outage().is_none());
    }

    #[test]
    fn jitter_is_spread_and_in_range() {
        let mut j = Jitter::seeded();
        let draws: Vec<f64> = (0..1000).map(|_| j.unit()).collect();
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
