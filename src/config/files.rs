//! File identity: no two fields may name one file (hard links, symbolic links and other
//! spellings of one path included).

use std::path::{Path, PathBuf};

use super::{ConfigError, Options};

impl Options {
    /// Refuses a config in which two fields name one file: the disk, the image, the metadata,
    /// the debug log and the sockets must all be different files (the debug log appended to
    /// the disk would write guest plaintext into it, a fetch would copy a file onto itself,
    /// stripe states would overwrite data). Compared as files, see [`same_file`]. Looks at the
    /// file system, so it is not part of [`Options::validate`]; the backend and init-metadata
    /// run it before opening anything.
    pub fn check_distinct_files(&self) -> Result<(), ConfigError> {
        let files: Vec<(&'static str, &Path)> = [
            ("path", Some(self.path.as_path())),
            ("image_path", self.image_path.as_deref()),
            (
                "archive_url",
                self.archive_url.as_deref().and_then(file_url_path),
            ),
            ("metadata_path", self.metadata_path.as_deref()),
            ("io_debug_path", self.io_debug_path.as_deref()),
            ("socket", Some(self.socket.as_path())),
            ("control_socket", self.control_socket.as_deref()),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path?)))
        .collect();
        for (i, &(other_field, other)) in files.iter().enumerate() {
            for &(field, path) in &files[i + 1..] {
                if same_file(path, other) {
                    return Err(ConfigError::SameFile {
                        field,
                        path: path.to_owned(),
                        other_field,
                        other: other.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The directory a `file://` URL names; `None` for other schemes.
pub fn file_url_path(url: &str) -> Option<&Path> {
    url.strip_prefix("file://").map(Path::new)
}

/// True if `a` and `b` name the same file: the same inode, or the same block device through
/// different nodes; for a path that does not exist (yet), the same place once symbolic links
/// and the directory are resolved (a debug log or socket about to be created there).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) if a.file_type().is_block_device() && b.file_type().is_block_device() => {
            a.rdev() == b.rdev()
        }
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => match (resolve(a), resolve(b)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

/// Where `path` is or would be created: canonical when it exists, else its directory's
/// canonical form joined with its name, following a dangling symbolic link (at most 40, as
/// the kernel does). None when that cannot be said (a name ending in `..`, a link loop).
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut path = std::path::absolute(path).ok()?;
    for _ in 0..40 {
        if let Ok(canonical) = std::fs::canonicalize(&path) {
            return Some(canonical);
        }
        match std::fs::read_link(&path) {
            // A relative target is relative to the link's directory; an absolute one replaces.
            Ok(target) => path = path.parent()?.join(target),
            Err(_) => {
                let name = path.file_name()?;
                let dir = path.parent()?;
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                return Some(dir.join(name));
            }
        }
    }
    None
}
