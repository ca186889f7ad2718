//! Moving a disk host to host: our `ubiblk://` source hydrating from our stripe server
//! (TLS-PSK, over loopback), against a plain TCP copy of the same bytes, in the same run.
//! Alternating rounds (ours first in odd rounds, the copy first in even ones); medians.
//!
//! Rows:
//!
//! * `hydrate`: host A serves a plain disk of UBIBLK_BENCH_SIZE_MB (pattern bytes) with
//!   `stripe_server`; host B, a fresh sparse disk with `image_url: ubiblk://A`,
//!   `autofetch: true` and `fetch_connections` UBIBLK_BENCH_CONNECTIONS, is timed from
//!   spawning `vhost-backend` until its log says the fetch is complete (watched every
//!   millisecond; `status` then confirms it; metadata by `init-metadata`, not timed). Against: one TCP connection streaming the same file in 1 MiB writes into a
//!   fresh file, fsync'd, timed from connect to fsync. MB/s, target >= 0.8x. With TLS, also
//!   against the same copy over TLS-PSK with the stripe server's settings (what the
//!   protocol's encryption costs). The first hydrated disk is compared with A's (`cmp`).
//! * `demand`: a 4 KiB guest read (libblkio, QD1) of an unfetched stripe on B (no autofetch;
//!   distinct stripes), against one stripe's transfer over a kept-alive TCP connection (an
//!   8-byte request, the 1 MiB answer read from the same file). Median ms, target <= 1.5x.
//!   With TLS, also against the same transfer over TLS-PSK with the stripe server's TLS
//!   settings (the floor a demand read over the protocol cannot go below). And against the
//!   transfer (TLS or not, as A and B) followed by storing the stripe as a fetch must (written
//!   into a fresh file in the bench directory, fdatasync'd), and against the transfer with a
//!   second thread storing each stripe while the next one travels ("stored behind": the
//!   least any fetch that keeps its stripe and serves its guest from memory can cost). Each
//!   also reports its CPU time per read: ours A's and B's whole processes and the client
//!   thread; a reference its threads. When the CPU is what runs out (back-to-back reads
//!   beside CPU-bound neighbours), latency follows CPU time. Also: the same reads once
//!   fetched (the vhost-user round trip in every read), and a wake-up round trip between two
//!   threads with the same gap (what one hop between threads costs on this machine).
//!
//! Run: `cargo bench --bench stripe_move`: a markdown report on stdout, rounds on stderr.
//!
//! Environment:
//!   UBIBLK_BENCH_DIR           disks (default /dev/shm)
//!   UBIBLK_BENCH_SIZE_MB       disk size in MiB (default 512)
//!   UBIBLK_BENCH_ROUNDS        alternating rounds per row (default 5)
//!   UBIBLK_BENCH_CONNECTIONS   B's fetch_connections (default 16)
//!   UBIBLK_BENCH_DEMAND_READS  reads (and TCP stripe transfers) per demand round (default 32)
//!   UBIBLK_BENCH_DEMAND_GAP_MS pause before each of them (default 0: a read shares the
//!                              machine with the end of the last fetch, B's base disk write
//!                              and syncs)
//!   UBIBLK_BENCH_PLAINTEXT=1   A and B without TLS (the danger_zone opt-in): what TLS costs
//!   UBIBLK_BENCH_ROWS          comma-separated rows to run (`hydrate`, `demand`; default both)
//!   UBIBLK_BENCH_PIN=1         demand rows only: each host on a core of its own, as on two
//!                              machines (A and a reference's server on CPU 0; B, the client
//!                              and a reference's client and storer on CPU 1)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{Context, Result};
use bench::*;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SHIFT: u8 = 11;
const STRIPE: u64 = 512 << SHIFT;
const IDENTITY: &str = "bench";

struct Setup {
    dir: PathBuf,
    image: PathBuf,
    size: u64,
    addr: String,
    psk: PathBuf,
    backend: PathBuf,
    init: PathBuf,
    connections: u64,
    plaintext: bool,
}

const PLAINTEXT: &str = "danger_zone: {enabled: true, allow_unencrypted_connection: true}";

fn served_addr(be: &Backend) -> Result<String> {
    stripe_server_addr(|| be.log())
}

/// B's files, fresh: a sparse disk, metadata made against A. With `autofetch`.
fn host_b(s: &Setup, round: usize, autofetch: bool) -> Result<(BackendConfig, PathBuf, PathBuf)> {
    let d = s.dir.join(format!("b-{round}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let base = d.join("base.raw");
    std::fs::File::create(&base)?.set_len(s.size)?;
    let ctl = d.join("ctl.sock");
    let mut cfg = BackendConfig::new(&base, d.join("vhost.sock"))
        .extra(format!("image_url: \"ubiblk://{}\"", s.addr));
    cfg = if s.plaintext {
        cfg.extra(PLAINTEXT)
    } else {
        cfg.extra(format!("psk_identity: {IDENTITY}"))
            .extra_path("psk_file", &s.psk)
    };
    cfg = cfg
        .extra_path("metadata_path", &d.join("meta"))
        .extra_path("control_socket", &ctl)
        .extra(format!("fetch_connections: {}", s.connections));
    if autofetch {
        cfg = cfg.extra("autofetch: true");
    }
    let yaml = d.join("b.yaml");
    std::fs::write(&yaml, cfg.to_yaml())?;
    run_init_metadata(&s.init, &yaml, SHIFT, &[])?;
    Ok((cfg, ctl, base))
}

fn hydrate_ours(s: &Setup, round: usize) -> Result<f64> {
    let (cfg, ctl, base) = host_b(s, round, true)?;
    let t0 = Instant::now();
    let mut be = start_backend_env(&s.backend, &cfg, &[])?;
    let done = wait_fetch_logged(
        &mut be,
        &ctl,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )?;
    let secs = (done - t0).as_secs_f64();
    stop_backend(&mut be)?;
    if round == 1 {
        cmp_files(&base, &s.image).context("B's disk after hydration")?;
    }
    let _ = std::fs::remove_dir_all(base.parent().unwrap_or(Path::new("/nonexistent")));
    Ok(s.size as f64 / MIB as f64 / secs)
}

/// The plain copy: the file streamed over one TCP connection into a fresh file, fsync'd.
fn hydrate_tcp(s: &Setup, round: usize) -> Result<f64> {
    let out = s.dir.join(format!("copy-{round}.raw"));
    let secs = tcp_copy(&s.image, &out)?.as_secs_f64();
    std::fs::remove_file(&out)?;
    Ok(s.size as f64 / MIB as f64 / secs)
}

/// The same copy over TLS-PSK with the stripe server's own TLS settings: what encrypting and
/// decrypting the bytes costs (the protocol's transport), with one connection.
fn hydrate_tls(s: &Setup, round: usize) -> Result<f64> {
    use ubiblk::stripe::tls::{self, Psk};
    let out = s.dir.join(format!("copy-{round}.raw"));
    let psk = std::sync::Arc::new(Psk::new(IDENTITY, std::fs::read(&s.psk)?)?);
    let (server, client) = (tls::server_context(psk.clone())?, tls::client_context(psk)?);
    let secs = stream_copy(
        &s.image,
        &out,
        move |tcp| Ok(tls::accept(&server, tcp)?),
        |tcp| Ok(tls::connect(&client, tcp)?),
    )?
    .as_secs_f64();
    std::fs::remove_file(&out)?;
    Ok(s.size as f64 / MIB as f64 / secs)
}

/// Stripes for demand reads: distinct, spread over the disk.
fn demand_stripes(s: &Setup, n: usize, round: usize) -> Vec<u64> {
    let stripes = s.size / STRIPE;
    (0..n as u64)
        .map(|i| (i * 7919 + round as u64 * 13) % stripes)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A demand round's result: the median latency, and the CPU time both ends (and the client)
/// spent per read, in ms.
#[derive(Clone, Copy)]
struct Demand {
    ms: f64,
    cpu_ms: f64,
    /// Ours: the same read once its stripe is fetched (0 for a reference).
    local_ms: f64,
}

/// Time for work started by the last read (B's base disk write and syncs, A's io_uring
/// workers) to finish before the CPU clocks are read.
const SETTLE: Duration = Duration::from_millis(50);

fn demand_ours(s: &Setup, a_pid: u32, round: usize, n: usize, gap: Duration) -> Result<Demand> {
    let (cfg, _ctl, base) = host_b(s, round, false)?;
    let mut be = start_backend_env(&s.backend, &cfg, &[])?;
    pin_process(be.guard.pid(), pin_cpu(false))?;
    let mut c = connect_client(&cfg.socket, 1, 4 * MIB as usize, s.size)?;
    let mut lat = Vec::new();
    std::thread::sleep(SETTLE);
    let cpu = || process_cpu_time(a_pid) + process_cpu_time(be.guard.pid()) + thread_cpu_time();
    let cpu0 = cpu();
    for stripe in demand_stripes(s, n, round) {
        let off = stripe * STRIPE + 8192;
        std::thread::sleep(gap);
        let t = Instant::now();
        let got = c
            .read(0, off, 4096)
            .map_err(|e| anyhow::anyhow!("read: {}", errno_name(e)))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(got == pattern_bytes(off, 4096), "wrong data at {off}");
    }
    std::thread::sleep(SETTLE);
    let cpu_ms = (cpu() - cpu0).as_secs_f64() * 1e3 / lat.len() as f64;
    // The same reads again, their stripes now on B's disk: the vhost-user round trip that
    // every demand read includes besides its fetch.
    let mut local = Vec::new();
    for stripe in demand_stripes(s, n, round) {
        let off = stripe * STRIPE + 8192;
        std::thread::sleep(gap);
        let t = Instant::now();
        c.read(0, off, 4096)
            .map_err(|e| anyhow::anyhow!("read: {}", errno_name(e)))?;
        local.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(c);
    stop_backend(&mut be)?;
    let _ = std::fs::remove_dir_all(base.parent().unwrap_or(Path::new("/nonexistent")));
    Ok(Demand {
        ms: median(&lat),
        cpu_ms,
        local_ms: median(&local),
    })
}

/// The demand row's references: one stripe over plain TCP (the target's reference), or over
/// TLS-PSK with the stripe server's own TLS settings (`ubiblk::stripe::tls`: OpenSSL, TLS 1.2,
/// PSK-AES256-GCM-SHA384; the floor of any demand read over the protocol); `stored`: then the
/// stripe stored as a fetch must store it, written into a fresh sparse file in the bench
/// directory (as B's disk) and fdatasync'd. That is the least work a stream of demand reads
/// of distinct stripes costs: the ceiling where the CPU, not the latency of each step, is
/// what runs out.
#[derive(Clone, Copy)]
struct Transfer {
    tls: bool,
    stored: Store,
}

/// What a [`Transfer`] does with the stripe it received.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    /// Nothing: the bare transfer.
    No,
    /// Stores it before the next request (timed).
    Inline,
    /// Hands it to a second thread that stores it while the next transfer runs, as a fetch
    /// serves its guest from memory and stores behind: the least any demand read that keeps
    /// what it fetched can cost when reads come back to back (only the transfer is timed).
    Behind,
}

/// One stripe's transfer, the demand row's reference: over a kept-alive connection, an 8-byte
/// request, the 1 MiB answer read from the same file (`pread`) and written back; see
/// [`Transfer`] for the kinds.
fn demand_tcp(s: &Setup, round: usize, n: usize, gap: Duration, kind: Transfer) -> Result<Demand> {
    let tls = kind.tls;
    use ubiblk::stripe::tls::{self, Psk, Stream};
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let image = s.image.clone();
    let key = std::fs::read(&s.psk)?;
    let psk = std::sync::Arc::new(Psk::new(IDENTITY, key)?);
    let (server_ctx, client_ctx) = (tls::server_context(psk.clone())?, tls::client_context(psk)?);
    let server = std::thread::spawn(move || -> Result<Duration> {
        pin_thread(pin_cpu(true))?;
        let (c, _) = l.accept()?;
        c.set_nodelay(true)?;
        let mut c = if tls {
            tls::accept(&server_ctx, c)?
        } else {
            Stream::Plain(c)
        };
        let f = std::fs::File::open(image)?;
        let mut buf = vec![0u8; STRIPE as usize];
        let mut req = [0u8; 8];
        // From after the handshake (not a transfer's) to the client's close, waits for
        // requests included, as the stripe server's CPU time includes them.
        let t = thread_cpu_time();
        while c.read_exact(&mut req).is_ok() {
            f.read_exact_at(&mut buf, u64::from_le_bytes(req) * STRIPE)?;
            c.write_all(&buf)?;
            c.flush()?;
        }
        Ok(thread_cpu_time() - t)
    });
    let c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut c = if tls {
        tls::connect(&client_ctx, c)?
    } else {
        Stream::Plain(c)
    };
    let mut buf = vec![0u8; STRIPE as usize];
    let stored = s.dir.join(format!("stored-{round}.raw"));
    let store = match kind.stored {
        Store::No => None,
        _ => {
            let f = std::fs::File::create(&stored)?;
            f.set_len(s.size)?;
            Some(std::sync::Arc::new(f))
        }
    };
    // Store::Behind: the storing thread, fed whole stripes (and handing the buffers back).
    let (to_store, back) = (
        std::sync::mpsc::channel::<(u64, Vec<u8>)>(),
        std::sync::mpsc::channel(),
    );
    let storer = match (&store, kind.stored) {
        (Some(f), Store::Behind) => {
            let (f, rx, tx) = (f.clone(), to_store.1, back.0);
            Some(std::thread::spawn(move || -> Result<Duration> {
                pin_thread(pin_cpu(false))?;
                let t = thread_cpu_time();
                for (stripe, buf) in rx {
                    f.write_all_at(&buf, stripe * STRIPE)?;
                    f.sync_data()?;
                    let _ = tx.send(buf);
                }
                Ok(thread_cpu_time() - t)
            }))
        }
        _ => None,
    };
    let mut lat = Vec::new();
    let mut cpu = Duration::ZERO;
    for stripe in demand_stripes(s, n, round) {
        std::thread::sleep(gap);
        let (t, c0) = (Instant::now(), thread_cpu_time());
        c.write_all(&stripe.to_le_bytes())?;
        c.flush()?;
        c.read_exact(&mut buf)?;
        match (&store, kind.stored) {
            (Some(f), Store::Inline) => {
                f.write_all_at(&buf, stripe * STRIPE)?;
                f.sync_data()?;
            }
            (Some(_), _) => {
                let next = back
                    .1
                    .try_recv()
                    .unwrap_or_else(|_| vec![0u8; STRIPE as usize]);
                let full = std::mem::replace(&mut buf, next);
                to_store.0.send((stripe, full))?;
            }
            _ => {}
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        cpu += thread_cpu_time() - c0;
    }
    drop(to_store.0);
    if let Some(storer) = storer {
        cpu += storer
            .join()
            .map_err(|_| anyhow::anyhow!("storer panicked"))??;
    }
    if store.is_some() {
        std::fs::remove_file(&stored)?;
    }
    drop(c);
    cpu += server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    Ok(Demand {
        ms: median(&lat),
        cpu_ms: cpu.as_secs_f64() * 1e3 / lat.len() as f64,
        local_ms: 0.0,
    })
}

/// With UBIBLK_BENCH_PIN=1, host A and host B each get one core of their own, as on two
/// machines: A's process (and a reference's server thread) on CPU 0, B's process, the
/// client and a reference's client and storer on CPU 1. `None`: no pinning.
fn pin_cpu(host_a: bool) -> Option<usize> {
    env_flag("UBIBLK_BENCH_PIN").then_some(if host_a { 0 } else { 1 })
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn set_affinity(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain bits; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is 0 or 1, within the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid cpu_set_t of the size given; `tid` is 0 or a thread we were given.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity {tid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Pins the calling thread to `cpu` (see [`pin_cpu`]).
fn pin_thread(cpu: Option<usize>) -> Result<()> {
    cpu.map_or(Ok(()), |cpu| set_affinity(0, cpu))
}

/// Pins every thread of process `pid` to `cpu`; threads it starts later inherit it.
fn pin_process(pid: u32, cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(tid) = task?.file_name().to_string_lossy().parse::<libc::pid_t>() {
            set_affinity(tid, cpu)?;
        }
    }
    Ok(())
}

/// The median round trip (ms) of a wake-up between two threads that each wait `idle` first:
/// the price of one hop between threads on this machine. On a VM whose cores go idle between
/// reads, a halted vCPU is woken through the hypervisor; a demand read makes more such hops
/// than a transfer (a reference, not a limit of ours).
fn wake_round_trip(idle: Duration, n: usize) -> Result<f64> {
    let (to, rx) = std::sync::mpsc::channel::<()>();
    let (tx, back) = std::sync::mpsc::channel::<()>();
    let echo = std::thread::spawn(move || {
        for () in rx {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    let mut lat = Vec::new();
    for _ in 0..n {
        std::thread::sleep(idle);
        let t = Instant::now();
        to.send(())?;
        back.recv()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(to);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))?;
    Ok(median(&lat))
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::var("UBIBLK_BENCH_DIR").unwrap_or("/dev/shm".into()))
        .join(format!("ubiblk-stripe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = env_f64("UBIBLK_BENCH_SIZE_MB", 512.0) as u64 * MIB;
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 5.0) as usize;
    let reads = env_f64("UBIBLK_BENCH_DEMAND_READS", 32.0) as usize;
    let gap = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_DEMAND_GAP_MS", 0.0) / 1e3);
    let connections = env_f64("UBIBLK_BENCH_CONNECTIONS", 16.0) as u64;
    warn_if_loaded();
    let image = dir.join("a.raw");
    ensure_pattern_file(&image, size)?;
    let psk = dir.join("psk");
    std::fs::write(&psk, b"a bench psk of 32 bytes, 0123456")?;
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600))?;
    let backend = backend_bin()?;
    let init = init_metadata_bin()?;
    let plaintext = env_flag("UBIBLK_BENCH_PLAINTEXT");
    let rows = env_list("UBIBLK_BENCH_ROWS").unwrap_or_default();
    let row = |name: &str| rows.is_empty() || rows.iter().any(|r| r == name);
    let (hydrate, demand) = (row("hydrate"), row("demand"));
    anyhow::ensure!(
        hydrate || demand,
        "UBIBLK_BENCH_ROWS: no row of hydrate, demand"
    );
    anyhow::ensure!(
        !(hydrate && env_flag("UBIBLK_BENCH_PIN")),
        "UBIBLK_BENCH_PIN is for the demand rows: set UBIBLK_BENCH_ROWS=demand"
    );
    let a_cfg = BackendConfig::new(&image, dir.join("a.sock")).extra(if plaintext {
        format!("stripe_server: {{listen: \"127.0.0.1:0\"}}\n{PLAINTEXT}")
    } else {
        format!(
            "stripe_server: {{listen: \"127.0.0.1:0\", psk_identity: {IDENTITY}, psk_file: {}}}",
            yaml_str(&psk.to_string_lossy())
        )
    });
    let mut a = start_backend_env(&backend, &a_cfg, &[])?;
    pin_process(a.guard.pid(), pin_cpu(true))?;
    // The client (and a reference's client) is this thread: on B's core.
    pin_thread(pin_cpu(false))?;
    let s = Setup {
        addr: served_addr(&a)?,
        dir: dir.clone(),
        image,
        size,
        psk,
        backend,
        init,
        connections,
        plaintext,
    };
    let (mut ours, mut tcp, mut d_ours, mut d_tcp) = (vec![], vec![], vec![], vec![]);
    let mut tls_copy = vec![];
    let (mut d_tls, mut d_stored, mut d_behind, mut wake) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for mine in order {
            match (mine, hydrate) {
                (true, true) => ours.push(hydrate_ours(&s, round)?),
                (false, true) => {
                    tcp.push(hydrate_tcp(&s, round)?);
                    if !plaintext {
                        tls_copy.push(hydrate_tls(&s, round)?);
                    }
                }
                _ => {}
            }
            match (mine, demand) {
                (true, true) => d_ours.push(demand_ours(&s, a.guard.pid(), round, reads, gap)?),
                (false, true) => {
                    let tls = !plaintext;
                    let kind = |tls, stored| Transfer { tls, stored };
                    d_tcp.push(demand_tcp(&s, round, reads, gap, kind(false, Store::No))?);
                    if tls {
                        d_tls.push(demand_tcp(&s, round, reads, gap, kind(true, Store::No))?);
                    }
                    d_stored.push(demand_tcp(&s, round, reads, gap, kind(tls, Store::Inline))?);
                    d_behind.push(demand_tcp(&s, round, reads, gap, kind(tls, Store::Behind))?);
                    wake.push(wake_round_trip(gap, reads)?);
                }
                _ => {}
            }
        }
        if hydrate {
            let tls = tls_copy
                .get(round - 1)
                .map_or(String::new(), |t| format!(", tls {t:.0} MB/s"));
            eprintln!(
                "round {round}: hydrate ours {:.0} MB/s, tcp {:.0} MB/s{tls}",
                ours[round - 1],
                tcp[round - 1]
            );
        }
        if demand {
            let show = |name: &str, d: Option<&Demand>| {
                d.map_or(String::new(), |d| {
                    format!(", {name} {:.2} ms ({:.2} ms CPU)", d.ms, d.cpu_ms)
                })
            };
            let tls = show("tls stripe", d_tls.get(round - 1))
                + &show("stripe stored", d_stored.get(round - 1))
                + &show("stored behind", d_behind.get(round - 1))
                + &format!(", wake-up round trip {:.3} ms", wake[round - 1]);
            eprintln!(
                "round {round}: demand ours {:.2} ms ({:.2} ms CPU; fetched: {:.3} ms), tcp stripe {:.2} ms ({:.2} ms CPU){tls}",
                d_ours[round - 1].ms,
                d_ours[round - 1].cpu_ms,
                d_ours[round - 1].local_ms,
                d_tcp[round - 1].ms,
                d_tcp[round - 1].cpu_ms,
            );
        }
    }
    stop_backend(&mut a)?;
    let _ = std::fs::remove_dir_all(&dir);
    for line in machine_description(Path::new("/dev/shm")) {
        println!("{line}");
    }
    println!();
    println!("| row | ours (median) | plain TCP (median) | ratio | target |");
    println!("|---|---|---|---|---|");
    let mode = if plaintext { "plaintext" } else { "TLS-PSK" };
    if hydrate {
        let (h_o, h_t) = (median(&ours), median(&tcp));
        println!(
            "| hydrate {} MiB, {connections} connections, {mode} | {h_o:.0} MB/s | {h_t:.0} MB/s | {:.2}x | >= 0.8x |",
            size >> 20,
            h_o / h_t
        );
        if !tls_copy.is_empty() {
            let h_s = median(&tls_copy);
            println!(
                "| the same, against the copy over TLS-PSK (the protocol's transport, one connection) | {h_o:.0} MB/s | {h_s:.0} MB/s (TLS) | {:.2}x | |",
                h_o / h_s
            );
        }
    }
    if demand {
        let ms = |v: &[Demand]| median(&v.iter().map(|d| d.ms).collect::<Vec<_>>());
        let cpu = |v: &[Demand]| median(&v.iter().map(|d| d.cpu_ms).collect::<Vec<_>>());
        let (d_o, d_t) = (ms(&d_ours), ms(&d_tcp));
        let gap = if gap.is_zero() {
            String::new()
        } else {
            format!(", {gap:?} apart")
        };
        println!(
            "| demand 4 KiB read of an unfetched 1 MiB stripe, {mode}{gap} | {d_o:.2} ms | {d_t:.2} ms (one stripe) | {:.2}x | <= 1.5x |",
            d_o / d_t
        );
        if !d_tls.is_empty() {
            let d_s = ms(&d_tls);
            println!(
                "| the same, against one stripe over TLS-PSK (the protocol's transport) | {d_o:.2} ms | {d_s:.2} ms (one stripe, TLS) | {:.2}x | |",
                d_o / d_s
            );
        }
        if !d_stored.is_empty() {
            let d_s = ms(&d_stored);
            println!(
                "| the same, against one stripe over {mode} then stored (written, fdatasync'd) | {d_o:.2} ms | {d_s:.2} ms (one stripe, stored) | {:.2}x | |",
                d_o / d_s
            );
        }
        if !d_behind.is_empty() {
            let d_b = ms(&d_behind);
            println!(
                "| the same, against one stripe over {mode} stored by a second thread behind the next transfer (the least a fetch that keeps its stripe can do) | {d_o:.2} ms | {d_b:.2} ms (one stripe, stored behind) | {:.2}x | |",
                d_o / d_b
            );
        }
        let local = median(&d_ours.iter().map(|d| d.local_ms).collect::<Vec<_>>());
        println!(
            "| the same read once its stripe is fetched (the vhost-user round trip in every read) | {local:.3} ms | | | |"
        );
        if !wake.is_empty() {
            println!(
                "| a wake-up round trip between two threads{gap} (what each hop between threads costs here) | | {:.3} ms | | |",
                median(&wake)
            );
        }
        let reference = if d_tls.is_empty() { &d_tcp } else { &d_tls };
        let (c_o, c_r) = (cpu(&d_ours), cpu(reference));
        println!(
            "| CPU per demand read, both hosts and the client, against the {} transfer's two ends | {c_o:.2} ms | {c_r:.2} ms | {:.2}x | |",
            if d_tls.is_empty() { "TCP" } else { "TLS" },
            c_o / c_r
        );
        if !d_stored.is_empty() {
            let c_s = cpu(&d_stored);
            println!(
                "| CPU per demand read, against the stored transfer's | {c_o:.2} ms | {c_s:.2} ms | {:.2}x | |",
                c_o / c_s
            );
        }
    }
    println!("\n{rounds} alternating rounds; medians.");
    Ok(())
}
