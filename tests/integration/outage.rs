//! Outages of a remote source (`image_url`) against the real binary through libblkio: a
//! tiny HTTP server on loopback that serves an image with Range GETs until told to go silent
//! (it then accepts connections and reads requests but never answers). Issue #22, items 2
//! and 7: requests queued behind an outage fail within about one `fetch_retry_secs`, not in
//! waves of it; FLUSH and SIGTERM never wait behind fetches; SIGTERM during a slow start-up
//! exits at once with status 0.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
/// 64 KiB stripes.
const SHIFT: u8 = 7;
const STRIPE: u64 = 512 << SHIFT;
const STRIPES: u64 = 128;

/// A one-object HTTP/1.1 server (HEAD, Range GET, keep-alive) that can go silent.
struct Server {
    port: u16,
    silent: Arc<AtomicBool>,
    /// Requests received (answered or not).
    requests: Arc<AtomicUsize>,
}

impl Server {
    fn start(image: Vec<u8>, silent: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = Server {
            port,
            silent: Arc::new(AtomicBool::new(silent)),
            requests: Arc::default(),
        };
        let image = Arc::new(image);
        let (quiet, requests) = (server.silent.clone(), server.requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (image, quiet, requests) = (image.clone(), quiet.clone(), requests.clone());
                std::thread::spawn(move || serve(stream, &image, &quiet, &requests));
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/image.raw", self.port)
    }
}

/// Answers requests on `stream` until it closes; while `silent`, reads and never answers.
fn serve(mut stream: TcpStream, image: &[u8], silent: &AtomicBool, requests: &AtomicUsize) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_string();
        pending.drain(..end + 4);
        requests.fetch_add(1, SeqCst);
        if silent.load(SeqCst) {
            // Hold the connection until the client gives up.
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            return;
        }
        let size = image.len();
        let range = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim().strip_prefix("bytes=")?;
            let (a, b) = v.split_once('-')?;
            k.eq_ignore_ascii_case("range")
                .then(|| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))?
        });
        let common = "ETag: \"v1\"\r\nAccept-Ranges: bytes\r\n";
        let reply = if head.starts_with("HEAD ") {
            format!("HTTP/1.1 200 OK\r\n{common}Content-Length: {size}\r\n\r\n").into_bytes()
        } else if let Some((a, b)) = range.filter(|&(a, b)| a <= b && b < size) {
            let mut r = format!(
                "HTTP/1.1 206 Partial Content\r\n{common}Content-Range: bytes {a}-{b}/{size}\r\n\
                 Content-Length: {}\r\n\r\n",
                b - a + 1
            )
            .into_bytes();
            r.extend_from_slice(&image[a..=b]);
            r
        } else {
            b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n".to_vec()
        };
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

/// The image (`seed`'s pattern), a server for it (`silent` from the start or not) and a lazy
/// disk of [`STRIPES`] stripes filled from it, with `extra` config lines.
fn disk(prefix: &str, seed: u64, silent: bool, extra: &[&str]) -> (Vec<u8>, Server, LazyFiles) {
    let image = pattern_bytes(seed, (STRIPES * STRIPE) as usize);
    let server = Server::start(image.clone(), silent);
    let mut files = LazyFiles::new(prefix, STRIPES * STRIPE, 0xee, &image, &[]);
    files.init_metadata(INIT, SHIFT);
    let yaml = &mut files.config.extra_yaml;
    yaml.retain(|l| !l.starts_with("image_path:"));
    yaml.push(format!("image_url: {}", yaml_str(&server.url())));
    yaml.extend(extra.iter().map(|l| l.to_string()));
    (image, server, files)
}

/// Submits 4 KiB reads of `stripes` on `q` (user data: the stripe) and kicks the device.
fn submit_reads(q: &mut QueueIo, stripes: std::ops::RangeInclusive<u64>) {
    for s in stripes {
        q.submit_read(s * STRIPE, s as usize * 4096, 4096, s as usize);
    }
    q.reap(0, &mut Vec::new(), Some(Duration::ZERO)).unwrap();
}

fn start(files: &LazyFiles, num_queues: usize) -> (ChildGuard, Client) {
    let mut config = files.config.clone();
    config.num_queues = num_queues;
    let mut be = Backend::spawn_as_is(BIN, &config, &[], |_| {}).unwrap();
    be.wait_for_socket(&config.socket, Duration::from_secs(20))
        .unwrap();
    let c = Client::connect_queues(&config.socket, num_queues).unwrap();
    (be, c)
}

fn status(files: &LazyFiles) -> serde_json::Value {
    let s = ControlStatus::query(&files.ctl).unwrap();
    serde_json::from_str(&s.raw).unwrap()
}

/// Submits 4 KiB reads at the start of `stripes` on queue 0; returns their results with when
/// each completed.
fn read_stripes(c: &mut Client, stripes: &[u64]) -> Vec<(i32, Duration)> {
    let q = c.queue(0);
    let t0 = Instant::now();
    for (i, s) in stripes.iter().enumerate() {
        q.submit_read(s * STRIPE, i * 4096, 4096, i);
    }
    let mut out = vec![(1, Duration::ZERO); stripes.len()];
    let mut done = Vec::new();
    while q.in_flight() > 0 {
        q.reap(1, &mut done, Some(Duration::from_secs(120)))
            .unwrap();
        for d in done.drain(..) {
            out[d.user_data] = (d.ret, t0.elapsed());
        }
    }
    out
}

/// 64 reads of different unfetched stripes with the server silent and 8 fetchers: all fail
/// with EIO, the last within 1.5 x `fetch_retry_secs` (before: in 8 waves, 16 s). Then the
/// source is reported down and new reads fail at once; when the server answers again, reads
/// heal (the probe's turn comes one failed attempt's length after the last one).
#[test]
fn queued_reads_fail_within_one_budget_when_the_server_goes_silent() {
    let (image, server, files) = disk(
        "ubiblk-outage-waves",
        0x0ac0_0000,
        false,
        &["fetch_retry_secs: 2", "fetch_connections: 8"],
    );
    let (be, mut c) = start(&files, 1);
    assert_eq!(c.read(0, 0, 4096).unwrap(), image[..4096]);

    server.silent.store(true, SeqCst);
    let stripes: Vec<u64> = (1..=64).collect();
    let results = read_stripes(&mut c, &stripes);
    let last = results.iter().map(|r| r.1).max().unwrap();
    eprintln!("64 reads with the server silent: the last failed after {last:?}");
    assert!(
        results.iter().all(|r| r.0 == -libc::EIO),
        "{results:?}\n{}",
        be.log()
    );
    assert!(
        last < Duration::from_secs(3),
        "the last read failed after {last:?}\n{}",
        be.log()
    );
    let s = status(&files);
    assert_eq!(s["source_down"], true, "{s}");
    assert!(s["source_down_since"].is_u64(), "{s}");
    // Known down: a read fails at once, without a request to the server.
    let before = server.requests.load(SeqCst);
    let t0 = Instant::now();
    assert_eq!(c.read(0, 100 * STRIPE, 4096), Err(libc::EIO));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(server.requests.load(SeqCst), before);

    // Back: after the probe time, reads work again and the breaker is closed.
    server.silent.store(false, SeqCst);
    std::thread::sleep(Duration::from_millis(2500));
    let off = 100 * STRIPE;
    assert_eq!(
        c.read(0, off, 4096).unwrap(),
        image[off as usize..off as usize + 4096],
        "{}",
        be.log()
    );
    let s = status(&files);
    assert_eq!(s["source_down"], false, "{s}");
    let results = read_stripes(&mut c, &stripes);
    assert!(results.iter().all(|r| r.0 == 0), "{results:?}");
}

/// A sequential 8 MiB read in 4 KiB requests with the server silent: the first request waits
/// for the budget, the rest fail at once (before: a budget per request, over an hour).
#[test]
fn a_sequential_read_with_the_server_silent_takes_about_one_budget() {
    let (_, server, files) = disk(
        "ubiblk-outage-sequential",
        0x0ac4_0000,
        false,
        &["fetch_retry_secs: 2"],
    );
    let (be, mut c) = start(&files, 1);
    server.silent.store(true, SeqCst);
    let t0 = Instant::now();
    let mut off = 0;
    while off < STRIPES * STRIPE {
        assert_eq!(c.read(0, off, 4096), Err(libc::EIO), "at {off}");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "{off} bytes read after {:?}\n{}",
            t0.elapsed(),
            be.log()
        );
        off += 4096;
    }
    eprintln!(
        "8 MiB in 4 KiB reads with the server silent: {:?}",
        t0.elapsed()
    );
}

/// A FLUSH after a write to a fetched stripe completes at once while every fetcher waits for
/// the silent server (before: it waited for a free fetcher, ~`fetch_retry_secs`).
#[test]
fn a_flush_does_not_wait_for_a_fetcher() {
    let (image, server, files) = disk(
        "ubiblk-outage-flush",
        0x0ac1_0000,
        false,
        &["fetch_retry_secs: 6", "fetch_connections: 4"],
    );
    let (_be, mut c) = start(&files, 2);
    // Stripe 100 fetched (by a read): its first write sets a WRITTEN bit for the FLUSH to save.
    let off = 100 * STRIPE;
    assert_eq!(
        c.read(1, off, 4096).unwrap(),
        image[off as usize..off as usize + 4096]
    );

    server.silent.store(true, SeqCst);
    submit_reads(c.queue(0), 1..=8);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    c.write(1, off, &[8; 4096]).unwrap();
    c.flush(1).unwrap();
    let took = t0.elapsed();
    eprintln!("write + FLUSH with every fetcher waiting: {took:?}");
    assert!(took < Duration::from_secs(1), "write + FLUSH took {took:?}");
    assert_eq!(status(&files)["written"], 1);
}

/// Sends SIGTERM to `be` (`when`: for the log) and waits for its exit, which must be a success;
/// returns how long it took.
fn sigterm(be: &mut ChildGuard, when: &str) -> Duration {
    let t0 = Instant::now();
    be.signal(libc::SIGTERM);
    let st = be
        .wait_timeout(Duration::from_secs(30))
        .expect("the backend did not exit");
    let took = t0.elapsed();
    eprintln!("SIGTERM {when}: exited after {took:?} with {st:?}");
    assert!(st.success(), "{st:?}\n{}", be.log());
    took
}

/// SIGTERM with reads waiting for a silent server: the backend exits promptly with status 0
/// (before: after the reads failed, in waves of `fetch_retry_secs`).
#[test]
fn sigterm_with_reads_waiting_for_a_silent_server_is_prompt() {
    let (_, server, files) = disk(
        "ubiblk-outage-sigterm",
        0x0ac2_0000,
        false,
        &["fetch_retry_secs: 10", "fetch_connections: 4"],
    );
    let (mut be, mut c) = start(&files, 1);
    server.silent.store(true, SeqCst);
    submit_reads(c.queue(0), 1..=32);
    std::thread::sleep(Duration::from_millis(500));
    let took = sigterm(&mut be, "with 32 reads waiting");
    assert!(took < Duration::from_secs(3), "exited after {took:?}");
}

/// SIGTERM while start-up waits for a silent server (its HEAD unanswered): the backend exits
/// at once with status 0, having created nothing (before: it went on for `fetch_retry_secs`,
/// then failed with status 1).
#[test]
fn sigterm_during_a_slow_start_exits_promptly_with_status_0() {
    let (_, server, files) = disk(
        "ubiblk-outage-startup",
        0x0ac3_0000,
        true,
        &["fetch_retry_secs: 20"],
    );
    let meta_before = std::fs::read(&files.meta).unwrap();
    let mut be = Backend::spawn_as_is(BIN, &files.config, &[], |_| {}).unwrap();
    let t0 = Instant::now();
    while server.requests.load(SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no request");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let took = sigterm(&mut be, "during start-up");
    assert!(took < Duration::from_secs(2), "exited after {took:?}");
    assert!(!files.config.socket.exists());
    assert!(!files.ctl.exists());
    assert_eq!(std::fs::read(&files.meta).unwrap(), meta_before);
}
