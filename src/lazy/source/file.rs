//! A local file or block device as the source (`image_path`).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{SourceIdentity, SourceKind, StripeSource};
use crate::block::{device_size, BlockDevice, FileDevice, IoChannel, Notifier};
use crate::lazy::Error;
use crate::sys::open::{open_for_reading, Kinds};

/// Fetchers read the file with positioned reads; read-through channels are io_uring channels
/// of a second, read-only [`FileDevice`] on it (O_DIRECT where the file system allows).
pub struct FileSource {
    path: PathBuf,
    file: File,
    bytes: u64,
    device: FileDevice,
    identity: SourceIdentity,
}

impl FileSource {
    pub fn open(path: &Path, ring_entries: u32) -> Result<Self, Error> {
        let err = |source| Error::OpenImage {
            path: path.to_owned(),
            source,
        };
        let device = FileDevice::open(path, true, ring_entries).map_err(err)?;
        // Opened again for the fetchers' reads, its kind checked on what was opened.
        let file = open_for_reading(path, Kinds::RegularOrBlock).map_err(err)?;
        let bytes = device_size(&file).map_err(err)?;
        let identity = file_identity(path, &file.metadata().map_err(err)?, bytes);
        Ok(FileSource {
            path: path.to_owned(),
            file,
            bytes,
            device,
            identity,
        })
    }
}

/// The identity of the image at `path` of `bytes` bytes, whose status is `meta`: for a
/// regular file its size, modification time (to the nanosecond) and inode number, so a file
/// replaced by a rename (another inode) or rewritten in place (another mtime) is told apart.
/// The device number is left out: it is not stable across reboots on every file system
/// (NFS, btrfs, device-mapper). For a block device, only its size: a device's node says
/// nothing about writes to it.
pub fn file_identity(path: &Path, meta: &std::fs::Metadata, bytes: u64) -> SourceIdentity {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let location = path.display().to_string();
    if meta.file_type().is_block_device() {
        return SourceIdentity::new(SourceKind::BlockDevice, location, bytes);
    }
    SourceIdentity::new(SourceKind::File, location, bytes)
        .with(
            "mtime",
            format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()),
        )
        .with("inode", meta.ino().to_string())
}

impl fmt::Display for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.display().fmt(f)
    }
}

impl StripeSource for FileSource {
    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let avail = self.bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..avail], offset)?;
        buf[avail..].fill(0);
        Ok(())
    }

    fn read_through(&self, notify: Notifier) -> Option<io::Result<Box<dyn IoChannel>>> {
        Some(self.device.new_channel_with(notify))
    }

    fn identity(&self) -> SourceIdentity {
        self.identity.clone()
    }
}
