//! The QoS layer: per-disk IOPS and bandwidth limits (`qos:`, the control socket's `set-qos`),
//! with QEMU's throttling model and names (QEMU's docs/throttle.txt).
//!
//! Each limit is a leaky bucket: requests pour their cost in (1 per request for `iops_*`, their
//! bytes for `bps_*`), it leaks at the rate (`avg`). A request may go down while every bucket
//! it counts in holds no more than its size, and then adds its cost, whatever its size: a
//! request larger than the bucket still passes, and the ones after it wait for the leak. The
//! size is `avg / 10` (a tenth of a second at the rate) without a burst, `max * max_length`
//! with one; with `max_length > 1` a second bucket of size `max / 10` leaking at `max` keeps
//! the burst itself at the `max` rate. So `iops_total: 1000, iops_total_max: 5000,
//! iops_total_max_length: 1` lets 5000 requests through at once and then 1000 a second.
//!
//! What counts: READ and WRITE requests (`iops_read`/`bps_read`, `iops_write`/`bps_write`, and
//! both in `*_total`), as in QEMU; FLUSH, DISCARD and WRITE_ZEROES move no guest data and
//! pass at once.
//!
//! Requests over the limit wait in the channel (the guest sees latency, never an error), in
//! their order, reads and writes each in their own queue (a write limit does not hold reads
//! back). One set of buckets serves every queue of the disk ([`Qos`], behind a mutex taken once
//! per `submit` while something is limited). A channel holding requests asks the device's timer
//! thread to signal its notifier when the first of them may go, so the worker sleeps on its
//! eventfd as for any completion and releases them on its next `submit`.
//!
//! Without limits, `add` costs one relaxed atomic load before passing the request down.

pub mod limits;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{BlockDevice, Completion, IoChannel, IoOp, Notifier};
use limits::{QosInvalid, QosKind, QosLimits};

const NS: u128 = 1_000_000_000;

/// Held requests are released at most this often per channel: one wake-up lets the requests
/// of a millisecond through at once (the rate is the same; only the wake-ups are fewer).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One leaky bucket (QEMU's `LeakyBucket`). Levels are in billionths of a unit, so a
/// nanosecond's leak is exactly `avg` of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    /// Units per second; 0: no limit.
    avg: u64,
    /// Burst rate; 0: none.
    max: u64,
    /// Seconds the burst may last (at least 1).
    length: u64,
    level: u128,
    /// With `length > 1`: the burst's own bucket, leaking at `max`.
    burst_level: u128,
}

impl Bucket {
    fn new(avg: Option<u64>, max: Option<u64>, length: Option<u64>) -> Self {
        let avg = avg.unwrap_or(0);
        Bucket {
            avg,
            max: if avg == 0 { 0 } else { max.unwrap_or(0) },
            length: length.unwrap_or(1).max(1),
            level: 0,
            burst_level: 0,
        }
    }

    /// What may be in the bucket before requests wait, and the same for the burst bucket.
    fn sizes(&self) -> (u128, u128) {
        if self.max == 0 {
            (u128::from(self.avg) * NS / 10, 0)
        } else {
            (
                // Validated limits stay far below u128; saturate rather than trust that.
                u128::from(self.max)
                    .saturating_mul(u128::from(self.length))
                    .saturating_mul(NS),
                u128::from(self.max) * NS / 10,
            )
        }
    }

    fn leak(&mut self, ns: u64) {
        if self.avg == 0 {
            return;
        }
        self.level = self
            .level
            .saturating_sub(u128::from(self.avg) * u128::from(ns));
        if self.length > 1 {
            self.burst_level = self
                .burst_level
                .saturating_sub(u128::from(self.max) * u128::from(ns));
        }
    }

    /// Nanoseconds until a request may pass; 0: now.
    fn wait(&self) -> u64 {
        if self.avg == 0 {
            return 0;
        }
        let (size, burst_size) = self.sizes();
        let ns = if self.level > size {
            (self.level - size).div_ceil(u128::from(self.avg))
        } else if self.length > 1 && self.burst_level > burst_size {
            (self.burst_level - burst_size).div_ceil(u128::from(self.max))
        } else {
            0
        };
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn account(&mut self, units: u64) {
        if self.avg == 0 {
            return;
        }
        let cost = u128::from(units) * NS;
        self.level = self.level.saturating_add(cost);
        if self.length > 1 {
            self.burst_level = self.burst_level.saturating_add(cost);
        }
    }
}

/// The six buckets of one disk on a clock of nanoseconds.
#[derive(Clone, Debug)]
struct Buckets {
    b: [Bucket; 6],
    /// When the levels were last leaked.
    now: u64,
}

fn index(kind: QosKind) -> usize {
    QosKind::ALL.iter().position(|&k| k == kind).unwrap_or(0)
}

/// The buckets a request counts in: (bucket, is it counted in bytes).
fn counted(write: bool) -> [(usize, bool); 4] {
    let (bps, iops) = if write {
        (QosKind::BpsWrite, QosKind::IopsWrite)
    } else {
        (QosKind::BpsRead, QosKind::IopsRead)
    };
    [
        (index(QosKind::BpsTotal), true),
        (index(bps), true),
        (index(QosKind::IopsTotal), false),
        (index(iops), false),
    ]
}

impl Buckets {
    /// `limits` must be valid (see [`QosLimits::validate`]).
    fn new(limits: &QosLimits, now: u64) -> Self {
        let limits = limits.normalized();
        Buckets {
            b: QosKind::ALL.map(|k| {
                let g = limits.group(k);
                Bucket::new(g.avg, g.max, g.max_length)
            }),
            now,
        }
    }

    fn advance(&mut self, now: u64) {
        let dt = now.saturating_sub(self.now);
        for b in &mut self.b {
            b.leak(dt);
        }
        self.now = self.now.max(now);
    }

    /// Lets a request of `bytes` through at `now` (and counts it), or says how many
    /// nanoseconds it must still wait.
    fn admit(&mut self, now: u64, write: bool, bytes: u64) -> Result<(), u64> {
        self.advance(now);
        let wait = counted(write)
            .iter()
            .map(|&(i, _)| self.b[i].wait())
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Err(wait);
        }
        for (i, is_bytes) in counted(write) {
            self.b[i].account(if is_bytes { bytes } else { 1 });
        }
        Ok(())
    }

    /// New limits at `now`. A bucket that stays limited stays as full, relative to its size
    /// (at most full): a change takes effect at once (a level far above a smaller new size
    /// would hold requests back for longer than the new rate says) and grants no burst (QEMU
    /// empties the buckets, so every change would). A newly limited bucket starts empty.
    fn reconfigure(&mut self, limits: &QosLimits, now: u64) {
        self.advance(now);
        let mut next = Buckets::new(limits, self.now);
        for (new, old) in next.b.iter_mut().zip(&self.b) {
            if old.avg == 0 || new.avg == 0 {
                continue;
            }
            let (size, burst_size) = new.sizes();
            let (old_size, old_burst_size) = old.sizes();
            let scale = |level: u128, old: u128, new: u128| {
                if old == 0 {
                    return 0;
                }
                let full = (level as f64 / old as f64).min(1.0);
                (new as f64 * full) as u128
            };
            new.level = scale(old.level, old_size, size);
            new.burst_level = scale(old.burst_level, old_burst_size, burst_size);
        }
        *self = next;
    }
}

/// The limits of one disk, shared by its queues and the control socket.
pub struct Qos {
    /// Whether any limit is set: the only thing an unlimited disk's requests look at.
    active: AtomicBool,
    state: Mutex<State>,
    epoch: Instant,
    timer: Arc<Timer>,
}

struct State {
    limits: QosLimits,
    buckets: Buckets,
}

impl Qos {
    /// The limits `limits` (valid: see [`QosLimits::validate`]), and the timer thread that
    /// wakes queues holding requests.
    pub fn new(limits: QosLimits) -> io::Result<Arc<Qos>> {
        let limits = limits.normalized();
        let timer = Arc::new(Timer::default());
        let t = timer.clone();
        std::thread::Builder::new()
            .name("qos-timer".into())
            .spawn(move || t.run())?;
        Ok(Arc::new(Qos {
            active: AtomicBool::new(!limits.is_unlimited()),
            state: Mutex::new(State {
                limits,
                buckets: Buckets::new(&limits, 0),
            }),
            epoch: Instant::now(),
            timer,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nanoseconds since the epoch.
    fn clock(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The limits in force (0 written as `None`).
    pub fn limits(&self) -> QosLimits {
        self.lock().limits
    }

    /// Replaces every limit with `limits` (fields left out: no limit) if they are valid, and
    /// lets every queue look at its held requests again at once. Returns the limits now in
    /// force.
    pub fn set(&self, limits: QosLimits) -> Result<QosLimits, QosInvalid> {
        limits.validate()?;
        let limits = limits.normalized();
        {
            let mut st = self.lock();
            let now = self.clock(Instant::now());
            st.buckets.reconfigure(&limits, now);
            st.limits = limits;
            self.active.store(!limits.is_unlimited(), Ordering::Relaxed);
        }
        self.timer.wake_all();
        Ok(limits)
    }
}

impl Drop for Qos {
    fn drop(&mut self) {
        self.timer.stop();
    }
}

/// Wakes channels holding requests when their first one may go.
#[derive(Default)]
struct Timer {
    state: Mutex<TimerState>,
    cond: Condvar,
}

#[derive(Default)]
struct TimerState {
    /// Channel, when to wake it, its notifier.
    waiting: Vec<(u64, Instant, Notifier)>,
    next_channel: u64,
    stop: bool,
}

impl Timer {
    fn lock(&self) -> MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_channel(&self) -> u64 {
        let mut st = self.lock();
        st.next_channel += 1;
        st.next_channel
    }

    /// Signals `notifier` at `at` (replacing channel `id`'s earlier request).
    fn wake_at(&self, id: u64, at: Instant, notifier: &Notifier) {
        let mut st = self.lock();
        match st.waiting.iter_mut().find(|w| w.0 == id) {
            Some(w) if w.1 <= at => return,
            Some(w) => w.1 = at,
            None => st.waiting.push((id, at, notifier.clone())),
        }
        drop(st);
        self.cond.notify_one();
    }

    /// Signals every waiting channel now.
    fn wake_all(&self) {
        for (_, _, n) in self.lock().waiting.drain(..) {
            n.notify();
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.cond.notify_one();
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let now = Instant::now();
            st.waiting.retain(|(_, at, n)| {
                let due = *at <= now;
                if due {
                    n.notify();
                }
                !due
            });
            st = match st.waiting.iter().map(|w| w.1).min() {
                None => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(at) => {
                    self.cond
                        .wait_timeout(st, at - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// The limits over another device: outermost in the stack (see src/stack.rs).
pub struct QosDevice {
    inner: Arc<dyn BlockDevice>,
    qos: Arc<Qos>,
}

impl QosDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, qos: Arc<Qos>) -> Self {
        QosDevice { inner, qos }
    }

    pub fn qos(&self) -> &Arc<Qos> {
        &self.qos
    }
}

impl BlockDevice for QosDevice {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }

    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
        let below = self.inner.new_channel_with(notifier)?;
        Ok(Box::new(QosChannel {
            id: self.qos.timer.new_channel(),
            qos: self.qos.clone(),
            below,
            held: [VecDeque::new(), VecDeque::new()],
            first: 0,
        }))
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn iovec_align(&self) -> Option<usize> {
        // Requests pass through untouched.
        self.inner.iovec_align()
    }
}

struct Held {
    id: u64,
    op: IoOp,
    bytes: u64,
}

struct QosChannel {
    /// This channel's name for the timer.
    id: u64,
    qos: Arc<Qos>,
    below: Box<dyn IoChannel>,
    /// Reads and writes waiting for the limits, each in arrival order.
    held: [VecDeque<Held>; 2],
    /// Which queue goes first at the next release (they take turns).
    first: usize,
}

/// Whether `op` counts toward the limits: `Some((is_write, bytes))`.
fn cost(op: &IoOp) -> Option<(bool, u64)> {
    match op {
        IoOp::Read { buf, .. } => Some((false, buf.len() as u64)),
        IoOp::ReadVec { iov, .. } => Some((false, iov.len() as u64)),
        IoOp::Write { buf, .. } => Some((true, buf.len() as u64)),
        IoOp::WriteVec { iov, .. } => Some((true, iov.len() as u64)),
        IoOp::Flush | IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => None,
    }
}

impl QosChannel {
    fn held(&self) -> usize {
        self.held[0].len() + self.held[1].len()
    }

    /// Sends down the held requests the buckets let through; if some still wait, asks the
    /// timer for a wake-up when the first may go.
    fn release(&mut self) {
        let now = Instant::now();
        let mut wait = u64::MAX;
        {
            let mut st = self.qos.lock();
            let clock = self.qos.clock(now);
            for q in [self.first, 1 - self.first] {
                while let Some(h) = self.held[q].front() {
                    match st.buckets.admit(clock, q == 1, h.bytes) {
                        Ok(()) => {
                            if let Some(h) = self.held[q].pop_front() {
                                self.below.add(h.id, h.op);
                            }
                        }
                        Err(ns) => {
                            wait = wait.min(ns);
                            break;
                        }
                    }
                }
            }
        }
        self.first = 1 - self.first;
        if self.held() == 0 {
            return;
        }
        let wait = Duration::from_nanos(wait).max(MIN_WAIT);
        let notifier = self.below.notifier().clone();
        self.qos.timer.wake_at(self.id, now + wait, &notifier);
    }

    /// Sends every held request down now, counting them in the buckets.
    fn release_all(&mut self) {
        let mut st = self.qos.lock();
        let clock = self.qos.clock(Instant::now());
        st.buckets.advance(clock);
        for (q, held) in self.held.iter_mut().enumerate() {
            for h in held.drain(..) {
                for (i, is_bytes) in counted(q == 1) {
                    st.buckets.b[i].account(if is_bytes { h.bytes } else { 1 });
                }
                self.below.add(h.id, h.op);
            }
        }
    }
}

impl IoChannel for QosChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        if !self.qos.active.load(Ordering::Relaxed) && self.held() == 0 {
            return self.below.add(id, op);
        }
        match cost(&op) {
            // Checked against the buckets at the next submit, all at once.
            Some((write, bytes)) => self.held[usize::from(write)].push_back(Held { id, op, bytes }),
            None => self.below.add(id, op),
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.held() > 0 {
            self.release();
        }
        self.below.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        self.below.poll(out)
    }

    /// Only the drain path waits (GET_VRING_BASE, shutdown; the queue loop sleeps on the
    /// notifier): like QEMU, which lifts throttling while a disk drains, held requests go down
    /// at once (still counted in the buckets), so a stopping VMM never waits for the limits.
    fn wait(&mut self) -> io::Result<()> {
        if self.held() > 0 {
            self.release_all();
            self.below.submit()?;
        }
        self.below.wait()
    }

    fn in_flight(&self) -> usize {
        self.below.in_flight() + self.held()
    }

    fn notifier(&self) -> &Notifier {
        self.below.notifier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing::{finish_all, MemDevice};
    use crate::block::IoBuf;

    const MS: u64 = 1_000_000;

    const SEC: u64 = 1_000_000_000;

    fn limits(json: &str) -> QosLimits {
        let l: QosLimits = serde_json::from_str(json).unwrap();
        l.validate().unwrap();
        l
    }

    /// Requests of `bytes` offered back to back from `from` for `ns`, each as soon as the
    /// buckets allow: how many went, and when the clock stopped.
    fn drive(b: &mut Buckets, from: u64, ns: u64, write: bool, bytes: u64) -> (u64, u64) {
        let (mut t, mut n) = (from, 0);
        while t < from + ns {
            match b.admit(t, write, bytes) {
                Ok(()) => n += 1,
                Err(w) => t += w,
            }
        }
        (n, t)
    }

    #[test]
    fn iops_rate_with_a_tenth_of_a_second_of_burst() {
        let mut b = Buckets::new(&limits(r#"{"iops_total":5000}"#), 0);
        // avg/10 = 500 at once (and the one that fills the bucket past its size).
        let (n, _) = drive(&mut b, 0, 1, false, 4096);
        assert_eq!(n, 501);
        // Then 5000 a second.
        let (n, t) = drive(&mut b, 1, 10 * SEC, false, 4096);
        assert!((49_999..=50_001).contains(&n), "{n}");
        // The loop stopped where one more may go; after it, the wait is the time to leak one.
        assert_eq!(b.admit(t, true, 4096), Ok(()));
        let w = b.admit(t, true, 4096).unwrap_err();
        assert!(w <= SEC / 5000, "{w}");
    }

    #[test]
    fn bandwidth_counts_bytes_and_directions_separately() {
        let l = limits(r#"{"bps_read":52428800,"iops_write":100}"#);
        let mut b = Buckets::new(&l, 0);
        let (reads, t) = drive(&mut b, 0, 10 * SEC, false, 65536);
        // 50 MiB/s of 64 KiB reads: 800 a second, plus the first tenth of a second.
        assert!((8_080..=8_082).contains(&reads), "{reads}");
        // Writes have their own limit and their own bucket.
        let (writes, _) = drive(&mut b, t, 10 * SEC, true, 65536);
        assert!((1_010..=1_012).contains(&writes), "{writes}");
    }

    #[test]
    fn a_burst_lets_max_times_length_through_then_the_rate() {
        let l = limits(r#"{"iops_total":1000,"iops_total_max":5000,"iops_total_max_length":1}"#);
        let mut b = Buckets::new(&l, 0);
        let (n, _) = drive(&mut b, 0, 1, false, 512);
        assert_eq!(n, 5001);
        let (n, _) = drive(&mut b, 1, 10 * SEC, false, 512);
        assert!((9_999..=10_001).contains(&n), "{n}");
        // After a quiet spell the burst is back.
        let (n, _) = drive(&mut b, 30 * SEC, 1, false, 512);
        assert_eq!(n, 5001);
    }

    #[test]
    fn a_long_burst_runs_at_max_for_its_length() {
        let l = limits(r#"{"iops_read":100,"iops_read_max":1000,"iops_read_max_length":5}"#);
        let mut b = Buckets::new(&l, 0);
        // 5 s at ~1000/s (the main bucket fills at 900/s net: 5000 takes ~5.5 s), then 100/s.
        let (n, t) = drive(&mut b, 0, 5 * SEC, false, 512);
        assert!((5_000..=5_101).contains(&n), "{n}");
        let (n, t) = drive(&mut b, t, SEC, false, 512);
        assert!(n <= 600, "{n}");
        let (_, t) = drive(&mut b, t, 2 * SEC, false, 512);
        let (n, _) = drive(&mut b, t, 10 * SEC, false, 512);
        assert!((999..=1_001).contains(&n), "{n}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_and_the_next_waits_longer() {
        let mut b = Buckets::new(&limits(r#"{"bps_total":1048576}"#), 0);
        // 8 MiB into a 100 KiB bucket: it goes at once.
        assert_eq!(b.admit(0, true, 8 << 20), Ok(()));
        // The next waits until the 8 MiB leaked down to the bucket's size: ~7.9 s.
        let w = b.admit(0, false, 512).unwrap_err();
        assert!((7_800 * MS..=8_000 * MS).contains(&w), "{w}");
        assert_eq!(b.admit(w, false, 512), Ok(()));
    }

    #[test]
    fn a_live_change_takes_effect_at_once_and_grants_no_burst() {
        let mut b = Buckets::new(&limits(r#"{"iops_total":10}"#), 0);
        let (_, t) = drive(&mut b, 0, SEC, false, 512);
        assert_eq!(b.admit(t, false, 512), Ok(()));
        assert!(b.admit(t, false, 512).is_err());
        // Higher: the bucket is as full as before; the rate is the new one.
        b.reconfigure(&limits(r#"{"iops_total":10000}"#), t);
        let (n, t) = drive(&mut b, t, SEC, false, 512);
        assert!((10_000..=10_002).contains(&n), "{n}");
        // Lower: nothing waits for the old level; the next second gives the new rate.
        b.reconfigure(&limits(r#"{"iops_total":100}"#), t);
        assert_eq!(b.admit(t, false, 512), Ok(()));
        let w = b.admit(t, false, 512).unwrap_err();
        assert!(w <= SEC / 100, "{w}");
        let (n, t) = drive(&mut b, t, SEC, false, 512);
        assert!((99..=101).contains(&n), "{n}");
        // A newly limited bucket starts empty (a tenth of a second at once).
        b.reconfigure(&limits(r#"{"bps_read":1000000}"#), t);
        let (n, _) = drive(&mut b, t, 1, false, 10_000);
        assert_eq!(n, 11);
        // Unlimited.
        b.reconfigure(&QosLimits::default(), t);
        assert_eq!(b.admit(t, false, 512), Ok(()));
    }

    fn read(sector: u64) -> IoOp {
        IoOp::Read {
            sector,
            buf: IoBuf::new(4096),
        }
    }

    fn write(sector: u64) -> IoOp {
        IoOp::Write {
            sector,
            buf: IoBuf::new(4096),
        }
    }

    #[test]
    fn held_requests_wait_in_order_without_spinning_and_writes_do_not_hold_reads() {
        let mem = MemDevice::new(1 << 14);
        let qos = Qos::new(limits(r#"{"iops_write":100}"#)).unwrap();
        let dev = QosDevice::new(Arc::new(mem.clone()), qos.clone());
        let mut ch = dev.new_channel().unwrap();
        // 10 burst writes go at once, the rest at 100 a second.
        for i in 0..40 {
            ch.add(i, write(i * 8));
        }
        for i in 0..20 {
            ch.add(100 + i, read(i * 8));
        }
        let t0 = Instant::now();
        ch.submit().unwrap();
        let mut done = Vec::new();
        let notifier = ch.notifier().clone();
        let cpu0 = crate::block::testing::thread_cpu();
        let mut reads_done = None;
        while done.len() < 60 {
            assert!(notifier.wait(Duration::from_secs(5)), "no wake-up");
            notifier.ack();
            ch.submit().unwrap();
            ch.poll(&mut done);
            if reads_done.is_none() && done.iter().filter(|c| c.id >= 100).count() == 20 {
                reads_done = Some(t0.elapsed());
            }
        }
        // The reads were not held behind the writes.
        assert!(
            reads_done.unwrap() < Duration::from_millis(150),
            "{reads_done:?}"
        );
        let took = t0.elapsed();
        let cpu = crate::block::testing::thread_cpu() - cpu0;
        // 29 writes after the first 11 take ~290 ms.
        assert!(took >= Duration::from_millis(270), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(cpu < took / 10, "{cpu:?} of CPU in {took:?}");
        assert!(done.iter().all(|c| c.result == Ok(())));
        let writes: Vec<u64> = done.iter().map(|c| c.id).filter(|&id| id < 100).collect();
        assert_eq!(writes, (0..40).collect::<Vec<_>>());
        assert_eq!(ch.in_flight(), 0);
    }

    /// Polls `ch` whenever its notifier says so until `n` operations are done; panics if
    /// that takes `limit`.
    fn collect(ch: &mut dyn IoChannel, n: usize, limit: Duration) -> Vec<Completion> {
        let t0 = Instant::now();
        let notifier = ch.notifier().clone();
        let mut done = Vec::new();
        loop {
            ch.submit().unwrap();
            ch.poll(&mut done);
            if done.len() >= n {
                return done;
            }
            let left = limit.saturating_sub(t0.elapsed());
            assert!(
                notifier.wait(left),
                "{} of {n} done in {limit:?}",
                done.len()
            );
            notifier.ack();
        }
    }

    #[test]
    fn set_releases_held_requests_at_once_and_draining_does_not_wait() {
        let mem = MemDevice::new(1 << 14);
        let qos = Qos::new(limits(r#"{"iops_total":1}"#)).unwrap();
        let dev = QosDevice::new(Arc::new(mem), qos.clone());
        let mut ch = dev.new_channel().unwrap();
        for i in 0..5 {
            ch.add(i, read(i));
        }
        // One goes; at one a second, the last would be 4 s away.
        let first = collect(ch.as_mut(), 1, Duration::from_secs(5));
        assert_eq!(ch.in_flight(), 4);
        let t0 = Instant::now();
        let set = qos.set(limits(r#"{"iops_total":0,"bps_read":1000000}"#));
        assert_eq!(set.unwrap().iops_total, None);
        let rest = collect(ch.as_mut(), 4, Duration::from_secs(5));
        assert_eq!(first.len() + rest.len(), 5);
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(qos.limits().bps_read, Some(1_000_000));
        // Invalid limits change nothing.
        let e = qos.set(QosLimits {
            bps_read_max: Some(10),
            ..qos.limits()
        });
        assert_eq!(e.unwrap_err().field, "bps_read_max");
        assert_eq!(qos.limits().bps_read_max, None);

        // Draining (wait) lets held requests go at once, and counts them.
        qos.set(limits(r#"{"iops_total":1}"#)).unwrap();
        for i in 0..5 {
            ch.add(10 + i, read(i));
        }
        let t0 = Instant::now();
        assert_eq!(finish_all(ch.as_mut()).len(), 5);
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        // ... so the next one waits for them.
        ch.add(20, read(0));
        let (t0, mut done) = (Instant::now(), Vec::new());
        while t0.elapsed() < Duration::from_millis(300) {
            ch.submit().unwrap();
            ch.poll(&mut done);
            ch.notifier().wait(Duration::from_millis(50));
            ch.notifier().ack();
        }
        assert!(done.is_empty());
        assert_eq!(ch.in_flight(), 1);
    }

    /// Finishes everything at the next poll, doing nothing: what is left is the layers' cost.
    struct Null;
    struct NullChannel(Vec<Completion>, Notifier);

    impl BlockDevice for Null {
        fn sectors(&self) -> u64 {
            1 << 20
        }
        fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
            Ok(Box::new(NullChannel(Vec::new(), notifier)))
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    impl IoChannel for NullChannel {
        fn add(&mut self, id: u64, op: IoOp) {
            let buf = match op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                _ => None,
            };
            self.0.push(Completion {
                id,
                result: Ok(()),
                buf,
            });
        }
        fn submit(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn poll(&mut self, out: &mut Vec<Completion>) {
            out.append(&mut self.0);
        }
        fn wait(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn in_flight(&self) -> usize {
            self.0.len()
        }
        fn notifier(&self) -> &Notifier {
            &self.1
        }
    }

    /// ns per request of 32 reads added, submitted and polled at a time on `ch`.
    fn ns_per_request(ch: &mut dyn IoChannel, rounds: usize) -> f64 {
        let mut bufs: Vec<IoBuf> = (0..32).map(|_| IoBuf::new(4096)).collect();
        let mut done = Vec::with_capacity(32);
        let t0 = Instant::now();
        for _ in 0..rounds {
            for (i, buf) in bufs.drain(..).enumerate() {
                ch.add(i as u64, IoOp::Read { sector: 8, buf });
            }
            ch.submit().unwrap();
            ch.poll(&mut done);
            bufs.extend(done.drain(..).filter_map(|c| c.buf));
        }
        t0.elapsed().as_nanos() as f64 / (rounds * 32) as f64
    }

    /// The unlimited layer's cost per request over a device that does nothing (run with
    /// `cargo test --release --lib -- --ignored --nocapture unlimited_cost`).
    #[test]
    #[ignore]
    fn unlimited_cost() {
        let qos = Qos::new(QosLimits::default()).unwrap();
        let layered = QosDevice::new(Arc::new(Null), qos);
        let (mut bare, mut over) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            bare.push(ns_per_request(
                Null.new_channel().unwrap().as_mut(),
                100_000,
            ));
            over.push(ns_per_request(
                layered.new_channel().unwrap().as_mut(),
                100_000,
            ));
        }
        bare.sort_by(f64::total_cmp);
        over.sort_by(f64::total_cmp);
        eprintln!(
            "per request: bare {:.1} ns, with the unlimited QoS layer {:.1} ns (medians of 7)",
            bare[3], over[3]
        );
    }

    #[test]
    fn unlimited_passes_straight_down() {
        let mem = MemDevice::new(1 << 14);
        let qos = Qos::new(QosLimits::default()).unwrap();
        let dev = QosDevice::new(Arc::new(mem.clone()), qos);
        assert_eq!(dev.iovec_align(), mem.iovec_align());
        let mut ch = dev.new_channel().unwrap();
        ch.add(7, write(0));
        ch.add(8, IoOp::Flush);
        ch.add(9, read(0));
        let mut done = finish_all(ch.as_mut());
        done.sort_by_key(|c| c.id);
        let ids: Vec<u64> = done.iter().map(|c| c.id).collect();
        assert_eq!(ids, [7, 8, 9]);
    }
}
