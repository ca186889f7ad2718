//! The lazy-fetch fields (`image_path`, `image_url`, `archive_url`, `fetch_*`, `s3_*`, ...):
//! their checks, and the lazy layer's options built from them.

use std::time::Duration;

use super::{field_err, ConfigError, Options, SUN_PATH_TOO_LONG};
use crate::lazy::source::SourceSpec;
use crate::lazy::LazyOptions;
use crate::remote::{RemoteOptions, S3Overrides};

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
    pub(super) fn validate_lazy(&self) -> Result<(), ConfigError> {
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
            check_url("image_url", url, &["http", "https", "s3", "ubiblk"])?;
            if self.stripe_source() {
                super::stripe::check_stripe_url(url)?;
            }
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

impl Options {
    /// The lazy layer's options; `None` without a source (`self` must be valid).
    pub fn lazy_options(&self) -> Option<LazyOptions> {
        let source = if let Some(path) = &self.image_path {
            SourceSpec::File(path.clone())
        } else if let Some(url) = self.image_url.as_ref().filter(|_| self.stripe_source()) {
            SourceSpec::StripeServer {
                url: url.clone(),
                psk: self.source_psk(),
            }
        } else if let Some(url) = &self.image_url {
            SourceSpec::Url(url.clone())
        } else {
            SourceSpec::Archive(self.archive_url.clone()?)
        };
        let defaults = RemoteOptions::default();
        let secs = |v: Option<u32>, default: Duration| {
            v.map_or(default, |s| Duration::from_secs(s.into()))
        };
        Some(LazyOptions {
            source,
            fetchers: self.fetch_connections.map(usize::from),
            remote: RemoteOptions {
                connections: self
                    .fetch_connections
                    .map_or(defaults.connections, usize::from),
                attempt_timeout: secs(self.fetch_timeout_secs, defaults.attempt_timeout),
                retry_budget: secs(self.fetch_retry_secs, defaults.retry_budget),
                s3: S3Overrides {
                    endpoint: self.s3_endpoint.clone(),
                    region: self.s3_region.clone(),
                    profile: self.s3_profile.clone(),
                },
            },
            // Validation guarantees metadata_path with a source.
            metadata_path: self.metadata_path.clone()?,
            copy_on_read: self.copy_on_read,
            autofetch: self.autofetch,
            autofetch_mib_per_sec: self.autofetch_mib_per_sec,
            archive_kek: None,
            standby: false,
        })
    }
}
