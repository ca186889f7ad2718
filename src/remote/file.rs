//! A local directory as an object store (`file:///dir`): one file per object.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{check_key, ObjectStore};

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
    fn get(&self, key: &str, max: usize) -> io::Result<Vec<u8>> {
        super::read_bounded(File::open(self.path(key)?)?, max, key)
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
}
