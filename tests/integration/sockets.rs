//! The vhost socket path (`socket`, `socket_mode`, `socket_group`): what the backend refuses
//! to replace, what it may replace, who may connect, and what it removes when it stops.

use crate::common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");

struct Disk {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

fn disk(size: u64) -> Disk {
    let dir = scratch_dir("ubiblk-sock");
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, size).unwrap();
    let sock = dir.path().join("vhost.sock");
    Disk {
        _dir: dir,
        img,
        sock,
    }
}

/// Runs the backend on `cfg` without touching what is at its socket path; it must refuse to
/// start (exit status 1). Returns its output.
fn refused(cfg: &BackendConfig) -> String {
    let mut g = Backend::spawn_as_is(BIN, cfg, &[], |_| {}).unwrap();
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("backend kept running: {}", g.log()));
    assert_eq!(st.code(), Some(1), "{}", g.log());
    g.log()
}

/// The error line of a refused start.
fn error_line(log: &str) -> &str {
    log.lines()
        .rfind(|l| l.starts_with("vhost-backend: "))
        .unwrap_or_else(|| panic!("no error line in {log}"))
}

/// Starts the backend with umask 000 (as a careless service manager might) and waits until it
/// listens.
fn start_umask_000(cfg: &BackendConfig) -> ChildGuard {
    let mut g = Backend::spawn_as_is(BIN, cfg, &[], umask(0)).unwrap();
    g.wait_listening(&cfg.socket, SOCKET_TIMEOUT).unwrap();
    g
}

fn meta(path: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(path).unwrap()
}

fn mode_of(path: &Path) -> u32 {
    meta(path).mode() & 0o7777
}

fn stop(mut g: ChildGuard) -> ChildGuard {
    g.signal(libc::SIGTERM);
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .expect("backend did not exit on SIGTERM");
    assert!(st.success(), "{st:?}: {}", g.log());
    g
}

#[test]
fn a_regular_file_at_socket_is_refused_and_kept() {
    let d = disk(1 << 20);
    std::fs::write(&d.sock, b"not a socket").unwrap();
    let log = refused(&BackendConfig::new(&d.img, &d.sock));
    let want = format!(
        "vhost-backend: socket: {} exists and is a regular file, not a socket; refusing to \
         replace it",
        d.sock.display()
    );
    assert_eq!(error_line(&log), want, "{log}");
    assert_eq!(std::fs::read(&d.sock).unwrap(), b"not a socket");
}

#[test]
fn socket_equal_to_the_disk_is_refused_and_the_disk_kept() {
    let d = disk(1 << 20);
    let log = refused(&BackendConfig::new(&d.img, &d.img));
    let line = error_line(&log);
    assert!(
        line.starts_with(&format!(
            "vhost-backend: socket: {} exists",
            d.img.display()
        )),
        "{log}"
    );
    assert_eq!(std::fs::read(&d.img).unwrap(), pattern_bytes(0, 1 << 20));
}

#[test]
fn a_live_backends_socket_is_refused_and_it_keeps_serving() {
    let a = disk(4 << 20);
    let mut first = Backend::start(BIN, &BackendConfig::new(&a.img, &a.sock)).unwrap();
    first.guard.wait_listening(&a.sock, SOCKET_TIMEOUT).unwrap();
    let ino = meta(&a.sock).ino();
    // A second backend, for another disk, on the same socket.
    let b = disk(2 << 20);
    let log = refused(&BackendConfig::new(&b.img, &a.sock));
    assert_eq!(
        error_line(&log),
        format!(
            "vhost-backend: socket: {} is in use: another process is listening on it",
            a.sock.display()
        ),
        "{log}"
    );
    assert_eq!(meta(&a.sock).ino(), ino);
    // The first backend serves its own disk through that socket.
    let mut c = Client::connect_queues(&a.sock, 1).unwrap();
    assert_eq!(c.capacity(), 4 << 20);
    let data = pattern_bytes(0xabc, 8192);
    c.write(0, 4096, &data).unwrap();
    assert_eq!(c.read(0, 4096, 8192).unwrap(), data);
    assert_eq!(
        c.read(0, 1 << 20, 4096).unwrap(),
        pattern_bytes(1 << 20, 4096)
    );
    drop(c);
    assert!(first.guard.try_wait().is_none(), "{}", first.log());
}

#[test]
fn a_stale_socket_left_by_a_killed_backend_is_replaced() {
    let d = disk(4 << 20);
    let cfg = BackendConfig::new(&d.img, &d.sock);
    let mut killed = Backend::start(BIN, &cfg).unwrap();
    killed
        .guard
        .wait_listening(&d.sock, SOCKET_TIMEOUT)
        .unwrap();
    killed.guard.kill();
    assert!(
        meta(&d.sock).file_type().is_socket(),
        "SIGKILL left no socket"
    );
    let mut g = Backend::spawn_as_is(BIN, &cfg, &[], |_| {}).unwrap();
    g.wait_listening(&d.sock, SOCKET_TIMEOUT).unwrap();
    assert!(
        g.log().contains("replacing the stale socket"),
        "{}",
        g.log()
    );
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
}

#[test]
fn the_socket_is_private_even_under_umask_000() {
    let d = disk(1 << 20);
    let g = start_umask_000(&BackendConfig::new(&d.img, &d.sock));
    assert_eq!(mode_of(&d.sock), 0o600, "{}", g.log());
    let g = stop(g);
    assert!(!d.sock.exists(), "{}", g.log());
}

/// A group this process may give a file to, other than its own if it can: (name, gid).
fn a_group_we_may_use() -> (String, u32) {
    // SAFETY: getegid(2) and geteuid(2) take no arguments and cannot fail.
    let (egid, root) = unsafe { (libc::getegid(), libc::geteuid() == 0) };
    let ours: Vec<u32> = String::from_utf8(Command::new("id").arg("-G").output().unwrap().stdout)
        .unwrap()
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let groups: Vec<(String, u32)> = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_string();
            let gid = f.nth(1)?.parse().ok()?;
            Some((name, gid))
        })
        .collect();
    let usable = |g: u32| root || ours.contains(&g);
    groups
        .iter()
        .find(|(_, g)| *g != egid && usable(*g))
        .or_else(|| groups.iter().find(|(_, g)| *g == egid))
        .cloned()
        .expect("no usable group in /etc/group")
}

#[test]
fn socket_mode_and_group_are_applied() {
    let d = disk(1 << 20);
    let (name, gid) = a_group_we_may_use();
    for group in [name.clone(), gid.to_string()] {
        let cfg = BackendConfig::new(&d.img, &d.sock)
            .extra("socket_mode: \"0660\"")
            .extra(format!("socket_group: {}", yaml_str(&group)));
        let g = start_umask_000(&cfg);
        assert_eq!(mode_of(&d.sock), 0o660, "group {group}: {}", g.log());
        assert_eq!(meta(&d.sock).gid(), gid, "group {group}");
        let g = stop(g);
        assert!(!d.sock.exists(), "{}", g.log());
    }
    // An unquoted mode reads as the octal digits it shows.
    let g = start_umask_000(&BackendConfig::new(&d.img, &d.sock).extra("socket_mode: 0640"));
    assert_eq!(mode_of(&d.sock), 0o640);
    stop(g);
}

#[test]
fn bad_socket_mode_and_group_are_refused_and_leave_nothing() {
    let d = disk(1 << 20);
    let log = refused(&BackendConfig::new(&d.img, &d.sock).extra("socket_mode: \"0666\""));
    assert!(
        error_line(&log).contains("config field `socket_mode`: 0666 gives other users access"),
        "{log}"
    );
    let log =
        refused(&BackendConfig::new(&d.img, &d.sock).extra("socket_group: no-such-group-ubiblk"));
    assert_eq!(
        error_line(&log),
        "vhost-backend: socket_group: no group named \"no-such-group-ubiblk\"",
        "{log}"
    );
    assert!(std::fs::symlink_metadata(&d.sock).is_err());
}

#[test]
fn sigterm_leaves_a_file_that_replaced_the_socket_alone() {
    let d = disk(1 << 20);
    let mut be = Backend::start(BIN, &BackendConfig::new(&d.img, &d.sock)).unwrap();
    be.guard.wait_listening(&d.sock, SOCKET_TIMEOUT).unwrap();
    // Someone moves the socket away and puts a file of theirs there.
    std::fs::rename(&d.sock, d.sock.with_extension("moved")).unwrap();
    std::fs::write(&d.sock, b"theirs").unwrap();
    let g = stop(be.guard);
    assert_eq!(std::fs::read(&d.sock).unwrap(), b"theirs");
    assert!(
        g.log()
            .contains("is no longer the socket this process created"),
        "{}",
        g.log()
    );
}

#[test]
fn sigterm_as_soon_as_the_socket_appears_is_a_clean_stop() {
    // The signal handlers are registered before the socket exists: a service manager may stop
    // the backend the moment it sees the socket, and that must still drain, sync and clean up.
    let d = disk(1 << 20);
    let cfg = BackendConfig::new(&d.img, &d.sock);
    for _ in 0..30 {
        let g = Backend::spawn_as_is(BIN, &cfg, &[], |_| {}).unwrap();
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        // Spin (no sleep): signal within microseconds of the socket file appearing.
        while !d.sock.exists() {
            assert!(Instant::now() < deadline, "no socket: {}", g.log());
            std::hint::spin_loop();
        }
        stop(g);
        assert!(!d.sock.exists(), "socket left behind");
    }
}
