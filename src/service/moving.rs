//! `stripe_server:`: what the stripe server shows of this disk ([`Layout`]) and its start.
//!
//! The server reads the *logical* disk: the layer above encryption and lazy fetch (so it
//! serves plaintext), below the debug log and QoS (a copy is neither the guest's I/O nor
//! limited as it is). A lazy disk's unfetched stripes are read straight from the disk's own
//! source and not stored: serving never writes the disk, which may have been handed over to
//! the destination's guest (post-copy live migration) and must stay as it was then.

use std::io;
use std::sync::Arc;

use crate::block::BlockDevice;
use crate::config::Options;
use crate::lazy::metadata::{DEFAULT_SHIFT, FETCHED as LAZY_FETCHED, WRITTEN as LAZY_WRITTEN};
use crate::lazy::LazyDevice;
use crate::stripe::protocol::{FETCHED, HAS_SOURCE, WRITTEN};
use crate::stripe::server::{self, Layout, ServerError, StripeServer};
use crate::stripe::{Geometry, MoveGate, Psk};

/// A disk without lazy fetch: every stripe holds data (nothing records which were written),
/// stripes of 1 MiB (the reference's default), as many as cover the disk's current size.
struct PlainLayout(Arc<dyn BlockDevice>);

impl PlainLayout {
    fn count(&self) -> u64 {
        self.0.sectors().div_ceil(1 << DEFAULT_SHIFT)
    }
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
/// the source covers it, and is zeros (no data) past the source's end.
struct LazyLayout(Arc<LazyDevice>);

impl Layout for LazyLayout {
    fn geometry(&self) -> Geometry {
        let map = self.0.stripe_map();
        let flags = (map.bits.iter().enumerate())
            .map(|(i, &b)| lazy_flags(b, i < map.source_stripes))
            .collect();
        Geometry {
            shift: map.shift,
            flags,
        }
    }

    fn stripe(&self, index: u64) -> Option<(u8, u8)> {
        let (shift, bits, covered) = self.0.stripe_state(usize::try_from(index).ok()?)?;
        Some((shift, lazy_flags(bits, covered)))
    }

    fn read_elsewhere(&self, index: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        self.0.read_unfetched(usize::try_from(index).ok()?, buf)
    }
}

/// Starts the stripe server `opts.stripe_server` asks for (if any), serving `logical`.
pub fn start(
    opts: &Options,
    logical: Arc<dyn BlockDevice>,
    lazy: Option<Arc<LazyDevice>>,
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
    let layout: Arc<dyn Layout> = match lazy {
        Some(l) => Arc::new(LazyLayout(l)),
        None => Arc::new(PlainLayout(logical.clone())),
    };
    server::start(&cfg.listen, psk, logical, layout, gate).map(Some)
}
