//! Lazy stripe fetch from a base image: the metadata file format ([`metadata`]), the fetch
//! layer ([`LazyDevice`]) with its fetcher pool, and the control socket ([`control`]).

pub mod control;
mod device;
mod fetch;
pub mod metadata;

pub use device::{LazyDevice, LazyOptions, LazyStatus};
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
