//! Start-up shared by the binaries: logging, the config and KEK flags, and how a failure is
//! reported (`tool: error: cause: ...` on stderr, then a non-zero exit status).

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{ConfigError, Options};
use crate::crypto::keys::{Kek, KekArgs, KeyError};
use crate::crypto::Xts;
pub use crate::sys::error_chain;

/// Logs to stderr at `default_filter` (e.g. `info`) unless `RUST_LOG` says otherwise. Records
/// from the rust-vmm crates, which a guest can trigger at will, are rate-limited
/// ([`crate::sys::ratelog`]); a second call does nothing.
pub fn init_logging(default_filter: &str) {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
            .build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(crate::sys::ratelog::RateLimitedLogger::new(
        logger,
    )))
    .is_ok()
    {
        log::set_max_level(max);
    }
}

/// `-f CONFIG_YAML` and the KEK flags, for every tool that reads the backend's config.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Path to the backend YAML configuration file.
    #[arg(short = 'f', long = "config", value_name = "CONFIG_YAML")]
    pub config: PathBuf,
    #[command(flatten)]
    pub kek: KekArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl ConfigArgs {
    /// The config and its data cipher (`None` without `encryption_key`). The KEK file is read
    /// (and, with `--unlink-kek`, deleted) first, before the config: whatever fails after
    /// that, a missing or invalid config included, it is gone.
    pub fn load(&self) -> Result<(Options, Option<Arc<Xts>>), LoadError> {
        let (opts, keys) = self.load_keys(false)?;
        Ok((opts, keys.cipher))
    }

    /// [`ConfigArgs::load`], keeping the KEK too: it also unwraps a disk archive's key (for
    /// `archive_url`, and for the `archive` tool, which says so with `for_archive`). A KEK
    /// without `encryption_key` is then accepted when it has that use.
    pub fn load_keys(&self, for_archive: bool) -> Result<(Options, Keys), LoadError> {
        let kek = self.kek.read()?;
        let opts = Options::load(&self.config)?;
        let for_archive = for_archive || opts.archive_url.is_some();
        let (cipher, kek) = kek.keys_for(opts.encryption_key.as_deref(), for_archive)?;
        let keys = Keys {
            cipher: cipher.map(Arc::new),
            kek: kek.map(Arc::new),
        };
        Ok((opts, keys))
    }
}

/// What [`ConfigArgs::load_keys`] returns besides the config.
pub struct Keys {
    /// The data cipher, from `encryption_key`.
    pub cipher: Option<Arc<Xts>>,
    /// The parsed `--kek` file.
    pub kek: Option<Arc<Kek>>,
}

/// What a tool's `main` returns for `result`: its status on success; on error, the error chain
/// printed as `tool: ...` on stderr and exit status `failure`.
pub fn finish<E>(tool: &str, result: Result<ExitCode, E>, failure: u8) -> ExitCode
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{tool}: {}", error_chain(e.into().as_ref()));
            ExitCode::from(failure)
        }
    }
}

/// [`finish`] for the usual case: exit status 0, or 1 on error.
pub fn exit<E>(tool: &str, result: Result<(), E>) -> ExitCode
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    finish(tool, result.map(|()| ExitCode::SUCCESS), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Tool {
        #[command(flatten)]
        config: ConfigArgs,
    }

    fn load(args: &[&str]) -> Result<(Options, Option<Arc<Xts>>), LoadError> {
        Tool::try_parse_from(std::iter::once("tool").chain(args.iter().copied()))
            .unwrap()
            .config
            .load()
    }

    #[test]
    fn each_cause_is_printed_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let e = load(&["-f", missing.to_str().unwrap()]).err().unwrap();
        let text = error_chain(&e);
        assert!(text.starts_with("cannot read config file "), "{text}");
        assert!(text.contains("missing.yaml"), "{text}");
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }

    #[test]
    fn loads_the_cipher_after_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let key =
            |b: u8| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b; 32]);
        let (plain, enc, kek) = (
            dir.path().join("plain.yaml"),
            dir.path().join("enc.yaml"),
            dir.path().join("kek.yaml"),
        );
        std::fs::write(&plain, "path: /d\nsocket: /s\n").unwrap();
        let enc_text = format!(
            "path: /d\nsocket: /s\nencryption_key: [\"{}\", \"{}\"]\n",
            key(1),
            key(2)
        );
        std::fs::write(&enc, enc_text).unwrap();
        std::fs::write(&kek, "method: none\n").unwrap();
        let (plain, enc, kek) = (
            plain.to_str().unwrap(),
            enc.to_str().unwrap(),
            kek.to_str().unwrap(),
        );

        let (opts, cipher) = load(&["-f", plain]).unwrap();
        assert_eq!(opts.path, PathBuf::from("/d"));
        assert!(cipher.is_none());
        assert!(load(&["-f", enc]).unwrap().1.is_some());
        // A KEK without keys to unwrap is refused, and with --unlink-kek it is gone anyway.
        let e = load(&["-f", plain, "--kek", kek, "--unlink-kek"])
            .err()
            .unwrap();
        assert!(matches!(e, LoadError::Key(_)), "{e}");
        assert!(!Path::new(kek).exists());
    }

    /// A KEK that protects a disk archive (the `archive` tool, a config with `archive_url`) is
    /// kept and accepted without `encryption_key`; with no such use it is still refused.
    #[test]
    fn the_kek_is_kept_for_archives() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, archived, kek) = (
            dir.path().join("plain.yaml"),
            dir.path().join("archived.yaml"),
            dir.path().join("kek.yaml"),
        );
        std::fs::write(&plain, "path: /d\nsocket: /s\n").unwrap();
        std::fs::write(
            &archived,
            "path: /d\nsocket: /s\narchive_url: file:///a\nmetadata_path: /m\n",
        )
        .unwrap();
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
        let iv = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 12]);
        std::fs::write(
            &kek,
            format!("method: aes256-gcm\nkey: {key}\ninit_vector: {iv}\nauth_data: \"\"\n"),
        )
        .unwrap();
        let args = |config: &Path| {
            Tool::try_parse_from([
                "tool",
                "-f",
                config.to_str().unwrap(),
                "-k",
                kek.to_str().unwrap(),
            ])
            .unwrap()
            .config
        };
        assert!(matches!(args(&plain).load(), Err(LoadError::Key(_))));
        let (_, keys) = args(&plain).load_keys(true).unwrap();
        assert!(keys.cipher.is_none());
        assert!(matches!(keys.kek.as_deref(), Some(Kek::Aes256Gcm { .. })));
        assert!(args(&archived).load().is_ok());
        let (_, keys) = args(&archived).load_keys(false).unwrap();
        assert!(keys.kek.is_some());
        assert!(!format!("{:?}", keys.kek).contains(&key[..8]));
    }

    /// `--unlink-kek` removes the KEK whatever fails: the config (missing, not YAML, an invalid
    /// field) or the KEK itself.
    #[test]
    fn unlink_kek_removes_it_on_every_failure() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let kek = dir.path().join("kek.yaml");
        let key =
            |b: u8| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b; 32]);
        let keys = format!("encryption_key: [\"{}\", \"{}\"]\n", key(1), key(2));
        let cases = [
            (None, "method: none\n", "cannot read config file"),
            (Some("path: [\n"), "method: none\n", "invalid config file"),
            (
                Some("path: /d\nsocket: /s\nnum_queues: 0\n"),
                "method: none\n",
                "num_queues",
            ),
            (
                Some("path: /d\nsocket: /s\nbogus: 1\n"),
                "method: none\n",
                "bogus",
            ),
            (Some(""), "method: none\n", "invalid config file"),
            (Some(keys.as_str()), "method: rot13\n", "method"),
            (Some(keys.as_str()), "not: [yaml\n", "--kek"),
        ];
        for (config, kek_text, want) in cases {
            let cfg = dir.path().join("config.yaml");
            let _ = std::fs::remove_file(&cfg);
            if let Some(text) = config {
                let text = if text.starts_with("encryption_key") {
                    format!("path: {d}/disk\nsocket: {d}/sock\n{text}")
                } else {
                    text.to_string()
                };
                std::fs::write(&cfg, text).unwrap();
            }
            std::fs::write(&kek, kek_text).unwrap();
            let e = load(&[
                "-f",
                cfg.to_str().unwrap(),
                "-k",
                kek.to_str().unwrap(),
                "-u",
            ])
            .err()
            .unwrap();
            assert!(error_chain(&e).contains(want), "{config:?}: {e}");
            assert!(!kek.exists(), "{config:?}: the KEK is still there");
        }
    }

    #[test]
    fn failure_status_and_success_status() {
        assert_eq!(exit::<std::io::Error>("t", Ok(())), ExitCode::SUCCESS);
        let e = std::io::Error::other("boom");
        assert_eq!(exit("t", Err(e)), ExitCode::from(1));
        let e = std::io::Error::other("boom");
        assert_eq!(finish("t", Err(e), 2), ExitCode::from(2));
        assert_eq!(
            finish::<std::io::Error>("t", Ok(ExitCode::from(1)), 2),
            ExitCode::from(1)
        );
    }
}
