//! vhost-user-blk throughput benchmark: our `vhost-backend` vs qemu-storage-daemon, both driven
//! by the same libblkio (virtio-blk-vhost-user) client from tests/common.
//!
//! Run: `cargo bench --bench vhost_blk [-- ROW_FILTER...]`
//!
//! Environment:
//!   UBIBLK_BENCH_SECS          measured seconds per run (default 3)
//!   UBIBLK_BENCH_WARMUP_SECS   unmeasured warm-up per run (default 0.5)
//!   UBIBLK_BENCH_ROUNDS        runs per (row, backend); rounds alternate backends (default 5)
//!   UBIBLK_BENCH_ROWS          comma-separated substrings selecting rows (also positional argv)
//!   UBIBLK_BENCH_BACKENDS      comma-separated backend names to run (default: all available)
//!   UBIBLK_BENCH_BASELINE      backend used as ratio denominator (default "qsd")
//!   UBIBLK_BENCH_SIZE_MB       disk size (default 1024)
//!   UBIBLK_BENCH_DIR           where the disk file lives (default /dev/shm)
//!   UBIBLK_BENCH_KEEP=1        keep the disk file for the next run
//!   UBIBLK_BACKEND_BIN         path of vhost-backend (default: cargo's CARGO_BIN_EXE_vhost-backend)
//!   UBIBLK_BENCH_VERBOSE=1     print backend logs on success too

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Backends (pluggable: add entries to `backends()`)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Kind {
    /// Our vhost-backend; extra YAML lines appended to the generated config.
    Ours { extra_yaml: Vec<String> },
    /// qemu-storage-daemon (`num_queues` is set per row).
    Qsd(QsdOptions),
}

#[derive(Clone)]
struct BackendSpec {
    name: String,
    kind: Kind,
}

fn ours(name: &str, extra_yaml: &[&str]) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        kind: Kind::Ours {
            extra_yaml: extra_yaml.iter().map(|s| s.to_string()).collect(),
        },
    }
}

fn qsd(name: &str, opts: QsdOptions) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        kind: Kind::Qsd(opts),
    }
}

/// The backends compared. Later rows can compare e.g. an encrypted configuration of ours:
/// `ours("ours-enc", &["encryption_key: ..."])`.
const ENC_KEYS: &str = "encryption_key: [\"ERERERERERERERERERERERERERERERERERERERERERE=\", \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"]";

fn backends() -> Vec<BackendSpec> {
    vec![
        ours("ours", &[]),
        qsd("qsd", QsdOptions::default()),
        // Not run by default: ours without busy polling.
        ours("ours-nopoll", &["poll_queue_timeout_us: 0"]),
        // Not run by default: ours with AES-256-XTS (raw keys).
        ours("ours-enc", &[ENC_KEYS]),
        ours("ours-enc-nopoll", &[ENC_KEYS, "poll_queue_timeout_us: 0"]),
        // Not run by default (select with UBIBLK_BENCH_BACKENDS=...,qsd-iothread):
        qsd(
            "qsd-iothread",
            QsdOptions {
                iothread: true,
                ..Default::default()
            },
        ),
    ]
}

const DEFAULT_BACKENDS: &[&str] = &["ours", "qsd"];

fn backend_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UBIBLK_BACKEND_BIN") {
        return Some(PathBuf::from(p));
    }
    option_env!("CARGO_BIN_EXE_vhost-backend").map(PathBuf::from)
}

enum Running {
    Ours(Backend),
    Qsd(Qsd),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Ours(b) => b.guard.pid(),
            Running::Qsd(q) => q.guard.pid(),
        }
    }

    fn log(&self) -> String {
        match self {
            Running::Ours(b) => b.log(),
            Running::Qsd(q) => q.guard.log(),
        }
    }
}

fn start_backend(
    spec: &BackendSpec,
    disk: &Path,
    sock: &Path,
    num_queues: usize,
) -> anyhow::Result<Running> {
    match &spec.kind {
        Kind::Ours { extra_yaml } => {
            let bin = backend_bin().ok_or_else(|| anyhow::anyhow!("vhost-backend not built"))?;
            let mut cfg = BackendConfig::new(disk, sock).num_queues(num_queues);
            cfg.queue_size = 256;
            cfg.seg_size_max = 65536;
            cfg.seg_count_max = 16;
            cfg.poll_queue_timeout_us = 500;
            cfg.extra_yaml = extra_yaml.clone();
            Ok(Running::Ours(Backend::start(bin, &cfg)?))
        }
        Kind::Qsd(opts) => {
            let mut opts = opts.clone();
            opts.num_queues = num_queues;
            Ok(Running::Qsd(Qsd::start(disk, sock, &opts)?))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    /// Requests in flight per queue.
    qd: usize,
    /// Queues, each driven by its own client thread.
    queues: usize,
}

const ROWS: &[Row] = &[
    Row {
        name: "randread-4k-qd32-1q",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Row {
        name: "randwrite-4k-qd32-1q",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Row {
        name: "randread-4k-qd32-2q",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 2,
    },
    Row {
        name: "randwrite-4k-qd32-2q",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 2,
    },
    Row {
        name: "seqread-64k-qd8-1q",
        write: false,
        random: false,
        bs: 65536,
        qd: 8,
        queues: 1,
    },
];

// ---------------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Sample {
    iops: f64,
    /// CPU used by the client threads, in cores (1.0 = one core busy).
    client_cpu: f64,
    /// CPU used by the backend process, in cores.
    backend_cpu: f64,
}

struct QueueResult {
    ops: u64,
    elapsed: Duration,
    cpu: Duration,
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// utime + stime of a process (all threads), from /proc/<pid>/stat.
fn process_cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the ")" of comm: state is field 3; utime=14, stime=15.
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Drives one queue at `row.qd` requests in flight: warm-up, then counts completions for
/// `secs`, then drains.
fn run_queue(
    q: &mut QueueIo,
    row: &Row,
    disk_size: u64,
    warmup: Duration,
    secs: Duration,
    barrier: &Barrier,
) -> QueueResult {
    let bs = row.bs;
    let blocks = disk_size / bs as u64;
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ ((q.index() as u64 + 1) << 32));
    // Sequential streams of different queues start far apart.
    let mut cursor = (q.index() as u64 * blocks / row.queues as u64) % blocks;
    let mut next_offset = move || -> u64 {
        if row.random {
            (rng.next() % blocks) * bs as u64
        } else {
            let off = cursor * bs as u64;
            cursor = (cursor + 1) % blocks;
            off
        }
    };
    if row.write {
        for (i, b) in q.buf_mut()[..row.qd * bs].iter_mut().enumerate() {
            *b = (i % 253) as u8 ^ 0x5a;
        }
    }
    let submit = |q: &mut QueueIo, slot: usize, off: u64| {
        if row.write {
            q.submit_write(off, slot * bs, bs, slot);
        } else {
            q.submit_read(off, slot * bs, bs, slot);
        }
    };

    barrier.wait();
    let t0 = Instant::now();
    let warm_end = t0 + warmup;
    for slot in 0..row.qd {
        submit(q, slot, next_offset());
    }
    let mut done: u64 = 0;
    let mut measuring = false;
    let mut stop = false;
    let mut start = (t0, 0u64, thread_cpu_time());
    let mut end = start;
    let mut slots: Vec<usize> = Vec::with_capacity(row.qd);
    while q.in_flight() > 0 {
        slots.clear();
        q.reap_with(1, Some(Duration::from_secs(10)), |ud, ret| {
            if ret != 0 {
                panic!("I/O error on queue: {}", errno_name(-ret));
            }
            slots.push(ud);
        })
        .unwrap_or_else(|e| panic!("do_io failed (ETIME = backend stalled): {}", errno_name(e)));
        done += slots.len() as u64;
        let now = Instant::now();
        if !measuring && now >= warm_end {
            measuring = true;
            start = (now, done, thread_cpu_time());
        } else if measuring && !stop && now >= start.0 + secs {
            stop = true;
            end = (now, done, thread_cpu_time());
        }
        if !stop {
            for &slot in &slots {
                submit(q, slot, next_offset());
            }
        }
    }
    QueueResult {
        ops: end.1 - start.1,
        elapsed: end.0 - start.0,
        cpu: end.2 - start.2,
    }
}

/// Per-run settings shared by all measurements.
struct Settings {
    disk: PathBuf,
    disk_size: u64,
    sock_dir: PathBuf,
    warmup: Duration,
    secs: Duration,
    verbose: bool,
}

fn measure(spec: &BackendSpec, row: &Row, st: &Settings) -> anyhow::Result<Sample> {
    let (disk_size, warmup, secs) = (st.disk_size, st.warmup, st.secs);
    let sock = st.sock_dir.join(format!("{}.sock", spec.name));
    let running = start_backend(spec, &st.disk, &sock, row.queues)?;
    let result = (|| -> anyhow::Result<Sample> {
        let mut client = Client::connect(
            &sock,
            &ClientOptions {
                num_queues: row.queues,
                queue_size: Some(256),
                mem_size: row.queues * (row.qd * row.bs).next_multiple_of(4096),
                ..Default::default()
            },
        )?;
        anyhow::ensure!(
            client.capacity() == disk_size,
            "capacity {} != disk size {disk_size}",
            client.capacity()
        );
        let barrier = Barrier::new(row.queues + 1);
        let pid = running.pid();
        let (results, backend_cpu): (Vec<QueueResult>, f64) = std::thread::scope(|s| {
            let handles: Vec<_> = client
                .queues_mut()
                .iter_mut()
                .map(|q| {
                    let barrier = &barrier;
                    s.spawn(move || run_queue(q, row, disk_size, warmup, secs, barrier))
                })
                .collect();
            barrier.wait();
            std::thread::sleep(warmup);
            let cpu0 = process_cpu_time(pid);
            let t0 = Instant::now();
            std::thread::sleep(secs);
            let backend_cpu = process_cpu_time(pid) - cpu0;
            let wall = t0.elapsed();
            let r: Vec<QueueResult> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (r, backend_cpu.as_secs_f64() / wall.as_secs_f64())
        });
        let iops: f64 = results
            .iter()
            .map(|r| r.ops as f64 / r.elapsed.as_secs_f64())
            .sum();
        let client_cpu: f64 = results
            .iter()
            .map(|r| r.cpu.as_secs_f64() / r.elapsed.as_secs_f64())
            .sum();
        Ok(Sample {
            iops,
            client_cpu,
            backend_cpu,
        })
    })();
    match &result {
        Err(_) => eprintln!("--- {} log ---\n{}", spec.name, running.log()),
        Ok(_) if st.verbose => eprintln!("--- {} log ---\n{}", spec.name, running.log()),
        _ => {}
    }
    drop(running);
    result
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ensure_disk(path: &Path, size: u64) -> anyhow::Result<()> {
    if let Ok(md) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        if md.len() == size && md.blocks() * 512 >= size {
            eprintln!("reusing {}", path.display());
            return Ok(());
        }
    }
    eprintln!("creating {} ({} MiB)...", path.display(), size >> 20);
    let t = Instant::now();
    create_pattern_file(path, size)?;
    eprintln!("  done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_SECS", 3.0));
    let warmup = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_WARMUP_SECS", 0.5));
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 5.0).max(1.0) as usize;
    let size = (env_f64("UBIBLK_BENCH_SIZE_MB", 1024.0) as u64) << 20;
    let dir = PathBuf::from(std::env::var("UBIBLK_BENCH_DIR").unwrap_or("/dev/shm".into()));
    let keep = std::env::var("UBIBLK_BENCH_KEEP").is_ok_and(|v| v == "1");
    let verbose = std::env::var("UBIBLK_BENCH_VERBOSE").is_ok_and(|v| v == "1");
    let baseline = std::env::var("UBIBLK_BENCH_BASELINE").unwrap_or("qsd".into());

    // Row filters: positional argv (cargo bench passes "--bench") and/or UBIBLK_BENCH_ROWS.
    let mut filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.extend(env_list("UBIBLK_BENCH_ROWS").unwrap_or_default());
    let rows: Vec<Row> = ROWS
        .iter()
        .copied()
        .filter(|r| filters.is_empty() || filters.iter().any(|f| r.name.contains(f.as_str())))
        .collect();
    if rows.is_empty() {
        anyhow::bail!(
            "no row matches {filters:?}; rows: {:?}",
            ROWS.iter().map(|r| r.name).collect::<Vec<_>>()
        );
    }

    let wanted = env_list("UBIBLK_BENCH_BACKENDS")
        .unwrap_or_else(|| DEFAULT_BACKENDS.iter().map(|s| s.to_string()).collect());
    let mut specs: Vec<BackendSpec> = Vec::new();
    for name in &wanted {
        let Some(spec) = backends().into_iter().find(|b| &b.name == name) else {
            anyhow::bail!(
                "unknown backend {name}; known: {:?}",
                backends()
                    .iter()
                    .map(|b| b.name.clone())
                    .collect::<Vec<_>>()
            );
        };
        match &spec.kind {
            Kind::Ours { .. } => match backend_bin() {
                Some(p) if p.exists() => specs.push(spec),
                other => eprintln!(
                    "warning: skipping backend {name}: vhost-backend binary not found ({other:?})"
                ),
            },
            Kind::Qsd(_) => {
                if Path::new(QSD_BIN).exists() {
                    specs.push(spec)
                } else {
                    eprintln!("warning: skipping backend {name}: {QSD_BIN} not found");
                }
            }
        }
    }
    if specs.is_empty() {
        anyhow::bail!("no backend available");
    }

    if let Some(load) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
    {
        if load > 0.5 {
            eprintln!(
                "warning: load average {load:.2}: other work is running, numbers will be noisy"
            );
        }
    }

    let disk = dir.join(format!("ubiblk-bench-{}M.raw", size >> 20));
    ensure_disk(&disk, size)?;
    let direct_ok = supports_o_direct(&disk);
    if !direct_ok {
        eprintln!(
            "warning: {} rejects O_DIRECT; QSD uses cache.direct=off",
            dir.display()
        );
        for s in &mut specs {
            if let Kind::Qsd(o) = &mut s.kind {
                o.direct = false;
            }
        }
    }
    let sock_dir = tempfile::Builder::new().prefix("ubiblk-bench").tempdir()?;
    let settings = Settings {
        disk: disk.clone(),
        disk_size: size,
        sock_dir: sock_dir.path().to_path_buf(),
        warmup,
        secs,
        verbose,
    };

    eprintln!(
        "backends: {:?}; {} rounds x {:.1}s (+{:.1}s warm-up); disk {} MiB at {}",
        specs.iter().map(|s| &s.name).collect::<Vec<_>>(),
        rounds,
        secs.as_secs_f64(),
        warmup.as_secs_f64(),
        size >> 20,
        disk.display()
    );

    // samples[row][backend] = Vec<Sample>
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); specs.len()]; rows.len()];
    for (ri, row) in rows.iter().enumerate() {
        for round in 0..rounds {
            // Alternate the order every round to cancel drift.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..specs.len()).collect()
            } else {
                (0..specs.len()).rev().collect()
            };
            for bi in order {
                let spec = &specs[bi];
                let s = measure(spec, row, &settings)
                    .map_err(|e| anyhow::anyhow!("{} / {}: {e:#}", row.name, spec.name))?;
                eprintln!(
                    "{:<22} {:<14} round {}: {:>9.0} IOPS {:>8.1} MB/s  client cpu {:.2}  backend cpu {:.2}",
                    row.name,
                    spec.name,
                    round + 1,
                    s.iops,
                    s.iops * row.bs as f64 / 1e6,
                    s.client_cpu,
                    s.backend_cpu
                );
                samples[ri][bi].push(s);
            }
        }
    }

    // Table.
    let base_idx = specs.iter().position(|s| s.name == baseline);
    let iops_w: Vec<usize> = specs.iter().map(|s| (s.name.len() + 5).max(10)).collect();
    let ratio_w: Vec<usize> = match base_idx {
        Some(b) => specs
            .iter()
            .map(|s| (s.name.len() + specs[b].name.len() + 1).max(8))
            .collect(),
        None => Vec::new(),
    };
    let mut header = format!("{:<22}", "row");
    for (i, s) in specs.iter().enumerate() {
        header += &format!(
            " | {:>w$} {:>8} {:>5}",
            format!("{} IOPS", s.name),
            "MB/s",
            "cpu",
            w = iops_w[i]
        );
    }
    if let Some(b) = base_idx {
        for (i, s) in specs.iter().enumerate() {
            if i != b {
                header += &format!(
                    " | {:>w$}",
                    format!("{}/{}", s.name, specs[b].name),
                    w = ratio_w[i]
                );
            }
        }
    }
    println!();
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for (ri, row) in rows.iter().enumerate() {
        let med: Vec<f64> = samples[ri]
            .iter()
            .map(|v| median(&v.iter().map(|s| s.iops).collect::<Vec<_>>()))
            .collect();
        let mut line = format!("{:<22}", row.name);
        for (bi, _) in specs.iter().enumerate() {
            let cpu = median(
                &samples[ri][bi]
                    .iter()
                    .map(|s| s.backend_cpu)
                    .collect::<Vec<_>>(),
            );
            line += &format!(
                " | {:>w$.0} {:>8.1} {:>5.2}",
                med[bi],
                med[bi] * row.bs as f64 / 1e6,
                cpu,
                w = iops_w[bi]
            );
        }
        if let Some(b) = base_idx {
            for i in 0..specs.len() {
                if i != b {
                    line += &format!(" | {:>w$.3}", med[i] / med[b], w = ratio_w[i]);
                }
            }
        }
        println!("{line}");
    }
    println!(
        "\nmedian of {rounds} x {:.1}s; 'cpu' = median backend CPU in cores (utime+stime / wall)",
        secs.as_secs_f64()
    );

    drop(sock_dir);
    if !keep {
        let _ = std::fs::remove_file(&disk);
    }
    Ok(())
}
