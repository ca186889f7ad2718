//! A local directory as an object store (`file:///dir`): one file per object.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
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

/// Temporary files are `.tmp-PID-NAME`, PID the writing process's.
const TMP_PREFIX: &str = ".tmp-";

/// The process id in a temporary file's name, if it is one.
fn temporary_owner(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix(TMP_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether process `pid` exists (an existing process we may not signal counts).
fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks that `pid` can be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporary files under `dir` (and its subdirectories, not following symbolic
/// links) whose writing process is gone; counts them into `removed`.
fn remove_stale_in(dir: &Path, removed: &mut usize) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            remove_stale_in(&entry.path(), removed)?;
            continue;
        }
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temporary_owner) else {
            continue;
        };
        if !process_exists(pid) {
            match fs::remove_file(entry.path()) {
                Ok(()) => *removed += 1,
                // Another writer cleaning up at the same time.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A new file at `path`, never one that is there: whatever is at that name (a file our pid's
/// earlier namesake left, or a FIFO or symbolic link someone put there) is removed first, so
/// nothing is followed or waited for.
fn create_new(path: &Path) -> io::Result<File> {
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()
        }
        other => other,
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
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object")
        ));
        let result = (|| {
            let mut f = create_new(&tmp)?;
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

    fn remove_stale_temporaries(&self) -> io::Result<usize> {
        let mut removed = 0;
        remove_stale_in(&self.dir, &mut removed)?;
        Ok(removed)
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

    /// A pid no process has: one that just exited (and was reaped).
    fn dead_pid() -> libc::pid_t {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        child.wait().unwrap();
        pid
    }

    /// What a killed `archive` run leaves (`.tmp-PID-NAME` of a pid that is gone) is removed,
    /// in the store's subdirectories too; a live writer's temporaries, objects, and what a
    /// symbolic link points to are left alone.
    #[test]
    fn temporaries_of_gone_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = FileStore::open(&root).unwrap();
        store.put("chunks/a", b"object").unwrap();
        let dead = dead_pid();
        let stale = [
            root.join(format!(".tmp-{dead}-manifest.json")),
            root.join(format!("chunks/.tmp-{dead}-b")),
        ];
        for p in &stale {
            fs::write(p, b"half").unwrap();
        }
        let live = root.join(format!("chunks/.tmp-{}-c", std::process::id()));
        fs::write(&live, b"in progress").unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let outside = elsewhere.join(format!(".tmp-{dead}-x"));
        fs::write(&outside, b"not ours").unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
        let odd = root.join(".tmp-notapid-y");
        fs::write(&odd, b"").unwrap();

        assert_eq!(store.remove_stale_temporaries().unwrap(), 2);
        for p in &stale {
            assert!(!p.exists(), "{}", p.display());
        }
        assert!(live.exists() && outside.exists() && odd.exists());
        assert_eq!(store.get("chunks/a", 6).unwrap(), b"object");
        assert_eq!(store.remove_stale_temporaries().unwrap(), 0);
    }

    /// A FIFO (or a symbolic link) at the temporary name `put` is about to use is replaced,
    /// not opened: the write neither waits for a reader nor follows the link.
    #[test]
    fn put_replaces_whatever_is_at_its_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let fifo = dir.path().join(format!(".tmp-{}-obj", std::process::id()));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let store = std::sync::Arc::new(store);
        let s2 = store.clone();
        std::thread::spawn(move || tx.send(s2.put("obj", b"data").map_err(|e| e.kind())));
        let r = rx.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(r, Ok(Ok(())), "put waited on a FIFO at its temporary name");
        assert_eq!(store.get("obj", 4).unwrap(), b"data");

        let target = dir.path().join("target");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join(format!(".tmp-{}-obj2", std::process::id()));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        store.put("obj2", b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert_eq!(store.get("obj2", 3).unwrap(), b"new");
    }

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
