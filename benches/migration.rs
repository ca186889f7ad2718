//! Live-migration benchmark (README, "Live migration"): the same guest (tests/vm, QEMU TCG,
//! 2 vCPUs, 512 MiB, 2 queues) running the same workload (tests/vm/fio-restart.sh with `ubiblk.read_pass=1`: fio random
//! writes verified as they go, then read-only verification passes) migrates A -> B -> C between
//! QEMU processes on this host (tests/vm/migrate.py), once on our backends and once on
//! qemu-storage-daemon, in alternating rounds. (C, not back to A: a QEMU reconnecting to a QSD
//! export whose first client left hung its guest in one of our runs; the test
//! `guest_live_migration_encrypted_lazy_a_b_a` covers going back on ours.) QEMU reports each hop's downtime (the guest's
//! pause) and total time; the bench prints their medians and the ratios ours / QSD.
//!
//! Ours: three `vhost-backend` processes with the same config but their sockets (the others
//! stand by until the holder hands the disk over). QSD: one qemu-storage-daemon with three
//! vhost-user-blk exports of the same block node (source and destination QEMU are connected at
//! once, as a migration needs).
//!
//! Run: `cargo bench --bench migration`. Environment:
//!   UBIBLK_BENCH_DIR        where the disk lives (default: the target dir's tmp)
//!   UBIBLK_BENCH_ROUNDS     rounds (default 3; each runs both backends, ~50 s)
//!   UBIBLK_MIGRATE_BW       max-bandwidth in bytes/s (default: QEMU's)
//!   UBIBLK_BACKEND_BIN      vhost-backend to run (default: this crate's)

#[path = "common/mod.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{bail, Context};
use bench::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const DISK: u64 = 128 << 20;

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
) -> anyhow::Result<Vec<(f64, f64)>> {
    let console = work.join("console.txt");
    let m = migrate(&MigrateRun {
        guest,
        sockets,
        cmdline: "ubiblk.fio_secs=20 ubiblk.read_pass=1",
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
    migrate_along(guest, &sockets, work)
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
    migrate_along(guest, &sockets, work)
}

fn main() -> anyhow::Result<()> {
    warn_if_loaded();
    let bin = bench_bin(
        "UBIBLK_BACKEND_BIN",
        option_env!("CARGO_BIN_EXE_vhost-backend"),
        "vhost-backend",
    )?;
    let guest = guest_dir()?;
    let dir = std::env::var("UBIBLK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let rounds = env_f64("UBIBLK_BENCH_ROUNDS", 3.0) as usize;
    let disk = dir.join("ubiblk-bench-migration.raw");
    ensure_pattern_file(&disk, DISK)?;
    println!(
        "vhost-backend: {}; {rounds} rounds, A -> B -> A each\n",
        bin.display()
    );
    let (mut ours_hops, mut qsd_hops) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for first_ours in [round % 2 == 0, round % 2 != 0] {
            let work = scratch_dir("ubiblk-bench-migration");
            let (name, hops) = if first_ours {
                let hops = ours(&bin, &guest, &disk, work.path());
                ("ubiblk", hops.context("ubiblk run")?)
            } else {
                ("qsd", qsd(&guest, &disk, work.path()).context("qsd run")?)
            };
            println!(
                "round {}: {name:6} hops (downtime ms, total ms): {hops:?}",
                round + 1
            );
            if first_ours {
                &mut ours_hops
            } else {
                &mut qsd_hops
            }
            .extend(hops);
        }
    }
    let col = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let (od, ot) = (col(&ours_hops, |h| h.0), col(&ours_hops, |h| h.1));
    let (qd, qt) = (col(&qsd_hops, |h| h.0), col(&qsd_hops, |h| h.1));
    println!(
        "\nmedian downtime: ubiblk {:.0} ms, qsd {:.0} ms: {:.2}x",
        median(&od),
        median(&qd),
        median(&od) / median(&qd)
    );
    println!(
        "median total time: ubiblk {:.0} ms, qsd {:.0} ms: {:.2}x",
        median(&ot),
        median(&qt),
        median(&ot) / median(&qt)
    );
    let _ = std::fs::remove_file(&disk);
    Ok(())
}
