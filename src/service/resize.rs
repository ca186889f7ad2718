//! Growing the disk while it is served: the control socket's `resize`.
//!
//! A regular file is extended to the size asked (`resize {"size_bytes":N}`); a block device
//! (or a file) grown underneath, e.g. by `lvextend`, is picked up by `resize {}`. The new area
//! reads as zeros: on a plain file it is a hole; with encryption, raw zeros would decrypt to
//! garbage, so it is written with encrypted zeros first, one chunk after the other from the
//! old end (a kill -9 part way leaves a file that ends where the writing stopped: a smaller
//! grown disk, every sector of which reads as zeros), then synced. Only then does the
//! [`Capacity`] grow, which every layer, the queues' range checks and the config space read,
//! and the connected frontend is told ([`ConfigChange`]); a frontend connecting later reads the
//! new size. The size is the disk's, so it survives a restart. Shrinking is refused (the
//! guest's data past the new end would be lost), and so is growing a readonly disk.
//!
//! With lazy fetch the stripe metadata grows first, durably, the new stripes marked fetched
//! ([`LazyDevice::begin_grow`]); then the disk as above; then the lazy layer counts the new
//! stripes, before the capacity grows (see `crate::lazy` `grow` for the crash-safety argument).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::Serialize;

use crate::block::{device_size, run_sync, BlockDevice, Capacity, IoOp, SECTOR_SHIFT, SECTOR_SIZE};
use crate::lazy::LazyDevice;
use crate::vhost::ConfigChange;

/// The largest size `resize` accepts: 1 PiB.
pub const MAX_SIZE_BYTES: u64 = crate::block::MAX_DISK_BYTES;
/// Encrypted zeros are written this many sectors at a time (1 MiB), in order.
const ZERO_CHUNK_SECTORS: u64 = 2048;

/// Why a resize was refused or failed; nothing changed (see [`Resizer::resize`]).
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the disk is readonly")]
    Readonly,
    #[error(
        "another backend holds the disk (this one stands by for a live migration): resize on \
         the backend that serves the guest"
    )]
    Standby,
    /// The lazy-fetch layer refused or failed to grow its metadata.
    #[error(transparent)]
    Lazy(#[from] crate::lazy::GrowError),
    #[error("size_bytes must be a multiple of 512")]
    Unaligned,
    #[error("shrinking is refused: the data past the new end would be lost")]
    Shrink,
    #[error("size_bytes is over the limit")]
    TooLarge,
    #[error("path is a block device: grow it underneath (e.g. lvextend), then send `resize {{}}`")]
    BlockDevice,
    #[error("cannot grow path: {0}")]
    Io(#[from] io::Error),
}

/// The answer to a successful `resize`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Resized {
    pub size_bytes: u64,
    pub previous_size_bytes: u64,
    /// Whether a connected frontend was sent the config-change message.
    pub frontend_notified: bool,
}

/// What `resize` acts on: the disk's file and size, and the frontend to tell.
pub struct Resizer {
    pub file: Arc<File>,
    pub capacity: Capacity,
    pub readonly: bool,
    /// With lazy fetch, the layer whose stripe metadata grows first.
    pub lazy: Option<Arc<LazyDevice>>,
    /// With encryption, the layer that writes the new area's encrypted zeros.
    pub crypt: Option<Arc<dyn BlockDevice>>,
    pub config_change: ConfigChange,
    /// Who holds the disk: a backend standing by for a live migration must not grow it.
    pub owner: Option<Arc<super::handover::DiskLock>>,
    /// One resize at a time.
    pub busy: Mutex<()>,
}

impl Resizer {
    /// The current size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.capacity.sectors() << SECTOR_SHIFT
    }

    /// Grows the disk to `size_bytes`, or with `None` to the size of what `path` is now (a block
    /// device or file grown underneath). The same size answers success and changes nothing.
    pub fn resize(&self, size_bytes: Option<u64>) -> Result<Resized, ResizeError> {
        if self.owner.as_ref().is_some_and(|o| !o.held()) {
            return Err(ResizeError::Standby);
        }
        if self.readonly {
            return Err(ResizeError::Readonly);
        }
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.capacity.sectors();
        let is_block = self.file.metadata()?.file_type().is_block_device();
        let underneath = device_size(&self.file)? >> SECTOR_SHIFT;
        let new = match size_bytes {
            None => underneath,
            Some(n) => {
                if n % SECTOR_SIZE as u64 != 0 {
                    return Err(ResizeError::Unaligned);
                }
                if n > MAX_SIZE_BYTES {
                    return Err(ResizeError::TooLarge);
                }
                if is_block && n >> SECTOR_SHIFT != underneath && n >> SECTOR_SHIFT != old {
                    return Err(ResizeError::BlockDevice);
                }
                n >> SECTOR_SHIFT
            }
        };
        if new < old {
            return Err(ResizeError::Shrink);
        }
        if new << SECTOR_SHIFT > MAX_SIZE_BYTES {
            return Err(ResizeError::TooLarge);
        }
        let resized = |notified| Resized {
            size_bytes: new << SECTOR_SHIFT,
            previous_size_bytes: old << SECTOR_SHIFT,
            frontend_notified: notified,
        };
        if new == old {
            return Ok(resized(false));
        }
        if let Some(lazy) = &self.lazy {
            lazy.begin_grow(old, new)?;
        }
        if let Err(e) = self.prepare(old, new, is_block) {
            if let Some(lazy) = &self.lazy {
                lazy.abort_grow();
            }
            if !is_block {
                // Back to the old end: nothing of the new area was shown to anyone.
                if let Err(t) = self.file.set_len(old << SECTOR_SHIFT) {
                    warn!("resize: cannot truncate back to {old} sectors: {t}");
                }
            }
            return Err(e.into());
        }
        if let Some(lazy) = &self.lazy {
            lazy.finish_grow(new);
        }
        self.capacity.grow(new);
        info!("resize: {old} -> {new} sectors");
        let notified = match self.config_change.notify() {
            Ok(n) => n,
            Err(e) => {
                warn!("resize: cannot notify the frontend: {e}");
                false
            }
        };
        Ok(resized(notified))
    }

    /// Makes sectors `old..new` exist and read as zeros, durably.
    fn prepare(&self, old: u64, new: u64, is_block: bool) -> io::Result<()> {
        if let Some(crypt) = &self.crypt {
            let mut channel = crypt.new_channel()?;
            let mut sector = old;
            while sector < new {
                let sectors = (new - sector).min(ZERO_CHUNK_SECTORS);
                let op = IoOp::WriteZeroes { sector, sectors };
                run_sync(channel.as_mut(), op)
                    .0
                    .map_err(io::Error::from_raw_os_error)?;
                sector += sectors;
            }
        }
        if !is_block {
            self.file.set_len(new << SECTOR_SHIFT)?;
        }
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{CryptDevice, FileDevice, IoBuf};
    use crate::crypto::Xts;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    const MIB: u64 = 1 << 20;

    /// A resizer over a fresh file of `bytes` bytes of 0x5a, and the file's path.
    fn resizer(bytes: u64, xts: Option<Xts>) -> (tempfile::TempDir, std::path::PathBuf, Resizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0x5a; bytes as usize]).unwrap();
        let file = FileDevice::open(&path, false, 32).unwrap();
        let capacity = file.capacity();
        let disk = file.file();
        let crypt = xts.map(|x| {
            Arc::new(CryptDevice::new(Arc::new(file), Arc::new(x))) as Arc<dyn BlockDevice>
        });
        let r = Resizer {
            file: disk,
            capacity,
            readonly: false,
            lazy: None,
            crypt,
            config_change: ConfigChange::default(),
            owner: None,
            busy: Mutex::new(()),
        };
        (dir, path, r)
    }

    #[test]
    fn grows_a_file_and_its_capacity_and_tells_the_frontend() {
        let (_dir, path, r) = resizer(MIB, None);
        let (ours, theirs) = UnixStream::pair().unwrap();
        r.config_change.set(Some(ours));
        let got = r.resize(Some(3 * MIB)).unwrap();
        assert_eq!(
            got,
            Resized {
                size_bytes: 3 * MIB,
                previous_size_bytes: MIB,
                frontend_notified: true
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
        assert_eq!(r.capacity.sectors(), 3 * MIB / 512);
        let mut msg = [0u8; 12];
        (&theirs).read_exact(&mut msg).unwrap();
        assert_eq!(&msg[..4], &2u32.to_le_bytes());
        // The old data is untouched, the new area reads as zeros.
        let data = std::fs::read(&path).unwrap();
        assert!(data[..MIB as usize].iter().all(|&b| b == 0x5a));
        assert!(data[MIB as usize..].iter().all(|&b| b == 0));
        // The same size again: nothing to do, nobody told.
        let again = r.resize(Some(3 * MIB)).unwrap();
        assert_eq!(
            (again.size_bytes, again.frontend_notified),
            (3 * MIB, false)
        );
    }

    #[test]
    fn refuses_shrinking_unaligned_too_large_and_readonly() {
        let (_dir, path, mut r) = resizer(MIB, None);
        let refused = |r: &Resizer, n| r.resize(Some(n)).unwrap_err();
        assert!(matches!(refused(&r, MIB - 512), ResizeError::Shrink));
        assert!(matches!(refused(&r, 0), ResizeError::Shrink));
        assert!(matches!(refused(&r, 2 * MIB + 1), ResizeError::Unaligned));
        assert!(matches!(
            refused(&r, MAX_SIZE_BYTES + 512),
            ResizeError::TooLarge
        ));
        assert!(matches!(refused(&r, u64::MAX - 511), ResizeError::TooLarge));
        r.readonly = true;
        assert!(matches!(refused(&r, 2 * MIB), ResizeError::Readonly));
        // Nothing changed.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
        assert_eq!(r.capacity.sectors(), MIB / 512);
    }

    #[test]
    fn resize_without_a_size_takes_what_the_file_grew_to() {
        let (_dir, path, r) = resizer(MIB, None);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A trailing partial sector is not part of the disk.
        f.set_len(2 * MIB + 100).unwrap();
        assert_eq!(r.capacity.sectors(), MIB / 512);
        let got = r.resize(None).unwrap();
        assert_eq!(got.size_bytes, 2 * MIB);
        assert!(!got.frontend_notified);
        assert_eq!(r.capacity.sectors(), 2 * MIB / 512);
    }

    #[test]
    fn the_new_area_of_an_encrypted_disk_reads_as_zeros_through_the_cipher() {
        let (_dir, path, r) = resizer(MIB, Some(Xts::new(&[3; 32], &[4; 32])));
        r.resize(Some(MIB + 5 * 512 + 2 * MIB)).unwrap();
        let new_bytes = 3 * MIB + 5 * 512;
        assert_eq!(std::fs::metadata(&path).unwrap().len(), new_bytes);
        let crypt = r.crypt.as_ref().unwrap();
        assert_eq!(crypt.sectors(), new_bytes / 512);
        let mut ch = crypt.new_channel().unwrap();
        let len = (new_bytes - MIB) as usize;
        let (res, buf) = run_sync(
            ch.as_mut(),
            IoOp::Read {
                sector: MIB / 512,
                buf: IoBuf::new(len),
            },
        );
        res.unwrap();
        assert!(buf.unwrap().iter().all(|&b| b == 0));
        // On the file: ciphertext, not zeros.
        let raw = std::fs::read(&path).unwrap();
        assert!(raw[MIB as usize..MIB as usize + 512]
            .iter()
            .any(|&b| b != 0));
    }

    /// A write of the new area failing (a full file system: ENOSPC) fails the resize: the
    /// error is answered, the file goes back to its old size and the capacity stays.
    #[test]
    fn a_failing_write_of_encrypted_zeros_leaves_the_old_size() {
        use crate::block::testing::{Fault, Kind, MemDevice};
        let (_dir, path, mut r) = resizer(MIB, None);
        let mem = MemDevice::new(8 * MIB / 512);
        // The third chunk's write fails with ENOSPC.
        mem.on(
            |s| s.kind == Kind::Write && s.sector >= (MIB + 2 * MIB) / 512,
            Fault::Fail(libc::ENOSPC),
        );
        let crypt: Arc<dyn BlockDevice> = Arc::new(CryptDevice::new(
            Arc::new(mem),
            Arc::new(Xts::new(&[3; 32], &[4; 32])),
        ));
        r.crypt = Some(crypt);
        // The file grew under the resize (as the writes would extend it); it is cut back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(3 * MIB)
            .unwrap();
        let e = r.resize(Some(5 * MIB)).unwrap_err();
        assert!(e.to_string().contains("cannot grow path"), "{e}");
        let ResizeError::Io(io) = e else {
            panic!("not an I/O error")
        };
        assert_eq!(io.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
        assert_eq!(r.capacity.sectors(), MIB / 512);
    }
}
