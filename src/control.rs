//! The control socket (`control_socket`): a unix stream socket taking one command per line,
//! for any disk.
//!
//! `status` answers one line of JSON: the device's facts, whether a frontend is connected, and
//! with lazy fetch its progress ([`LazyStatus`], flattened in); anything else answers
//! `{"error":"unknown command",...}`. `qos` answers the I/O limits in force (every field of
//! `qos:`, `null` when not limited); `set-qos {JSON}` replaces them all with the object's
//! (fields left out: no limit), checked as the config's are, and answers the new limits; a
//! problem answers `{"error":...}` naming it, and nothing changes. Connections are served one
//! thread each, at most [`MAX_CONNECTIONS`] at once (more are closed unanswered); a client may
//! send several commands, and one silent for [`IO_TIMEOUT`] is disconnected. The data path
//! never waits for it: the answers read atomics and short-lived locks the queues do not take
//! (`set-qos` takes the limits' lock, which queues take while something is limited).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;

use crate::block::Qos;
use crate::config::{QosLimits, QOS_FIELDS};
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
    /// The disk's I/O limits (`qos`, `set-qos`).
    pub qos: Arc<Qos>,
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
const COMMANDS: &[&str] = &["status", "qos", "set-qos"];

#[derive(Serialize)]
struct Unknown<'a> {
    error: &'static str,
    command: &'a str,
    commands: &'static [&'static str],
}

#[derive(Serialize)]
struct Failed {
    error: String,
    command: &'static str,
    usage: &'static str,
}

const SET_QOS_USAGE: &str =
    "set-qos {\"iops_total\":5000,...}: every field of qos: (null or left out: no limit)";

/// The limits `set-qos` was given: a JSON object of `qos` fields, each a non-negative integer
/// or null. The error names the problem (and the field).
fn parse_qos(arg: &str) -> Result<QosLimits, String> {
    if arg.is_empty() {
        return Err("missing the limits (a JSON object)".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(arg).map_err(|e| format!("invalid JSON: {e}"))?;
    let serde_json::Value::Object(map) = &value else {
        return Err("the limits must be a JSON object".into());
    };
    for (key, v) in map {
        if !QOS_FIELDS.contains(&key.as_str()) {
            let key: String = key.chars().take(64).collect();
            return Err(format!("unknown field {key:?}"));
        }
        if !(v.is_null() || v.is_u64()) {
            return Err(format!("{key}: must be a non-negative integer or null"));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("invalid limits: {e}"))
}

impl Control {
    /// The answer to one command line (without its newline).
    pub fn answer(&self, line: &str) -> String {
        let line = line.trim();
        let (command, arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match command {
            "status" => serde_json::to_string(&self.status()),
            "qos" if arg.trim().is_empty() => serde_json::to_string(&self.qos.limits()),
            "set-qos" => match parse_qos(arg.trim())
                .and_then(|l| self.qos.set(l).map_err(|e| e.to_string()))
            {
                Ok(limits) => serde_json::to_string(&limits),
                Err(error) => serde_json::to_string(&Failed {
                    error,
                    command: "set-qos",
                    usage: SET_QOS_USAGE,
                }),
            },
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
            qos: Qos::new(QosLimits::default()).unwrap(),
        }
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn qos_prints_and_set_qos_replaces_the_limits() {
        let c = control();
        let v = json(&c.answer("qos\n"));
        let map = v.as_object().unwrap();
        assert_eq!(map.len(), QOS_FIELDS.len());
        assert!(map.values().all(|v| v.is_null()));
        let v = json(
            &c.answer("set-qos {\"iops_total\":5000,\"iops_total_max\":6000,\"bps_read\":0}\n"),
        );
        assert_eq!(v["iops_total"], 5000);
        assert_eq!(v["iops_total_max"], 6000);
        // 0 is no limit, as in QEMU.
        assert!(v["bps_read"].is_null());
        assert_eq!(json(&c.answer("qos")), v);
        // Everything is replaced: what is left out is no longer limited.
        let v = json(&c.answer("set-qos {\"bps_write\":1048576, \"iops_total\":null}"));
        assert!(v["iops_total"].is_null() && v["iops_total_max"].is_null());
        assert_eq!(v["bps_write"], 1048576);
        assert_eq!(c.qos.limits().bps_write, Some(1 << 20));
    }

    #[test]
    fn bad_set_qos_input_names_the_problem_and_changes_nothing() {
        let c = control();
        c.answer("set-qos {\"iops_read\":100}");
        for (arg, want) in [
            ("", "missing the limits"),
            ("{", "invalid JSON"),
            ("[1]", "must be a JSON object"),
            ("{\"iops_totl\":1}", "unknown field \"iops_totl\""),
            (
                "{\"iops_total\":-1}",
                "iops_total: must be a non-negative integer",
            ),
            (
                "{\"iops_total\":1.5}",
                "iops_total: must be a non-negative integer",
            ),
            (
                "{\"iops_total\":\"5\"}",
                "iops_total: must be a non-negative integer",
            ),
            ("{\"iops_total_max\":5}", "iops_total_max: needs iops_total"),
            (
                "{\"iops_total\":5,\"iops_total_max\":4}",
                "iops_total_max: must not be lower",
            ),
            (
                "{\"iops_total\":5,\"iops_read\":4}",
                "iops_total: cannot be combined with iops_read",
            ),
            ("{\"bps_write\":100}", "bps_write: must be at least 512"),
            (
                "{\"iops_write\":5,\"iops_write_max_length\":4}",
                "iops_write_max_length: needs iops_write_max",
            ),
        ] {
            let v = json(&c.answer(&format!("set-qos {arg}")));
            let e = v["error"].as_str().unwrap();
            assert!(e.contains(want), "{arg}: {e}");
            assert_eq!(v["command"], "set-qos");
        }
        assert_eq!(json(&c.answer("qos"))["iops_read"], 100);
        let v = json(&c.answer("qos extra"));
        assert_eq!(v["error"], "unknown command");
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
