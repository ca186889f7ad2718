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
    /// The source as logs name it (a path, a URL without its query).
    pub source: String,
    /// Remote attempts that failed and were retried (the fetch itself may have succeeded).
    pub fetch_retries: u64,
    /// The last failed fetch's error, `null` if none failed since start.
    pub last_fetch_error: Option<String>,
    /// The source is known down: requests for unfetched stripes fail at once (EIO) but for
    /// a probe now and then, and autofetch pauses.
    pub source_down: bool,
    /// Since when (Unix time, seconds), `null` while it is up.
    pub source_down_since: Option<u64>,
}
