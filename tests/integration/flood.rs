//! Resource exhaustion from outside: many idle control-socket connections, and the backend out
//! of file descriptors while clients keep connecting. The backend must stay bounded (threads,
//! log) and keep serving once the pressure is gone.

use crate::common::*;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const DISK: u64 = 4 << 20;

/// A lazy disk (so the control socket exists) over a 1 MiB image.
fn setup(prefix: &str) -> LazyFiles {
    let files = LazyFiles::new(prefix, DISK, 0, &pattern_bytes(0, 1 << 20), &[]);
    files.init_metadata(INIT, 7);
    files
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn threads(pid: u32) -> usize {
    count_entries(&format!("/proc/{pid}/task"))
}

fn open_fds(pid: u32) -> usize {
    count_entries(&format!("/proc/{pid}/fd"))
}

/// Sets `pid`'s soft RLIMIT_NOFILE to `soft` (the hard limit unchanged); returns the old limit.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid, writable rlimit; a null `new` only reads the current limit.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit get: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit read by the call; the old value is not asked for.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit set: {}", std::io::Error::last_os_error());
    old
}

/// Retries `f` every 50 ms until it succeeds or `timeout` passes (then its last error).
fn retry<T, E>(timeout: Duration, mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Polls `status` until it answers or `timeout` passes.
fn status_within(ctl: &Path, timeout: Duration) -> anyhow::Result<ControlStatus> {
    retry(timeout, || ControlStatus::query(ctl))
}

/// Connects a libblkio client with `queues` queues, retrying while another frontend holds the
/// backend or it is not accepting yet.
fn client_within(sock: &Path, queues: usize, timeout: Duration) -> Result<Client, ClientError> {
    retry(timeout, || Client::connect_queues(sock, queues))
}

/// 100 idle control connections: at most 16 are served (a thread each), the rest closed; the
/// idle ones are dropped after the read timeout, and `status` answers again.
#[test]
fn idle_control_connections_are_bounded_and_time_out() {
    let s = setup("ubiblk-flood-ctl");
    let be = Backend::start(BIN, &s.config).unwrap();
    let pid = be.guard.pid();
    status_within(&s.ctl, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = threads(pid);
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&s.ctl).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads(pid);
    assert!(
        during <= before + 16 + 2,
        "{during} threads with 100 idle control connections, {before} before"
    );
    // The idle connections are still open on our side: the backend must drop them by itself.
    let st = status_within(&s.ctl, Duration::from_secs(15));
    assert!(st.is_ok(), "status never answered: {st:?}\n{}", be.log());
    drop(idle);
    let log = be.log();
    assert!(log.lines().count() < 100, "log grew: {log}");
}

/// Out of descriptors: accepts fail on both sockets while clients keep connecting. The log
/// stays small, the backend does not exit, and once descriptors are available again it serves
/// a libblkio client and `status`.
#[test]
fn out_of_descriptors_is_survived_quietly() {
    let s = setup("ubiblk-flood-fd");
    let mut be = Backend::start(BIN, &s.config).unwrap();
    let pid = be.guard.pid();
    status_within(&s.ctl, Duration::from_secs(5)).unwrap();
    // Connect once and go, so the next connection's state is set up and waiting in accept.
    drop(Client::connect_queues(&s.config.socket, s.config.num_queues).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let lines_before = be.log().lines().count();

    // No descriptor to spare: every accept fails with EMFILE.
    let old = set_nofile(pid, open_fds(pid) as u64);
    let mut pending = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        // The backlogs fill up (connect would then block): a few of each is enough.
        if pending.len() < 8 {
            pending.push(UnixStream::connect(&s.ctl).unwrap());
            pending.push(UnixStream::connect(&s.config.socket).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        be.guard.try_wait().is_none(),
        "backend exited while out of descriptors; log:\n{}",
        be.log()
    );
    let grown = be.log().lines().count() - lines_before;
    assert!(
        grown < 100,
        "{grown} log lines in 2 s out of descriptors; tail:\n{}",
        be.log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Descriptors again: the pending connections are accepted (and end), then real clients.
    set_nofile(pid, old.rlim_cur);
    drop(pending);
    let mut c = client_within(
        &s.config.socket,
        s.config.num_queues,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("no client after the pressure: {e:?}\n{}", be.log()));
    let got = c.read(0, 0, 4096).unwrap();
    assert_eq!(got, pattern_bytes(0, 4096));
    status_within(&s.ctl, Duration::from_secs(10)).unwrap();
    assert!(be.guard.try_wait().is_none(), "{}", be.log());
}

/// Out of descriptors when a frontend disconnects: setting up the next connection fails. The
/// backend logs it, keeps retrying instead of exiting, and serves once descriptors are back.
#[test]
fn setup_failure_after_a_disconnect_is_retried() {
    let dir = scratch_dir("ubiblk-flood-setup");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern_bytes(0, DISK as usize)).unwrap();
    let config = BackendConfig::new(&base, dir.path().join("vhost.sock"));
    let mut be = Backend::start(BIN, &config).unwrap();
    let pid = be.guard.pid();
    let c = Client::connect_queues(&config.socket, config.num_queues).unwrap();
    // Whatever the disconnect frees, opening anything new fails.
    let old = set_nofile(pid, 3);
    drop(c);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        be.guard.try_wait().is_none(),
        "backend exited when it could not set up the next connection; log:\n{}",
        be.log()
    );
    let log = be.log();
    assert!(
        log.contains("setting up the next connection failed"),
        "{log}"
    );
    assert!(log.lines().count() < 100, "{log}");

    set_nofile(pid, old.rlim_cur);
    let mut c = client_within(&config.socket, config.num_queues, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no client after the pressure: {e:?}\n{}", be.log()));
    assert_eq!(c.read(0, 8192, 4096).unwrap(), pattern_bytes(8192, 4096));
}

/// A guest that publishes an avail index more than a ring ahead and keeps kicking: every poll
/// makes virtio-queue log an error. The backend's log stays small (the rust-vmm crates' records
/// are rate-limited, ours are once per connection) and it serves the next frontend.
#[test]
fn corrupt_avail_index_and_kicks_do_not_flood_the_log() {
    use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};
    let dir = scratch_dir("ubiblk-flood-ring");
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern_bytes(0, DISK as usize)).unwrap();
    let config = BackendConfig::new(&base, dir.path().join("vhost.sock"));
    // The default level: virtio-queue's errors pass it.
    let be = Backend::spawn_as_is(BIN, &config, &[], |cmd| {
        cmd.env("RUST_LOG", "info");
    })
    .unwrap();
    let mut be = Backend {
        guard: be,
        config: config.clone(),
        config_path: PathBuf::new(),
    };
    be.guard
        .wait_for_socket(&config.socket, SOCKET_TIMEOUT)
        .unwrap();

    let mut fe = BlkFrontend::connect(&config.socket, Duration::from_secs(5)).unwrap();
    fe.setup().unwrap();
    let cfg = fe.read_config().unwrap();
    let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
    fe.setup_memory(&g).unwrap();
    fe.setup_virtqueue(&g).unwrap();
    let bad = g.queue_size + 7;
    let start = Instant::now();
    let mut kicks = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        // Alternate, so every kick is a fresh change of the index.
        fe.force_avail_index(if kicks.is_multiple_of(2) {
            bad
        } else {
            bad + 1
        })
        .unwrap();
        kicks += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = be.log();
    let lines = log.lines().count();
    assert!(
        lines < 100,
        "{lines} log lines after {kicks} kicks with a corrupt avail index; head:\n{}",
        log.lines().take(30).collect::<Vec<_>>().join("\n")
    );
    drop(fe);

    let mut c = client_within(&config.socket, config.num_queues, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no client after the hostile one: {e:?}\n{}", be.log()));
    assert_eq!(c.read(0, 4096, 4096).unwrap(), pattern_bytes(4096, 4096));
    assert!(be.guard.try_wait().is_none(), "{}", be.log());
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The soak: for `UBIBLK_SOAK_SECS` (default 60) a lazy disk is served to, in turn, a libblkio
/// client that writes random blocks and verifies everything it wrote so far against a model,
/// and a hostile frontend that corrupts its avail index and keeps kicking, while other threads
/// storm the control socket (bursts of idle connections, `status`, garbage). Every verify
/// passes, the backend stays up, and its threads, descriptors, memory and log stay bounded.
#[test]
fn soak_hostile_frontends_and_control_storm_while_verifying() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};
    let secs = std::env::var("UBIBLK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60u64);
    let s = setup("ubiblk-soak");
    let be = Backend::start(BIN, &s.config).unwrap();
    let pid = be.guard.pid();
    // The disk as the guest sees it: the 1 MiB image, zeros past it.
    let mut model = vec![0u8; DISK as usize];
    model[..1 << 20].copy_from_slice(&pattern_bytes(0, 1 << 20));

    // Warm up once so the baseline includes the first connection's lasting allocations.
    {
        let mut c = client_within(&s.config.socket, 1, Duration::from_secs(10)).unwrap();
        assert_eq!(c.read(0, 0, 4096).unwrap(), &model[..4096]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (threads0, fds0, rss0) = (threads(pid), open_fds(pid), rss_kib(pid));

    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut cycles, mut verified, mut kicks) = (0u64, 0u64, 0u64);
    let (mut max_threads, mut max_fds, mut max_rss) = (threads0, fds0, rss0);
    std::thread::scope(|sc| {
        // Control-socket storm: bursts of connections, some asking, some idle, some garbage.
        sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for i in 0..40 {
                    if let Ok(mut c) = UnixStream::connect(&s.ctl) {
                        let _ = match i % 3 {
                            0 => c.write_all(b"status\n"),
                            1 => c.write_all(&[0xff; 300]),
                            _ => Ok(()),
                        };
                        held.push(c);
                    }
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(if n.is_multiple_of(10) {
                    300
                } else {
                    20
                }));
            }
        });
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        while Instant::now() < deadline {
            cycles += 1;
            // A well-behaved client: write, then verify every block written so far.
            let mut c = client_within(&s.config.socket, 1, Duration::from_secs(10)).unwrap();
            for _ in 0..64 {
                let block = (next() % (DISK / 4096)) as usize;
                let data: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
                c.write(0, block as u64 * 4096, &data).unwrap();
                model[block * 4096..(block + 1) * 4096].copy_from_slice(&data);
            }
            for block in 0..(DISK / 4096) as usize {
                let got = c.read(0, block as u64 * 4096, 4096).unwrap();
                assert!(
                    got == model[block * 4096..(block + 1) * 4096],
                    "cycle {cycles}: block {block} differs"
                );
                verified += 1;
            }
            drop(c);
            // A hostile frontend: a corrupt avail index and a kick storm for half a second.
            let mut fe = retry(Duration::from_secs(10), || {
                BlkFrontend::connect(&s.config.socket, Duration::from_secs(5))
            })
            .unwrap_or_else(|e| panic!("no hostile frontend: {e:?}"));
            fe.setup().unwrap();
            let cfg = fe.read_config().unwrap();
            let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
            fe.setup_memory(&g).unwrap();
            fe.setup_virtqueue(&g).unwrap();
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(500) {
                fe.force_avail_index(g.queue_size + 7 + (kicks % 2) as u16)
                    .unwrap();
                kicks += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(fe);
            max_threads = max_threads.max(threads(pid));
            max_fds = max_fds.max(open_fds(pid));
            max_rss = max_rss.max(rss_kib(pid));
        }
        stop.store(true, Ordering::Relaxed);
    });
    // After the storm: the control socket answers and the disk is the model.
    status_within(&s.ctl, Duration::from_secs(10)).unwrap();
    let mut c = client_within(&s.config.socket, 1, Duration::from_secs(10)).unwrap();
    for block in 0..(DISK / 4096) as usize {
        assert_eq!(
            c.read(0, block as u64 * 4096, 4096).unwrap(),
            &model[block * 4096..(block + 1) * 4096],
            "final: block {block}"
        );
    }
    drop(c);
    let lines = be.log().lines().count();
    eprintln!(
        "soak {secs}s: {cycles} cycles, {verified} blocks verified, {kicks} hostile kicks; \
         threads {threads0}->{max_threads}, fds {fds0}->{max_fds}, RSS {rss0}->{max_rss} KiB, \
         {lines} log lines"
    );
    let mut be = be;
    assert!(be.guard.try_wait().is_none(), "backend died: {}", be.log());
    // 16 control connections (a thread and a descriptor each), one vhost connection (its
    // threads, eventfds, io_uring and memory), and threads still exiting: bounded, not growing.
    assert!(
        max_threads <= threads0 + 32,
        "threads {threads0} -> {max_threads}"
    );
    assert!(max_fds <= fds0 + 48, "fds {fds0} -> {max_fds}");
    assert!(max_rss <= rss0 + 64 * 1024, "RSS {rss0} -> {max_rss} KiB");
    // Connect/disconnect lines per cycle plus rate-limited dependency errors.
    assert!(
        lines as u64 <= 200 + 20 * cycles,
        "{lines} log lines over {cycles} cycles"
    );
}
