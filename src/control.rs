//! The control socket (`control_socket`): a unix stream socket taking one command per line,
//! for any disk.
//!
//! `status` answers one line of JSON: the device's facts, whether a frontend is connected, and
//! with lazy fetch its progress ([`LazyStatus`], flattened in); anything else answers
//! `{"error":"unknown command",...}`. Connections are served one thread each, at most
//! [`MAX_CONNECTIONS`] at once (more are closed unanswered); a client may send several
//! commands, and one silent for [`IO_TIMEOUT`] is disconnected. The data path never waits for
//! it: the answers read atomics and short-lived locks the queues do not take.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;

use crate::lazy::{LazyDevice, LazyStatus};
use crate::sockpath::{self, Perms, SocketError, SocketFile};

/// Longest command line accepted; longer input closes the connection.
const MAX_LINE: u64 = 4096;

/// What the control socket reports on and acts upon: one disk's backend.
pub struct Control {
    pub facts: DeviceFacts,
    /// When the backend started (for `uptime_secs`).
    pub started: Instant,
    /// Whether a frontend (VMM) is connected; the vhost loop keeps it current.
    pub connected: Arc<AtomicBool>,
    /// The lazy-fetch layer, with a source.
    pub lazy: Option<Arc<LazyDevice>>,
}

/// What the config and the opened stack say about the device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceFacts {
    pub device_id: String,
    /// The size the guest sees, in bytes.
    pub size_bytes: u64,
    pub num_queues: u16,
    pub readonly: bool,
    pub encrypted: bool,
}

/// The `status` reply: the device, then the lazy fields (absent without lazy fetch).
#[derive(Serialize)]
struct Status<'a> {
    #[serde(flatten)]
    lazy: Option<LazyStatus>,
    #[serde(flatten)]
    facts: &'a DeviceFacts,
    uptime_secs: u64,
    connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `control_socket` could not be claimed (the error names the field).
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot start the control socket thread")]
    Thread(#[source] std::io::Error),
}

/// Claims `path` with the rules of [`crate::sockpath`] (a stale socket is replaced, anything
/// else refused), mode 0600, and serves it on a background thread. The returned
/// [`SocketFile`] removes the socket file when dropped.
pub fn serve(path: &Path, control: Arc<Control>) -> Result<SocketFile, ControlError> {
    // Status is not secret, but only the operator should talk to the backend.
    let (listener, file) = sockpath::listen("control_socket", path, &Perms::private())?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, control))
        .map_err(ControlError::Thread)?;
    Ok(file)
}

/// Most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;

/// A connection silent this long is closed (and a reply not taken this long).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed accept (e.g. EMFILE): the error persists until a descriptor is freed,
/// and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accept failures and refused connections are each logged at most once per this interval
/// (with the number since the last line), whatever clients do.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts occurrences of one event and says when a line about them is due.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Counts one occurrence; `Some(n)` (occurrences since the last line, this one included)
    /// when a line is due.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

fn accept_loop(listener: UnixListener, control: Arc<Control>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut failures = Throttle::default();
    let mut refusals = Throttle::default();
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(n) = failures.hit(Instant::now()) {
                    warn!(
                        "control socket: accept failed ({n} since the last line): {e}; \
                         retrying every {ACCEPT_BACKOFF:?}"
                    );
                }
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            if let Some(n) = refusals.hit(Instant::now()) {
                warn!(
                    "control socket: {MAX_CONNECTIONS} connections open, closed {n} new ones \
                     unanswered since the last line"
                );
            }
            drop(stream);
            continue;
        }
        let guard = Slot(active.clone());
        let control = control.clone();
        if std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _guard = guard;
                handle(stream, &control);
            })
            .is_err()
        {
            // The closure (stream and slot) was dropped: the client sees the connection close.
            std::thread::sleep(ACCEPT_BACKOFF);
        }
    }
}

/// One counted connection; frees its slot when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The commands, for the error reply to an unknown one.
const COMMANDS: &[&str] = &["status"];

#[derive(Serialize)]
struct Unknown<'a> {
    error: &'static str,
    command: &'a str,
    commands: &'static [&'static str],
}

impl Control {
    /// The answer to one command line (without its newline).
    pub fn answer(&self, line: &str) -> String {
        let line = line.trim();
        let (command, _arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match command {
            "status" => serde_json::to_string(&self.status()),
            _ => serde_json::to_string(&Unknown {
                error: "unknown command",
                command: line,
                commands: COMMANDS,
            }),
        };
        // Serializing numbers, flags and strings cannot fail; say so if it ever does.
        reply.unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the reply: {e}\"}}"))
    }

    fn status(&self) -> Status<'_> {
        Status {
            lazy: self.lazy.as_ref().map(|l| l.status()),
            facts: &self.facts,
            uptime_secs: self.started.elapsed().as_secs(),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }
}

fn handle(stream: UnixStream, control: &Control) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = control.answer(&line);
        if out.write_all((reply + "\n").as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Control {
        Control {
            facts: DeviceFacts {
                device_id: "vm1-disk0".into(),
                size_bytes: 1 << 30,
                num_queues: 2,
                readonly: false,
                encrypted: true,
            },
            started: Instant::now(),
            connected: Arc::new(AtomicBool::new(false)),
            lazy: None,
        }
    }

    #[test]
    fn status_of_a_plain_disk_and_unknown_commands() {
        let c = control();
        assert_eq!(
            c.answer("status\n"),
            "{\"device_id\":\"vm1-disk0\",\"size_bytes\":1073741824,\"num_queues\":2,\
             \"readonly\":false,\"encrypted\":true,\"uptime_secs\":0,\"connected\":false}"
        );
        c.connected.store(true, Ordering::Relaxed);
        assert!(c.answer(" status ").ends_with("\"connected\":true}"));
        let e = c.answer("bogus\" x\n");
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"], "unknown command");
        assert_eq!(v["command"], "bogus\" x");
        assert!(v["commands"].as_array().unwrap().contains(&"status".into()));
    }

    #[test]
    fn throttle_logs_once_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.hit(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(t.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit(t0 + LOG_INTERVAL), Some(1000));
        assert_eq!(t.hit(t0 + LOG_INTERVAL), None);
    }
}
