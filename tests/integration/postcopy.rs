//! Post-copy live migration (issue 25), with our own frontend as the VMMs: A serves its VM
//! and runs a stripe server; B stands by (`standby: true`) with `image_url: ubiblk://A`,
//! metadata made against A while A's VM runs. When A's VMM stops its ring (switchover), A
//! hands the disk over and from then on serves it, frozen, to B; B's guest starts at once,
//! its unfetched stripes coming from A on demand and by autofetch. The real guest under QEMU
//! is in tests/guest/postcopy.rs.

use super::stripe_server::{
    keys_yaml, psk_file, read_all, served_addr, server_yaml, wait_complete, BIN, DISK, IDENTITY,
    INIT, KEY, SHIFT, STRIPE,
};
use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use ubiblk::crypto::Xts;
use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};

const T: Duration = Duration::from_secs(5);

/// Host A mid-life and its VM; host B standing by for it.
struct Hosts {
    a: LazyFiles,
    a_be: Backend,
    /// A's VMM, queue 0 running.
    vmm: BlkFrontend,
    /// What the disk reads as.
    model: Vec<u8>,
    b_dir: tempfile::TempDir,
    b_be: Backend,
    b_base: PathBuf,
    b_meta: PathBuf,
    b_ctl: PathBuf,
    _keys: tempfile::TempDir,
}

const B_KEYS: ([u8; 32], [u8; 32]) = ([0x33; 32], [0x44; 32]);

fn vmm(socket: &Path) -> BlkFrontend {
    let mut fe = BlkFrontend::connect(socket, T).unwrap();
    fe.setup().unwrap();
    let cfg = fe.read_config().unwrap();
    let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
    fe.setup_memory(&g).unwrap();
    fe.setup_virtqueue(&g).unwrap();
    fe
}

fn move_status(ctl: &Path) -> serde_json::Value {
    serde_json::from_str(&control_command(ctl, "move-status").unwrap()).unwrap()
}

/// A: an encrypted lazy disk with copy-on-read, half fetched and written by a first client,
/// now serving a VM. B: empty, other keys, `b_extra` in its config, standing by.
fn hosts(prefix: &str, b_extra: &[&str]) -> Hosts {
    let keys = tempfile::tempdir().unwrap();
    let (psk_a, psk_b) = (
        psk_file(keys.path(), "a.psk", &KEY),
        psk_file(keys.path(), "b.psk", &KEY),
    );
    // A fixed port: A restarted serves at the same address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    // 30 stripes and a bit of image on 48: stripes 31.. are past it.
    let image = pattern_bytes(0x9057_0000, (30 * STRIPE + 1000) as usize);
    let a = LazyFiles::new(
        prefix,
        DISK,
        0xee,
        &image,
        &[
            "copy_on_read: true",
            &keys_yaml(&[0x11; 32], &[0x22; 32]),
            &server_yaml(Some(&psk_a)).replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
        ],
    );
    a.init_metadata(INIT, SHIFT);
    let a_be = Backend::start(BIN, &a.config).unwrap();
    let addr = served_addr(&a_be);
    let mut model = image;
    model.resize(DISK as usize, 0);
    {
        let mut c = Client::connect_queues(a_be.socket(), 1).unwrap();
        for s in (0..30).step_by(2) {
            c.read(0, s * STRIPE, 4096).unwrap();
        }
        for (off, seed) in [(2 * STRIPE + 512, 1u64), (21 * STRIPE, 2), (40 * STRIPE, 3)] {
            let data = pattern_bytes(seed << 32, 8192);
            c.write(0, off, &data).unwrap();
            model[off as usize..off as usize + 8192].copy_from_slice(&data);
        }
        c.flush(0).unwrap();
    }
    // The VM runs on A.
    let mut vmm = vmm(a_be.socket());
    assert_eq!(vmm.read_sectors(0, 4096, T).unwrap(), model[..4096]);

    // B, made against A while A's VM runs (geometry only), standing by.
    let b_dir = scratch_dir(&format!("{prefix}-b"));
    let (b_base, b_meta, b_ctl) = (
        b_dir.path().join("base.raw"),
        b_dir.path().join("meta"),
        b_dir.path().join("ctl.sock"),
    );
    std::fs::write(&b_base, vec![0u8; DISK as usize]).unwrap();
    let mut cfg = BackendConfig::new(&b_base, b_dir.path().join("vhost.sock"))
        .extra(format!("image_url: \"ubiblk://{addr}\""))
        .extra(format!("psk_identity: {IDENTITY}"))
        .extra_path("psk_file", &psk_b)
        .extra_path("metadata_path", &b_meta)
        .extra_path("control_socket", &b_ctl)
        .extra("standby: true")
        .extra(keys_yaml(&B_KEYS.0, &B_KEYS.1));
    for e in b_extra {
        cfg = cfg.extra(*e);
    }
    let yaml = b_dir.path().join("config.yaml");
    std::fs::write(&yaml, cfg.to_yaml()).unwrap();
    let out = Command::new(INIT).arg("-f").arg(&yaml).output().unwrap();
    assert!(out.status.success(), "init-metadata against A: {out:?}");
    let b_be = Backend::start(BIN, &cfg).unwrap();
    Hosts {
        a,
        a_be,
        vmm,
        model,
        b_dir,
        b_be,
        b_base,
        b_meta,
        b_ctl,
        _keys: keys,
    }
}

/// A's base disk and metadata, byte for byte.
fn a_files(h: &Hosts) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(&h.a.base).unwrap(),
        std::fs::read(&h.a.meta).unwrap(),
    )
}

#[test]
fn the_vm_moves_first_and_its_disk_follows_from_the_old_host() {
    let mut h = hosts(
        "postcopy-move",
        &["autofetch: true", "fetch_connections: 4"],
    );
    // Before switchover B fetches nothing and A serves nothing.
    std::thread::sleep(Duration::from_millis(500));
    let st = ControlStatus::query(&h.b_ctl).unwrap();
    assert_eq!((st.fetch_errors, st.fetching), (0, 0), "{}", st.raw);
    let before = st.fetched;
    let m = move_status(&h.a.ctl);
    assert_eq!(
        (m["stripes_served"].as_u64(), m["rings_running"].as_bool()),
        (Some(0), Some(true)),
        "{m}"
    );
    assert!(h.b_be.log().contains("standby"), "{}", h.b_be.log());

    // Switchover: A's VMM stops the ring; A hands the disk over.
    h.vmm.stop_queue().unwrap();
    assert!(
        h.a_be.log().contains("disk handed over"),
        "{}",
        h.a_be.log()
    );
    assert!(!ControlStatus::query(&h.a.ctl).unwrap().disk_owner);
    let frozen = a_files(&h);

    // B's guest starts at once and reads the disk as A left it.
    let mut c = Client::connect_queues(h.b_be.socket(), 1).unwrap();
    let at = 21 * STRIPE as usize;
    assert_eq!(
        c.read(0, at as u64, 8192).unwrap(),
        h.model[at..at + 8192],
        "B's first demand read\n{}",
        h.b_be.log()
    );
    let st = wait_complete(&h.b_ctl, Duration::from_secs(60));
    assert!(st.fetched > before && st.fetch_errors == 0, "{}", st.raw);
    assert!(
        read_all(&mut c, DISK) == h.model,
        "B does not read as A did"
    );

    // Serving never wrote A: its disk and metadata are as at the hand-over.
    assert!(a_files(&h) == frozen, "A's files changed while serving B");
    // A's VM may not come back while B depends on A.
    let m = move_status(&h.a.ctl);
    assert_eq!(m["moving"], true, "{m}");
    assert!(h.vmm.resume_virtqueue().is_err() || h.vmm.read_sectors(0, 512, T).is_err());
    assert!(
        h.a_be.log().contains("frontend refused"),
        "{}",
        h.a_be.log()
    );

    // B complete: A's backend goes; B goes on, under its own keys.
    h.a_be.guard.kill();
    let mine = pattern_bytes(0x7777 << 32, 4096);
    c.write(0, 5 * STRIPE, &mine).unwrap();
    c.flush(0).unwrap();
    let mut model = h.model.clone();
    model[5 * STRIPE as usize..][..4096].copy_from_slice(&mine);
    assert!(read_all(&mut c, DISK) == model, "B after A died");
    drop(c);
    let mut raw = std::fs::read(&h.b_base).unwrap();
    Xts::new(&B_KEYS.0, &B_KEYS.1).decrypt(0, &mut raw);
    assert!(raw == model, "B's base disk is not the disk under B's keys");

    // B's backend restarts (an upgrade) with its config unchanged and A gone: complete, it
    // needs no source.
    let cfg = h.b_be.config.clone();
    drop(h.b_be);
    let b_be =
        Backend::start(BIN, &cfg).unwrap_or_else(|e| panic!("B does not restart without A: {e:#}"));
    let mut c = Client::connect_queues(b_be.socket(), 1).unwrap();
    assert!(read_all(&mut c, DISK) == model, "B after its restart");
}

/// A migration that fails at switchover (A's VMM starts its ring again): A takes its disk
/// back and serves; B fetched nothing, its files are as init-metadata left them.
#[test]
fn a_failed_migration_leaves_a_serving_and_b_untouched() {
    let mut h = hosts("postcopy-fail", &["autofetch: true"]);
    let b_meta = std::fs::read(&h.b_meta).unwrap();
    h.vmm.stop_queue().unwrap();
    assert!(
        h.a_be.log().contains("disk handed over"),
        "{}",
        h.a_be.log()
    );
    h.vmm.resume_virtqueue().unwrap();
    let got = h.vmm.read_sectors(21 * STRIPE / 512, 8192, T).unwrap();
    assert_eq!(got, h.model[21 * STRIPE as usize..][..8192]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(move_status(&h.a.ctl)["stripes_served"], 0);
    assert!(
        std::fs::read(&h.b_meta).unwrap() == b_meta,
        "B's metadata changed"
    );
    let st = ControlStatus::query(&h.b_ctl).unwrap();
    assert_eq!((st.fetching, st.fetch_errors), (0, 0), "{}", st.raw);
    drop(h.b_dir);
}

/// A dies before B is complete: B's reads of stripes it fetched and its writes to them keep
/// working; a read of a stripe it never fetched fails with EIO after the retry budget.
#[test]
fn when_the_old_host_dies_mid_copy_only_unfetched_stripes_fail() {
    let mut h = hosts(
        "postcopy-die",
        &["fetch_retry_secs: 2", "fetch_timeout_secs: 1"],
    );
    h.vmm.stop_queue().unwrap();
    let mut c = Client::connect_queues(h.b_be.socket(), 1).unwrap();
    for s in [1u64, 2, 21, 40] {
        let at = (s * STRIPE) as usize;
        assert_eq!(c.read(0, at as u64, 4096).unwrap(), h.model[at..at + 4096]);
    }
    h.a_be.guard.kill();
    let mut model = h.model.clone();
    // Fetched stripes: read and written as before.
    let mine = pattern_bytes(0x5555 << 32, 4096);
    c.write(0, 21 * STRIPE + 4096, &mine).unwrap();
    model[(21 * STRIPE + 4096) as usize..][..4096].copy_from_slice(&mine);
    for s in [1u64, 2, 21, 40] {
        let at = (s * STRIPE) as usize;
        assert_eq!(c.read(0, at as u64, 8192).unwrap(), model[at..at + 8192]);
    }
    // An unfetched stripe: EIO within the budget, never other data.
    let t0 = Instant::now();
    assert_eq!(c.read(0, 10 * STRIPE, 4096), Err(libc::EIO));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(c.write(0, 11 * STRIPE, &mine), Err(libc::EIO));
    // Still serving what it has.
    assert_eq!(
        c.read(0, 40 * STRIPE, 8192).unwrap(),
        model[40 * STRIPE as usize..][..8192]
    );
    let st = ControlStatus::query(&h.b_ctl).unwrap();
    assert!(st.fetch_errors > 0 && !st.complete, "{}", st.raw);

    // A comes back (same disk, address and PSK): B's fetches resume.
    let _a = Backend::start(BIN, &h.a.config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match c.read(0, 10 * STRIPE, 4096) {
            Ok(got) => break got,
            Err(e) => assert!(Instant::now() < deadline, "B after A came back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(got, model[10 * STRIPE as usize..][..4096]);
}
