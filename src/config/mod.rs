//! Backend configuration: the YAML `Options` of the seed, validated at start-up.
//!
//! Every error names the offending field so an operator can fix the file without reading code,
//! and none repeats a value from the file (it may hold keys): parse errors go through
//! [`crate::sys::yaml::describe`].
//!
//! - this file: the fields, their limits and defaults, loading and parsing;
//! - `bounded`: integer fields checked against their range at parse time;
//! - `validate`: ranges and relations serde cannot check, legacy fields, `cpus`;
//! - `lazy`: the lazy-fetch and remote fields, and the lazy layer's options built from them;
//! - `files`: no two fields naming one file;
//! - `socket`: `socket_mode` and `socket_group`;
//! - `stripe`: `stripe_server`, the `ubiblk://` source's PSK, `danger_zone`.
//!
//! The limits of `qos:` belong to the QoS layer ([`crate::block::QosLimits`]).

mod bounded;
mod files;
mod lazy;
mod socket;
mod stripe;
mod validate;

pub use crate::block::{QosInvalid, QosLimits};
pub use crate::stripe::tls::PskSpec;
pub use crate::vhost::MAX_NUM_QUEUES;
pub use files::{file_url_path, same_file};
pub use stripe::{DangerZone, StripeServerOptions};

use serde::de::Deserializer;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

use crate::block::QOS_PATHS;

/// Longest device id the virtio-blk GET_ID request can carry.
pub const DEVICE_ID_LEN: usize = 20;
/// Largest virtqueue size the split-ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Longest busy-polling window, in microseconds.
pub const MAX_POLL_QUEUE_TIMEOUT_US: u64 = 1_000_000;
/// Largest request (`seg_size_max * seg_count_max`): requests are buffered in memory.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// The fields of the config file, as serde names them (for error messages).
pub const FIELDS: &[&str] = &[
    "path",
    "image_path",
    "metadata_path",
    "socket",
    "num_queues",
    "queue_size",
    "seg_size_max",
    "seg_count_max",
    "poll_queue_timeout_us",
    "skip_sync",
    "copy_on_read",
    "encryption_key",
    "io_debug_path",
    "device_id",
    "readonly",
    "autofetch",
    "autofetch_mib_per_sec",
    "control_socket",
    "socket_mode",
    "socket_group",
    "image_url",
    "archive_url",
    "fetch_connections",
    "fetch_timeout_secs",
    "fetch_retry_secs",
    "s3_endpoint",
    "s3_region",
    "s3_profile",
    "qos",
    "cpus",
    "write_through",
    "track_written",
    "direct_io",
    "handover_wait_secs",
    "standby",
    "stripe_server",
    "psk_identity",
    "psk_file",
    "danger_zone",
];

/// Fields the reference had at some point that are refused, and why: an unknown-field error
/// naming one of them says so.
const REFUSED_LEGACY_FIELDS: &[(&str, &str)] = &[(
    "sync_io",
    "a pre-v0.2 development name of write_through; use `write_through: true`",
)];

/// Most CPUs a `cpus` entry can name (the size of a `cpu_set_t`).
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// Most concurrent stripe fetches (`fetch_connections`).
pub const MAX_FETCH_CONNECTIONS: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is the source, printed after this message in the error chain.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A field of `qos:`.
    #[error("config field `qos.{}`: {}", .0.field, .0.problem)]
    Qos(QosInvalid),
    #[error("config field `{field}`: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    /// Two fields name one file (compared as files: hard links, symbolic links and other
    /// spellings of one path included).
    #[error("{field}: {path} is the same file as {other_field} ({other})")]
    SameFile {
        field: &'static str,
        path: PathBuf,
        other_field: &'static str,
        other: PathBuf,
    },
}

fn field_err(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        problem: problem.into(),
    }
}

/// The YAML file as written by the user. Field names are the interface; do not rename.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Options {
    pub path: PathBuf,
    #[serde(default)]
    pub image_path: Option<PathBuf>,
    #[serde(default)]
    pub metadata_path: Option<PathBuf>,
    pub socket: PathBuf,
    #[serde(
        default = "default_num_queues",
        deserialize_with = "bounded::num_queues"
    )]
    pub num_queues: u16,
    #[serde(
        default = "default_queue_size",
        deserialize_with = "bounded::queue_size"
    )]
    pub queue_size: u16,
    #[serde(
        default = "default_seg_size_max",
        deserialize_with = "bounded::seg_size_max"
    )]
    pub seg_size_max: u32,
    #[serde(
        default = "default_seg_count_max",
        deserialize_with = "bounded::seg_count_max"
    )]
    pub seg_count_max: u32,
    #[serde(
        default = "default_poll_queue_timeout_us",
        deserialize_with = "bounded::poll_queue_timeout_us"
    )]
    pub poll_queue_timeout_us: u64,
    #[serde(default)]
    pub skip_sync: bool,
    #[serde(default)]
    pub copy_on_read: bool,
    #[serde(default)]
    pub encryption_key: Option<KeyEntries>,
    #[serde(default)]
    pub io_debug_path: Option<PathBuf>,
    #[serde(default = "default_device_id")]
    pub device_id: String,
    /// Not in the reference tools: offer VIRTIO_BLK_F_RO and reject writes.
    #[serde(default)]
    pub readonly: bool,
    /// Not in the reference tools: copy every stripe from the image in the background.
    #[serde(default)]
    pub autofetch: bool,
    /// Not in the reference tools: limit background fetching to this many MiB/s.
    #[serde(default, deserialize_with = "bounded::autofetch_mib_per_sec")]
    pub autofetch_mib_per_sec: Option<u32>,
    /// Not in the reference tools: unix socket answering `status` with lazy-fetch progress.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Not in the reference tools: the vhost socket's permission bits, octal (`0660`); 0600
    /// without it. Kept as written: an unquoted `0660` is read as the digits it shows.
    #[serde(default)]
    pub socket_mode: Option<String>,
    /// Not in the reference tools: the vhost socket's group, a name or a numeric gid.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Not in the reference tools: lazy fetch from `http://`, `https://` or `s3://bucket/key`
    /// instead of `image_path`.
    #[serde(default)]
    pub image_url: Option<String>,
    /// Not in the reference tools: lazy fetch from a disk archive (`s3://bucket/prefix` or
    /// `file:///dir`) written by the `archive` tool.
    #[serde(default)]
    pub archive_url: Option<String>,
    /// Not in the reference tools: concurrent stripe fetches (16 for remote sources, 4 for
    /// `image_path` without it).
    #[serde(default, deserialize_with = "bounded::fetch_connections")]
    pub fetch_connections: Option<u16>,
    /// Not in the reference tools: how long one attempt to fetch a stripe from a remote
    /// source may take, in seconds (10 without it).
    #[serde(default, deserialize_with = "bounded::fetch_timeout_secs")]
    pub fetch_timeout_secs: Option<u32>,
    /// Not in the reference tools: how long a remote fetch is retried before the requests
    /// waiting for it fail, in seconds (30 without it; 0: no retries).
    #[serde(default, deserialize_with = "bounded::fetch_retry_secs")]
    pub fetch_retry_secs: Option<u32>,
    /// Not in the reference tools: overrides of the S3 endpoint URL, region and profile the
    /// standard AWS environment and files give.
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_profile: Option<String>,
    /// Not in the reference tools: IOPS and bandwidth limits (QEMU's throttling); the control
    /// socket's `set-qos` changes them live.
    #[serde(default)]
    pub qos: Option<QosLimits>,
    /// The reference's v0.2: pin queue `i`'s worker thread to CPU `cpus[i]` (one entry per
    /// queue; [`Options::check_cpus`] checks them against the process's allowed CPUs).
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// The reference's v0.2: report a write-through cache (config space `writeback` = 0) and
    /// make every write durable when it completes (RWF_DSYNC); FLUSH then costs nothing.
    #[serde(default)]
    pub write_through: bool,
    /// The reference's v0.2 sets the metadata's WRITTEN bit only with `track_written: true`;
    /// ours always sets it (it costs nothing on the write path and readers ignore it), so the
    /// value is accepted and has no effect.
    #[serde(default)]
    pub track_written: Option<bool>,
    /// The reference's v0.1 (`O_DIRECT` on or off); ignored, with a warning.
    #[serde(default)]
    pub direct_io: Option<bool>,
    /// Not in the reference tools: how long a backend whose guest starts its rings waits for
    /// another backend holding the disk to hand it over (live migration), in seconds (30
    /// without it); then its requests fail.
    #[serde(default, deserialize_with = "bounded::handover_wait_secs")]
    pub handover_wait_secs: Option<u32>,
    /// Not in the reference tools: start standing by (serve nothing, fetch nothing) until
    /// the VMM starts the rings: the destination of a live migration without shared storage
    /// (post-copy, `image_url: ubiblk://` the source host). With shared storage a backend
    /// stands by on its own while the other holds the disk's lock.
    #[serde(default)]
    pub standby: bool,
    /// Not in the reference's config (its `remote-stripe-server` is a separate binary): serve
    /// this disk's stripes to another host (ubiblk v0.5's remote stripe protocol).
    #[serde(default)]
    pub stripe_server: Option<StripeServerOptions>,
    /// With `image_url: ubiblk://HOST:PORT`: the PSK identity and the file holding the key.
    #[serde(default)]
    pub psk_identity: Option<String>,
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// The reference v0.5's overrides of safety rules (`allow_unencrypted_connection`).
    #[serde(default)]
    pub danger_zone: Option<DangerZone>,
}

/// `encryption_key`: the entries as written (base64, maybe KEK-wrapped). Zeroed when dropped,
/// and `Debug` does not print them.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntries(Zeroizing<Vec<String>>);

impl KeyEntries {
    pub fn new(entries: Vec<String>) -> Self {
        KeyEntries(Zeroizing::new(entries))
    }
}

impl std::ops::Deref for KeyEntries {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Debug for KeyEntries {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "KeyEntries({} entries, not shown)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for KeyEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(KeyEntries::new)
    }
}

const SUN_PATH_TOO_LONG: &str = "path is longer than the 107 bytes a unix socket address can hold";

fn default_num_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}
fn default_seg_size_max() -> u32 {
    65536
}
fn default_seg_count_max() -> u32 {
    4
}
fn default_poll_queue_timeout_us() -> u64 {
    500
}
fn default_device_id() -> String {
    "ubiblk".to_string()
}

impl Options {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
        let opts = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(opts)
    }

    /// Parses and validates YAML text (no file-system checks on `path`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let opts: Options = serde_yaml_ng::from_str(text).map_err(|e| {
            let names: Vec<&str> = FIELDS.iter().chain(QOS_PATHS).copied().collect();
            let mut message = crate::sys::yaml::describe(&e, &names);
            if let Some((name, why)) = refused_legacy_field(&e) {
                message = format!("{message}; `{name}` is a legacy field: {why}");
            }
            ConfigError::Parse {
                path: PathBuf::new(),
                message,
            }
        })?;
        opts.validate()?;
        Ok(opts)
    }
}

/// The refused legacy field an unknown-field error names, with why it is refused.
fn refused_legacy_field(e: &serde_yaml_ng::Error) -> Option<(&'static str, &'static str)> {
    let text = e.to_string();
    let name = text.strip_prefix("unknown field `")?.split('`').next()?;
    REFUSED_LEGACY_FIELDS
        .iter()
        .copied()
        .find(|&(legacy, _)| legacy == name)
}

#[cfg(test)]
mod tests;
