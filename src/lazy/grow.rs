//! Growing a lazy disk (the control socket's `resize`, docs/lazy-fetch.md "Growing a lazy
//! disk"). The new area has no source: its stripes are fetched from the start (they read as
//! zeros, which the layer below makes sure of) and autofetch never looks at them; the source
//! and its pin are unchanged.
//!
//! The metadata grows first and the disk second, so a kill -9 at any point leaves one of:
//! - the old metadata and the old disk;
//! - the grown metadata (new stripes fetched, from the boundary sector on) over the old disk,
//!   or over a disk grown part of the way (an encrypted disk's new area is written in
//!   chunks): the next start serves the disk's size and ignores the stripes past it, which
//!   [`Metadata::from_bytes`](super::Metadata::from_bytes) accepts as a grow that did not
//!   finish; `resize` again finishes it;
//! - the grown metadata and the grown disk.
//!
//! Never a disk larger than its metadata covers, which no implementation could start.

use super::device::LazyDevice;
use super::metadata::file_len;
use super::GrowError;
use crate::block::SECTOR_SHIFT;

impl LazyDevice {
    /// Step 1 of growing the disk from `old` to `new` sectors: the metadata, durably. Then
    /// the caller grows the disk (its new area reading as zeros, durably) and calls
    /// [`LazyDevice::finish_grow`], or [`LazyDevice::abort_grow`] if that failed.
    pub fn begin_grow(&self, old: u64, new: u64) -> Result<(), GrowError> {
        let (shared, bytes) = (&self.shared, self.source.bytes());
        if bytes > old << SECTOR_SHIFT {
            return Err(GrowError::ImageLarger {
                source_name: self.source.to_string(),
                bytes,
                disk_bytes: old << SECTOR_SHIFT,
            });
        }
        let stripes = shared.stripes.count_for(new);
        let max = shared.stripes.capacity();
        let count = usize::try_from(stripes)
            .ok()
            .filter(|&c| c <= max)
            .ok_or(GrowError::TooManyStripes { need: stripes, max })?;
        let io = |error| GrowError::Metadata {
            path: self.metadata_path.clone(),
            error,
        };
        let need_bytes = file_len(stripes);
        match shared.meta.device_bytes().map_err(io)? {
            Some(bytes) if bytes < need_bytes => {
                return Err(GrowError::MetadataDeviceTooSmall {
                    path: self.metadata_path.clone(),
                    bytes,
                    stripes,
                    need_bytes,
                })
            }
            _ => {}
        }
        shared.meta.begin_grow(&shared.stripes, count).map_err(io)
    }

    /// Step 3: the disk has grown to `new` sectors; its new stripes are fetched from now on
    /// (before the capacity above grows, so no request reaches them earlier).
    pub fn finish_grow(&self, new: u64) {
        self.shared.stripes.grow(new);
        log::info!(
            "lazy fetch: {} stripes after growing to {new} sectors, the new ones fetched",
            self.shared.stripes.count()
        );
    }

    /// The disk did not grow after [`LazyDevice::begin_grow`].
    pub fn abort_grow(&self) {
        self.shared.meta.abort_grow(&self.shared.stripes);
    }
}
