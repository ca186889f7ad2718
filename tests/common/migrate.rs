//! Live migration of the test guest between QEMU processes: runs `tests/vm/migrate.py` and
//! reads its JSON result ([`migrate`]). Used by the guest tests and `benches/migration.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

/// The outcome of `tests/vm/migrate.py`: its JSON line.
#[derive(serde::Deserialize, Debug)]
pub struct Migration {
    pub exit_status: Option<i32>,
    pub hops: Vec<Hop>,
    pub error: Option<String>,
    /// A first attempt was cancelled during pre-copy (`--cancel-first`).
    pub cancelled: bool,
}

/// One migration, as QEMU's `query-migrate` reported it at the end.
#[derive(serde::Deserialize, Debug)]
pub struct Hop {
    pub status: String,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub dirty_sync_count: Option<u64>,
}

/// How to run the guest along its sockets.
pub struct MigrateRun<'a> {
    /// The guest built by `tests/vm/build-guest.sh`.
    pub guest: &'a Path,
    /// The first QEMU's socket, then each destination's.
    pub sockets: &'a [PathBuf],
    /// Extra kernel command-line words for `tests/vm/fio-restart.sh`.
    pub cmdline: &'a str,
    /// Where the QEMUs' consoles go.
    pub console: &'a Path,
    /// QEMU's `max-bandwidth` in bytes/s; `None`: QEMU's default.
    pub bandwidth: Option<u64>,
    pub cancel_first: bool,
}

fn vm_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vm")
        .join(name)
}

/// Runs `tests/vm/migrate.py` with `tests/vm/fio-restart.sh` as the guest's workload (2 queues,
/// 512 MiB, at most 300 s); an error only when it printed no result.
pub fn migrate(run: &MigrateRun) -> anyhow::Result<Migration> {
    let sockets: Vec<String> = run
        .sockets
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    let mut cmd = Command::new("python3");
    cmd.arg(vm_script("migrate.py"))
        .arg("--guest")
        .arg(run.guest)
        .arg("--script")
        .arg(vm_script("fio-restart.sh"))
        .arg("--sockets")
        .arg(sockets.join(","))
        .args(["--queues", "2", "--mem", "512M", "--timeout", "300"])
        .arg("--cmdline")
        .arg(run.cmdline)
        .arg("--console")
        .arg(run.console)
        .args(run.cancel_first.then_some("--cancel-first"));
    if let Some(bw) = run.bandwidth {
        cmd.args(["--bandwidth", &bw.to_string()]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot run tests/vm/migrate.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "migrate.py printed no result: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
