//! Reading an archive: the verified manifest, then chunks on demand.

use std::io;

use super::chunk::{self, ChunkName};
use super::manifest::{decode_pending, Manifest, MANIFEST_KEY, PENDING_KEY};
use super::secret::{Keys, Secret, KEY_LEN};
use super::{ArchiveError, ObjectStore};

/// An open archive: its store, keys and verified manifest. Nothing else is kept (no chunk
/// cache): each read fetches and opens the chunks it covers.
pub struct ArchiveReader {
    store: Box<dyn ObjectStore>,
    keys: Keys,
    manifest: Manifest,
}

/// The manifest at `store` read with `kek`; `None` when there is none.
pub(super) fn read_manifest(
    store: &dyn ObjectStore,
    kek: &[u8; KEY_LEN],
) -> Result<Option<(Manifest, Secret)>, ArchiveError> {
    match get_optional(store, MANIFEST_KEY)? {
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
    match get_optional(store, PENDING_KEY)? {
        Some(bytes) => decode_pending(&bytes, kek).map(Some),
        None => Ok(None),
    }
}

fn get_optional(store: &dyn ObjectStore, key: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
    match store.get(key) {
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
        let (manifest, secret) = read_manifest(&*store, kek)?.ok_or(ArchiveError::NoManifest)?;
        Ok(ArchiveReader {
            store,
            keys: secret.keys(),
            manifest,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
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
            .get(&name.key())
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
    /// each chunk it covers is fetched once.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ArchiveError> {
        let m = &self.manifest;
        let mut pos = 0;
        while pos < buf.len() {
            let at = offset.saturating_add(pos as u64);
            if at >= m.disk_bytes {
                buf[pos..].fill(0);
                break;
            }
            // The manifest bounds the chunk count (2^24), so the index fits.
            let index = (at / m.chunk_bytes) as usize;
            let within = (at % m.chunk_bytes) as usize;
            let len = m.chunk_len(index) as usize;
            let n = (len - within).min(buf.len() - pos);
            let out = &mut buf[pos..pos + n];
            match m.chunks[index] {
                None => out.fill(0),
                Some(name) => {
                    let plain = self.fetch(index, name, len)?;
                    out.copy_from_slice(&plain[within..within + n]);
                }
            }
            pos += n;
        }
        Ok(())
    }
}
