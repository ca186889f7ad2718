//! The I/O debug log (`io_debug_path`) written by the real backend under libblkio, and
//! `replay-log` run on it.

use crate::common::*;
use base64::Engine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use ubiblk::block::debuglog::format::{format_record, Item, LogReader, OpKind, Record};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const REPLAY: &str = env!("CARGO_BIN_EXE_replay-log");
const SIZE: u64 = 16 << 20;

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

/// A zeroed disk of `SIZE` bytes, a socket path and a log path in a fresh directory.
fn setup() -> Setup {
    let dir = scratch_dir("ubiblk-dlog");
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let sock = dir.path().join("vhost.sock");
    let log = dir.path().join("io.log");
    Setup {
        dir,
        img,
        sock,
        log,
    }
}

impl Setup {
    fn config(&self, queues: usize) -> BackendConfig {
        BackendConfig::new(&self.img, &self.sock)
            .num_queues(queues)
            .extra(format!(
                "io_debug_path: {}",
                yaml_str(&self.log.to_string_lossy())
            ))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) as u8)
        .collect()
}

fn zeroed(path: &Path, size: u64) {
    std::fs::write(path, vec![0u8; size as usize]).unwrap();
}

fn replay_log(log: &Path, disk: &Path) -> Output {
    Command::new(REPLAY)
        .args([
            "--log".as_ref(),
            log.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ])
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// (sector, data) of requests.
type Ios = Vec<(u64, Vec<u8>)>;

/// Every record of the log, parsed strictly: a truncated or interleaved record fails.
fn records(log: &Path) -> Vec<Record> {
    let f = std::io::BufReader::new(std::fs::File::open(log).unwrap());
    LogReader::new(f)
        .map(|item| match item {
            Ok(Item::Record(r)) => r,
            other => panic!("{}: {other:?}", log.display()),
        })
        .collect()
}

/// Each of 2 queues, at once, writes QD requests at a time (varied sizes, through our own
/// buffers or scattered segments) into its own half of the disk, overwriting earlier data in
/// later rounds, and reads back. Replaying the log onto a zeroed disk reproduces the disk; the
/// log holds exactly the requests made, each record whole.
#[test]
fn two_queues_replay_to_an_identical_disk() {
    let s = setup();
    let be = Backend::start(BIN, &s.config(2)).unwrap();
    let mut c = Client::connect_queues(&s.sock, 2).unwrap();
    const QD: usize = 16;
    const SLOT: usize = 64 << 10;
    const SLOTS: u64 = 24;
    const ROUNDS: u64 = 6;
    // (sector, data) of every write and read, per queue.
    let per_queue: Vec<(Ios, Ios)> = std::thread::scope(|sc| {
        let handles: Vec<_> = c
            .queues_mut()
            .iter_mut()
            .map(|q| {
                sc.spawn(move || {
                    let (mut writes, mut reads) = (Vec::new(), Vec::new());
                    let base = q.index() as u64 * (SIZE / 2);
                    for round in 0..ROUNDS {
                        // QD writes in flight at once, to distinct slots.
                        let mut offs = Vec::new();
                        for i in 0..QD {
                            let seed = (q.index() as u64) << 32 | round << 16 | i as u64;
                            let slot = (round * 7 + i as u64 * 5) % SLOTS;
                            let len = 512 * (1 + (seed * 37 % 64) as usize);
                            let off = base + slot * SLOT as u64 + 512 * (seed % 3);
                            let data = pattern(seed, len);
                            q.buf_mut()[i * SLOT..i * SLOT + len].copy_from_slice(&data);
                            q.submit_write(off, i * SLOT, len, i);
                            writes.push((off / 512, data));
                            offs.push((off, len));
                        }
                        let done = q.drain().unwrap();
                        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
                        // A scattered (unaligned guest buffers) write on top.
                        let seg: Vec<Vec<u8>> =
                            (0..3).map(|k| pattern(round * 10 + k, 1024)).collect();
                        let off = base + (round % SLOTS) * SLOT as u64 + 4096;
                        let segs: Vec<&[u8]> = seg.iter().map(Vec::as_slice).collect();
                        q.writev(off, &segs).unwrap();
                        writes.push((off / 512, seg.concat()));
                        // Read everything written this round back, QD at a time.
                        for (i, &(off, len)) in offs.iter().enumerate() {
                            q.submit_read(off, i * SLOT, len, i);
                        }
                        let done = q.drain().unwrap();
                        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
                        for (i, &(off, len)) in offs.iter().enumerate() {
                            reads.push((off / 512, q.buf()[i * SLOT..i * SLOT + len].to_vec()));
                        }
                        let got = q.read(off, 3072).unwrap();
                        assert_eq!(got, seg.concat());
                        reads.push((off / 512, got));
                    }
                    (writes, reads)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    c.flush(0).unwrap();
    drop(c);
    drop(be);

    // The log: exactly the requests made, in each queue's order, every record whole.
    let recs = records(&s.log);
    let mut seen: HashMap<usize, (Ios, Ios)> = HashMap::new();
    for r in recs {
        let q = (r.sector * 512 / (SIZE / 2)) as usize;
        let e = seen.entry(q).or_default();
        match r.op {
            OpKind::Write => e.0.push((r.sector, r.data)),
            OpKind::Read => e.1.push((r.sector, r.data)),
        }
    }
    for (q, (writes, reads)) in per_queue.into_iter().enumerate() {
        let (mut lw, mut lr) = seen.remove(&q).unwrap_or_default();
        let (mut writes, mut reads) = (writes, reads);
        assert_eq!(lw.len(), writes.len(), "queue {q} writes");
        assert_eq!(lr.len(), reads.len(), "queue {q} reads");
        // Requests in flight together may complete in any order: compare as sets.
        for v in [&mut lw, &mut lr, &mut writes, &mut reads] {
            v.sort();
        }
        assert!(
            lw == writes,
            "queue {q}: logged writes differ from the requests"
        );
        assert!(
            lr == reads,
            "queue {q}: logged reads differ from the data returned"
        );
    }

    // Replay onto a fresh zeroed disk: identical to the backend's.
    let copy = s.path("replayed.raw");
    zeroed(&copy, SIZE);
    let out = replay_log(&s.log, &copy);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(" 0 mismatches"), "{}", text(&out));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&s.img).unwrap(),
        "replayed disk differs from the backend's"
    );
}

/// Reads of a disk with known content are checked by the replay: a copy with one corrupted
/// byte is reported (sector and offset), an intact copy is not.
#[test]
fn corrupted_disk_is_reported() {
    let s = setup();
    create_pattern_file(&s.img, SIZE).unwrap();
    let original = s.path("original.raw");
    std::fs::copy(&s.img, &original).unwrap();
    let be = Backend::start(BIN, &s.config(1)).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    // A read of sectors 100..116 and a write elsewhere, then a read of the written data.
    assert_eq!(
        c.read(0, 100 * 512, 8192).unwrap(),
        pattern_bytes(100 * 512, 8192)
    );
    c.write(0, 1 << 20, &pattern(1, 4096)).unwrap();
    assert_eq!(c.read(0, 1 << 20, 4096).unwrap(), pattern(1, 4096));
    drop(c);
    drop(be);
    assert_eq!(records(&s.log).len(), 3);

    let intact = s.path("intact.raw");
    std::fs::copy(&original, &intact).unwrap();
    let out = replay_log(&s.log, &intact);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Sector 103, byte 5 of it: offset 3*512+5 in the read starting at sector 100.
    let bad = s.path("bad.raw");
    let mut content = std::fs::read(&original).unwrap();
    content[103 * 512 + 5] ^= 0xff;
    std::fs::write(&bad, content).unwrap();
    let out = replay_log(&s.log, &bad);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("line 1: READ mismatch at sector 103"), "{t}");
    assert!(t.contains("offset 1541"), "{t}");
    assert!(t.contains("1 byte(s) differ"), "{t}");
    assert!(t.contains(" 1 mismatches"), "{t}");
}

/// Malformed logs: exit status 2 and the 1-based line named.
#[test]
fn malformed_logs_are_refused_with_the_line() {
    let s = setup();
    let ok = format_record(OpKind::Write, 8, &pattern(3, 512));
    let hex512 = "ab".repeat(512);
    let cases = [
        (
            format!("{ok}WRIT\n1\n512\n{hex512}\n"),
            "line 5: expected READ or WRITE",
        ),
        (format!("{ok}READ\nx1\n512\n{hex512}\n"), "line 6: sector"),
        (format!("{ok}READ\n1\n51x\n{hex512}\n"), "line 7: length"),
        (
            format!("{ok}READ\n1\n500\n{hex512}\n"),
            "line 7: length 500 is not a multiple",
        ),
        (format!("{ok}READ\n1\n512\n{hex512}a\n"), "line 8: data"),
        (
            format!("{ok}READ\n1\n512\n{}a\n", "ab".repeat(511)),
            "line 8: data: odd",
        ),
        (
            format!("{ok}READ\n1\n1024\n{hex512}\n"),
            "line 8: data: 1024 hex digits",
        ),
        (
            format!("{ok}READ\n1\n512\n{}xy\n", "ab".repeat(511)),
            "line 8: data: \"x\"",
        ),
        (
            format!("{ok}{ok}WRITE\n{}\n512\n{hex512}\n", SIZE / 512),
            "line 9: WRITE of 512 bytes at sector 32768 goes past the end",
        ),
    ];
    for (i, (log, msg)) in cases.iter().enumerate() {
        let path = s.path(&format!("bad{i}.log"));
        std::fs::write(&path, log).unwrap();
        let out = replay_log(&path, &s.img);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "case {i}: {t}");
        assert!(t.contains(msg), "case {i}: {t} lacks {msg:?}");
    }
    // The writes before the bad record were applied.
    assert_eq!(read_file_at(&s.img, 8 * 512, 512).unwrap(), pattern(3, 512));

    let out = replay_log(&s.path("missing.log"), &s.img);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = Command::new(REPLAY).arg("--log").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// A log cut inside its last record (a crash while it was written) replays with a warning.
#[test]
fn truncated_last_record_is_skipped_with_a_warning() {
    let s = setup();
    let be = Backend::start(BIN, &s.config(1)).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    c.write(0, 4096, &pattern(1, 8192)).unwrap();
    c.write(0, 65536, &pattern(2, 4096)).unwrap();
    drop(c);
    drop(be);
    let full = std::fs::read(&s.log).unwrap();
    let first = format_record(OpKind::Write, 8, &pattern(1, 8192));
    assert!(full.starts_with(first.as_bytes()));
    // Cut inside the second record's data, and between its lines.
    for cut in [full.len() - 100, first.len() + "WRITE\n128\n".len()] {
        let log = s.path("cut.log");
        std::fs::write(&log, &full[..cut]).unwrap();
        let disk = s.path("cut.raw");
        zeroed(&disk, SIZE);
        let out = replay_log(&log, &disk);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("warning"), "{t}");
        assert!(t.contains("line 5) is truncated"), "{t}");
        assert!(t.contains("1 writes"), "{t}");
        assert_eq!(read_file_at(&disk, 4096, 8192).unwrap(), pattern(1, 8192));
        assert_eq!(read_file_at(&disk, 65536, 4096).unwrap(), vec![0; 4096]);
    }
}

/// With encryption on, the log holds the guest's plaintext (the disk holds ciphertext), and
/// replaying it onto a plain disk gives the plaintext.
#[test]
fn encrypted_disk_logs_plaintext() {
    let s = setup();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let keys = format!(
        "encryption_key: [\"{}\", \"{}\"]",
        b64(&[0x11; 32]),
        b64(&[0x7e; 32])
    );
    let be = Backend::start(BIN, &s.config(2).extra(keys)).unwrap();
    let mut c = Client::connect_queues(&s.sock, 2).unwrap();
    let data = pattern(9, 16384);
    c.write(0, 3 * 512, &data).unwrap();
    assert_eq!(c.read(1, 3 * 512, 16384).unwrap(), data);
    // Unwritten space reads back as whatever zeros decrypt to: logged as such.
    let garbage = c.read(1, 1 << 20, 512).unwrap();
    drop(c);
    drop(be);
    assert_ne!(read_file_at(&s.img, 3 * 512, 16384).unwrap(), data);
    let recs = records(&s.log);
    let got: Vec<(OpKind, u64, &[u8])> = recs
        .iter()
        .map(|r| (r.op, r.sector, r.data.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            (OpKind::Write, 3, &data[..]),
            (OpKind::Read, 3, &data[..]),
            (OpKind::Read, 2048, &garbage[..]),
        ]
    );
    // A plain disk with the plaintext of sector 2048 replays cleanly.
    let plain = s.path("plain.raw");
    let mut content = vec![0u8; SIZE as usize];
    content[1 << 20..(1 << 20) + 512].copy_from_slice(&garbage);
    std::fs::write(&plain, content).unwrap();
    let out = replay_log(&s.log, &plain);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(read_file_at(&plain, 3 * 512, 16384).unwrap(), data);
}

/// The log is appended to, never truncated, across backend restarts; SIGTERM (which syncs
/// the log too) still exits cleanly.
#[test]
fn log_is_appended_across_restarts() {
    let s = setup();
    for i in 0..2u64 {
        let be = Backend::start(BIN, &s.config(1)).unwrap();
        let mut c = Client::connect_queues(&s.sock, 1).unwrap();
        c.write(0, i * 4096, &pattern(i, 4096)).unwrap();
        let mut guard = be.guard;
        guard.signal(libc::SIGTERM);
        let status = guard
            .wait_timeout(Duration::from_secs(10))
            .expect("backend did not exit on SIGTERM");
        assert!(status.success(), "{status:?}: {}", guard.log());
        drop(c);
    }
    let recs = records(&s.log);
    assert_eq!(recs.len(), 2);
    assert_eq!((recs[0].sector, recs[1].sector), (0, 8));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&s.log).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "log mode {mode:o}: readable by others");
    }
}

/// A log that cannot be opened is a start-up error naming `io_debug_path`.
#[test]
fn unopenable_log_is_a_startup_error() {
    let s = setup();
    let cfg = BackendConfig::new(&s.img, &s.sock).extra(format!(
        "io_debug_path: {}",
        yaml_str(&s.path("no/such/dir/io.log").to_string_lossy())
    ));
    let mut child = Backend::spawn(BIN, &cfg, &[]).unwrap();
    let st = child
        .wait_timeout(Duration::from_secs(10))
        .expect("backend kept running");
    assert!(!st.success());
    let log = child.log();
    assert!(log.contains("io_debug_path"), "{log}");
    assert!(log.contains("no/such/dir/io.log"), "{log}");
    assert!(!s.sock.exists());
}
