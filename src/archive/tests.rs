//! The archive format end to end over a real `file://` store: round trips, deduplication,
//! and every kind of damage an untrusted store can do, each an error and never data.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use super::*;
use crate::remote::FileStore;

const KEK: [u8; 32] = [0x42; 32];
const CHUNK: u64 = 8192;

/// A disk in memory.
struct MemDisk(Vec<u8>);

impl DiskReader for MemDisk {
    fn bytes(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(&self.0[at..at + buf.len()]);
        Ok(())
    }
}

/// 10.5 chunks: distinct content, chunks 2 and 7 zero, chunk 5 a copy of chunk 4, a short
/// last chunk.
fn disk() -> MemDisk {
    let c = CHUNK as usize;
    let mut d: Vec<u8> = (0..c * 10 + c / 2)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i % 253) as u8)
        .collect();
    d[2 * c..3 * c].fill(0);
    d[7 * c..8 * c].fill(0);
    d.copy_within(4 * c..5 * c, 5 * c);
    MemDisk(d)
}

fn opts() -> WriteOptions {
    WriteOptions {
        chunk_bytes: CHUNK,
        level: 3,
        jobs: 3,
        new_key: false,
    }
}

fn store(dir: &Path) -> Box<dyn ObjectStore> {
    Box::new(FileStore::open(dir).unwrap())
}

fn objects(dir: &Path) -> HashSet<String> {
    match std::fs::read_dir(dir.join("chunks")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => HashSet::new(),
    }
}

fn read_all(r: &ArchiveReader) -> Vec<u8> {
    let mut out = vec![0xee; r.manifest().disk_bytes as usize];
    r.read_at(0, &mut out).unwrap();
    out
}

#[test]
fn round_trip_stores_distinct_non_zero_chunks_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    let report = write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    assert_eq!((report.chunks, report.zero), (11, 2));
    assert_eq!((report.uploaded, report.reused), (8, 1));
    assert_eq!(report.bytes_in, d.0.len() as u64);
    assert_eq!(report.previous, Previous::Nothing);
    assert_eq!(objects(dir.path()).len(), 8);

    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    let m = r.manifest();
    assert_eq!((m.disk_bytes, m.chunk_bytes), (d.0.len() as u64, CHUNK));
    assert!(m.chunks[2].is_none() && m.chunks[7].is_none());
    assert_eq!(m.chunks[4], m.chunks[5]);
    assert_eq!(read_all(&r), d.0);
    // Ranges of any size and alignment, across chunks, past the end.
    for (off, len) in [
        (0, 1),
        (8191, 2),
        (3 * CHUNK - 100, 2 * CHUNK as usize + 300),
    ] {
        let mut buf = vec![0xee; len];
        r.read_at(off, &mut buf).unwrap();
        assert_eq!(buf, d.0[off as usize..off as usize + len], "{off}+{len}");
    }
    let end = d.0.len() as u64;
    let mut buf = vec![0xee; 1024];
    r.read_at(end - 512, &mut buf).unwrap();
    assert_eq!(buf[..512], d.0[end as usize - 512..]);
    assert!(buf[512..].iter().all(|&b| b == 0));
    assert_eq!(r.read_chunk(2).unwrap(), vec![0; CHUNK as usize]);
    assert_eq!(r.read_chunk(10).unwrap(), d.0[10 * CHUNK as usize..]);
}

#[test]
fn names_reveal_nothing_and_differ_between_archives() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let d = disk();
    write_archive(&d, &*store(a.path()), &KEK, &opts()).unwrap();
    write_archive(&d, &*store(b.path()), &KEK, &opts()).unwrap();
    // Two archives of one disk: independent secrets, so no name in common.
    assert!(objects(a.path()).is_disjoint(&objects(b.path())));
    // No object holds plaintext: the chunk's bytes appear nowhere.
    for name in objects(a.path()) {
        let object = std::fs::read(a.path().join("chunks").join(&name)).unwrap();
        assert!(!object.windows(64).any(|w| w == &d.0[..64]), "{name}");
    }
    let manifest = std::fs::read_to_string(a.path().join(MANIFEST_KEY)).unwrap();
    assert!(!manifest.contains("secret"), "{manifest}");
}

#[test]
fn a_second_archive_uploads_only_new_content() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = disk();
    write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    let before = objects(dir.path());
    let again = write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    assert_eq!((again.uploaded, again.reused, again.zero), (0, 9, 2));
    assert_eq!(again.previous, Previous::Archive);
    assert_eq!(objects(dir.path()), before);
    // One chunk changed, one zero chunk written: two new objects.
    d.0[3 * CHUNK as usize] ^= 1;
    d.0[7 * CHUNK as usize + 9] = 1;
    let third = write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    assert_eq!((third.uploaded, third.reused, third.zero), (2, 8, 1));
    assert_eq!(objects(dir.path()).difference(&before).count(), 2);
    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    assert_eq!(read_all(&r), d.0);
}

/// A store whose puts fail after `ok_puts` succeeded.
struct FailingStore {
    inner: FileStore,
    ok_puts: AtomicUsize,
}

impl std::fmt::Display for FailingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl ObjectStore for FailingStore {
    fn get(&self, key: &str, max: usize) -> io::Result<Vec<u8>> {
        self.inner.get(key, max)
    }
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        if self
            .ok_puts
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(io::Error::other("injected failure"));
        }
        self.inner.put(key, data)
    }
    fn exists(&self, key: &str) -> io::Result<bool> {
        self.inner.exists(key)
    }
}

#[test]
fn an_interrupted_archive_leaves_the_previous_one_whole_and_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let first = disk();
    write_archive(&first, &*store(dir.path()), &KEK, &opts()).unwrap();
    let mut second = disk();
    for i in 0..10 {
        second.0[i * CHUNK as usize] ^= 0x80;
    }
    let failing = FailingStore {
        inner: FileStore::open(dir.path()).unwrap(),
        ok_puts: AtomicUsize::new(3),
    };
    let e = write_archive(&second, &failing, &KEK, &opts()).unwrap_err();
    assert!(
        crate::sys::error_chain(&e).contains("injected failure"),
        "{e}"
    );
    // Readers still see the first archive, whole.
    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    assert_eq!(read_all(&r), first.0);
    // The next run finds the objects the failed one left.
    let resumed = write_archive(&second, &*store(dir.path()), &KEK, &opts()).unwrap();
    assert!(resumed.reused >= 3 && resumed.uploaded <= 7, "{resumed:?}");
    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    assert_eq!(read_all(&r), second.0);
}

#[test]
fn an_interrupted_first_archive_is_resumed_with_its_pending_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    // The pending key and 3 chunks get through.
    let failing = FailingStore {
        inner: FileStore::open(dir.path()).unwrap(),
        ok_puts: AtomicUsize::new(4),
    };
    assert!(write_archive(&d, &failing, &KEK, &opts()).is_err());
    assert!(!dir.path().join(MANIFEST_KEY).exists());
    let e = ArchiveReader::open(store(dir.path()), &KEK).err().unwrap();
    assert!(matches!(e, ArchiveError::NoManifest), "{e}");
    let left = objects(dir.path());
    assert_eq!(left.len(), 3);
    let resumed = write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    assert_eq!(resumed.previous, Previous::Interrupted);
    assert_eq!((resumed.uploaded, resumed.reused), (5, 4), "{resumed:?}");
    assert!(objects(dir.path()).is_superset(&left));
    assert_eq!(objects(dir.path()).len(), 8);
    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    assert_eq!(read_all(&r), d.0);
    // Another KEK does not take over the unfinished archive of this one unasked.
    let other = tempfile::tempdir().unwrap();
    let failing = FailingStore {
        inner: FileStore::open(other.path()).unwrap(),
        ok_puts: AtomicUsize::new(1),
    };
    assert!(write_archive(&d, &failing, &KEK, &opts()).is_err());
    let e = write_archive(&d, &*store(other.path()), &[0x43; 32], &opts()).unwrap_err();
    assert!(matches!(e, ArchiveError::Existing(_)), "{e}");
}

#[test]
fn wrong_kek_is_refused_by_the_reader_and_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    let other = [0x43; 32];
    let e = ArchiveReader::open(store(dir.path()), &other)
        .err()
        .unwrap();
    assert!(matches!(e, ArchiveError::WrongKek), "{e}");
    let e = write_archive(&d, &*store(dir.path()), &other, &opts()).unwrap_err();
    assert!(matches!(e, ArchiveError::Existing(_)), "{e}");
    assert!(crate::sys::error_chain(&e).contains("another KEK"), "{e}");
    // --new-key: a new archive under the other KEK, which the first KEK no longer opens.
    let new = WriteOptions {
        new_key: true,
        ..opts()
    };
    let report = write_archive(&d, &*store(dir.path()), &other, &new).unwrap();
    assert_eq!(report.uploaded, 8);
    let r = ArchiveReader::open(store(dir.path()), &other).unwrap();
    assert_eq!(read_all(&r), d.0);
    assert!(ArchiveReader::open(store(dir.path()), &KEK).is_err());
    let empty = tempfile::tempdir().unwrap();
    let e = ArchiveReader::open(store(empty.path()), &KEK)
        .err()
        .unwrap();
    assert!(matches!(e, ArchiveError::NoManifest), "{e}");
}

/// Damage to the manifest: every byte flipped is refused (a sample of positions here; the
/// manifest module flips them all).
#[test]
fn tampered_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_archive(&disk(), &*store(dir.path()), &KEK, &opts()).unwrap();
    let path = dir.path().join(MANIFEST_KEY);
    let good = std::fs::read(&path).unwrap();
    for i in (0..good.len()).step_by(good.len() / 40) {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        std::fs::write(&path, &bad).unwrap();
        assert!(
            ArchiveReader::open(store(dir.path()), &KEK).is_err(),
            "byte {i}"
        );
    }
    std::fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert!(ArchiveReader::open(store(dir.path()), &KEK).is_err());
}

/// Damage to chunk objects: a flipped byte, a truncated object, two objects swapped, a
/// missing one. Each makes reads of that chunk fail, and only of that chunk.
#[test]
fn damaged_swapped_truncated_or_missing_chunks_are_errors_for_that_chunk_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk();
    write_archive(&d, &*store(dir.path()), &KEK, &opts()).unwrap();
    let r = ArchiveReader::open(store(dir.path()), &KEK).unwrap();
    let path = |i: usize| dir.path().join(r.manifest().chunks[i].unwrap().key());
    let c = CHUNK as usize;
    let check_others = |bad: &[usize]| {
        for i in 0..11 {
            if !bad.contains(&i) {
                let want = &d.0[i * c..(i * c + c).min(d.0.len())];
                assert_eq!(r.read_chunk(i).unwrap(), want, "chunk {i}");
            }
        }
    };
    let expect_err = |i: usize, want: &str| {
        let e = r.read_chunk(i).unwrap_err();
        let text = crate::sys::error_chain(&e);
        assert!(text.contains(&format!("chunk {i}")), "{text}");
        assert!(text.contains(want), "chunk {i}: {text}");
        let mut buf = vec![0u8; 1024];
        assert!(r.read_at((i * c) as u64 + 512, &mut buf).is_err());
        e
    };

    let good = std::fs::read(path(0)).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    std::fs::write(path(0), &bad).unwrap();
    expect_err(0, "authentication failed");
    check_others(&[0]);
    // A read covering every chunk (fetched several at a time) fails too.
    let mut all = vec![0u8; d.0.len()];
    let e = r.read_at(0, &mut all).unwrap_err();
    assert!(crate::sys::error_chain(&e).contains("chunk 0"), "{e}");
    std::fs::write(path(0), &good[..good.len() - 5]).unwrap();
    expect_err(0, "authentication failed");
    std::fs::write(path(0), &good[..10]).unwrap();
    expect_err(0, "too short");
    std::fs::write(path(0), &good).unwrap();

    let (one, three) = (
        std::fs::read(path(1)).unwrap(),
        std::fs::read(path(3)).unwrap(),
    );
    std::fs::write(path(1), &three).unwrap();
    std::fs::write(path(3), &one).unwrap();
    expect_err(1, "authentication failed");
    expect_err(3, "authentication failed");
    check_others(&[1, 3]);
    std::fs::write(path(1), &one).unwrap();
    std::fs::write(path(3), &three).unwrap();

    std::fs::remove_file(path(6)).unwrap();
    let e = expect_err(6, "cannot read");
    assert_eq!(e.into_io().kind(), io::ErrorKind::NotFound);
    check_others(&[6]);
}

/// A `manifest.json` over the bound is refused by its size before a byte of it is read: a
/// hostile store's 1.2 GB one used to be read whole first (peak RSS 1.2 GB). The open runs
/// in a child (this test binary again, this test alone) so that its peak memory is its own.
#[test]
// The child is reaped by wait4, which also gives its peak memory (std's wait does not).
#[allow(clippy::zombie_processes)]
fn a_huge_manifest_is_refused_before_it_is_read() {
    const DIR: &str = "UBIBLK_TEST_HUGE_MANIFEST_DIR";
    if let Some(dir) = std::env::var_os(DIR) {
        let e = ArchiveReader::open(store(Path::new(&dir)), &KEK)
            .err()
            .expect("a huge manifest opened");
        let text = crate::sys::error_chain(&e);
        assert!(text.contains("larger than"), "{text}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::File::create(dir.path().join(MANIFEST_KEY)).unwrap();
    manifest
        .set_len(super::manifest::MAX_MANIFEST_BYTES as u64 + 1)
        .unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "archive::tests::a_huge_manifest_is_refused_before_it_is_read",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(DIR, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid for writes.
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    let mut out = String::new();
    if let Some(mut p) = child.stdout.take() {
        let _ = io::Read::read_to_string(&mut p, &mut out);
    }
    if let Some(mut p) = child.stderr.take() {
        let _ = io::Read::read_to_string(&mut p, &mut out);
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: {out}"
    );
    assert!(out.contains("1 passed"), "the child ran no test: {out}");
    let peak = usage.ru_maxrss as u64 * 1024;
    assert!(peak < 200 << 20, "peak RSS {} MiB: {out}", peak >> 20);
}
