//! Archiving a disk: chunks read, named, compressed, encrypted and uploaded by a few threads
//! at once (reading, compression and uploads overlap), then the manifest, last.
//!
//! Writing the manifest last makes the archive appear at once: until it is written, readers
//! see the previous archive (its objects are never deleted or changed, since a name is a hash
//! of its content), and an interrupted run leaves that previous archive intact. A second run
//! to the same place reuses the previous manifest's secret, so unchanged chunks get the same
//! names and are not uploaded again; neither are chunks whose object an interrupted run left
//! (a first run stores the archive's sealed secret as a pending key before any chunk, so that
//! it can be resumed with the same names).

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::chunk::{self, ChunkName};
use super::manifest::{encode_pending, Manifest, MANIFEST_KEY, PENDING_KEY};
use super::reader::{read_manifest, read_pending};
use super::secret::{Keys, Secret, KEY_LEN};
use super::{ArchiveError, ObjectStore};

/// Chunk size of an archive of a disk without lazy fetch (a lazy disk's is its stripe size).
pub const DEFAULT_CHUNK_BYTES: u64 = 1 << 20;

/// A disk's plaintext, read-only, readable from several threads at once.
pub trait DiskReader: Sync {
    /// Size in bytes, a multiple of 512.
    fn bytes(&self) -> u64;
    /// Fills `buf` (a whole number of sectors, at a sector boundary) from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// How to archive.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Chunk size in bytes (a lazy disk's stripe size).
    pub chunk_bytes: u64,
    /// zstd level.
    pub level: i32,
    /// Threads reading, sealing and uploading chunks.
    pub jobs: usize,
    /// Start a new archive (a new secret) if the destination's manifest or pending key cannot
    /// be opened with this KEK, instead of refusing.
    pub new_key: bool,
}

/// What the destination held when an archiving run started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Previous {
    /// Nothing (or what it held was replaced, with `new_key`): a new archive.
    #[default]
    Nothing,
    /// An archive, which this run updates: same secret, its chunks not uploaded again.
    Archive,
    /// The pending key of a first run that did not finish, which this run resumes.
    Interrupted,
}

/// What an archiving run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub disk_bytes: u64,
    pub chunk_bytes: u64,
    pub chunks: u64,
    /// Chunks whose object was written.
    pub uploaded: u64,
    /// Non-zero chunks whose object was already there (or is another chunk's too).
    pub reused: u64,
    /// Chunks of zeros: no object.
    pub zero: u64,
    /// Bytes read from the disk.
    pub bytes_in: u64,
    /// Bytes of objects written, manifest included.
    pub bytes_out: u64,
    /// What the destination held.
    pub previous: Previous,
    pub elapsed: Duration,
}

/// Archives `disk` to `store` with the KEK's key `kek`; the manifest is written last.
pub fn write_archive(
    disk: &dyn DiskReader,
    store: &dyn ObjectStore,
    kek: &[u8; KEY_LEN],
    opts: &WriteOptions,
) -> Result<Report, ArchiveError> {
    let start = Instant::now();
    // Killed earlier runs' temporary files; failing to remove them costs only space.
    match store.remove_stale_temporaries() {
        Ok(0) => {}
        Ok(n) => info!("{store}: removed {n} temporary file(s) of interrupted earlier runs"),
        Err(e) => warn!("{store}: cannot remove temporary files of interrupted runs: {e}"),
    }
    let mut manifest = Manifest::new(disk.bytes(), opts.chunk_bytes)?;
    let (secret, known, previous) = begin(store, kek, opts.new_key)?;
    let run = Run {
        disk,
        store,
        keys: secret.keys(),
        manifest: &manifest,
        level: opts.level,
        check_existing: previous != Previous::Nothing,
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        claimed: Mutex::new(known),
        done: AtomicUsize::new(0),
        counts: Counts::default(),
    };
    let results: Vec<Result<Vec<(usize, ChunkName)>, ArchiveError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..opts.jobs.max(1))
            .map(|_| s.spawn(|| run.worker()))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(ArchiveError::Worker)))
            .collect()
    });
    let counts = run.counts;
    for result in results {
        for (index, name) in result? {
            manifest.chunks[index] = Some(name);
        }
    }
    let bytes = manifest.encode(&secret, kek)?;
    store
        .put(MANIFEST_KEY, &bytes)
        .map_err(|source| ArchiveError::Store {
            what: format!("cannot write {MANIFEST_KEY} to {store}"),
            source,
        })?;
    Ok(Report {
        disk_bytes: manifest.disk_bytes,
        chunk_bytes: manifest.chunk_bytes,
        chunks: manifest.chunks.len() as u64,
        uploaded: counts.uploaded.into_inner(),
        reused: counts.reused.into_inner(),
        zero: counts.zero.into_inner(),
        bytes_in: counts.bytes_in.into_inner(),
        bytes_out: counts.bytes_out.into_inner() + bytes.len() as u64,
        previous,
        elapsed: start.elapsed(),
    })
}

/// The secret to archive with, the names already stored, and what the destination held.
/// Keeps the secret of the archive there, or of an interrupted first run (its pending key);
/// else makes a new one and stores it as the pending key before any chunk, so that this run
/// can be resumed too.
fn begin(
    store: &dyn ObjectStore,
    kek: &[u8; KEY_LEN],
    new_key: bool,
) -> Result<(Secret, HashSet<ChunkName>, Previous), ArchiveError> {
    // A store that cannot be read is no reason to start over; one that holds what this KEK
    // cannot open is replaced only when asked to.
    let refused = |e: ArchiveError, what: &str| match e {
        e @ ArchiveError::Store { .. } => Err(e),
        e if !new_key => Err(ArchiveError::Existing(Box::new(e))),
        e => {
            warn!(
                "{store}: replacing {what} this KEK cannot open ({}): a new key, no chunk \
                 shared with it",
                crate::sys::error_chain(&e)
            );
            Ok(())
        }
    };
    match read_manifest(store, kek) {
        Ok(Some((old, secret))) => return Ok((secret, old.names(), Previous::Archive)),
        Ok(None) => {}
        Err(e) => refused(e, "an archive")?,
    }
    match read_pending(store, kek) {
        Ok(Some(secret)) => return Ok((secret, HashSet::new(), Previous::Interrupted)),
        Ok(None) => {}
        Err(e) => refused(e, "the pending key of an unfinished archive")?,
    }
    let secret = Secret::generate()?;
    store
        .put(PENDING_KEY, &encode_pending(&secret, kek)?)
        .map_err(|source| ArchiveError::Store {
            what: format!("cannot write {PENDING_KEY} to {store}"),
            source,
        })?;
    Ok((secret, HashSet::new(), Previous::Nothing))
}

#[derive(Default)]
struct Counts {
    uploaded: AtomicU64,
    reused: AtomicU64,
    zero: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// One archiving run, shared by its threads.
struct Run<'a> {
    disk: &'a dyn DiskReader,
    store: &'a dyn ObjectStore,
    keys: Keys,
    manifest: &'a Manifest,
    level: i32,
    /// Whether objects may already exist under this secret's names (written by a run that
    /// did not finish): with a new secret, none can.
    check_existing: bool,
    /// The next chunk to take.
    next: AtomicUsize,
    /// Set by the first error: the other threads stop.
    failed: AtomicBool,
    /// Names stored (the previous manifest's) or being stored by this run.
    claimed: Mutex<HashSet<ChunkName>>,
    done: AtomicUsize,
    counts: Counts,
}

impl Run<'_> {
    /// Takes chunks until none is left; returns the names of the non-zero ones it did.
    fn worker(&self) -> Result<Vec<(usize, ChunkName)>, ArchiveError> {
        let mut names = Vec::new();
        let mut buf = vec![0u8; self.manifest.chunk_bytes as usize];
        let count = self.manifest.chunks.len();
        while !self.failed.load(Relaxed) {
            let index = self.next.fetch_add(1, Relaxed);
            if index >= count {
                break;
            }
            match self.chunk(index, &mut buf) {
                Ok(Some(name)) => names.push((index, name)),
                Ok(None) => {}
                Err(e) => {
                    self.failed.store(true, Relaxed);
                    return Err(e);
                }
            }
            self.progress(count);
        }
        Ok(names)
    }

    /// Archives chunk `index`; `None` for a chunk of zeros.
    fn chunk(&self, index: usize, buf: &mut [u8]) -> Result<Option<ChunkName>, ArchiveError> {
        let c = &self.counts;
        let offset = index as u64 * self.manifest.chunk_bytes;
        let data = &mut buf[..self.manifest.chunk_len(index) as usize];
        self.disk
            .read_at(offset, data)
            .map_err(|source| ArchiveError::ReadDisk { offset, source })?;
        c.bytes_in.fetch_add(data.len() as u64, Relaxed);
        if data.iter().all(|&b| b == 0) {
            c.zero.fetch_add(1, Relaxed);
            return Ok(None);
        }
        let name = ChunkName::of(&self.keys, data);
        let first = self
            .claimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name);
        let key = name.key();
        let store_err = |what: &str| {
            let what = format!("chunk {index}: cannot {what} {key} in {}", self.store);
            move |source| ArchiveError::Store { what, source }
        };
        // Another chunk with this content is in the previous archive or being stored now,
        // or an interrupted run left its object.
        if !first || self.check_existing && self.store.exists(&key).map_err(store_err("look up"))? {
            c.reused.fetch_add(1, Relaxed);
            return Ok(Some(name));
        }
        let object = chunk::seal(&self.keys, &name, data, self.level).map_err(|source| {
            ArchiveError::Chunk {
                index,
                name,
                source,
            }
        })?;
        self.store.put(&key, &object).map_err(store_err("write"))?;
        c.uploaded.fetch_add(1, Relaxed);
        c.bytes_out.fetch_add(object.len() as u64, Relaxed);
        Ok(Some(name))
    }

    /// Logs every tenth of the way.
    fn progress(&self, count: usize) {
        let done = self.done.fetch_add(1, Relaxed) + 1;
        if done * 10 / count != (done - 1) * 10 / count {
            info!(
                "archived {done} of {count} chunks ({} uploaded, {} reused, {} zero)",
                self.counts.uploaded.load(Relaxed),
                self.counts.reused.load(Relaxed),
                self.counts.zero.load(Relaxed)
            );
        }
    }
}
