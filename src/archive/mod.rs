//! Disk archives (docs/formats.md, "Disk archive"): a disk's plaintext as a manifest plus one
//! compressed, encrypted object per distinct non-zero chunk, in an [`ObjectStore`]
//! (`file:///dir`, `s3://bucket/prefix`).
//!
//! - `secret`: the per-archive secret, sealed with the KEK, and the keys derived from it;
//! - `chunk`: chunk names (keyed hashes of the content) and sealing/opening chunk objects;
//! - `manifest`: the authenticated manifest (geometry, chunk names, sealed secret);
//! - `reader`: reading an archive back ([`ArchiveReader`], used by the `archive_url` stripe
//!   source);
//! - `writer`: archiving a disk ([`write_archive`]) read through a [`DiskReader`] (the
//!   `archive` tool's is `crate::tools::archive_disk`).

mod chunk;
mod manifest;
mod reader;
mod secret;
mod writer;

use std::io;

pub use chunk::{ChunkError, ChunkName, CHUNK_PREFIX};
pub use manifest::{Manifest, MANIFEST_KEY, PENDING_KEY};
pub use reader::ArchiveReader;
pub use secret::kek_key;
pub use writer::{write_archive, DiskReader, Previous, Report, WriteOptions, DEFAULT_CHUNK_BYTES};

pub use crate::remote::ObjectStore;

/// What can go wrong reading or writing an archive. No variant carries key material.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "a disk archive needs a KEK with method aes256-gcm (--kek): the archive's key is never \
         stored in the clear"
    )]
    KekRequired,
    #[error(
        "cannot unwrap the archive's key: authentication failed (another KEK than the one the \
         archive was written with, or a damaged manifest)"
    )]
    WrongKek,
    #[error("manifest authentication failed: it is damaged or was tampered with")]
    ManifestMac,
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("no {MANIFEST_KEY}: not a disk archive, or its first archiving did not finish")]
    NoManifest,
    /// The destination already holds an archive this KEK cannot open.
    #[error(
        "the destination holds an archive this KEK cannot open (pass --new-key to start a new \
         archive there, whose chunks will not be shared with it)"
    )]
    Existing(#[source] Box<ArchiveError>),
    /// An object store call; `what` names the object.
    #[error("{what}")]
    Store { what: String, source: io::Error },
    #[error("chunk {index} ({CHUNK_PREFIX}{name})")]
    Chunk {
        index: usize,
        name: ChunkName,
        source: ChunkError,
    },
    #[error("cannot read the disk at byte {offset}")]
    ReadDisk { offset: u64, source: io::Error },
    /// The disk, its metadata or its lazy-fetch source could not be opened.
    #[error(transparent)]
    Open(Box<dyn std::error::Error + Send + Sync>),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error("cannot seal the archive's key")]
    Seal,
    #[error("a thread reading or writing the archive panicked")]
    Worker,
}

impl ArchiveError {
    /// As an I/O error for a stripe fetch: the same text (causes included), with the store's
    /// error kind when it is a store error.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            ArchiveError::Store { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, crate::sys::error_chain(&self))
    }
}

#[cfg(test)]
mod tests;
