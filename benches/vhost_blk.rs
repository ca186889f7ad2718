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
//!   UBIBLK_BENCH_BACKENDS      comma-separated backend names to run (default: all available;
//!                              e.g. "ours,ours-wt" with UBIBLK_BENCH_BASELINE=ours for the cost
//!                              of write_through)
//!   UBIBLK_BENCH_BASELINE      backend used as ratio denominator (default "qsd")
//!   UBIBLK_BENCH_SIZE_MB       disk size (default 1024)
//!   UBIBLK_BENCH_DIR           where the disk file lives (default /dev/shm)
//!   UBIBLK_BENCH_KEEP=1        keep the disk file for the next run
//!   UBIBLK_BACKEND_BIN         path of vhost-backend (default: cargo's CARGO_BIN_EXE_vhost-backend)
//!   UBIBLK_BACKEND_ALT_BIN     another build of vhost-backend, run as backends "ours-alt" and
//!                              "ours-alt-enc" (A/B of two builds in alternating rounds)
//!   UBIBLK_BENCH_VERBOSE=1     print backend logs on success too

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use bench::*;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Backends (pluggable: add entries to `backends()`)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Kind {
    /// Our vhost-backend (`alt`: the UBIBLK_BACKEND_ALT_BIN build); extra YAML lines appended
    /// to the generated config; `env`: its environment's additions.
    Ours {
        extra_yaml: Vec<String>,
        alt: bool,
        env: Vec<(String, String)>,
    },
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
            alt: false,
            env: Vec::new(),
        },
    }
}

/// `spec` with the XTS kernel forced (`UBIBLK_XTS_KERNEL`), e.g. `aesni` on a CPU with VAES
/// to measure what a CPU without it gets.
fn xts_kernel(mut spec: BackendSpec, kernel: &str) -> BackendSpec {
    if let Kind::Ours { env, .. } = &mut spec.kind {
        env.push((ubiblk::crypto::KERNEL_ENV.into(), kernel.into()));
    }
    spec
}

/// `spec` run with the UBIBLK_BACKEND_ALT_BIN build.
fn alt(mut spec: BackendSpec) -> BackendSpec {
    if let Kind::Ours { alt, .. } = &mut spec.kind {
        *alt = true;
    }
    spec
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
        alt(ours("ours-alt", &[])),
        alt(ours("ours-alt-enc", &[ENC_KEYS])),
        qsd("qsd", QsdOptions::default()),
        // Not run by default: ours without busy polling.
        ours("ours-nopoll", &["poll_queue_timeout_us: 0"]),
        // Not run by default: ours with AES-256-XTS (raw keys).
        ours("ours-enc", &[ENC_KEYS]),
        ours("ours-enc-nopoll", &[ENC_KEYS, "poll_queue_timeout_us: 0"]),
        // Not run by default: each XTS kernel forced (a CPU without VAES runs "aesni"; before
        // the AES-NI kernel it ran "portable").
        xts_kernel(ours("ours-enc-vaes", &[ENC_KEYS]), "vaes"),
        xts_kernel(ours("ours-enc-aesni", &[ENC_KEYS]), "aesni"),
        xts_kernel(ours("ours-enc-portable", &[ENC_KEYS]), "portable"),
        // Not run by default: ours with `write_through: true` (every write RWF_DSYNC); its cost
        // shows against "ours" on a disk file on a real device (UBIBLK_BENCH_DIR), not tmpfs.
        ours("ours-wt", &["write_through: true"]),
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

fn backend_bin(alt: bool) -> Option<PathBuf> {
    if alt {
        return std::env::var_os("UBIBLK_BACKEND_ALT_BIN").map(PathBuf::from);
    }
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
        Kind::Ours {
            extra_yaml,
            alt,
            env,
        } => {
            let bin =
                backend_bin(*alt).ok_or_else(|| anyhow::anyhow!("vhost-backend not built"))?;
            let mut cfg = BackendConfig::new(disk, sock).num_queues(num_queues);
            cfg.queue_size = 256;
            cfg.seg_size_max = 65536;
            cfg.seg_count_max = 16;
            cfg.poll_queue_timeout_us = 500;
            cfg.extra_yaml = extra_yaml.clone();
            Ok(Running::Ours(Backend::start_with_env(bin, &cfg, &[], env)?))
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
    /// CPU-bound neighbour processes running during the row (a busy host).
    hogs: usize,
    /// Client threads busy-poll their queues (libblkio poll queues) instead of sleeping on
    /// the completion eventfd.
    client_poll: bool,
}

impl Row {
    const fn new(
        name: &'static str,
        write: bool,
        random: bool,
        bs: usize,
        qd: usize,
        queues: usize,
    ) -> Row {
        Row {
            name,
            write,
            random,
            bs,
            qd,
            queues,
            hogs: 0,
            client_poll: false,
        }
    }

    const fn hogs(mut self, n: usize) -> Row {
        self.hogs = n;
        self
    }

    const fn client_poll(mut self) -> Row {
        self.client_poll = true;
        self
    }
}

const ROWS: &[Row] = &[
    Row::new("randread-4k-qd32-1q", false, true, 4096, 32, 1),
    Row::new("randwrite-4k-qd32-1q", true, true, 4096, 32, 1),
    Row::new("randread-4k-qd32-2q", false, true, 4096, 32, 2),
    Row::new("randwrite-4k-qd32-2q", true, true, 4096, 32, 2),
    Row::new("seqread-64k-qd8-1q", false, false, 65536, 8, 1),
    Row::new("seqread-64k-qd8-2q", false, false, 65536, 8, 2),
    Row::new("randread-64k-qd8-1q", false, true, 65536, 8, 1),
    Row::new("seqwrite-1m-qd4-1q", true, false, 1 << 20, 4, 1),
    // A busy host: two CPU-bound neighbours on the two cores.
    Row::new("randread-4k-qd32-2q-hogs2", false, true, 4096, 32, 2).hogs(2),
    Row::new("randwrite-4k-qd32-2q-hogs2", true, true, 4096, 32, 2).hogs(2),
    // A busy-polling client (a thread per queue spinning on completions), as many threads as
    // cores, and one thread.
    Row::new("randread-4k-qd32-2q-pollclient", false, true, 4096, 32, 2).client_poll(),
    Row::new("randread-4k-qd32-1q-pollclient", false, true, 4096, 32, 1).client_poll(),
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

/// What one client thread runs on queue `queue` of `row`: the whole disk, at random or, for
/// sequential rows, from a start that puts the queues' streams far apart.
fn io_spec(row: &Row, disk_size: u64, queue: usize) -> IoSpec {
    let blocks = disk_size / row.bs as u64;
    IoSpec {
        write: row.write,
        offset: 0,
        len: disk_size,
        bs: row.bs,
        qd: row.qd,
        order: if row.random {
            Order::Random {
                seed: 0x1234_5678_9abc_def1 ^ ((queue as u64 + 1) << 32),
            }
        } else {
            Order::Sequential {
                first: queue as u64 * blocks / row.queues as u64,
            }
        },
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
        let mut client = connect_client_with(
            &sock,
            &ClientOptions {
                num_queues: row.queues,
                mem_size: row.queues * (row.qd * row.bs).next_multiple_of(4096),
                poll_queues: row.client_poll,
                ..Default::default()
            },
            disk_size,
        )?;
        let _hogs = CpuHogs::start(row.hogs)?;
        let barrier = Barrier::new(row.queues + 1);
        let pid = running.pid();
        let (results, backend_cpu): (Vec<IoWindow>, f64) = std::thread::scope(|s| {
            let handles: Vec<_> = client
                .queues_mut()
                .iter_mut()
                .map(|q| {
                    let barrier = &barrier;
                    let spec = io_spec(row, disk_size, q.index());
                    s.spawn(move || run_io(q, &spec, warmup, secs, Some(barrier)))
                })
                .collect();
            barrier.wait();
            std::thread::sleep(warmup);
            let cpu0 = process_cpu_time(pid);
            let t0 = Instant::now();
            std::thread::sleep(secs);
            let backend_cpu = process_cpu_time(pid) - cpu0;
            let wall = t0.elapsed();
            let r: Vec<IoWindow> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (r, backend_cpu.as_secs_f64() / wall.as_secs_f64())
        });
        let iops: f64 = results.iter().map(IoWindow::iops).sum();
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

fn main() -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_SECS", 3.0));
    let warmup = Duration::from_secs_f64(env_f64("UBIBLK_BENCH_WARMUP_SECS", 0.5));
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 5.0).max(1.0) as usize;
    let size = (env_f64("UBIBLK_BENCH_SIZE_MB", 1024.0) as u64) << 20;
    let dir = PathBuf::from(std::env::var("UBIBLK_BENCH_DIR").unwrap_or("/dev/shm".into()));
    let keep = env_flag("UBIBLK_BENCH_KEEP");
    let verbose = env_flag("UBIBLK_BENCH_VERBOSE");
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
            Kind::Ours { alt, .. } => match backend_bin(*alt) {
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

    warn_if_loaded();

    let disk = dir.join(format!("ubiblk-bench-{}M.raw", size >> 20));
    ensure_pattern_file(&disk, size)?;
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
