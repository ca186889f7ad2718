//! A local directory as an object store (`file:///dir`): one file per object.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{check_key, ObjectStore};
use crate::sys::open::{open_for_reading, Kinds};

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Uses `dir`, creating it if needed.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        if !fs::metadata(dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            ));
        }
        Ok(FileStore {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        check_key(key)?;
        Ok(self.dir.join(key))
    }
}

impl fmt::Display for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file://{}", self.dir.display())
    }
}

impl ObjectStore for FileStore {
    /// Only a regular file is an object: a FIFO (whose open and reads would wait forever for
    /// a writer), a device or a directory is an error, found without waiting. Its size is
    /// checked before anything is read, and at most `max + 1` bytes are read (it may grow).
    fn get(&self, key: &str, max: usize) -> io::Result<Vec<u8>> {
        let path = self.path(key)?;
        let file = open_for_reading(&path, Kinds::Regular)
            .map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))?;
        let len = file.metadata()?.len();
        if len > max as u64 {
            return Err(super::too_large(key, max));
        }
        super::read_bounded(file, max, key)
    }

    /// Written to a temporary name, synced, then renamed over the key and the directory
    /// synced: a crash leaves the old object or the new one, never half of one.
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object")
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        match fs::metadata(self.path(key)?) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn put_get_exists_and_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("a/b")).unwrap();
        assert!(!store.exists("chunks/x").unwrap());
        store.put("chunks/x", b"hello").unwrap();
        assert!(store.exists("chunks/x").unwrap());
        assert_eq!(store.get("chunks/x", 5).unwrap(), b"hello");
        store.put("chunks/x", b"again").unwrap();
        assert_eq!(store.get("chunks/x", 5).unwrap(), b"again");
        let e = store.get("chunks/x", 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = store.get("missing", 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a b", "./x"] {
            assert!(store.get(bad, 5).is_err(), "{bad:?}");
            assert!(store.put(bad, b"").is_err(), "{bad:?}");
        }
    }

    /// A FIFO (or any non-regular file) where an object should be: an error at once. Its
    /// open used to wait for a writer forever (and SIGTERM with it).
    #[test]
    fn a_fifo_or_device_object_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let fifo = dir.path().join("manifest.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for key in ["manifest.json", "dir", "zero"] {
                let _ = tx.send((key, store.get(key, 1 << 20).map(|v| v.len())));
            }
        });
        for _ in 0..3 {
            let Ok((key, got)) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
                // Free the reader blocked on the FIFO, then fail.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
                panic!("reading a FIFO object did not return within 5 s");
            };
            let e = got.expect_err(key);
            assert!(e.to_string().contains("not a regular file"), "{key}: {e}");
        }
    }
}
