//! The disk's hand-over between two backends on one disk (live migration, `service::handover`):
//! a second backend started on a disk another one holds stands by; its guest's requests fail
//! (EIO, after `handover_wait_secs`, not a hang) and change nothing while the first one serves;
//! it takes the disk when the holder hands it over (its VMM stopped its last ring) or dies, and
//! a lazy disk's autofetch runs in the backend that has the disk only. A source whose ring
//! starts again (a cancelled migration) takes the disk back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions};

use crate::common::*;

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const DISK: u64 = 4 << 20;
const REFUSAL: &str = "the disk is in use by another backend";

/// Waits up to 10 s for `needle` in the backend's log.
fn wait_log(be: &Backend, needle: &str) {
    let t0 = Instant::now();
    while !be.log().contains(needle) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no {needle:?} in the log:\n{}",
            be.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A lazy disk's `status`.
fn status(ctl: &Path) -> ControlStatus {
    ControlStatus::query(ctl).unwrap()
}

/// `status`'s `disk_owner`, for any disk.
fn disk_owner(ctl: &Path) -> bool {
    let reply = control_command(ctl, "status").unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    v["disk_owner"]
        .as_bool()
        .unwrap_or_else(|| panic!("no disk_owner in {reply}"))
}

/// `config` for a second backend: the same but its own vhost and control sockets in `dir`.
fn second(config: &BackendConfig, dir: &Path) -> (BackendConfig, PathBuf) {
    let ctl = dir.join("b-ctl.sock");
    let mut b = config.clone();
    b.socket = dir.join("b.sock");
    b.extra_yaml.retain(|l| !l.starts_with("control_socket:"));
    (b.extra_path("control_socket", &ctl), ctl)
}

/// A pattern disk served by backend A (with a client that wrote `a_data` at 0), and backend B
/// on the same disk, standing by, with `handover_wait_secs: 1`.
struct Two {
    d: PatternDisk,
    a: Backend,
    ca: Client,
    a_data: Vec<u8>,
    b: Backend,
    b_ctl: PathBuf,
}

fn two_backends(prefix: &str) -> Two {
    let d = pattern_disk(prefix, DISK);
    let a_config = BackendConfig::new(&d.img, &d.sock).extra_path("control_socket", &d.ctl);
    let a = Backend::start(BACKEND, &a_config).unwrap();
    let mut ca = Client::connect_queues(&d.sock, 1).unwrap();
    let a_data = pattern_bytes(0xa000_0000, 8192);
    io_ok(ca.write(0, 0, &a_data), "A's write").unwrap();
    let dir = d.img.parent().unwrap().to_path_buf();
    let (b_config, b_ctl) = second(&a_config.extra("handover_wait_secs: 1"), &dir);
    let b = Backend::start(BACKEND, &b_config).unwrap();
    wait_log(&b, "standing by");
    assert!(disk_owner(&d.ctl), "A has the disk");
    assert!(!disk_owner(&b_ctl), "B stands by");
    Two {
        d,
        a,
        ca,
        a_data,
        b,
        b_ctl,
    }
}

/// One request on `c`'s queue 0 (`submit` makes it): its result (negative errno), which
/// must come within 5 s (a refused request fails, it does not hang).
fn within_5s(c: &mut Client, be: &Backend, what: &str, submit: impl FnOnce(&mut QueueIo)) -> i32 {
    let q = c.queue(0);
    submit(q);
    let mut out = Vec::new();
    match q.reap(1, &mut out, Some(Duration::from_secs(5))) {
        Ok(1) => out[0].ret,
        r => panic!(
            "{what}: no completion within 5 s ({r:?}): the request hangs\n{}",
            be.log()
        ),
    }
}

/// B's client: its first request fails after B's 1 s wait, the next ones at once, and B logs
/// the refusal once.
fn refused(t: &Two) -> Client {
    let mut cb = Client::connect_queues(&t.b.config.socket, 1).unwrap();
    let t0 = Instant::now();
    let eio = -libc::EIO;
    let read = |q: &mut QueueIo| q.submit_read(0, 0, 4096, 0);
    assert_eq!(within_5s(&mut cb, &t.b, "B's first read", read), eio);
    let write = |q: &mut QueueIo| {
        q.buf_mut()[..4096].fill(0x5a);
        q.submit_write(65536, 0, 4096, 0)
    };
    assert_eq!(within_5s(&mut cb, &t.b, "B's write", write), eio);
    for _ in 0..5 {
        assert_eq!(within_5s(&mut cb, &t.b, "B's next reads", read), eio);
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "B's refusals took {took:?}:\n{}",
        t.b.log()
    );
    assert_eq!(t.b.log().matches(REFUSAL).count(), 1, "{}", t.b.log());
    assert!(!disk_owner(&t.b_ctl));
    cb
}

#[test]
fn a_second_backend_on_a_disk_in_use_is_refused_and_changes_nothing() {
    let mut t = two_backends("ubiblk-handover");
    let before = read_file(&t.d.img).unwrap();
    let mut cb = refused(&t);
    assert!(read_file(&t.d.img).unwrap() == before, "B changed the disk");

    // A serves as before, B keeps refusing (without logging again).
    let more = pattern_bytes(0xa100_0000, 4096);
    io_ok(t.ca.write(0, 65536, &more), "A's write").unwrap();
    assert_eq!(io_ok(t.ca.read(0, 0, 8192), "A's read").unwrap(), t.a_data);
    assert_eq!(io_ok(t.ca.read(0, 65536, 4096), "A's read").unwrap(), more);
    io_ok(t.ca.flush(0), "A's flush").unwrap();
    assert_eq!(cb.write(0, 131072, &[0x77; 512]), Err(libc::EIO));
    assert_eq!(read_file_at(&t.d.img, 65536, 4096).unwrap(), more);
    assert_eq!(
        read_file_at(&t.d.img, 131072, 512).unwrap(),
        before[131072..131072 + 512]
    );
    assert_eq!(t.b.log().matches(REFUSAL).count(), 1, "{}", t.b.log());
    assert!(disk_owner(&t.d.ctl) && !disk_owner(&t.b_ctl));
}

#[test]
fn the_second_backend_takes_the_disk_when_the_first_dies() {
    let mut t = two_backends("ubiblk-handover-kill");
    let mut cb = refused(&t);
    // kill -9: the lock goes with the process.
    t.a.guard.kill();
    let mine = pattern_bytes(0xb000_0000, 8192);
    io_ok(cb.write(0, 65536, &mine), "B's write after A died").unwrap();
    assert_eq!(io_ok(cb.read(0, 0, 8192), "B's read").unwrap(), t.a_data);
    assert_eq!(io_ok(cb.read(0, 65536, 8192), "B's read").unwrap(), mine);
    io_ok(cb.flush(0), "B's flush").unwrap();
    assert_eq!(read_file_at(&t.d.img, 65536, 8192).unwrap(), mine);
    assert!(disk_owner(&t.b_ctl));
    assert!(t.b.log().contains("took the disk over"), "{}", t.b.log());
}

#[test]
fn a_lazy_disk_in_standby_fetches_nothing_until_it_takes_the_disk() {
    let (files, image) = lazy_autofetch("ubiblk-handover-lazy");
    let mut a = Backend::start(BACKEND, &files.config).unwrap();
    let (b_config, b_ctl) = second(&files.config, files.dir.path());
    let mut b = Backend::start(BACKEND, &b_config).unwrap();
    wait_log(&b, "standing by");

    // A fetches; B, standing by, neither fetches nor counts A's stripes as its own.
    let b0 = status(&b_ctl);
    assert!(!b0.disk_owner && b0.fetching == 0, "{}", b0.raw);
    let a0 = status(&files.ctl);
    assert!(a0.disk_owner, "{}", a0.raw);
    std::thread::sleep(Duration::from_millis(700));
    let a1 = status(&files.ctl);
    let b1 = status(&b_ctl);
    assert!(a1.fetched > a0.fetched, "A does not fetch: {}", a1.raw);
    assert!(!a1.complete, "A finished before the hand-over: {}", a1.raw);
    assert!(
        b1.fetched == b0.fetched && b1.fetching == 0 && !b1.disk_owner,
        "B fetched in standby: {} (before: {})",
        b1.raw,
        b0.raw
    );

    a.guard.kill();
    let a_fetched = {
        let f = std::fs::File::open(&files.meta).unwrap();
        ubiblk::lazy::Metadata::read_from(&f, DISK / 512, None)
            .unwrap()
            .fetched_count()
    };
    assert!(a_fetched > 0);
    // Still standing by: with A gone, B has not touched the metadata either.
    let meta = read_file(&files.meta).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&b_ctl).fetched, b0.fetched);
    assert!(
        read_file(&files.meta).unwrap() == meta,
        "B wrote the metadata"
    );

    // B's guest starts: B takes the disk, re-reads the metadata A left and resumes autofetch.
    let mut cb = Client::connect_queues(&b_config.socket, 1).unwrap();
    let got = io_ok(cb.read(0, 0, 65536), "B's read").unwrap();
    assert!(got == image[..65536], "B's read");
    let st = status(&b_ctl);
    assert!(st.disk_owner, "{}", st.raw);
    assert!(
        st.fetched as usize >= a_fetched,
        "B did not load A's progress ({a_fetched} stripes): {}",
        st.raw
    );
    let t0 = Instant::now();
    loop {
        let st = status(&b_ctl);
        if st.complete {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "B's autofetch did not finish: {}\n{}",
            st.raw,
            b.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = io_ok(cb.read(0, DISK - 262144, 262144), "B's read").unwrap();
    assert!(
        tail == image[(DISK - 262144) as usize..],
        "B's read of the last stripes"
    );
    drop(cb);
    b.guard.kill();
    assert!(
        read_file(&files.base).unwrap() == image,
        "the base disk is not the image after the hand-over"
    );
}

/// A lazy disk over an image of the whole disk (returned), 64 KiB stripes, with autofetch slow
/// enough (~2 s for the disk) to be caught in the middle.
fn lazy_autofetch(prefix: &str) -> (LazyFiles, Vec<u8>) {
    let image = pattern_bytes(0x5eed_0000, DISK as usize);
    let files = LazyFiles::new(
        prefix,
        DISK,
        0xee,
        &image,
        &["autofetch: true", "autofetch_mib_per_sec: 2"],
    );
    files.init_metadata(INIT, 7);
    (files, image)
}

/// Our own frontend (a VMM) on `socket`, queue 0 running.
fn vmm(socket: &Path) -> BlkFrontend {
    let mut fe = BlkFrontend::connect(socket, Duration::from_secs(5)).unwrap();
    fe.setup().unwrap();
    let cfg = fe.read_config().unwrap();
    let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
    fe.setup_memory(&g).unwrap();
    fe.setup_virtqueue(&g).unwrap();
    fe
}

/// A served to our own frontend (a VMM: queue 0 running, one read done), and B on the same
/// disk standing by with `handover_wait_secs: 5`.
fn vmm_and_standby(prefix: &str) -> (PatternDisk, Backend, BlkFrontend, Backend, PathBuf) {
    let d = pattern_disk(prefix, DISK);
    let a_config = BackendConfig::new(&d.img, &d.sock).extra_path("control_socket", &d.ctl);
    let a = Backend::start(BACKEND, &a_config).unwrap();
    let t = Duration::from_secs(5);
    let mut fe = vmm(&d.sock);
    assert_eq!(fe.read_sectors(0, 4096, t).unwrap(), pattern_bytes(0, 4096));
    let dir = d.img.parent().unwrap().to_path_buf();
    let (b_config, b_ctl) = second(&a_config.extra("handover_wait_secs: 5"), &dir);
    let b = Backend::start(BACKEND, &b_config).unwrap();
    wait_log(&b, "standing by");
    (d, a, fe, b, b_ctl)
}

#[test]
fn the_holder_hands_the_disk_over_when_its_vmm_stops_the_last_ring() {
    let (d, a, mut fe, b, b_ctl) = vmm_and_standby("ubiblk-handover-stop");
    let mut cb = Client::connect_queues(&b.config.socket, 1).unwrap();
    // B's guest starts (after switchover) while A's VMM is still stopping its ring: B's first
    // request waits for the disk, and gets it when A's last ring stops (GET_VRING_BASE).
    let (got, (b_owner, status_took)) = std::thread::scope(|s| {
        let stopper = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            // B is waiting for the disk: its control socket answers at once all the same.
            let t0 = Instant::now();
            let owner = disk_owner(&b_ctl);
            let took = t0.elapsed();
            fe.stop_queue().unwrap();
            (owner, took)
        });
        let read = |q: &mut QueueIo| q.submit_read(8192, 0, 4096, 0);
        let got = within_5s(&mut cb, &b, "B's read during the hand-over", read);
        (got, stopper.join().unwrap())
    });
    assert_eq!(got, 0, "B's read:\n{}\nA:\n{}", b.log(), a.log());
    assert!(!b_owner, "B said it had the disk while waiting for it");
    assert!(
        status_took < Duration::from_secs(1),
        "B's status took {status_took:?} while B waited for the disk"
    );
    assert_eq!(cb.queue(0).buf()[..4096], pattern_bytes(8192, 4096));
    assert!(a.log().contains("disk handed over"), "{}", a.log());
    assert!(disk_owner(&b_ctl) && !disk_owner(&d.ctl));
    let mine = pattern_bytes(0xc000_0000, 4096);
    io_ok(cb.write(0, 0, &mine), "B's write").unwrap();
    io_ok(cb.flush(0), "B's flush").unwrap();
    assert_eq!(read_file_at(&d.img, 0, 4096).unwrap(), mine);
}

#[test]
fn a_cancelled_migration_leaves_the_source_serving() {
    let (d, a, mut fe, b, b_ctl) = vmm_and_standby("ubiblk-handover-cancel");
    // The source stops its ring (switchover) and hands the disk over; the migration fails
    // and the source's VMM starts the ring again: the source takes the disk back and serves.
    let base = fe.stop_queue().unwrap();
    assert!(a.log().contains("disk handed over"), "{}", a.log());
    assert!(!disk_owner(&d.ctl));
    assert_eq!(u32::from(fe.resume_virtqueue().unwrap()), base);
    let t = Duration::from_secs(5);
    let got = fe
        .read_sectors(16, 4096, t)
        .unwrap_or_else(|e| panic!("A after the cancelled migration: {e}\n{}", a.log()));
    assert_eq!(got, pattern_bytes(8192, 4096));
    assert!(disk_owner(&d.ctl) && !disk_owner(&b_ctl));
    assert!(!b.log().contains("took the disk over"), "{}", b.log());
}

#[test]
fn a_lazy_source_pauses_autofetch_at_the_hand_over_and_resumes_it_when_cancelled() {
    let (files, image) = lazy_autofetch("ubiblk-handover-lazy-cancel");
    let a = Backend::start(BACKEND, &files.config).unwrap();
    let t = Duration::from_secs(5);
    let mut fe = vmm(&files.config.socket);
    assert!(fe.read_sectors(0, 4096, t).unwrap() == image[..4096]);
    std::thread::sleep(Duration::from_millis(300));

    // Switchover: the ring stops, A hands the disk over with its progress saved, and fetches
    // nothing more.
    let base = fe.stop_queue().unwrap();
    let s0 = status(&files.ctl);
    assert!(!s0.disk_owner && s0.fetching == 0, "{}", s0.raw);
    assert!(
        !s0.complete,
        "autofetch finished before the hand-over: {}",
        s0.raw
    );
    let saved = {
        let f = std::fs::File::open(&files.meta).unwrap();
        ubiblk::lazy::Metadata::read_from(&f, DISK / 512, None)
            .unwrap()
            .fetched_count()
    };
    assert_eq!(
        saved as u64, s0.fetched,
        "progress not saved at the hand-over"
    );
    std::thread::sleep(Duration::from_millis(400));
    let s1 = status(&files.ctl);
    assert_eq!(
        s1.fetched, s0.fetched,
        "A fetched after handing over: {}",
        s1.raw
    );

    // The migration is cancelled: the ring starts again, A takes the disk back and finishes.
    assert_eq!(u32::from(fe.resume_virtqueue().unwrap()), base);
    let at = 40 * 65536;
    let got = fe
        .read_sectors(at / 512, 4096, t)
        .unwrap_or_else(|e| panic!("A after the cancelled migration: {e}\n{}", a.log()));
    assert!(got == image[at as usize..at as usize + 4096]);
    assert!(status(&files.ctl).disk_owner);
    let t0 = Instant::now();
    while !status(&files.ctl).complete {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "autofetch did not resume: {}\n{}",
            status(&files.ctl).raw,
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        read_file(&files.base).unwrap() == image,
        "the base disk is not the image"
    );
}

/// CPU time (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_hostile_guest_on_a_standby_backend_does_not_make_it_spin() {
    let (_d, _a, _fe, b, b_ctl) = vmm_and_standby("ubiblk-handover-hostile");
    let mut fe = vmm(&b.config.socket);
    let t = Duration::from_secs(10);
    // B's first request waits for the disk (5 s) and fails.
    let e = fe.read_sectors(0, 4096, t).unwrap_err().to_string();
    assert!(e.contains("IOERR"), "{e}");
    // An avail index more than a ring ahead: no chain can be popped, and there is no disk to
    // serve them with anyway. B must neither spin nor stop answering.
    fe.force_avail_index(1000).unwrap();
    let pid = b.guard.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(used < 30, "B used {used} ticks of CPU in 1 s:\n{}", b.log());
    assert!(!disk_owner(&b_ctl));
}
