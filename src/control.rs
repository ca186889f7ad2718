//! The control socket (`control_socket`): a unix stream socket taking one command per line,
//! for any disk.
//!
//! `status` answers one line of JSON: the device's facts, whether a frontend is connected, and
//! with lazy fetch its progress ([`LazyStatus`], flattened in); `stats` one line of JSON with
//! the request statistics per queue and in total ([`crate::stats`]); `metrics` the same and
//! `status`'s numbers in the Prometheus text exposition format, several lines ending with a
//! line `# EOF`; `qos` the I/O limits in force (every field of `qos:`, `null` when not
//! limited); `set-qos {JSON}` replaces them all with the object's (fields left out: no limit),
//! checked as the config's are, and answers the new limits (a problem answers `{"error":...}`
//! naming it, and nothing changes); anything else answers `{"error":"unknown command",...}`.
//! Connections are served one thread each, at most [`MAX_CONNECTIONS`] at once (more are
//! closed unanswered); a client may send several commands, and one silent for [`IO_TIMEOUT`] is
//! disconnected. The data path never waits for it: the answers read atomics and short-lived
//! locks the queues do not take (`set-qos` takes the limits' lock, which queues take while
//! something is limited).

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
use crate::stats::{DeviceStats, Histogram, OpKind, QueueReport, QueueSnapshot, QUANTILES};

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
    /// The queues' request statistics.
    pub stats: Arc<DeviceStats>,
    /// The disk's I/O limits (`qos`, `set-qos`).
    pub qos: Option<Arc<Qos>>,
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
const COMMANDS: &[&str] = &["status", "stats", "metrics", "qos", "set-qos"];

/// The `stats` reply.
#[derive(Serialize)]
struct StatsReply<'a> {
    device_id: &'a str,
    uptime_secs: u64,
    queues: Vec<QueueReport>,
    total: QueueReport,
}

/// The reply to a command given an argument it does not take.
#[derive(Serialize)]
struct BadArgument<'a> {
    error: &'static str,
    command: &'a str,
    argument: &'a str,
}

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
/// `set-qos` on a disk started without `qos:`.
const NO_QOS_LAYER: &str = "this disk was started without a `qos:` section, so it has no \
     limiter to change: add `qos: {}` (no limits yet) to its config to change limits live";

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
            "stats" | "metrics" | "qos" if !arg.trim().is_empty() => {
                serde_json::to_string(&BadArgument {
                    error: "this command takes no argument",
                    command,
                    argument: arg.trim(),
                })
            }
            "stats" => serde_json::to_string(&self.stats()),
            "metrics" => return self.metrics(),
            "status" => serde_json::to_string(&self.status()),
            "qos" => {
                serde_json::to_string(&self.qos.as_ref().map(|q| q.limits()).unwrap_or_default())
            }
            "set-qos" => match parse_qos(arg.trim()).and_then(|l| {
                let q = self.qos.as_ref().ok_or(NO_QOS_LAYER)?;
                q.set(l).map_err(|e| e.to_string())
            }) {
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

    fn stats(&self) -> StatsReply<'_> {
        let snap = self.stats.snapshot();
        StatsReply {
            device_id: &self.facts.device_id,
            uptime_secs: self.started.elapsed().as_secs(),
            queues: (snap.queues.iter().enumerate())
                .map(|(i, q)| q.report(Some(i)))
                .collect(),
            total: snap.total.report(None),
        }
    }

    /// The Prometheus text exposition (format 0.0.4), ending with a line `# EOF` (a comment to
    /// parsers) so that a client reading the socket knows where the reply ends.
    fn metrics(&self) -> String {
        let mut m = Metrics::new(&self.facts.device_id);
        let status = self.status();
        m.family("ubiblk_up", "gauge", "1 while the backend answers.");
        m.sample("ubiblk_up", &[], 1);
        m.family(
            "ubiblk_connected",
            "gauge",
            "Whether a frontend (VMM) is connected.",
        );
        m.sample("ubiblk_connected", &[], u64::from(status.connected));
        m.family(
            "ubiblk_uptime_seconds",
            "gauge",
            "Seconds since the backend started.",
        );
        m.sample("ubiblk_uptime_seconds", &[], status.uptime_secs);
        m.family(
            "ubiblk_size_bytes",
            "gauge",
            "Size of the disk the guest sees.",
        );
        m.sample("ubiblk_size_bytes", &[], self.facts.size_bytes);

        let snap = self.stats.snapshot();
        let per_op =
            |m: &mut Metrics, name: &str, value: &dyn Fn(&QueueSnapshot, OpKind) -> u64| {
                for (q, qs) in snap.queues.iter().enumerate() {
                    let q = q.to_string();
                    for kind in OpKind::ALL {
                        m.sample(name, &[("queue", &q), ("op", kind.name())], value(qs, kind));
                    }
                }
            };
        m.family(
            "ubiblk_requests_total",
            "counter",
            "Requests completed (used entries published), by queue and operation.",
        );
        per_op(&mut m, "ubiblk_requests_total", &|q, k| q.kind(k).ops());
        m.family(
            "ubiblk_bytes_total",
            "counter",
            "Bytes of successful requests: data read or written, range discarded or zeroed.",
        );
        per_op(&mut m, "ubiblk_bytes_total", &|q, k| q.kind(k).bytes);
        m.family(
            "ubiblk_errors_total",
            "counter",
            "Requests completed with a status other than OK.",
        );
        per_op(&mut m, "ubiblk_errors_total", &|q, k| q.kind(k).errors);
        m.family(
            "ubiblk_in_flight",
            "gauge",
            "Requests taken off the avail ring and not completed yet.",
        );
        for (q, qs) in snap.queues.iter().enumerate() {
            m.sample(
                "ubiblk_in_flight",
                &[("queue", &q.to_string())],
                qs.in_flight,
            );
        }
        m.family(
            "ubiblk_request_latency_seconds",
            "summary",
            "Time from taking a request off the avail ring to publishing its used entry \
             (quantiles: upper bounds of log-linear buckets at most 12.5% wide).",
        );
        for (q, qs) in snap.queues.iter().enumerate() {
            let q = q.to_string();
            for kind in OpKind::ALL {
                let k = qs.kind(kind);
                m.summary(
                    "ubiblk_request_latency_seconds",
                    &[("queue", &q), ("op", kind.name())],
                    &k.hist,
                    k.latency_sum_ns,
                );
            }
        }
        m.family(
            "ubiblk_device_request_latency_seconds",
            "summary",
            "ubiblk_request_latency_seconds over every queue of the device.",
        );
        for kind in OpKind::ALL {
            let k = snap.total.kind(kind);
            m.summary(
                "ubiblk_device_request_latency_seconds",
                &[("op", kind.name())],
                &k.hist,
                k.latency_sum_ns,
            );
        }

        if let Some(l) = &status.lazy {
            let gauges: [(&str, &str, u64); 6] = [
                (
                    "ubiblk_lazy_stripes",
                    "Stripes of the disk.",
                    l.stripes as u64,
                ),
                (
                    "ubiblk_lazy_stripe_bytes",
                    "Bytes per stripe.",
                    l.stripe_bytes,
                ),
                (
                    "ubiblk_lazy_fetched_stripes",
                    "Stripes fetched from the source.",
                    l.fetched as u64,
                ),
                (
                    "ubiblk_lazy_written_stripes",
                    "Stripes written whole by the guest before being fetched.",
                    l.written as u64,
                ),
                (
                    "ubiblk_lazy_fetching_stripes",
                    "Stripes queued for or being fetched.",
                    l.fetching as u64,
                ),
                (
                    "ubiblk_lazy_complete",
                    "1 once every stripe is fetched (the disk no longer needs the source).",
                    u64::from(l.complete),
                ),
            ];
            for (name, help, v) in gauges {
                m.family(name, "gauge", help);
                m.sample(name, &[], v);
            }
            m.family(
                "ubiblk_lazy_fetch_errors_total",
                "counter",
                "Stripe fetches that failed.",
            );
            m.sample("ubiblk_lazy_fetch_errors_total", &[], l.fetch_errors);
            m.family(
                "ubiblk_lazy_fetch_retries_total",
                "counter",
                "Remote attempts that failed and were retried.",
            );
            m.sample("ubiblk_lazy_fetch_retries_total", &[], l.fetch_retries);
        }
        m.out.push_str("# EOF");
        m.out
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

/// Builds a Prometheus text exposition; every sample is labelled with the device id.
struct Metrics {
    out: String,
    /// `device_id="..."`, escaped.
    device: String,
}

impl Metrics {
    fn new(device_id: &str) -> Self {
        Metrics {
            out: String::with_capacity(16 << 10),
            device: format!("device_id=\"{}\"", escape_label(device_id)),
        }
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn labels(&self, labels: &[(&str, &str)]) -> String {
        let mut s = self.device.clone();
        for (k, v) in labels {
            s.push_str(&format!(",{k}=\"{}\"", escape_label(v)));
        }
        s
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let l = self.labels(labels);
        self.out.push_str(&format!("{name}{{{l}}} {value}\n"));
    }

    /// A summary's quantiles (`NaN` without observations), `_sum` and `_count`, in seconds.
    fn summary(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram, sum_ns: u64) {
        let l = self.labels(labels);
        for (per_10k, q) in QUANTILES {
            let v = h.quantile_ns(per_10k).map_or("NaN".to_string(), seconds);
            self.out
                .push_str(&format!("{name}{{{l},quantile=\"{q}\"}} {v}\n"));
        }
        self.out
            .push_str(&format!("{name}_sum{{{l}}} {}\n", seconds(sum_ns)));
        self.out
            .push_str(&format!("{name}_count{{{l}}} {}\n", h.count()));
    }
}

/// Nanoseconds as seconds, exactly (no float rounding): `1536` is `0.000001536`.
fn seconds(ns: u64) -> String {
    let frac = ns % 1_000_000_000;
    if frac == 0 {
        return (ns / 1_000_000_000).to_string();
    }
    let s = format!("{}.{frac:09}", ns / 1_000_000_000);
    s.trim_end_matches('0').to_string()
}

/// A label value escaped per the text format: backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
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
            stats: Arc::new(DeviceStats::new(2)),
            qos: Some(Qos::new(QosLimits::default()).unwrap()),
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
        assert_eq!(c.qos.as_ref().unwrap().limits().bps_write, Some(1 << 20));
    }

    #[test]
    fn set_qos_on_a_disk_without_the_layer_says_how_to_get_one() {
        let c = Control {
            qos: None,
            ..control()
        };
        let v = json(&c.answer("qos"));
        assert!(v.as_object().unwrap().values().all(|v| v.is_null()), "{v}");
        let v = json(&c.answer("set-qos {\"iops_total\":100}"));
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("qos: {}"), "{e}");
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
        assert_eq!(v["error"], "this command takes no argument");
        assert_eq!(v["argument"], "extra");
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
    fn stats_and_metrics_report_the_recorded_requests() {
        let mut c = control();
        c.facts.device_id = "a\"b\\c\nd".into();
        let q1 = c.stats.queue(1).unwrap();
        q1.started(3);
        q1.finished(OpKind::Read, true, 4096, Duration::from_nanos(1500));
        q1.finished(OpKind::Write, false, 512, Duration::from_micros(100));
        let v: serde_json::Value = serde_json::from_str(&c.answer("stats")).unwrap();
        assert_eq!(v["device_id"], "a\"b\\c\nd");
        assert_eq!(v["queues"][1]["queue"], 1);
        assert_eq!(v["queues"][1]["in_flight"], 1);
        assert_eq!(v["queues"][1]["read"]["bytes"], 4096);
        assert_eq!(v["queues"][1]["read"]["latency_us"]["p50"], 1.536);
        assert_eq!(v["queues"][1]["write"]["errors"], 1);
        assert_eq!(v["queues"][0]["ops"], 0);
        assert_eq!(v["total"]["ops"], 2);
        assert!(v["total"].get("queue").is_none());
        assert!(v["total"]["flush"]["latency_us"]["p99"].is_null());

        let m = c.answer("metrics");
        assert!(m.ends_with("\n# EOF"), "{m}");
        let dev = "device_id=\"a\\\"b\\\\c\\nd\"";
        for line in [
            format!("ubiblk_up{{{dev}}} 1"),
            format!("ubiblk_requests_total{{{dev},queue=\"1\",op=\"read\"}} 1"),
            format!("ubiblk_bytes_total{{{dev},queue=\"1\",op=\"write\"}} 0"),
            format!("ubiblk_errors_total{{{dev},queue=\"1\",op=\"write\"}} 1"),
            format!("ubiblk_in_flight{{{dev},queue=\"1\"}} 1"),
            format!(
                "ubiblk_request_latency_seconds{{{dev},queue=\"1\",op=\"read\",quantile=\"0.5\"}} \
                 0.000001536"
            ),
            format!("ubiblk_request_latency_seconds_sum{{{dev},queue=\"1\",op=\"read\"}} 0.0000015"),
            format!("ubiblk_request_latency_seconds_count{{{dev},queue=\"0\",op=\"read\"}} 0"),
            format!(
                "ubiblk_request_latency_seconds{{{dev},queue=\"0\",op=\"read\",quantile=\"0.99\"}} NaN"
            ),
            "# TYPE ubiblk_requests_total counter".to_string(),
        ] {
            assert!(m.lines().any(|l| l == line), "{line} missing from\n{m}");
        }
        assert_eq!(seconds(2_000_000_000), "2");
        assert_eq!(seconds(137_438_953_472), "137.438953472");

        let e: serde_json::Value = serde_json::from_str(&c.answer("stats now")).unwrap();
        assert_eq!(e["error"], "this command takes no argument");
        assert_eq!(e["argument"], "now");
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
