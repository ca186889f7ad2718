//! The control socket (`control_socket`): a unix stream socket taking one command per line.
//!
//! `status` answers one line of JSON with the lazy-fetch progress ([`LazyStatus`]); anything
//! else answers `{"error":"unknown command",...}`. Connections are served one thread each, at
//! most [`MAX_CONNECTIONS`] at once (more are closed unanswered); a client may send several
//! commands, and one silent for [`IO_TIMEOUT`] is disconnected.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;

use super::{Error, LazyDevice, LazyStatus};
use crate::sockpath::{self, Perms, SocketFile};

/// Longest command line accepted; longer input closes the connection.
const MAX_LINE: u64 = 256;

/// Claims `path` with the rules of [`crate::sockpath`] (a stale socket is replaced, anything
/// else refused), mode 0600, and serves it on a background thread. The returned
/// [`SocketFile`] removes the socket file when dropped.
pub fn serve(path: &Path, device: Arc<LazyDevice>) -> Result<SocketFile, Error> {
    // Status is not secret, but only the operator should talk to the backend.
    let (listener, file) = sockpath::listen("control_socket", path, &Perms::private())?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, device))
        .map_err(|source| Error::Thread {
            what: "the control socket thread",
            source,
        })?;
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

fn accept_loop(listener: UnixListener, device: Arc<LazyDevice>) {
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
        let device = device.clone();
        if std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _guard = guard;
                handle(stream, &device);
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

/// The answers, one JSON object each.
#[derive(Serialize)]
#[serde(untagged)]
enum Reply<'a> {
    Status(LazyStatus),
    Unknown {
        error: &'static str,
        command: &'a str,
        commands: [&'static str; 1],
    },
}

/// The answer to one command line.
pub fn answer(line: &str, device: &LazyDevice) -> serde_json::Result<String> {
    let reply = match line.trim() {
        "status" => Reply::Status(device.status()),
        other => Reply::Unknown {
            error: "unknown command",
            command: other,
            commands: ["status"],
        },
    };
    serde_json::to_string(&reply)
}

fn handle(stream: UnixStream, device: &LazyDevice) {
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
        // Serializing numbers, flags and strings cannot fail; if it did, hang up.
        let Ok(reply) = answer(&line, device) else {
            return;
        };
        if out.write_all((reply + "\n").as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
