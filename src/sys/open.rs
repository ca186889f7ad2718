//! Opening a file we only read, named by a configuration or a store, without letting its
//! kind make us wait: a FIFO's open blocks until a writer comes, its reads until one writes.

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Which kinds of file a caller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// Regular files only (objects of a `file://` store).
    Regular,
    /// Regular files and block devices (disks and images).
    RegularOrBlock,
}

impl Kinds {
    fn allow(self, t: &FileType) -> bool {
        t.is_file() || (self == Kinds::RegularOrBlock && t.is_block_device())
    }

    fn describe(self) -> &'static str {
        match self {
            Kinds::Regular => "not a regular file",
            Kinds::RegularOrBlock => "not a regular file or block device",
        }
    }
}

/// Refuses a file whose kind is not in `kinds` ("a FIFO, not a regular file").
pub fn check_kind(meta: &Metadata, kinds: Kinds) -> io::Result<()> {
    let t = meta.file_type();
    if kinds.allow(&t) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}, {}", super::socket::kind_of(&t), kinds.describe()),
    ))
}

/// Opens `path` read-only with O_NONBLOCK (so a FIFO or a device cannot block the open
/// itself), checks what was opened (fstat, not the path: it may change in between) against
/// `kinds`, then clears O_NONBLOCK for the reads.
pub fn open_for_reading(path: &Path, kinds: Kinds) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    check_kind(&file.metadata()?, kinds)?;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor `file` owns and keeps open; no pointers.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn kinds_are_checked_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let t0 = Instant::now();
        for kinds in [Kinds::Regular, Kinds::RegularOrBlock] {
            let e = open_for_reading(&fifo, kinds).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(
                e.to_string().starts_with("a FIFO, not a regular file"),
                "{e}"
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
        let e = open_for_reading(Path::new("/dev/null"), Kinds::RegularOrBlock).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        assert!(open_for_reading(dir.path(), Kinds::Regular).is_err());
        let file = dir.path().join("f");
        std::fs::write(&file, b"data").unwrap();
        let f = open_for_reading(&file, Kinds::Regular).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }
}
