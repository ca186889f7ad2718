//! `metrics`: the request statistics and `status`'s numbers in the Prometheus text exposition
//! format.

use super::Control;
use crate::virtio_blk::stats::{Histogram, OpKind, QueueSnapshot, QUANTILES};

impl Control {
    /// The Prometheus text exposition (format 0.0.4), ending with a line `# EOF` (a comment to
    /// parsers) so that a client reading the socket knows where the reply ends.
    pub(super) fn metrics(&self) -> String {
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
            "ubiblk_disk_owner",
            "gauge",
            "Whether this backend has the disk (0: standing by for another backend).",
        );
        m.sample("ubiblk_disk_owner", &[], u64::from(status.disk_owner));
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
        m.sample("ubiblk_size_bytes", &[], self.facts().size_bytes);

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
            let gauges: [(&str, &str, u64); 7] = [
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
                (
                    "ubiblk_lazy_source_down",
                    "1 while the source is known down (requests for unfetched stripes fail).",
                    u64::from(l.source_down),
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
pub(super) fn seconds(ns: u64) -> String {
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
