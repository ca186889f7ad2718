//! The control socket: [`ControlStatus`] (the `status` reply) and [`control_command`].

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

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
    /// Whether this backend has the disk (false: standing by for another backend).
    pub disk_owner: bool,
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
