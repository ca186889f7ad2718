//! Per-queue request statistics: operation counts, bytes, errors, requests in flight and a
//! latency histogram per operation kind, for the control socket's `stats` and `metrics`.
//!
//! Recording costs a few relaxed loads and stores and no allocation: each queue's counters
//! are written only by the thread serving that queue (under its worker's lock), so an
//! increment is a load and a store, not a locked read-modify-write, and each queue's
//! [`QueueStats`] sits on its own cache lines. Readers ([`DeviceStats::snapshot`]) load the
//! same atomics and may see one request's counters half-updated, never torn values.
//!
//! Latency is kept in a log-linear histogram (like HdrHistogram's): bucket 0 holds everything
//! under 1024 ns, then each power of two from 2^10 ns to 2^37 ns (~137 s) is split into 8
//! linear sub-buckets (at most 12.5% wide); longer latencies count in the last bucket. A
//! percentile is reported as the upper bound of the bucket holding it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// What a request was; write-zeroes is its own kind, GET_ID and unparsable chains are
/// [`OpKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
    Other = 5,
}

impl OpKind {
    pub const ALL: [OpKind; 6] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::Other,
    ];

    /// The name in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Other => "other",
        }
    }
}

const KINDS: usize = OpKind::ALL.len();

/// Sub-buckets per power of two: 2^SUB_BITS.
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
/// log2 of the first octave's start (1024 ns).
const MIN_SHIFT: u32 = 10;
/// log2 of the end of the last octave (2^37 ns, ~137 s).
const MAX_SHIFT: u32 = 37;
/// Bucket 0 (under 1024 ns), then 8 per octave.
pub const BUCKETS: usize = 1 + (MAX_SHIFT - MIN_SHIFT) as usize * SUBS;

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
pub fn bucket_of(ns: u64) -> usize {
    if ns < 1 << MIN_SHIFT {
        return 0;
    }
    let ns = ns.min((1 << MAX_SHIFT) - 1);
    let k = 63 - ns.leading_zeros(); // MIN_SHIFT..MAX_SHIFT
    let sub = (ns >> (k - SUB_BITS)) as usize & (SUBS - 1);
    1 + (k - MIN_SHIFT) as usize * SUBS + sub
}

/// The exclusive upper bound of bucket `i`, in nanoseconds.
pub fn bucket_upper_ns(i: usize) -> u64 {
    if i == 0 {
        return 1 << MIN_SHIFT;
    }
    let j = (i - 1).min(BUCKETS - 2);
    let k = MIN_SHIFT + (j / SUBS) as u32;
    let sub = (j % SUBS) as u64;
    (SUBS as u64 + sub + 1) << (k - SUB_BITS)
}

/// The inclusive lower bound of bucket `i`, in nanoseconds.
pub fn bucket_lower_ns(i: usize) -> u64 {
    if i == 0 {
        0
    } else {
        bucket_upper_ns(i - 1)
    }
}

/// Adds `n` to a counter only this thread writes (see the module documentation).
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One operation kind's counters on one queue. The request count is the histogram's total.
struct KindStats {
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for KindStats {
    fn default() -> Self {
        KindStats {
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One queue's statistics. Written by the queue's worker only; aligned so that two queues'
/// counters never share a cache line (128: adjacent-line prefetch pairs lines).
#[repr(align(128))]
#[derive(Default)]
pub struct QueueStats {
    in_flight: AtomicU64,
    kinds: [KindStats; KINDS],
}

impl QueueStats {
    /// `n` requests taken off the avail ring.
    #[inline]
    pub fn started(&self, n: u64) {
        bump(&self.in_flight, n);
    }

    /// One request's used entry published: its kind, whether its status was OK, the bytes it
    /// moved (counted only when OK) and its latency since [`QueueStats::started`].
    #[inline]
    pub fn finished(&self, kind: OpKind, ok: bool, bytes: u64, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let k = &self.kinds[kind as usize];
        bump(&k.buckets[bucket_of(ns)], 1);
        bump(&k.latency_sum_ns, ns);
        if ok {
            bump(&k.bytes, bytes);
        } else {
            bump(&k.errors, 1);
        }
        bump(&self.in_flight, u64::MAX); // wrapping: minus one
    }

    fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            kinds: std::array::from_fn(|i| {
                let k = &self.kinds[i];
                KindSnapshot {
                    bytes: k.bytes.load(Ordering::Relaxed),
                    errors: k.errors.load(Ordering::Relaxed),
                    latency_sum_ns: k.latency_sum_ns.load(Ordering::Relaxed),
                    hist: Histogram(std::array::from_fn(|b| {
                        k.buckets[b].load(Ordering::Relaxed)
                    })),
                }
            }),
        }
    }
}

/// Every queue's statistics for one device, created once for its `num_queues` and shared
/// (`Arc`) by the queue workers of every connection and the control socket.
pub struct DeviceStats {
    queues: Box<[QueueStats]>,
}

impl DeviceStats {
    pub fn new(num_queues: u16) -> Self {
        DeviceStats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `q`'s statistics, `None` past the last queue.
    pub fn queue(&self, q: usize) -> Option<&QueueStats> {
        self.queues.get(q)
    }

    /// A report of every queue and their total.
    pub fn snapshot(&self) -> StatsSnapshot {
        let queues: Vec<QueueSnapshot> = self.queues.iter().map(QueueStats::snapshot).collect();
        let mut total = QueueSnapshot::default();
        for q in &queues {
            total.add(q);
        }
        StatsSnapshot { queues, total }
    }
}

/// Counts per latency bucket.
#[derive(Clone, Copy)]
pub struct Histogram(pub [u64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram([0; BUCKETS])
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.0.iter().fold(0u64, |a, &c| a.wrapping_add(c))
    }

    fn add(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// The upper bound (ns) of the bucket holding the `per_10k`/10000 quantile (the smallest
    /// value with at least that share of samples at or below it); `None` without samples.
    pub fn quantile_ns(&self, per_10k: u32) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (u128::from(n) * u128::from(per_10k))
            .div_ceil(10_000)
            .max(1);
        let mut seen = 0u128;
        for (i, &c) in self.0.iter().enumerate() {
            seen += u128::from(c);
            if seen >= rank {
                return Some(bucket_upper_ns(i));
            }
        }
        Some(bucket_upper_ns(BUCKETS - 1))
    }

    pub fn percentiles(&self) -> Percentiles {
        let us = |q| self.quantile_ns(q).map(|ns| ns as f64 / 1000.0);
        Percentiles {
            p50: us(5000),
            p90: us(9000),
            p99: us(9900),
            p99_9: us(9990),
        }
    }
}

/// The quantiles reported, as 1/10000ths and their names.
pub const QUANTILES: [(u32, &str); 4] = [
    (5000, "0.5"),
    (9000, "0.9"),
    (9900, "0.99"),
    (9990, "0.999"),
];

/// Latency percentiles in microseconds (bucket upper bounds); `null` without requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p99_9: Option<f64>,
}

/// One kind's counters, read at one moment.
#[derive(Clone, Copy, Default)]
pub struct KindSnapshot {
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
    pub hist: Histogram,
}

impl KindSnapshot {
    pub fn ops(&self) -> u64 {
        self.hist.count()
    }

    fn add(&mut self, o: &KindSnapshot) {
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.errors = self.errors.wrapping_add(o.errors);
        self.latency_sum_ns = self.latency_sum_ns.wrapping_add(o.latency_sum_ns);
        self.hist.add(&o.hist);
    }
}

/// One queue's (or the device's) counters, read at one moment.
#[derive(Clone, Copy, Default)]
pub struct QueueSnapshot {
    /// Requests taken off the avail ring whose used entry is not published yet.
    pub in_flight: u64,
    /// Indexed by `OpKind as usize`.
    pub kinds: [KindSnapshot; KINDS],
}

impl QueueSnapshot {
    fn add(&mut self, o: &QueueSnapshot) {
        self.in_flight = self.in_flight.wrapping_add(o.in_flight);
        for (a, b) in self.kinds.iter_mut().zip(o.kinds.iter()) {
            a.add(b);
        }
    }

    pub fn kind(&self, kind: OpKind) -> &KindSnapshot {
        &self.kinds[kind as usize]
    }

    /// Every kind's latencies together.
    pub fn all_latencies(&self) -> Histogram {
        let mut h = Histogram::default();
        for k in &self.kinds {
            h.add(&k.hist);
        }
        h
    }

    /// The serializable report (`queue`: its index, `None` for the total).
    pub fn report(&self, queue: Option<usize>) -> QueueReport {
        let op = |kind| {
            let k = self.kind(kind);
            OpReport {
                ops: k.ops(),
                bytes: k.bytes,
                errors: k.errors,
                latency_us: k.hist.percentiles(),
            }
        };
        let all = self.all_latencies();
        QueueReport {
            queue,
            in_flight: self.in_flight,
            ops: all.count(),
            errors: self.kinds.iter().map(|k| k.errors).sum(),
            latency_us: all.percentiles(),
            read: op(OpKind::Read),
            write: op(OpKind::Write),
            flush: op(OpKind::Flush),
            discard: op(OpKind::Discard),
            write_zeroes: op(OpKind::WriteZeroes),
            other: op(OpKind::Other),
        }
    }
}

/// Every queue's counters and their total, read one queue after the other.
pub struct StatsSnapshot {
    pub queues: Vec<QueueSnapshot>,
    pub total: QueueSnapshot,
}

/// One kind's counters in the `stats` reply.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub ops: u64,
    /// Bytes of successful requests: data moved, or the range a discard / write-zeroes covered.
    pub bytes: u64,
    /// Requests that completed with a status other than OK.
    pub errors: u64,
    pub latency_us: Percentiles,
}

/// One queue's (or the total's) counters in the `stats` reply.
#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    pub in_flight: u64,
    /// Requests of every kind.
    pub ops: u64,
    pub errors: u64,
    /// Every kind's latencies together.
    pub latency_us: Percentiles,
    pub read: OpReport,
    pub write: OpReport,
    pub flush: OpReport,
    pub discard: OpReport,
    pub write_zeroes: OpReport,
    pub other: OpReport,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bucket_boundaries() {
        assert_eq!(BUCKETS, 217);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1023), 0);
        assert_eq!(bucket_upper_ns(0), 1024);
        // The first octave: 128 ns wide buckets.
        assert_eq!(bucket_of(1024), 1);
        assert_eq!(bucket_of(1151), 1);
        assert_eq!(bucket_of(1152), 2);
        assert_eq!(bucket_upper_ns(1), 1152);
        assert_eq!(bucket_of(2047), 8);
        assert_eq!(bucket_of(2048), 9);
        assert_eq!(bucket_upper_ns(8), 2048);
        assert_eq!(bucket_upper_ns(9), 2048 + 256);
        // The last bucket ends at 2^37 ns and takes everything longer.
        assert_eq!(bucket_of((1 << 37) - 1), BUCKETS - 1);
        assert_eq!(bucket_of(1 << 37), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_upper_ns(BUCKETS - 1), 1 << 37);
        // Every bucket is contiguous with the next, each value inside its bucket, and no
        // bucket past the first is wider than 1/8 of its lower bound.
        for i in 1..BUCKETS {
            let (lo, hi) = (bucket_lower_ns(i), bucket_upper_ns(i));
            assert!(lo < hi);
            assert_eq!(bucket_of(lo), i, "lower bound of {i}");
            assert_eq!(bucket_of(hi - 1), i, "last value of {i}");
            assert!((hi - lo) * 8 <= lo, "bucket {i}: [{lo}, {hi})");
        }
        let mut v = 1u64;
        while v < 1 << 40 {
            let i = bucket_of(v);
            assert!(
                bucket_lower_ns(i) <= v.min((1 << 37) - 1) && v < bucket_upper_ns(i).max(v + 1)
            );
            v = v * 3 / 2 + 1;
        }
    }

    /// The exact quantile of the values 1..=n µs, and the bucket it must be reported as.
    #[test]
    fn percentiles_of_a_known_distribution() {
        let q = QueueStats::default();
        q.started(10_000);
        // 1 µs .. 10 ms, once each, shuffled order does not matter.
        for us in 1..=10_000u64 {
            q.finished(OpKind::Read, true, 4096, Duration::from_micros(us));
        }
        let s = q.snapshot();
        let read = s.kind(OpKind::Read);
        assert_eq!(read.ops(), 10_000);
        assert_eq!(read.bytes, 10_000 * 4096);
        assert_eq!(read.latency_sum_ns, 10_000 * 10_001 / 2 * 1000);
        assert_eq!(s.in_flight, 0);
        for (per_10k, exact_us) in [(5000, 5000u64), (9000, 9000), (9900, 9900), (9990, 9990)] {
            let got = read.hist.quantile_ns(per_10k).unwrap();
            let exact = exact_us * 1000;
            assert_eq!(got, bucket_upper_ns(bucket_of(exact)), "q {per_10k}");
            assert!(
                got > exact && got <= exact + exact / 8,
                "q {per_10k}: {got}"
            );
        }
        let p = read.hist.percentiles();
        // 5 ms lies in [2^22 + 2^19, 2^22 + 2^20) ns: reported as 5242.88 µs.
        assert_eq!(p.p50, Some(5242.88));
        // Two values: the median is the lower one, p90 the higher one.
        let h = {
            let mut h = Histogram::default();
            h.0[bucket_of(1500)] += 1;
            h.0[bucket_of(900_000)] += 1;
            h
        };
        assert_eq!(h.quantile_ns(5000), Some(1536));
        assert_eq!(
            h.quantile_ns(9000),
            Some(bucket_upper_ns(bucket_of(900_000)))
        );
        assert_eq!(Histogram::default().quantile_ns(5000), None);
        assert_eq!(Histogram::default().percentiles().p99, None);
        // An empty kind reports null percentiles.
        let json = serde_json::to_string(&s.report(None)).unwrap();
        assert!(
            json.contains(
                "\"write\":{\"ops\":0,\"bytes\":0,\"errors\":0,\"latency_us\":{\"p50\":null"
            ),
            "{json}"
        );
    }

    #[test]
    fn errors_count_no_bytes_and_kinds_are_separate() {
        let d = DeviceStats::new(2);
        let q1 = d.queue(1).unwrap();
        q1.started(4);
        q1.finished(OpKind::Write, false, 8192, Duration::from_micros(3));
        q1.finished(OpKind::Discard, true, 1 << 20, Duration::from_micros(3));
        q1.finished(OpKind::Other, false, 0, Duration::from_nanos(10));
        assert!(d.queue(2).is_none());
        let s = d.snapshot();
        assert_eq!(s.queues[1].in_flight, 1);
        assert_eq!(s.total.in_flight, 1);
        let w = s.total.kind(OpKind::Write);
        assert_eq!((w.ops(), w.bytes, w.errors), (1, 0, 1));
        let dis = s.total.kind(OpKind::Discard);
        assert_eq!((dis.ops(), dis.bytes, dis.errors), (1, 1 << 20, 0));
        let r = s.total.report(None);
        assert_eq!((r.ops, r.errors), (3, 2));
        assert_eq!(s.queues[0].report(Some(0)).ops, 0);
    }

    /// Each thread records into its own queue while another snapshots: counts only grow, and
    /// the final totals are exact.
    #[test]
    fn concurrent_recording_and_snapshots() {
        const N: u64 = 200_000;
        let d = Arc::new(DeviceStats::new(4));
        std::thread::scope(|s| {
            for q in 0..4 {
                let d = d.clone();
                s.spawn(move || {
                    let qs = d.queue(q).unwrap();
                    for i in 0..N {
                        qs.started(1);
                        let kind = OpKind::ALL[(i % 6) as usize];
                        qs.finished(kind, i % 7 != 0, 512, Duration::from_nanos(i % 5000));
                    }
                });
            }
            let d = d.clone();
            s.spawn(move || {
                let mut last = 0;
                loop {
                    let s = d.snapshot();
                    let ops = s.total.all_latencies().count();
                    assert!(ops >= last);
                    last = ops;
                    if ops == 4 * N {
                        break;
                    }
                }
            });
        });
        let s = d.snapshot();
        for q in &s.queues {
            assert_eq!(q.in_flight, 0);
            assert_eq!(q.all_latencies().count(), N);
            let errors: u64 = q.kinds.iter().map(|k| k.errors).sum();
            assert_eq!(errors, N.div_ceil(7));
        }
        let bytes: u64 = s.total.kinds.iter().map(|k| k.bytes).sum();
        assert_eq!(bytes, 4 * (N - N.div_ceil(7)) * 512);
    }

    #[test]
    fn queues_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueStats>(), 128);
        let d = DeviceStats::new(2);
        let a = d.queue(0).unwrap() as *const QueueStats as usize;
        let b = d.queue(1).unwrap() as *const QueueStats as usize;
        assert!(b - a >= std::mem::size_of::<QueueStats>() && b.is_multiple_of(128));
    }
}
