//! Progress, as the control socket's `status` command reports it (docs/lazy-fetch.md).

use serde::Serialize;

/// Serialized in this field order as one line of JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LazyStatus {
    pub stripes: usize,
    pub fetched: usize,
    pub written: usize,
    /// Stripes queued for or being fetched.
    pub fetching: usize,
    pub fetch_errors: u64,
    /// Every stripe fetched: the disk no longer depends on the image.
    pub complete: bool,
    pub stripe_bytes: u64,
    pub copy_on_read: bool,
    pub autofetch: bool,
}
