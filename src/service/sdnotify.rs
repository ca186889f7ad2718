//! Service-manager notifications (systemd's `sd_notify(3)` protocol) for `Type=notify` units.
//!
//! The manager passes the address of a datagram socket in `NOTIFY_SOCKET`: a file system path
//! (`/run/systemd/notify`) or, starting with `@`, an abstract name. Each notification is one
//! datagram of newline-separated `KEY=VALUE` lines. Without `NOTIFY_SOCKET` (not started by a
//! service manager) nothing is sent; a failure to send is logged as a warning and never stops
//! the backend: it serves with or without the manager knowing.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

use log::warn;

/// The environment variable holding the manager's socket address.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an @abstract name")]
    Address(OsString),
    #[error("cannot send to NOTIFY_SOCKET {addr:?}: {source}")]
    Send { addr: OsString, source: io::Error },
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram to the socket `addr`
/// (an absolute path, or `@name` for an abstract socket).
pub fn send_to(addr: &OsStr, state: &str) -> Result<(), NotifyError> {
    let bytes = addr.as_bytes();
    let target = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(Path::new(addr)),
        _ => return Err(NotifyError::Address(addr.to_owned())),
    };
    let send_error = |source| NotifyError::Send {
        addr: addr.to_owned(),
        source,
    };
    let target = target.map_err(send_error)?;
    let sock = UnixDatagram::unbound().map_err(send_error)?;
    let sent = sock
        .send_to_addr(state.as_bytes(), &target)
        .map_err(send_error)?;
    if sent != state.len() {
        return Err(send_error(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        )));
    }
    Ok(())
}

/// Sends `state` to the manager named by `NOTIFY_SOCKET`. `Ok(false)` when it is not set.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(addr) => send_to(&addr, state).map(|()| true),
        None => Ok(false),
    }
}

/// The `READY=1` notification: the backend listens on `socket`. It carries the main PID (the
/// notification may come from any thread) and a status line for `systemctl status`.
pub fn ready_message(socket: &Path) -> String {
    format!(
        "READY=1\nSTATUS=serving {}\nMAINPID={}\n",
        one_line(&socket.display().to_string()),
        std::process::id()
    )
}

/// The `STOPPING=1` notification, sent when a SIGTERM or SIGINT starts the shutdown.
pub const STOPPING: &str = "STOPPING=1\nSTATUS=stopping\n";

/// Tells the manager the backend is ready (it listens on `socket`); a failure is a warning.
pub fn ready(socket: &Path) {
    warn_on_failure(notify(&ready_message(socket)));
}

/// Tells the manager the backend is stopping; a failure is a warning.
pub fn stopping() {
    warn_on_failure(notify(STOPPING));
}

fn warn_on_failure(result: Result<bool, NotifyError>) {
    if let Err(e) = result {
        warn!("cannot notify the service manager: {e}");
    }
}

/// `text` with line breaks replaced by spaces: a value must not start a new `KEY=` line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receiver(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let msg = ready_message(Path::new("/run/ubiblk/vm1.sock"));
        send_to(path.as_os_str(), &msg).unwrap();
        let got = receiver(&sock);
        assert_eq!(got, msg);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines[0], "READY=1");
        assert_eq!(lines[1], "STATUS=serving /run/ubiblk/vm1.sock");
        assert_eq!(lines[2], format!("MAINPID={}", std::process::id()));
        send_to(path.as_os_str(), STOPPING).unwrap();
        assert_eq!(receiver(&sock), "STOPPING=1\nSTATUS=stopping\n");
    }

    #[test]
    fn sends_to_an_abstract_name() {
        let name = format!("ubiblk-notify-unit-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(OsStr::new(&format!("@{name}")), STOPPING).unwrap();
        assert_eq!(receiver(&sock), STOPPING);
    }

    #[test]
    fn a_path_with_a_line_break_stays_on_the_status_line() {
        let msg = ready_message(Path::new("/run/a\nREADY=0.sock"));
        assert_eq!(msg.lines().count(), 3, "{msg}");
        assert!(
            msg.contains("STATUS=serving /run/a READY=0.sock\n"),
            "{msg}"
        );
    }

    #[test]
    fn failures_are_errors_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody-listens");
        let e = send_to(missing.as_os_str(), STOPPING).unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e}");
        assert!(e.to_string().contains("nobody-listens"), "{e}");
        for bad in ["", "relative/notify", "vsock:2:1"] {
            let e = send_to(OsStr::new(bad), STOPPING).unwrap_err();
            assert!(matches!(e, NotifyError::Address(_)), "{bad}: {e}");
        }
        // A path too long for sun_path is an error too, not a panic.
        let long = format!("/{}", "x".repeat(200));
        assert!(send_to(OsStr::new(&long), STOPPING).is_err());
    }
}
