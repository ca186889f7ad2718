//! The control socket's server: claiming the socket, one thread per connection (at most
//! [`MAX_CONNECTIONS`]), line framing and timeouts, and logs that clients cannot flood.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;

use super::{Control, ControlError};
use crate::sys::socket::{self, Perms, SocketFile};

/// Longest command line accepted; longer input closes the connection.
const MAX_LINE: u64 = 4096;

/// Claims `path` with the rules of [`crate::sys::socket`] (a stale socket is replaced, anything
/// else refused), mode 0600, and serves it on a background thread. The returned
/// [`SocketFile`] removes the socket file when dropped.
pub fn serve(path: &Path, control: Arc<Control>) -> Result<SocketFile, ControlError> {
    // Status is not secret, but only the operator should talk to the backend.
    let (listener, file) = socket::listen("control_socket", path, &Perms::private())?;
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
pub(super) const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts occurrences of one event and says when a line about them is due.
#[derive(Default)]
pub(super) struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Counts one occurrence; `Some(n)` (occurrences since the last line, this one included)
    /// when a line is due.
    pub(super) fn hit(&mut self, now: Instant) -> Option<u64> {
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

fn handle(stream: UnixStream, control: &Control) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut bytes = Vec::new();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) if !bytes.ends_with(b"\n") && bytes.len() as u64 >= MAX_LINE => return,
            Ok(_) => {}
        }
        let reply = match std::str::from_utf8(&bytes) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => control.answer(line),
            Err(_) => "{\"error\":\"command is not UTF-8\"}".to_string(),
        };
        if out.write_all((reply + "\n").as_bytes()).is_err() {
            return;
        }
    }
}
