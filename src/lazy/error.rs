//! What can go wrong setting up lazy fetch; every variant names the configuration field (and
//! path) involved, so the operator knows what to fix.

use std::io;
use std::path::PathBuf;

use super::MetadataError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("path: cannot open {path}")]
    OpenBase { path: PathBuf, source: io::Error },
    #[error("path: cannot get the size of {path}")]
    BaseSize { path: PathBuf, source: io::Error },
    #[error("image_path: cannot open {path}")]
    OpenImage { path: PathBuf, source: io::Error },
    /// `image_url` could not be opened (unreachable, refused, no Range support, bad
    /// credentials); the URL is shown without its query string.
    #[error("image_url: cannot use {url}")]
    OpenUrl { url: String, source: io::Error },
    /// Reading the source's partial last sector at start-up failed.
    #[error("cannot read the last partial sector of the image {image}")]
    ImageTail { image: String, source: io::Error },
    /// A metadata tool was given a config without `metadata_path`.
    #[error("metadata_path: required by {tool}")]
    MetadataPathRequired { tool: &'static str },
    #[error("metadata_path: cannot open {path}")]
    OpenMetadata { path: PathBuf, source: io::Error },
    #[error("metadata_path: {path} is not usable (run init-metadata to create it)")]
    BadMetadata {
        path: PathBuf,
        source: MetadataError,
    },
    #[error("cannot open the fetchers' channels to the base disk")]
    FetcherChannels(#[source] io::Error),
    /// The `archive_url` archive: no usable KEK, or its manifest cannot be read or verified.
    #[error("archive_url: cannot use the archive {url}")]
    Archive {
        url: String,
        source: crate::archive::ArchiveError,
    },
    /// The `archive_url` store (the error names the field).
    #[error(transparent)]
    ArchiveStore(crate::remote::StoreError),
    /// The source is larger than the base disk and must not be cut (an archived disk).
    #[error(
        "{field}: the source {source_name} holds {bytes} bytes, more than the {disk_bytes}-byte \
         base disk (path): its last {} bytes would be lost; give the base disk at least {bytes} \
         bytes (truncate -s {bytes}) and run init-metadata again",
        bytes - disk_bytes
    )]
    SourceTooLarge {
        field: &'static str,
        source_name: String,
        bytes: u64,
        disk_bytes: u64,
    },
    /// The source is not the version this disk started filling from (`lazy::pin`).
    #[error(
        "{field}: the source changed since this disk started filling from it ({changes}); \
         {fetched} of its {stripes} stripes hold the old version, so fetching the others from \
         the new one would mix two versions of the disk. Either restore the source that was \
         pinned ({pinned}), or start over with a fresh base disk and init-metadata (which \
         resets the pin), or, only if the new source is known to hold the same bytes, delete \
         {pin}"
    )]
    SourceChanged {
        field: &'static str,
        changes: String,
        pinned: String,
        fetched: usize,
        stripes: usize,
        pin: PathBuf,
    },
    /// The pinned source identity cannot be read or written.
    #[error("metadata_path: {what} the source pin {path}")]
    Pin {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// The pinned source identity is not one.
    #[error(
        "metadata_path: the source pin {path} is not usable ({why}); run init-metadata to start \
         over, or delete it to pin the current source"
    )]
    BadPin { path: PathBuf, why: String },
    /// A background thread (`what`: a fetcher) could not be started.
    #[error("cannot start {what}")]
    Thread {
        what: &'static str,
        source: io::Error,
    },
}

/// Why a lazy disk cannot grow (the control socket's `resize`); nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// The new area would show the image's end, cut off at start.
    #[error(
        "the image {source_name} holds {bytes} bytes, more than the {disk_bytes}-byte disk: the \
         new area must not show its cut-off end (a lazy disk grows only past its image)"
    )]
    ImageLarger {
        source_name: String,
        bytes: u64,
        disk_bytes: u64,
    },
    #[error("{need} stripes are more than this backend's table holds ({max}); restart it first")]
    TooManyStripes { need: u64, max: usize },
    /// The metadata is a block device too small for the new stripe count.
    #[error(
        "metadata_path: {path} is a {bytes}-byte block device, {stripes} stripes need \
         {need_bytes} bytes of metadata: grow it first"
    )]
    MetadataDeviceTooSmall {
        path: PathBuf,
        bytes: u64,
        stripes: u64,
        need_bytes: u64,
    },
    #[error("metadata_path: cannot grow the metadata {path}: {error}")]
    Metadata { path: PathBuf, error: io::Error },
}
