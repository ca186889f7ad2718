//! `stripe_server:`: what the stripe server shows of this disk ([`Layout`]) and its start.
//!
//! The server reads the *logical* disk: the layer above encryption and lazy fetch (so it
//! serves plaintext), below the debug log and QoS (a copy is neither the guest's I/O nor
//! limited as it is). A lazy disk's unfetched stripes are read straight from the disk's own
//! source and not stored: serving never writes the disk, which may have been handed over to
//! the destination's guest (post-copy live migration) and must stay as it was then.

use std::fs::File;
use std::io;
use std::sync::Arc;

use log::info;

use crate::block::{BlockDevice, SECTOR_SHIFT};
use crate::config::Options;
use crate::lazy::metadata::{DEFAULT_SHIFT, FETCHED as LAZY_FETCHED, WRITTEN as LAZY_WRITTEN};
use crate::lazy::LazyDevice;
use crate::stripe::protocol::{FETCHED, HAS_SOURCE, WRITTEN};
use crate::stripe::server::{self, Layout, ServerError, StripeServer};
use crate::stripe::{Geometry, MoveGate, Psk};
use crate::sys::zerocopy;

/// A disk without lazy fetch: every stripe holds data (nothing records which were written),
/// stripes of 1 MiB (the reference's default), as many as cover the disk's current size.
/// `file`: the disk's file opened without O_DIRECT, where its bytes are what is served (not
/// encrypted) and the transport is plaintext (see [`Layout::in_file`]).
struct PlainLayout {
    device: Arc<dyn BlockDevice>,
    file: Option<File>,
}

impl PlainLayout {
    fn count(&self) -> u64 {
        self.device.sectors().div_ceil(1 << DEFAULT_SHIFT)
    }
}

/// Stripe `index`'s byte offset in a disk file with stripes of 2^`shift` sectors.
fn stripe_offset(index: u64, shift: u8) -> Option<u64> {
    index.checked_mul(1u64 << (u32::from(shift) + SECTOR_SHIFT))
}

impl Layout for PlainLayout {
    fn geometry(&self) -> Geometry {
        Geometry {
            shift: DEFAULT_SHIFT,
            flags: vec![WRITTEN; usize::try_from(self.count()).unwrap_or(0)],
        }
    }

    fn stripe(&self, index: u64) -> Option<(u8, u8)> {
        (index < self.count()).then_some((DEFAULT_SHIFT, WRITTEN))
    }

    fn in_file(&self, index: u64) -> Option<(&File, u64)> {
        Some((self.file.as_ref()?, stripe_offset(index, DEFAULT_SHIFT)?))
    }
}

/// The wire flags of a lazy stripe: its bits, and whether the source covers it.
fn lazy_flags(bits: u8, covered: bool) -> u8 {
    let mut f = 0;
    if bits & LAZY_FETCHED != 0 {
        f |= FETCHED | HAS_SOURCE;
    } else if covered {
        f |= HAS_SOURCE;
    }
    if bits & LAZY_WRITTEN != 0 {
        f |= WRITTEN;
    }
    f
}

/// A lazy disk: a fetched stripe is data; an unfetched one is read through the source when
/// the source covers it, and is zeros (no data) past the source's end. `file` as
/// [`PlainLayout`]'s: a fetched stripe is on the disk as it is served.
struct LazyLayout {
    lazy: Arc<LazyDevice>,
    file: Option<File>,
}

impl Layout for LazyLayout {
    fn geometry(&self) -> Geometry {
        let map = self.lazy.stripe_map();
        let flags = (map.bits.iter().enumerate())
            .map(|(i, &b)| lazy_flags(b, i < map.source_stripes))
            .collect();
        Geometry {
            shift: map.shift,
            flags,
        }
    }

    fn stripe(&self, index: u64) -> Option<(u8, u8)> {
        let (shift, bits, covered) = self.lazy.stripe_state(usize::try_from(index).ok()?)?;
        Some((shift, lazy_flags(bits, covered)))
    }

    fn read_elsewhere(&self, index: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.lazy.read_unfetched(usize::try_from(index).ok()?, buf)
    }

    fn in_file(&self, index: u64) -> Option<(&File, u64)> {
        let file = self.file.as_ref()?;
        let (shift, bits, _) = self.lazy.stripe_state(usize::try_from(index).ok()?)?;
        // Once fetched, a stripe's bytes are on the disk before the bit is set, and stay.
        (bits & LAZY_FETCHED != 0).then_some((file, stripe_offset(index, shift)?))
    }
}

/// Starts the stripe server `opts.stripe_server` asks for (if any), serving `logical`.
/// `plain_file`: the disk's file when its bytes are the logical disk's (not encrypted).
pub fn start(
    opts: &Options,
    logical: Arc<dyn BlockDevice>,
    lazy: Option<Arc<LazyDevice>>,
    plain_file: Option<&File>,
    gate: Arc<MoveGate>,
) -> Result<Option<StripeServer>, ServerError> {
    let Some(cfg) = &opts.stripe_server else {
        return Ok(None);
    };
    let psk = match (&cfg.psk_identity, &cfg.psk_file) {
        (Some(identity), Some(file)) => Some(Arc::new(Psk::load(identity, file)?)),
        // Validation allows this only with the danger_zone opt-in.
        _ => None,
    };
    // Plaintext connections send stripes straight from the page cache (TLS encrypts them in
    // user space anyway). Reopened without O_DIRECT, from which `sendfile` gains nothing.
    let file = plain_file.filter(|_| psk.is_none()).and_then(|f| {
        zerocopy::reopen_buffered(f)
            .map_err(|e| info!("stripe server: no sendfile (reopening the disk: {e})"))
            .ok()
    });
    if file.is_some() {
        info!("stripe server: stripes on the disk go out with sendfile (zero-copy)");
    }
    let layout: Arc<dyn Layout> = match lazy {
        Some(lazy) => Arc::new(LazyLayout { lazy, file }),
        None => Arc::new(PlainLayout {
            device: logical.clone(),
            file,
        }),
    };
    server::start(&cfg.listen, psk, logical, layout, gate).map(Some)
}
