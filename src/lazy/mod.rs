//! Lazy stripe fetch from a base image: the metadata file format ([`metadata`]), the fetch
//! layer ([`LazyDevice`]) with its fetcher pool, and the control socket ([`control`]).

pub mod control;
mod device;
mod fetch;
pub mod metadata;

pub use device::{LazyDevice, LazyOptions, LazyStatus};
pub use metadata::{Metadata, MetadataError};

pub use crate::block::device_size;

use std::path::Path;

/// Opens the base disk (`path` of the config) and returns it with its size in 512-byte sectors
/// (a trailing partial sector does not count); errors name the `path` field.
pub fn open_base_disk(path: &std::path::Path) -> anyhow::Result<(std::fs::File, u64)> {
    use anyhow::Context;
    let disk = std::fs::File::open(path)
        .with_context(|| format!("path: cannot open {}", path.display()))?;
    let bytes = device_size(&disk)
        .with_context(|| format!("path: cannot get the size of {}", path.display()))?;
    Ok((disk, bytes / crate::block::SECTOR_SIZE as u64))
}

/// True if `a` and `b` name the same file (same inode, or the same block device through
/// different nodes). Paths that cannot be inspected count as different.
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if a.file_type().is_block_device() && b.file_type().is_block_device() {
        a.rdev() == b.rdev()
    } else {
        a.dev() == b.dev() && a.ino() == b.ino()
    }
}

/// Refuses a lazy configuration whose base disk, image and metadata are not three different
/// files (fetching would copy a file onto itself, or stripe states would overwrite data).
pub fn check_distinct(path: &Path, image: &Path, metadata: &Path) -> anyhow::Result<()> {
    let fields = [
        ("path", path),
        ("image_path", image),
        ("metadata_path", metadata),
    ];
    for (i, (fa, a)) in fields.iter().enumerate() {
        for (fb, b) in &fields[i + 1..] {
            if same_file(a, b) {
                anyhow::bail!(
                    "{fb}: {} is the same file as {fa} ({})",
                    b.display(),
                    a.display()
                );
            }
        }
    }
    Ok(())
}
