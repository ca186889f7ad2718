//! Lazy stripe fetch from a base image (issue 4). For now only the on-disk groundwork: the
//! metadata file format ([`metadata`]) used by `init-metadata` and `dump-metadata`. The backend
//! does not serve lazy disks yet (it refuses `image_path` at start-up).

pub mod metadata;

pub use metadata::{Metadata, MetadataError};

pub use crate::block::device_size;

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
