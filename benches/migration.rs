//! Live-migration benchmark (README, "Live migration" and "Moving a running VM without shared
//! storage"): the same guest (tests/vm, QEMU TCG, 2 vCPUs, 512 MiB, 2 queues) running the same
//! workload (tests/vm/fio-restart.sh with `ubiblk.read_pass=1`: fio random writes verified as
//! they go, then read-only verification passes) migrates between QEMU processes on this host
//! (tests/vm/migrate.py), three ways in alternating order each round, on one 1 GiB disk:
//!
//! * `shared` (ours): A -> B -> C, three `vhost-backend` processes with the same config but
//!   their sockets (the others stand by until the holder hands the disk over).
//! * `qsd`: A -> B -> C, one qemu-storage-daemon with three vhost-user-blk exports of the same
//!   block node (source and destination QEMU are connected at once, as a migration needs).
//!   (C, not back to A: a QEMU reconnecting to a QSD export whose first client left hung its
//!   guest in one of our runs; `guest_live_migration_encrypted_lazy_a_b_a` covers going back
//!   on ours.)
//! * `post-copy` (ours): A -> B where B does not have the disk: A serves it with
//!   `stripe_server` (TLS-PSK); B stands by (`standby: true`) on a fresh sparse disk with
//!   `image_url: ubiblk://A`, `autofetch` and metadata made against A. Besides the hop, the
//!   time from A's hand-over (its `status` says `disk_owner: false`) until B's says
//!   `complete` (B no longer needs A), against a plain TCP copy of the same 1 GiB over
//!   loopback (one connection, 1 MiB writes, fsync'd) run right after, while the guest still
//!   runs fio on B: both share the 2 cores with the TCG guest.
//!
//! QEMU reports each hop's downtime (the guest's pause) and total time; the bench prints their
//! medians and the ratios against QSD.
//!
//! Run: `cargo bench --bench migration`. Environment:
//!   UBIBLK_BENCH_DIR        where the disks live (default /dev/shm: on a disk-backed file
//!                           system our O_DIRECT reads would race the copy's page cache)
//!   UBIBLK_BENCH_ROUNDS     rounds (default 3; each runs all three, ~3 min)
//!   UBIBLK_MIGRATE_BW       max-bandwidth in bytes/s (default: QEMU's)
//!   UBIBLK_BACKEND_BIN      vhost-backend to run (default: this crate's)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{bail, Context};
use bench::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DISK: u64 = 1 << 30;
const PSK: &[u8] = b"bench-post-copy-psk-0123456789abcdef";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the guest once (build-guest.sh skips the work when it is up to date).
fn guest_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let st = Command::new("bash")
        .arg(repo().join("tests/vm/build-guest.sh"))
        .arg(&dir)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("tests/vm/build-guest.sh failed ({st})");
    }
    Ok(dir)
}

/// One run of migrate.py along `sockets`: the hops' (downtime, total) in ms.
fn migrate_along(
    guest: &Path,
    sockets: &[PathBuf],
    work: &Path,
    fio_secs: u32,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let console = work.join("console.txt");
    let m = migrate(&MigrateRun {
        guest,
        sockets,
        cmdline: &format!("ubiblk.fio_secs={fio_secs} ubiblk.read_pass=1"),
        console: &console,
        bandwidth: match std::env::var("UBIBLK_MIGRATE_BW") {
            Ok(bw) => Some(bw.parse().context("UBIBLK_MIGRATE_BW")?),
            Err(_) => None,
        },
        cancel_first: false,
    })?;
    if m.error.is_some() || m.exit_status != Some(0) {
        bail!(
            "migration run failed: {m:?}\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
    }
    m.hops
        .iter()
        .map(|h| match (h.status.as_str(), h.downtime_ms, h.total_ms) {
            ("completed", Some(d), Some(t)) => Ok((d as f64, t as f64)),
            _ => bail!("hop not completed: {h:?}"),
        })
        .collect()
}

fn ours(bin: &Path, guest: &Path, disk: &Path, work: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut backends = Vec::new();
    let mut sockets = Vec::new();
    for name in ["a", "b", "c"] {
        let sock = work.join(format!("{name}.sock"));
        let cfg = BackendConfig::new(disk, &sock).num_queues(2);
        backends.push(Backend::start(bin, &cfg)?);
        sockets.push(sock);
    }
    migrate_along(guest, &sockets, work, 20)
}

/// A -> B without shared storage: the hop's (downtime, total) in ms, the seconds from A's
/// hand-over until B is complete, and the seconds a plain TCP copy of the disk takes right
/// after, while the guest still runs (on B).
fn post_copy(
    bin: &Path,
    init: &Path,
    guest: &Path,
    disk: &Path,
    work: &Path,
) -> anyhow::Result<((f64, f64), f64, f64)> {
    let psk = work.join("psk");
    std::fs::write(&psk, PSK)?;
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600))?;
    let psk_yaml = format!("psk_identity: bench\npsk_file: \"{}\"", psk.display());
    let (a_sock, a_ctl) = (work.join("a.sock"), work.join("a.ctl"));
    let a_cfg = BackendConfig::new(disk, &a_sock)
        .num_queues(2)
        .extra_path("control_socket", &a_ctl)
        .extra(format!(
            "stripe_server: {{listen: \"127.0.0.1:0\", psk_identity: bench, psk_file: \"{}\"}}",
            psk.display()
        ));
    let a = Backend::start(bin, &a_cfg)?;
    let addr = stripe_server_addr(|| a.log())?;
    let b_disk = work.join("b.raw");
    std::fs::File::create(&b_disk)?.set_len(DISK)?;
    let (b_sock, b_ctl) = (work.join("b.sock"), work.join("b.ctl"));
    let b_cfg = BackendConfig::new(&b_disk, &b_sock)
        .num_queues(2)
        .extra(format!("image_url: \"ubiblk://{addr}\""))
        .extra(psk_yaml)
        .extra_path("metadata_path", &work.join("b.meta"))
        .extra_path("control_socket", &b_ctl)
        .extra("autofetch: true")
        .extra("standby: true");
    let b_yaml = work.join("b.yaml");
    std::fs::write(&b_yaml, b_cfg.to_yaml())?;
    let out = Command::new(init).arg("-f").arg(&b_yaml).output()?;
    anyhow::ensure!(out.status.success(), "init-metadata against A: {out:?}");
    let b = Backend::start(bin, &b_cfg)?;
    let sockets = [a_sock, b_sock];
    std::thread::scope(|s| {
        let run = s.spawn(|| migrate_along(guest, &sockets, work, 45));
        // A hands the disk over when its guest stops its rings: at switchover, and also
        // when the guest's driver resets the device at boot. The last hand-over before B is
        // complete is the switchover (A's gate refuses its VMM once it served B). Polled
        // every 5 ms.
        let mut handed_over: Option<Instant> = None;
        let mut a_owner = true;
        let independent = loop {
            let a_st: serde_json::Value = control_command(&a_ctl, "status")
                .and_then(|r| Ok(serde_json::from_str(&r)?))
                .map_err(|e| anyhow::anyhow!("A's status: {e:#}; A's log:\n{}", a.log()))?;
            let owner = a_st["disk_owner"] != false;
            if a_owner && !owner {
                handed_over = Some(Instant::now());
            }
            a_owner = owner;
            let st = ControlStatus::query(&b_ctl)
                .map_err(|e| anyhow::anyhow!("B's status: {e:#}; B's log:\n{}", b.log()))?;
            anyhow::ensure!(st.fetch_errors == 0, "B: fetch errors: {}", st.raw);
            if st.complete {
                let t = handed_over.context("B complete before A handed the disk over")?;
                break t.elapsed().as_secs_f64();
            }
            if run.is_finished() {
                let r = run
                    .join()
                    .map_err(|_| anyhow::anyhow!("migrate thread panicked"))?;
                bail!(
                    "the migration ended before B was complete: {r:?}\n{}",
                    b.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The reference under the same load: the guest still runs (on B).
        let copy = tcp_copy(disk, &work.join("copy.raw"))?.as_secs_f64();
        let same_load = !run.is_finished();
        let hops = run
            .join()
            .map_err(|_| anyhow::anyhow!("migrate thread panicked"))??;
        anyhow::ensure!(hops.len() == 1, "{hops:?}");
        anyhow::ensure!(
            same_load,
            "the guest ended during the TCP copy: raise ubiblk.fio_secs"
        );
        Ok((hops[0], independent, copy))
    })
}

fn qsd(guest: &Path, disk: &Path, work: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let sockets: Vec<PathBuf> = (0..3).map(|i| work.join(format!("qsd{i}.sock"))).collect();
    let extra_args = sockets[1..]
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            [
                "--export".to_string(),
                format!(
                    "type=vhost-user-blk,id=e{},node-name=f,addr.type=unix,addr.path={},\
                     writable=on,num-queues=2",
                    i + 1,
                    s.display()
                ),
            ]
        })
        .collect();
    let opts = QsdOptions {
        num_queues: 2,
        direct: supports_o_direct(disk),
        extra_args,
        ..Default::default()
    };
    let _qsd = Qsd::start(disk, &sockets[0], &opts)?;
    migrate_along(guest, &sockets, work, 20)
}

fn main() -> anyhow::Result<()> {
    warn_if_loaded();
    let bin = backend_bin()?;
    let init = init_metadata_bin()?;
    let guest = guest_dir()?;
    let dir = std::env::var("UBIBLK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/dev/shm"));
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 3.0) as usize;
    let disk = dir.join("ubiblk-bench-migration.raw");
    ensure_pattern_file(&disk, DISK)?;
    println!(
        "vhost-backend: {}; {rounds} rounds; disk {} MiB in {}\n",
        bin.display(),
        DISK >> 20,
        dir.display()
    );
    let (mut shared, mut qsd_hops, mut post) = (Vec::new(), Vec::new(), Vec::new());
    let (mut independent, mut copy) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternating order: each kind goes first in turn.
        for k in 0..3 {
            let work = scratch_dir("ubiblk-bench-migration");
            let w = work.path();
            match (round + k) % 3 {
                0 => {
                    let hops = ours(&bin, &guest, &disk, w).context("shared run")?;
                    println!(
                        "round {}: shared    hops (downtime ms, total ms): {hops:?}",
                        round + 1
                    );
                    shared.extend(hops);
                }
                1 => {
                    let hops = qsd(&guest, &disk, w).context("qsd run")?;
                    println!(
                        "round {}: qsd       hops (downtime ms, total ms): {hops:?}",
                        round + 1
                    );
                    qsd_hops.extend(hops);
                }
                _ => {
                    let (hop, secs, tcp) =
                        post_copy(&bin, &init, &guest, &disk, w).context("post-copy run")?;
                    println!(
                        "round {}: post-copy hop (downtime ms, total ms): {hop:?}; B independent \
                         {secs:.2} s after the hand-over; TCP copy of the disk {tcp:.2} s",
                        round + 1
                    );
                    post.push(hop);
                    independent.push(secs);
                    copy.push(tcp);
                }
            }
        }
    }
    let col = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let q = (
        median(&col(&qsd_hops, |h| h.0)),
        median(&col(&qsd_hops, |h| h.1)),
    );
    println!("\n| migration | downtime (median) | vs QSD | total time (median) | vs QSD |");
    println!("|---|---|---|---|---|");
    for (name, hops) in [
        ("QSD, shared storage", &qsd_hops),
        ("ubiblk, shared storage", &shared),
        ("ubiblk, post-copy (no shared storage)", &post),
    ] {
        let (d, t) = (median(&col(hops, |h| h.0)), median(&col(hops, |h| h.1)));
        println!(
            "| {name} | {d:.0} ms | {:.2}x | {t:.0} ms | {:.2}x |",
            d / q.0,
            t / q.1
        );
    }
    println!(
        "\nB independent of A (1 GiB, from the hand-over): median {:.2} s; plain TCP copy of \
         1 GiB: {:.2} s; {:.2}x",
        median(&independent),
        median(&copy),
        median(&independent) / median(&copy)
    );
    let _ = std::fs::remove_file(&disk);
    Ok(())
}
