//! QoS limits end to end: a libblkio client keeps requests in flight against a backend with
//! `qos:` limits and measures what gets through, from each completion's time. The limits are
//! rates, so these tests use little CPU and may run side by side; each has its own backend. They
//! hold the binary's lock shared ([`crate::shared`]), so that no polling test overlaps them.

use crate::bench::{median, process_cpu_time, Rng};
use crate::common::*;
use std::path::PathBuf;
use std::sync::RwLockReadGuard;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;

fn backend_bin() -> String {
    std::env::var("UBIBLK_BACKEND_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vhost-backend").into())
}

/// A backend over a sparse disk with a control socket, `qos` (a YAML flow mapping) as its
/// limits, and a client with `queues` queues and `mem` bytes of buffers.
struct Disk {
    _dir: tempfile::TempDir,
    backend: Backend,
    ctl: PathBuf,
    client: Client,
    /// Last: held until the backend is gone.
    _measuring: RwLockReadGuard<'static, ()>,
}

fn start(qos: &str, queues: usize, mem: usize) -> Disk {
    let measuring = crate::shared();
    let dir = scratch_dir("ubiblk-qos");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(SIZE))
        .unwrap();
    let sock = dir.path().join("vhost.sock");
    let ctl = dir.path().join("ctl.sock");
    let cfg = BackendConfig::new(&disk, &sock)
        .num_queues(queues)
        .extra_path("control_socket", &ctl)
        .extra(format!("qos: {qos}"));
    let backend = Backend::start(backend_bin(), &cfg).unwrap();
    let client = Client::connect(
        &sock,
        &ClientOptions {
            num_queues: queues,
            queue_size: Some(256),
            mem_size: mem,
            ..Default::default()
        },
    )
    .unwrap();
    Disk {
        _dir: dir,
        backend,
        ctl,
        client,
        _measuring: measuring,
    }
}

/// Keeps `qd` requests of `bs` bytes (reads, or writes) in flight on `q` at random offsets
/// until `dur` has passed, calling `tick` with the time since the start after each batch of
/// completions. Returns every completion's time since the start. Panics on an error status.
fn pump(
    q: &mut QueueIo,
    write: bool,
    bs: usize,
    qd: usize,
    dur: Duration,
    mut tick: impl FnMut(Duration),
) -> Vec<Duration> {
    let blocks = SIZE / bs as u64;
    let mut rng = Rng(0x5eed_0001 + q.index() as u64 * 2);
    let submit = |q: &mut QueueIo, rng: &mut Rng, slot: usize| {
        let off = rng.next() % blocks * bs as u64;
        if write {
            q.submit_write(off, slot * bs, bs, slot);
        } else {
            q.submit_read(off, slot * bs, bs, slot);
        }
    };
    let t0 = Instant::now();
    for slot in 0..qd {
        submit(q, &mut rng, slot);
    }
    let mut times = Vec::new();
    let mut slots = Vec::with_capacity(qd);
    while q.in_flight() > 0 {
        slots.clear();
        q.reap_with(1, Some(Duration::from_secs(10)), |slot, ret| {
            assert_eq!(ret, 0, "error status: {}", errno_name(-ret));
            slots.push(slot);
        })
        .unwrap_or_else(|e| panic!("no completion for 10 s: {}", errno_name(e)));
        let now = t0.elapsed();
        times.extend(std::iter::repeat_n(now, slots.len()));
        tick(now);
        if now < dur {
            for &slot in &slots {
                submit(q, &mut rng, slot);
            }
        }
    }
    times
}

/// Completions per second in `[from, to)` seconds.
fn rate(times: &[Duration], from: f64, to: f64) -> f64 {
    let n = times
        .iter()
        .filter(|t| (from..to).contains(&t.as_secs_f64()))
        .count();
    n as f64 / (to - from)
}

/// Completions per second in each 250 ms window from `from` to `to` seconds.
fn windows(times: &[Duration], from: f64, to: f64) -> Vec<f64> {
    let mut w = Vec::new();
    let mut t = from;
    while t + 0.25 <= to + 1e-9 {
        w.push(rate(times, t, t + 0.25));
        t += 0.25;
    }
    w
}

fn within(value: f64, want: f64, tolerance: f64) -> bool {
    (value - want).abs() <= want * tolerance
}

fn json(reply: &str) -> serde_json::Value {
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("{reply}: {e}"))
}

#[test]
fn an_iops_cap_holds_at_qd32() {
    let mut d = start("{iops_total: 5000}", 1, 32 * 4096);
    let times = pump(
        d.client.queue(0),
        false,
        4096,
        32,
        Duration::from_secs(11),
        |_| {},
    );
    // The first second drains the initial bucket (a tenth of a second at the rate).
    let iops = rate(&times, 1.0, 11.0);
    eprintln!("5000 IOPS cap: {iops:.0} IOPS over 10 s");
    assert!(within(iops, 5000.0, 0.05), "{iops:.0} IOPS");
}

#[test]
fn a_bandwidth_cap_holds_at_qd32() {
    let mut d = start("{bps_total: 52428800}", 1, 32 * 65536);
    let times = pump(
        d.client.queue(0),
        false,
        65536,
        32,
        Duration::from_secs(11),
        |_| {},
    );
    let mib = rate(&times, 1.0, 11.0) * 65536.0 / (1 << 20) as f64;
    eprintln!("50 MiB/s cap: {mib:.2} MiB/s over 10 s");
    assert!(within(mib, 50.0, 0.05), "{mib:.2} MiB/s");
}

#[test]
fn set_qos_moves_the_rate_within_a_second() {
    let mut d = start("{iops_total: 5000}", 1, 32 * 4096);
    let ctl = d.ctl.clone();
    let mut changed = None;
    let times = pump(
        d.client.queue(0),
        false,
        4096,
        32,
        Duration::from_secs(4),
        |now| {
            if changed.is_none() && now >= Duration::from_millis(1500) {
                let reply = control_command(&ctl, r#"set-qos {"iops_total":10000}"#).unwrap();
                assert_eq!(json(&reply)["iops_total"], 10000, "{reply}");
                changed = Some(now.as_secs_f64());
            }
        },
    );
    let at = changed.unwrap();
    let before = windows(&times, 0.5, 1.5);
    let after = windows(&times, at + 0.25, 4.0);
    eprintln!("before {before:.0?}\nafter {after:.0?} (changed at {at:.3} s)");
    assert!(within(median(&before), 5000.0, 0.05), "{before:.0?}");
    // From the first whole window after the change on, the new rate: within the first second
    // and after it. (Pooled over windows: a stall of the client or the backend shifts requests
    // into the next window, as the bucket lets up to a tenth of a second catch up.)
    let (soon, later) = (
        rate(&times, at + 0.25, at + 1.0),
        rate(&times, at + 1.0, 4.0),
    );
    assert!(
        within(soon, 10000.0, 0.05),
        "{soon:.0} IOPS within a second"
    );
    assert!(
        within(later, 10000.0, 0.05),
        "{later:.0} IOPS after a second"
    );
    assert!(within(median(&after), 10000.0, 0.05), "{after:.0?}");
    let qos = json(&control_command(&ctl, "qos").unwrap());
    assert_eq!(qos["iops_total"], 10000);
    assert!(qos["bps_total"].is_null());
}

#[test]
fn a_burst_lets_the_excess_through_then_settles() {
    let mut d = start(
        "{iops_total: 1000, iops_total_max: 5000, iops_total_max_length: 1}",
        1,
        32 * 4096,
    );
    let times = pump(
        d.client.queue(0),
        false,
        4096,
        32,
        Duration::from_secs(4),
        |_| {},
    );
    let first = rate(&times, 0.0, 1.0);
    let settled = rate(&times, 1.5, 4.0);
    // Everything beyond the rate: the burst.
    let extra = rate(&times, 0.0, 4.0) * 4.0 - 4.0 * 1000.0;
    eprintln!("first second {first:.0}, then {settled:.0} IOPS; {extra:.0} beyond the rate");
    assert!(first >= 5000.0, "{first:.0} in the first second");
    assert!(
        within(settled, 1000.0, 0.05),
        "{settled:.0} IOPS after the burst"
    );
    assert!(within(extra, 5000.0, 0.05), "{extra:.0} beyond the rate");
}

#[test]
fn a_write_limit_leaves_reads_alone() {
    let mut d = start("{iops_write: 200}", 2, 2 * 16 * 4096);
    let dur = Duration::from_secs(3);
    let (reads, writes) = std::thread::scope(|s| {
        let [r, w] = d.client.queues_mut() else {
            panic!("two queues")
        };
        let reads = s.spawn(|| pump(r, false, 4096, 16, dur, |_| {}));
        let writes = s.spawn(|| pump(w, true, 4096, 16, dur, |_| {}));
        (reads.join().unwrap(), writes.join().unwrap())
    });
    let (r, w) = (rate(&reads, 0.5, 3.0), rate(&writes, 0.5, 3.0));
    eprintln!("reads {r:.0} IOPS, writes {w:.0} IOPS");
    assert!(within(w, 200.0, 0.1), "{w:.0} write IOPS");
    assert!(r > 20.0 * 200.0, "{r:.0} read IOPS");
}

#[test]
fn held_requests_do_not_spin_the_backend() {
    let mut d = start("{iops_total: 20}", 1, 32 * 4096);
    let pid = d.backend.guard.pid();
    let (cpu0, t0) = (process_cpu_time(pid), Instant::now());
    let times = pump(
        d.client.queue(0),
        false,
        4096,
        32,
        Duration::from_secs(3),
        |_| {},
    );
    let cores = (process_cpu_time(pid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let iops = rate(&times, 0.5, 3.0);
    eprintln!("20 IOPS cap: {iops:.1} IOPS, backend {cores:.3} cores");
    assert!(within(iops, 20.0, 0.1), "{iops:.1} IOPS");
    assert!(
        cores < 0.05,
        "backend used {cores:.3} cores holding requests"
    );
}

#[test]
fn bad_commands_get_an_error_line_and_the_connection_stays() {
    use std::io::{BufRead, BufReader, Write};
    let d = start("{}", 1, 1 << 20);
    let mut s = std::os::unix::net::UnixStream::connect(&d.ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    let mut ask = |line: &str| {
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        json(&lines.next().unwrap().unwrap())
    };
    for (line, want) in [
        ("set-qos", "missing the limits"),
        ("set-qos {\"iops_total\":", "invalid JSON"),
        ("set-qos {\"iops\":1}", "unknown field \"iops\""),
        (
            "set-qos {\"bps_read\":-5}",
            "bps_read: must be a non-negative integer",
        ),
        (
            "set-qos {\"bps_total\":1048576,\"bps_write\":1048576}",
            "bps_total: cannot be combined with bps_write",
        ),
        ("qos please", "this command takes no argument"),
    ] {
        let v = ask(line);
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(want), "{line}: {v}");
    }
    // Nothing changed; the same connection still answers.
    let v = ask("qos");
    assert!(v.as_object().unwrap().values().all(|v| v.is_null()), "{v}");
    let v = ask("set-qos {\"iops_read\": 300}");
    assert_eq!(v["iops_read"], 300);
}
