//! Moving a disk host to host: `stripe_server:` (serve this disk's stripes), the `ubiblk://`
//! source's `psk_identity` and `psk_file`, and `danger_zone` (plaintext, by explicit opt-in
//! only, in the reference v0.5's shape).

use serde::Deserialize;
use std::path::PathBuf;

use super::{field_err, ConfigError, Options};
use crate::stripe::tls::PskSpec;

/// `stripe_server:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StripeServerOptions {
    /// `host:port` to listen on (port 0: any free port, logged).
    pub listen: String,
    #[serde(default)]
    pub psk_identity: Option<String>,
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
}

/// `danger_zone:`: overrides of safety rules, each named loudly (the reference v0.5's shape:
/// nothing applies unless `enabled` is true too).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DangerZone {
    #[serde(default)]
    pub enabled: bool,
    /// The stripe server and the `ubiblk://` source without TLS: anyone on the path reads
    /// (and can change) the disk.
    #[serde(default)]
    pub allow_unencrypted_connection: bool,
}

const PLAINTEXT: &str =
    "is required: connections are TLS-PSK; plaintext needs danger_zone: {enabled: true, \
     allow_unencrypted_connection: true}";

impl Options {
    /// Whether the config opts into unencrypted stripe connections.
    pub fn allows_plaintext(&self) -> bool {
        self.danger_zone
            .as_ref()
            .is_some_and(|d| d.enabled && d.allow_unencrypted_connection)
    }

    /// Whether the source is a stripe server (`image_url: ubiblk://...`).
    pub fn stripe_source(&self) -> bool {
        self.image_url
            .as_deref()
            .is_some_and(|u| u.starts_with("ubiblk://"))
    }

    /// The `ubiblk://` source's PSK; `None` without one (plaintext, checked by validation).
    pub fn source_psk(&self) -> Option<PskSpec> {
        Some(PskSpec {
            identity: self.psk_identity.clone()?,
            file: self.psk_file.clone()?,
        })
    }

    pub(super) fn validate_stripe(&self) -> Result<(), ConfigError> {
        if let Some(d) = &self.danger_zone {
            if d.allow_unencrypted_connection && !d.enabled {
                return Err(field_err(
                    "danger_zone.allow_unencrypted_connection",
                    "has no effect without danger_zone.enabled: true",
                ));
            }
        }
        if let Some(server) = &self.stripe_server {
            check_listen(&server.listen)?;
            check_psk(
                ("stripe_server.psk_identity", &server.psk_identity),
                ("stripe_server.psk_file", &server.psk_file),
                self.allows_plaintext(),
            )?;
        }
        if self.stripe_source() {
            check_psk(
                ("psk_identity", &self.psk_identity),
                ("psk_file", &self.psk_file),
                self.allows_plaintext(),
            )?;
        } else {
            for (set, field) in [
                (self.psk_identity.is_some(), "psk_identity"),
                (self.psk_file.is_some(), "psk_file"),
            ] {
                if set {
                    return Err(field_err(
                        field,
                        "needs image_url: ubiblk://HOST:PORT (the stripe server's PSK; the \
                         server's own is stripe_server.psk_file)",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `ubiblk://HOST:PORT`, nothing after the port.
pub(super) fn check_stripe_url(url: &str) -> Result<(), ConfigError> {
    let rest = url.strip_prefix("ubiblk://").unwrap_or_default();
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(field_err(
            "image_url",
            "ubiblk://HOST:PORT takes no path, query or fragment",
        ));
    }
    check_host_port("image_url", rest)
}

fn check_listen(listen: &str) -> Result<(), ConfigError> {
    check_host_port("stripe_server.listen", listen)
}

fn check_host_port(field: &'static str, s: &str) -> Result<(), ConfigError> {
    let bad = || field_err(field, "must be HOST:PORT (an IPv6 address in brackets)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    if host.starts_with('[') != host.ends_with(']') {
        return Err(bad());
    }
    Ok(())
}

fn check_psk(
    (id_field, identity): (&'static str, &Option<String>),
    (file_field, file): (&'static str, &Option<PathBuf>),
    plaintext_allowed: bool,
) -> Result<(), ConfigError> {
    match (identity, file) {
        (Some(identity), Some(file)) => {
            if let Err(e) = crate::stripe::Psk::new(identity, vec![0; 16]) {
                let problem = e.to_string();
                let problem = problem.strip_prefix("psk_identity: ").unwrap_or(&problem);
                return Err(field_err(id_field, problem.to_string()));
            }
            if file.as_os_str().is_empty() {
                return Err(field_err(file_field, "must not be empty"));
            }
            Ok(())
        }
        (Some(_), None) => Err(field_err(file_field, "is required with psk_identity")),
        (None, Some(_)) => Err(field_err(id_field, "is required with psk_file")),
        (None, None) if plaintext_allowed => Ok(()),
        (None, None) => Err(field_err(file_field, PLAINTEXT)),
    }
}
