//! Reading an archive: the verified manifest, then chunks on demand.

use std::io;

use super::chunk::{self, ChunkName};
use super::manifest::{
    decode_pending, Manifest, MANIFEST_KEY, MAX_MANIFEST_BYTES, MAX_PENDING_BYTES, PENDING_KEY,
};
use super::secret::{Keys, Secret, KEY_LEN};
use super::{ArchiveError, ObjectStore};

/// An open archive: its store, keys and verified manifest. Nothing else is kept (no chunk
/// cache): each read fetches and opens the chunks it covers.
pub struct ArchiveReader {
    store: Box<dyn ObjectStore>,
    keys: Keys,
    manifest: Manifest,
    /// The manifest's verified MAC, hex.
    mac: String,
}

/// The manifest at `store` read with `kek`; `None` when there is none.
pub(super) fn read_manifest(
    store: &dyn ObjectStore,
    kek: &[u8; KEY_LEN],
) -> Result<Option<(Manifest, Secret)>, ArchiveError> {
    match get_optional(store, MANIFEST_KEY, MAX_MANIFEST_BYTES)? {
        Some(bytes) => Manifest::decode(&bytes, kek).map(Some),
        None => Ok(None),
    }
}

/// The secret in the pending key at `store` (left by a first archiving that did not finish);
/// `None` when there is none.
pub(super) fn read_pending(
    store: &dyn ObjectStore,
    kek: &[u8; KEY_LEN],
) -> Result<Option<Secret>, ArchiveError> {
    match get_optional(store, PENDING_KEY, MAX_PENDING_BYTES)? {
        Some(bytes) => decode_pending(&bytes, kek).map(Some),
        None => Ok(None),
    }
}

fn get_optional(
    store: &dyn ObjectStore,
    key: &str,
    max: usize,
) -> Result<Option<Vec<u8>>, ArchiveError> {
    match store.get(key, max) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ArchiveError::Store {
            what: format!("cannot read {key} from {store}"),
            source,
        }),
    }
}

impl ArchiveReader {
    /// Fetches and verifies the manifest of the archive in `store`.
    pub fn open(store: Box<dyn ObjectStore>, kek: &[u8; KEY_LEN]) -> Result<Self, ArchiveError> {
        let bytes = get_optional(&*store, MANIFEST_KEY, MAX_MANIFEST_BYTES)?
            .ok_or(ArchiveError::NoManifest)?;
        let (manifest, secret, mac) = Manifest::decode_with_mac(&bytes, kek)?;
        Ok(ArchiveReader {
            store,
            keys: secret.keys(),
            manifest,
            mac,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's MAC (hex, as in `manifest.json`): it changes with every new version of
    /// the archive.
    pub fn manifest_mac(&self) -> &str {
        &self.mac
    }

    pub fn store(&self) -> &dyn ObjectStore {
        &*self.store
    }

    /// The plaintext of chunk `index` (zeros for a zero chunk).
    pub fn read_chunk(&self, index: usize) -> Result<Vec<u8>, ArchiveError> {
        let len = self.manifest.chunk_len(index) as usize;
        match self.manifest.chunks.get(index).copied().flatten() {
            None => Ok(vec![0; len]),
            Some(name) => self.fetch(index, name, len),
        }
    }

    fn fetch(&self, index: usize, name: ChunkName, len: usize) -> Result<Vec<u8>, ArchiveError> {
        let object = self
            .store
            .get(&name.key(), chunk::max_object_len(len))
            .map_err(|source| ArchiveError::Store {
                what: format!(
                    "chunk {index}: cannot read {} from {}",
                    name.key(),
                    self.store
                ),
                source,
            })?;
        chunk::open(&self.keys, &name, object, len).map_err(|source| ArchiveError::Chunk {
            index,
            name,
            source,
        })
    }

    /// Fills `buf` with the disk's bytes at `offset`, zeros past its end. Any range works:
    /// each chunk it covers is fetched once, several at a time when it covers several (a
    /// stripe larger than the chunks costs one round trip, not one per chunk).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ArchiveError> {
        let m = &self.manifest;
        // The non-zero chunks the range covers, each with its part of `buf`.
        let mut pieces = Vec::new();
        let (mut rest, mut at) = (buf, offset);
        while !rest.is_empty() {
            if at >= m.disk_bytes {
                rest.fill(0);
                break;
            }
            // The manifest bounds the chunk count (2^24), so the index fits.
            let index = (at / m.chunk_bytes) as usize;
            let within = (at % m.chunk_bytes) as usize;
            let len = m.chunk_len(index) as usize;
            let n = (len - within).min(rest.len());
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(n);
            match m.chunks[index] {
                None => out.fill(0),
                Some(name) => pieces.push(Piece {
                    index,
                    name,
                    len,
                    within,
                    out,
                }),
            }
            rest = tail;
            at += n as u64;
        }
        if let [piece] = pieces.as_mut_slice() {
            return self.fill(piece);
        }
        for batch in pieces.chunks_mut(PARALLEL_FETCHES) {
            std::thread::scope(|s| {
                let fetches: Vec<_> = batch
                    .iter_mut()
                    .map(|piece| s.spawn(|| self.fill(piece)))
                    .collect();
                fetches
                    .into_iter()
                    .try_for_each(|f| f.join().unwrap_or(Err(ArchiveError::Worker)))
            })?;
        }
        Ok(())
    }

    fn fill(&self, piece: &mut Piece) -> Result<(), ArchiveError> {
        let plain = self.fetch(piece.index, piece.name, piece.len)?;
        let n = piece.out.len();
        piece
            .out
            .copy_from_slice(&plain[piece.within..piece.within + n]);
        Ok(())
    }
}

/// Chunks fetched at once by one read.
const PARALLEL_FETCHES: usize = 8;

/// Part of a read: `out` comes from chunk `index` (`len` bytes) from byte `within`.
struct Piece<'a> {
    index: usize,
    name: ChunkName,
    len: usize,
    within: usize,
    out: &'a mut [u8],
}
