//! Moving a disk host to host (issue 24): the stripe server (`stripe_server:`) and the
//! `ubiblk://` source, against each other, against `openssl s_client` and a Python peer
//! written from the reference's protocol document (tests/tools/stripe_peer.py), and against
//! hostile peers on either side.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubiblk::crypto::Xts;
use ubiblk::stripe::protocol::{self, StripeReply};
use ubiblk::stripe::tls::{self, Psk, Stream};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
pub(crate) const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/stripe_peer.py");
/// 64 KiB stripes, a 48-stripe (3 MiB) disk.
pub(crate) const SHIFT: u8 = 7;
pub(crate) const STRIPE: u64 = 512 << SHIFT;
pub(crate) const DISK: u64 = 48 * STRIPE;
pub(crate) const IDENTITY: &str = "host-b";
pub(crate) const KEY: [u8; 32] = *b"the-psk-of-the-move-0123456789ab";
const PLAINTEXT: &str = "danger_zone: {enabled: true, allow_unencrypted_connection: true}";

fn b64(k: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

pub(crate) fn keys_yaml(k1: &[u8; 32], k2: &[u8; 32]) -> String {
    format!("encryption_key: [\"{}\", \"{}\"]", b64(k1), b64(k2))
}

/// A PSK file (mode 0600) in `dir`.
pub(crate) fn psk_file(dir: &Path, name: &str, key: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub(crate) fn server_yaml(psk: Option<&Path>) -> String {
    match psk {
        Some(p) => format!(
            "stripe_server: {{listen: \"127.0.0.1:0\", psk_identity: {IDENTITY}, psk_file: {}}}",
            yaml_str(&p.to_string_lossy())
        ),
        None => format!("stripe_server: {{listen: \"127.0.0.1:0\"}}\n{PLAINTEXT}"),
    }
}

/// The address the backend's stripe server listens on, from its log.
pub(crate) fn served_addr(be: &Backend) -> String {
    stripe_server_addr(|| be.log()).unwrap()
}

pub(crate) fn wait_complete(ctl: &Path, timeout: Duration) -> ControlStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = ControlStatus::query(ctl).unwrap();
        if s.complete {
            return s;
        }
        assert!(Instant::now() < deadline, "not complete: {}", s.raw);
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn read_all(c: &mut Client, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for off in (0..len).step_by(65536) {
        out.extend(c.read(0, off, 65536.min((len - off) as usize)).unwrap());
    }
    out
}

/// A library client of the protocol (TLS with `psk`, or plaintext).
fn dial(addr: &str, psk: Option<&[u8]>) -> Stream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match psk {
        Some(k) => {
            let ctx = tls::client_context(Arc::new(Psk::new(IDENTITY, k.to_vec()).unwrap()));
            tls::connect(&ctx.unwrap(), tcp).unwrap()
        }
        None => Stream::Plain(tcp),
    }
}

/// Whether a client can connect to `socket` and read from it.
fn attaches(socket: &Path) -> bool {
    let opts = ClientOptions {
        num_queues: 1,
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Client::connect(socket, &opts).is_ok_and(|mut c| c.read(0, 0, 512).is_ok())
}

/// A plain (not lazy) disk of pattern bytes with a stripe server (TLS with `psk`).
fn plain_server(
    prefix: &str,
    psk: Option<&[u8]>,
    extra: &[&str],
) -> (tempfile::TempDir, Backend, String) {
    let dir = scratch_dir(prefix);
    let disk = dir.path().join("disk.raw");
    create_pattern_file(&disk, DISK).unwrap();
    let psk = psk.map(|k| psk_file(dir.path(), "psk", k));
    let mut cfg = BackendConfig::new(&disk, dir.path().join("vhost.sock"))
        .extra_path("control_socket", &dir.path().join("ctl.sock"))
        .extra(server_yaml(psk.as_deref()));
    for e in extra {
        cfg = cfg.extra(*e);
    }
    let be = Backend::start(BIN, &cfg).unwrap();
    let addr = served_addr(&be);
    (dir, be, addr)
}

/// Starts lazy disk `a` (its metadata made) and, as a guest would, reads its first `reads`
/// stripes (fetching them) and writes 8 KiB at each `(offset, seed)`: A, its stripe server's
/// address and what the disk now reads as.
fn start_used(
    a: &LazyFiles,
    image: &[u8],
    reads: u64,
    writes: &[(u64, u64)],
) -> (Backend, String, Vec<u8>) {
    a.init_metadata(INIT, SHIFT);
    let be = Backend::start(BIN, &a.config).unwrap();
    let addr = served_addr(&be);
    let mut model = image.to_vec();
    model.resize(DISK as usize, 0);
    let mut c = Client::connect_queues(be.socket(), 1).unwrap();
    for s in 0..reads {
        c.read(0, s * STRIPE, 4096).unwrap();
    }
    for &(off, seed) in writes {
        let data = pattern_bytes(seed << 32, 8192);
        c.write(0, off, &data).unwrap();
        model[off as usize..off as usize + 8192].copy_from_slice(&data);
    }
    c.flush(0).unwrap();
    (be, addr, model)
}

/// A (encrypted, lazy, half fetched, written) serves B (other keys, made by init-metadata
/// against A, autofetch); B completes, A is killed, B reads as A did. Meanwhile a VM
/// attaching to A is refused until `move-end`.
#[test]
fn a_half_fetched_encrypted_lazy_disk_moves_to_another_host() {
    let (ka1, ka2, kb1, kb2) = ([0x11u8; 32], [0x22u8; 32], [0x33u8; 32], [0x44u8; 32]);
    let keys = tempfile::tempdir().unwrap();
    let psk_a = psk_file(keys.path(), "a.psk", &KEY);
    let psk_b = psk_file(keys.path(), "b.psk", &KEY);
    // 30 stripes and a bit of image on 48: stripes 31.. are past it.
    let image = pattern_bytes(0x5eed_0000, (30 * STRIPE + 1000) as usize);
    let a = LazyFiles::new(
        "stripe-a",
        DISK,
        0xee,
        &image,
        &[
            "copy_on_read: true",
            &keys_yaml(&ka1, &ka2),
            &server_yaml(Some(&psk_a)),
        ],
    );
    // Half the image's stripes fetched (read), writes in fetched, unfetched and past-image
    // stripes.
    let writes = [
        (2 * STRIPE + 512, 1),
        (20 * STRIPE, 2),
        (40 * STRIPE + 4096, 3),
    ];
    let (a_be, addr, model) = start_used(&a, &image, 15, &writes);
    let s = ControlStatus::query(&a.ctl).unwrap();
    // 15 read, 1 written, 17 past the image (init-metadata zeroes and marks them).
    assert_eq!(s.fetched, 33, "{}", s.raw);
    // B: empty, other keys, its metadata made against A (geometry only).
    let b_dir = scratch_dir("stripe-b");
    let (b_base, b_meta, b_ctl) = (
        b_dir.path().join("base.raw"),
        b_dir.path().join("meta"),
        b_dir.path().join("ctl.sock"),
    );
    std::fs::write(&b_base, vec![0u8; DISK as usize]).unwrap();
    let b_cfg = BackendConfig::new(&b_base, b_dir.path().join("vhost.sock"))
        .extra(format!("image_url: \"ubiblk://{addr}\""))
        .extra(format!("psk_identity: {IDENTITY}"))
        .extra_path("psk_file", &psk_b)
        .extra_path("metadata_path", &b_meta)
        .extra_path("control_socket", &b_ctl)
        .extra("autofetch: true")
        .extra("fetch_connections: 4")
        .extra(keys_yaml(&kb1, &kb2));
    let b_yaml = b_dir.path().join("config.yaml");
    std::fs::write(&b_yaml, b_cfg.to_yaml()).unwrap();
    let out = Command::new(INIT).arg("-f").arg(&b_yaml).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("48 stripes of 2^7 sectors"), "{stdout}");
    let b_be = Backend::start(BIN, &b_cfg).unwrap();
    let st = wait_complete(&b_ctl, Duration::from_secs(60));
    assert_eq!((st.stripes, st.fetch_errors), (48, 0), "{}", st.raw);

    // A is moving: a VM attaching to it is refused until move-end.
    let a_ctl = a.ctl.clone();
    let v: serde_json::Value =
        serde_json::from_str(&control_command(&a_ctl, "move-status").unwrap()).unwrap();
    assert_eq!(v["moving"], true, "{v}");
    assert!(v["stripes_served"].as_u64().unwrap() >= 40, "{v}");
    assert!(
        !attaches(a_be.socket()),
        "a VM attached to A during the move"
    );
    assert!(a_be.log().contains("frontend refused"), "{}", a_be.log());
    let v: serde_json::Value =
        serde_json::from_str(&control_command(&a_ctl, "move-end").unwrap()).unwrap();
    assert_eq!(
        (v["ended"].as_bool(), v["now"]["moving"].as_bool()),
        (Some(true), Some(false))
    );
    let mut c = Client::connect_queues(a_be.socket(), 1).unwrap();
    assert_eq!(
        c.read(0, 2 * STRIPE, 4096).unwrap(),
        model[2 * STRIPE as usize..][..4096]
    );
    drop(c);

    // A is gone: B holds the disk, as A showed it, under B's own keys.
    let mut a_be = a_be;
    a_be.guard.kill();
    let mut c = Client::connect_queues(b_be.socket(), 1).unwrap();
    assert!(read_all(&mut c, DISK) == model, "B does not read as A did");
    drop(c);
    let mut raw = std::fs::read(&b_base).unwrap();
    assert!(
        raw[..4096] != model[..4096],
        "B's base disk holds plaintext"
    );
    Xts::new(&kb1, &kb2).decrypt(0, &mut raw);
    assert!(raw == model, "B's base disk is not the disk under B's keys");
    // No key in either log.
    let key_text = String::from_utf8_lossy(&KEY[..12]).to_string();
    for log in [a_be.log(), b_be.log()] {
        assert!(!log.contains(&key_text), "a PSK in a log");
    }
}

/// `openssl s_client` as the client: HELLO and a stripe over TLS-PSK; a wrong key or
/// identity gets nothing.
#[test]
fn openssl_s_client_reads_a_stripe_and_a_wrong_psk_or_identity_is_refused() {
    if !require(&[OPENSSL]) {
        return;
    }
    let (_dir, be, addr) = plain_server("stripe-ossl", Some(&KEY), &[]);
    let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    // What comes back for HELLO + READ_STRIPE 1 (1 MiB stripes on a plain disk).
    let s_client = |key: &[u8], identity: &str, want: usize| -> Vec<u8> {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-psk", &hex(key)])
            .args([
                "-psk_identity",
                identity,
                "-cipher",
                tls::CIPHER,
                "-tls1_2",
                "-quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut req = vec![protocol::HELLO_CMD, protocol::READ_STRIPE_CMD];
        req.extend_from_slice(&1u64.to_le_bytes());
        let _ = child.stdin.as_mut().unwrap().write_all(&req);
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while got.len() < want {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        reader.join().unwrap()
    };
    let stripe = 1usize << 20;
    let got = s_client(&KEY, IDENTITY, 5 + 9 + stripe);
    assert_eq!(got.len(), 5 + 9 + stripe);
    assert_eq!(&got[..5], &[0, 1, 0, 0, 0]);
    assert_eq!(got[5], 0);
    assert_eq!(&got[6..14], &(stripe as u64).to_le_bytes());
    assert!(got[14..] == pattern_bytes(stripe as u64, stripe)[..]);
    let mut wrong = KEY;
    wrong[0] ^= 1;
    assert!(s_client(&wrong, IDENTITY, 5).is_empty());
    assert!(s_client(&KEY, "intruder", 5).is_empty());
    assert!(
        be.log().contains("\"intruder\", not ours: refused"),
        "{}",
        be.log()
    );
    assert!(!be.log().contains(&hex(&KEY)[..16]));
}

/// The Python peer's copy of the whole disk served at `addr` (plaintext), into `out`: what it
/// printed (geometry, the status past the end) and the copy.
fn python_copy(addr: &str, out: &Path) -> (serde_json::Value, Vec<u8>) {
    let (host, port) = addr.split_once(':').unwrap();
    let run = Command::new("python3")
        .args([PEER, "client", host, port])
        .arg(out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let printed = serde_json::from_slice(&run.stdout).unwrap();
    (printed, std::fs::read(out).unwrap())
}

/// The Python peer (from the protocol document) downloads the whole disk from our server
/// (plaintext opt-in); raw requests: a huge index, an unknown opcode.
#[test]
fn a_python_client_from_the_spec_reads_the_disk_and_odd_requests_get_their_status() {
    let (dir, be, addr) = plain_server("stripe-py", None, &[]);
    let (host, port) = addr.split_once(':').unwrap();
    let (v, copy) = python_copy(&addr, &dir.path().join("copy.raw"));
    assert_eq!(
        (v["shift"].as_u64(), v["stripes"].as_u64()),
        (Some(11), Some(3)),
        "{v}"
    );
    assert_eq!(v["beyond"], protocol::STATUS_INVALID_STRIPE, "{v}");
    assert!(
        copy == pattern_bytes(0, DISK as usize),
        "the copy differs from the disk"
    );
    let raw = |hex: &str| -> String {
        let o = Command::new("python3")
            .args([PEER, "raw", host, port, hex])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(raw("01ffffffffffffffff"), "01");
    assert_eq!(raw("0100000000000000ff"), "01");
    assert_eq!(raw("7702"), "fe0001000000");
    // A READ_STRIPE cut short: the server waits, then the client leaves; no answer.
    assert_eq!(raw("010000"), "");
    drop(be);
}

/// Plaintext: a half-fetched lazy disk, written by a client, copied by the Python peer is the
/// disk as its guest sees it, encrypted or not. Not encrypted, its fetched stripes go out
/// with `sendfile` from the disk file (the log says so), its unfetched ones through its
/// source; encrypted, every stripe is decrypted first (nothing is sent from the file).
#[test]
fn plaintext_copies_are_the_logical_disk_with_stripes_sent_from_the_file() {
    for encrypted in [false, true] {
        let image = pattern_bytes(0x77_0000, (30 * STRIPE + 1000) as usize);
        let keys = keys_yaml(&[0x55; 32], &[0x66; 32]);
        let mut extra = vec!["copy_on_read: true".to_string(), server_yaml(None)];
        if encrypted {
            extra.push(keys);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let a = LazyFiles::new("stripe-pt", DISK, 0xee, &image, &extra);
        let writes = [(2 * STRIPE + 512, 1), (20 * STRIPE, 2)];
        let (be, addr, model) = start_used(&a, &image, 10, &writes);
        let dir = scratch_dir("stripe-pt-copy");
        let (_, copy) = python_copy(&addr, &dir.path().join("copy.raw"));
        assert!(
            copy == model,
            "encrypted {encrypted}: the copy is not the disk"
        );
        let zero_copy = be.log().contains("go out with sendfile");
        assert_eq!(zero_copy, !encrypted, "{}", be.log());
    }
}

/// Against a TLS server: plaintext, garbage and a flood of idle connections are closed or
/// turned away; the server keeps serving.
#[test]
fn hostile_clients_no_tls_floods_and_stalls_do_not_stop_the_server() {
    let (_dir, be, addr) = plain_server("stripe-hostile", Some(&KEY), &[]);
    let (host, port) = addr.split_once(':').unwrap();
    // A plaintext HELLO to the TLS server gets no HELLO answer.
    let o = Command::new("python3")
        .args([PEER, "raw", host, port, "02"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&o.stdout).contains("0001000000"));
    // A flood: more idle connections than the server takes.
    let flood: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(flood.len() >= 70);
    std::thread::sleep(Duration::from_millis(300));
    assert!(be.log().contains("connections already"), "{}", be.log());
    // The flood stays, silent: its handshakes time out and free the slots.
    std::thread::sleep(ubiblk::stripe::server::HANDSHAKE_TIMEOUT + Duration::from_secs(1));
    // Served again: HELLO, METADATA and a stripe over TLS.
    let mut s = dial(&addr, Some(&KEY));
    protocol::hello(&mut s).unwrap();
    let g = protocol::metadata(&mut s).unwrap();
    assert_eq!((g.shift, g.stripe_count()), (11, 3));
    let mut buf = vec![0u8; 1 << 20];
    assert_eq!(
        protocol::read_stripe(&mut s, 2, &mut buf).unwrap(),
        StripeReply::Data
    );
    assert!(buf == pattern_bytes(2 << 20, 1 << 20));
    assert_eq!(
        protocol::read_stripe(&mut s, u64::MAX, &mut buf).unwrap(),
        StripeReply::Status(protocol::STATUS_INVALID_STRIPE)
    );
    drop(flood);
    // 64 handshakes timed out: a few log lines, not one each.
    let failed = be.log().matches("stripe server: client Some(").count();
    assert!((1..=12).contains(&failed), "{failed} lines:\n{}", be.log());
}

/// One point in time: READ_STRIPE is refused (0xFF) while a VM's rings run, HELLO and
/// METADATA still answer; once stripes were read, a VM is refused until `move-end`.
#[test]
fn stripe_reads_wait_for_the_vm_to_stop_and_the_vm_for_move_end() {
    let (dir, be, addr) = plain_server("stripe-gate", Some(&KEY), &[]);
    let ctl = dir.path().join("ctl.sock");
    let mut buf = vec![0u8; 1 << 20];
    let mut c = Client::connect_queues(be.socket(), 1).unwrap();
    c.read(0, 0, 4096).unwrap();
    let mut s = dial(&addr, Some(&KEY));
    protocol::hello(&mut s).unwrap();
    assert_eq!(protocol::metadata(&mut s).unwrap().stripe_count(), 3);
    assert_eq!(
        protocol::read_stripe(&mut s, 0, &mut buf).unwrap(),
        StripeReply::Status(protocol::STATUS_SERVER_ERROR)
    );
    let v = control_command(&ctl, "move-status").unwrap();
    assert!(
        v.contains("\"moving\":false") && v.contains("\"rings_running\":true"),
        "{v}"
    );
    drop(c);
    // The disconnect reaches the gate once the connection is torn down.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match protocol::read_stripe(&mut s, 0, &mut buf).unwrap() {
            StripeReply::Data => break,
            r => assert!(Instant::now() < deadline, "{r:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(buf == pattern_bytes(0, 1 << 20));
    assert!(!attaches(be.socket()), "a VM attached during the move");
    assert!(control_command(&ctl, "move-end")
        .unwrap()
        .contains("\"ended\":true"));
    let mut c = Client::connect_queues(be.socket(), 1).unwrap();
    c.read(0, 0, 4096).unwrap();
}

/// Our `ubiblk://` source against the Python server (plaintext opt-in): a good one fills the
/// disk; hostile ones (short stripes, wrong sizes, garbage status, stalls, always busy) make
/// the guest read fail with EIO, never return wrong data, never take the backend down.
#[test]
fn our_source_against_a_python_server_good_and_hostile() {
    let image = pattern_bytes(0xabc_0000, (10 * STRIPE) as usize);
    for mode in ["good", "short", "wrongsize", "garbage", "stall", "busy"] {
        let b = PyServerAndB::start(mode, &image);
        let mut c = Client::connect_queues(b.be.socket(), 1).unwrap();
        let t0 = Instant::now();
        let r = c.read(0, 3 * STRIPE, 8192);
        if mode == "good" {
            assert_eq!(r.unwrap(), image[3 * STRIPE as usize..][..8192], "{mode}");
            // Past the image (no such stripe on the server): zeros.
            assert_eq!(c.read(0, 20 * STRIPE, 4096).unwrap(), vec![0u8; 4096]);
        } else {
            assert_eq!(r, Err(libc::EIO), "{mode}");
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{mode}: {:?}",
                t0.elapsed()
            );
            let s = ControlStatus::query(&b.ctl).unwrap();
            assert!(s.fetch_errors >= 1 && s.fetched == 0, "{mode}: {}", s.raw);
        }
    }
}

/// The Python server of `mode` serving `image`, and B (plaintext, no autofetch, 2
/// connections, 1 s timeouts) made against it.
struct PyServerAndB {
    _dir: tempfile::TempDir,
    _server: ChildGuard,
    be: Backend,
    ctl: PathBuf,
}

impl PyServerAndB {
    fn start(mode: &str, image: &[u8]) -> Self {
        let dir = scratch_dir("stripe-pysrv");
        let img = dir.path().join("image.raw");
        std::fs::write(&img, image).unwrap();
        let portfile = dir.path().join("port");
        let mut cmd = Command::new("python3");
        cmd.args([PEER, "server"])
            .arg(&portfile)
            .arg(&img)
            .arg(SHIFT.to_string())
            .arg(mode);
        let server = ChildGuard::spawn("stripe-peer", cmd, scratch_dir("stripe-peer-log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !portfile.exists() {
            assert!(Instant::now() < deadline, "the python server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = std::fs::read_to_string(&portfile).unwrap();
        let (base, meta, ctl) = (
            dir.path().join("base.raw"),
            dir.path().join("meta"),
            dir.path().join("ctl.sock"),
        );
        std::fs::write(&base, vec![0u8; DISK as usize]).unwrap();
        let cfg = BackendConfig::new(&base, dir.path().join("vhost.sock"))
            .extra(format!("image_url: \"ubiblk://127.0.0.1:{port}\""))
            .extra(PLAINTEXT)
            .extra_path("metadata_path", &meta)
            .extra_path("control_socket", &ctl)
            .extra("fetch_timeout_secs: 1")
            .extra("fetch_retry_secs: 1")
            .extra("fetch_connections: 2");
        let yaml = dir.path().join("config.yaml");
        std::fs::write(&yaml, cfg.to_yaml()).unwrap();
        let out = Command::new(INIT).arg("-f").arg(&yaml).output().unwrap();
        assert!(out.status.success(), "{mode}: {out:?}");
        let be = Backend::start(BIN, &cfg).unwrap();
        PyServerAndB {
            _dir: dir,
            _server: server,
            be,
            ctl,
        }
    }
}

/// A server closes idle connections (the reference's does after its operation timeout, 20 s
/// by default): our pool drops them instead of failing a fetch on one and retrying.
#[test]
fn pooled_connections_the_server_closed_are_not_used() {
    let image = pattern_bytes(0x1d1e_0000, (10 * STRIPE) as usize);
    let b = PyServerAndB::start("idleclose", &image);
    let mut c = Client::connect_queues(b.be.socket(), 1).unwrap();
    for s in [1u64, 4, 7] {
        std::thread::sleep(Duration::from_millis(700));
        let at = (s * STRIPE) as usize;
        assert_eq!(c.read(0, s * STRIPE, 4096).unwrap(), image[at..at + 4096]);
    }
    let s = ControlStatus::query(&b.ctl).unwrap();
    assert!(
        s.raw.contains("\"fetch_retries\":0,"),
        "{}\n{}",
        s.raw,
        b.be.log()
    );
    assert!(!b.be.log().contains("retrying"), "{}", b.be.log());
}

/// A wrong key or identity on the source side stops the start-up with an error that says
/// what failed and shows no key.
#[test]
fn a_source_with_the_wrong_psk_is_refused_at_start() {
    let (_dir, _be, addr) = plain_server("stripe-wrongpsk", Some(&KEY), &[]);
    let mut wrong = KEY;
    wrong[5] ^= 0x40;
    for (identity, key) in [(IDENTITY, wrong), ("someone-else", KEY)] {
        let dir = scratch_dir("stripe-wrongpsk-b");
        let psk = psk_file(dir.path(), "psk", &key);
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; DISK as usize]).unwrap();
        let meta = dir.path().join("meta");
        let cfg = BackendConfig::new(&base, dir.path().join("vhost.sock"))
            .extra(format!("image_url: \"ubiblk://{addr}\""))
            .extra(format!("psk_identity: {identity}"))
            .extra_path("psk_file", &psk)
            .extra_path("metadata_path", &meta);
        let yaml = dir.path().join("config.yaml");
        std::fs::write(&yaml, cfg.to_yaml()).unwrap();
        let out = Command::new(INIT).arg("-f").arg(&yaml).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{identity}: init-metadata accepted it"
        );
        assert!(
            err.contains("handshake") && err.contains("alert"),
            "{identity}: {err}"
        );
        assert!(!err.contains(&String::from_utf8_lossy(&key[..12]).to_string()));
    }
}

/// B made against A by init-metadata, started, filled with autofetch; returns it with its
/// control socket (B's files live in `dir`).
fn host_b(dir: &Path, addr: &str, psk: &Path) -> (Backend, PathBuf) {
    let (base, meta, ctl) = (dir.join("b.raw"), dir.join("b.meta"), dir.join("b.sock"));
    std::fs::write(&base, vec![0u8; DISK as usize]).unwrap();
    let cfg = BackendConfig::new(&base, dir.join("b-vhost.sock"))
        .extra(format!("image_url: \"ubiblk://{addr}\""))
        .extra(format!("psk_identity: {IDENTITY}"))
        .extra_path("psk_file", psk)
        .extra_path("metadata_path", &meta)
        .extra_path("control_socket", &ctl)
        .extra("autofetch: true");
    let yaml = dir.join("b.yaml");
    std::fs::write(&yaml, cfg.to_yaml()).unwrap();
    let out = Command::new(INIT).arg("-f").arg(&yaml).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let be = Backend::start(BIN, &cfg).unwrap();
    wait_complete(&ctl, Duration::from_secs(60));
    (be, ctl)
}

/// On A (serving, partly fetched and written by a client): a client writes `data` at `off`
/// (into `model`) after reading the stripes `reads`.
fn use_a(a_be: &Backend, reads: &[u64], (off, data): (u64, &[u8]), model: &mut [u8]) {
    let mut c = Client::connect_queues(a_be.socket(), 1).unwrap();
    for &s in reads {
        let at = (s * STRIPE) as usize;
        assert_eq!(c.read(0, s * STRIPE, 4096).unwrap(), model[at..at + 4096]);
    }
    c.write(0, off, data).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
    c.flush(0).unwrap();
}

/// B fills from A (see [`host_b`]); A is killed; B reads as `model`.
fn move_to_b(mut a_be: Backend, d: &Path, psk: &Path, model: &[u8]) {
    let addr = served_addr(&a_be);
    let (b_be, _ctl) = host_b(d, &addr, psk);
    a_be.guard.kill();
    let mut c = Client::connect_queues(b_be.socket(), 1).unwrap();
    assert!(read_all(&mut c, DISK) == model, "B does not read as A did");
}

/// A disk still filling from a disk archive (`archive_url`, file://) is moved on: its
/// unfetched stripes are read through the archive on A and served to B.
#[test]
fn a_disk_filling_from_an_archive_is_moved_on() {
    const ARCHIVE: &str = env!("CARGO_BIN_EXE_archive");
    let dir = scratch_dir("stripe-arch");
    let d = dir.path();
    // The archived disk: pattern bytes.
    let disk0 = d.join("disk0.raw");
    create_pattern_file(&disk0, DISK).unwrap();
    let kek = d.join("kek.yaml");
    std::fs::write(
        &kek,
        format!(
            "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
            b64(&[0xa5; 32]),
            b64(&[0x3c; 12]),
            b64(b"aad")
        ),
    )
    .unwrap();
    let cfg0 = BackendConfig::new(&disk0, d.join("0.sock"));
    let yaml0 = d.join("0.yaml");
    std::fs::write(&yaml0, cfg0.to_yaml()).unwrap();
    let arch = d.join("archive");
    std::fs::create_dir(&arch).unwrap();
    let url = format!("file://{}", arch.display());
    let out = Command::new(ARCHIVE)
        .arg("-f")
        .arg(&yaml0)
        .arg("-k")
        .arg(&kek)
        .args(["--to", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // A: lazy from the archive, a few stripes fetched, one written; a stripe server.
    let psk = psk_file(d, "psk", &KEY);
    let (a_base, a_meta) = (d.join("a.raw"), d.join("a.meta"));
    std::fs::write(&a_base, vec![0u8; DISK as usize]).unwrap();
    let a_cfg = BackendConfig::new(&a_base, d.join("a-vhost.sock"))
        .extra(format!("archive_url: {}", yaml_str(&url)))
        .extra_path("metadata_path", &a_meta)
        .extra(server_yaml(Some(&psk)));
    let a_yaml = d.join("a.yaml");
    std::fs::write(&a_yaml, a_cfg.to_yaml()).unwrap();
    let kek_arg = kek.to_str().unwrap();
    let out = Command::new(INIT)
        .arg("-f")
        .arg(&a_yaml)
        .args(["-k", kek_arg, "-s", &SHIFT.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let a_be = Backend::start_with_args(BIN, &a_cfg, &["--kek", kek_arg]).unwrap();
    let mut model = pattern_bytes(0, DISK as usize);
    let data = pattern_bytes(7 << 40, 4096);
    use_a(&a_be, &[0, 5, 17], (9 * STRIPE + 512, &data), &mut model);
    move_to_b(a_be, d, &psk, &model);
}

/// A disk still filling from S3 (Garage) is moved on: its unfetched stripes are fetched from
/// S3 on A and served to B.
#[test]
fn a_disk_filling_from_s3_is_moved_on() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let garage = crate::common::servers::Garage::start();
    let image = pattern_bytes(0x53_0000_0000, (40 * STRIPE + 512) as usize);
    garage.put_bytes("move/image.raw", &image);
    let dir = scratch_dir("stripe-s3");
    let d = dir.path();
    let psk = psk_file(d, "psk", &KEY);
    let (a_base, a_meta) = (d.join("a.raw"), d.join("a.meta"));
    std::fs::write(&a_base, vec![0xeeu8; DISK as usize]).unwrap();
    let a_cfg = BackendConfig::new(&a_base, d.join("a-vhost.sock"))
        .extra(format!(
            "image_url: {}",
            yaml_str(&garage.url("move/image.raw"))
        ))
        .extra_path("metadata_path", &a_meta)
        .extra(server_yaml(Some(&psk)));
    let a_yaml = d.join("a.yaml");
    std::fs::write(&a_yaml, a_cfg.to_yaml()).unwrap();
    let out = Command::new(INIT)
        .arg("-f")
        .arg(&a_yaml)
        .args(["-s", &SHIFT.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let a_be = Backend::start_with_env(BIN, &a_cfg, &[], &garage.env()).unwrap();
    let mut model = image.clone();
    model.resize(DISK as usize, 0);
    let data = pattern_bytes(9 << 40, 4096);
    use_a(&a_be, &[3], (44 * STRIPE, &data), &mut model);
    move_to_b(a_be, d, &psk, &model);
}
