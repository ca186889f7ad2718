//! The real `vhost-backend` binary driven by libblkio's virtio-blk-vhost-user driver, a client
//! we did not write.

use crate::common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");

struct Disk {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

fn disk(size: u64) -> Disk {
    let dir = scratch_dir("ubiblk-it");
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, size).unwrap();
    let sock = dir.path().join("vhost.sock");
    Disk { dir, img, sock }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) as u8)
        .collect()
}

fn start(d: &Disk, queues: usize, extra: &[&str]) -> Backend {
    let mut cfg = BackendConfig::new(&d.img, &d.sock).num_queues(queues);
    for e in extra {
        cfg = cfg.extra(*e);
    }
    Backend::start(BIN, &cfg).unwrap()
}

#[test]
fn capacity_and_initial_content() {
    let d = disk(10 << 20);
    // A trailing partial sector is not exposed.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.img)
        .unwrap()
        .set_len((10 << 20) + 100)
        .unwrap();
    let _be = start(&d, 1, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 10 << 20);
    assert!(!c.read_only());
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
    let last = (10 << 20) - 512;
    assert_eq!(c.read(0, last, 512).unwrap(), pattern_bytes(last, 512));
}

#[test]
fn the_most_queues_all_serve_their_own_requests() {
    // 64 queues: the most a backend takes (one worker thread each, vhost-user-backend's u64
    // thread masks). Each queue writes its own block and reads another queue's back.
    let d = disk(1 << 20);
    let _be = start(&d, 64, &[]);
    let mut c = Client::connect_queues(&d.sock, 64).unwrap();
    assert_eq!(c.num_queues(), 64);
    for q in 0..64 {
        c.write(q, q as u64 * 4096, &[q as u8 + 1; 4096]).unwrap();
    }
    for q in 0..64 {
        let other = (q + 17) % 64;
        let data = c.read(q, other as u64 * 4096, 4096).unwrap();
        assert!(data.iter().all(|&b| b == other as u8 + 1), "queue {q}");
    }
}

#[test]
fn multi_queue_concurrent_writes_read_back_and_reach_the_file() {
    let d = disk(64 << 20);
    let _be = start(&d, 2, &[]);
    let mut c = Client::connect(
        &d.sock,
        &ClientOptions {
            num_queues: 2,
            mem_size: 16 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    const BS: usize = 16384;
    const QD: usize = 32;
    // Each queue writes QD requests at a time into its own half of the disk.
    std::thread::scope(|s| {
        for q in c.queues_mut() {
            s.spawn(move || {
                let base = q.index() as u64 * (32 << 20);
                for round in 0..8u64 {
                    for i in 0..QD {
                        let blk = round * QD as u64 + i as u64;
                        let data = pattern(base + blk, BS);
                        q.buf_mut()[i * BS..(i + 1) * BS].copy_from_slice(&data);
                        q.submit_write(base + blk * BS as u64, i * BS, BS, i);
                    }
                    let done = q.drain().unwrap();
                    assert_eq!(done.len(), QD);
                    assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
                }
            });
        }
    });
    c.flush(0).unwrap();
    // Read back through the other queue, then straight from the file.
    for q in 0..2u64 {
        let base = q * (32 << 20);
        for blk in [0u64, 17, 255] {
            let got = c.read(1 - q as usize, base + blk * BS as u64, BS).unwrap();
            assert_eq!(got, pattern(base + blk, BS), "queue {q} block {blk}");
            let on_disk = read_file_at(&d.img, base + blk * BS as u64, BS).unwrap();
            assert_eq!(on_disk, got);
        }
    }
    // Untouched space keeps its original content.
    let off = (32 << 20) - 4096;
    assert_eq!(
        read_file_at(&d.img, off, 4096).unwrap(),
        pattern_bytes(off, 4096)
    );
}

#[test]
fn scatter_gather_with_unaligned_buffers() {
    let d = disk(16 << 20);
    let _be = start(&d, 1, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    let a = pattern(1, 512);
    let b = pattern(2, 3584);
    let e = pattern(3, 8192);
    // Buffers at odd offsets inside the client's memory: not sector-aligned in guest RAM.
    c.writev_at(0, 8192, &[(1, &a), (5000, &b), (20011, &e)])
        .unwrap();
    let whole = [a.clone(), b.clone(), e.clone()].concat();
    assert_eq!(read_file_at(&d.img, 8192, whole.len()).unwrap(), whole);
    let parts = c
        .readv_at(0, 8192, &[(3, 1024), (9001, 3072), (30007, 8192)])
        .unwrap();
    assert_eq!(parts.concat(), whole);
}

#[test]
fn flush_discard_and_write_zeroes() {
    let d = disk(16 << 20);
    let _be = start(&d, 1, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    c.write(0, 0, &pattern(9, 65536)).unwrap();
    c.flush(0).unwrap();
    c.discard(0, 4096, 8192).unwrap();
    c.write_zeroes(0, 32768, 4096, false).unwrap();
    c.write_zeroes(0, 49152, 4096, true).unwrap();
    let got = c.read(0, 0, 65536).unwrap();
    let orig = pattern(9, 65536);
    for (i, chunk) in got.chunks(4096).enumerate() {
        let zero = matches!(i, 1 | 2 | 8 | 12);
        let want: &[u8] = if zero {
            &[0; 4096]
        } else {
            &orig[i * 4096..(i + 1) * 4096]
        };
        assert_eq!(chunk, want, "block {i}");
    }
    assert_eq!(read_file_at(&d.img, 0, 65536).unwrap(), got);
}

#[test]
fn skip_sync_flush_completes() {
    let d = disk(4 << 20);
    let _be = start(&d, 1, &["skip_sync: true"]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    c.write(0, 0, &pattern(4, 4096)).unwrap();
    c.flush(0).unwrap();
}

#[test]
fn readonly_disk_is_offered_read_only() {
    let d = disk(4 << 20);
    let _be = start(&d, 1, &["readonly: true"]);
    // A client that does not accept a read-only device is refused by the RO feature.
    assert!(Client::connect_queues(&d.sock, 1).is_err());
    let mut c = Client::connect(
        &d.sock,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.read_only());
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
    assert!(c.write(0, 0, &[1; 4096]).is_err());
    assert!(c.discard(0, 0, 4096).is_err());
    assert_eq!(
        read_file_at(&d.img, 0, 4096).unwrap(),
        pattern_bytes(0, 4096)
    );
}

#[test]
fn out_of_range_requests_fail_and_the_queue_survives() {
    let d = disk(4 << 20);
    let _be = start(&d, 1, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert!(c.read(0, 4 << 20, 4096).is_err());
    assert!(c.write(0, (4 << 20) - 512, &[7; 1024]).is_err());
    assert_eq!(
        read_file_at(&d.img, (4 << 20) - 512, 512).unwrap(),
        pattern_bytes((4 << 20) - 512, 512)
    );
    assert_eq!(c.read(0, 0, 512).unwrap(), pattern_bytes(0, 512));
}

#[test]
fn serves_again_after_the_client_goes_away() {
    let d = disk(8 << 20);
    let be = start(&d, 2, &[]);
    for round in 0..3u64 {
        let mut c = Client::connect_queues(&d.sock, 2).unwrap();
        if round > 0 {
            // What the previous client wrote is still there.
            assert_eq!(
                c.read(1, (round - 1) * 65536, 65536).unwrap(),
                pattern(round - 1, 65536)
            );
        }
        c.write(0, round * 65536, &pattern(round, 65536)).unwrap();
        // Leave requests in flight when disconnecting.
        for i in 0..16 {
            c.queue(1).submit_read(0, i * 4096, 4096, i);
        }
        c.queue(1)
            .reap(0, &mut Vec::new(), Some(Duration::ZERO))
            .unwrap();
        drop(c);
    }
    let mut guard = be.guard;
    assert!(
        guard.try_wait().is_none(),
        "backend exited: {}",
        guard.log()
    );
}

#[test]
fn sigterm_syncs_and_exits_cleanly() {
    let d = disk(8 << 20);
    let be = start(&d, 1, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    c.write(0, 4096, &pattern(5, 8192)).unwrap();
    let mut guard = be.guard;
    guard.signal(libc::SIGTERM);
    let status = guard
        .wait_timeout(Duration::from_secs(10))
        .expect("backend did not exit on SIGTERM");
    assert!(status.success(), "{status:?}: {}", guard.log());
    assert!(!d.sock.exists(), "socket left behind");
    assert_eq!(read_file_at(&d.img, 4096, 8192).unwrap(), pattern(5, 8192));
    drop(c);
}

/// Runs the backend on a config made of `yaml` until it exits.
fn run_on_config(d: &Disk, yaml: &str) -> std::process::Output {
    let cfg = d.dir.path().join("bad.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap()
}

/// Runs the backend on a config made of `yaml` and returns its stderr; it must fail to start.
fn start_failure(d: &Disk, yaml: &str) -> String {
    let out = run_on_config(d, yaml);
    assert!(!out.status.success(), "started on {yaml:?}");
    assert!(!d.sock.exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn base_yaml(d: &Disk) -> String {
    format!("path: {}\nsocket: {}\n", d.img.display(), d.sock.display())
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let d = disk(1 << 20);
    for (extra, field) in [
        ("queue_size: 100", "queue_size"),
        ("num_queues: 0", "num_queues"),
        ("bogus_field: 1", "bogus_field"),
        ("seg_size_max: many", "seg_size_max"),
        ("device_id: \"0123456789abcdefghijk\"", "device_id"),
        ("image_path: /tmp/x", "metadata_path"),
    ] {
        let err = start_failure(&d, &format!("{}{extra}\n", base_yaml(&d)));
        assert!(err.contains(field), "{extra}: {err}");
    }
    let err = start_failure(&d, &format!("path: {}\n", d.img.display()));
    assert!(err.contains("socket"), "{err}");
}

/// Starts the backend on `cfg` expecting a refusal within 10 s (not a hang, not a served
/// disk); returns its log.
fn refused(cfg: &BackendConfig) -> String {
    let mut g = Backend::spawn(BIN, cfg, &[]).unwrap();
    let st = g.wait_timeout(Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("backend kept running: {}", g.log()));
    assert!(!st.success());
    assert!(!cfg.socket.exists(), "a refused backend must not serve");
    g.log()
}

fn mkfifo(path: &std::path::Path) {
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

/// A disk is a regular file or a block device with at least one sector.
#[test]
fn what_cannot_be_a_disk_is_refused() {
    let d = disk(1 << 20);
    let fifo = d.dir.path().join("fifo");
    mkfifo(&fifo);
    let empty = d.dir.path().join("empty.raw");
    std::fs::File::create(&empty).unwrap();
    let short = d.dir.path().join("short.raw");
    std::fs::write(&short, [0u8; 511]).unwrap();
    let dir = d.dir.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let dev_null = PathBuf::from("/dev/null");
    for (path, readonly, want) in [
        (&dev_null, false, "/dev/null: a character device"),
        (&dev_null, true, "a character device"),
        (&fifo, false, "fifo: a FIFO"),
        (&fifo, true, "a FIFO"),
        (&dir, true, "a directory"),
        (
            &empty,
            false,
            "empty.raw is smaller than one 512-byte sector",
        ),
        (
            &short,
            false,
            "short.raw is smaller than one 512-byte sector",
        ),
    ] {
        let log = refused(&BackendConfig::new(path, &d.sock).readonly(readonly));
        assert!(log.contains("path: "), "{log}");
        assert!(
            log.contains(want),
            "{}: want {want:?} in {log}",
            path.display()
        );
        assert_eq!(log.trim_end().lines().count(), 1, "{log}");
    }
}

/// Fields that used to be ignored or reported vaguely: refused, naming the field and the rule.
#[test]
fn lazy_fields_without_image_path_and_out_of_range_integers_are_refused() {
    let d = disk(1 << 20);
    for (extra, want) in [
        (
            "copy_on_read: true",
            "config field `copy_on_read`: needs image_path",
        ),
        (
            "metadata_path: /tmp/ubiblk-none.meta",
            "config field `metadata_path`: needs image_path",
        ),
        ("num_queues: 100000", "`num_queues`: must be in 1..=64"),
        ("queue_size: -4", "`queue_size`: must be in 1..=32768"),
    ] {
        let log = refused(&BackendConfig::new(&d.img, &d.sock).extra(extra));
        assert!(log.contains(want), "{extra}: {log}");
    }
}

/// No two fields may name one file: the debug log would append guest plaintext to the disk.
#[test]
fn io_debug_log_onto_another_configured_file_is_refused() {
    let d = disk(1 << 20);
    let link = d.dir.path().join("disk.link");
    std::fs::hard_link(&d.img, &link).unwrap();
    for (log_path, want) in [
        (d.img.clone(), "is the same file as path"),
        (link, "is the same file as path"),
        (d.sock.clone(), "socket: "),
    ] {
        let cfg = BackendConfig::new(&d.img, &d.sock).extra_path("io_debug_path", &log_path);
        let log = refused(&cfg);
        assert!(log.contains(want) && log.contains("io_debug_path"), "{log}");
    }
    assert_eq!(read_file(&d.img).unwrap(), pattern_bytes(0, 1 << 20));
}

#[test]
fn missing_disk_is_refused_with_path_named() {
    let d = disk(1 << 20);
    let yaml = format!(
        "path: {}/nope.raw\nsocket: {}\n",
        d.dir.path().display(),
        d.sock.display()
    );
    let err = start_failure(&d, &yaml);
    assert!(err.contains("path") && err.contains("nope.raw"), "{err}");
}

/// Errors after the stack is open (vhost::listen's) are reported the same way: tool, field, file,
/// cause, exit status 1.
#[test]
fn unusable_socket_is_refused_with_the_field_named() {
    let d = disk(1 << 20);
    let sock = d.dir.path().join("no/such/dir/vhost.sock");
    let yaml = format!("path: {}\nsocket: {}\n", d.img.display(), sock.display());
    let out = run_on_config(&d, &yaml);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "vhost-backend: socket: cannot listen on {}: ",
        sock.display()
    );
    let line = err.lines().last().unwrap_or_default();
    assert!(line.starts_with(&want), "{err}");
    assert!(line.contains("No such file or directory"), "{err}");
}

#[test]
fn missing_config_file_is_reported() {
    let d = disk(1 << 20);
    let out = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/ubiblk.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ubiblk.yaml"));
    drop(d);
}

/// `path` may be a block device: its size comes from BLKGETSIZE64 (file metadata says 0).
#[test]
fn serves_a_block_device() {
    let d = disk(12 << 20);
    let dev = LoopDev::attach(&d.img);
    let cfg = BackendConfig::new(&dev.0, &d.sock);
    let _be = Backend::start(BIN, &cfg).unwrap();
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 12 << 20);
    assert_eq!(c.read(0, 8192, 4096).unwrap(), pattern_bytes(8192, 4096));
    c.write(0, (12 << 20) - 4096, &pattern(77, 4096)).unwrap();
    c.flush(0).unwrap();
    drop(c);
    drop(_be);
    drop(dev);
    assert_eq!(
        read_file_at(&d.img, (12 << 20) - 4096, 4096).unwrap(),
        pattern(77, 4096)
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The backend's open descriptors once their count has held still for 50 ms (at most 5 s):
/// a connection is torn down on the backend's own threads after its client has gone, so a
/// count taken at once may still hold some of the last connection's descriptors.
fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut last, mut since) = (open_fds(pid), Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let n = open_fds(pid);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(50) {
            break;
        }
    }
    last
}

/// Each connection gets fresh worker threads, io_urings and eventfds: none may leak.
#[test]
fn reconnects_do_not_leak_file_descriptors() {
    let d = disk(4 << 20);
    let be = start(&d, 4, &[]);
    let pid = be.guard.pid();
    let mut counts = Vec::new();
    for round in 0..25 {
        let mut c = Client::connect_queues(&d.sock, 4).unwrap();
        c.read(round % 4, 0, 4096).unwrap();
        drop(c);
        // Between connections, once the last one is torn down (CI saw 56 then 55 when the
        // count was taken during a connection, the one before still closing).
        if round == 4 || round == 24 {
            counts.push(settled_fds(pid));
        }
    }
    assert_eq!(
        counts[0], counts[1],
        "fds grew from {} to {}",
        counts[0], counts[1]
    );
}
