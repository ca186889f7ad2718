//! A disk archive as the source (`archive_url`): stripes are read from the archive's chunks,
//! each fetched, authenticated and decompressed on its way (the lazy layer then encrypts
//! them with the disk's own keys on their way to the base disk).

use std::fmt;
use std::io;

use super::{SourceIdentity, SourceKind, StripeSource};
use crate::archive::{kek_key, ArchiveReader};
use crate::crypto::keys::Kek;
use crate::lazy::Error;
use crate::remote::open_store;
use crate::remote::RemoteOptions;

/// No read-through: a guest read of an unfetched stripe waits for its fetch (a chunk is
/// fetched and opened whole, so reading it per request would cost as much as fetching).
pub struct ArchiveSource {
    url: String,
    reader: ArchiveReader,
}

impl ArchiveSource {
    /// Opens the archive at `url` and verifies its manifest with `kek`, which must be an
    /// AES-256-GCM KEK. Errors name `archive_url`.
    pub fn open(url: &str, remote: &RemoteOptions, kek: Option<&Kek>) -> Result<Self, Error> {
        let err = |source| Error::Archive {
            url: url.to_string(),
            source,
        };
        let kek = kek_key(kek).map_err(err)?;
        let store = open_store("archive_url", url, remote).map_err(Error::ArchiveStore)?;
        let reader = ArchiveReader::open(store, kek).map_err(err)?;
        let m = reader.manifest();
        log::info!(
            "archive {url}: a disk of {} bytes in {} chunks of {} KiB, {} stored",
            m.disk_bytes,
            m.chunks.len(),
            m.chunk_bytes >> 10,
            m.chunks.iter().flatten().count()
        );
        Ok(ArchiveSource {
            url: url.to_string(),
            reader,
        })
    }
}

impl fmt::Display for ArchiveSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl StripeSource for ArchiveSource {
    fn bytes(&self) -> u64 {
        self.reader.manifest().disk_bytes
    }

    /// A missing or damaged chunk is an error naming it (which the fetcher logs and turns
    /// into EIO for the requests waiting on the stripe), never wrong data.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reader.read_at(offset, buf).map_err(|e| e.into_io())
    }

    /// The manifest's MAC: archiving again to the same place writes a new manifest, whose
    /// MAC differs whenever anything in it does.
    fn identity(&self) -> SourceIdentity {
        SourceIdentity::new(SourceKind::Archive, self.url.clone(), self.bytes())
            .with("manifest_mac", self.reader.manifest_mac())
    }

    /// An archive is a whole disk: cutting it to a smaller base disk would lose its end.
    fn may_exceed_disk(&self) -> bool {
        false
    }

    fn outage(&self) -> Option<crate::remote::retry::Outage> {
        self.reader.store().outage()
    }
}
