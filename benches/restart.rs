//! Restart benchmarks (README, "Restarts and upgrades"), two measurements in one run:
//!
//! 1. **tracking**: the data path's cost of inflight tracking. libblkio, the client of the
//!    vhost_blk bench, does not negotiate INFLIGHT_SHMFD, so this drives the same backend
//!    binary with our frontend (`src/frontend`): it reads the whole disk with 4 KiB requests,
//!    32 in flight on one queue, once with an inflight region set (tracking on) and once
//!    without; rounds alternate. Throughput in requests per second; the ratio on/off.
//! 2. **pause**: the backend's part of the guest-visible pause per restart: a request
//!    completed, SIGKILL, a new process started, the frontend reconnecting as soon as the
//!    socket answers (no reconnect timer) with the first process's region, resuming the ring
//!    and completing a new read; the time from the kill to that completion. A VMM adds its own
//!    reconnect delay (QEMU's `reconnect-ms`; tests/guest/main.rs measures the whole pause).
//!
//! Run: `cargo bench --bench restart [-- tracking|pause]`.
//!
//! Environment:
//!   UBIBLK_BENCH_DIR        where the disk lives (default /dev/shm)
//!   UBIBLK_BENCH_SIZE_MB    disk size (default 256)
//!   UBIBLK_BENCH_ROUNDS     rounds per measurement (default 7)
//!   UBIBLK_BACKEND_BIN      vhost-backend to run (default: this crate's)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::Context;
use bench::*;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};

const T: Duration = Duration::from_secs(30);

fn options() -> IoOptions {
    IoOptions {
        queue_size: 128,
        depth: 32,
        request_size: 4096,
        timeout: T,
        // Our own backend: a used length of 0 would be a bug here.
        strict: true,
    }
}

/// Connects as soon as the socket answers (1 ms polls, unlike `BlkFrontend::connect`'s 20 ms).
fn connect_now(socket: &Path) -> anyhow::Result<BlkFrontend> {
    let t0 = Instant::now();
    loop {
        match BlkFrontend::connect(socket, Duration::ZERO) {
            Ok(fe) => return Ok(fe),
            Err(_) if t0.elapsed() < T => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e).context("connecting"),
        }
    }
}

/// Brings a session up (with an inflight region if `inflight`); returns it and the region.
fn session(
    socket: &Path,
    inflight: bool,
) -> anyhow::Result<(BlkFrontend, Option<(Inflight, std::fs::File)>)> {
    let fe = connect_now(socket)?;
    let mut fe = if inflight { fe.with_inflight() } else { fe };
    fe.setup()?;
    let cfg = fe.read_config()?;
    let g = Geometry::new(&options(), &cfg)?;
    let region = if inflight {
        let (info, file) = fe.get_inflight(1, g.queue_size)?;
        fe.set_inflight(&info, &file)?;
        Some((info, file))
    } else {
        None
    };
    fe.setup_memory(&g)?;
    fe.setup_virtqueue(&g)?;
    Ok((fe, region))
}

type Inflight = vhost::vhost_user::message::VhostUserInflight;

fn tracking(bin: &Path, cfg: &BackendConfig, dir: &Path, rounds: usize) -> anyhow::Result<()> {
    let out = dir.join("ubiblk-bench-restart-copy.raw");
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        // Alternate which goes first, so that a trend in the machine's load favours neither.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for inflight in order {
            let mut be = start_backend_env(bin, cfg, &[])?;
            let (mut fe, _region) = session(&cfg.socket, inflight)?;
            let f = std::fs::File::create(&out)?;
            let t0 = Instant::now();
            let info = fe.copy_disk(&f, T, |_| {})?;
            let secs = t0.elapsed().as_secs_f64();
            let rate = info.requests as f64 / secs;
            eprintln!(
                "tracking {}: round {round}: {} requests/s ({:.0} MB/s)",
                if inflight { "on " } else { "off" },
                fmt_thousands(rate),
                info.bytes as f64 / secs / 1e6
            );
            rates[usize::from(inflight)].push(rate);
            drop(fe);
            stop_backend(&mut be)?;
        }
    }
    let _ = std::fs::remove_file(&out);
    let (off, on) = (median(&rates[0]), median(&rates[1]));
    println!("| tracking | median requests/s | spread |");
    println!("|---|---|---|");
    println!(
        "| off | {} | {:.1} % |",
        fmt_thousands(off),
        spread_pct(&rates[0])
    );
    println!(
        "| on | {} | {:.1} % |",
        fmt_thousands(on),
        spread_pct(&rates[1])
    );
    println!(
        "\non/off: {:.3} (median of {rounds} rounds each)\n",
        on / off
    );
    Ok(())
}

fn pause(bin: &Path, cfg: &BackendConfig, rounds: usize) -> anyhow::Result<()> {
    let mut be = start_backend_env(bin, cfg, &[])?;
    let (mut fe, region) = session(&cfg.socket, true)?;
    let (info, file) = region.context("no inflight region")?;
    fe.submit_read_in_slot(0, 0, 4096)?;
    fe.wait_completions(1, T)?;
    let mut pauses = Vec::new();
    for round in 0..rounds {
        let down = Instant::now();
        be.guard.kill();
        let _ = std::fs::remove_file(&cfg.socket);
        let guard = Backend::spawn_as_is(bin, cfg, &[], |_| {})?;
        be = Backend {
            guard,
            config: cfg.clone(),
            config_path: PathBuf::new(),
        };
        // Reconnect once the socket exists (1 ms polls; a connect between its bind and listen
        // is retried by `reconnect` after 20 ms, rarely).
        while !cfg.socket.exists() && down.elapsed() < T {
            std::thread::sleep(Duration::from_millis(1));
        }
        fe = fe.reconnect(&cfg.socket, T)?;
        fe.setup()?;
        fe.set_inflight(&info, &file)?;
        fe.resume_virtqueue()?;
        fe.submit_read_in_slot(0, 8, 4096)?;
        fe.wait_completions(1, T)?;
        let p = down.elapsed();
        eprintln!("pause: round {round}: {:.1} ms", p.as_secs_f64() * 1e3);
        pauses.push(p.as_secs_f64() * 1e3);
    }
    stop_backend(&mut be)?;
    let (min, max) = min_max(&pauses);
    println!("| kill to first completion | median | min | max |");
    println!("|---|---|---|---|");
    println!(
        "| {rounds} restarts | {:.1} ms | {min:.1} ms | {max:.1} ms |\n",
        median(&pauses)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);
    warn_if_loaded();
    let bin = backend_bin()?;
    let dir = PathBuf::from(std::env::var("UBIBLK_BENCH_DIR").unwrap_or("/dev/shm".into()));
    let size = env_f64("UBIBLK_BENCH_SIZE_MB", 256.0) as u64 * 1024 * 1024;
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 7.0) as usize;
    let disk = dir.join(format!("ubiblk-bench-restart-{}M.raw", size >> 20));
    ensure_pattern_file(&disk, size)?;
    let scratch = scratch_dir("ubiblk-bench-restart");
    let mut cfg = BackendConfig::new(&disk, scratch.path().join("vhost.sock"));
    cfg.queue_size = 128;
    cfg.seg_count_max = 4;
    println!("vhost-backend: {}\n", bin.display());
    if want("tracking") {
        tracking(&bin, &cfg, &dir, rounds)?;
    }
    if want("pause") {
        pause(&bin, &cfg, rounds)?;
    }
    let _ = std::fs::remove_file(&disk);
    Ok(())
}
