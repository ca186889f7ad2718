//! Child processes of a test, killed and reaped on drop: [`ChildGuard`], and [`CpuHogs`], the
//! CPU-bound neighbours of the polling tests and benchmarks.

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::scratch_dir;

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

/// A child process that is killed (SIGKILL) and reaped on drop. Its stdout/stderr go to a log
/// file inside a private temp dir.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
    // Keeps the config / log files alive; removed last.
    pub(crate) _dir: tempfile::TempDir,
}

impl ChildGuard {
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
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
