//! Post-copy live migration (issue #25): a guest running fio with crc32c verification moves
//! from host A to host B, which does not have its disk. A serves an encrypted lazy disk
//! (copy-on-read, still filling from its image) and a stripe server; B stands by
//! (`standby: true`) on an empty disk with other keys, `image_url: ubiblk://A` and metadata
//! made against A. A first migration is cancelled (A keeps serving); the second moves the VM.
//! At switchover A hands the disk over and from then on serves it frozen to B; B's guest goes
//! on at once, B completes, A's backend is killed while fio still runs on B, fio finishes with
//! every block verified, and the blocks the guest never wrote read on B as A's image.

use super::migrate::start;
use super::*;
use std::os::unix::fs::PermissionsExt;

const DISK: u64 = 128 * MIB;

fn write_config(d: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = d.join(format!("{name}.yaml"));
    fs::write(&path, yaml.replace("{d}", &d.display().to_string())).unwrap();
    path
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_post_copy_migration_to_a_host_without_the_disk() {
    if !require(&GUEST) {
        return;
    }
    let _serial = guest_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("image.raw"), lazy_image(LAZY_IMAGE)).unwrap();
    for disk in ["a.raw", "b.raw"] {
        fs::File::create(d.join(disk))
            .unwrap()
            .set_len(DISK)
            .unwrap();
    }
    let psk = d.join("psk");
    fs::write(&psk, b"post-copy-test-psk-0123456789abcdef").unwrap();
    fs::set_permissions(&psk, fs::Permissions::from_mode(0o600)).unwrap();
    let common = "num_queues: 2\ncopy_on_read: true\n";
    // A fills from its image slowly: it is partly fetched when the VM leaves.
    let config_a = write_config(
        d,
        "a",
        &format!(
            "path: \"{{d}}/a.raw\"\nsocket: \"{{d}}/a.sock\"\ncontrol_socket: \"{{d}}/a.ctl\"\n\
             {common}image_path: \"{{d}}/image.raw\"\nmetadata_path: \"{{d}}/a.meta\"\n\
             autofetch: true\nautofetch_mib_per_sec: 2\n\
             encryption_key:\n  - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  \
             - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"\n\
             stripe_server: {{listen: \"127.0.0.1:0\", psk_identity: host-b, psk_file: \"{{d}}/psk\"}}\n"
        ),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_init-metadata"))
        .arg("-f")
        .arg(&config_a)
        .output()
        .unwrap();
    assert!(o.status.success(), "init-metadata (A) failed: {o:?}");
    let (a, sock_a) = start(d, "a");
    let addr = common::stripe_server_addr(|| a.log_text()).unwrap();
    let config_b = write_config(
        d,
        "b",
        &format!(
            "path: \"{{d}}/b.raw\"\nsocket: \"{{d}}/b.sock\"\ncontrol_socket: \"{{d}}/b.ctl\"\n\
             {common}image_url: \"ubiblk://{addr}\"\npsk_identity: host-b\n\
             psk_file: \"{{d}}/psk\"\nmetadata_path: \"{{d}}/b.meta\"\nautofetch: true\n\
             standby: true\n\
             encryption_key:\n  - \"MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM=\"\n  \
             - \"REREREREREREREREREREREREREREREREREREREREREQ=\"\n"
        ),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_init-metadata"))
        .arg("-f")
        .arg(&config_b)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "init-metadata (B, against A) failed: {o:?}"
    );
    let (b, sock_b) = start(d, "b");

    let console = d.join("console.txt");
    let (ctl_a, ctl_b) = (d.join("a.ctl"), d.join("b.ctl"));
    let sockets = [sock_a.clone(), sock_b.clone()];
    let (m, a_killed_while_running) = std::thread::scope(|s| {
        let run = s.spawn(|| {
            common::migrate(&common::MigrateRun {
                guest: guest_dir(),
                sockets: &sockets,
                cmdline: "ubiblk.fio_secs=60 ubiblk.read_pass=1",
                console: &console,
                bandwidth: Some(64 * MIB),
                cancel_first: true,
            })
            .unwrap()
        });
        // B completes from A, then A's backend goes while the guest still runs on B.
        wait_for("B complete", Duration::from_secs(400), || {
            run.is_finished() || ControlStatus::query(&ctl_b).is_ok_and(|s| s.complete)
        });
        let running = !run.is_finished();
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(a.child.id().to_string())
            .status();
        (run.join().unwrap(), running)
    });
    let report = || {
        format!(
            "{m:?}\n--- consoles ---\n{}\n--- backend A ---\n{}\n--- backend B ---\n{}",
            fs::read_to_string(&console).unwrap_or_default(),
            a.log_text(),
            b.log_text()
        )
    };
    assert!(m.error.is_none(), "{}", report());
    assert!(m.cancelled, "{}", report());
    assert_eq!(m.hops.len(), 1, "{}", report());
    assert_eq!(m.hops[0].status, "completed", "{}", report());
    eprintln!(
        "post-copy hop: downtime {:?} ms, total {:?} ms",
        m.hops[0].downtime_ms, m.hops[0].total_ms
    );
    assert_eq!(m.exit_status, Some(0), "{}", report());
    assert!(
        fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("fio-restart: PASS"),
        "{}",
        report()
    );
    assert!(
        a_killed_while_running,
        "the guest ended before B completed: {}",
        report()
    );
    let (log_a, log_b) = (a.log_text(), b.log_text());
    assert!(log_b.contains("standby"), "{}", report());
    assert!(log_b.contains("took the disk over"), "{}", report());
    assert!(log_a.contains("disk handed over"), "{}", report());
    // B never asked A before A handed the disk over: A would have answered 0xFF (its guest's
    // rings ran), which B retries. (That B in standby fetches nothing at all is checked
    // directly in tests/integration/postcopy.rs.)
    let st = ControlStatus::query(&ctl_b).unwrap();
    assert!(st.complete && st.fetch_errors == 0, "{}", st.raw);
    assert!(st.raw.contains("\"fetch_retries\":0,"), "{}", st.raw);
    assert!(ControlStatus::query(&ctl_a).is_err(), "A still answers");

    // On B alone: what the guest never wrote (past fio's 2 x 16 MiB) reads as A's image.
    drop(a);
    assert_reads_as_image(&sock_b, 32 * MIB, DISK, &|| b.log_text());
}
