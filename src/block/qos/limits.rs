//! `qos:`: the limits of the QoS layer, with QEMU's names and rules (docs/throttle.txt in
//! QEMU), checked the same way from the config file and from the control socket's `set-qos`.

use serde::{Deserialize, Serialize};

/// The fields of `qos:` (QEMU's throttle options in snake_case), in [`QosLimits`] order.
pub const QOS_FIELDS: &[&str] = &[
    "iops_total",
    "iops_total_max",
    "iops_total_max_length",
    "iops_read",
    "iops_read_max",
    "iops_read_max_length",
    "iops_write",
    "iops_write_max",
    "iops_write_max_length",
    "bps_total",
    "bps_total_max",
    "bps_total_max_length",
    "bps_read",
    "bps_read_max",
    "bps_read_max_length",
    "bps_write",
    "bps_write_max",
    "bps_write_max_length",
];

/// [`QOS_FIELDS`] as paths from the top of the file, for parse errors inside `qos:`.
pub const QOS_PATHS: &[&str] = &[
    "qos.iops_total",
    "qos.iops_total_max",
    "qos.iops_total_max_length",
    "qos.iops_read",
    "qos.iops_read_max",
    "qos.iops_read_max_length",
    "qos.iops_write",
    "qos.iops_write_max",
    "qos.iops_write_max_length",
    "qos.bps_total",
    "qos.bps_total_max",
    "qos.bps_total_max_length",
    "qos.bps_read",
    "qos.bps_read_max",
    "qos.bps_read_max_length",
    "qos.bps_write",
    "qos.bps_write_max",
    "qos.bps_write_max_length",
];

/// Largest rate or burst (QEMU's `THROTTLE_VALUE_MAX`).
pub const QOS_VALUE_MAX: u64 = 1_000_000_000_000_000;
/// Longest burst (`*_max_length`), in seconds: a day.
pub const QOS_MAX_LENGTH: u64 = 86_400;

/// `qos:`: per-disk I/O limits with QEMU's names and meaning (docs/throttle.txt in QEMU). Each
/// group is a rate (`iops_*` requests or `bps_*` bytes per second), its burst rate (`_max`)
/// and how many seconds the burst may last (`_max_length`, 1 without it). `None` or 0: no
/// limit. `total` counts reads and writes together; it cannot be combined with the `read` /
/// `write` limits of the same kind.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    #[serde(default)]
    pub iops_total: Option<u64>,
    #[serde(default)]
    pub iops_total_max: Option<u64>,
    #[serde(default)]
    pub iops_total_max_length: Option<u64>,
    #[serde(default)]
    pub iops_read: Option<u64>,
    #[serde(default)]
    pub iops_read_max: Option<u64>,
    #[serde(default)]
    pub iops_read_max_length: Option<u64>,
    #[serde(default)]
    pub iops_write: Option<u64>,
    #[serde(default)]
    pub iops_write_max: Option<u64>,
    #[serde(default)]
    pub iops_write_max_length: Option<u64>,
    #[serde(default)]
    pub bps_total: Option<u64>,
    #[serde(default)]
    pub bps_total_max: Option<u64>,
    #[serde(default)]
    pub bps_total_max_length: Option<u64>,
    #[serde(default)]
    pub bps_read: Option<u64>,
    #[serde(default)]
    pub bps_read_max: Option<u64>,
    #[serde(default)]
    pub bps_read_max_length: Option<u64>,
    #[serde(default)]
    pub bps_write: Option<u64>,
    #[serde(default)]
    pub bps_write_max: Option<u64>,
    #[serde(default)]
    pub bps_write_max_length: Option<u64>,
}

/// One limit group of [`QosLimits`]: rate, burst rate, burst seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosGroup {
    pub avg: Option<u64>,
    pub max: Option<u64>,
    pub max_length: Option<u64>,
}

/// Which limit group: QEMU's bucket order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosKind {
    BpsTotal,
    BpsRead,
    BpsWrite,
    IopsTotal,
    IopsRead,
    IopsWrite,
}

impl QosKind {
    pub const ALL: [QosKind; 6] = [
        QosKind::BpsTotal,
        QosKind::BpsRead,
        QosKind::BpsWrite,
        QosKind::IopsTotal,
        QosKind::IopsRead,
        QosKind::IopsWrite,
    ];

    /// The group's three field names: rate, burst, burst length.
    pub fn names(self) -> [&'static str; 3] {
        let i = match self {
            QosKind::IopsTotal => 0,
            QosKind::IopsRead => 1,
            QosKind::IopsWrite => 2,
            QosKind::BpsTotal => 3,
            QosKind::BpsRead => 4,
            QosKind::BpsWrite => 5,
        };
        [
            QOS_FIELDS[3 * i],
            QOS_FIELDS[3 * i + 1],
            QOS_FIELDS[3 * i + 2],
        ]
    }

    pub fn is_bps(self) -> bool {
        matches!(
            self,
            QosKind::BpsTotal | QosKind::BpsRead | QosKind::BpsWrite
        )
    }
}

/// A `qos` field with a value the limits cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct QosInvalid {
    pub field: &'static str,
    pub problem: String,
}

fn qos_err(field: &'static str, problem: impl Into<String>) -> QosInvalid {
    QosInvalid {
        field,
        problem: problem.into(),
    }
}

impl QosLimits {
    pub fn group(&self, kind: QosKind) -> QosGroup {
        let (avg, max, max_length) = match kind {
            QosKind::IopsTotal => (
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            QosKind::IopsRead => (
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            QosKind::IopsWrite => (
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
            QosKind::BpsTotal => (
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            QosKind::BpsRead => (self.bps_read, self.bps_read_max, self.bps_read_max_length),
            QosKind::BpsWrite => (
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
        };
        QosGroup {
            avg,
            max,
            max_length,
        }
    }

    /// The same limits with QEMU's "0 is no limit" spelled as `None` (rates and bursts; a
    /// burst length of 0 is refused by [`QosLimits::validate`], not changed).
    pub fn normalized(mut self) -> Self {
        for v in [
            &mut self.iops_total,
            &mut self.iops_total_max,
            &mut self.iops_read,
            &mut self.iops_read_max,
            &mut self.iops_write,
            &mut self.iops_write_max,
            &mut self.bps_total,
            &mut self.bps_total_max,
            &mut self.bps_read,
            &mut self.bps_read_max,
            &mut self.bps_write,
            &mut self.bps_write_max,
        ] {
            if *v == Some(0) {
                *v = None;
            }
        }
        self
    }

    /// True when no rate is limited.
    pub fn is_unlimited(&self) -> bool {
        let n = self.normalized();
        QosKind::ALL.iter().all(|&k| n.group(k).avg.is_none())
    }

    /// QEMU's rules (`throttle_is_valid`), plus bandwidths of at least one sector a second
    /// and bursts of at most [`QOS_MAX_LENGTH`] seconds. The error names the field.
    pub fn validate(&self) -> Result<(), QosInvalid> {
        let n = self.normalized();
        for kind in QosKind::ALL {
            let [avg_name, max_name, len_name] = kind.names();
            let g = n.group(kind);
            for (v, name) in [(g.avg, avg_name), (g.max, max_name)] {
                let Some(v) = v else { continue };
                if v > QOS_VALUE_MAX {
                    return Err(qos_err(
                        name,
                        format!("must be at most {QOS_VALUE_MAX} (0 or null: no limit)"),
                    ));
                }
                if kind.is_bps() && v < 512 {
                    return Err(qos_err(
                        name,
                        "must be at least 512 bytes per second (0 or null: no limit)",
                    ));
                }
            }
            if let Some(max) = g.max {
                let Some(avg) = g.avg else {
                    return Err(qos_err(
                        max_name,
                        format!("needs {avg_name} (the rate it bursts above)"),
                    ));
                };
                if max < avg {
                    return Err(qos_err(
                        max_name,
                        format!("must not be lower than {avg_name}"),
                    ));
                }
            }
            if let Some(len) = g.max_length {
                if g.max.is_none() {
                    return Err(qos_err(
                        len_name,
                        format!("needs {max_name} (the burst it lasts)"),
                    ));
                }
                if !(1..=QOS_MAX_LENGTH).contains(&len) {
                    return Err(qos_err(
                        len_name,
                        format!("must be in 1..={QOS_MAX_LENGTH}"),
                    ));
                }
            }
        }
        for (total, read, write) in [
            (QosKind::IopsTotal, QosKind::IopsRead, QosKind::IopsWrite),
            (QosKind::BpsTotal, QosKind::BpsRead, QosKind::BpsWrite),
        ] {
            let (t, r, w) = (n.group(total), n.group(read), n.group(write));
            for (i, (tv, rv, wv)) in [(t.avg, r.avg, w.avg), (t.max, r.max, w.max)]
                .into_iter()
                .enumerate()
            {
                if tv.is_some() && (rv.is_some() || wv.is_some()) {
                    let other = if rv.is_some() { read } else { write };
                    return Err(qos_err(
                        total.names()[i],
                        format!(
                            "cannot be combined with {} (a total limit or read/write limits)",
                            other.names()[i]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
