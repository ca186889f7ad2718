//! A source that goes down (each attempt hangs until its timeout, like a silent server)
//! behind the real retry policy: the circuit breaker, FLUSH and shutdown during outages.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{buf_of, options};
use crate::block::{run_sync, BlockDevice, FileDevice, IoBuf, IoChannel, IoOp};
use crate::lazy::metadata::{FETCHED, WRITTEN};
use crate::lazy::source::{SourceIdentity, SourceKind};
use crate::lazy::{LazyDevice, Metadata, StripeSource};
use crate::remote::retry::{Failure, Outage, RetryPolicy};

const SHIFT: u8 = 6; // 32 KiB stripes
const STRIPE: usize = 512 << SHIFT;
const STRIPES: usize = 64;

/// An in-memory image behind a [`RetryPolicy`]; while `down`, every attempt takes its whole
/// timeout and fails (a server that accepts and never answers).
struct Flaky {
    data: Vec<u8>,
    down: AtomicBool,
    policy: RetryPolicy,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flaky")
    }
}

impl StripeSource for Flaky {
    fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.policy.run(|timeout| {
            if self.down.load(SeqCst) {
                std::thread::sleep(timeout);
                return Err(Failure::transient(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out",
                )));
            }
            let start = offset as usize;
            buf.copy_from_slice(&self.data[start..start + buf.len()]);
            Ok(())
        })
    }

    fn outage(&self) -> Option<Outage> {
        self.policy.outage()
    }

    fn identity(&self) -> SourceIdentity {
        SourceIdentity::new(SourceKind::Http, "flaky", self.bytes())
    }
}

/// A lazy disk of [`STRIPES`] stripes over `source` (4 fetchers, reads wait for fetches).
fn open_flaky(dir: &Path, attempt: Duration, budget: Duration) -> (LazyDevice, Arc<Flaky>) {
    let base = dir.join("base");
    std::fs::write(&base, vec![0xee; STRIPE * STRIPES]).unwrap();
    let meta = dir.join("meta");
    let md = Metadata::new((STRIPE * STRIPES / 512) as u64, SHIFT).unwrap();
    md.write_to(&std::fs::File::create(&meta).unwrap(), None)
        .unwrap();
    let source = Arc::new(Flaky {
        data: (0..STRIPE * STRIPES).map(|i| (i / 512) as u8).collect(),
        down: AtomicBool::new(false),
        policy: RetryPolicy::new(attempt, budget),
    });
    let inner: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&base, false, 64).unwrap());
    let opts = options(Path::new("/nonexistent"), &meta, false);
    let device = LazyDevice::with_source(inner, None, source.clone(), &opts).unwrap();
    (device, source)
}

fn read_op(stripe: usize) -> IoOp {
    IoOp::Read {
        sector: (stripe * STRIPE / 512) as u64,
        buf: IoBuf::new(4096),
    }
}

/// Adds `ops` (ids 0..) at once; returns each one's result and when it completed.
fn run_all(ch: &mut dyn IoChannel, ops: Vec<IoOp>) -> Vec<(Result<(), i32>, Duration)> {
    let t0 = Instant::now();
    let n = ops.len();
    for (i, op) in ops.into_iter().enumerate() {
        ch.add(i as u64, op);
    }
    ch.submit().unwrap();
    let mut out = vec![None; n];
    let mut done = Vec::new();
    while out.iter().any(Option::is_none) {
        assert!(t0.elapsed() < Duration::from_secs(30), "requests hang");
        ch.submit().unwrap();
        ch.poll(&mut done);
        for c in done.drain(..) {
            out[c.id as usize] = Some((c.result, t0.elapsed()));
        }
        if out.iter().any(Option::is_none) {
            ch.wait().unwrap();
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// 32 reads of different unfetched stripes with the source down and 4 fetchers: all fail
/// within about one budget (not in 8 waves of a budget each); meanwhile `status` says the
/// source is down and new requests fail at once; once it is back and its probe time has
/// come, a read succeeds, the breaker closes.
#[test]
fn many_requests_with_the_source_down_fail_within_one_budget_then_heal() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Duration::from_millis(400);
    // Each attempt takes the whole budget: the next probe comes 400 ms after the failure.
    let (device, source) = open_flaky(dir.path(), budget, budget);
    let mut ch = device.new_channel().unwrap();
    source.down.store(true, SeqCst);
    let results = run_all(&mut *ch, (0..32).map(read_op).collect());
    let last = results.iter().map(|r| r.1).max().unwrap();
    assert!(results.iter().all(|r| r.0 == Err(libc::EIO)), "{results:?}");
    assert!(last < budget * 3 / 2, "the last read failed after {last:?}");

    let s = device.status();
    assert!(s.source_down && s.source_down_since.is_some(), "{s:?}");
    // Known down: a new request fails at once.
    let t0 = Instant::now();
    let (r, _) = run_sync(&mut *ch, read_op(40));
    assert_eq!(r, Err(libc::EIO));
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );

    // Back: once the probe time has come (the last attempt's length after it), a read
    // probes, succeeds and closes the breaker.
    source.down.store(false, SeqCst);
    std::thread::sleep(Duration::from_millis(600));
    let (r, buf) = run_sync(&mut *ch, read_op(40));
    assert_eq!(r, Ok(()));
    assert!(*buf.unwrap() == source.data[40 * STRIPE..40 * STRIPE + 4096]);
    let s = device.status();
    assert!(!s.source_down && s.source_down_since.is_none(), "{s:?}");
    let results = run_all(&mut *ch, (0..32).map(read_op).collect());
    assert!(results.iter().all(|r| r.0.is_ok()), "{results:?}");
}

/// A FLUSH after a write to a fetched stripe completes at once while every fetcher waits
/// for a silent source (the WRITTEN bit is saved by its own thread, not a fetcher).
#[test]
fn a_flush_does_not_wait_behind_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source) = open_flaky(dir.path(), Duration::from_secs(3), Duration::from_secs(3));
    let mut ch = device.new_channel().unwrap();
    // Stripe 10 fetched (by a read): its first write sets a WRITTEN bit for the FLUSH to save.
    let (r, _) = run_sync(&mut *ch, read_op(10));
    r.unwrap();
    // ... and its fetcher done with it (the read was answered before the fetch's syncs).
    while device.status().fetching > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }

    source.down.store(true, SeqCst);
    // All 4 fetchers busy with the silent source, on another queue.
    let mut other = device.new_channel().unwrap();
    for s in 1..=4 {
        other.add(s as u64, read_op(s));
    }
    other.submit().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let results = run_all(
        &mut *ch,
        vec![
            IoOp::Write {
                sector: (10 * STRIPE / 512) as u64,
                buf: buf_of(&[2; 4096]),
            },
            IoOp::Flush,
        ],
    );
    assert!(results.iter().all(|r| r.0.is_ok()), "{results:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "write + FLUSH took {:?}",
        t0.elapsed()
    );
    // The WRITTEN bit is durable.
    let file = std::fs::File::open(dir.path().join("meta")).unwrap();
    let md = Metadata::read_from(&file, (STRIPE * STRIPES / 512) as u64, None).unwrap();
    assert_eq!(md.stripes[10], FETCHED | WRITTEN);
    device.shutdown(Duration::ZERO);
    let mut done = Vec::new();
    while other.in_flight() > 0 {
        other.poll(&mut done);
        other.wait().unwrap();
    }
}

/// At shutdown, requests waiting for fetches from a silent source fail after the grace, not
/// after the retry budget.
#[test]
fn shutdown_fails_waiting_requests_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source) = open_flaky(dir.path(), Duration::from_secs(5), Duration::from_secs(5));
    let mut ch = device.new_channel().unwrap();
    source.down.store(true, SeqCst);
    for s in 0..16 {
        ch.add(s as u64, read_op(s));
    }
    ch.submit().unwrap();
    let t0 = Instant::now();
    device.shutdown(Duration::from_millis(200));
    let mut done = Vec::new();
    while done.len() < 16 {
        assert!(t0.elapsed() < Duration::from_secs(3), "still waiting");
        ch.poll(&mut done);
        if done.len() < 16 {
            ch.wait().unwrap();
        }
    }
    assert!(done.iter().all(|c| c.result == Err(libc::EIO)));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(1),
        "{took:?}"
    );
}
