//! systemd integration: the `sd_notify` protocol as a `Type=notify` unit sees it (READY=1 once
//! the vhost socket listens, STOPPING=1 at SIGTERM, before the exit), with the test listening
//! on NOTIFY_SOCKET itself (this machine does not run systemd as PID 1); the backend without a
//! manager, or with one that is not there; the example instance config; and the example unit
//! checked by `systemd-analyze verify` where it is installed.

use crate::common::*;
use anyhow::{bail, Context};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const DISK_SIZE: u64 = 4 << 20;

struct Disk {
    dir: tempfile::TempDir,
    cfg: BackendConfig,
}

fn disk(prefix: &str) -> Disk {
    let dir = scratch_dir(prefix);
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, DISK_SIZE).unwrap();
    let cfg = BackendConfig::new(&img, dir.path().join("vhost.sock"));
    Disk { dir, cfg }
}

/// Starts the backend on `cfg` with `args`, `NOTIFY_SOCKET` set to `notify` (or removed).
fn spawn(cfg: &BackendConfig, args: &[&str], notify: Option<&str>) -> ChildGuard {
    Backend::spawn_as_is(BIN, cfg, args, |cmd| match notify {
        Some(addr) => {
            cmd.env("NOTIFY_SOCKET", addr);
        }
        None => {
            cmd.env_remove("NOTIFY_SOCKET");
        }
    })
    .unwrap()
}

/// The next notification on `sock`, within `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> anyhow::Result<String> {
    sock.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).context("no notification")?;
    Ok(String::from_utf8(buf[..n].to_vec())?)
}

/// The `KEY=VALUE` lines of a notification.
fn fields(msg: &str) -> Vec<(&str, &str)> {
    msg.lines().filter_map(|l| l.split_once('=')).collect()
}

/// Waits for READY=1 on `sock` and checks it as systemd would use it: it is the first
/// notification, names the child as the main PID and the socket in STATUS, and the socket
/// accepts connections the moment it arrives.
fn expect_ready(g: &mut ChildGuard, sock: &UnixDatagram, socket: &Path) {
    let msg = recv(sock, SOCKET_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}; log:\n{}", g.log()));
    let f = fields(&msg);
    assert_eq!(f.first(), Some(&("READY", "1")), "{msg}");
    let pid = g.pid().to_string();
    assert!(f.contains(&("MAINPID", pid.as_str())), "{msg}");
    let status = format!("serving {}", socket.display());
    assert!(f.contains(&("STATUS", status.as_str())), "{msg}");
    UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("READY=1 sent but {} refuses: {e}", socket.display()));
}

/// SIGTERM: STOPPING=1 arrives while the process still runs (before the drain), then it exits
/// 0 having removed its socket.
fn expect_clean_stop(g: &mut ChildGuard, sock: &UnixDatagram, socket: &Path) {
    g.signal(libc::SIGTERM);
    let msg = recv(sock, SOCKET_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}; log:\n{}", g.log()));
    assert_eq!(
        fields(&msg),
        [("STOPPING", "1"), ("STATUS", "stopping")],
        "{msg}"
    );
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running after SIGTERM: {}", g.log()));
    assert_eq!(st.code(), Some(0), "{}", g.log());
    assert!(!socket.exists(), "socket left behind");
    // Nothing else was sent.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv(&mut buf).is_err(), "an extra notification");
}

/// The whole cycle with NOTIFY_SOCKET a file system path.
#[test]
fn ready_and_stopping_on_a_path_socket() {
    let d = disk("ubiblk-notify");
    let addr = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&addr).unwrap();
    let mut g = spawn(&d.cfg, &[], Some(addr.to_str().unwrap()));
    expect_ready(&mut g, &sock, &d.cfg.socket);
    // It serves after READY=1.
    let mut c = Client::connect_queues(&d.cfg.socket, 1).unwrap();
    let mut want = vec![0u8; 4096];
    pattern_block(3, &mut want);
    assert_eq!(c.read(0, 3 * 4096, 4096).unwrap(), want);
    drop(c);
    expect_clean_stop(&mut g, &sock, &d.cfg.socket);
}

/// The same with an abstract `@name` NOTIFY_SOCKET (what systemd uses in containers, and
/// `systemd-run --user` on some versions).
#[test]
fn ready_and_stopping_on_an_abstract_socket() {
    let d = disk("ubiblk-notify-abs");
    let name = format!(
        "ubiblk-test-notify-{}-{}",
        std::process::id(),
        d.dir.path().display()
    )
    .replace('/', "_");
    let sock =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let mut g = spawn(&d.cfg, &[], Some(&format!("@{name}")));
    expect_ready(&mut g, &sock, &d.cfg.socket);
    expect_clean_stop(&mut g, &sock, &d.cfg.socket);
}

/// A SIGTERM arriving while a frontend is connected: STOPPING=1 still comes first, then the
/// drain and the exit.
#[test]
fn stopping_while_a_frontend_is_connected() {
    let d = disk("ubiblk-notify-conn");
    let addr = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&addr).unwrap();
    let mut g = spawn(&d.cfg, &[], Some(addr.to_str().unwrap()));
    expect_ready(&mut g, &sock, &d.cfg.socket);
    let mut c = Client::connect_queues(&d.cfg.socket, 1).unwrap();
    c.write(0, 0, &[0x5a; 4096]).unwrap();
    expect_clean_stop(&mut g, &sock, &d.cfg.socket);
    drop(c);
    assert_eq!(
        read_file_at(&d.cfg.path, 0, 4096).unwrap(),
        vec![0x5a; 4096]
    );
}

/// Without NOTIFY_SOCKET (started by hand, not by a manager) nothing is sent or logged about it.
#[test]
fn without_notify_socket_it_starts_as_usual() {
    let d = disk("ubiblk-unmanaged");
    let mut g = spawn(&d.cfg, &[], None);
    g.wait_listening(&d.cfg.socket, SOCKET_TIMEOUT).unwrap();
    g.signal(libc::SIGTERM);
    let st = g.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(0), "{}", g.log());
    assert!(!g.log().contains("service manager"), "{}", g.log());
}

/// A NOTIFY_SOCKET nobody listens on (or that is not an address): a warning, and the backend
/// serves and stops as usual.
#[test]
fn an_absent_manager_is_a_warning() {
    let d = disk("ubiblk-notify-none");
    let missing = d.dir.path().join("nobody-listens.sock");
    for addr in [missing.to_str().unwrap(), "relative/notify.sock"] {
        let mut g = spawn(&d.cfg, &[], Some(addr));
        g.wait_listening(&d.cfg.socket, SOCKET_TIMEOUT).unwrap();
        let mut c = Client::connect_queues(&d.cfg.socket, 1).unwrap();
        let mut want = vec![0u8; 4096];
        pattern_block(1, &mut want);
        assert_eq!(c.read(0, 4096, 4096).unwrap(), want);
        drop(c);
        g.signal(libc::SIGTERM);
        let st = g.wait_timeout(Duration::from_secs(10)).unwrap();
        let log = g.log();
        assert_eq!(st.code(), Some(0), "{log}");
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("cannot notify the service manager"))
            .collect();
        // One for READY=1, one for STOPPING=1, each naming the address.
        assert_eq!(warnings.len(), 2, "{log}");
        assert!(warnings.iter().all(|w| w.contains(addr)), "{log}");
    }
}

/// examples/ubiblk-instance.yaml, its paths moved under a temp dir and its placeholders
/// replaced by keys sealed with a KEK, served the way the unit runs it: `--kek` pointing into a
/// credentials directory, NOTIFY_SOCKET set.
#[test]
fn the_example_instance_config_serves_under_the_notify_protocol() {
    let root = scratch_dir("ubiblk-instance");
    let (lib, run, creds) = (
        root.path().join("lib"),
        root.path().join("run"),
        root.path().join("creds"),
    );
    for d in [&lib, &run, &creds] {
        std::fs::create_dir(d).unwrap();
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ubiblk-instance.yaml"
    ))
    .unwrap();
    let (kek, iv, aad) = ([0x42u8; 32], [7u8; 12], b"vm1".as_slice());
    let text = example
        .replace("/var/lib/ubiblk/vm1", lib.to_str().unwrap())
        .replace("/run/ubiblk", run.to_str().unwrap())
        .replace(
            "<K1 sealed with the KEK, base64>",
            &seal(&kek, &iv, aad, &[1; 32]),
        )
        .replace(
            "<K2 sealed with the KEK, base64>",
            &seal(&kek, &iv, aad, &[2; 32]),
        );
    assert!(!text.contains('<'), "a placeholder left: {text}");
    let kek_path = creds.join("kek");
    std::fs::write(
        &kek_path,
        format!(
            "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
            b64(&kek),
            b64(&iv),
            b64(aad)
        ),
    )
    .unwrap();
    // Every key of the example, in the example's order, replaces the test defaults.
    let mut cfg = BackendConfig::new("unused", "unused");
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if !line.trim().is_empty() {
            cfg = cfg.extra(line);
        }
    }
    cfg.path = yaml_path(&text, "path").unwrap();
    cfg.socket = yaml_path(&text, "socket").unwrap();
    std::fs::File::create(&cfg.path)
        .and_then(|f| f.set_len(DISK_SIZE))
        .unwrap();

    let addr = root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&addr).unwrap();
    let mut g = spawn(
        &cfg,
        &["--kek", kek_path.to_str().unwrap()],
        Some(addr.to_str().unwrap()),
    );
    expect_ready(&mut g, &sock, &cfg.socket);
    let mut c = Client::connect_queues(&cfg.socket, 2).unwrap();
    c.write(1, 8192, &[0xa5; 4096]).unwrap();
    c.flush(1).unwrap();
    assert_eq!(c.read(0, 8192, 4096).unwrap(), vec![0xa5; 4096]);
    drop(c);
    // Encrypted on the disk.
    assert_ne!(
        read_file_at(&cfg.path, 8192, 4096).unwrap(),
        vec![0xa5; 4096]
    );
    expect_clean_stop(&mut g, &sock, &cfg.socket);
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `key` sealed with AES-256-GCM as an `encryption_key` entry (docs/formats.md).
fn seal(kek: &[u8; 32], iv: &[u8; 12], aad: &[u8], key: &[u8; 32]) -> String {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let gcm = Aes256Gcm::new_from_slice(kek).unwrap();
    let mut buf = key.to_vec();
    let nonce = Nonce::try_from(&iv[..]).unwrap();
    let tag = gcm
        .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
        .unwrap();
    buf.extend_from_slice(&tag);
    b64(&buf)
}

/// The quoted path of top-level `key` in `yaml`.
fn yaml_path(yaml: &str, key: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("{key}:");
    let line = yaml
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {key}"))?;
    let Some(quoted) = line[prefix.len()..].split('"').nth(1) else {
        bail!("{key} is not quoted: {line}");
    };
    Ok(PathBuf::from(quoted))
}

/// `systemd-analyze verify` accepts examples/ubiblk@.service without a single complaint (it
/// exits 0 on unknown keys and bad values too, so its output must be empty), alone and with the
/// README's drop-ins. The ExecStart binary is pointed at the one cargo built, since verify
/// checks that it is executable.
#[test]
fn the_example_unit_verifies() {
    let version = Command::new("systemd-analyze").arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        println!("systemd-analyze is not installed: the example unit is not verified");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ubiblk@.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/vhost-backend "));
    let unit = unit.replace("/usr/local/bin/vhost-backend", BIN);
    let dir = scratch_dir("ubiblk-unit");
    let path = dir.path().join("ubiblk@.service");
    std::fs::write(&path, &unit).unwrap();
    let (ok, text) = verify(&path);
    assert!(ok && text.trim().is_empty(), "{text}");

    // With the README's drop-ins (each ```ini block of "Running under systemd") beside it.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## Running under systemd\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has no \"Running under systemd\" section");
    let dropins: Vec<&str> = section
        .split("```ini\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(dropins.len() >= 3, "{section}");
    let dropin_dir = dir.path().join("ubiblk@.service.d");
    std::fs::create_dir(&dropin_dir).unwrap();
    for (i, text) in dropins.iter().enumerate() {
        std::fs::write(dropin_dir.join(format!("{i}.conf")), text).unwrap();
    }
    let (ok, text) = verify(&path);
    assert!(ok && text.trim().is_empty(), "{text}");
    // The check reads the drop-ins and catches a misspelt directive.
    std::fs::write(
        dropin_dir.join("bad.conf"),
        "[Service]\nLockPersonalty=yes\n",
    )
    .unwrap();
    let (_, text) = verify(&path);
    assert!(text.contains("LockPersonalty"), "{text}");
}

/// `systemd-analyze verify --man=no UNIT`: whether it exited 0, and all it printed.
fn verify(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
