//! How remote sources are reached: connections, timeouts, retries and S3 overrides (the
//! config's `fetch_*` and `s3_*` fields), shared by image URLs and archives.

use std::time::Duration;

/// How remote sources are reached: the `fetch_*` and `s3_*` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Connections (and fetcher threads) at once.
    pub connections: usize,
    /// Longest single attempt (connect, request, whole response).
    pub attempt_timeout: Duration,
    /// How long one fetch is retried before it fails; no attempt starts after it.
    pub retry_budget: Duration,
    /// S3 settings that override the AWS environment and files.
    pub s3: S3Overrides,
}

/// `s3_endpoint`, `s3_region`, `s3_profile`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Overrides {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
}

/// Defaults of the remote fields.
pub const DEFAULT_FETCH_CONNECTIONS: usize = 16;
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A guest request waits at most about this long for a fetch during an outage: well before
/// a Linux guest's hung-task warning (120 s).
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(30);

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connections: DEFAULT_FETCH_CONNECTIONS,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            s3: S3Overrides::default(),
        }
    }
}
