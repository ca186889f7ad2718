//! Our backend: [`BackendConfig`] (its YAML) and [`Backend`], a running `vhost-backend`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::ChildGuard;

/// Default time to wait for a backend's socket to appear.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of `vhost-backend` (serialized to YAML).
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub path: PathBuf,
    pub socket: PathBuf,
    pub num_queues: usize,
    pub queue_size: u16,
    pub seg_size_max: u32,
    pub seg_count_max: u32,
    pub poll_queue_timeout_us: u64,
    pub readonly: Option<bool>,
    pub device_id: Option<String>,
    pub skip_sync: Option<bool>,
    /// Extra raw YAML lines appended verbatim (e.g. `"encryption_key: ..."`).
    pub extra_yaml: Vec<String>,
}

impl BackendConfig {
    pub fn new(path: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        BackendConfig {
            path: path.into(),
            socket: socket.into(),
            num_queues: 1,
            queue_size: 256,
            seg_size_max: 65536,
            seg_count_max: 16,
            poll_queue_timeout_us: 500,
            readonly: None,
            device_id: None,
            skip_sync: None,
            extra_yaml: Vec::new(),
        }
    }

    pub fn num_queues(mut self, n: usize) -> Self {
        self.num_queues = n;
        self
    }

    pub fn readonly(mut self, ro: bool) -> Self {
        self.readonly = Some(ro);
        self
    }

    pub fn device_id(mut self, id: &str) -> Self {
        self.device_id = Some(id.to_string());
        self
    }

    pub fn skip_sync(mut self, skip: bool) -> Self {
        self.skip_sync = Some(skip);
        self
    }

    pub fn extra(mut self, line: impl Into<String>) -> Self {
        self.extra_yaml.push(line.into());
        self
    }

    /// An extra `key: "path"` line.
    pub fn extra_path(self, key: &str, path: &Path) -> Self {
        self.extra(format!("{key}: {}", yaml_str(&path.to_string_lossy())))
    }

    /// The YAML text. A top-level key given in an `extra` line replaces the default line for it.
    pub fn to_yaml(&self) -> String {
        let overridden: Vec<&str> = self
            .extra_yaml
            .iter()
            .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim()))
            .collect();
        let mut lines = vec![
            ("path", yaml_str(&self.path.to_string_lossy())),
            ("socket", yaml_str(&self.socket.to_string_lossy())),
            ("num_queues", self.num_queues.to_string()),
            ("queue_size", self.queue_size.to_string()),
            ("seg_size_max", self.seg_size_max.to_string()),
            ("seg_count_max", self.seg_count_max.to_string()),
            (
                "poll_queue_timeout_us",
                self.poll_queue_timeout_us.to_string(),
            ),
        ];
        if let Some(ro) = self.readonly {
            lines.push(("readonly", ro.to_string()));
        }
        if let Some(id) = &self.device_id {
            lines.push(("device_id", yaml_str(id)));
        }
        if let Some(s) = self.skip_sync {
            lines.push(("skip_sync", s.to_string()));
        }
        let mut y = String::new();
        for (key, value) in lines {
            if !overridden.contains(&key) {
                y += &format!("{key}: {value}\n");
            }
        }
        for line in &self.extra_yaml {
            y += line;
            if !line.ends_with('\n') {
                y.push('\n');
            }
        }
        y
    }
}

/// Double-quoted YAML scalar.
pub fn yaml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running `vhost-backend`. Killed and reaped on drop.
pub struct Backend {
    pub guard: ChildGuard,
    pub config: BackendConfig,
    pub config_path: PathBuf,
}

impl Backend {
    /// Writes `config` as YAML to a temp dir, starts `bin --config <yaml>` and waits (up to
    /// [`SOCKET_TIMEOUT`]) for `config.socket` to appear. A stale socket file is removed first.
    pub fn start(bin: impl AsRef<Path>, config: &BackendConfig) -> anyhow::Result<Backend> {
        Self::start_with_args(bin, config, &[])
    }

    /// Like [`Backend::start`] with extra command-line arguments after `--config <yaml>`.
    pub fn start_with_args(
        bin: impl AsRef<Path>,
        config: &BackendConfig,
        extra_args: &[&str],
    ) -> anyhow::Result<Backend> {
        Self::start_with_env(bin, config, extra_args, &[])
    }

    /// Like [`Backend::start_with_args`] with `env` added to the backend's environment (e.g.
    /// the AWS settings of an S3 source).
    pub fn start_with_env(
        bin: impl AsRef<Path>,
        config: &BackendConfig,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Backend> {
        let guard = Self::spawn_with_env(bin, config, extra_args, env)?;
        let mut be = Backend {
            guard,
            config: config.clone(),
            config_path: PathBuf::new(),
        };
        be.config_path = be.guard._dir.path().join("config.yaml");
        be.guard.wait_for_socket(&config.socket, SOCKET_TIMEOUT)?;
        Ok(be)
    }

    /// Starts the process without waiting for the socket (for tests expecting a startup
    /// failure: use `guard.wait_timeout()` and `guard.log()`).
    pub fn spawn(
        bin: impl AsRef<Path>,
        config: &BackendConfig,
        extra_args: &[&str],
    ) -> anyhow::Result<ChildGuard> {
        Self::spawn_with_env(bin, config, extra_args, &[])
    }

    /// [`Backend::spawn`] with `env` added to the backend's environment.
    pub fn spawn_with_env(
        bin: impl AsRef<Path>,
        config: &BackendConfig,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<ChildGuard> {
        match fs::remove_file(&config.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing stale socket"),
        }
        Self::spawn_as_is(bin, config, extra_args, |cmd| {
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
        })
    }

    /// Like [`Backend::spawn`], but leaves whatever is at `config.socket` alone (the backend's
    /// own rules for an existing path are under test), and lets `customize` adjust the command
    /// (e.g. set a umask in `pre_exec`).
    pub fn spawn_as_is(
        bin: impl AsRef<Path>,
        config: &BackendConfig,
        extra_args: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> anyhow::Result<ChildGuard> {
        let bin = bin.as_ref();
        if !bin.exists() {
            bail!("backend binary {} does not exist", bin.display());
        }
        let dir = tempfile::Builder::new().prefix("ubiblk-be").tempdir()?;
        let config_path = dir.path().join("config.yaml");
        fs::write(&config_path, config.to_yaml())?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path).args(extra_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        customize(&mut cmd);
        ChildGuard::spawn("vhost-backend", cmd, dir)
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    pub fn log(&self) -> String {
        self.guard.log()
    }
}

/// A `customize` for [`Backend::spawn_as_is`]: the child runs with umask `mask` (e.g. 0, as a
/// careless service manager might leave it).
pub fn umask(mask: libc::mode_t) -> impl FnOnce(&mut Command) {
    move |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: umask(2) is one, and it touches no memory.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask);
                Ok(())
            });
        }
    }
}

/// The address (`HOST:PORT`) a backend's stripe server listens on, from its log (`log`
/// reads it), waiting up to 10 s for the line.
pub fn stripe_server_addr(log: impl Fn() -> String) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = log();
        if let Some(rest) = text.split("stripe server on ").nth(1) {
            return Ok(rest.split(':').take(2).collect::<Vec<_>>().join(":"));
        }
        if std::time::Instant::now() > deadline {
            bail!("no stripe server in the log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
