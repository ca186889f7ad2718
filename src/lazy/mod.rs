//! Lazy stripe fetch from a base image (docs/lazy-fetch.md), one concern per module:
//!
//! - [`source`]: what stripes are copied from ([`StripeSource`]; the image file, [`FileSource`];
//!   an HTTP(S) or S3 object read with checked Range GETs, [`RangeSource`]);
//! - `device`: the layer ([`LazyDevice`]) and its set-up; `channel`: its per-queue channel,
//!   which parks requests on unfetched stripes and `split`s reads that need no fetch;
//! - `states` (stripe states), `queue` (the fetcher pool's work and wake-ups), `persist` (the
//!   metadata file kept in step), composed by `fetch` with the fetcher threads;
//! - [`metadata`]: the file format; `status`: the progress the control socket reports.

mod channel;

mod device;
mod error;
mod fetch;
pub mod metadata;
mod persist;
mod queue;
pub mod source;
mod split;
mod states;
mod status;
#[cfg(test)]
mod tests;

pub use device::{LazyDevice, LazyOptions};
pub use error::Error;
pub use metadata::{Metadata, MetadataError};
pub use source::{FileSource, RangeSource, StripeSource};
pub use status::LazyStatus;

pub use crate::block::device_size;

use std::path::Path;

/// Opens the base disk (`path` of the config) and returns it with its size in 512-byte sectors
/// (a trailing partial sector does not count); errors name the `path` field.
pub fn open_base_disk(path: &Path) -> Result<(std::fs::File, u64), Error> {
    let open = || {
        // Checked before opening: opening a FIFO would wait for a writer.
        crate::block::check_disk_kind(&std::fs::metadata(path)?)?;
        std::fs::File::open(path)
    };
    let disk = open().map_err(|source| Error::OpenBase {
        path: path.to_owned(),
        source,
    })?;
    let bytes = device_size(&disk).map_err(|source| Error::BaseSize {
        path: path.to_owned(),
        source,
    })?;
    Ok((disk, bytes / crate::block::SECTOR_SIZE as u64))
}

/// What the metadata tools (`tool`: init-metadata, dump-metadata) start from: the config's
/// `metadata_path`, which they require, and the base disk (`path`) with its size in sectors, as
/// [`open_base_disk`] returns it.
pub fn metadata_tool_files<'a>(
    tool: &'static str,
    metadata_path: Option<&'a Path>,
    path: &Path,
) -> Result<(&'a Path, std::fs::File, u64), Error> {
    let meta_path = metadata_path.ok_or(Error::MetadataPathRequired { tool })?;
    let (disk, disk_sectors) = open_base_disk(path)?;
    Ok((meta_path, disk, disk_sectors))
}
