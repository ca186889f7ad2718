//! A configured disk's plaintext, as the `archive` tool reads it: the base disk decrypted with
//! its keys and, for a lazy disk, unfetched stripes from its source. Nothing is written: not
//! the disk, not its metadata.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::archive::{ArchiveError, DiskReader, DEFAULT_CHUNK_BYTES};
use crate::config::Options;
use crate::crypto::keys::Kek;
use crate::crypto::Xts;
use crate::lazy::metadata::FETCHED;
use crate::lazy::{self, Metadata, StripeSource};
use crate::SECTOR_SIZE;

/// Ring size of a local source's read-through channels (opened, never used here).
const RING_ENTRIES: u32 = 64;

/// The disk a backend config describes.
pub struct ConfiguredDisk {
    path: PathBuf,
    file: File,
    bytes: u64,
    cipher: Option<Arc<Xts>>,
    lazy: Option<LazyView>,
}

/// A lazy disk's state when the tool started: which stripes the base disk holds, and the
/// source of the others.
struct LazyView {
    metadata: Metadata,
    stripe_bytes: u64,
    source: Arc<dyn StripeSource>,
}

impl ConfiguredDisk {
    /// Opens the disk of `opts` (validated): `path`, decrypted with `cipher`; with a lazy-fetch
    /// source, its metadata and the source (`kek` unwraps an `archive_url` source's key).
    /// Errors name the field.
    pub fn open(
        opts: &Options,
        cipher: Option<Arc<Xts>>,
        kek: Option<Arc<Kek>>,
    ) -> Result<Self, ArchiveError> {
        let open_err = |e: lazy::Error| ArchiveError::Open(Box::new(e));
        let (file, sectors) = lazy::open_base_disk(&opts.path).map_err(open_err)?;
        if sectors == 0 {
            return Err(ArchiveError::Open(
                format!(
                    "path: {} is smaller than one 512-byte sector",
                    opts.path.display()
                )
                .into(),
            ));
        }
        let lazy = match opts.lazy_options() {
            None => None,
            Some(mut lazy_opts) => {
                lazy_opts.archive_kek = kek;
                let path = &lazy_opts.metadata_path;
                let meta = File::open(path).map_err(|source| {
                    open_err(lazy::Error::OpenMetadata {
                        path: path.clone(),
                        source,
                    })
                })?;
                let metadata =
                    Metadata::read_from(&meta, sectors, cipher.as_deref()).map_err(|source| {
                        open_err(lazy::Error::BadMetadata {
                            path: path.clone(),
                            source,
                        })
                    })?;
                let source = lazy::source::open(&lazy_opts, RING_ENTRIES).map_err(open_err)?;
                // A source replaced since the disk started filling would archive a mix.
                lazy::pin::check(path, &metadata, &source.identity()).map_err(open_err)?;
                Some(LazyView {
                    stripe_bytes: metadata.stripe_bytes(),
                    metadata,
                    source,
                })
            }
        };
        Ok(ConfiguredDisk {
            path: opts.path.clone(),
            file,
            bytes: sectors * SECTOR_SIZE as u64,
            cipher,
            lazy,
        })
    }

    /// The archive's chunk size: a lazy disk's stripe size, else [`DEFAULT_CHUNK_BYTES`].
    pub fn chunk_bytes(&self) -> u64 {
        self.lazy
            .as_ref()
            .map_or(DEFAULT_CHUNK_BYTES, |l| l.stripe_bytes)
    }

    /// Reads the base disk, decrypted.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        if let Some(xts) = &self.cipher {
            xts.decrypt(offset / SECTOR_SIZE as u64, buf);
        }
        Ok(())
    }
}

impl LazyView {
    /// Reads the source: zeros past its end, and a source longer than the disk is cut (as
    /// the lazy layer does).
    fn read_source(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let avail = self
            .source
            .bytes()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if avail > 0 {
            self.source.read_at(offset, &mut buf[..avail])?;
        }
        buf[avail..].fill(0);
        Ok(())
    }
}

impl DiskReader for ConfiguredDisk {
    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let sector = SECTOR_SIZE as u64;
        if !offset.is_multiple_of(sector) || !(buf.len() as u64).is_multiple_of(sector) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "disk reads must be whole sectors",
            ));
        }
        let Some(lazy) = &self.lazy else {
            return self.read_base(offset, buf);
        };
        // Stripe by stripe: fetched ones from the base disk, the others from the source.
        let mut pos = 0;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let stripe = at / lazy.stripe_bytes;
            let end = ((stripe + 1) * lazy.stripe_bytes).min(offset + buf.len() as u64);
            let piece = &mut buf[pos..pos + (end - at) as usize];
            let fetched = usize::try_from(stripe)
                .ok()
                .and_then(|s| lazy.metadata.stripes.get(s))
                .is_some_and(|state| state & FETCHED != 0);
            if fetched {
                self.read_base(at, piece)?;
            } else {
                lazy.read_source(at, piece)?;
            }
            pos += piece.len();
        }
        Ok(())
    }
}

/// How the tool describes the disk: its path and, when lazy, how much is fetched.
impl fmt::Display for ConfiguredDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = &self.lazy {
            write!(
                f,
                " ({} of {} stripes fetched, the others read from {})",
                l.metadata.fetched_count(),
                l.metadata.stripe_count(),
                l.source
            )?;
        }
        Ok(())
    }
}
