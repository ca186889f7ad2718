//! Where S3 requests go and how they are signed, found the way every AWS tool finds it: the
//! environment, then the shared files (`~/.aws/credentials`, `~/.aws/config`), with the
//! configuration's `s3_*` fields over both.
//!
//! Order, first found wins:
//! - profile: `s3_profile`, `AWS_PROFILE`, `default`;
//! - credentials: with `s3_profile` set, that profile's; else `AWS_ACCESS_KEY_ID` +
//!   `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), then the profile in the credentials
//!   file, then in the config file; none: unsigned requests (public buckets);
//! - region: `s3_region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`,
//!   `us-east-1`;
//! - endpoint: `s3_endpoint`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's
//!   `endpoint_url`, else AWS (`https://s3.REGION.amazonaws.com`, virtual-host addressing).
//!
//! Every lookup goes through an [`Env`], so tests pass a map instead of the process's
//! environment.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::remote::S3Overrides;

/// The environment lookups go through.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned().filter(|v| !v.is_empty())
    }
}

/// A secret (a secret key, a session token): zeroed when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An access key: the id is not secret (it shows in signed URLs), the rest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key_id: String,
    pub secret: Secret,
    pub token: Option<Secret>,
    /// Where they came from, for the log ("environment", "profile x in FILE").
    pub origin: String,
}

/// Everything needed to address and sign S3 requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub region: String,
    /// A custom endpoint (self-hosted stores; path-style addressing), or `None` for AWS.
    pub endpoint: Option<String>,
    pub credentials: Option<Credentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("the AWS profile {profile:?} is in neither {credentials} nor {config}")]
    NoProfile {
        profile: String,
        credentials: String,
        config: String,
    },
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("{what}: {key} is set without {missing}")]
    Incomplete {
        what: String,
        key: &'static str,
        missing: &'static str,
    },
}

/// Resolves the S3 settings from `env` (and the files it points to) under `overrides`.
pub fn resolve(env: &dyn Env, overrides: &S3Overrides) -> Result<AwsConfig, AwsError> {
    let home = env.var("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        env.var(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let cred_path = file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let conf_path = file("AWS_CONFIG_FILE", "config");
    let explicit_profile = overrides.profile.clone().or_else(|| env.var("AWS_PROFILE"));
    let profile = explicit_profile
        .clone()
        .unwrap_or_else(|| "default".to_string());

    let cred_file = read_ini(cred_path.as_ref())?;
    let conf_file = read_ini(conf_path.as_ref())?;
    let conf_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let from_creds = cred_file.get(&profile);
    // `[default]` may also be written `[profile default]`.
    let from_conf = conf_file
        .get(&conf_section)
        .or_else(|| conf_file.get(&format!("profile {profile}")));
    if explicit_profile.is_some() && from_creds.is_none() && from_conf.is_none() {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("(no file)".to_string(), |p| p.display().to_string())
        };
        return Err(AwsError::NoProfile {
            profile,
            credentials: show(&cred_path),
            config: show(&conf_path),
        });
    }
    let profile_value = |key: &str| {
        from_creds
            .and_then(|s| s.get(key))
            .or_else(|| from_conf.and_then(|s| s.get(key)))
            .cloned()
    };
    let plain = |key: &str| profile_value(key).map(|v| v.expose().to_string());

    let from_env = || -> Result<Option<Credentials>, AwsError> {
        credentials(
            env.var("AWS_ACCESS_KEY_ID"),
            env.var("AWS_SECRET_ACCESS_KEY").map(Secret::new),
            env.var("AWS_SESSION_TOKEN").map(Secret::new),
            "the environment",
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        )
    };
    let from_profile = || -> Result<Option<Credentials>, AwsError> {
        let origin = match (from_creds, &cred_path, &conf_path) {
            (Some(_), Some(p), _) | (None, _, Some(p)) => {
                format!("profile {profile} in {}", p.display())
            }
            _ => format!("profile {profile}"),
        };
        credentials(
            plain("aws_access_key_id"),
            profile_value("aws_secret_access_key"),
            profile_value("aws_session_token"),
            &origin,
            ("aws_access_key_id", "aws_secret_access_key"),
        )
    };
    let credentials = if overrides.profile.is_some() {
        from_profile()?
    } else {
        match from_env()? {
            Some(c) => Some(c),
            None => from_profile()?,
        }
    };

    let region = overrides
        .region
        .clone()
        .or_else(|| env.var("AWS_REGION"))
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .or_else(|| plain("region"))
        .unwrap_or_else(|| "us-east-1".to_string());
    let endpoint = overrides
        .endpoint
        .clone()
        .or_else(|| env.var("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env.var("AWS_ENDPOINT_URL"))
        .or_else(|| plain("endpoint_url"));
    Ok(AwsConfig {
        region,
        endpoint,
        credentials,
    })
}

/// Credentials from a key id, secret and token found together; half a pair is an error
/// (silently sending unsigned requests would hide the mistake).
fn credentials(
    key_id: Option<String>,
    secret: Option<Secret>,
    token: Option<Secret>,
    origin: &str,
    (key_name, secret_name): (&'static str, &'static str),
) -> Result<Option<Credentials>, AwsError> {
    match (key_id, secret) {
        (Some(key_id), Some(secret)) => Ok(Some(Credentials {
            key_id,
            secret,
            token,
            origin: origin.to_string(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(AwsError::Incomplete {
            what: origin.to_string(),
            key: key_name,
            missing: secret_name,
        }),
        (None, Some(_)) => Err(AwsError::Incomplete {
            what: origin.to_string(),
            key: secret_name,
            missing: key_name,
        }),
    }
}

/// Sections of an INI file: section name -> key -> value (values may be secrets: every one is
/// kept as one, zeroed when dropped).
type Ini = HashMap<String, HashMap<String, Secret>>;

/// Reads an AWS INI file; a missing one is empty.
fn read_ini(path: Option<&PathBuf>) -> Result<Ini, AwsError> {
    let Some(path) = path else {
        return Ok(Ini::new());
    };
    match fs::read_to_string(path) {
        Ok(text) => Ok(parse_ini(&Zeroizing::new(text))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ini::new()),
        Err(source) => Err(AwsError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The subset of INI the AWS files use: `[section]`, `key = value`, `#` and `;` comments.
/// Indented lines (the nested `s3 =` settings of the config file) are skipped; malformed
/// lines are ignored, as the AWS CLI mostly does. Values are never echoed in errors.
fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            ini.entry(name.clone()).or_default();
            section = Some(name);
            continue;
        }
        if let (Some(s), Some((k, v))) = (&section, line.split_once('=')) {
            let v = v.trim();
            if !v.is_empty() {
                if let Some(map) = ini.get_mut(s) {
                    map.insert(k.trim().to_ascii_lowercase(), Secret::new(v.to_string()));
                }
            }
        }
    }
    ini
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(credentials: &str, config: &str) -> Files {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join(".aws")).unwrap();
            fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
            fs::write(dir.path().join(".aws/config"), config).unwrap();
            Files { dir }
        }
        fn home(&self) -> String {
            self.dir.path().display().to_string()
        }
    }

    const CREDS: &str = "# comment\n[default]\naws_access_key_id = AKDEFAULT\n\
                         aws_secret_access_key = secret-default\n\n[other]\n\
                         aws_access_key_id=AKOTHER\naws_secret_access_key=secret-other\n\
                         aws_session_token = tok-other\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile other]\n\
                          region = garage\nendpoint_url = http://127.0.0.1:3900\n\
                          s3 =\n  addressing_style = path\n\n[profile conf-only]\n\
                          aws_access_key_id = AKCONF\naws_secret_access_key = secret-conf\n";

    #[test]
    fn defaults_without_anything() {
        let c = resolve(&env(&[]), &S3Overrides::default()).unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.credentials, None);
    }

    #[test]
    fn environment_wins_over_files() {
        let f = Files::new(CREDS, CONFIG);
        let e = env(&[
            ("HOME", &f.home()),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "secret-env"),
            ("AWS_SESSION_TOKEN", "tok-env"),
            ("AWS_REGION", "us-west-2"),
            ("AWS_DEFAULT_REGION", "ignored"),
            ("AWS_ENDPOINT_URL", "http://general"),
            ("AWS_ENDPOINT_URL_S3", "http://s3-specific"),
        ]);
        let c = resolve(&e, &S3Overrides::default()).unwrap();
        let cred = c.credentials.unwrap();
        assert_eq!(cred.key_id, "AKENV");
        assert_eq!(cred.secret.expose(), "secret-env");
        assert_eq!(cred.token.unwrap().expose(), "tok-env");
        assert_eq!(c.region, "us-west-2");
        assert_eq!(c.endpoint.as_deref(), Some("http://s3-specific"));
    }

    #[test]
    fn default_profile_from_files() {
        let f = Files::new(CREDS, CONFIG);
        let c = resolve(&env(&[("HOME", &f.home())]), &S3Overrides::default()).unwrap();
        let cred = c.credentials.unwrap();
        assert_eq!(
            (cred.key_id.as_str(), cred.secret.expose()),
            ("AKDEFAULT", "secret-default")
        );
        assert!(cred.token.is_none());
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.endpoint, None);
    }

    #[test]
    fn named_profile_from_env_and_from_override() {
        let f = Files::new(CREDS, CONFIG);
        let e = env(&[("HOME", &f.home()), ("AWS_PROFILE", "other")]);
        let c = resolve(&e, &S3Overrides::default()).unwrap();
        assert_eq!(c.credentials.as_ref().unwrap().key_id, "AKOTHER");
        assert_eq!(c.region, "garage");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:3900"));

        // s3_profile wins over AWS_PROFILE and over the environment's keys.
        let e = env(&[
            ("HOME", &f.home()),
            ("AWS_PROFILE", "default"),
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "secret-env"),
        ]);
        let o = S3Overrides {
            profile: Some("conf-only".into()),
            region: Some("r1".into()),
            endpoint: Some("http://override".into()),
        };
        let c = resolve(&e, &o).unwrap();
        assert_eq!(c.credentials.unwrap().key_id, "AKCONF");
        assert_eq!(c.region, "r1");
        assert_eq!(c.endpoint.as_deref(), Some("http://override"));
    }

    #[test]
    fn file_locations_from_env() {
        let f = Files::new("", "");
        let creds = f.dir.path().join("c");
        let conf = f.dir.path().join("k");
        fs::write(
            &creds,
            "[p]\naws_access_key_id = AKP\naws_secret_access_key = sp\n",
        )
        .unwrap();
        fs::write(&conf, "[profile p]\nregion = r-p\n").unwrap();
        let e = env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", &creds.display().to_string()),
            ("AWS_CONFIG_FILE", &conf.display().to_string()),
            ("AWS_PROFILE", "p"),
        ]);
        let c = resolve(&e, &S3Overrides::default()).unwrap();
        assert_eq!(c.credentials.unwrap().key_id, "AKP");
        assert_eq!(c.region, "r-p");
    }

    #[test]
    fn errors_never_show_secrets() {
        let f = Files::new(CREDS, CONFIG);
        let e = env(&[("HOME", &f.home()), ("AWS_PROFILE", "nope")]);
        let err = resolve(&e, &S3Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"nope\""), "{err}");

        let e = env(&[("AWS_SECRET_ACCESS_KEY", "hunter2")]);
        let err = resolve(&e, &S3Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        let e = env(&[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("AWS_SESSION_TOKEN", "tok-hunter3"),
        ]);
        let c = resolve(&e, &S3Overrides::default()).unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("hunter3"),
            "{dbg}"
        );
        assert!(dbg.contains("AK"));
    }

    #[test]
    fn ini_parsing() {
        let ini = parse_ini(
            "top = ignored\n[ a ]\nk = v = w\n; c\n#c\n  nested = x\nK2=\n[profile   b]\nx=1\n",
        );
        assert_eq!(ini["a"]["k"].expose(), "v = w");
        assert!(!ini["a"].contains_key("nested"));
        assert!(!ini["a"].contains_key("k2"));
        assert_eq!(ini["profile b"]["x"].expose(), "1");
        assert!(!ini.contains_key(""));
    }
}
