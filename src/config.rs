//! Backend configuration: the YAML `Options` of the seed, validated at start-up.
//!
//! Every error names the offending field so an operator can fix the file without reading code,
//! and none repeats a value from the file (it may hold keys): parse errors go through
//! [`crate::yaml::describe`].

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Longest device id the virtio-blk GET_ID request can carry.
pub const DEVICE_ID_LEN: usize = 20;
/// Largest virtqueue size the split-ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most virtqueues. Each queue has its own worker thread, and vhost-user-backend gives each thread its queues
/// as a bit mask in a u64: queue 64 and up cannot be assigned (they used to alias queues 0..).
pub const MAX_NUM_QUEUES: u16 = 64;
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
];

/// Fields the reference had at some point that are refused, and why: an unknown-field error
/// naming one of them says so.
const REFUSED_LEGACY_FIELDS: &[(&str, &str)] = &[(
    "sync_io",
    "a pre-v0.2 development name of write_through; use `write_through: true`",
)];

/// Most CPUs a `cpus` entry can name (the size of a `cpu_set_t`).
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// The fields of `qos:` (QEMU's throttle options in snake_case), in [`QosLimits`] order.
pub const QOS_FIELDS: &[&str] = &[
    "iops_total",
    "iops_total_max",
    "iops_total_max_length",
    "iops_read",
    "iops_read_max",
    "iops_read_max_length",
    "iops_write",
    "iops_write_max",
    "iops_write_max_length",
    "bps_total",
    "bps_total_max",
    "bps_total_max_length",
    "bps_read",
    "bps_read_max",
    "bps_read_max_length",
    "bps_write",
    "bps_write_max",
    "bps_write_max_length",
];

/// [`QOS_FIELDS`] as paths from the top of the file, for parse errors inside `qos:`.
const QOS_PATHS: &[&str] = &[
    "qos.iops_total",
    "qos.iops_total_max",
    "qos.iops_total_max_length",
    "qos.iops_read",
    "qos.iops_read_max",
    "qos.iops_read_max_length",
    "qos.iops_write",
    "qos.iops_write_max",
    "qos.iops_write_max_length",
    "qos.bps_total",
    "qos.bps_total_max",
    "qos.bps_total_max_length",
    "qos.bps_read",
    "qos.bps_read_max",
    "qos.bps_read_max_length",
    "qos.bps_write",
    "qos.bps_write_max",
    "qos.bps_write_max_length",
];

/// Largest rate or burst (QEMU's `THROTTLE_VALUE_MAX`).
pub const QOS_VALUE_MAX: u64 = 1_000_000_000_000_000;
/// Longest burst (`*_max_length`), in seconds: a day.
pub const QOS_MAX_LENGTH: u64 = 86_400;

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
    #[serde(default = "default_num_queues", deserialize_with = "num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size", deserialize_with = "queue_size")]
    pub queue_size: u16,
    #[serde(default = "default_seg_size_max", deserialize_with = "seg_size_max")]
    pub seg_size_max: u32,
    #[serde(default = "default_seg_count_max", deserialize_with = "seg_count_max")]
    pub seg_count_max: u32,
    #[serde(
        default = "default_poll_queue_timeout_us",
        deserialize_with = "poll_queue_timeout_us"
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
    #[serde(default, deserialize_with = "autofetch_mib_per_sec")]
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
    #[serde(default, deserialize_with = "fetch_connections")]
    pub fetch_connections: Option<u16>,
    /// Not in the reference tools: how long one attempt to fetch a stripe from a remote
    /// source may take, in seconds (10 without it).
    #[serde(default, deserialize_with = "fetch_timeout_secs")]
    pub fetch_timeout_secs: Option<u32>,
    /// Not in the reference tools: how long a remote fetch is retried before the requests
    /// waiting for it fail, in seconds (30 without it; 0: no retries).
    #[serde(default, deserialize_with = "fetch_retry_secs")]
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
}

/// `qos:`: per-disk I/O limits with QEMU's names and meaning (docs/throttle.txt in QEMU). Each
/// group is a rate (`iops_*` requests or `bps_*` bytes per second), its burst rate (`_max`)
/// and how many seconds the burst may last (`_max_length`, 1 without it). `None` or 0: no
/// limit. `total` counts reads and writes together; it cannot be combined with the `read` /
/// `write` limits of the same kind.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    #[serde(default)]
    pub iops_total: Option<u64>,
    #[serde(default)]
    pub iops_total_max: Option<u64>,
    #[serde(default)]
    pub iops_total_max_length: Option<u64>,
    #[serde(default)]
    pub iops_read: Option<u64>,
    #[serde(default)]
    pub iops_read_max: Option<u64>,
    #[serde(default)]
    pub iops_read_max_length: Option<u64>,
    #[serde(default)]
    pub iops_write: Option<u64>,
    #[serde(default)]
    pub iops_write_max: Option<u64>,
    #[serde(default)]
    pub iops_write_max_length: Option<u64>,
    #[serde(default)]
    pub bps_total: Option<u64>,
    #[serde(default)]
    pub bps_total_max: Option<u64>,
    #[serde(default)]
    pub bps_total_max_length: Option<u64>,
    #[serde(default)]
    pub bps_read: Option<u64>,
    #[serde(default)]
    pub bps_read_max: Option<u64>,
    #[serde(default)]
    pub bps_read_max_length: Option<u64>,
    #[serde(default)]
    pub bps_write: Option<u64>,
    #[serde(default)]
    pub bps_write_max: Option<u64>,
    #[serde(default)]
    pub bps_write_max_length: Option<u64>,
}

/// One limit group of [`QosLimits`]: rate, burst rate, burst seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosGroup {
    pub avg: Option<u64>,
    pub max: Option<u64>,
    pub max_length: Option<u64>,
}

/// Which limit group: QEMU's bucket order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosKind {
    BpsTotal,
    BpsRead,
    BpsWrite,
    IopsTotal,
    IopsRead,
    IopsWrite,
}

impl QosKind {
    pub const ALL: [QosKind; 6] = [
        QosKind::BpsTotal,
        QosKind::BpsRead,
        QosKind::BpsWrite,
        QosKind::IopsTotal,
        QosKind::IopsRead,
        QosKind::IopsWrite,
    ];

    /// The group's three field names: rate, burst, burst length.
    pub fn names(self) -> [&'static str; 3] {
        let i = match self {
            QosKind::IopsTotal => 0,
            QosKind::IopsRead => 1,
            QosKind::IopsWrite => 2,
            QosKind::BpsTotal => 3,
            QosKind::BpsRead => 4,
            QosKind::BpsWrite => 5,
        };
        [
            QOS_FIELDS[3 * i],
            QOS_FIELDS[3 * i + 1],
            QOS_FIELDS[3 * i + 2],
        ]
    }

    pub fn is_bps(self) -> bool {
        matches!(
            self,
            QosKind::BpsTotal | QosKind::BpsRead | QosKind::BpsWrite
        )
    }
}

/// A `qos` field with a value the limits cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct QosInvalid {
    pub field: &'static str,
    pub problem: String,
}

fn qos_err(field: &'static str, problem: impl Into<String>) -> QosInvalid {
    QosInvalid {
        field,
        problem: problem.into(),
    }
}

impl QosLimits {
    pub fn group(&self, kind: QosKind) -> QosGroup {
        let (avg, max, max_length) = match kind {
            QosKind::IopsTotal => (
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            QosKind::IopsRead => (
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            QosKind::IopsWrite => (
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
            QosKind::BpsTotal => (
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            QosKind::BpsRead => (self.bps_read, self.bps_read_max, self.bps_read_max_length),
            QosKind::BpsWrite => (
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
        };
        QosGroup {
            avg,
            max,
            max_length,
        }
    }

    /// The same limits with QEMU's "0 is no limit" spelled as `None` (rates and bursts; a
    /// burst length of 0 is refused by [`QosLimits::validate`], not changed).
    pub fn normalized(mut self) -> Self {
        for v in [
            &mut self.iops_total,
            &mut self.iops_total_max,
            &mut self.iops_read,
            &mut self.iops_read_max,
            &mut self.iops_write,
            &mut self.iops_write_max,
            &mut self.bps_total,
            &mut self.bps_total_max,
            &mut self.bps_read,
            &mut self.bps_read_max,
            &mut self.bps_write,
            &mut self.bps_write_max,
        ] {
            if *v == Some(0) {
                *v = None;
            }
        }
        self
    }

    /// True when no rate is limited.
    pub fn is_unlimited(&self) -> bool {
        let n = self.normalized();
        QosKind::ALL.iter().all(|&k| n.group(k).avg.is_none())
    }

    /// QEMU's rules (`throttle_is_valid`), plus bandwidths of at least one sector a second
    /// and bursts of at most [`QOS_MAX_LENGTH`] seconds. The error names the field.
    pub fn validate(&self) -> Result<(), QosInvalid> {
        let n = self.normalized();
        for kind in QosKind::ALL {
            let [avg_name, max_name, len_name] = kind.names();
            let g = n.group(kind);
            for (v, name) in [(g.avg, avg_name), (g.max, max_name)] {
                let Some(v) = v else { continue };
                if v > QOS_VALUE_MAX {
                    return Err(qos_err(
                        name,
                        format!("must be at most {QOS_VALUE_MAX} (0 or null: no limit)"),
                    ));
                }
                if kind.is_bps() && v < 512 {
                    return Err(qos_err(
                        name,
                        "must be at least 512 bytes per second (0 or null: no limit)",
                    ));
                }
            }
            if let Some(max) = g.max {
                let Some(avg) = g.avg else {
                    return Err(qos_err(
                        max_name,
                        format!("needs {avg_name} (the rate it bursts above)"),
                    ));
                };
                if max < avg {
                    return Err(qos_err(
                        max_name,
                        format!("must not be lower than {avg_name}"),
                    ));
                }
            }
            if let Some(len) = g.max_length {
                if g.max.is_none() {
                    return Err(qos_err(
                        len_name,
                        format!("needs {max_name} (the burst it lasts)"),
                    ));
                }
                if !(1..=QOS_MAX_LENGTH).contains(&len) {
                    return Err(qos_err(len_name, range_problem(1, QOS_MAX_LENGTH)));
                }
            }
        }
        for (total, read, write) in [
            (QosKind::IopsTotal, QosKind::IopsRead, QosKind::IopsWrite),
            (QosKind::BpsTotal, QosKind::BpsRead, QosKind::BpsWrite),
        ] {
            let (t, r, w) = (n.group(total), n.group(read), n.group(write));
            for (i, (tv, rv, wv)) in [(t.avg, r.avg, w.avg), (t.max, r.max, w.max)]
                .into_iter()
                .enumerate()
            {
                if tv.is_some() && (rv.is_some() || wv.is_some()) {
                    let other = if rv.is_some() { read } else { write };
                    return Err(qos_err(
                        total.names()[i],
                        format!(
                            "cannot be combined with {} (a total limit or read/write limits)",
                            other.names()[i]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `socket_group`, resolved from its text: a gid, or a name looked up when the socket is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    Id(u32),
    Name(String),
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

/// How an out-of-range integer is reported, at parse time and by [`Options::validate`].
fn range_problem(lo: u64, hi: u64) -> String {
    format!("must be in {lo}..={hi}")
}

/// An integer field in `lo..=hi`: out of range (negative, too large for its type) is reported
/// with the range, where serde alone would say "expected u16".
fn ranged<'de, D, T>(d: D, lo: u64, hi: u64) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Range(u64, u64);
    impl Range {
        fn check<E: de::Error>(&self, v: Option<u64>) -> Result<u64, E> {
            v.filter(|v| (self.0..=self.1).contains(v))
                .ok_or_else(|| E::custom(range_problem(self.0, self.1)))
        }
    }
    impl Visitor<'_> for Range {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an integer in {}..={}", self.0, self.1)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            self.check(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
    }
    let v = d.deserialize_any(Range(lo, hi))?;
    T::try_from(v).map_err(|_| de::Error::custom(range_problem(lo, hi)))
}

fn num_queues<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 1, MAX_NUM_QUEUES.into())
}
fn queue_size<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 1, MAX_QUEUE_SIZE.into())
}
fn seg_size_max<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 512, MAX_REQUEST_BYTES)
}
fn seg_count_max<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 1, MAX_QUEUE_SIZE.into())
}
fn poll_queue_timeout_us<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 0, MAX_POLL_QUEUE_TIMEOUT_US)
}
/// An optional integer field in `lo..=hi` (`null` is the same as leaving it out).
fn opt_ranged<'de, D, T>(d: D, lo: u64, hi: u64) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Opt<T>(u64, u64, std::marker::PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an integer in {}..={}", self.0, self.1)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            ranged(d, self.0, self.1).map(Some)
        }
    }
    d.deserialize_option(Opt(lo, hi, std::marker::PhantomData))
}

fn autofetch_mib_per_sec<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 1, u32::MAX.into())
}
fn fetch_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    opt_ranged(d, 1, MAX_FETCH_CONNECTIONS.into())
}
fn fetch_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 1, 3600)
}
fn fetch_retry_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 0, 86400)
}

/// A URL field: one of `schemes`, something after `scheme://`, no user name or password (a
/// secret in the config would end up in logs; S3 credentials come from the AWS environment),
/// no control characters or spaces. The value is not repeated: a query may hold a signature.
fn check_url(field: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let expected = || {
        let list: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        field_err(field, format!("must start with {}", list.join(", ")))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(expected)?;
    if !schemes.contains(&scheme) {
        return Err(expected());
    }
    if rest.is_empty() || rest.starts_with('/') && scheme != "file" {
        return Err(field_err(field, "has no host or bucket after the scheme"));
    }
    if url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(field_err(field, "contains spaces or control characters"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(field_err(
            field,
            "must not contain a user name or password (S3 credentials come from the AWS \
             environment and files)",
        ));
    }
    Ok(())
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
            let mut message = crate::yaml::describe(&e, &names);
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

    /// Checks the values serde cannot: ranges, relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(field_err("path", "must not be empty"));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(field_err("socket", "must not be empty"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return Err(field_err("socket", SUN_PATH_TOO_LONG));
        }
        if !(1..=MAX_NUM_QUEUES).contains(&self.num_queues) {
            let problem = range_problem(1, MAX_NUM_QUEUES.into());
            return Err(field_err("num_queues", problem));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(field_err(
                "queue_size",
                format!("{} is not a power of two", self.queue_size),
            ));
        }
        if self.queue_size > MAX_QUEUE_SIZE {
            let problem = range_problem(1, MAX_QUEUE_SIZE.into());
            return Err(field_err("queue_size", problem));
        }
        if self.seg_size_max < 512 || !self.seg_size_max.is_multiple_of(512) {
            return Err(field_err(
                "seg_size_max",
                format!("{} is not a positive multiple of 512", self.seg_size_max),
            ));
        }
        if self.seg_count_max == 0 {
            return Err(field_err("seg_count_max", "must be at least 1"));
        }
        // Requests are buffered in memory: bound one request to 32 MiB.
        if u64::from(self.seg_size_max) * u64::from(self.seg_count_max) > MAX_REQUEST_BYTES {
            return Err(field_err(
                "seg_count_max",
                "seg_size_max * seg_count_max must not exceed 32 MiB",
            ));
        }
        if self.seg_count_max > u32::from(self.queue_size) {
            return Err(field_err(
                "seg_count_max",
                "must not exceed queue_size (a chain cannot be longer than the ring)",
            ));
        }
        if self.poll_queue_timeout_us > MAX_POLL_QUEUE_TIMEOUT_US {
            let problem = range_problem(0, MAX_POLL_QUEUE_TIMEOUT_US);
            return Err(field_err("poll_queue_timeout_us", problem));
        }
        if self.device_id.len() > DEVICE_ID_LEN {
            return Err(field_err(
                "device_id",
                format!(
                    "is {} bytes long, at most {DEVICE_ID_LEN} allowed",
                    self.device_id.len()
                ),
            ));
        }
        self.validate_lazy()?;
        if let Some(cpus) = &self.cpus {
            if cpus.len() != usize::from(self.num_queues) {
                return Err(field_err(
                    "cpus",
                    format!(
                        "has {} entries, must have one per queue (num_queues: {})",
                        cpus.len(),
                        self.num_queues
                    ),
                ));
            }
            if let Some(cpu) = cpus.iter().find(|&&c| c >= MAX_CPUS) {
                return Err(field_err(
                    "cpus",
                    format!("CPU {cpu} is out of range (at most {})", MAX_CPUS - 1),
                ));
            }
        }
        if let Some(qos) = &self.qos {
            qos.validate().map_err(ConfigError::Qos)?;
        }
        self.socket_mode()?;
        self.socket_group()?;
        if let Some(keys) = &self.encryption_key {
            if keys.len() != 2 {
                return Err(field_err(
                    "encryption_key",
                    format!("must hold exactly two base64 strings, found {}", keys.len()),
                ));
            }
        }
        Ok(())
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

impl Options {
    /// The legacy fields this config sets that have no effect, with why: the backend warns
    /// about each once at start-up.
    pub fn ignored_fields(&self) -> Vec<(&'static str, &'static str)> {
        [
            (
                self.direct_io.is_some(),
                "direct_io",
                "a v0.1 field; the disk is always opened with O_DIRECT where the file system \
                 allows it",
            ),
            (
                self.track_written == Some(false),
                "track_written",
                "WRITTEN bits are always tracked (readers of the metadata ignore them)",
            ),
        ]
        .into_iter()
        .filter_map(|(set, field, why)| set.then_some((field, why)))
        .collect()
    }

    /// Checks that every `cpus` entry is a CPU this process may run on (its affinity mask at
    /// start-up), so that a typo is an error at start-up rather than a failed pin later.
    pub fn check_cpus(&self) -> Result<(), ConfigError> {
        let Some(cpus) = &self.cpus else {
            return Ok(());
        };
        let allowed = crate::affinity::allowed_cpus()
            .map_err(|e| field_err("cpus", format!("cannot read this process's CPUs: {e}")))?;
        if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(field_err(
                "cpus",
                format!(
                    "CPU {cpu} is not one this process may run on ({})",
                    crate::affinity::format_list(&allowed)
                ),
            ));
        }
        Ok(())
    }
}

impl Options {
    /// The field naming the lazy-fetch source (`image_path`, `image_url`, `archive_url`),
    /// if one is set.
    pub fn lazy_source_field(&self) -> Option<&'static str> {
        [
            (self.image_path.is_some(), "image_path"),
            (self.image_url.is_some(), "image_url"),
            (self.archive_url.is_some(), "archive_url"),
        ]
        .into_iter()
        .find_map(|(set, field)| set.then_some(field))
    }

    /// The lazy-fetch fields: they only make sense together with a source (`image_path`,
    /// `image_url` or `archive_url`, one of them).
    fn validate_lazy(&self) -> Result<(), ConfigError> {
        let sources = [
            (self.image_path.is_some(), "image_path"),
            (self.image_url.is_some(), "image_url"),
            (self.archive_url.is_some(), "archive_url"),
        ];
        let mut set = sources.iter().filter(|(set, _)| *set).map(|(_, f)| *f);
        let source = set.next();
        if let (Some(first), Some(second)) = (source, set.next()) {
            return Err(field_err(
                second,
                format!("cannot be combined with {first} (a disk has one source)"),
            ));
        }
        let lazy = source.is_some();
        if let Some(source) = source {
            if self.metadata_path.is_none() {
                return Err(field_err(
                    "metadata_path",
                    format!("is required when {source} is set"),
                ));
            }
        }
        let remote = self.image_url.is_some() || self.archive_url.is_some();
        if let Some(url) = &self.image_url {
            check_url("image_url", url, &["http", "https", "s3"])?;
        }
        if let Some(url) = &self.archive_url {
            check_url("archive_url", url, &["s3", "file"])?;
        }
        if lazy && self.readonly {
            return Err(field_err(
                "readonly",
                format!(
                    "cannot be combined with {} (fetching writes the base disk)",
                    source.unwrap_or_default()
                ),
            ));
        }
        // Each lazy-fetch field without a source is refused rather than ignored.
        for (set, field) in [
            (self.metadata_path.is_some(), "metadata_path"),
            (self.copy_on_read, "copy_on_read"),
            (self.autofetch, "autofetch"),
            (self.fetch_connections.is_some(), "fetch_connections"),
        ] {
            if set && !lazy {
                return Err(field_err(
                    field,
                    "needs image_path, image_url or archive_url (there is nothing to fetch)",
                ));
            }
        }
        for (set, field) in [
            (self.fetch_timeout_secs.is_some(), "fetch_timeout_secs"),
            (self.fetch_retry_secs.is_some(), "fetch_retry_secs"),
            (self.s3_endpoint.is_some(), "s3_endpoint"),
            (self.s3_region.is_some(), "s3_region"),
            (self.s3_profile.is_some(), "s3_profile"),
        ] {
            if set && !remote {
                return Err(field_err(
                    field,
                    "needs a remote source (image_url or archive_url)",
                ));
            }
        }
        for (value, field) in [
            (&self.s3_endpoint, "s3_endpoint"),
            (&self.s3_region, "s3_region"),
            (&self.s3_profile, "s3_profile"),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(field_err(field, "must not be empty"));
            }
        }
        if let Some(endpoint) = &self.s3_endpoint {
            check_url("s3_endpoint", endpoint, &["http", "https"])?;
        }
        if let Some(rate) = self.autofetch_mib_per_sec {
            if !self.autofetch {
                return Err(field_err("autofetch_mib_per_sec", "needs autofetch: true"));
            }
            if rate == 0 {
                return Err(field_err(
                    "autofetch_mib_per_sec",
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        if let Some(path) = &self.control_socket {
            if path.as_os_str().is_empty() {
                return Err(field_err("control_socket", "must not be empty"));
            }
            if path.as_os_str().len() > 107 {
                return Err(field_err("control_socket", SUN_PATH_TOO_LONG));
            }
            if *path == self.socket {
                return Err(field_err("control_socket", "must differ from socket"));
            }
        }
        Ok(())
    }
}

impl Options {
    /// Refuses a config in which two fields name one file: the disk, the image, the metadata,
    /// the debug log and the sockets must all be different files (the debug log appended to
    /// the disk would write guest plaintext into it, a fetch would copy a file onto itself,
    /// stripe states would overwrite data). Compared as files, see [`same_file`]. Looks at the
    /// file system, so it is not part of [`Options::validate`]; the backend and init-metadata
    /// run it before opening anything.
    pub fn check_distinct_files(&self) -> Result<(), ConfigError> {
        let files: Vec<(&'static str, &Path)> = [
            ("path", Some(self.path.as_path())),
            ("image_path", self.image_path.as_deref()),
            (
                "archive_url",
                self.archive_url.as_deref().and_then(file_url_path),
            ),
            ("metadata_path", self.metadata_path.as_deref()),
            ("io_debug_path", self.io_debug_path.as_deref()),
            ("socket", Some(self.socket.as_path())),
            ("control_socket", self.control_socket.as_deref()),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path?)))
        .collect();
        for (i, &(other_field, other)) in files.iter().enumerate() {
            for &(field, path) in &files[i + 1..] {
                if same_file(path, other) {
                    return Err(ConfigError::SameFile {
                        field,
                        path: path.to_owned(),
                        other_field,
                        other: other.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The directory a `file://` URL names; `None` for other schemes.
pub fn file_url_path(url: &str) -> Option<&Path> {
    url.strip_prefix("file://").map(Path::new)
}

/// True if `a` and `b` name the same file: the same inode, or the same block device through
/// different nodes; for a path that does not exist (yet), the same place once symbolic links
/// and the directory are resolved (a debug log or socket about to be created there).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) if a.file_type().is_block_device() && b.file_type().is_block_device() => {
            a.rdev() == b.rdev()
        }
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => match (resolve(a), resolve(b)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

/// Where `path` is or would be created: canonical when it exists, else its directory's
/// canonical form joined with its name, following a dangling symbolic link (at most 40, as
/// the kernel does). None when that cannot be said (a name ending in `..`, a link loop).
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut path = std::path::absolute(path).ok()?;
    for _ in 0..40 {
        if let Ok(canonical) = std::fs::canonicalize(&path) {
            return Some(canonical);
        }
        match std::fs::read_link(&path) {
            // A relative target is relative to the link's directory; an absolute one replaces.
            Ok(target) => path = path.parent()?.join(target),
            Err(_) => {
                let name = path.file_name()?;
                let dir = path.parent()?;
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                return Some(dir.join(name));
            }
        }
    }
    None
}

impl Options {
    /// `socket_mode` as permission bits, [`crate::sockpath::PRIVATE_MODE`] (0600) without it.
    /// Octal digits, optionally after `0o`. Bits outside 0777 and any bit for "other" users
    /// are refused: connecting needs write permission, and whoever can connect can read and
    /// write the whole disk.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        let Some(text) = &self.socket_mode else {
            return Ok(crate::sockpath::PRIVATE_MODE);
        };
        let digits = text.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        let bad = || {
            field_err(
                "socket_mode",
                format!("{text:?} is not an octal mode such as \"0660\""),
            )
        };
        if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        // Too many digits for a u32 is outside 0777 too.
        let mode = u32::from_str_radix(digits, 8).unwrap_or(u32::MAX);
        if mode & !0o777 != 0 {
            return Err(field_err(
                "socket_mode",
                format!("{text} has bits outside 0777 (setuid, setgid, sticky)"),
            ));
        }
        if mode & 0o007 != 0 {
            return Err(field_err(
                "socket_mode",
                format!(
                    "{text} gives other users access (anyone who can connect can read and \
                     write the whole disk); use socket_group and at most 0770"
                ),
            ));
        }
        Ok(mode)
    }

    /// `socket_group`: all digits is a gid, anything else a group name.
    pub fn socket_group(&self) -> Result<Option<SocketGroup>, ConfigError> {
        let Some(text) = &self.socket_group else {
            return Ok(None);
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(field_err("socket_group", "must not be empty"));
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            // u32::MAX is chown's "leave the group alone".
            return match text.parse::<u32>() {
                Ok(gid) if gid != u32::MAX => Ok(Some(SocketGroup::Id(gid))),
                _ => Err(field_err(
                    "socket_group",
                    format!("gid {text} is out of range (at most 4294967294)"),
                )),
            };
        }
        if text.contains('\0') || text.contains(':') {
            return Err(field_err(
                "socket_group",
                format!("{text:?} is not a group name"),
            ));
        }
        Ok(Some(SocketGroup::Name(text.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::{assert_no_key, TEST_KEYS};

    const MIN: &str = "path: /tmp/disk.raw\nsocket: /tmp/vhost.sock\n";

    fn err_of(text: &str) -> String {
        Options::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let o = Options::parse(MIN).unwrap();
        assert_eq!(o.path, PathBuf::from("/tmp/disk.raw"));
        assert_eq!(o.num_queues, 1);
        assert_eq!(o.queue_size, 256);
        assert_eq!(o.device_id, "ubiblk");
        assert!(!o.readonly && !o.skip_sync && !o.copy_on_read);
        assert!(o.image_path.is_none() && o.encryption_key.is_none());
    }

    #[test]
    fn seed_example_parses() {
        let text = r#"
path: "/path/to/block-device.raw"
image_path: "/path/to/ubi-image.raw"
metadata_path: "/path/to/metadata"
socket: "/tmp/vhost.sock"
num_queues: 4
queue_size: 256
seg_size_max: 4096
seg_count_max: 1
poll_queue_timeout_us: 500
io_debug_path: "/tmp/io_debug.log"
skip_sync: false
copy_on_read: false
device_id: "ubiblk"
encryption_key:
  - "x74Yhe/ovgxY4BrBaM6Wm/9firf9k/N+ayvGsskBo+hjQtrL+nslCDC5oR/HpSDL"
  - "TJn65Jb//AYqu/a8zlpb0IlXC4vwFQ5DtbQkMTeliEAwafr0DEH+5hNro8FuVzQ+"
"#;
        let o = Options::parse(text).unwrap();
        assert_eq!(o.num_queues, 4);
        assert_eq!(o.seg_size_max, 4096);
        assert_eq!(o.poll_queue_timeout_us, 500);
        assert_eq!(o.encryption_key.as_ref().unwrap().len(), 2);
        assert_eq!(o.io_debug_path, Some(PathBuf::from("/tmp/io_debug.log")));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err_of(&format!("{MIN}num_queus: 2\n"));
        assert!(e.contains("num_queus"), "{e}");
    }

    #[test]
    fn v02_and_legacy_fields_are_accepted() {
        let o = Options::parse(MIN).unwrap();
        assert!(o.cpus.is_none() && !o.write_through && o.track_written.is_none());
        assert!(o.ignored_fields().is_empty());
        let o = Options::parse(&format!(
            "{MIN}num_queues: 2\ncpus: [1, 0]\nwrite_through: true\ntrack_written: false\n\
             direct_io: true\n"
        ))
        .unwrap();
        assert_eq!(o.cpus, Some(vec![1, 0]));
        assert!(o.write_through);
        let ignored: Vec<&str> = o.ignored_fields().iter().map(|(f, _)| *f).collect();
        assert_eq!(ignored, ["direct_io", "track_written"]);
        let o = Options::parse(&format!("{MIN}track_written: true\n")).unwrap();
        assert!(o.ignored_fields().is_empty());
    }

    #[test]
    fn cpus_needs_one_cpu_per_queue() {
        for (extra, want) in [
            ("num_queues: 2\ncpus: [0]", "one per queue (num_queues: 2)"),
            ("cpus: [0, 1]", "one per queue (num_queues: 1)"),
            ("cpus: [4096]", "out of range"),
            ("cpus: [-1]", "cpus"),
        ] {
            let e = err_of(&format!("{MIN}{extra}\n"));
            assert!(e.contains("cpus") && e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn refused_legacy_field_says_so_and_typos_do_not() {
        let e = err_of(&format!("{MIN}sync_io: true\n"));
        assert!(e.contains("unknown field `sync_io`"), "{e}");
        assert!(
            e.contains("legacy field") && e.contains("write_through"),
            "{e}"
        );
        let e = err_of(&format!("{MIN}direct_iox: true\n"));
        assert!(
            e.contains("unknown field `direct_iox`") && !e.contains("legacy"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err_of(&format!("{MIN}num_queues: two\n"));
        assert!(e.contains("num_queues"), "{e}");
        let e = err_of(&format!("{MIN}skip_sync: 3\n"));
        assert!(e.contains("skip_sync"), "{e}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let e = err_of("path: /tmp/d\n");
        assert!(e.contains("socket"), "{e}");
    }

    #[test]
    fn range_checks_name_the_field() {
        for (extra, field) in [
            ("num_queues: 0", "num_queues"),
            ("queue_size: 100", "queue_size"),
            ("queue_size: 0", "queue_size"),
            ("seg_size_max: 1000", "seg_size_max"),
            ("seg_count_max: 0", "seg_count_max"),
            ("device_id: \"123456789012345678901\"", "device_id"),
            ("image_path: /tmp/img", "metadata_path"),
            ("metadata_path: /tmp/meta", "metadata_path"),
            ("copy_on_read: true", "copy_on_read"),
            ("encryption_key: [\"a\"]", "encryption_key"),
            ("num_queues: -1", "num_queues"),
            ("queue_size: 70000", "queue_size"),
            ("autofetch: true", "autofetch"),
            ("control_socket: \"\"", "control_socket"),
            (
                "image_path: /i\nmetadata_path: /m\nautofetch_mib_per_sec: 5",
                "autofetch_mib_per_sec",
            ),
            (
                "image_path: /i\nmetadata_path: /m\nautofetch: true\nautofetch_mib_per_sec: 0",
                "autofetch_mib_per_sec",
            ),
            (
                "image_path: /i\nmetadata_path: /m\nreadonly: true",
                "readonly",
            ),
            (
                "image_path: /i\nmetadata_path: /m\ncontrol_socket: /tmp/vhost.sock",
                "control_socket",
            ),
        ] {
            let e = err_of(&format!("{MIN}{extra}\n"));
            assert!(e.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        for text in ["", "[", "- a\n- b", "path: [1, 2]", "\u{0}\u{1}", "a: b: c"] {
            assert!(Options::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn remote_sources_and_their_fields() {
        let m = "metadata_path: /m\n";
        for ok in [
            "image_url: http://127.0.0.1:8080/img.raw",
            "image_url: https://images.example/img.raw?X-Amz-Signature=abc",
            "image_url: s3://bucket/key/img.raw",
            "archive_url: s3://bucket/prefix",
            "archive_url: file:///var/lib/archives/disk1",
        ] {
            let o = Options::parse(&format!("{MIN}{m}{ok}\n")).unwrap();
            assert!(o.lazy_source_field().is_some(), "{ok}");
        }
        let o = Options::parse(&format!(
            "{MIN}{m}image_url: s3://b/k\nfetch_connections: 32\nfetch_timeout_secs: 5\n\
             fetch_retry_secs: 0\ns3_endpoint: http://127.0.0.1:3900\ns3_region: garage\n\
             s3_profile: test\n"
        ))
        .unwrap();
        assert_eq!(o.fetch_connections, Some(32));
        assert_eq!(o.fetch_retry_secs, Some(0));
        let cases = [
            (
                "image_url: ftp://h/x",
                "image_url",
                "must start with http://",
            ),
            ("image_url: http://", "image_url", "no host"),
            (
                "image_url: http://u:secret@h/x",
                "image_url",
                "user name or password",
            ),
            (
                "archive_url: http://h/x",
                "archive_url",
                "must start with s3://",
            ),
            (
                "image_url: s3://b/k\nimage_path: /i",
                "image_url",
                "cannot be combined with image_path",
            ),
            (
                "image_url: s3://b/k\nfetch_connections: 0",
                "fetch_connections",
                "1..=256",
            ),
            (
                "image_url: s3://b/k\nfetch_connections: 257",
                "fetch_connections",
                "1..=256",
            ),
            (
                "image_url: s3://b/k\nfetch_timeout_secs: 0",
                "fetch_timeout_secs",
                "1..=3600",
            ),
            (
                "image_url: s3://b/k\ns3_region: ' '",
                "s3_region",
                "must not be empty",
            ),
            (
                "image_url: s3://b/k\ns3_endpoint: s3.example",
                "s3_endpoint",
                "http://",
            ),
            (
                "image_path: /i\nfetch_retry_secs: 5",
                "fetch_retry_secs",
                "remote source",
            ),
            (
                "image_path: /i\ns3_profile: p",
                "s3_profile",
                "remote source",
            ),
        ];
        for (yaml, field, want) in cases {
            let e = err_of(&format!("{MIN}{m}{yaml}\n"));
            assert!(e.contains(field) && e.contains(want), "{yaml}: {e}");
            assert!(!e.contains("secret"), "{yaml}: {e}");
        }
        let e = err_of(&format!("{MIN}image_url: s3://b/k\n"));
        assert!(
            e.contains("metadata_path") && e.contains("image_url"),
            "{e}"
        );
        let e = err_of(&format!("{MIN}fetch_connections: 4\n"));
        assert!(
            e.contains("needs image_path, image_url or archive_url"),
            "{e}"
        );
    }

    #[test]
    fn lazy_fields_without_image_path_are_refused_not_ignored() {
        for field in [
            "metadata_path: /tmp/meta",
            "copy_on_read: true",
            "autofetch: true",
        ] {
            let e = err_of(&format!("{MIN}{field}\n"));
            assert!(e.contains("needs image_path"), "{field}: {e}");
        }
        // The defaults, spelled out, are fine.
        Options::parse(&format!("{MIN}copy_on_read: false\nautofetch: false\n")).unwrap();
        let lazy = "image_path: /i\nmetadata_path: /m\ncopy_on_read: true\n";
        Options::parse(&format!("{MIN}{lazy}")).unwrap();
    }

    #[test]
    fn out_of_range_integers_give_the_allowed_range() {
        let lazy = "image_path: /i\nmetadata_path: /m\nautofetch: true\n";
        for (extra, want) in [
            (
                "num_queues: 100000",
                "`num_queues`: must be in 1..=64 (line 6, column 13)",
            ),
            ("num_queues: 65", "`num_queues`: must be in 1..=64"),
            ("num_queues: -1", "`num_queues`: must be in 1..=64"),
            ("num_queues: 0", "`num_queues`: must be in 1..=64"),
            (
                "num_queues: 100000000000000000000000",
                "`num_queues`: must be in 1..=64",
            ),
            (
                "num_queues: 1.5",
                "`num_queues`: expected an integer in 1..=64",
            ),
            ("queue_size: 70000", "`queue_size`: must be in 1..=32768"),
            (
                "seg_size_max: 256",
                "`seg_size_max`: must be in 512..=33554432",
            ),
            (
                "seg_count_max: 40000",
                "`seg_count_max`: must be in 1..=32768",
            ),
            (
                "poll_queue_timeout_us: 2000000",
                "`poll_queue_timeout_us`: must be in 0..=1000000",
            ),
            (
                "autofetch_mib_per_sec: 5000000000",
                "`autofetch_mib_per_sec`: must be in 1..=4294967295",
            ),
        ] {
            let e = err_of(&format!("{MIN}{lazy}{extra}\n"));
            assert!(e.contains(want), "{extra}: {e}");
        }
        let o = Options::parse(&format!(
            "{MIN}{lazy}num_queues: 64\npoll_queue_timeout_us: 0\nautofetch_mib_per_sec: ~\n"
        ))
        .unwrap();
        assert_eq!((o.num_queues, o.poll_queue_timeout_us), (64, 0));
        assert_eq!(o.autofetch_mib_per_sec, None);
    }

    const KEY32: &str = TEST_KEYS[0];
    const KEY48: &str = TEST_KEYS[1];

    #[test]
    fn parse_errors_never_repeat_a_key() {
        for (extra, field) in [
            (format!("encryption_key: {KEY32}"), "`encryption_key`"),
            (format!("encryption_key: \"{KEY48}\""), "`encryption_key`"),
            (
                format!("encryption_key: {{{KEY32}: {KEY48}}}"),
                "`encryption_key`",
            ),
            (
                format!("encryption_key: [[{KEY32}], {KEY48}]"),
                "`encryption_key[0]`",
            ),
            (
                format!("encryption_key: [{KEY32}, [{KEY48}]]"),
                "`encryption_key[1]`",
            ),
            (format!("encryption_key:\n  {KEY32}: 1"), "`encryption_key`"),
            (format!("num_queues: {KEY32}"), "`num_queues`"),
            (format!("skip_sync: {KEY48}"), "`skip_sync`"),
            (format!("{KEY32}: 1"), "unknown field"),
            (KEY48.to_string(), "expected a mapping"),
            (format!("encryption_key: [\"{KEY32}"), "not valid YAML"),
            (
                format!("encryption_key: [a, b]\nencryption_key: [{KEY32}, {KEY48}]"),
                "duplicate field `encryption_key`",
            ),
        ] {
            let text = if extra.starts_with(KEY48) {
                extra.clone()
            } else {
                format!("{MIN}{extra}\n")
            };
            let e = err_of(&text);
            assert_no_key(&e);
            assert!(e.contains(field), "{extra}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn debug_does_not_print_the_keys() {
        let o = Options::parse(&format!("{MIN}encryption_key: [{KEY32}, {KEY48}]\n")).unwrap();
        let text = format!("{o:?}");
        assert_no_key(&text);
        assert!(text.contains("2 entries"), "{text}");
        assert_eq!(o.encryption_key.as_deref().map(<[String]>::len), Some(2));
    }

    /// FIELDS (which names error messages may repeat) is every field serde knows.
    #[test]
    fn fields_lists_every_field() {
        let e = serde_yaml_ng::from_str::<Options>(&format!("{MIN}zz: 1\n")).unwrap_err();
        let e = e.to_string();
        let list = e.split("expected one of ").nth(1).unwrap();
        let list = list.split(" at line").next().unwrap();
        let names: Vec<&str> = list.split(", ").map(|n| n.trim_matches('`')).collect();
        assert_eq!(names, FIELDS);
    }

    fn files_config(dir: &Path, extra: &str) -> Options {
        let d = dir.display();
        let lazy = format!("image_path: {d}/image\nmetadata_path: {d}/meta\n");
        Options::parse(&format!(
            "path: {d}/disk\nsocket: {d}/vhost.sock\n{lazy}{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn files_must_be_distinct_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let d = p.display();
        for name in ["disk", "image", "meta"] {
            std::fs::write(p.join(name), b"x").unwrap();
        }
        std::fs::hard_link(p.join("disk"), p.join("disk.link")).unwrap();
        std::os::unix::fs::symlink(p.join("meta"), p.join("meta.sym")).unwrap();
        std::os::unix::fs::symlink(p.join("new.log"), p.join("log.sym")).unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();

        files_config(
            p,
            &format!("io_debug_path: {d}/io.log\ncontrol_socket: {d}/ctl.sock\n"),
        )
        .check_distinct_files()
        .unwrap();
        for (extra, want) in [
            (
                format!("io_debug_path: {d}/disk"),
                format!("io_debug_path: {d}/disk is the same file as path ({d}/disk)"),
            ),
            (
                format!("io_debug_path: {d}/disk.link"),
                "is the same file as path".to_string(),
            ),
            (
                format!("io_debug_path: {d}/meta.sym"),
                "io_debug_path: ".to_string()
                    + &format!("{d}/meta.sym is the same file as metadata_path"),
            ),
            (
                format!("io_debug_path: {d}/image"),
                "is the same file as image_path".to_string(),
            ),
            // Neither exists yet: compared where they would be created.
            (
                format!("io_debug_path: {d}/sub/../vhost.sock"),
                "socket: ".to_string()
                    + &format!("{d}/vhost.sock is the same file as io_debug_path"),
            ),
            (
                format!("io_debug_path: {d}/log.sym\ncontrol_socket: {d}/new.log"),
                "control_socket: ".to_string()
                    + &format!("{d}/new.log is the same file as io_debug_path"),
            ),
            (
                format!("control_socket: {d}/disk"),
                "control_socket: ".to_string() + &format!("{d}/disk is the same file as path"),
            ),
        ] {
            let e = files_config(p, &format!("{extra}\n"))
                .check_distinct_files()
                .unwrap_err()
                .to_string();
            assert!(e.contains(&want), "{extra}: {e}");
        }
        let mut o = files_config(p, "");
        o.socket = p.join("meta");
        let e = o.check_distinct_files().unwrap_err().to_string();
        assert!(e.contains("socket: ") && e.contains("metadata_path"), "{e}");
    }

    #[test]
    fn socket_mode_is_octal_and_private_by_default() {
        assert_eq!(Options::parse(MIN).unwrap().socket_mode().unwrap(), 0o600);
        for (value, mode) in [
            ("\"0660\"", 0o660),
            ("0660", 0o660),
            ("660", 0o660),
            ("\"0o640\"", 0o640),
            ("0o600", 0o600),
            ("\"0700\"", 0o700),
            ("\"0\"", 0),
        ] {
            let o = Options::parse(&format!("{MIN}socket_mode: {value}\n")).unwrap();
            assert_eq!(o.socket_mode().unwrap(), mode, "{value}");
        }
    }

    #[test]
    fn bad_socket_modes_are_refused_with_the_field_named() {
        for (value, why) in [
            ("\"0666\"", "other users"),
            ("\"0662\"", "other users"),
            ("0601", "other users"),
            ("\"0777\"", "other users"),
            ("\"4660\"", "outside 0777"),
            ("\"1770\"", "outside 0777"),
            ("\"0680\"", "not an octal mode"),
            ("\"rw-rw----\"", "not an octal mode"),
            ("\"\"", "not an octal mode"),
            ("\"+660\"", "not an octal mode"),
            ("\"-660\"", "not an octal mode"),
            ("\"77777777777777\"", "outside 0777"),
            ("\"777777777777777777777777\"", "outside 0777"),
            ("\"0o10000\"", "outside 0777"),
            ("[1]", "socket_mode"),
        ] {
            let e = err_of(&format!("{MIN}socket_mode: {value}\n"));
            assert!(e.contains("socket_mode") && e.contains(why), "{value}: {e}");
        }
    }

    #[test]
    fn socket_group_is_a_gid_or_a_name() {
        assert_eq!(Options::parse(MIN).unwrap().socket_group().unwrap(), None);
        for (value, group) in [
            ("0", SocketGroup::Id(0)),
            ("\"1000\"", SocketGroup::Id(1000)),
            ("4294967294", SocketGroup::Id(u32::MAX - 1)),
            ("kvm", SocketGroup::Name("kvm".into())),
            ("\"libvirt-qemu\"", SocketGroup::Name("libvirt-qemu".into())),
        ] {
            let o = Options::parse(&format!("{MIN}socket_group: {value}\n")).unwrap();
            assert_eq!(o.socket_group().unwrap(), Some(group), "{value}");
        }
        for value in [
            "\"\"",
            "4294967295",
            "99999999999",
            "\"a:b\"",
            "\"a\\0b\"",
            "{}",
        ] {
            let e = err_of(&format!("{MIN}socket_group: {value}\n"));
            assert!(e.contains("socket_group"), "{value}: {e}");
        }
    }

    #[test]
    fn qos_limits_parse_with_qemu_names_and_rules() {
        let o = Options::parse(&format!(
            "{MIN}qos:\n  iops_total: 5000\n  iops_total_max: 6000\n  iops_total_max_length: 2\n  \
             bps_read: 52428800\n  bps_write: 0\n"
        ))
        .unwrap();
        let q = o.qos.unwrap();
        assert_eq!(
            (q.iops_total, q.iops_total_max, q.iops_total_max_length),
            (Some(5000), Some(6000), Some(2))
        );
        assert_eq!(q.normalized().bps_write, None);
        assert!(!q.is_unlimited());
        assert!(Options::parse(&format!("{MIN}qos: {{}}\n"))
            .unwrap()
            .qos
            .unwrap()
            .is_unlimited());
        for (yaml, want) in [
            ("iops_totl: 1", "unknown field `iops_totl`"),
            ("iops_total: -1", "`qos.iops_total`"),
            ("iops_total: x", "`qos.iops_total`"),
            (
                "iops_total_max: 10",
                "`qos.iops_total_max`: needs iops_total",
            ),
            (
                "iops_read: 10\n  iops_read_max: 5",
                "`qos.iops_read_max`: must not be lower than iops_read",
            ),
            (
                "iops_write: 10\n  iops_write_max_length: 5",
                "`qos.iops_write_max_length`: needs iops_write_max",
            ),
            (
                "iops_write: 10\n  iops_write_max: 20\n  iops_write_max_length: 0",
                "`qos.iops_write_max_length`: must be in 1..=86400",
            ),
            (
                "iops_total: 10\n  iops_write: 5",
                "`qos.iops_total`: cannot be combined with iops_write",
            ),
            (
                "bps_total: 1000\n  bps_total_max: 2000\n  bps_read_max: 4000\n  bps_read: 1000",
                "`qos.bps_total`: cannot be combined with bps_read",
            ),
            ("bps_read: 511", "`qos.bps_read`: must be at least 512"),
            (
                "bps_total: 1000000000000001",
                "`qos.bps_total`: must be at most",
            ),
        ] {
            let e = err_of(&format!("{MIN}qos:\n  {yaml}\n"));
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn device_id_of_20_bytes_is_accepted() {
        let o = Options::parse(&format!("{MIN}device_id: \"12345678901234567890\"\n")).unwrap();
        assert_eq!(o.device_id.len(), 20);
    }
}
