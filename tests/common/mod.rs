//! Shared helpers for integration tests and benchmarks.
//!
//! * [`Backend`]: starts `vhost-backend --config <yaml>` and kills it on drop.
//! * [`Qsd`] / [`start_qsd`]: the same for `qemu-storage-daemon` (reference backend).
//! * [`Client`]: a userspace virtio-blk driver (libblkio, `virtio-blk-vhost-user`) connected to
//!   a vhost-user-blk socket, with synchronous helpers and a low-level submit/reap API
//!   ([`QueueIo`]) for issuing many requests in flight.
//! * [`servers`]: real HTTP (nginx) and S3 (Garage) servers for the remote-source tests.
//!
//! Include from a bench with `#[path = "../tests/common/mod.rs"] mod common;`.

#![allow(dead_code)]

pub mod servers;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// `n` CPU-bound neighbour processes (`sh -c 'while :; do :; done'`), killed on drop: the
/// "busy host" of the polling tests and benchmarks.
pub struct CpuHogs(Vec<ChildGuard>);

impl CpuHogs {
    pub fn start(n: usize) -> anyhow::Result<CpuHogs> {
        let hogs = (0..n)
            .map(|i| {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", "while :; do :; done"]);
                ChildGuard::spawn(&format!("hog{i}"), cmd, scratch_dir("ubiblk-hog"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Let them reach the run queue before anything is measured.
        std::thread::sleep(Duration::from_millis(200));
        Ok(CpuHogs(hogs))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Default time to wait for a backend's socket to appear.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Child process guard
// ---------------------------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped on drop. Its stdout/stderr go to a log
/// file inside a private temp dir.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
    // Keeps the config / log files alive; removed last.
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    fn spawn(name: &str, mut cmd: Command, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let log_path = dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to spawn {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            log_path,
            exit_status: None,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Path of the file receiving the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the child wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Returns the exit status if the child has exited (non-blocking).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.exit_status = Some(st);
                }
            }
        }
        self.exit_status
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, sig: i32) {
        if let Some(child) = self.child.as_ref() {
            if self.exit_status.is_none() {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours; the child
                // is not reaped yet (exit_status is None), so its pid is still ours to signal.
                unsafe { libc::kill(child.id() as libc::pid_t, sig) };
            }
        }
    }

    /// Kills the child (SIGKILL) and reaps it. Returns its exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            if self.exit_status.is_none() {
                let _ = child.kill();
                self.exit_status = child.wait().ok();
            }
        }
        self.exit_status
    }

    /// Waits until `socket` exists as a Unix socket. Fails if the child exits first or on
    /// timeout; the error includes the child's log.
    ///
    /// Note: the socket is only checked for existence, never connected to (a vhost-user backend
    /// may serve only one connection). There is a tiny window between bind() and listen();
    /// [`Client::connect`] retries ECONNREFUSED to cover it.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(
            &format!("create socket {}", socket.display()),
            timeout,
            || fs::symlink_metadata(socket).is_ok_and(|md| md.file_type().is_socket()),
        )
    }

    /// Waits until a connection to `socket` succeeds (the child listens on it), then closes
    /// that connection. Fails if the child exits first or on timeout; the error includes the
    /// child's log. A vhost-user backend sees the connection come and go and keeps serving.
    pub fn wait_listening(&mut self, socket: &Path, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("listen on {}", socket.display()), timeout, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        })
    }

    /// Polls `ready` every 5 ms until it holds. Fails if the child exits first or after
    /// `timeout`, saying that it did not `what` and with the child's log.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(st) = self.try_wait() {
                bail!(
                    "{} (pid {}) exited with {st} before it could {what}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {} to {what}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Our backend
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// The lazy-fetch control socket
// ---------------------------------------------------------------------------------------------

/// One `status` reply of `control_socket` (docs/lazy-fetch.md): every field must be there,
/// with its type.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ControlStatus {
    pub stripes: u64,
    pub fetched: u64,
    pub written: u64,
    pub fetching: u64,
    pub fetch_errors: u64,
    pub complete: bool,
    pub stripe_bytes: u64,
    pub copy_on_read: bool,
    pub autofetch: bool,
    /// The reply, trimmed.
    #[serde(skip)]
    pub raw: String,
}

impl ControlStatus {
    /// Sends `status` on a fresh connection and reads the one-line reply.
    pub fn query(sock: &Path) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut s = std::os::unix::net::UnixStream::connect(sock)
            .with_context(|| format!("connecting to control socket {}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"status\n")
            .context("sending `status` on the control socket")?;
        let mut line = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut line)
            .context("reading the status reply")?;
        anyhow::ensure!(
            line.ends_with('\n'),
            "status reply is not one line: {line:?}"
        );
        let raw = line.trim().to_string();
        let status: ControlStatus = serde_json::from_str(&raw)
            .with_context(|| format!("status reply is not the status JSON: {raw}"))?;
        Ok(ControlStatus { raw, ..status })
    }
}

/// Sends one command line on a fresh connection to the control socket `sock` and returns the
/// one-line reply, trimmed.
pub fn control_command(sock: &Path, line: &str) -> anyhow::Result<String> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to control socket {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("sending {line:?} on the control socket"))?;
    let mut reply = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut reply)
        .context("reading the reply")?;
    anyhow::ensure!(reply.ends_with('\n'), "reply is not one line: {reply:?}");
    Ok(reply.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon
// ---------------------------------------------------------------------------------------------

pub const QSD_BIN: &str = "/usr/bin/qemu-storage-daemon";

#[derive(Clone, Debug)]
pub struct QsdOptions {
    pub num_queues: usize,
    /// `cache.direct=on` (O_DIRECT). tmpfs supports O_DIRECT since Linux 6.6.
    pub direct: bool,
    /// `aio=` value ("io_uring", "native", "threads").
    pub aio: String,
    pub writable: bool,
    /// Run the export in an iothread (`--object iothread,id=iot0 ... iothread=iot0`).
    pub iothread: bool,
    pub extra_args: Vec<String>,
}

impl Default for QsdOptions {
    fn default() -> Self {
        QsdOptions {
            num_queues: 1,
            direct: true,
            aio: "io_uring".into(),
            writable: true,
            iothread: false,
            extra_args: Vec::new(),
        }
    }
}

/// A running qemu-storage-daemon exporting a raw file as vhost-user-blk.
pub struct Qsd {
    pub guard: ChildGuard,
    pub socket: PathBuf,
}

impl Qsd {
    pub fn start(file: &Path, socket: &Path, opts: &QsdOptions) -> anyhow::Result<Qsd> {
        let dir = tempfile::Builder::new().prefix("ubiblk-qsd").tempdir()?;
        let _ = fs::remove_file(socket);
        let mut cmd = Command::new(QSD_BIN);
        if opts.iothread {
            cmd.arg("--object").arg("iothread,id=iot0");
        }
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f,filename={},cache.direct={},aio={}",
            qemu_escape(&file.to_string_lossy()),
            on_off(opts.direct),
            opts.aio
        ));
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
            qemu_escape(&socket.to_string_lossy()),
            on_off(opts.writable),
            opts.num_queues
        );
        if opts.iothread {
            export += ",iothread=iot0";
        }
        cmd.arg("--export").arg(export);
        cmd.args(&opts.extra_args);
        let mut guard = ChildGuard::spawn("qemu-storage-daemon", cmd, dir)?;
        guard.wait_for_socket(socket, SOCKET_TIMEOUT)?;
        Ok(Qsd {
            guard,
            socket: socket.to_path_buf(),
        })
    }
}

/// `qemu-storage-daemon` with `cache.direct=on,aio=io_uring`, writable, `num_queues` queues.
pub fn start_qsd(file: &Path, socket: &Path, num_queues: usize) -> anyhow::Result<Qsd> {
    Qsd::start(
        file,
        socket,
        &QsdOptions {
            num_queues,
            ..Default::default()
        },
    )
}

/// Same as [`start_qsd`] but with `cache.direct=off` (for filesystems rejecting O_DIRECT).
pub fn start_qsd_buffered(file: &Path, socket: &Path, num_queues: usize) -> anyhow::Result<Qsd> {
    Qsd::start(
        file,
        socket,
        &QsdOptions {
            num_queues,
            direct: false,
            ..Default::default()
        },
    )
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// QEMU option values escape ',' as ",,".
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Whether `path` can be opened with O_DIRECT (tmpfs: yes since Linux 6.6).
pub fn supports_o_direct(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// Disk images
// ---------------------------------------------------------------------------------------------

/// Deterministic content of the 4 KiB block `block` (for images made by [`create_pattern_file`]).
pub fn pattern_block(block: u64, out: &mut [u8]) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out.chunks_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Expected content of `len` bytes at `offset` of a pattern file.
pub fn pattern_bytes(offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut block_buf = vec![0u8; 4096];
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let block = abs / 4096;
        let in_block = (abs % 4096) as usize;
        pattern_block(block, &mut block_buf);
        let n = (4096 - in_block).min(len - pos);
        out[pos..pos + n].copy_from_slice(&block_buf[in_block..in_block + n]);
        pos += n;
    }
    out
}

/// The files of a lazy-fetch disk in a scratch directory: a base disk of `disk_len` bytes of
/// `base_fill`, an image, the metadata path and a control socket, and a backend config naming
/// them (plus `extra` lines). [`LazyFiles::init_metadata`] makes the metadata.
pub struct LazyFiles {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub image: PathBuf,
    pub meta: PathBuf,
    pub ctl: PathBuf,
    pub config: BackendConfig,
}

impl LazyFiles {
    pub fn new(prefix: &str, disk_len: u64, base_fill: u8, image: &[u8], extra: &[&str]) -> Self {
        let dir = scratch_dir(prefix);
        let d = dir.path();
        let (base, image_path, meta, ctl) = (
            d.join("base.raw"),
            d.join("image.raw"),
            d.join("meta"),
            d.join("ctl.sock"),
        );
        fs::write(&base, vec![base_fill; disk_len as usize]).unwrap();
        fs::write(&image_path, image).unwrap();
        let mut config = BackendConfig::new(&base, d.join("vhost.sock"))
            .extra_path("image_path", &image_path)
            .extra_path("metadata_path", &meta)
            .extra_path("control_socket", &ctl);
        for line in extra {
            config = config.extra(*line);
        }
        LazyFiles {
            dir,
            base,
            image: image_path,
            meta,
            ctl,
            config,
        }
    }

    /// Writes the config to `config.yaml` in the directory and returns its path.
    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("config.yaml");
        fs::write(&path, self.config.to_yaml()).unwrap();
        path
    }

    /// Runs `init_bin` (init-metadata) on the config with stripes of 2^`shift` sectors.
    pub fn init_metadata(&self, init_bin: &str, shift: u8) {
        let out = Command::new(init_bin)
            .arg("-f")
            .arg(self.config_file())
            .args(["-s", &shift.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "init-metadata: {out:?}");
    }
}

/// A fresh temporary directory for one test's disk, socket and logs: in /dev/shm (tmpfs, fast,
/// O_DIRECT-capable here) when possible, else the default temp dir.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::Builder::new().prefix(prefix).tempdir())
        .expect("cannot create a temporary directory")
}

/// Creates (or truncates) a fully-allocated file of `size` bytes (multiple of 4096) filled with
/// [`pattern_block`] data.
pub fn create_pattern_file(path: &Path, size: u64) -> anyhow::Result<()> {
    assert!(size.is_multiple_of(4096));
    let mut f = File::create(path)?;
    let chunk_blocks = 256u64; // 1 MiB
    let mut buf = vec![0u8; (chunk_blocks * 4096) as usize];
    let mut block = 0u64;
    let total_blocks = size / 4096;
    while block < total_blocks {
        let n = chunk_blocks.min(total_blocks - block);
        for i in 0..n {
            let s = (i * 4096) as usize;
            pattern_block(block + i, &mut buf[s..s + 4096]);
        }
        f.write_all(&buf[..(n * 4096) as usize])?;
        block += n;
    }
    f.sync_all()?;
    Ok(())
}

/// Reads `len` bytes at `offset` directly from a file (to check what the backend wrote).
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Client (libblkio virtio-blk-vhost-user)
// ---------------------------------------------------------------------------------------------

/// I/O result: `Err(errno)` with a positive errno. Device status codes are mapped by libblkio:
/// VIRTIO_BLK_S_IOERR -> EIO, VIRTIO_BLK_S_UNSUPP -> ENOTSUP, anything else -> EPROTO.
/// Client-side rejections: EBADF (write on a client opened read-only), ENOTSUP (discard /
/// write-zeroes without the feature), EINVAL (offset not a multiple of 512).
pub type IoResult<T> = Result<T, i32>;

/// Formats an errno for assertion messages.
pub fn errno_name(e: i32) -> String {
    format!("{} ({})", std::io::Error::from_raw_os_error(e), e)
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: usize,
    /// virtqueue size (power of two); `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
    /// Must be true to connect to a device offering VIRTIO_BLK_F_RO (otherwise start() fails with
    /// EROFS). With it set, libblkio rejects writes *client-side* with EBADF.
    pub read_only: bool,
    /// Size of the shared memory region used for I/O buffers; split evenly between queues.
    pub mem_size: usize,
    /// How long to retry connecting while the socket refuses connections.
    pub connect_timeout: Duration,
    /// Timeout of the synchronous helpers (`Err(ETIME)` when exceeded); `None` = forever.
    pub io_timeout: Option<Duration>,
    /// Make the `num_queues` queues libblkio poll queues: no completion eventfd, `reap` spins
    /// on the used ring (a busy-polling client, like SPDK or ubicloud's blkbench).
    pub poll_queues: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: None,
            read_only: false,
            mem_size: 8 << 20,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(30)),
            poll_queues: false,
        }
    }
}

/// Device properties read after connecting.
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub max_queues: i32,
    pub max_segments: i32,
    pub max_segment_len: i32,
    pub max_transfer: i32,
    pub request_alignment: i32,
    pub optimal_io_alignment: i32,
    pub max_discard_len: u64,
    pub discard_alignment: i32,
    pub max_write_zeroes_len: u64,
    pub flush_needed: bool,
    pub max_mem_regions: u64,
}

/// Error returned by [`Client::connect`]: the failing step plus libblkio's errno/message.
#[derive(Debug)]
pub struct ClientError {
    pub step: &'static str,
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "blkio {} failed: {} ({})",
            self.step,
            self.message,
            errno_name(self.errno)
        )
    }
}

impl std::error::Error for ClientError {}

fn cerr(step: &'static str) -> impl FnOnce(blkio::Error) -> ClientError {
    move |e| ClientError {
        step,
        errno: e.errno().raw_os_error(),
        message: e.message().to_string(),
    }
}

/// One virtqueue plus its slice of the shared buffer region. `Send`, so it can be driven from a
/// (scoped) thread: `std::thread::scope(|s| for q in client.queues_mut() { s.spawn(...) })`.
pub struct QueueIo {
    q: Blkioq,
    index: usize,
    buf_addr: usize,
    buf_len: usize,
    completions: Vec<MaybeUninit<Completion>>,
    in_flight: usize,
    io_timeout: Option<Duration>,
}

/// One completed request: `user_data` as submitted and `ret` (0 or negative errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

impl QueueIo {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Size of this queue's buffer area.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// This queue's buffer area (inside the driver's mapped memory region).
    pub fn buf(&self) -> &[u8] {
        // SAFETY: [buf_addr, +buf_len) is this queue's part of the Client's region, a zero-filled
        // shared memfd mapping that stays mapped until the Client (which owns this QueueIo and
        // only lends it out) drops its Blkio; no other queue's area overlaps it. The device
        // writes into it only for requests in flight, which callers reap before reading it.
        unsafe { std::slice::from_raw_parts(self.buf_addr as *const u8, self.buf_len) }
    }

    pub fn buf_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `buf`; `&mut self` makes this the only slice of the area in this process.
        unsafe { std::slice::from_raw_parts_mut(self.buf_addr as *mut u8, self.buf_len) }
    }

    /// Requests submitted but not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn ptr(&self, buf_off: usize, len: usize) -> *mut u8 {
        assert!(
            buf_off
                .checked_add(len)
                .is_some_and(|end| end <= self.buf_len),
            "buffer [{buf_off}, +{len}) exceeds queue buffer area of {} bytes; raise ClientOptions::mem_size",
            self.buf_len
        );
        (self.buf_addr + buf_off) as *mut u8
    }

    // ----- asynchronous API: submit_*() then reap() -----

    /// Queues a read of `len` bytes at disk `offset` into `buf()[buf_off..]`.
    pub fn submit_read(&mut self, offset: u64, buf_off: usize, len: usize, user_data: usize) {
        let p = self.ptr(buf_off, len);
        self.q.read(offset, p, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Queues a write of `buf()[buf_off..buf_off+len]` to disk `offset`.
    pub fn submit_write(&mut self, offset: u64, buf_off: usize, len: usize, user_data: usize) {
        self.submit_write_flags(offset, buf_off, len, user_data, ReqFlags::empty());
    }

    /// `flags` may contain `ReqFlags::FUA` (libblkio emulates it with a flush after the write).
    pub fn submit_write_flags(
        &mut self,
        offset: u64,
        buf_off: usize,
        len: usize,
        user_data: usize,
        flags: ReqFlags,
    ) {
        let p = self.ptr(buf_off, len);
        self.q.write(offset, p, len, user_data, flags);
        self.in_flight += 1;
    }

    /// Queues a scatter-gather read; `iov` must stay alive until the request completes (libblkio
    /// keeps the pointer if the ring is full).
    pub fn submit_readv_raw(&mut self, offset: u64, iov: &[libc::iovec], user_data: usize) {
        self.q.readv(
            offset,
            iov.as_ptr(),
            iov.len() as u32,
            user_data,
            ReqFlags::empty(),
        );
        self.in_flight += 1;
    }

    /// Queues a scatter-gather write; `iov` must stay alive until the request completes.
    pub fn submit_writev_raw(&mut self, offset: u64, iov: &[libc::iovec], user_data: usize) {
        self.q.writev(
            offset,
            iov.as_ptr(),
            iov.len() as u32,
            user_data,
            ReqFlags::empty(),
        );
        self.in_flight += 1;
    }

    pub fn submit_flush(&mut self, user_data: usize) {
        self.q.flush(user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    pub fn submit_discard(&mut self, offset: u64, len: u64, user_data: usize) {
        self.q.discard(offset, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// `unmap`: allow the device to deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, user_data: usize) {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, user_data, flags);
        self.in_flight += 1;
    }

    /// Kicks the device and reaps between `min` and `out.len()`-limited completions, blocking
    /// on the completion eventfd (no busy polling) until at least `min` are available.
    /// Appends to `out` and returns how many were appended. `timeout`: `None` waits forever.
    pub fn reap(
        &mut self,
        min: usize,
        out: &mut Vec<Done>,
        timeout: Option<Duration>,
    ) -> IoResult<usize> {
        let min = min.min(self.in_flight);
        let cap = self.in_flight.max(1);
        if self.completions.len() < cap {
            self.completions.resize_with(cap, MaybeUninit::uninit);
        }
        let mut t = timeout;
        let n = self
            .q
            .do_io(&mut self.completions[..cap], min, t.as_mut(), None)
            .map_err(|e| e.errno().raw_os_error())?;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialized the first `n` entries of the slice it was given.
            let c = unsafe { c.assume_init_ref() };
            out.push(Done {
                user_data: c.user_data,
                ret: c.ret,
            });
        }
        self.in_flight -= n;
        Ok(n)
    }

    /// Fast-path variant of [`reap`](Self::reap) for benchmarks: calls `f(user_data, ret)` for
    /// each completion without allocating. Returns `Err(ETIME)` on timeout.
    pub fn reap_with(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        mut f: impl FnMut(usize, i32),
    ) -> IoResult<usize> {
        let min = min.min(self.in_flight);
        let cap = self.in_flight.max(1);
        if self.completions.len() < cap {
            self.completions.resize_with(cap, MaybeUninit::uninit);
        }
        let mut t = timeout;
        let n = self
            .q
            .do_io(&mut self.completions[..cap], min, t.as_mut(), None)
            .map_err(|e| e.errno().raw_os_error())?;
        self.in_flight -= n;
        for c in &self.completions[..n] {
            // SAFETY: do_io initialized the first `n` entries of the slice it was given.
            let c = unsafe { c.assume_init_ref() };
            f(c.user_data, c.ret);
        }
        Ok(n)
    }

    /// Waits for everything in flight; returns the completions.
    pub fn drain(&mut self) -> IoResult<Vec<Done>> {
        let mut out = Vec::new();
        while self.in_flight > 0 {
            let want = self.in_flight;
            self.reap(want, &mut out, None)?;
        }
        Ok(out)
    }

    /// Submit-then-wait for a single request (nothing else must be in flight).
    fn wait_one(&mut self) -> IoResult<()> {
        assert_eq!(
            self.in_flight, 1,
            "sync helper used with requests in flight"
        );
        let done = self.drain()?;
        assert_eq!(done.len(), 1);
        if done[0].ret < 0 {
            Err(-done[0].ret)
        } else {
            Ok(())
        }
    }

    // ----- synchronous helpers (use the start of this queue's buffer area) -----

    pub fn read(&mut self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        self.submit_read(offset, 0, len, 0);
        self.wait_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.buf_mut()[..data.len()].copy_from_slice(data);
        self.submit_write(offset, 0, data.len(), 0);
        self.wait_one()
    }

    /// Write with `ReqFlags::FUA`.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.buf_mut()[..data.len()].copy_from_slice(data);
        self.submit_write_flags(offset, 0, data.len(), 0, ReqFlags::FUA);
        self.wait_one()
    }

    /// Scatter-gather write where the caller chooses each segment's position in the buffer
    /// area: `segs` = [(buf_off, data)]. Segments are written to disk back to back from
    /// `offset`.
    pub fn writev_at(&mut self, offset: u64, segs: &[(usize, &[u8])]) -> IoResult<()> {
        let mut iov = Vec::with_capacity(segs.len());
        for (buf_off, data) in segs {
            let p = self.ptr(*buf_off, data.len());
            // SAFETY: ptr() checked that [buf_off, +len) lies in this queue's mapped area (see
            // `buf`); `data` cannot borrow that area while we hold `&mut self`, so no overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            iov.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: data.len(),
            });
        }
        self.submit_writev_raw(offset, &iov, 0);
        self.wait_one()
    }

    /// Scatter-gather write; segments are placed at odd multiples of 512 in the buffer area
    /// (see [`scattered_offsets`]), so they are neither page aligned nor adjacent.
    pub fn writev(&mut self, offset: u64, bufs: &[&[u8]]) -> IoResult<()> {
        let offs = scattered_offsets(bufs.iter().map(|b| b.len()));
        let segs: Vec<(usize, &[u8])> = offs.into_iter().zip(bufs.iter().copied()).collect();
        self.writev_at(offset, &segs)
    }

    /// Scatter-gather read into caller-chosen positions: `segs` = [(buf_off, len)].
    pub fn readv_at(&mut self, offset: u64, segs: &[(usize, usize)]) -> IoResult<Vec<Vec<u8>>> {
        let iov: Vec<libc::iovec> = segs
            .iter()
            .map(|&(off, len)| libc::iovec {
                iov_base: self.ptr(off, len) as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        self.submit_readv_raw(offset, &iov, 0);
        self.wait_one()?;
        let buf = self.buf();
        Ok(segs
            .iter()
            .map(|&(off, len)| buf[off..off + len].to_vec())
            .collect())
    }

    /// Scatter-gather read into segments of the given lengths placed like [`writev`](Self::writev).
    pub fn readv(&mut self, offset: u64, lens: &[usize]) -> IoResult<Vec<Vec<u8>>> {
        let offs = scattered_offsets(lens.iter().copied());
        let segs: Vec<(usize, usize)> = offs.into_iter().zip(lens.iter().copied()).collect();
        self.readv_at(offset, &segs)
    }

    pub fn flush(&mut self) -> IoResult<()> {
        self.submit_flush(0);
        self.wait_one()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> IoResult<()> {
        self.submit_discard(offset, len, 0);
        self.wait_one()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        self.submit_write_zeroes(offset, len, unmap, 0);
        self.wait_one()
    }
}

/// Buffer offsets for segments of the given lengths: always odd multiples of 512 (so never
/// page aligned), first at 512, each next one at least 512 bytes after the previous segment.
pub fn scattered_offsets(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut off = 512usize;
    let mut out = Vec::new();
    for len in lens {
        out.push(off);
        off = (off + len + 512).div_ceil(512) * 512;
        if (off / 512).is_multiple_of(2) {
            off += 512;
        }
    }
    out
}

/// A connected libblkio `virtio-blk-vhost-user` instance with `num_queues` started queues and
/// one mapped memory region split evenly between them.
pub struct Client {
    // Field order matters: queues must be dropped before the Blkio instance.
    queues: Vec<QueueIo>,
    region: MemoryRegion,
    blkio: Blkio,
    pub info: DeviceInfo,
}

impl Client {
    /// Connects with default options and `num_queues` queues.
    pub fn connect_queues(socket: &Path, num_queues: usize) -> Result<Client, ClientError> {
        Self::connect(
            socket,
            &ClientOptions {
                num_queues,
                ..Default::default()
            },
        )
    }

    /// Connects to a vhost-user-blk socket. Retries while the socket refuses connections (up to
    /// `opts.connect_timeout`), so it can be called right after the socket file appears.
    pub fn connect(socket: &Path, opts: &ClientOptions) -> Result<Client, ClientError> {
        let deadline = Instant::now() + opts.connect_timeout;
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(cerr("new"))?;
            b.set_str("path", &socket.to_string_lossy())
                .map_err(cerr("set path"))?;
            b.set_bool("read-only", opts.read_only)
                .map_err(cerr("set read-only"))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == blkio::Errno::CONNREFUSED
                        || e.errno() == blkio::Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(cerr("connect")(e)),
            }
        };
        let (irq_queues, poll_queues) = if opts.poll_queues {
            (0, opts.num_queues)
        } else {
            (opts.num_queues, 0)
        };
        blkio
            .set_i32("num-queues", irq_queues as i32)
            .map_err(cerr("set num-queues"))?;
        blkio
            .set_i32("num-poll-queues", poll_queues as i32)
            .map_err(cerr("set num-poll-queues"))?;
        if let Some(qs) = opts.queue_size {
            blkio
                .set_i32("queue-size", qs as i32)
                .map_err(cerr("set queue-size"))?;
        }
        let info = DeviceInfo {
            capacity: blkio.get_u64("capacity").map_err(cerr("get capacity"))?,
            max_queues: blkio
                .get_i32("max-queues")
                .map_err(cerr("get max-queues"))?,
            max_segments: blkio.get_i32("max-segments").unwrap_or(0),
            max_segment_len: blkio.get_i32("max-segment-len").unwrap_or(0),
            max_transfer: blkio.get_i32("max-transfer").unwrap_or(0),
            request_alignment: blkio.get_i32("request-alignment").unwrap_or(0),
            optimal_io_alignment: blkio.get_i32("optimal-io-alignment").unwrap_or(0),
            max_discard_len: blkio.get_u64("max-discard-len").unwrap_or(0),
            discard_alignment: blkio.get_i32("discard-alignment").unwrap_or(0),
            max_write_zeroes_len: blkio.get_u64("max-write-zeroes-len").unwrap_or(0),
            flush_needed: blkio.get_bool("flush-needed").unwrap_or(false),
            max_mem_regions: blkio.get_u64("max-mem-regions").unwrap_or(0),
        };
        let started = blkio.start().map_err(cerr("start"))?;

        let page = 4096usize;
        let per_queue = (opts.mem_size / opts.num_queues.max(1)) / page * page;
        let mem_size = (per_queue * opts.num_queues.max(1)).max(page);
        let region = blkio
            .alloc_mem_region(mem_size)
            .map_err(cerr("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(cerr("map_mem_region"))?;

        let queues = started
            .queues
            .into_iter()
            .chain(started.poll_queues)
            .enumerate()
            .map(|(i, q)| QueueIo {
                q,
                index: i,
                buf_addr: region.addr + i * per_queue,
                buf_len: per_queue,
                completions: Vec::new(),
                in_flight: 0,
                io_timeout: opts.io_timeout,
            })
            .collect();
        Ok(Client {
            queues,
            region,
            blkio,
            info,
        })
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Disk size in bytes (libblkio "capacity" = config.capacity * 512).
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap_or(self.info.capacity)
    }

    /// libblkio's "read-only" property (what the client was opened with, NOT the device's
    /// VIRTIO_BLK_F_RO bit; connecting read-write to an RO device fails in start() with EROFS).
    pub fn read_only(&self) -> bool {
        self.blkio.get_bool("read-only").unwrap_or(false)
    }

    /// Raw libblkio access for other properties.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    pub fn queue(&mut self, q: usize) -> &mut QueueIo {
        &mut self.queues[q]
    }

    /// All queues, e.g. to drive them from scoped threads.
    pub fn queues_mut(&mut self) -> &mut [QueueIo] {
        &mut self.queues
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        self.queues[q].read(offset, len)
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> IoResult<()> {
        self.queues[q].write(offset, data)
    }

    pub fn write_fua(&mut self, q: usize, offset: u64, data: &[u8]) -> IoResult<()> {
        self.queues[q].write_fua(offset, data)
    }

    pub fn writev(&mut self, q: usize, offset: u64, bufs: &[&[u8]]) -> IoResult<()> {
        self.queues[q].writev(offset, bufs)
    }

    pub fn writev_at(&mut self, q: usize, offset: u64, segs: &[(usize, &[u8])]) -> IoResult<()> {
        self.queues[q].writev_at(offset, segs)
    }

    pub fn readv(&mut self, q: usize, offset: u64, lens: &[usize]) -> IoResult<Vec<Vec<u8>>> {
        self.queues[q].readv(offset, lens)
    }

    pub fn readv_at(
        &mut self,
        q: usize,
        offset: u64,
        segs: &[(usize, usize)],
    ) -> IoResult<Vec<Vec<u8>>> {
        self.queues[q].readv_at(offset, segs)
    }

    pub fn flush(&mut self, q: usize) -> IoResult<()> {
        self.queues[q].flush()
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> IoResult<()> {
        self.queues[q].discard(offset, len)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        self.queues[q].write_zeroes(offset, len, unmap)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Queues first (they reference the driver's rings), then the region, then the driver.
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Convenience: error out with context if an I/O result is Err.
pub fn io_ok<T>(r: IoResult<T>, what: &str) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{what}: {}", errno_name(e)))
}
