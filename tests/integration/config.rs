//! Config fields of the reference's v0.2 line (`cpus`, `write_through`, `track_written`) and
//! older ones (`direct_io`), accepted by the real `vhost-backend` with their meaning; unknown
//! and refused legacy fields named in the error.

use crate::common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const FRONTEND: &str = env!("CARGO_BIN_EXE_vhost-frontend");

struct Disk {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

fn disk() -> Disk {
    let dir = scratch_dir("ubiblk-cfg");
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, 4 << 20).unwrap();
    let sock = dir.path().join("vhost.sock");
    Disk {
        img,
        sock,
        _dir: dir,
    }
}

fn config(d: &Disk, queues: usize, extra: &[&str]) -> BackendConfig {
    extra.iter().fold(
        BackendConfig::new(&d.img, &d.sock).num_queues(queues),
        |cfg, e| cfg.extra(*e),
    )
}

/// Starts a backend that must refuse `extra` at start-up (exit 1); its log.
fn refused(extra: &[&str]) -> String {
    let d = disk();
    let mut guard = Backend::spawn(BACKEND, &config(&d, 2, extra), &[]).unwrap();
    let status = guard.wait_timeout(Duration::from_secs(10));
    let log = guard.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{extra:?}: {log}");
    assert!(!d.sock.exists(), "{log}");
    log
}

#[test]
fn legacy_fields_are_accepted_and_ignored_ones_warned_about_once() {
    let d = disk();
    let be = Backend::start(
        BACKEND,
        &config(&d, 1, &["direct_io: false", "track_written: false"]),
    )
    .unwrap();
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
    let log = be.log();
    for field in ["direct_io", "track_written"] {
        let warning = format!("config field `{field}` has no effect");
        assert_eq!(log.matches(&warning).count(), 1, "{log}");
    }
    drop(be);
    // `track_written: true` is what ours does anyway: nothing to warn about.
    let be = Backend::start(BACKEND, &config(&d, 1, &["track_written: true"])).unwrap();
    drop(Client::connect_queues(&d.sock, 1).unwrap());
    assert!(!be.log().contains("has no effect"), "{}", be.log());
}

#[test]
fn unknown_fields_are_named_and_refused_legacy_ones_say_so() {
    let log = refused(&["write_trough: true"]);
    assert!(log.contains("unknown field `write_trough`"), "{log}");
    assert!(!log.contains("legacy"), "{log}");
    let log = refused(&["sync_io: true"]);
    assert!(
        log.contains("unknown field `sync_io`") && log.contains("legacy field"),
        "{log}"
    );
    assert!(log.contains("write_through"), "{log}");
}

#[test]
fn cpus_must_have_one_allowed_cpu_per_queue() {
    let log = refused(&["cpus: [0]"]);
    assert!(
        log.contains("cpus") && log.contains("one per queue"),
        "{log}"
    );
    // 1000 fits a cpu_set_t but is not a CPU this machine lets us run on.
    let log = refused(&["cpus: [0, 1000]"]);
    assert!(
        log.contains("cpus") && log.contains("CPU 1000 is not one this process may run on"),
        "{log}"
    );
    let log = refused(&["cpus: [0, 5000]"]);
    assert!(
        log.contains("cpus") && log.contains("out of range"),
        "{log}"
    );
}

/// The `writeback` line of `vhost-frontend --stage config`.
fn writeback(d: &Disk) -> String {
    let o = Command::new(FRONTEND)
        .args(["-s", &d.sock.to_string_lossy(), "--stage", "config"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}");
    out.lines()
        .find_map(|l| l.trim().strip_prefix("writeback: "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

#[test]
fn write_through_shows_in_the_config_space_and_serves_io() {
    let d = disk();
    let be = Backend::start(BACKEND, &config(&d, 1, &[])).unwrap();
    assert_eq!(writeback(&d), "1");
    drop(be);

    let be = Backend::start(BACKEND, &config(&d, 1, &["write_through: true"])).unwrap();
    assert_eq!(writeback(&d), "0", "{}", be.log());
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    let data = vec![0x5a; 64 << 10];
    c.write(0, 8192, &data).unwrap();
    c.flush(0).unwrap();
    c.write_zeroes(0, 1 << 20, 1 << 20, false).unwrap();
    assert_eq!(c.read(0, 8192, data.len()).unwrap(), data);
    assert_eq!(c.read(0, 1 << 20, 4096).unwrap(), vec![0; 4096]);
    drop(c);
    drop(be);
    let on_disk = read_file(&d.img).unwrap();
    assert_eq!(&on_disk[8192..8192 + data.len()], &data[..]);
    assert!(on_disk[1 << 20..2 << 20].iter().all(|&b| b == 0));
}

/// `Cpus_allowed_list` of each of the backend's queue worker threads (vhost-user-backend
/// names them `vring_worker`), in thread id order.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    tids.into_iter()
        .filter_map(|tid| {
            let dir = format!("/proc/{pid}/task/{tid}");
            let comm = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
            if comm.trim() != "vring_worker" {
                return None;
            }
            let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
            status.lines().find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_string())
            })
        })
        .collect()
}

fn our_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    list.split(',')
        .flat_map(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![r.parse().unwrap()],
        })
        .collect()
}

#[test]
fn cpus_pin_each_queue_worker_to_its_cpu() {
    let cpus = our_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: needs 2 CPUs, this process may run on {cpus:?}");
        return;
    }
    let (a, b) = (cpus[0], cpus[1]);
    let d = disk();

    // Without `cpus` no worker is pinned, even after I/O on both queues.
    let be = Backend::start(BACKEND, &config(&d, 2, &[])).unwrap();
    let mut c = Client::connect_queues(&d.sock, 2).unwrap();
    c.read(0, 0, 4096).unwrap();
    c.read(1, 0, 4096).unwrap();
    let all = worker_cpus(be.guard.pid());
    assert_eq!(all.len(), 2, "{all:?}");
    for w in &all {
        assert!(
            w.contains([',', '-']),
            "unpinned worker on one CPU: {all:?}"
        );
    }
    drop(c);
    drop(be);

    // vhost-user-backend starts the workers in queue order, so in thread id order they are
    // queue 0, queue 1; both orders of the two CPUs, so that neither can pass by chance.
    for order in [[b, a], [a, b]] {
        let cpus = format!("cpus: [{}, {}]", order[0], order[1]);
        let be = Backend::start(BACKEND, &config(&d, 2, &[&cpus])).unwrap();
        let mut c = Client::connect_queues(&d.sock, 2).unwrap();
        assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
        assert_eq!(c.read(1, 4096, 4096).unwrap(), pattern_bytes(4096, 4096));
        let want: Vec<String> = order.iter().map(usize::to_string).collect();
        assert_eq!(worker_cpus(be.guard.pid()), want, "{}", be.log());
        let log = be.log();
        for (q, cpu) in order.iter().enumerate() {
            let line = format!("queue {q}: worker thread pinned to CPU {cpu}");
            assert_eq!(log.matches(&line).count(), 1, "{log}");
        }
    }
}

#[test]
fn track_written_false_still_sets_the_written_bit() {
    // Ours always tracks WRITTEN (docs/migration-v0.2.md); v0.2 would leave it unset here.
    let shift = 7;
    let stripe = 512u64 << shift;
    let image = pattern_bytes(0, 4 * stripe as usize);
    let l = LazyFiles::new(
        "ubiblk-cfg",
        4 * stripe,
        0,
        &image,
        &["track_written: false"],
    );
    l.init_metadata(env!("CARGO_BIN_EXE_init-metadata"), shift);
    let be = Backend::start(BACKEND, &l.config).unwrap();
    let mut c = Client::connect_queues(&l.config.socket, 1).unwrap();
    c.write(0, 2 * stripe, &[7; 4096]).unwrap();
    c.flush(0).unwrap();
    let f = std::fs::File::open(&l.meta).unwrap();
    let md = ubiblk::lazy::Metadata::read_from(&f, 4 * stripe / 512, None).unwrap();
    assert!(md.is_fetched(2) && md.is_written(2), "{:?}", md.stripes);
    assert_eq!(md.written_count(), 1);
    assert!(be
        .log()
        .contains("config field `track_written` has no effect"));
}
