//! The control socket's commands and replies, without a socket.

use super::metrics::seconds;
use super::server::{Throttle, LOG_INTERVAL};
use super::*;
use crate::block::{QosLimits, QOS_FIELDS};
use crate::virtio_blk::stats::OpKind;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn control() -> Control {
    Control {
        facts: DeviceFacts {
            device_id: "vm1-disk0".into(),
            num_queues: 2,
            readonly: false,
            encrypted: true,
        },
        started: Instant::now(),
        connected: Arc::new(AtomicBool::new(false)),
        lazy: None,
        stats: Arc::new(DeviceStats::new(2)),
        qos: Some(Qos::new(QosLimits::default()).unwrap()),
        capacity: crate::block::Capacity::new((1 << 30) >> 9),
        resizer: None,
        owner: None,
        gate: None,
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
    let v =
        json(&c.answer("set-qos {\"iops_total\":5000,\"iops_total_max\":6000,\"bps_read\":0}\n"));
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
         \"readonly\":false,\"encrypted\":true,\"uptime_secs\":0,\"connected\":false,\
         \"disk_owner\":true}"
    );
    c.connected.store(true, Ordering::Relaxed);
    assert!(c.answer(" status ").contains("\"connected\":true,"));
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
        format!("ubiblk_disk_owner{{{dev}}} 1"),
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

#[test]
fn resize_errors_name_the_problem_and_the_limits() {
    let c = control();
    for (cmd, want) in [
        ("resize {", "invalid JSON"),
        ("resize [1]", "must be a JSON object"),
        ("resize {\"size\":1}", "unknown field \"size\""),
        (
            "resize {\"size_bytes\":-512}",
            "size_bytes: must be a non-negative integer",
        ),
        (
            "resize {\"size_bytes\":\"1G\"}",
            "size_bytes: must be a non-negative integer",
        ),
        (
            "resize {\"size_bytes\":2147483648}",
            "this backend cannot resize",
        ),
    ] {
        let v = json(&c.answer(cmd));
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(want), "{cmd}: {v}");
        assert_eq!(v["command"], "resize");
        assert_eq!(v["size_bytes"], 1u64 << 30);
        assert_eq!(v["min_size_bytes"], 1u64 << 30);
        assert_eq!(v["max_size_bytes"], crate::service::resize::MAX_SIZE_BYTES);
    }
    // It is a known command.
    let v = json(&c.answer("nope"));
    assert!(v["commands"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "resize"));
}
