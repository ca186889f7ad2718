//! What tells one version of a source from another ([`SourceIdentity`]): each source says what
//! it is (`StripeSource::identity`), and the lazy layer pins it next to the metadata (`pin`)
//! so that a restart on a replaced source is refused instead of mixing two versions.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The kind of a source, and so the configuration field naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// `image_path`, a regular file.
    File,
    /// `image_path`, a block device.
    BlockDevice,
    /// `image_url`, `http://` or `https://`.
    Http,
    /// `image_url`, `s3://bucket/key`.
    S3,
    /// `archive_url`.
    Archive,
    StripeServer,
}

impl SourceKind {
    /// The configuration field that names a source of this kind.
    pub fn field(self) -> &'static str {
        match self {
            SourceKind::File | SourceKind::BlockDevice => "image_path",
            SourceKind::Http | SourceKind::S3 | SourceKind::StripeServer => "image_url",
            SourceKind::Archive => "archive_url",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::File => "file",
            SourceKind::BlockDevice => "block device",
            SourceKind::Http => "http",
            SourceKind::S3 => "s3",
            SourceKind::Archive => "archive",
            SourceKind::StripeServer => "ubiblk",
        })
    }
}

/// A source's identity: where it is, its size, and the values that change with every new
/// version of its content (`version`, by name: an ETag, a manifest's MAC, a file's mtime and
/// inode). Two identities are equal exactly when they are taken for the same content. Nothing
/// secret goes in (URLs without their query string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceIdentity {
    pub kind: SourceKind,
    /// A path, a URL without its query string, `s3://bucket/key`.
    pub location: String,
    /// Size in bytes.
    pub bytes: u64,
    #[serde(default)]
    pub version: BTreeMap<String, String>,
}

impl SourceIdentity {
    pub fn new(kind: SourceKind, location: impl Into<String>, bytes: u64) -> Self {
        SourceIdentity {
            kind,
            location: location.into(),
            bytes,
            version: BTreeMap::new(),
        }
    }

    /// `self` with the version value `name` = `value`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.version.insert(name.to_string(), value.into());
        self
    }

    /// What differs from `self` in `new`, as `what OLD -> NEW` items joined by "; ".
    pub fn changes(&self, new: &SourceIdentity) -> String {
        let mut out = Vec::new();
        if self.kind != new.kind || self.location != new.location {
            out.push(format!(
                "source {} {} -> {} {}",
                self.kind, self.location, new.kind, new.location
            ));
        }
        if self.bytes != new.bytes {
            out.push(format!("size {} -> {} bytes", self.bytes, new.bytes));
        }
        let names: std::collections::BTreeSet<&String> =
            self.version.keys().chain(new.version.keys()).collect();
        for name in names {
            let (old, now) = (self.version.get(name), new.version.get(name));
            if old != now {
                let show = |v: Option<&String>| v.map_or("(none)".to_string(), |v| v.clone());
                out.push(format!("{name} {} -> {}", show(old), show(now)));
            }
        }
        out.join("; ")
    }
}

impl fmt::Display for SourceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}, {} bytes", self.kind, self.location, self.bytes)?;
        for (name, value) in &self.version {
            write!(f, ", {name} {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_each_difference_old_and_new() {
        let a = SourceIdentity::new(SourceKind::Http, "http://h/img", 10).with("etag", "\"1\"");
        let b = SourceIdentity::new(SourceKind::Http, "http://h/img", 12).with("etag", "\"2\"");
        assert_eq!(a.changes(&a), "");
        assert_eq!(a.changes(&b), "size 10 -> 12 bytes; etag \"1\" -> \"2\"");
        let c =
            SourceIdentity::new(SourceKind::Http, "http://h/img", 10).with("last_modified", "Mon");
        assert_eq!(
            a.changes(&c),
            "etag \"1\" -> (none); last_modified (none) -> Mon"
        );
        let d = SourceIdentity::new(SourceKind::File, "/img", 10);
        assert!(a
            .changes(&d)
            .starts_with("source http http://h/img -> file /img"));
        assert_eq!(a.to_string(), "http http://h/img, 10 bytes, etag \"1\"");
    }
}
