//! The source of a disk that was complete when the backend started: not opened. Every stripe
//! is on the disk, and stays there (a resize adds fetched stripes), so nothing is ever read
//! from it; a remote source whose host is gone (a post-copy migration's old host, an image
//! deleted once copied) must not keep a complete disk from starting, or delay it by a retry
//! budget.

use std::fmt;
use std::io;

use super::{SourceIdentity, StripeSource};
use crate::block::SECTOR_SIZE;

pub struct Unopened {
    name: String,
    identity: SourceIdentity,
}

impl Unopened {
    /// `identity`: the one pinned for the disk (its size is what the disk's geometry shows as
    /// covered), or one of the configured location covering `disk_bytes`.
    pub fn new(name: String, identity: SourceIdentity) -> Self {
        Unopened { name, identity }
    }
}

impl fmt::Display for Unopened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl StripeSource for Unopened {
    /// Whole sectors only: the layer reads a partial last sector at start, which it never
    /// needs on a complete disk.
    fn bytes(&self) -> u64 {
        self.identity.bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64
    }

    fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other(format!(
            "{}: not opened (the disk was complete at start)",
            self.name
        )))
    }

    fn identity(&self) -> SourceIdentity {
        self.identity.clone()
    }
}
