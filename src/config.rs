//! Backend configuration: the YAML `Options` of the seed, validated at start-up.
//!
//! Every error names the offending field so an operator can fix the file without reading code.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Longest device id the virtio-blk GET_ID request can carry.
pub const DEVICE_ID_LEN: usize = 20;
/// Largest virtqueue size the split-ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

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
    #[error("config field `{field}`: {problem}")]
    Field {
        field: &'static str,
        problem: String,
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
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default = "default_seg_size_max")]
    pub seg_size_max: u32,
    #[serde(default = "default_seg_count_max")]
    pub seg_count_max: u32,
    #[serde(default = "default_poll_queue_timeout_us")]
    pub poll_queue_timeout_us: u64,
    #[serde(default)]
    pub skip_sync: bool,
    #[serde(default)]
    pub copy_on_read: bool,
    #[serde(default)]
    pub encryption_key: Option<Vec<String>>,
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
    #[serde(default)]
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
}

/// `socket_group`, resolved from its text: a gid, or a name looked up when the socket is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    Id(u32),
    Name(String),
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
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
        let opts: Options = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
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
        if self.num_queues == 0 {
            return Err(field_err("num_queues", "must be at least 1"));
        }
        if self.num_queues > 256 {
            return Err(field_err("num_queues", "must be at most 256"));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(field_err(
                "queue_size",
                format!("{} is not a power of two", self.queue_size),
            ));
        }
        if self.queue_size > MAX_QUEUE_SIZE {
            return Err(field_err("queue_size", "must be at most 32768"));
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
        if u64::from(self.seg_size_max) * u64::from(self.seg_count_max) > 32 << 20 {
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
        if self.poll_queue_timeout_us > 1_000_000 {
            return Err(field_err(
                "poll_queue_timeout_us",
                "must be at most 1000000",
            ));
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
        if self.image_path.is_some() && self.metadata_path.is_none() {
            return Err(field_err(
                "metadata_path",
                "is required when image_path is set",
            ));
        }
        self.validate_lazy()?;
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

impl Options {
    /// The lazy-fetch fields: they only make sense together with `image_path`.
    fn validate_lazy(&self) -> Result<(), ConfigError> {
        let lazy = self.image_path.is_some();
        if lazy && self.readonly {
            return Err(field_err(
                "readonly",
                "cannot be combined with image_path (fetching writes the base disk)",
            ));
        }
        if self.autofetch && !lazy {
            return Err(field_err(
                "autofetch",
                "needs image_path (there is nothing to fetch)",
            ));
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
            if !lazy {
                return Err(field_err(
                    "control_socket",
                    "needs image_path (it reports lazy-fetch progress)",
                ));
            }
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
            ("encryption_key: [\"a\"]", "encryption_key"),
            ("num_queues: -1", "num_queues"),
            ("queue_size: 70000", "queue_size"),
            ("autofetch: true", "autofetch"),
            ("control_socket: /tmp/c", "control_socket"),
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
    fn device_id_of_20_bytes_is_accepted() {
        let o = Options::parse(&format!("{MIN}device_id: \"12345678901234567890\"\n")).unwrap();
        assert_eq!(o.device_id.len(), 20);
    }
}
