//! Lazy stripe fetch benchmark (`src/lazy/`), two measurements in one run:
//!
//! 1. **copy**: how fast `autofetch: true` copies a whole image into a fresh base disk, against
//!    `cp --sparse=never` of the same image on the same file system. Rounds alternate the two.
//!    The autofetch time runs from spawning `vhost-backend` until a `status` query on its
//!    `control_socket` reports `"complete":true` (polled every 20 ms); the time from the first
//!    status reply (without the backend's start-up) is printed too. The first fetched base file
//!    is compared with the image (`cmp`), so the bench cannot measure a fetch that copied
//!    nothing.
//! 2. **reads**: guest-visible 4 KiB random-read IOPS (QD32, one queue, libblkio client) inside
//!    a region that is already fetched, while autofetch copies the rest of the image with a
//!    rate limit (`autofetch_mib_per_sec`), against the same reads on a backend without
//!    lazy fetch (the image itself as a plain disk), and on the lazy backend once the fetch is
//!    complete. The region is fetched first by reading it through the client (`copy_on_read`),
//!    which also checks its content.
//!
//! Run: `cargo bench --bench lazy_fetch [-- copy|reads]`. It prints a markdown report (machine,
//! commands, tables) on stdout and the per-round numbers on stderr.
//!
//! Environment:
//!   UBIBLK_BENCH_DIR           where image, base disk and metadata live (default /dev/shm)
//!   UBIBLK_BENCH_SIZE_MB       image (= disk) size in MiB (default 1024)
//!   UBIBLK_BENCH_ROUNDS        alternating rounds per measurement (default 3)
//!   UBIBLK_BENCH_PARTS         comma-separated: copy, reads (default both; also positional argv)
//!   UBIBLK_BENCH_SHIFT         stripe size as init-metadata's -s (default 11 = 1 MiB)
//!   UBIBLK_BENCH_SECS          measured seconds per read window (default 3)
//!   UBIBLK_BENCH_WARMUP_SECS   unmeasured warm-up per read window (default 0.5)
//!   UBIBLK_BENCH_REGION_MB     fetched region the reads stay in (default 64)
//!   UBIBLK_BENCH_FETCH_MIBS    autofetch_mib_per_sec during the read window (default: the rate
//!                              at which the rest of the image takes twice the window, at most
//!                              200; 137 for 1 GiB)
//!   UBIBLK_BENCH_COPY_WARMUP   1 (default): one unmeasured cp + autofetch before the copy rounds
//!                              (the first touch of fresh tmpfs pages is slow on these VMs)
//!   UBIBLK_BENCH_KEEP=1        keep the image file for the next run
//!   UBIBLK_BENCH_VERBOSE=1     print backend logs on success too
//!   UBIBLK_BACKEND_BIN         vhost-backend (default: cargo's CARGO_BIN_EXE_vhost-backend)
//!   UBIBLK_INIT_METADATA_BIN   init-metadata (default: cargo's CARGO_BIN_EXE_init-metadata)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{anyhow, bail, Context};
use bench::*;
use common::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How often the control socket is asked for `status` while waiting for a fetch.
const POLL: Duration = Duration::from_millis(20);
/// A fetch making no progress for this long is a failure.
const STALL: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// Files of one run, all inside a private directory of UBIBLK_BENCH_DIR.
struct Files {
    image: PathBuf,
    copy: PathBuf,
    base: PathBuf,
    meta: PathBuf,
    config: PathBuf,
    vhost_sock: PathBuf,
    ctl_sock: PathBuf,
}

struct Bins {
    backend: PathBuf,
    init_metadata: PathBuf,
}

struct Settings {
    size: u64,
    shift: u8,
    rounds: usize,
    warmup: Duration,
    secs: Duration,
    region: u64,
    fetch_mibs: u64,
    copy_warmup: bool,
    verbose: bool,
}

fn lazy_config(f: &Files, copy_on_read: bool, rate_mibs: Option<u64>) -> BackendConfig {
    let cfg = BackendConfig::new(&f.base, &f.vhost_sock)
        .extra_path("image_path", &f.image)
        .extra_path("metadata_path", &f.meta)
        .extra(format!("copy_on_read: {copy_on_read}"))
        .extra("autofetch: true")
        .extra_path("control_socket", &f.ctl_sock);
    match rate_mibs {
        Some(r) => cfg.extra(format!("autofetch_mib_per_sec: {r}")),
        None => cfg,
    }
}

/// A fresh sparse base disk of `size` bytes and fresh metadata for it (`init-metadata`).
fn prepare_lazy_disk(
    bins: &Bins,
    f: &Files,
    cfg: &BackendConfig,
    size: u64,
    shift: u8,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&f.base);
    let _ = std::fs::remove_file(&f.meta);
    File::create(&f.base)?.set_len(size)?;
    std::fs::write(&f.config, cfg.to_yaml())?;
    let out = Command::new(&bins.init_metadata)
        .arg("-f")
        .arg(&f.config)
        .arg("-s")
        .arg(shift.to_string())
        .output()
        .context("running init-metadata")?;
    if !out.status.success() {
        bail!(
            "init-metadata -f {} -s {shift} failed ({}):\n{}{}",
            f.config.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part 1: whole-image copy
// ---------------------------------------------------------------------------------------------

/// Seconds for `cp --sparse=never image copy` plus an fsync of the copy.
fn time_cp(f: &Files) -> anyhow::Result<f64> {
    let _ = std::fs::remove_file(&f.copy);
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    let st = Command::new("cp")
        .arg("--sparse=never")
        .arg(&f.image)
        .arg(&f.copy)
        .status()
        .context("running cp")?;
    anyhow::ensure!(st.success(), "cp failed: {st}");
    File::open(&f.copy)?.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&f.copy)?;
    Ok(secs)
}

struct FetchTime {
    /// From spawning the backend to the `complete` reply.
    from_spawn: f64,
    /// From the first status reply to the `complete` reply.
    from_first_reply: f64,
    backend_cpu: f64,
}

/// Autofetch (no rate limit) of the whole image into a fresh base disk.
fn time_autofetch(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    verify: bool,
) -> anyhow::Result<FetchTime> {
    let cfg = lazy_config(f, false, None);
    prepare_lazy_disk(bins, f, &cfg, st.size, st.shift)?;
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t0 = Instant::now();
    let mut be = Backend::start(&bins.backend, &cfg)?;
    let (status, first, done) = wait_fetch_complete(&mut be, &f.ctl_sock, POLL, STALL)?;
    let backend_cpu = process_cpu_time(be.guard.pid()).as_secs_f64();
    let stripes = st.size.div_ceil(512 << st.shift);
    if status.stripes != stripes || status.fetched != stripes {
        bail!(
            "complete, but expected {stripes} stripes all fetched: {}",
            status.raw
        );
    }
    if status.written != 0 {
        eprintln!(
            "warning: no client wrote, yet `written` is not 0: {}",
            status.raw
        );
    }
    stop_backend(&mut be)?;
    if st.verbose {
        eprintln!("--- vhost-backend log ---\n{}", be.log());
    }
    if verify {
        cmp_files(&f.image, &f.base).context("the fetched base disk differs from the image")?;
        eprintln!("  cmp: the fetched base disk equals the image");
    }
    let _ = std::fs::remove_file(&f.base);
    let _ = std::fs::remove_file(&f.meta);
    Ok(FetchTime {
        from_spawn: (done - t0).as_secs_f64(),
        from_first_reply: (done - first).as_secs_f64(),
        backend_cpu,
    })
}

struct CopyResults {
    cp: Vec<f64>,
    fetch: Vec<FetchTime>,
}

fn part_copy(bins: &Bins, f: &Files, st: &Settings) -> anyhow::Result<CopyResults> {
    let mb = st.size as f64 / 1e6;
    let mut r = CopyResults {
        cp: Vec::new(),
        fetch: Vec::new(),
    };
    if st.copy_warmup {
        // Fresh tmpfs pages are slow to touch the first time on this VM; not counted. The
        // fetched disk is checked here.
        let s = time_cp(f)?;
        let t = time_autofetch(bins, f, st, true)?;
        eprintln!(
            "copy  warm-up (not counted): cp {:.0} MB/s, autofetch {:.0} MB/s",
            mb / s,
            mb / t.from_spawn
        );
    }
    for round in 0..st.rounds {
        let cp_first = round % 2 == 0;
        for step in 0..2 {
            if (step == 0) == cp_first {
                let s = time_cp(f)?;
                eprintln!(
                    "copy  round {}: cp         {s:6.3} s {:8.0} MB/s",
                    round + 1,
                    mb / s
                );
                r.cp.push(s);
            } else {
                let verify = !st.copy_warmup && r.fetch.is_empty();
                let t = time_autofetch(bins, f, st, verify)?;
                eprintln!(
                    "copy  round {}: autofetch  {:6.3} s {:8.0} MB/s  ({:.0} MB/s from the first status reply; backend cpu {:.2} s)",
                    round + 1,
                    t.from_spawn,
                    mb / t.from_spawn,
                    mb / t.from_first_reply,
                    t.backend_cpu
                );
                r.fetch.push(t);
            }
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Part 2: reads while autofetch runs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct FetchDuring {
    bytes: u64,
    secs: f64,
    complete_at_end: bool,
}

#[derive(Clone, Copy, Debug)]
struct ReadSample {
    iops: f64,
    backend_cpu: f64,
    client_cpu: f64,
    fetch: Option<FetchDuring>,
}

fn read_spec(st: &Settings, round: usize) -> IoSpec {
    IoSpec {
        write: false,
        offset: 0,
        len: st.region,
        bs: 4096,
        qd: 32,
        order: Order::Random {
            seed: 0x1234_5678_9abc_def1 ^ ((round as u64 + 1) << 40),
        },
    }
}

/// One read window on queue 0; with `ctl`, also how far the fetch moved during the window.
fn measure_reads(
    client: &mut Client,
    pid: u32,
    ctl: Option<&Path>,
    spec: &IoSpec,
    st: &Settings,
) -> anyhow::Result<ReadSample> {
    let barrier = Barrier::new(2);
    let q = client.queue(0);
    let (w, cpu, wall, s0, s1) = std::thread::scope(|s| {
        let h = s.spawn(|| run_io(q, spec, st.warmup, st.secs, Some(&barrier)));
        barrier.wait();
        std::thread::sleep(st.warmup);
        let s0 = ctl.map(ControlStatus::query).transpose();
        let cpu0 = process_cpu_time(pid);
        let t0 = Instant::now();
        std::thread::sleep(st.secs);
        let cpu = process_cpu_time(pid) - cpu0;
        let wall = t0.elapsed();
        let s1 = ctl.map(ControlStatus::query).transpose();
        let w = h.join();
        (w, cpu, wall, s0, s1)
    });
    let w = w.map_err(|_| anyhow!("client thread panicked (see above)"))?;
    let fetch = match (s0?, s1?) {
        (Some(a), Some(b)) => Some(FetchDuring {
            bytes: (b.fetched - a.fetched) * a.stripe_bytes,
            secs: wall.as_secs_f64(),
            complete_at_end: b.complete,
        }),
        _ => None,
    };
    Ok(ReadSample {
        iops: w.iops(),
        backend_cpu: cpu.as_secs_f64() / wall.as_secs_f64(),
        client_cpu: w.cpu.as_secs_f64() / w.elapsed.as_secs_f64(),
        fetch,
    })
}

/// Reads without lazy fetch: a plain backend serving the image itself.
fn reads_plain(bins: &Bins, f: &Files, st: &Settings, round: usize) -> anyhow::Result<ReadSample> {
    let cfg = BackendConfig::new(&f.image, &f.vhost_sock);
    let mut be = Backend::start(&bins.backend, &cfg)?;
    let r = (|| {
        let mut client = connect_client(&f.vhost_sock, 1, 1 << 20, st.size)?;
        measure_reads(&mut client, be.guard.pid(), None, &read_spec(st, round), st)
    })();
    if r.is_err() || st.verbose {
        eprintln!("--- vhost-backend (plain) log ---\n{}", be.log());
    }
    stop_backend(&mut be)?;
    r
}

/// Reads on a lazy backend: fetch the region through the client (copy_on_read, content checked),
/// measure while autofetch runs at the limited rate, wait for completion, measure again.
/// Returns (during fetch, after completion).
fn reads_lazy(
    bins: &Bins,
    f: &Files,
    st: &Settings,
    round: usize,
    verify: bool,
) -> anyhow::Result<(ReadSample, ReadSample)> {
    let cfg = lazy_config(f, true, Some(st.fetch_mibs));
    prepare_lazy_disk(bins, f, &cfg, st.size, st.shift)?;
    let mut be = Backend::start(&bins.backend, &cfg)?;
    let r = (|| -> anyhow::Result<(ReadSample, ReadSample)> {
        let mut client = connect_client(&f.vhost_sock, 1, 1 << 20, st.size)?;
        let chunk = 64 * 1024;
        let t = Instant::now();
        for off in (0..st.region).step_by(chunk) {
            let got = client
                .read(0, off, chunk)
                .map_err(|e| anyhow!("read at {off}: {}", errno_name(e)))?;
            if got != pattern_bytes(off, chunk) {
                bail!("read at {off}: data differs from the image");
            }
        }
        let s = ControlStatus::query(&f.ctl_sock)?;
        let region_stripes = st.region.div_ceil(s.stripe_bytes);
        eprintln!(
            "reads round {}: first {} MiB read through the client in {:.2} s; {}",
            round + 1,
            st.region / MIB,
            t.elapsed().as_secs_f64(),
            s.raw
        );
        anyhow::ensure!(
            s.fetched >= region_stripes,
            "after reading the region with copy_on_read, only {} stripes are fetched (want >= {region_stripes})",
            s.fetched
        );
        if s.complete {
            eprintln!("warning: autofetch already complete before the read window; lower UBIBLK_BENCH_FETCH_MIBS");
        }
        let pid = be.guard.pid();
        let during = measure_reads(
            &mut client,
            pid,
            Some(&f.ctl_sock),
            &read_spec(st, round),
            st,
        )?;
        let (done, _, _) = wait_fetch_complete(&mut be, &f.ctl_sock, POLL, STALL)?;
        anyhow::ensure!(
            done.fetched == done.stripes,
            "complete, but not all stripes fetched: {}",
            done.raw
        );
        let after = measure_reads(&mut client, pid, None, &read_spec(st, round), st)?;
        Ok((during, after))
    })();
    if r.is_err() || st.verbose {
        eprintln!("--- vhost-backend (lazy) log ---\n{}", be.log());
    }
    stop_backend(&mut be)?;
    if r.is_ok() && verify {
        cmp_files(&f.image, &f.base).context(
            "base disk fetched by copy_on_read + rate-limited autofetch differs from the image",
        )?;
        eprintln!("  cmp: the fetched base disk equals the image");
    }
    let _ = std::fs::remove_file(&f.base);
    let _ = std::fs::remove_file(&f.meta);
    r
}

struct ReadResults {
    plain: Vec<ReadSample>,
    during: Vec<ReadSample>,
    after: Vec<ReadSample>,
}

fn part_reads(bins: &Bins, f: &Files, st: &Settings) -> anyhow::Result<ReadResults> {
    let mut r = ReadResults {
        plain: Vec::new(),
        during: Vec::new(),
        after: Vec::new(),
    };
    let line = |round: usize, name: &str, s: &ReadSample| {
        let mut l = format!(
            "reads round {}: {name:<20} {:>9.0} IOPS  client cpu {:.2}  backend cpu {:.2}",
            round + 1,
            s.iops,
            s.client_cpu,
            s.backend_cpu
        );
        if let Some(fd) = s.fetch {
            l += &format!(
                "  fetched {:.0} MB/s during the window{}",
                fd.bytes as f64 / 1e6 / fd.secs,
                if fd.complete_at_end {
                    " (WARNING: fetch completed inside the window)"
                } else {
                    ""
                }
            );
        }
        eprintln!("{l}");
    };
    for round in 0..st.rounds {
        let plain_first = round % 2 == 0;
        for step in 0..2 {
            if (step == 0) == plain_first {
                let s = reads_plain(bins, f, st, round)?;
                line(round, "no lazy fetch", &s);
                r.plain.push(s);
            } else {
                let (d, a) = reads_lazy(bins, f, st, round, r.during.is_empty())?;
                line(round, "during autofetch", &d);
                line(round, "autofetch complete", &a);
                r.during.push(d);
                r.after.push(a);
            }
        }
    }
    Ok(r)
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
    let fetch_mibs = env_f64("UBIBLK_BENCH_FETCH_MIBS", default_rate as f64).max(1.0) as u64;
    let keep = env_flag("UBIBLK_BENCH_KEEP");
    let verbose = env_flag("UBIBLK_BENCH_VERBOSE");
    anyhow::ensure!(
        size > 0 && size.is_multiple_of(4096),
        "UBIBLK_BENCH_SIZE_MB must be > 0"
    );

    let mut parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    parts.extend(env_list("UBIBLK_BENCH_PARTS").unwrap_or_default());
    for p in &parts {
        anyhow::ensure!(
            p == "copy" || p == "reads",
            "unknown part {p:?}: copy, reads"
        );
    }
    let want = |p: &str| parts.is_empty() || parts.iter().any(|x| x == p);

    let bins = Bins {
        backend: backend_bin()?,
        init_metadata: init_metadata_bin()?,
    };
    warn_if_loaded();
    let machine = machine_description(&dir);

    let image = dir.join(format!("ubiblk-lazy-image-{}M.raw", size >> 20));
    ensure_pattern_file(&image, size)?;
    let work = tempfile::Builder::new()
        .prefix("ubiblk-lazy-bench")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot create a directory in {}", dir.display()))?;
    let w = work.path();
    let f = Files {
        image: image.clone(),
        copy: w.join("copy.raw"),
        base: w.join("base.raw"),
        meta: w.join("metadata"),
        config: w.join("config.yaml"),
        vhost_sock: w.join("vhost.sock"),
        ctl_sock: w.join("control.sock"),
    };
    let st = Settings {
        size,
        shift,
        rounds,
        warmup,
        secs,
        region,
        fetch_mibs,
        copy_warmup: env_f64("UBIBLK_BENCH_COPY_WARMUP", 1.0) != 0.0,
        verbose,
    };
    let stripe = 512u64 << shift;
    eprintln!(
        "image {} MiB at {}; stripes of {} KiB; {rounds} alternating rounds",
        size >> 20,
        image.display(),
        stripe >> 10
    );

    let result = (|| -> anyhow::Result<(Option<CopyResults>, Option<ReadResults>)> {
        let copy = if want("copy") {
            Some(part_copy(&bins, &f, &st)?)
        } else {
            None
        };
        let reads = if want("reads") {
            Some(part_reads(&bins, &f, &st)?)
        } else {
            None
        };
        Ok((copy, reads))
    })();
    drop(work);
    if !keep {
        let _ = std::fs::remove_file(&image);
    }
    let (copy, reads) = result?;

    // ----- Report (markdown) -----
    let mib = size >> 20;
    println!();
    println!("## Lazy stripe fetch benchmark");
    println!();
    println!("`cargo bench --bench lazy_fetch` (benches/lazy_fetch.rs). Machine:");
    println!();
    for l in &machine {
        println!("- {l}");
    }
    println!(
        "- image: {mib} MiB of non-zero pattern data; disk (`path`) the same size; stripes of {} KiB \
         (`init-metadata -s {shift}`); median of {rounds} alternating rounds",
        stripe >> 10
    );
    if let Some(c) = &copy {
        let mb = size as f64 / 1e6;
        let cp: Vec<f64> = c.cp.iter().map(|s| mb / s).collect();
        let fe: Vec<f64> = c.fetch.iter().map(|t| mb / t.from_spawn).collect();
        let fe1: Vec<f64> = c.fetch.iter().map(|t| mb / t.from_first_reply).collect();
        let cpu: Vec<f64> = c.fetch.iter().map(|t| t.backend_cpu).collect();
        let ratio = median(&fe) / median(&cp);
        println!();
        println!("### Whole-image fetch vs cp");
        println!();
        println!("- cp: `cp --sparse=never IMAGE COPY` + fsync(COPY); the copy is deleted after each round");
        println!(
            "- autofetch: fresh sparse base file, `init-metadata -f CONFIG -s {shift}`, then \
             `vhost-backend -f CONFIG` with `autofetch: true` (no rate limit, no client connected); \
             timed from spawning the backend until `status` on `control_socket` (polled every {} ms) \
             reports `\"complete\":true`. The first fetched base disk was checked equal to the image (`cmp`).",
            POLL.as_millis()
        );
        println!();
        println!("| copy of {mib} MiB | median MB/s | min–max MB/s (spread) |");
        println!("|---|---|---|");
        let row = |name: &str, v: &[f64]| {
            let (lo, hi) = min_max(v);
            println!(
                "| {name} | {} | {}–{} (±{:.0} %) |",
                fmt_thousands(median(v)),
                fmt_thousands(lo),
                fmt_thousands(hi),
                spread_pct(v) / 2.0
            );
        };
        row("`cp --sparse=never` + fsync", &cp);
        row("vhost-backend autofetch", &fe);
        row("autofetch, from the first status reply", &fe1);
        let pair: Vec<f64> =
            c.cp.iter()
                .zip(&c.fetch)
                .map(|(cp, t)| cp / t.from_spawn)
                .collect();
        let (plo, phi) = min_max(&pair);
        println!(
            "| **autofetch / cp** | **{ratio:.2}×** (target ≥ 0.70: {}) | per-round ratios {plo:.2}–{phi:.2}, median {:.2} |",
            if ratio >= 0.7 { "met" } else { "**not met**" },
            median(&pair)
        );
        println!();
        println!(
            "Backend CPU for the whole fetch: median {:.2} s.",
            median(&cpu)
        );
    }
    if let Some(r) = &reads {
        let iops = |v: &[ReadSample]| v.iter().map(|s| s.iops).collect::<Vec<_>>();
        let cpu = |v: &[ReadSample]| median(&v.iter().map(|s| s.backend_cpu).collect::<Vec<_>>());
        let base = median(&iops(&r.plain));
        let fetch_rates: Vec<f64> = r
            .during
            .iter()
            .filter_map(|s| s.fetch.map(|f| f.bytes as f64 / 1e6 / f.secs))
            .collect();
        let completed_inside = r
            .during
            .iter()
            .filter(|s| s.fetch.is_some_and(|f| f.complete_at_end))
            .count();
        println!();
        println!("### Guest reads while autofetch runs");
        println!();
        println!(
            "- 4 KiB random reads, QD32, 1 queue (libblkio client), confined to the first {} MiB; \
             {:.1} s windows after {:.1} s warm-up",
            region >> 20,
            secs.as_secs_f64(),
            warmup.as_secs_f64()
        );
        println!(
            "- no lazy fetch: `vhost-backend` with the image itself as `path` (no `image_path`)"
        );
        println!(
            "- lazy: fresh base disk, `copy_on_read: true`, `autofetch: true`, \
             `autofetch_mib_per_sec: {fetch_mibs}`; the region is fetched first by reading it through \
             the client (content checked against the image); then the window runs while autofetch \
             copies the rest; then, once `status` reports complete, the same window again"
        );
        println!();
        println!("| 4 KiB random read, QD32, 1 queue | median IOPS | min–max (spread) | backend CPU (cores) | vs no lazy fetch | per-round ratios |");
        println!("|---|---|---|---|---|---|");
        let row = |name: &str, v: &[ReadSample]| {
            let x = iops(v);
            let (lo, hi) = min_max(&x);
            // The same round's plain measurement ran right before or after this one.
            let pair: Vec<f64> = x.iter().zip(&r.plain).map(|(a, p)| a / p.iops).collect();
            let (plo, phi) = min_max(&pair);
            let pairs = if std::ptr::eq(v, &r.plain[..]) {
                "—".to_string()
            } else {
                format!("{plo:.2}–{phi:.2}, median {:.2}", median(&pair))
            };
            println!(
                "| {name} | {} | {}–{} (±{:.0} %) | {:.2} | {:.2}× | {pairs} |",
                fmt_thousands(median(&x)),
                fmt_thousands(lo),
                fmt_thousands(hi),
                spread_pct(&x) / 2.0,
                cpu(v),
                median(&x) / base,
            );
        };
        row("no lazy fetch", &r.plain);
        row(
            &format!(
                "**during autofetch** (measured {:.0} MB/s of fetch)",
                median(&fetch_rates)
            ),
            &r.during,
        );
        row("lazy, autofetch complete", &r.after);
        if completed_inside > 0 {
            println!();
            println!(
                "**Warning**: in {completed_inside} of {rounds} rounds the fetch completed inside the \
                 window; lower UBIBLK_BENCH_FETCH_MIBS."
            );
        }
    }
    Ok(())
}
