//! Remote stripe sources benchmark: our backend and `archive` tool against reference clients
//! on the same loopback servers (tests/common/servers/: Garage for S3, nginx for HTTP), in
//! the same run. Every row prints our median, the reference's median and the ratio, over
//! alternating rounds (ours first in odd rounds, the reference first in even ones).
//!
//! Rows (parts):
//!
//! * `hydrate-s3` / `hydrate-http`: the whole image into a fresh base disk with `image_url`
//!   (`s3://BUCKET/image.raw` on Garage, `http://127.0.0.1:PORT/image.raw` on nginx) and
//!   `autofetch: true`, timed from spawning `vhost-backend` until `status` on the control socket
//!   says `complete` (fresh metadata by `init-metadata`, not timed), against the reference
//!   downloading the same object with as many parallel streams as our `fetch_connections`:
//!   boto3's TransferManager (`max_concurrency`, `multipart_chunksize` = the stripe size) for
//!   S3, Python threads with one keep-alive `http.client` connection each fetching
//!   stripe-sized ranges into their offsets of one file for HTTP. Both end with the whole image
//!   in a file (fsync'd); the reference's time is measured inside Python after its start-up.
//!   MB/s, target >= 0.8x. The first fetched disk and the first download are compared with the
//!   image (`cmp`).
//! * `demand-s3` / `demand-http`: latency of a 4 KiB guest read (libblkio client, QD1) on an
//!   unfetched stripe (fresh metadata, no autofetch, `copy_on_read: true`; distinct stripes
//!   spread over the image; content checked), against one GET of the same whole stripe with a
//!   keep-alive client (boto3 `get_object` with Range, or `http.client`). Median ms, target
//!   <= 1.2x.
//! * `reads`: 4 KiB random reads, QD32, one queue, on stripes fetched beforehand (the first
//!   UBIBLK_BENCH_REGION_MB, read through the client with `copy_on_read`) while autofetch
//!   hydrates the rest from Garage at `autofetch_mib_per_sec`, against the same reads on a
//!   backend serving the image as a plain local disk. IOPS, target >= 0.85x.
//! * `reads-loaded`: the same, against the plain disk's reads while a second backend hydrates
//!   another disk from the same Garage at the same rate: on these 2 cores Garage and the
//!   fetch work take CPU from the reads whoever serves them, so this is the ceiling, and the
//!   ratio is what the lazy layer itself costs.
//! * `archive`: `archive -f CONFIG -k KEK --to s3://BUCKET/archive-N` of a disk that is half
//!   holes and half compressible data (disk bytes / wall time of the process) against
//!   `zstd -T0 -c DISK` piped into a boto3 multipart upload (timed together, in Python); and the
//!   bytes each stores (the archive's objects, listed with boto3) against the disk's non-zero
//!   bytes.
//!
//! A row whose side fails (e.g. the remote sources are not built yet) prints the error, stops
//! running that side and goes on; the report shows it as FAILED.
//!
//! Run: `cargo bench --bench remote [-- PART...]`: a markdown report on stdout, per-round
//! numbers on stderr. Needs nginx, Garage (tests/common/servers/ `garage_bin`), python3 with
//! boto3, zstd.
//!
//! Environment:
//!   UBIBLK_BENCH_DIR           image, disks, server data (default /dev/shm)
//!   UBIBLK_BENCH_SIZE_MB       image (= disk) size in MiB (default 1024)
//!   UBIBLK_BENCH_ROUNDS        alternating rounds per row (default 3)
//!   UBIBLK_BENCH_PARTS         comma-separated parts (default all; also positional argv)
//!   UBIBLK_BENCH_SHIFT         stripe size as init-metadata's -s (default 11 = 1 MiB)
//!   UBIBLK_BENCH_CONNECTIONS   our fetch_connections and the reference's streams (default 16)
//!   UBIBLK_BENCH_DEMAND_READS  reads (and reference GETs) per demand round (default 32)
//!   UBIBLK_BENCH_SECS          measured seconds per read window (default 3)
//!   UBIBLK_BENCH_WARMUP_SECS   unmeasured warm-up per read window (default 0.5)
//!   UBIBLK_BENCH_REGION_MB     fetched region the reads stay in (default 64)
//!   UBIBLK_BENCH_FETCH_MIBS    autofetch_mib_per_sec during the read window (default: the rest
//!                              of the image in twice the window, at most 200)
//!   UBIBLK_BENCH_VERBOSE=1     print backend logs on success too
//!   UBIBLK_BACKEND_BIN, UBIBLK_INIT_METADATA_BIN, UBIBLK_ARCHIVE_BIN: the binaries (default:
//!                              the ones cargo built)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use bench::*;
use common::servers::{Garage, Nginx};
use common::*;
use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const PARTS: &[&str] = &[
    "hydrate-s3",
    "hydrate-http",
    "demand-s3",
    "demand-http",
    "reads",
    "reads-loaded",
    "archive",
];
/// How often `status` is asked while waiting for a fetch.
const POLL: Duration = Duration::from_millis(20);
/// A fetch making no progress for this long is a failure.
const STALL: Duration = Duration::from_secs(30);
/// Object key of the image in Garage, and its file name under nginx's root.
const IMAGE_KEY: &str = "image.raw";

/// The HTTP reference client: Python threads, one keep-alive `http.client` connection each.
///
/// * `download URL PATH THREADS CHUNK SIZE`: chunks of CHUNK bytes (Range GETs) handed out to
///   THREADS threads in order, each written at its offset of PATH (pwrite), then fsync; prints
///   the seconds from the first request to the fsync.
/// * `getranges URL CHUNK INDEX...`: one connection, one GET of chunk INDEX per line of output
///   (its seconds).
const HTTP_SCRIPT: &str = r#"
import http.client, os, sys, threading, time, urllib.parse

def connect(u):
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)

def get_range(c, u, a, b, mv):
    c.request("GET", u.path, headers={"Range": "bytes=%d-%d" % (a, b)})
    r = c.getresponse()
    if r.status != 206:
        raise RuntimeError("GET %s bytes=%d-%d: status %d" % (u.path, a, b, r.status))
    want, got = b - a + 1, 0
    while got < want:
        k = r.readinto(mv[got:want])
        if not k:
            raise RuntimeError("short body at %d: %d of %d bytes" % (a, got, want))
        got += k
    if r.read(1):
        raise RuntimeError("body longer than the range")
    return want

def main():
    op, args = sys.argv[1], sys.argv[2:]
    if op == "download":
        url, path, threads, chunk, size = args[0], args[1], int(args[2]), int(args[3]), int(args[4])
        u = urllib.parse.urlsplit(url)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        todo = iter(range((size + chunk - 1) // chunk))
        lock = threading.Lock()
        errors = []
        def worker():
            try:
                c = connect(u)
                mv = memoryview(bytearray(chunk))
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    a = i * chunk
                    n = get_range(c, u, a, min(size, a + chunk) - 1, mv)
                    os.pwrite(fd, mv[:n], a)
            except Exception as ex:
                errors.append(ex)
        t0 = time.monotonic()
        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        os.fsync(fd)
        os.close(fd)
        print("%.6f" % (time.monotonic() - t0))
        return 0
    if op == "getranges":
        url, chunk = args[0], int(args[1])
        u = urllib.parse.urlsplit(url)
        c = connect(u)
        mv = memoryview(bytearray(chunk))
        for i in args[2:]:
            a = int(i) * chunk
            t0 = time.monotonic()
            get_range(c, u, a, a + chunk - 1, mv)
            print("%.6f" % (time.monotonic() - t0))
        return 0
    print("unknown op " + op, file=sys.stderr)
    return 2

sys.exit(main())
"#;

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

struct Bins {
    backend: PathBuf,
    init_metadata: PathBuf,
    /// The archive tool; an error (reported in the archive row) until it is built.
    archive: Result<PathBuf, String>,
}

struct Settings {
    size: u64,
    shift: u8,
    stripe: u64,
    rounds: usize,
    conns: usize,
    demand_reads: usize,
    warmup: Duration,
    secs: Duration,
    region: u64,
    fetch_mibs: u64,
    verbose: bool,
}

/// Paths inside the run's private directory.
struct Files {
    work: PathBuf,
    image: PathBuf,
    base: PathBuf,
    meta: PathBuf,
    config: PathBuf,
    vhost_sock: PathBuf,
    ctl_sock: PathBuf,
    download: PathBuf,
}

/// One remote source: what our backend is configured with, and how the reference reaches it.
enum Remote<'a> {
    S3(&'a Garage),
    Http(&'a Nginx),
}

impl Remote<'_> {
    fn name(&self) -> &'static str {
        match self {
            Remote::S3(_) => "Garage (S3)",
            Remote::Http(_) => "nginx (HTTP)",
        }
    }

    /// The config lines naming the source.
    fn config_lines(&self) -> Vec<String> {
        match self {
            Remote::S3(g) => vec![
                format!("image_url: {}", yaml_str(&g.url(IMAGE_KEY))),
                format!("s3_endpoint: {}", yaml_str(&g.endpoint())),
                format!("s3_region: {}", yaml_str(&g.region())),
            ],
            Remote::Http(n) => vec![format!("image_url: {}", yaml_str(&n.url(IMAGE_KEY)))],
        }
    }

    /// Environment of our processes (S3 credentials).
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Remote::S3(g) => g.env(),
            Remote::Http(_) => Vec::new(),
        }
    }
}

/// Runs `f`; for an nginx source also returns what nginx's access log says about the requests
/// made meanwhile: "N requests (statuses) on M connections".
fn http_traffic<T>(remote: &Remote, f: impl FnOnce() -> T) -> (T, Option<String>) {
    let Remote::Http(n) = remote else {
        return (f(), None);
    };
    let before = n.access_log().len();
    let v = f();
    let log = n.access_log();
    let new = log.get(before..).unwrap_or("");
    // Lines: CONNECTION REQUEST_ON_CONNECTION STATUS "REQUEST" range="RANGE" BYTES
    let mut conns = std::collections::BTreeSet::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut requests = 0;
    for l in new.lines() {
        let mut w = l.split(' ');
        if let (Some(c), Some(_), Some(st)) = (w.next(), w.next(), w.next()) {
            conns.insert(c.to_string());
            *statuses.entry(st.to_string()).or_default() += 1;
            requests += 1;
        }
    }
    let st: Vec<String> = statuses.iter().map(|(k, v)| format!("{v}× {k}")).collect();
    (
        v,
        Some(format!(
            "{requests} requests ({}) on {} connections",
            st.join(", "),
            conns.len()
        )),
    )
}

/// Adds "round R, SIDE: TRAFFIC" to `notes` (and stderr) when there is traffic to tell.
fn note_traffic(notes: &RefCell<Vec<String>>, round: usize, side: &str, t: Option<String>) {
    if let Some(t) = t {
        eprintln!("  {side}: nginx saw {t}");
        notes
            .borrow_mut()
            .push(format!("round {}, {side}: nginx saw {t}", round + 1));
    }
}

fn lazy_config(f: &Files, st: &Settings, remote: &Remote, extra: &[String]) -> BackendConfig {
    let mut cfg = BackendConfig::new(&f.base, &f.vhost_sock)
        .extra_path("metadata_path", &f.meta)
        .extra_path("control_socket", &f.ctl_sock)
        .extra(format!("fetch_connections: {}", st.conns));
    for l in remote
        .config_lines()
        .into_iter()
        .chain(extra.iter().cloned())
    {
        cfg = cfg.extra(l);
    }
    cfg
}

/// A fresh sparse base disk and fresh metadata (`init-metadata`, with the source's env).
fn prepare_lazy_disk(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    cfg: &BackendConfig,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&f.base);
    let _ = std::fs::remove_file(&f.meta);
    File::create(&f.base)?.set_len(st.size)?;
    std::fs::write(&f.config, cfg.to_yaml())?;
    run_init_metadata(&bins.init_metadata, &f.config, st.shift, env)
}

fn cleanup_lazy_disk(f: &Files) {
    let _ = std::fs::remove_file(&f.base);
    let _ = std::fs::remove_file(&f.meta);
}

/// Runs `f` against a started backend; on failure (or with `verbose`) prints its log; stops it.
fn with_backend<T>(
    be: &mut Backend,
    verbose: bool,
    f: impl FnOnce(&mut Backend) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let r = f(be);
    if r.is_err() || verbose {
        eprintln!("--- vhost-backend log ---\n{}", be.log());
    }
    let stopped = stop_backend(be);
    let v = r?;
    stopped?;
    Ok(v)
}

/// Runs a reference script; its stdout, or an error with its stderr.
fn run_script(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_secs(out: &str) -> anyhow::Result<Vec<f64>> {
    out.split_whitespace()
        .map(|l| {
            l.parse::<f64>()
                .with_context(|| format!("reference printed {l:?}"))
        })
        .collect()
}

fn http_script(args: &[&str]) -> Command {
    let mut c = Command::new("python3");
    c.arg("-c").arg(HTTP_SCRIPT).args(args);
    c
}

// ---------------------------------------------------------------------------------------------
// Rows and alternating rounds
// ---------------------------------------------------------------------------------------------

/// The samples of one side of a row, and the error that stopped it, if any.
struct Side {
    samples: Vec<f64>,
    error: Option<String>,
}

struct Row {
    part: &'static str,
    title: String,
    unit: &'static str,
    higher_is_better: bool,
    target: f64,
    ours_label: String,
    ref_label: String,
    ours: Side,
    reference: Side,
    notes: Vec<String>,
}

/// `rounds` alternating rounds of `ours` and `reference` (ours first in odd rounds). A side
/// that fails is reported at once and not run again.
fn alternate(
    part: &str,
    rounds: usize,
    mut ours: impl FnMut(usize) -> anyhow::Result<f64>,
    mut reference: impl FnMut(usize) -> anyhow::Result<f64>,
) -> (Side, Side) {
    let mut sides = [
        Side {
            samples: Vec::new(),
            error: None,
        },
        Side {
            samples: Vec::new(),
            error: None,
        },
    ];
    for round in 0..rounds {
        for step in 0..2 {
            let which = (step + round) % 2; // 0 = ours
            let side = &mut sides[which];
            let name = ["ours", "reference"][which];
            if side.error.is_some() {
                continue;
            }
            let r = if which == 0 {
                ours(round)
            } else {
                reference(round)
            };
            match r {
                Ok(v) => {
                    eprintln!("{part} round {}: {name:<9} {v:.3}", round + 1);
                    side.samples.push(v);
                }
                Err(e) => {
                    eprintln!(
                        "{part} round {}: {name} FAILED (not run again): {e:#}",
                        round + 1
                    );
                    side.error = Some(format!("{e:#}"));
                }
            }
        }
    }
    let [o, r] = sides;
    (o, r)
}

// ---------------------------------------------------------------------------------------------
// Hydration
// ---------------------------------------------------------------------------------------------

/// Our side: seconds from spawning the backend to `complete`.
fn hydrate_ours(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    remote: &Remote,
    verify: bool,
) -> anyhow::Result<f64> {
    let env = remote.env();
    let cfg = lazy_config(f, st, remote, &["autofetch: true".into()]);
    prepare_lazy_disk(bins, f, st, &cfg, &env)?;
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t0 = Instant::now();
    let mut be = start_backend_env(&bins.backend, &cfg, &env)?;
    let secs = with_backend(&mut be, st.verbose, |be| {
        let (status, _, done) = wait_fetch_complete(be, &f.ctl_sock, POLL, STALL)?;
        let stripes = st.size.div_ceil(st.stripe);
        anyhow::ensure!(
            status.stripes == stripes && status.fetched == stripes,
            "complete, but expected {stripes} stripes all fetched: {}",
            status.raw
        );
        Ok((done - t0).as_secs_f64())
    })?;
    if verify {
        cmp_files(&f.image, &f.base).context("the hydrated base disk differs from the image")?;
        eprintln!("  cmp: the hydrated base disk equals the image");
    }
    cleanup_lazy_disk(f);
    Ok(secs)
}

/// The reference side: seconds the parallel download took (measured in Python).
fn hydrate_reference(
    f: &Files,
    st: &Settings,
    remote: &Remote,
    verify: bool,
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_file(&f.download);
    let path = f.download.to_str().unwrap();
    let (conns, stripe, size) = (
        st.conns.to_string(),
        st.stripe.to_string(),
        st.size.to_string(),
    );
    let out = match remote {
        Remote::S3(g) => run_script(
            g.boto3(&["download", &g.bucket(), IMAGE_KEY, path, &conns, &stripe]),
            "boto3 TransferManager download",
        )?,
        Remote::Http(n) => run_script(
            http_script(&["download", &n.url(IMAGE_KEY), path, &conns, &stripe, &size]),
            "parallel http.client download",
        )?,
    };
    let secs = parse_secs(&out)?;
    anyhow::ensure!(secs.len() == 1, "reference printed {out:?}");
    if verify {
        cmp_files(&f.image, &f.download)
            .context("the reference download differs from the image")?;
        eprintln!("  cmp: the reference download equals the image");
    }
    let _ = std::fs::remove_file(&f.download);
    Ok(secs[0])
}

fn part_hydrate(part: &'static str, bins: &Bins, f: &Files, st: &Settings, remote: &Remote) -> Row {
    let mb = st.size as f64 / 1e6;
    let (mut ours_checked, mut ref_checked) = (false, false);
    let notes = RefCell::new(Vec::new());
    let (ours, reference) = alternate(
        part,
        st.rounds,
        |round| {
            let verify = !std::mem::replace(&mut ours_checked, true);
            let (r, traffic) = http_traffic(remote, || hydrate_ours(bins, f, st, remote, verify));
            note_traffic(&notes, round, "ours", traffic);
            r.map(|s| mb / s)
        },
        |round| {
            let verify = !std::mem::replace(&mut ref_checked, true);
            let (r, traffic) = http_traffic(remote, || hydrate_reference(f, st, remote, verify));
            note_traffic(&notes, round, "reference", traffic);
            r.map(|s| mb / s)
        },
    );
    let notes = notes.into_inner();
    let (ours_label, ref_label) = match remote {
        Remote::S3(_) => (
            format!(
                "vhost-backend `image_url: s3://…`, `autofetch`, `fetch_connections: {}`",
                st.conns
            ),
            format!(
                "boto3 TransferManager, max_concurrency={}, multipart_chunksize={} KiB",
                st.conns,
                st.stripe >> 10
            ),
        ),
        Remote::Http(_) => (
            format!(
                "vhost-backend `image_url: http://…`, `autofetch`, `fetch_connections: {}`",
                st.conns
            ),
            format!(
                "{} Python threads, keep-alive http.client, {} KiB ranges",
                st.conns,
                st.stripe >> 10
            ),
        ),
    };
    Row {
        part,
        title: format!("hydrate {} MiB from {}", st.size >> 20, remote.name()),
        unit: "MB/s",
        higher_is_better: true,
        target: 0.8,
        ours_label,
        ref_label,
        ours,
        reference,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Demand fetch
// ---------------------------------------------------------------------------------------------

/// Distinct stripes spread over the image (never the last, which may be short), shifted by
/// the round.
fn demand_stripes(st: &Settings, round: usize) -> Vec<u64> {
    let stripes = (st.size / st.stripe).max(1);
    let n = (st.demand_reads as u64).min(stripes);
    let step = stripes / n;
    (0..n)
        .map(|k| (k * step + round as u64 % step) % stripes)
        .collect()
}

/// Our side: median ms of a 4 KiB read on an unfetched stripe.
fn demand_ours(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    remote: &Remote,
    round: usize,
) -> anyhow::Result<f64> {
    let env = remote.env();
    let cfg = lazy_config(f, st, remote, &["copy_on_read: true".into()]);
    prepare_lazy_disk(bins, f, st, &cfg, &env)?;
    let mut be = start_backend_env(&bins.backend, &cfg, &env)?;
    let ms = with_backend(&mut be, st.verbose, |_| {
        let mut client = connect_client(&f.vhost_sock, 1, 1 << 20, st.size)?;
        let stripes = demand_stripes(st, round);
        let mut times = Vec::new();
        for &s in &stripes {
            let off = s * st.stripe + st.stripe / 2;
            let t = Instant::now();
            let got = client
                .read(0, off, 4096)
                .map_err(|e| anyhow!("read at {off}: {}", errno_name(e)))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                got == pattern_bytes(off, 4096),
                "read at {off}: data differs from the image"
            );
        }
        // A read is served as soon as its stripe is read from the source; the base disk write
        // and the metadata update finish after it.
        let t = Instant::now();
        let mut s = ControlStatus::query(&f.ctl_sock)?;
        while s.fetching > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
            s = ControlStatus::query(&f.ctl_sock)?;
        }
        anyhow::ensure!(
            s.fetched == stripes.len() as u64,
            "{} reads on distinct unfetched stripes, but {} stripes fetched: {}",
            stripes.len(),
            s.fetched,
            s.raw
        );
        Ok(median(&times))
    })?;
    cleanup_lazy_disk(f);
    Ok(ms)
}

/// The reference side: median ms of a keep-alive GET of one whole stripe.
fn demand_reference(st: &Settings, remote: &Remote, round: usize) -> anyhow::Result<f64> {
    let idx: Vec<String> = demand_stripes(st, round)
        .iter()
        .map(|s| s.to_string())
        .collect();
    let stripe = st.stripe.to_string();
    let mut args: Vec<&str> = Vec::new();
    let cmd = match remote {
        Remote::S3(g) => {
            let bucket = g.bucket();
            args.extend(["getranges", &bucket, IMAGE_KEY, &stripe]);
            args.extend(idx.iter().map(String::as_str));
            g.boto3(&args)
        }
        Remote::Http(n) => {
            let url = n.url(IMAGE_KEY);
            args.extend(["getranges", &url, &stripe]);
            args.extend(idx.iter().map(String::as_str));
            http_script(&args)
        }
    };
    let secs = parse_secs(&run_script(cmd, "keep-alive stripe GETs")?)?;
    anyhow::ensure!(
        secs.len() == idx.len(),
        "reference printed {} times",
        secs.len()
    );
    Ok(median(&secs) * 1e3)
}

fn part_demand(part: &'static str, bins: &Bins, f: &Files, st: &Settings, remote: &Remote) -> Row {
    let notes = RefCell::new(Vec::new());
    let (ours, reference) = alternate(
        part,
        st.rounds,
        |round| {
            let (r, traffic) = http_traffic(remote, || demand_ours(bins, f, st, remote, round));
            note_traffic(&notes, round, "ours", traffic);
            r
        },
        |round| {
            let (r, traffic) = http_traffic(remote, || demand_reference(st, remote, round));
            note_traffic(&notes, round, "reference", traffic);
            r
        },
    );
    let notes = notes.into_inner();
    let n = demand_stripes(st, 0).len();
    let ref_label = match remote {
        Remote::S3(_) => format!(
            "boto3 get_object of the whole {} KiB stripe (Range), one keep-alive client",
            st.stripe >> 10
        ),
        Remote::Http(_) => format!(
            "http.client GET of the whole {} KiB stripe (Range), one keep-alive connection",
            st.stripe >> 10
        ),
    };
    Row {
        part,
        title: format!(
            "demand fetch from {}: median of {n} reads per round",
            remote.name()
        ),
        unit: "ms",
        higher_is_better: false,
        target: 1.2,
        ours_label: "4 KiB read (QD1) on an unfetched stripe, `copy_on_read: true`, no autofetch"
            .into(),
        ref_label,
        ours,
        reference,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Reads while hydrating
// ---------------------------------------------------------------------------------------------

fn read_spec(st: &Settings, round: usize) -> IoSpec {
    IoSpec {
        write: false,
        offset: 0,
        len: st.region,
        bs: 4096,
        qd: 32,
        order: Order::Random {
            seed: 0x5eed_0f2e_3073 ^ ((round as u64 + 1) << 40),
        },
    }
}

/// Our side: IOPS in the fetched region while autofetch hydrates the rest from Garage.
fn reads_ours(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    remote: &Remote,
    round: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<f64> {
    let env = remote.env();
    let cfg = lazy_config(
        f,
        st,
        remote,
        &[
            "copy_on_read: true".into(),
            "autofetch: true".into(),
            format!("autofetch_mib_per_sec: {}", st.fetch_mibs),
        ],
    );
    prepare_lazy_disk(bins, f, st, &cfg, &env)?;
    let mut be = start_backend_env(&bins.backend, &cfg, &env)?;
    let garage_pid = match remote {
        Remote::S3(g) => g.pid(0),
        Remote::Http(_) => None,
    };
    let iops = with_backend(&mut be, st.verbose, |be| {
        let mut client = connect_client(&f.vhost_sock, 1, 1 << 20, st.size)?;
        let chunk = 64 * 1024;
        for off in (0..st.region).step_by(chunk) {
            let got = client
                .read(0, off, chunk)
                .map_err(|e| anyhow!("read at {off}: {}", errno_name(e)))?;
            anyhow::ensure!(
                got == pattern_bytes(off, chunk),
                "read at {off}: data differs from the image"
            );
        }
        let s0 = ControlStatus::query(&f.ctl_sock)?;
        anyhow::ensure!(
            s0.fetched >= st.region.div_ceil(st.stripe),
            "the region is read, but only {} stripes are fetched",
            s0.fetched
        );
        let cpu = || {
            (
                process_cpu_time(be.guard.pid()),
                garage_pid.map(process_cpu_time).unwrap_or_default(),
            )
        };
        let (t, cpu0) = (Instant::now(), cpu());
        let w = run_io(
            client.queue(0),
            &read_spec(st, round),
            st.warmup,
            st.secs,
            None,
        );
        let (wall, cpu1) = (t.elapsed().as_secs_f64(), cpu());
        let s1 = ControlStatus::query(&f.ctl_sock)?;
        let mbs = (s1.fetched - s0.fetched) as f64 * st.stripe as f64 / 1e6 / wall;
        let cores = (
            (cpu1.0 - cpu0.0).as_secs_f64() / wall,
            (cpu1.1 - cpu0.1).as_secs_f64() / wall,
        );
        eprintln!(
            "reads round {}: hydrated {mbs:.0} MB/s during the window; CPU: backend {:.2}, \
             Garage {:.2} cores{}",
            round + 1,
            cores.0,
            cores.1,
            if s1.complete {
                " (WARNING: complete inside the window; lower UBIBLK_BENCH_FETCH_MIBS)"
            } else {
                ""
            }
        );
        notes.push(format!(
            "round {}: {mbs:.0} MB/s hydrated during the window; CPU used meanwhile: backend \
             {:.2} cores, Garage {:.2} cores{}",
            round + 1,
            cores.0,
            cores.1,
            if s1.complete {
                ", complete inside it"
            } else {
                ""
            }
        ));
        Ok(w.iops())
    })?;
    cleanup_lazy_disk(f);
    Ok(iops)
}

/// The reference side: the same reads on a backend serving the image as a plain local disk.
fn reads_reference(bins: &Bins, f: &Files, st: &Settings, round: usize) -> anyhow::Result<f64> {
    let cfg = BackendConfig::new(&f.image, &f.vhost_sock);
    let mut be = Backend::start(&bins.backend, &cfg)?;
    with_backend(&mut be, st.verbose, |_| {
        let mut client = connect_client(&f.vhost_sock, 1, 1 << 20, st.size)?;
        Ok(run_io(
            client.queue(0),
            &read_spec(st, round),
            st.warmup,
            st.secs,
            None,
        )
        .iops())
    })
}

/// The ceiling of `reads` on this machine: the same plain-disk reads as the reference, while a
/// second backend hydrates another disk from the same Garage at the same rate (the servers run
/// on the same two cores here; in a fleet they are elsewhere). Ours against this is what the
/// lazy layer itself costs.
fn reads_reference_loaded(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    g: &Garage,
    round: usize,
) -> anyhow::Result<f64> {
    let w = &f.work;
    let n = Files {
        work: w.clone(),
        image: f.image.clone(),
        base: w.join("neighbour-base.raw"),
        meta: w.join("neighbour-meta"),
        config: w.join("neighbour-config.yaml"),
        vhost_sock: w.join("neighbour-vhost.sock"),
        ctl_sock: w.join("neighbour-ctl.sock"),
        download: f.download.clone(),
    };
    let remote = Remote::S3(g);
    let env = remote.env();
    let cfg = lazy_config(
        &n,
        st,
        &remote,
        &[
            "autofetch: true".into(),
            format!("autofetch_mib_per_sec: {}", st.fetch_mibs),
        ],
    );
    prepare_lazy_disk(bins, &n, st, &cfg, &env)?;
    let mut neighbour = start_backend_env(&bins.backend, &cfg, &env)?;
    let r = with_backend(&mut neighbour, st.verbose, |_| {
        let t = Instant::now();
        while ControlStatus::query(&n.ctl_sock)?.fetched == 0 {
            anyhow::ensure!(t.elapsed() < STALL, "the neighbour does not hydrate");
            std::thread::sleep(POLL);
        }
        let iops = reads_reference(bins, f, st, round)?;
        let s = ControlStatus::query(&n.ctl_sock)?;
        anyhow::ensure!(
            !s.complete,
            "the neighbour's hydration ended inside the window"
        );
        Ok(iops)
    });
    cleanup_lazy_disk(&n);
    r
}

/// The `reads` row, or with `loaded` the `reads-loaded` row (the reference beside the same
/// hydration load).
fn part_reads(bins: &Bins, f: &Files, st: &Settings, g: &Garage, loaded: bool) -> Row {
    let remote = Remote::S3(g);
    let part = if loaded { "reads-loaded" } else { "reads" };
    let mut notes = Vec::new();
    let (ours, reference) = alternate(
        part,
        st.rounds,
        |round| reads_ours(bins, f, st, &remote, round, &mut notes),
        |round| match loaded {
            true => reads_reference_loaded(bins, f, st, g, round),
            false => reads_reference(bins, f, st, round),
        },
    );
    let (against, ref_label) = match loaded {
        true => (
            ", against the same load next to a plain disk",
            format!(
                "the image as a plain local disk, while a second backend hydrates another disk \
                 from the same Garage at {} MiB/s",
                st.fetch_mibs
            ),
        ),
        false => ("", "the image as a plain local disk (no lazy fetch)".into()),
    };
    Row {
        part,
        title: format!(
            "4 KiB random reads, QD32, 1 queue, in the first {} MiB (fetched), while the rest \
             hydrates from Garage{against}",
            st.region >> 20
        ),
        unit: "IOPS",
        higher_is_better: true,
        target: 0.85,
        ours_label: format!(
            "lazy disk, `image_url: s3://…`, `autofetch_mib_per_sec: {}`",
            st.fetch_mibs
        ),
        ref_label,
        ours,
        reference,
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// Archive
// ---------------------------------------------------------------------------------------------

/// A compressible 4 KiB block: 1 KiB of noise, then text lines naming the block.
fn compressible_block(block: u64, out: &mut [u8]) {
    pattern_block(block, &mut out[..1024]);
    let mut pos = 1024;
    let mut line = 0;
    while pos < out.len() {
        let l = format!(
            "block {block:010} line {line:03}: the quick brown fox jumps over the lazy dog\n"
        );
        let n = l.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&l.as_bytes()[..n]);
        pos += n;
        line += 1;
    }
}

/// The archive disk: 4 MiB holes alternating with 4 MiB of [`compressible_block`]s. Returns
/// its non-zero bytes.
fn create_archive_disk(path: &Path, size: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let file = File::create(path)?;
    file.set_len(size)?;
    let region = 4 * MIB;
    let mut buf = vec![0u8; region as usize];
    let mut nonzero = 0;
    for start in (0..size).step_by(region as usize) {
        if (start / region).is_multiple_of(2) {
            continue;
        }
        let len = region.min(size - start) as usize;
        for (i, b) in buf[..len].chunks_mut(4096).enumerate() {
            compressible_block(start / 4096 + i as u64, b);
        }
        file.write_all_at(&buf[..len], start)?;
        nonzero += len as u64;
    }
    file.sync_all()?;
    Ok(nonzero)
}

/// A KEK file (docs/formats.md): aes256-gcm with random key, IV and AAD.
fn write_kek(path: &Path) -> anyhow::Result<()> {
    let b64 = |n: usize| {
        let v: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
        base64::engine::general_purpose::STANDARD.encode(v)
    };
    std::fs::write(
        path,
        format!(
            "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
            b64(32),
            b64(12),
            b64(16)
        ),
    )?;
    Ok(())
}

struct ArchiveFiles {
    disk: PathBuf,
    config: PathBuf,
    kek: PathBuf,
    nonzero: u64,
}

fn archive_ours(
    archive: &Path,
    a: &ArchiveFiles,
    g: &Garage,
    st: &Settings,
    round: usize,
    stored: &mut Vec<f64>,
) -> anyhow::Result<f64> {
    // A fresh prefix each round: a second run to the same place would upload nothing new.
    let prefix = format!("archive-{}", round + 1);
    let t = Instant::now();
    let out = Command::new(archive)
        .arg("-f")
        .arg(&a.config)
        .arg("-k")
        .arg(&a.kek)
        .arg("--to")
        .arg(g.url(&prefix))
        .envs(g.env())
        .output()
        .context("running archive")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "archive -f {} -k {} --to {} failed ({}):\n{}{}",
            a.config.display(),
            a.kek.display(),
            g.url(&prefix),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if st.verbose {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let objects = g.list(&format!("{prefix}/"));
    anyhow::ensure!(
        objects.iter().any(|(k, _)| k.ends_with("/manifest.json")),
        "archive exited 0 but wrote no {prefix}/manifest.json: {objects:?}"
    );
    stored.push(objects.iter().map(|(_, s)| *s as f64).sum());
    Ok(st.size as f64 / 1e6 / secs)
}

fn archive_reference(
    a: &ArchiveFiles,
    g: &Garage,
    st: &Settings,
    round: usize,
    stored: &mut Vec<f64>,
) -> anyhow::Result<f64> {
    let key = format!("zstd-{}.zst", round + 1);
    let out = run_script(
        g.boto3(&["upload-zstd", &g.bucket(), &key, a.disk.to_str().unwrap()]),
        "zstd -T0 | boto3 upload",
    )?;
    let v: Vec<&str> = out.split_whitespace().collect();
    anyhow::ensure!(v.len() == 2, "reference printed {out:?}");
    let secs: f64 = v[0].parse()?;
    stored.push(v[1].parse()?);
    Ok(st.size as f64 / 1e6 / secs)
}

fn part_archive(bins: &Bins, f: &Files, st: &Settings, g: &Garage) -> Row {
    let mut row = Row {
        part: "archive",
        title: format!(
            "archive a {} MiB disk (half holes, half compressible data) to Garage",
            st.size >> 20
        ),
        unit: "MB/s",
        higher_is_better: true,
        target: 0.0,
        ours_label: "`archive -f CONFIG -k KEK --to s3://…` (wall time of the process)".into(),
        ref_label: "`zstd -T0 -c DISK` piped into a boto3 multipart upload".into(),
        ours: Side {
            samples: Vec::new(),
            error: None,
        },
        reference: Side {
            samples: Vec::new(),
            error: None,
        },
        notes: Vec::new(),
    };
    let a = (|| -> anyhow::Result<ArchiveFiles> {
        let disk = f.work.join("archive-disk.raw");
        eprintln!("creating {} ({} MiB)...", disk.display(), st.size >> 20);
        let nonzero = create_archive_disk(&disk, st.size)?;
        let config = f.work.join("archive-config.yaml");
        std::fs::write(
            &config,
            BackendConfig::new(&disk, f.work.join("archive.sock")).to_yaml(),
        )?;
        let kek = f.work.join("kek.yaml");
        write_kek(&kek)?;
        Ok(ArchiveFiles {
            disk,
            config,
            kek,
            nonzero,
        })
    })();
    let a = match a {
        Ok(a) => a,
        Err(e) => {
            let e = format!("{e:#}");
            eprintln!("archive: set-up FAILED: {e}");
            row.ours.error = Some(e.clone());
            row.reference.error = Some(e);
            return row;
        }
    };
    let (mut ours_stored, mut ref_stored) = (Vec::new(), Vec::new());
    let (ours, reference) = alternate(
        "archive",
        st.rounds,
        |round| match &bins.archive {
            Ok(bin) => archive_ours(bin, &a, g, st, round, &mut ours_stored),
            Err(e) => Err(anyhow!("{e}")),
        },
        |round| archive_reference(&a, g, st, round, &mut ref_stored),
    );
    row.ours = ours;
    row.reference = reference;
    let pct = |v: &[f64]| {
        if v.is_empty() {
            "—".to_string()
        } else {
            format!(
                "{} bytes ({:.1} % of the non-zero bytes)",
                fmt_thousands(median(v)),
                median(v) / a.nonzero as f64 * 100.0
            )
        }
    };
    row.notes.push(format!(
        "disk: {} bytes, {} of them non-zero",
        fmt_thousands(st.size as f64),
        fmt_thousands(a.nonzero as f64)
    ));
    row.notes.push(format!(
        "stored by `archive` (all its objects): {}",
        pct(&ours_stored)
    ));
    row.notes.push(format!(
        "stored by the reference (one zstd stream): {}",
        pct(&ref_stored)
    ));
    let _ = std::fs::remove_file(&a.disk);
    row
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn fmt_value(x: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{x:.2} ms"),
        _ => format!("{} {unit}", fmt_thousands(x)),
    }
}

fn side_cell(s: &Side, unit: &str) -> String {
    if s.samples.is_empty() {
        return "**FAILED**".into();
    }
    let (lo, hi) = min_max(&s.samples);
    format!(
        "{} ({}–{}){}",
        fmt_value(median(&s.samples), unit),
        fmt_value(lo, unit),
        fmt_value(hi, unit),
        if s.error.is_some() {
            " then **FAILED**"
        } else {
            ""
        }
    )
}

fn print_row(r: &Row) {
    println!();
    println!("### {} (`{}`)", r.title, r.part);
    println!();
    println!("- ours: {}", r.ours_label);
    println!("- reference: {}", r.ref_label);
    for n in &r.notes {
        println!("- {n}");
    }
    println!();
    println!("| ours | reference | ours / reference | target |");
    println!("|---|---|---|---|");
    let ratio = if r.ours.samples.is_empty() || r.reference.samples.is_empty() {
        "—".to_string()
    } else {
        let x = median(&r.ours.samples) / median(&r.reference.samples);
        let met = if r.higher_is_better {
            x >= r.target
        } else {
            x <= r.target
        };
        format!(
            "**{x:.2}×**{}",
            if r.target == 0.0 {
                ""
            } else if met {
                " (met)"
            } else {
                " (**not met**)"
            }
        )
    };
    let target = if r.target == 0.0 {
        "—".to_string()
    } else {
        format!(
            "{} {:.2}×",
            if r.higher_is_better { "≥" } else { "≤" },
            r.target
        )
    };
    println!(
        "| {} | {} | {ratio} | {target} |",
        side_cell(&r.ours, r.unit),
        side_cell(&r.reference, r.unit)
    );
    for (name, s) in [("ours", &r.ours), ("reference", &r.reference)] {
        if let Some(e) = &s.error {
            // The first line says what failed; the last, for a process that died, is the
            // last line of its log (usually the reason).
            let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
            let (first, last) = (lines.first().unwrap_or(&""), lines.last().unwrap_or(&""));
            println!();
            if lines.len() > 1 {
                println!("**{name} FAILED**: `{first}` … `{last}` (full error on stderr)");
            } else {
                println!("**{name} FAILED**: `{first}` (full error on stderr)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let size = (env_f64("UBIBLK_BENCH_SIZE_MB", 1024.0) as u64) << 20;
    let dir = PathBuf::from(std::env::var("UBIBLK_BENCH_DIR").unwrap_or("/dev/shm".into()));
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 3.0).max(1.0) as usize;
    let shift = env_f64("UBIBLK_BENCH_SHIFT", 11.0) as u8;
    let secs = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_SECS", 3.0));
    let warmup = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_WARMUP_SECS", 0.5));
    let region = ((env_f64("UBIBLK_BENCH_REGION_MB", 64.0) as u64) << 20).min(size);
    let window = (secs + warmup).as_secs_f64();
    let default_rate = ((((size - region) >> 20) as f64 / (2.0 * window)) as u64).clamp(1, 200);
    anyhow::ensure!(
        size > 0 && size.is_multiple_of(4096),
        "UBIBLK_BENCH_SIZE_MB must be > 0"
    );
    let st = Settings {
        size,
        shift,
        stripe: 512u64 << shift,
        rounds,
        conns: env_f64("UBIBLK_BENCH_CONNECTIONS", 16.0).max(1.0) as usize,
        demand_reads: env_f64("UBIBLK_BENCH_DEMAND_READS", 32.0).max(1.0) as usize,
        warmup,
        secs,
        region,
        fetch_mibs: env_f64("UBIBLK_BENCH_FETCH_MIBS", default_rate as f64).max(1.0) as u64,
        verbose: env_flag("UBIBLK_BENCH_VERBOSE"),
    };

    let mut parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    parts.extend(env_list("UBIBLK_BENCH_PARTS").unwrap_or_default());
    for p in &parts {
        anyhow::ensure!(
            PARTS.contains(&p.as_str()),
            "unknown part {p:?}: {}",
            PARTS.join(", ")
        );
    }
    let want = |p: &str| parts.is_empty() || parts.iter().any(|x| x == p);

    let bins = Bins {
        backend: backend_bin()?,
        init_metadata: init_metadata_bin()?,
        archive: bench_bin(
            "UBIBLK_ARCHIVE_BIN",
            option_env!("CARGO_BIN_EXE_archive"),
            "archive",
        )
        .map_err(|e| format!("{e:#}")),
    };
    warn_if_loaded();
    let machine = machine_description(&dir);

    let work = tempfile::Builder::new()
        .prefix("ubiblk-remote-bench")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot create a directory in {}", dir.display()))?;
    let w = work.path();
    let f = Files {
        work: w.to_path_buf(),
        image: w.join(IMAGE_KEY),
        base: w.join("base.raw"),
        meta: w.join("metadata"),
        config: w.join("config.yaml"),
        vhost_sock: w.join("vhost.sock"),
        ctl_sock: w.join("control.sock"),
        download: w.join("download.raw"),
    };
    eprintln!(
        "image {} MiB; stripes of {} KiB; {rounds} alternating rounds; parts: {}",
        size >> 20,
        st.stripe >> 10,
        PARTS
            .iter()
            .filter(|p| want(p))
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    );
    let needs_image = PARTS.iter().any(|p| *p != "archive" && want(p));
    let needs_garage = [
        "hydrate-s3",
        "demand-s3",
        "reads",
        "reads-loaded",
        "archive",
    ]
    .iter()
    .any(|p| want(p));
    let needs_nginx = ["hydrate-http", "demand-http"].iter().any(|p| want(p));
    if needs_image {
        eprintln!("creating {} ({} MiB)...", f.image.display(), size >> 20);
        create_pattern_file(&f.image, size)?;
    }
    // The servers keep their data next to the disks (UBIBLK_BENCH_DIR).
    let garage = needs_garage.then(|| {
        let t = Instant::now();
        let g = Garage::start_in(w);
        eprintln!("garage up in {:.2} s", t.elapsed().as_secs_f64());
        g
    });
    if let (Some(g), true) = (&garage, needs_image) {
        let t = Instant::now();
        g.put_file(IMAGE_KEY, &f.image);
        eprintln!(
            "image uploaded to Garage in {:.1} s (boto3 upload_file)",
            t.elapsed().as_secs_f64()
        );
    }
    let nginx = needs_nginx.then(|| Nginx::start(w));

    let mut rows = Vec::new();
    if let (true, Some(g)) = (want("hydrate-s3"), &garage) {
        rows.push(part_hydrate("hydrate-s3", &bins, &f, &st, &Remote::S3(g)));
    }
    if let (true, Some(n)) = (want("hydrate-http"), &nginx) {
        rows.push(part_hydrate(
            "hydrate-http",
            &bins,
            &f,
            &st,
            &Remote::Http(n),
        ));
    }
    if let (true, Some(g)) = (want("demand-s3"), &garage) {
        rows.push(part_demand("demand-s3", &bins, &f, &st, &Remote::S3(g)));
    }
    if let (true, Some(n)) = (want("demand-http"), &nginx) {
        rows.push(part_demand("demand-http", &bins, &f, &st, &Remote::Http(n)));
    }
    if let (true, Some(g)) = (want("reads"), &garage) {
        rows.push(part_reads(&bins, &f, &st, g, false));
    }
    if let (true, Some(g)) = (want("reads-loaded"), &garage) {
        rows.push(part_reads(&bins, &f, &st, g, true));
    }
    if let (true, Some(g)) = (want("archive"), &garage) {
        rows.push(part_archive(&bins, &f, &st, g));
    }
    drop(nginx);
    drop(garage);
    drop(work);

    // ----- Report (markdown) -----
    println!();
    println!("## Remote stripe sources benchmark");
    println!();
    println!("`cargo bench --bench remote` (benches/remote.rs). Machine:");
    println!();
    for l in &machine {
        println!("- {l}");
    }
    println!(
        "- image: {} MiB of non-zero pattern data; stripes of {} KiB (`init-metadata -s {shift}`); \
         servers on loopback: Garage 1 node (tests/common/servers/), nginx; median (min–max) \
         of {rounds} alternating rounds",
        size >> 20,
        st.stripe >> 10
    );
    for r in &rows {
        print_row(r);
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.ours.error.is_some() || r.reference.error.is_some())
        .map(|r| r.part)
        .collect();
    if !failed.is_empty() {
        println!();
        println!("**Rows with a failed side: {}**", failed.join(", "));
    }
    Ok(())
}
