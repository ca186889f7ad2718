//! The commands and their JSON replies: `status`, `stats`, `qos`, `set-qos` (and the
//! errors for anything else); `metrics` is in `metrics.rs`.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::super::resize::MAX_SIZE_BYTES;
use super::Control;
use crate::block::{QosLimits, QOS_FIELDS};
use crate::lazy::LazyStatus;
use crate::virtio_blk::stats::QueueReport;

/// The `status` reply: the device, then the lazy fields (absent without lazy fetch).
#[derive(Serialize)]
pub(super) struct Status<'a> {
    #[serde(flatten)]
    pub(super) lazy: Option<LazyStatus>,
    #[serde(flatten)]
    pub(super) facts: Facts<'a>,
    pub(super) uptime_secs: u64,
    pub(super) connected: bool,
    /// Whether this backend has the disk: false while it stands by for another backend (a
    /// live migration's source) to hand it over, or after it could not take it.
    pub(super) disk_owner: bool,
}

/// The device's facts as `status` reports them: the size is the current one.
#[derive(Serialize)]
pub(super) struct Facts<'a> {
    device_id: &'a str,
    /// The size the guest sees, in bytes.
    pub(super) size_bytes: u64,
    num_queues: u16,
    readonly: bool,
    encrypted: bool,
}

/// The commands, for the error reply to an unknown one.
const COMMANDS: &[&str] = &[
    "status",
    "stats",
    "metrics",
    "qos",
    "set-qos",
    "resize",
    "move-status",
    "move-end",
];

/// `move-status` and `move-end` on a disk without `stripe_server`.
const NO_STRIPE_SERVER: &str = "this disk has no stripe_server: nothing moves it";

/// The `move-end` reply: the state before, and after.
#[derive(Serialize)]
struct MoveEnded {
    ended: bool,
    before: crate::stripe::gate::GateStatus,
    now: crate::stripe::gate::GateStatus,
}

const RESIZE_USAGE: &str = "resize {\"size_bytes\":N}: grow a file to N bytes (a multiple of \
     512, from the current size up to max_size_bytes); resize {}: take the size path has now \
     (a block device grown underneath)";

/// A refused or failed `resize`, with the limits.
#[derive(Serialize)]
struct ResizeFailed {
    error: String,
    command: &'static str,
    size_bytes: u64,
    min_size_bytes: u64,
    max_size_bytes: u64,
    usage: &'static str,
}

/// `resize`'s argument: nothing, `{}` or `{"size_bytes":N}`.
fn parse_resize(arg: &str) -> Result<Option<u64>, String> {
    if arg.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(arg).map_err(|e| format!("invalid JSON: {e}"))?;
    let serde_json::Value::Object(map) = &value else {
        return Err("the argument must be a JSON object".into());
    };
    if let Some(key) = map.keys().find(|k| *k != "size_bytes") {
        let key: String = key.chars().take(64).collect();
        return Err(format!("unknown field {key:?}"));
    }
    match map.get("size_bytes") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| "size_bytes: must be a non-negative integer".into()),
    }
}

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
            "stats" | "metrics" | "qos" | "move-status" | "move-end" if !arg.trim().is_empty() => {
                serde_json::to_string(&BadArgument {
                    error: "this command takes no argument",
                    command,
                    argument: arg.trim(),
                })
            }
            "stats" => serde_json::to_string(&self.stats()),
            "metrics" => return self.metrics(),
            "status" => serde_json::to_string(&self.status()),
            "move-status" | "move-end" => match &self.gate {
                None => serde_json::to_string(&Failed {
                    error: NO_STRIPE_SERVER.into(),
                    command: if command == "move-end" {
                        "move-end"
                    } else {
                        "move-status"
                    },
                    usage: "add stripe_server: to the config",
                }),
                Some(gate) if command == "move-status" => serde_json::to_string(&gate.status()),
                Some(gate) => {
                    let before = gate.end_move();
                    if before.moving {
                        log::info!(
                            "move-end: the move is over or cancelled after {} stripes; a VM \
                             may start on this disk again",
                            before.stripes_served
                        );
                    }
                    serde_json::to_string(&MoveEnded {
                        ended: before.moving,
                        before,
                        now: gate.status(),
                    })
                }
            },
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
            "resize" => match parse_resize(arg.trim()).and_then(|size| {
                let r = self.resizer.as_ref().ok_or("this backend cannot resize")?;
                r.resize(size).map_err(|e| e.to_string())
            }) {
                Ok(resized) => serde_json::to_string(&resized),
                Err(error) => {
                    let size_bytes = self.capacity.sectors() << crate::SECTOR_SHIFT;
                    serde_json::to_string(&ResizeFailed {
                        error,
                        command: "resize",
                        size_bytes,
                        min_size_bytes: size_bytes,
                        max_size_bytes: MAX_SIZE_BYTES,
                        usage: RESIZE_USAGE,
                    })
                }
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

    pub(super) fn facts(&self) -> Facts<'_> {
        let f = &self.facts;
        Facts {
            device_id: &f.device_id,
            size_bytes: self.capacity.sectors() << crate::SECTOR_SHIFT,
            num_queues: f.num_queues,
            readonly: f.readonly,
            encrypted: f.encrypted,
        }
    }

    pub(super) fn status(&self) -> Status<'_> {
        Status {
            lazy: self.lazy.as_ref().map(|l| l.status()),
            facts: self.facts(),
            uptime_secs: self.started.elapsed().as_secs(),
            connected: self.connected.load(Ordering::Relaxed),
            disk_owner: self.owner.as_ref().is_none_or(|o| o.held()),
        }
    }
}
