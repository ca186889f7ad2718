//! Lazy stripe fetch from a base image (docs/lazy-fetch.md), one concern per module:
//!
//! - [`source`]: what stripes are copied from ([`StripeSource`]; the image file, [`FileSource`];
//!   an HTTP(S) or S3 object read with checked Range GETs, [`RangeSource`]);
//! - `device`: the layer ([`LazyDevice`]) and its set-up; `channel`: its per-queue channel,
//!   which parks requests on unfetched stripes and `split`s reads that need no fetch;
//! - `states` (stripe states), `queue` (the fetcher pool's work and wake-ups), `persist` (the
//!   metadata file kept in step), composed by `fetch` with the fetcher threads;
//! - `grow`: growing the disk (the control socket's `resize`), metadata first;
//! - [`metadata`]: the file format; `status`: the progress the control socket reports;
//!   [`pin`]: the source's identity pinned next to the metadata, checked at every start.

mod channel;

mod device;
mod error;
mod fetch;
mod grow;
pub mod metadata;
mod persist;
pub mod pin;
mod queue;
pub mod source;
mod split;
mod states;
mod status;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use device::{LazyDevice, LazyOptions, StripeMap};
pub use error::{Error, GrowError};
pub use metadata::{Metadata, MetadataError};
pub use source::{FileSource, RangeSource, StripeSource};
pub use status::LazyStatus;

pub use crate::block::device_size;

use std::path::Path;

use crate::sys::open::{open_for_reading, Kinds};

/// Opens the base disk (`path` of the config) and returns it with its size in 512-byte sectors
/// (a trailing partial sector does not count); errors name the `path` field.
pub fn open_base_disk(path: &Path) -> Result<(std::fs::File, u64), Error> {
    let disk = open_for_reading(path, Kinds::RegularOrBlock).map_err(|source| Error::OpenBase {
        path: path.to_owned(),
        source,
    })?;
    let bytes = device_size(&disk).map_err(|source| Error::BaseSize {
        path: path.to_owned(),
        source,
    })?;
    Ok((disk, bytes / crate::block::SECTOR_SIZE as u64))
}

/// The first stripe wholly past the end of an image of `image_bytes` bytes (the stripe count
/// when the image covers the disk).
pub fn first_stripe_past_image(md: &Metadata, image_bytes: u64) -> usize {
    let first = image_bytes.div_ceil(md.stripe_bytes());
    usize::try_from(first).map_or(md.stripe_count(), |f| f.min(md.stripe_count()))
}

/// Makes the stripes wholly past the image's end fetched in `md`, as the reference's
/// init-metadata does, but only once they hold zeros: they are zeroed on `base` (a punched
/// hole; encrypted zeros through an encryption layer) and `base` is synced first, so the base
/// disk's old bytes never show through, whichever implementation serves the disk next. The
/// caller writes `md`. Returns how many stripes were marked.
pub fn zero_past_image(
    md: &mut Metadata,
    base: &dyn crate::block::BlockDevice,
    image_bytes: u64,
) -> std::io::Result<usize> {
    let first = first_stripe_past_image(md, image_bytes);
    let count = md.stripe_count() - first;
    if count == 0 {
        return Ok(0);
    }
    let sector = first as u64 * md.stripe_sectors();
    let sectors = base.sectors().saturating_sub(sector);
    if sectors > 0 {
        let mut channel = base.new_channel()?;
        let op = crate::block::IoOp::WriteZeroes { sector, sectors };
        crate::block::run_sync(channel.as_mut(), op)
            .0
            .map_err(std::io::Error::from_raw_os_error)?;
        base.sync()?;
    }
    for i in first..md.stripe_count() {
        md.set_fetched(i);
    }
    Ok(count)
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
