//! Helpers shared by the benchmarks that drive the backend through the libblkio client of
//! `tests/common`: environment knobs, medians, CPU accounting, a description of the machine,
//! creating the pattern-filled disk file, and an I/O loop keeping N requests in flight on one
//! queue.
//!
//! Include next to the test helpers (this module refers to them as `crate::common`):
//!
//! ```ignore
//! #[path = "../tests/common/mod.rs"]
//! mod common;
//! #[path = "common/mod.rs"]
//! mod bench;
//! ```

#![allow(dead_code)]

use crate::common::{
    create_pattern_file, errno_name, Backend, BackendConfig, Client, ClientOptions, ControlStatus,
    QueueIo, SOCKET_TIMEOUT,
};
use anyhow::{anyhow, bail, ensure, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Environment and statistics
// ---------------------------------------------------------------------------------------------

/// `name` parsed as a number, or `default` when unset or unparsable.
pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// `name` as a comma-separated list (empty items dropped); `None` when unset.
pub fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// `name` is set to `1`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (min, max) of the samples.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Spread of the samples around their median, in percent: `(max - min) / median * 100`.
pub fn spread_pct(v: &[f64]) -> f64 {
    let (lo, hi) = min_max(v);
    (hi - lo) / median(v) * 100.0
}

// ---------------------------------------------------------------------------------------------
// CPU time
// ---------------------------------------------------------------------------------------------

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec of ours for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of a process, all its threads (exited ones and io_uring workers included): its
/// CPU-time clock (ns), or utime + stime from /proc/<pid>/stat (clock ticks) where that clock
/// cannot be read.
pub fn process_cpu_time(pid: u32) -> Duration {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock` and `ts` are valid, writable values of ours for the duration of the calls.
    let precise = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut ts) == 0
    };
    if precise {
        return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the ")" of comm: state is field 3; utime=14, stime=15.
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf takes an integer name and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

// ---------------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------------

/// 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Warns on stderr when other work is running.
pub fn warn_if_loaded() {
    if let Some(load) = load_average() {
        if load > 0.5 {
            eprintln!(
                "warning: load average {load:.2}: other work is running, numbers will be noisy"
            );
        }
    }
}

/// Name of the file system holding `path` (statfs magic), e.g. "tmpfs".
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "?".into();
    };
    // SAFETY: libc::statfs is plain integers and arrays, for which all-zero bytes are a valid
    // value; statfs(2) gets a NUL-terminated path and a writable struct, both ours, live for the
    // call.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return "?".into();
    }
    #[allow(clippy::unnecessary_cast)]
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x794C_7630 => "overlayfs".into(),
        t => format!("fs magic {t:#x}"),
    }
}

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then_some(())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .to_string(),
    )
}

/// One line per fact: date, CPU, cores, memory, kernel, the file system of `dir`, the commit.
pub fn machine_description(dir: &Path) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let kernel = first_line_of("uname", &["-r"]).unwrap_or_else(|| "?".into());
    let date = first_line_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = first_line_of(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "log",
            "-1",
            "--format=%h %s",
        ],
    )
    .unwrap_or_else(|| "?".into());
    let dirty = first_line_of(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_some_and(|l| !l.is_empty());
    vec![
        format!("date: {date}"),
        format!("CPU: {model}, {cores} cores available"),
        format!("memory: {mem_gib:.1} GiB; kernel {kernel}"),
        format!(
            "load average at start: {}",
            load_average().map_or("?".into(), |l| format!("{l:.2}"))
        ),
        format!("files in {} ({})", dir.display(), fs_type(dir)),
        format!(
            "commit: {commit}{}",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ),
    ]
}

/// Creates `path` as a `size`-byte pattern file (`create_pattern_file`), or reuses a file of
/// that size with all its blocks allocated (one kept by UBIBLK_BENCH_KEEP=1).
pub fn ensure_pattern_file(path: &Path, size: u64) -> anyhow::Result<()> {
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

/// Connects the libblkio client to `sock` with `num_queues` queues of 256 entries and
/// `mem_size` bytes of buffers (split between the queues), and checks that the device has
/// `disk_size` bytes.
pub fn connect_client(
    sock: &Path,
    num_queues: usize,
    mem_size: usize,
    disk_size: u64,
) -> anyhow::Result<Client> {
    connect_client_with(
        sock,
        &ClientOptions {
            num_queues,
            mem_size,
            ..Default::default()
        },
        disk_size,
    )
}

/// [`connect_client`] with other options (e.g. busy-polling queues); queues of 256 entries.
pub fn connect_client_with(
    sock: &Path,
    opts: &ClientOptions,
    disk_size: u64,
) -> anyhow::Result<Client> {
    let client = Client::connect(
        sock,
        &ClientOptions {
            queue_size: Some(256),
            ..opts.clone()
        },
    )?;
    ensure!(
        client.capacity() == disk_size,
        "capacity {} != disk size {disk_size}",
        client.capacity()
    );
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// I/O on one queue
// ---------------------------------------------------------------------------------------------

/// xorshift64*: cheap, deterministic offsets.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Which `bs`-aligned offsets [`run_io`] visits inside its region.
#[derive(Clone, Copy, Debug)]
pub enum Order {
    /// Uniformly random blocks, from [`Rng`] seeded with `seed | 1`.
    Random { seed: u64 },
    /// Consecutive blocks from block `first % blocks`, wrapping around at the end of the region.
    Sequential { first: u64 },
}

/// What [`run_io`] does: `bs`-sized requests at `bs`-aligned offsets inside
/// `[offset, offset + len)` in `order`, `qd` of them in flight.
#[derive(Clone, Copy, Debug)]
pub struct IoSpec {
    pub write: bool,
    pub offset: u64,
    pub len: u64,
    pub bs: usize,
    pub qd: usize,
    pub order: Order,
}

/// Result of one [`run_io`] window.
#[derive(Clone, Copy, Debug)]
pub struct IoWindow {
    pub ops: u64,
    pub elapsed: Duration,
    /// CPU used by the client thread during the window.
    pub cpu: Duration,
}

impl IoWindow {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Keeps `spec.qd` requests in flight on `q` (the queue's buffer area must hold `qd * bs`
/// bytes): after `barrier` (if any), `warmup` unmeasured, then counts completions for `secs`,
/// then drains. Panics on an I/O error or a stalled backend (no completion for 10 s).
pub fn run_io(
    q: &mut QueueIo,
    spec: &IoSpec,
    warmup: Duration,
    secs: Duration,
    barrier: Option<&Barrier>,
) -> IoWindow {
    let bs = spec.bs;
    let blocks = spec.len / bs as u64;
    assert!(blocks > 0, "region smaller than one block");
    let (mut rng, mut cursor) = match spec.order {
        Order::Random { seed } => (Rng(seed | 1), 0),
        Order::Sequential { first } => (Rng(1), first % blocks),
    };
    let mut next_offset = || {
        let block = match spec.order {
            Order::Random { .. } => rng.next() % blocks,
            Order::Sequential { .. } => {
                let b = cursor;
                cursor = (cursor + 1) % blocks;
                b
            }
        };
        spec.offset + block * bs as u64
    };
    if spec.write {
        for (i, b) in q.buf_mut()[..spec.qd * bs].iter_mut().enumerate() {
            *b = (i % 253) as u8 ^ 0x5a;
        }
    }
    let submit = |q: &mut QueueIo, slot: usize, off: u64| {
        if spec.write {
            q.submit_write(off, slot * bs, bs, slot);
        } else {
            q.submit_read(off, slot * bs, bs, slot);
        }
    };

    if let Some(b) = barrier {
        b.wait();
    }
    let t0 = Instant::now();
    let warm_end = t0 + warmup;
    for slot in 0..spec.qd {
        submit(q, slot, next_offset());
    }
    let mut done: u64 = 0;
    let mut measuring = false;
    let mut stop = false;
    let mut start = (t0, 0u64, thread_cpu_time());
    let mut end = start;
    let mut slots: Vec<usize> = Vec::with_capacity(spec.qd);
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
    IoWindow {
        ops: end.1 - start.1,
        elapsed: end.0 - start.0,
        cpu: end.2 - start.2,
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries and backends
// ---------------------------------------------------------------------------------------------

/// A binary: `$env`, else the path cargo built (`option_env!("CARGO_BIN_EXE_<name>")`, None
/// when the crate has no such binary); an error when neither exists.
pub fn bench_bin(env: &str, built: Option<&'static str>, name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| built.map(PathBuf::from))
        .ok_or_else(|| anyhow!("{name} is not a binary of this crate (set {env})"))?;
    ensure!(p.exists(), "{name} binary {} does not exist", p.display());
    Ok(p)
}

/// `vhost-backend`: `$UBIBLK_BACKEND_BIN`, else this crate's.
pub fn backend_bin() -> anyhow::Result<PathBuf> {
    bench_bin(
        "UBIBLK_BACKEND_BIN",
        option_env!("CARGO_BIN_EXE_vhost-backend"),
        "vhost-backend",
    )
}

/// `init-metadata`: `$UBIBLK_INIT_METADATA_BIN`, else this crate's.
pub fn init_metadata_bin() -> anyhow::Result<PathBuf> {
    bench_bin(
        "UBIBLK_INIT_METADATA_BIN",
        option_env!("CARGO_BIN_EXE_init-metadata"),
        "init-metadata",
    )
}

/// Starts `bin --config <yaml>` with `env` added to its environment (e.g. S3 credentials) and
/// waits for its vhost-user socket. A stale socket file is removed first.
pub fn start_backend_env(
    bin: &Path,
    cfg: &BackendConfig,
    env: &[(String, String)],
) -> anyhow::Result<Backend> {
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing a stale socket"),
    }
    let mut guard = Backend::spawn_as_is(bin, cfg, &[], |c| {
        c.envs(env.iter().map(|(k, v)| (k, v)));
    })?;
    guard.wait_for_socket(&cfg.socket, SOCKET_TIMEOUT)?;
    Ok(Backend {
        guard,
        config: cfg.clone(),
        config_path: PathBuf::new(),
    })
}

/// `init-metadata -f CONFIG -s SHIFT` with `env` added to its environment.
pub fn run_init_metadata(
    bin: &Path,
    config: &Path,
    shift: u8,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("-f")
        .arg(config)
        .arg("-s")
        .arg(shift.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .context("running init-metadata")?;
    if !out.status.success() {
        bail!(
            "init-metadata -f {} -s {shift} failed ({}):\n{}{}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// SIGTERM, then waits (30 s) for a clean exit.
pub fn stop_backend(be: &mut Backend) -> anyhow::Result<()> {
    be.guard.signal(libc::SIGTERM);
    match be.guard.wait_timeout(Duration::from_secs(30)) {
        Some(st) if st.success() => Ok(()),
        Some(st) => bail!(
            "vhost-backend exited with {st} after SIGTERM; log:\n{}",
            be.log()
        ),
        None => bail!(
            "vhost-backend did not exit within 30 s of SIGTERM; log:\n{}",
            be.log()
        ),
    }
}

/// What every wait for a lazy fetch checks on each `status` reply: no fetch errors, progress
/// within `stall`, the backend still running.
struct FetchWatch {
    t0: Instant,
    /// When the first reply arrived.
    first: Option<Instant>,
    /// The last change of `fetched`, and its value.
    progress: (Instant, u64),
    stall: Duration,
}

impl FetchWatch {
    fn new(stall: Duration) -> Self {
        FetchWatch {
            t0: Instant::now(),
            first: None,
            progress: (Instant::now(), u64::MAX),
            stall,
        }
    }

    /// Asks `status` once: the reply and when it arrived, checked; `None` while the control
    /// socket is not up yet (it may appear a little after the vhost-user socket).
    fn poll(
        &mut self,
        be: &mut Backend,
        ctl: &Path,
    ) -> anyhow::Result<Option<(ControlStatus, Instant)>> {
        if let Some(st) = be.guard.try_wait() {
            bail!(
                "vhost-backend exited ({st}) during the fetch; log:\n{}",
                be.log()
            );
        }
        let s = match ControlStatus::query(ctl) {
            Ok(s) => s,
            Err(_) if self.first.is_none() && self.t0.elapsed() < Duration::from_secs(10) => {
                return Ok(None)
            }
            Err(e) => return Err(e.context(format!("backend log:\n{}", be.log()))),
        };
        let now = Instant::now();
        self.first.get_or_insert(now);
        ensure!(
            s.fetch_errors == 0,
            "fetch errors: {}; log:\n{}",
            s.raw,
            be.log()
        );
        if s.fetched != self.progress.1 {
            self.progress = (now, s.fetched);
        } else if !s.complete && now - self.progress.0 > self.stall {
            bail!(
                "no fetch progress for {:?}: {}; log:\n{}",
                self.stall,
                s.raw,
                be.log()
            );
        }
        Ok(Some((s, now)))
    }
}

/// Polls `status` on the control socket `ctl` every `poll` until `complete`; fails on fetch
/// errors, on no progress for `stall`, or when the backend exits. Returns the last status, when
/// the first reply arrived and when the `complete` reply arrived.
pub fn wait_fetch_complete(
    be: &mut Backend,
    ctl: &Path,
    poll: Duration,
    stall: Duration,
) -> anyhow::Result<(ControlStatus, Instant, Instant)> {
    let mut watch = FetchWatch::new(stall);
    loop {
        if let Some((s, now)) = watch.poll(be, ctl)? {
            if s.complete {
                return Ok((s, watch.first.unwrap_or(now), now));
            }
        }
        std::thread::sleep(poll);
    }
}

/// When the backend's log says its lazy fetch is complete (`lazy fetch complete`, logged as
/// the last stripe becomes durable), watched every millisecond without touching the backend
/// (a `status` query costs it a connection and a thread); then `status` once, which must say
/// `complete` with no fetch errors. Fails as [`wait_fetch_complete`] does, whose checks run
/// here every `poll` (and end the wait, as late as that, where the line is not logged:
/// `RUST_LOG` below info). Timing a fill by `status` polls alone errs late by up to a poll
/// (10 ms on a fill of ~100 ms).
pub fn wait_fetch_logged(
    be: &mut Backend,
    ctl: &Path,
    poll: Duration,
    stall: Duration,
) -> anyhow::Result<Instant> {
    use std::io::{Read, Seek, SeekFrom};
    let mut log = std::fs::File::open(be.guard.log_path())?;
    let (mut seen, mut tail) = (0u64, String::new());
    let mut watch = FetchWatch::new(stall);
    let mut checked = Instant::now();
    loop {
        let len = log.metadata()?.len();
        if len > seen {
            log.seek(SeekFrom::Start(seen))?;
            let mut more = String::new();
            (&mut log).take(len - seen).read_to_string(&mut more)?;
            seen = len;
            // The line may arrive in pieces: keep the unfinished last one.
            tail.push_str(&more);
            if tail.contains("lazy fetch complete") {
                let done = Instant::now();
                let s = ControlStatus::query(ctl)?;
                ensure!(
                    s.complete && s.fetch_errors == 0,
                    "logged complete, but status says: {}",
                    s.raw
                );
                return Ok(done);
            }
            tail = tail.rsplit('\n').next().unwrap_or_default().to_string();
        }
        if checked.elapsed() >= poll {
            checked = Instant::now();
            if let Some((s, now)) = watch.poll(be, ctl)? {
                if s.complete {
                    // Not logged (RUST_LOG below info): as late as this poll.
                    return Ok(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `cmp a b`; an error names the first difference.
pub fn cmp_files(a: &Path, b: &Path) -> anyhow::Result<()> {
    let out = Command::new("cmp")
        .arg(a)
        .arg(b)
        .output()
        .context("running cmp")?;
    if !out.status.success() {
        bail!(
            "cmp {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `x` rounded, with thousands separators: 1234567.8 -> "1,234,568".
pub fn fmt_thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// A plain TCP copy over loopback, the reference for moving a disk: `src` streamed in 1 MiB
/// writes over one connection into a fresh file `out`, fsync'd; timed from connect to fsync.
pub fn tcp_copy(src: &Path, out: &Path) -> anyhow::Result<Duration> {
    stream_copy(src, out, Ok, Ok)
}

/// [`tcp_copy`] over the streams `server` and `client` make of the two ends of the TCP
/// connection (e.g. TLS sessions); the handshake is timed too.
pub fn stream_copy<S, C>(
    src: &Path,
    out: &Path,
    server: impl FnOnce(std::net::TcpStream) -> anyhow::Result<S> + Send + 'static,
    client: impl FnOnce(std::net::TcpStream) -> anyhow::Result<C>,
) -> anyhow::Result<Duration>
where
    S: std::io::Write,
    C: std::io::Read,
{
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let src = src.to_path_buf();
    let size = std::fs::metadata(&src)?.len();
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut c = server(l.accept()?.0)?;
        let mut f = std::fs::File::open(src)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(c.flush()?);
            }
            c.write_all(&buf[..n])?;
        }
    });
    let t0 = Instant::now();
    let mut c = client(TcpStream::connect(addr)?)?;
    let mut f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < size {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        got += n as u64;
    }
    f.sync_all()?;
    let took = t0.elapsed();
    drop(c);
    sender
        .join()
        .map_err(|_| anyhow!("the copy's sender panicked"))??;
    ensure!(got == size, "copied {got} of {size} bytes");
    Ok(took)
}
