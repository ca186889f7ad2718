//! What lazy fetch copies from: the [`StripeSource`] trait, and [`open`], which picks the
//! implementation the configuration names.

mod archive;
mod file;
mod http;
mod identity;
mod s3;
pub mod stripe;
mod unopened;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use archive::ArchiveSource;
pub use file::{file_identity, FileSource};
pub use http::RangeSource;
pub use identity::{SourceIdentity, SourceKind};
pub use stripe::StripeServerSource;
pub use unopened::Unopened;

use super::{Error, LazyOptions};
use crate::block::{IoChannel, Notifier};
use crate::remote::retry::Outage;

/// The content a lazy disk is filled from (the base image), read-only.
///
/// A new kind of source (HTTP range GETs, S3, an archive member, ...) is one module that
/// implements this trait plus one arm in [`open`] mapping its configuration to it. It
/// implements:
///
/// - [`bytes`](StripeSource::bytes): its size, fixed for the life of the backend. It need not
///   be a multiple of 512 or of the stripe size; the disk reads as zeros past it, and a
///   source larger than the disk is cut to the disk's size (with a warning) or refused, as
///   [`may_exceed_disk`](StripeSource::may_exceed_disk) says.
/// - [`read_at`](StripeSource::read_at): blocking reads of byte ranges for the fetcher
///   threads (several at once, from different threads), one stripe (32 KiB .. 32 MiB) at a
///   time. The layer never asks for ranges wholly past the end (it writes zeros there itself);
///   a range crossing the end is zero-filled past it. Errors are per fetch: the waiting
///   requests fail with EIO, the stripe stays unfetched and a later request retries, so a
///   transient failure (a dropped connection) needs no retry loop here. The same call reads
///   the partial last sector once at start-up (when `bytes` is not a multiple of 512).
/// - [`read_through`](StripeSource::read_through), optional: an asynchronous channel that
///   serves guest reads of unfetched stripes (`copy_on_read: false`) straight from the source,
///   without fetching. Without it (the default), such reads wait for their stripes to be
///   fetched, exactly as with `copy_on_read: true`; implement it only where per-request
///   reads are cheap (a local file, not a remote object).
/// - [`read_now`](StripeSource::read_now), optional: one bounded attempt at a whole stripe,
///   for a queue's worker that fetches a lone demand read itself (`LazyChannel::fetch_here`).
///   Implement it where most of a near source's read is the hops between threads (a stripe
///   server); without it (the default) the fetcher pool reads every stripe.
/// - [`Display`](fmt::Display): how logs name it (a path, a URL).
/// - [`identity`](StripeSource::identity): what tells this version of its content from any
///   other (an ETag, a manifest's MAC, a file's mtime and inode), taken at open. The layer
///   pins it next to the metadata when the disk starts filling and refuses a restart on a
///   source whose identity differs (docs/lazy-fetch.md, "Restarts and a changed source").
/// - [`may_exceed_disk`](StripeSource::may_exceed_disk): whether a source larger than the
///   disk is cut to the disk's size (an image) or refused (an archived disk, whose end would
///   be lost).
///
/// Opening errors belong in [`Error`], with a variant naming the configuration field.
pub trait StripeSource: fmt::Display + Send + Sync {
    /// Size in bytes.
    fn bytes(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`; past the end of the source, with zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// A new read-through channel for one queue, whose completions signal `notify` (an
    /// eventfd the queue's worker already watches). It serves only [`IoOp::Read`] of whole
    /// sectors lying inside the source's whole sectors (the layer zero-fills the rest and
    /// serves the partial last sector itself), with buffers from the layer's pool.
    /// `None`: the source has no read-through.
    ///
    /// [`IoOp::Read`]: crate::block::IoOp::Read
    fn read_through(&self, notify: Notifier) -> Option<io::Result<Box<dyn IoChannel>>> {
        let _ = notify;
        None
    }

    /// Reads the whole stripe at `offset` (`buf` is exactly a stripe long) on the calling
    /// thread, a queue's worker that has nothing else in flight: one attempt, over a connection
    /// already open, that gives up after `within` (the worker's other requests wait meanwhile).
    /// `None`: not attempted (the default; or no idle connection at hand): the fetcher pool
    /// reads the stripe, with its retries.
    fn read_now(&self, offset: u64, buf: &mut [u8], within: Duration) -> Option<io::Result<()>> {
        let _ = (offset, buf, within);
        None
    }

    /// Attempts that failed and were retried since start (remote sources), for `status`.
    fn retries(&self) -> u64 {
        0
    }

    /// This version of the source, as taken at open (see [`SourceIdentity`]).
    fn identity(&self) -> SourceIdentity;

    /// True if a source larger than the disk is served cut to the disk's size (with a
    /// warning); false if it is refused at start.
    fn may_exceed_disk(&self) -> bool {
        true
    }

    /// `Some` while the source is known down (remote sources: see
    /// [`crate::remote::retry`]): requests for unfetched stripes then fail at once, except
    /// the probes, and autofetch pauses.
    fn outage(&self) -> Option<Outage> {
        None
    }
}

/// Where a lazy disk's stripes come from: the configuration field that names the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `image_path`: a local file or block device.
    File(PathBuf),
    /// `image_url`: `http://`, `https://` or `s3://bucket/key`.
    Url(String),
    /// `archive_url`: a disk archive (`s3://bucket/prefix`, `file:///dir`).
    Archive(String),
    /// `image_url: ubiblk://HOST:PORT`: another host's stripe server, with its PSK (`None`:
    /// plaintext, the `danger_zone` opt-in).
    StripeServer {
        url: String,
        psk: Option<crate::stripe::tls::PskSpec>,
    },
}

impl SourceSpec {
    /// True for sources reached over the network.
    pub fn is_remote(&self) -> bool {
        match self {
            SourceSpec::File(_) => false,
            SourceSpec::Url(_) | SourceSpec::StripeServer { .. } => true,
            SourceSpec::Archive(url) => !url.starts_with("file://"),
        }
    }
}

/// Opens the source `opts` configures; `ring_entries` sizes read-through channels' rings.
pub fn open(opts: &LazyOptions, ring_entries: u32) -> Result<Arc<dyn StripeSource>, Error> {
    match &opts.source {
        SourceSpec::File(path) => Ok(Arc::new(FileSource::open(path, ring_entries)?)),
        SourceSpec::Url(url) => {
            let opened = if url.starts_with("s3://") {
                s3::open(url, &opts.remote)
            } else {
                http::open(url, &opts.remote)
            };
            let source = opened.map_err(|source| Error::OpenUrl {
                url: crate::remote::http::redact(url).to_string(),
                source,
            })?;
            Ok(Arc::new(source))
        }
        SourceSpec::StripeServer { url, psk } => {
            let source =
                stripe::open(url, psk.as_ref(), &opts.remote).map_err(|source| Error::OpenUrl {
                    url: url.clone(),
                    source,
                })?;
            Ok(Arc::new(source))
        }
        SourceSpec::Archive(url) => Ok(Arc::new(ArchiveSource::open(
            url,
            &opts.remote,
            opts.archive_kek.as_deref(),
        )?)),
    }
}
