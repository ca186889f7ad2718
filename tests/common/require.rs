//! Tools a test needs from the machine (QEMU, nginx, Garage, Python modules, ...).
//!
//! A test that needs one starts with `if !require(&[QEMU]) { return; }`. When something is
//! missing, [`require`] says `skipped: no qemu-system-x86_64` on stderr (written past libtest's
//! capture, so a plain `cargo test` shows it) and the test returns early, passing. With
//! [`REQUIRE_ALL`]`=1` in the environment (scripts/test.sh sets it, so CI does too) a missing
//! tool fails the test instead: there every test is mandatory. `.ci/run` installs them all.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::servers::{find_garage, NGINX_BIN};
use super::QSD_BIN;

/// The environment variable that turns a missing tool into a failure: `UBIBLK_REQUIRE_ALL=1`.
pub const REQUIRE_ALL: &str = "UBIBLK_REQUIRE_ALL";

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Need {
    /// An executable on PATH.
    Program(&'static str),
    /// An executable at this path.
    File(&'static str),
    /// A Python 3 module (`python3 -c 'import NAME'` succeeds).
    PythonModule(&'static str),
    /// The Garage binary, as [`super::servers::garage_bin`] finds it.
    Garage,
}

/// QEMU, for the real-guest tests.
pub const QEMU: Need = Need::Program("qemu-system-x86_64");
/// What the real-guest tests need: QEMU, and what tests/vm/build-guest.sh makes the guest with
/// (besides `apt-get download`).
pub const GUEST: [Need; 7] = [
    QEMU,
    Need::Program("fio"),
    Need::Program("busybox"),
    Need::Program("cpio"),
    Need::Program("zstd"),
    Need::Program("xz"),
    Need::Program("dpkg-deb"),
];
/// qemu-storage-daemon, the reference backend.
pub const QSD: Need = Need::File(QSD_BIN);
/// Debian's nginx, the HTTP server of the remote-source tests.
pub const NGINX: Need = Need::File(NGINX_BIN);
/// openssl makes nginx's test CA.
pub const OPENSSL: Need = Need::Program("openssl");
/// curl, the reference HTTP client of the server fixtures' self-test.
pub const CURL: Need = Need::Program("curl");
/// Garage, the S3 server.
pub const GARAGE: Need = Need::Garage;
/// boto3, the reference S3 client that puts and reads Garage's objects.
pub const BOTO3: Need = Need::PythonModule("boto3");
/// Python's `cryptography`, the independent AES-XTS reference (tests/tools/xts_ref.py).
pub const CRYPTOGRAPHY: Need = Need::PythonModule("cryptography");
/// `prometheus_client`, whose parser checks the control socket's `metrics`.
pub const PROMETHEUS_CLIENT: Need = Need::PythonModule("prometheus_client");

impl Need {
    /// How a message names it.
    fn name(&self) -> String {
        match self {
            Need::Program(p) | Need::File(p) => p.to_string(),
            Need::PythonModule(m) => format!("python3 module {m}"),
            Need::Garage => "garage (UBIBLK_GARAGE_BIN, ../shared/bin/garage or PATH)".into(),
        }
    }

    /// Whether the machine has it; each is looked up once per process.
    fn present(&self) -> bool {
        static SEEN: Mutex<Option<HashMap<Need, bool>>> = Mutex::new(None);
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        *seen
            .get_or_insert_with(HashMap::new)
            .entry(*self)
            .or_insert_with(|| match self {
                Need::Program(p) => on_path(p),
                Need::File(p) => is_executable(Path::new(p)),
                Need::PythonModule(m) => Command::new("python3")
                    .args(["-c", &format!("import {m}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                Need::Garage => find_garage().is_some(),
            })
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir: PathBuf| is_executable(&dir.join(program)))
    })
}

/// Whether `UBIBLK_REQUIRE_ALL=1`: every tool is mandatory.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1")
}

/// Whether everything in `needs` is on this machine. When something is missing: with
/// `UBIBLK_REQUIRE_ALL=1`, panics naming it; otherwise writes `TEST: skipped: no NAME` to stderr
/// and returns false, and the caller returns at once.
pub fn require(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter(|n| !n.present())
        .map(Need::name)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    if require_all() {
        panic!(
            "{test}: missing {}; {REQUIRE_ALL}=1 makes every test mandatory: install what is \
             missing (.ci/run does), or unset {REQUIRE_ALL} to skip such tests",
            missing.join(", ")
        );
    }
    // Straight to the process's stderr (libtest captures only the print macros), in one write
    // so that the line stays whole among libtest's own output.
    let line = format!("{test}: skipped: no {}\n", missing.join(", no "));
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}
