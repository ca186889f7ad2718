//! Live migration (issue #23): a guest running fio with crc32c verification moves between two
//! QEMU processes on this host, each on its own backend serving the same disk with the same
//! config (only the sockets differ): A -> B -> A (a new QEMU on A's backend). The guest's
//! reads land in its memory during the pre-copy rounds (tests/vm/fio-restart.sh with
//! `ubiblk.read_pass=1`: writes verified with `--verify_backlog`, then read-only passes), and the disk's
//! hand-over (the source releases it when QEMU stops its rings, the destination takes it when
//! its rings start) keeps the lazy metadata and autofetch consistent across the hops.
//!
//! What these guests cannot show: on this host (QEMU 10.0, TCG) they passed even with a
//! backend that marked nothing in the dirty log, so the marking itself is checked page by page
//! with our own frontend (tests/integration/dirty_log.rs).

use super::*;
use common::Migration;

/// Disk and image of the migrated disk: an encrypted lazy disk with copy-on-read, filling from
/// a 100 MiB image in the background (throttled so that autofetch runs through both hops).
const DISK: u64 = 128 * MIB;

/// Writes `d/NAME.yaml`: the disk `d/disk.raw` on 2 queues, `extra` (with `{d}` for `d`), and
/// the backend's own sockets (`NAME.sock`, `NAME.ctl`): what differs between A and B.
fn config(d: &Path, name: &str, extra: &str) -> PathBuf {
    let path = d.join(format!("{name}.yaml"));
    let yaml = format!(
        "path: \"{d}/disk.raw\"\nsocket: \"{d}/{name}.sock\"\n\
         control_socket: \"{d}/{name}.ctl\"\nnum_queues: 2\n{extra}",
        d = d.display(),
        extra = extra.replace("{d}", &d.display().to_string())
    );
    fs::write(&path, yaml).unwrap();
    path
}

/// Starts the backend on `d/NAME.yaml` (logging at info to `d/NAME.log`): it and its socket.
pub(super) fn start(d: &Path, name: &str) -> (Backend, PathBuf) {
    let sock = d.join(format!("{name}.sock"));
    let env = [("RUST_LOG".to_string(), "info".to_string())];
    let config = d.join(format!("{name}.yaml"));
    let log = d.join(format!("{name}.log"));
    (Backend::start(&config, &[], &env, &log, &sock), sock)
}

/// Runs tests/vm/migrate.py: the guest boots on `sockets[0]` and migrates along the rest, at a
/// `max-bandwidth` low enough for several pre-copy rounds while fio runs.
fn migrate(sockets: &[&Path], cmdline: &str, console: &Path, cancel_first: bool) -> Migration {
    let sockets: Vec<PathBuf> = sockets.iter().map(|s| s.to_path_buf()).collect();
    common::migrate(&common::MigrateRun {
        guest: guest_dir(),
        sockets: &sockets,
        cmdline,
        console,
        bandwidth: Some(64 * MIB),
        cancel_first,
    })
    .unwrap()
}

/// A plain disk, A -> B after a cancelled first attempt (the source keeps serving): the guest's O_DIRECT buffers are page-aligned, so the backend's
/// io_uring reads land straight in guest memory, seen only by the completion-time marking
/// (the encrypted disk below decrypts through a bounce buffer, which vm-memory marks).
#[test]
fn guest_live_migration_plain_disk() {
    if !require(&GUEST) {
        return;
    }
    let _serial = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::File::create(d.join("disk.raw"))
        .unwrap()
        .set_len(DISK)
        .unwrap();
    for name in ["a", "b"] {
        config(d, name, "");
    }
    let ((a, sock_a), (b, sock_b)) = (start(d, "a"), start(d, "b"));
    let console = d.join("console.txt");
    let m = migrate(
        &[&sock_a, &sock_b],
        "ubiblk.fio_secs=20 ubiblk.read_pass=1",
        &console,
        true,
    );
    let report = format!(
        "{m:?}\n--- consoles ---\n{}\n--- backend A ---\n{}\n--- backend B ---\n{}",
        fs::read_to_string(&console).unwrap_or_default(),
        a.log_text(),
        b.log_text()
    );
    assert!(m.error.is_none(), "{report}");
    assert!(m.hops.iter().all(|h| h.status == "completed"), "{report}");
    // A first attempt was cancelled and the guest went on on A; then it moved.
    assert!(m.cancelled, "{report}");
    eprintln!("plain disk: {:?}", m.hops);
    assert_eq!(m.exit_status, Some(0), "{report}");
}

#[test]
fn guest_live_migration_encrypted_lazy_a_b_a() {
    if !require(&GUEST) {
        return;
    }
    let _serial = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("image.raw"), lazy_image(LAZY_IMAGE)).unwrap();
    fs::File::create(d.join("disk.raw"))
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let lazy = "image_path: \"{d}/image.raw\"\n\
                metadata_path: \"{d}/metadata\"\n\
                copy_on_read: true\n\
                autofetch: true\n\
                autofetch_mib_per_sec: 8\n\
                encryption_key:\n  \
                - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  \
                - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"\n";
    let config_a = config(d, "a", lazy);
    config(d, "b", lazy);

    let o = Command::new(env!("CARGO_BIN_EXE_init-metadata"))
        .arg("-f")
        .arg(&config_a)
        .output()
        .unwrap();
    assert!(o.status.success(), "init-metadata failed: {o:?}");
    let ((a, sock_a), (b, sock_b)) = (start(d, "a"), start(d, "b"));
    assert!(
        b.log_text().contains("standing by"),
        "the second backend on the disk should stand by:\n{}",
        b.log_text()
    );

    let console = d.join("console.txt");
    let m = migrate(
        &[&sock_a, &sock_b, &sock_a],
        "ubiblk.fio_secs=30 ubiblk.read_pass=1",
        &console,
        false,
    );
    let report = || {
        format!(
            "{m:?}\n--- consoles ---\n{}\n--- backend A ---\n{}\n--- backend B ---\n{}",
            fs::read_to_string(&console).unwrap_or_default(),
            a.log_text(),
            b.log_text()
        )
    };
    assert!(m.error.is_none(), "{}", report());
    assert_eq!(m.hops.len(), 2, "{}", report());
    for (i, hop) in m.hops.iter().enumerate() {
        eprintln!(
            "hop {}: {} downtime {:?} ms, total {:?} ms, {:?} dirty syncs",
            i + 1,
            hop.status,
            hop.downtime_ms,
            hop.total_ms,
            hop.dirty_sync_count
        );
        assert_eq!(hop.status, "completed", "{}", report());
    }
    assert_eq!(m.exit_status, Some(0), "{}", report());
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    assert!(console_text.contains("fio-restart: PASS"), "{}", report());
    // Each backend took the disk when its guest started, and handed it over at switchover.
    let (log_a, log_b) = (a.log_text(), b.log_text());
    assert!(log_b.contains("took the disk over"), "{}", report());
    assert!(log_b.contains("disk handed over"), "{}", report());
    assert!(log_a.contains("disk handed over"), "{}", report());

    // Autofetch went on across the hops and finished on A, every fetch durable.
    let control_a = d.join("a.ctl");
    let t0 = Instant::now();
    let status = loop {
        let s = ControlStatus::query(&control_a).unwrap();
        if s.complete || t0.elapsed() > Duration::from_secs(60) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.complete, "{}\n{}", status.raw, report());
    assert_eq!(status.fetch_errors, 0, "{}", status.raw);
    // fio wrote its 2 x 16 MiB at the start of the disk: those stripes are WRITTEN.
    assert!(
        status.written >= 32 * MIB / status.stripe_bytes,
        "{}",
        status.raw
    );
    drop(b);

    // The rest of the disk reads as the image, then zeros, through A (a fresh client).
    assert_reads_as_image(&sock_a, 32 * MIB, DISK, &|| a.log_text());
}
