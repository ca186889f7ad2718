//! Rate limiting for log records a guest can trigger from dependencies.
//!
//! The rust-vmm crates (`virtio_queue`, `vhost_user_backend`, `vhost`, `vm_memory`) log through
//! the `log` crate, some of them once per poll of a queue a guest has corrupted (e.g. an avail
//! index too far ahead): a guest that keeps kicking would fill the host's disk with ERROR lines.
//! [`RateLimitedLogger`] wraps the real logger: records from those crates pass at most
//! [`BURST`] per [`WINDOW`] per crate and level; the first one over the limit is followed by a
//! line saying so, and the next record after the window by one "N messages suppressed" line.
//! Our own records (and every other crate's) pass unchanged; our own guest-triggerable
//! messages are once per connection at their source.
//!
//! It also caps the HTTP and TLS crates ([`CAPPED_TARGETS`]) at `debug`, whatever `RUST_LOG`
//! says: their `trace` records carry the bytes on the wire, and with `trace` enabled ureq's
//! `debug` records show each request's path and query and its Location headers in full, so
//! presigned URLs' signatures and `X-Amz-Security-Token` (we log URLs without their query).
//! With `trace` off for it, ureq writes the path as `/******` and only harmless headers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// The crates whose records are rate-limited (the first `::` segment of a record's target).
pub const LIMITED_TARGETS: [&str; 4] = ["virtio_queue", "vhost_user_backend", "vhost", "vm_memory"];

/// The crates whose `trace` records are never logged (nor reported enabled): the HTTP client
/// and its protocol and TLS layers, which log the bytes on the wire at that level, and whose
/// `debug` records hide request paths, queries and headers only while `trace` is off.
pub const CAPPED_TARGETS: [&str; 3] = ["ureq", "ureq_proto", "rustls"];

/// Whether a record at `level` with `target` is dropped whatever the filter says: `trace`
/// from one of [`CAPPED_TARGETS`].
pub fn is_capped(target: &str, level: Level) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    level > Level::Debug && CAPPED_TARGETS.contains(&krate)
}

/// Records passed per crate and level in one [`WINDOW`].
pub const BURST: u32 = 10;

/// The rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Whether records with `target` are rate-limited: their crate is one of [`LIMITED_TARGETS`].
pub fn is_limited(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    LIMITED_TARGETS.contains(&krate)
}

/// What to do with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` records of its key were dropped in the window before (report them
    /// first when non-zero).
    Pass { suppressed: u64 },
    /// The first record over the limit in this window: drop it and say suppression starts.
    StartSuppressing,
    /// Drop it.
    Drop,
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

/// Counts records per key (crate and level) in fixed windows; time is passed in, so tests can
/// drive it with a fake clock.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    slots: HashMap<(String, Level), Slot>,
}

impl RateLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimiter {
            burst,
            window,
            slots: HashMap::new(),
        }
    }

    /// The verdict for one record of crate `krate` at `level`, arriving at `now`.
    pub fn check(&mut self, krate: &str, level: Level, now: Instant) -> Verdict {
        let slot = match self.slots.get_mut(&(krate.to_string(), level)) {
            Some(slot) => slot,
            None => self
                .slots
                .entry((krate.to_string(), level))
                .or_insert(Slot {
                    start: now,
                    passed: 0,
                    suppressed: 0,
                }),
        };
        if now.saturating_duration_since(slot.start) >= self.window {
            let suppressed = slot.suppressed;
            *slot = Slot {
                start: now,
                passed: 1,
                suppressed: 0,
            };
            return Verdict::Pass { suppressed };
        }
        if slot.passed < self.burst {
            slot.passed += 1;
            return Verdict::Pass { suppressed: 0 };
        }
        slot.suppressed += 1;
        if slot.suppressed == 1 {
            Verdict::StartSuppressing
        } else {
            Verdict::Drop
        }
    }
}

/// A [`Log`] that rate-limits records from [`LIMITED_TARGETS`] and hands everything to `inner`.
pub struct RateLimitedLogger<L> {
    inner: L,
    limiter: Mutex<RateLimiter>,
    clock: fn() -> Instant,
}

impl<L: Log> RateLimitedLogger<L> {
    /// [`BURST`] records per [`WINDOW`], real time.
    pub fn new(inner: L) -> Self {
        Self::with_limits(inner, BURST, WINDOW, Instant::now)
    }

    pub fn with_limits(inner: L, burst: u32, window: Duration, clock: fn() -> Instant) -> Self {
        RateLimitedLogger {
            inner,
            limiter: Mutex::new(RateLimiter::new(burst, window)),
            clock,
        }
    }

    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: Log> Log for RateLimitedLogger<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        !is_capped(metadata.target(), metadata.level()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let target = record.target();
        if is_capped(target, record.level()) {
            return;
        }
        // Records the filter drops neither count nor pass.
        if !is_limited(target) || !self.inner.enabled(record.metadata()) {
            self.inner.log(record);
            return;
        }
        let krate = target.split("::").next().unwrap_or(target);
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(krate, record.level(), (self.clock)());
        match verdict {
            Verdict::Pass { suppressed } => {
                if suppressed > 0 {
                    self.inner.log(
                        &Record::builder()
                            .args(format_args!(
                                "{suppressed} {} messages from {krate} suppressed",
                                record.level()
                            ))
                            .level(record.level())
                            .target(target)
                            .build(),
                    );
                }
                self.inner.log(record);
            }
            Verdict::StartSuppressing => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "more than {} {} messages from {krate} in {:?}: suppressing the rest \
                         of this window",
                        self.limiter_burst(),
                        record.level(),
                        self.limiter_window(),
                    ))
                    .level(record.level())
                    .target(target)
                    .build(),
            ),
            Verdict::Drop => {}
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

impl<L> RateLimitedLogger<L> {
    fn limiter_burst(&self) -> u32 {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner()).burst
    }

    fn limiter_window(&self) -> Duration {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    fn t(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn limiter_passes_a_burst_then_drops_then_reports() {
        let base = Instant::now();
        let mut rl = RateLimiter::new(10, Duration::from_secs(10));
        for i in 0..10 {
            assert_eq!(
                rl.check("virtio_queue", Level::Error, t(base, i)),
                Verdict::Pass { suppressed: 0 }
            );
        }
        assert_eq!(
            rl.check("virtio_queue", Level::Error, t(base, 10)),
            Verdict::StartSuppressing
        );
        for i in 0..999 {
            assert_eq!(
                rl.check("virtio_queue", Level::Error, t(base, 11 + i)),
                Verdict::Drop
            );
        }
        // Other keys are counted apart.
        assert_eq!(
            rl.check("virtio_queue", Level::Warn, t(base, 5000)),
            Verdict::Pass { suppressed: 0 }
        );
        assert_eq!(
            rl.check("vhost", Level::Error, t(base, 5000)),
            Verdict::Pass { suppressed: 0 }
        );
        // A new window: the count of what was dropped comes with the first record.
        assert_eq!(
            rl.check("virtio_queue", Level::Error, t(base, 10_000)),
            Verdict::Pass { suppressed: 1000 }
        );
        assert_eq!(
            rl.check("virtio_queue", Level::Error, t(base, 10_001)),
            Verdict::Pass { suppressed: 0 }
        );
    }

    #[test]
    fn targets() {
        for t in [
            "virtio_queue",
            "virtio_queue::queue",
            "vhost_user_backend::event_loop",
            "vhost::vhost_user::connection",
            "vm_memory::mmap",
        ] {
            assert!(is_limited(t), "{t}");
        }
        for t in [
            "ubiblk",
            "ubiblk::vhost",
            "vhost_backend",
            "vhostx",
            "virtio_queue_x",
        ] {
            assert!(!is_limited(t), "{t}");
        }
    }

    /// Collects the text of every record it gets.
    #[derive(Default)]
    struct Sink(Mutex<Vec<(String, String)>>);

    impl Log for Sink {
        fn enabled(&self, m: &Metadata) -> bool {
            m.level() <= Level::Info
        }
        fn log(&self, r: &Record) {
            // As env_logger's: what the filter refuses is not written.
            if !self.enabled(r.metadata()) {
                return;
            }
            self.0
                .lock()
                .unwrap()
                .push((r.target().to_string(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    /// A fake clock: milliseconds after a fixed base, advanced by the test.
    static FAKE_MS: AtomicU64 = AtomicU64::new(0);
    fn fake_now() -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_millis(FAKE_MS.load(Ordering::SeqCst))
    }

    fn emit(logger: &dyn Log, target: &str, level: Level, text: &str) {
        logger.log(
            &Record::builder()
                .args(format_args!("{text}"))
                .level(level)
                .target(target)
                .build(),
        );
    }

    /// A flood from the rust-vmm crates (as a guest with a corrupt avail index causes) is
    /// bounded; our own records and filtered-out records are untouched.
    #[test]
    fn logger_bounds_a_dependency_flood() {
        let logger =
            RateLimitedLogger::with_limits(Sink::default(), 10, Duration::from_secs(10), fake_now);
        for i in 0..100_000u64 {
            FAKE_MS.store(i / 20, Ordering::SeqCst); // 100,000 records over 5 s
            emit(
                &logger,
                "virtio_queue::queue",
                Level::Error,
                "avail index too far ahead",
            );
            emit(&logger, "vhost_user_backend::event_loop", Level::Error, "x");
            emit(&logger, "vm_memory::mmap", Level::Debug, "filtered");
        }
        for _ in 0..50 {
            emit(&logger, "ubiblk::vhost", Level::Warn, "ours");
        }
        let lines = logger.inner().0.lock().unwrap().clone();
        let count = |t: &str| {
            lines
                .iter()
                .filter(|(target, _)| target.starts_with(t))
                .count()
        };
        assert_eq!(count("virtio_queue"), 11, "{lines:?}");
        assert_eq!(count("vhost_user_backend"), 11);
        assert_eq!(count("vm_memory"), 0);
        assert_eq!(count("ubiblk"), 50);
        assert!(
            lines[lines.len() - 51].1.contains("suppressing"),
            "{lines:?}"
        );

        // After the window, the next record comes with the count of the dropped ones.
        FAKE_MS.store(20_000, Ordering::SeqCst);
        emit(&logger, "virtio_queue::queue", Level::Error, "again");
        let lines = logger.inner().0.lock().unwrap().clone();
        let n = lines.len();
        assert_eq!(
            lines[n - 2].1,
            format!(
                "{} ERROR messages from virtio_queue suppressed",
                100_000 - 10
            )
        );
        assert_eq!(lines[n - 1].1, "again");
    }

    /// Takes every record (an inner logger at `RUST_LOG=trace`).
    #[derive(Default)]
    struct TraceSink(Mutex<Vec<String>>);

    impl Log for TraceSink {
        fn enabled(&self, _: &Metadata) -> bool {
            true
        }
        fn log(&self, r: &Record) {
            let line = format!("{} {}: {}", r.level(), r.target(), r.args());
            self.0.lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }

    /// At `RUST_LOG=trace` the HTTP and TLS crates' trace records (the bytes on the wire, a
    /// presigned URL's token and signature among them) are dropped and reported disabled
    /// (ureq's debug records show paths and queries only when trace is enabled for it);
    /// their other records and every other crate's records at any level pass.
    #[test]
    fn http_and_tls_crates_are_capped_at_debug() {
        let logger = RateLimitedLogger::new(TraceSink::default());
        let wire = "GET /b/k?X-Amz-Security-Token=TOKEN&X-Amz-Signature=SIG HTTP/1.1";
        for target in [
            "ureq::util",
            "ureq_proto::util",
            "rustls::client::hs",
            "ureq",
        ] {
            let m = Metadata::builder()
                .target(target)
                .level(Level::Trace)
                .build();
            assert!(!logger.enabled(&m), "{target}");
            emit(&logger, target, Level::Trace, wire);
            let m = Metadata::builder()
                .target(target)
                .level(Level::Debug)
                .build();
            assert!(logger.enabled(&m), "{target}");
        }
        emit(&logger, "ureq::run", Level::Debug, "GET http://h/******");
        emit(&logger, "rustls::common_state", Level::Info, "rustls info");
        emit(
            &logger,
            "ubiblk::remote::http",
            Level::Trace,
            "ours at trace",
        );
        emit(&logger, "ureq_x", Level::Trace, "another crate");
        let lines = logger.inner().0.lock().unwrap().clone();
        assert!(!lines.iter().any(|l| l.contains("TOKEN")), "{lines:?}");
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(is_capped("ureq_proto::client", Level::Trace));
        assert!(!is_capped("ureq_proto::client", Level::Debug));
        assert!(!is_capped("ubiblk", Level::Trace));
    }
}
