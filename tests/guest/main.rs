//! Real-guest end-to-end tests: a Linux guest under QEMU (TCG) uses the `vhost-backend` binary
//! as its vhost-user-blk disk and runs fio with crc32c verification on it.
//!
//! Tooling (see the scripts' headers):
//! - `tests/vm/build-guest.sh OUTDIR` builds the guest (Debian kernel + busybox/fio initramfs)
//!   once into `$CARGO_TARGET_TMPDIR/guest` (override with `UBIBLK_GUEST_DIR`).
//! - `tests/vm/run-guest.sh GUESTDIR SOCKET SCRIPT QUEUES TIMEOUT` boots it against the socket.
//! - `tests/vm/fio-verify.sh` is the script run inside the guest; it reads what to expect from
//!   `ubiblk.*` words on the kernel command line.
//!
//! Without QEMU or the guest tooling these tests say `skipped: no qemu-system-x86_64` (or what
//! else is missing) and pass; with `UBIBLK_REQUIRE_ALL=1` (scripts/test.sh, CI) they fail:
//! `.ci/run` installs everything. This is a test binary of its own (`cargo test --release
//! --test guest`), so no other test runs beside a guest. Guest runs are serialised: two TCG
//! guests on a 2-core machine only slow each other down.

#[path = "../common/mod.rs"]
mod common;
mod migrate;
mod postcopy;

use common::{require, ControlStatus, BOTO3, GARAGE, GUEST};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vm_script(name: &str) -> PathBuf {
    repo().join("tests/vm").join(name)
}

/// Serialises guest runs within this test binary.
fn guest_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks QEMU and builds the guest (once per test binary; build-guest.sh itself skips the work
/// when the cache directory is already up to date). Panics with an actionable message.
fn guest_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = DIR.get_or_init(|| {
        match Command::new(QEMU).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("`{QEMU} --version` failed: {o:?}")),
            Err(e) => {
                return Err(format!(
                    "{QEMU} not found ({e}): install qemu-system-x86 (bookworm-backports, to \
                     match qemu-utils 10), e.g. by running .ci/run"
                ))
            }
        }
        let dir = std::env::var_os("UBIBLK_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest"));
        let out = Command::new("bash")
            .arg(vm_script("build-guest.sh"))
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run build-guest.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tests/vm/build-guest.sh {} failed ({}); install the guest tooling with \
                 .ci/run\nstdout:\n{}\nstderr:\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        Ok(dir)
    });
    match r {
        Ok(d) => d,
        Err(e) => panic!("guest test prerequisites missing: {e}"),
    }
}

/// A running `vhost-backend`; terminated (SIGTERM, then SIGKILL) when dropped.
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    /// Starts the backend on `config` with `args`, and `env` added to its environment (e.g.
    /// S3 credentials), logging to `log`; waits for `socket`.
    fn start(
        config: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        socket: &Path,
    ) -> Backend {
        let _ = fs::remove_file(socket);
        let logf = fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-backend"))
            .arg("--config")
            .arg(config)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("cannot start vhost-backend");
        let mut b = Backend {
            child,
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        while !socket.exists() {
            if let Some(st) = b.child.try_wait().unwrap() {
                panic!(
                    "vhost-backend exited ({st}) before creating {}:\n{}",
                    socket.display(),
                    b.log_text()
                );
            }
            if t0.elapsed() > Duration::from_secs(30) {
                panic!(
                    "vhost-backend did not create {} within 30 s:\n{}",
                    socket.display(),
                    b.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A step run before the backend starts, given the test's temp directory and the config path.
type SetupFn = Box<dyn FnOnce(&Path, &Path)>;

/// One guest run: a fresh sparse disk, a backend configured for it, a guest script.
struct GuestTest {
    /// Size of the sparse disk file created as `path`.
    disk_size: u64,
    /// virtio-blk queues: both the backend's `num_queues` and QEMU's `num-queues`.
    queues: u32,
    /// Extra YAML appended to the generated config. A top-level key given here replaces the
    /// default one (e.g. `seg_count_max: 1`). `{dir}` expands to the test's temp directory.
    config_extra: String,
    /// Extra arguments for vhost-backend (e.g. `--kek {dir}/kek.yaml`; `{dir}` expands).
    backend_args: Vec<String>,
    /// Extra environment for vhost-backend (e.g. S3 credentials).
    backend_env: Vec<(String, String)>,
    /// Runs after the disk and config are written, before the backend starts
    /// (e.g. init-metadata for lazy fetch, writing a KEK file, filling an image).
    setup: Option<SetupFn>,
    /// Size the guest must see; defaults to `disk_size`.
    expected_size: Option<u64>,
    /// Extra words for the guest kernel command line (`ubiblk.*` parameters of fio-verify.sh).
    guest_cmdline: Vec<String>,
    /// Script run inside the guest; defaults to tests/vm/fio-verify.sh.
    script: Option<PathBuf>,
    /// Wall-clock limit for the VM.
    timeout_s: u32,
    /// Guests booted one after another against the same backend process (a VM shutting down
    /// and the next one connecting to the same socket).
    boots: u32,
    /// Backend restarts during the (single) boot, with QEMU reconnecting (`reconnect-ms`).
    restarts: Option<Restarts>,
}

/// How the backend is taken down and started again under a running guest.
#[derive(Clone, Copy, Debug)]
enum Takedown {
    /// SIGKILL: requests in flight are resubmitted by the next process (inflight tracking).
    Kill,
    /// SIGTERM: the backend finishes what is in flight and exits; the next one starts clean.
    Term,
}

#[derive(Clone, Copy, Debug)]
struct Restarts {
    count: u32,
    how: Takedown,
    /// The control socket (`{dir}`-relative path) whose `stats` show the first completion of
    /// each new process: the guest-visible pause is measured from the takedown to it.
    control: &'static str,
}

impl Default for GuestTest {
    fn default() -> Self {
        GuestTest {
            disk_size: 256 * MIB,
            queues: 2,
            config_extra: String::new(),
            backend_args: Vec::new(),
            backend_env: Vec::new(),
            setup: None,
            expected_size: None,
            guest_cmdline: Vec::new(),
            script: None,
            timeout_s: 600,
            boots: 1,
            restarts: None,
        }
    }
}

/// What a finished run leaves for further checks.
#[allow(dead_code)]
struct GuestOutcome {
    dir: tempfile::TempDir,
    disk: PathBuf,
    console: String,
}

/// Top-level YAML keys of `yaml` (lines `key: ...` without indentation).
fn top_level_keys(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter(|l| !l.starts_with([' ', '\t', '#', '-']) && l.contains(':'))
        .map(|l| l.split(':').next().unwrap().trim().to_string())
        .collect()
}

/// Value of top-level `key` in `yaml`, if it is a plain scalar.
fn yaml_scalar(yaml: &str, key: &str) -> Option<String> {
    yaml.lines().rev().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

impl GuestTest {
    fn run(self) -> GuestOutcome {
        let guest = guest_dir();
        let _serial = guest_lock();
        let dir = tempfile::Builder::new()
            .prefix("ubiblk-guest")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let expand = |s: &str| s.replace("{dir}", &d.display().to_string());
        let disk = d.join("disk.raw");
        let socket = d.join("vhost.sock");
        fs::File::create(&disk)
            .unwrap()
            .set_len(self.disk_size)
            .unwrap();

        let extra = expand(&self.config_extra);
        let overridden = top_level_keys(&extra);
        let defaults = [
            ("path", format!("{:?}", disk.display().to_string())),
            ("socket", format!("{:?}", socket.display().to_string())),
            ("num_queues", self.queues.to_string()),
            ("queue_size", "256".into()),
            ("seg_size_max", "65536".into()),
            ("seg_count_max", "4".into()),
            ("poll_queue_timeout_us", "500".into()),
        ];
        let mut yaml = String::new();
        for (k, v) in &defaults {
            if !overridden.iter().any(|o| o == k) {
                writeln!(yaml, "{k}: {v}").unwrap();
            }
        }
        yaml.push_str(&extra);
        if !yaml.ends_with('\n') {
            yaml.push('\n');
        }
        let config = d.join("config.yaml");
        fs::write(&config, &yaml).unwrap();
        if let Some(setup) = self.setup {
            setup(d, &config);
        }

        // What the guest must see: the size, the queues, and the segment limits the config
        // puts in the virtio config space (seg_max = seg_count_max, size_max = seg_size_max).
        let mut cmdline = vec![
            format!(
                "ubiblk.size={}",
                self.expected_size.unwrap_or(self.disk_size)
            ),
            format!("ubiblk.queues={}", self.queues),
        ];
        if let Some(n) = yaml_scalar(&yaml, "seg_count_max") {
            cmdline.push(format!("ubiblk.max_segments={n}"));
        }
        if let Some(n) = yaml_scalar(&yaml, "seg_size_max") {
            // The guest kernel never uses segments smaller than a page.
            let n: u64 = n.parse().unwrap();
            cmdline.push(format!("ubiblk.max_seg_size={}", n.max(4096)));
        }
        if yaml_scalar(&yaml, "readonly").as_deref() == Some("true") {
            cmdline.push("ubiblk.ro=1".into());
        }
        cmdline.extend(self.guest_cmdline.iter().map(|w| expand(w)));

        let args: Vec<String> = self.backend_args.iter().map(|a| expand(a)).collect();
        let backend = Backend::start(
            &config,
            &args,
            &self.backend_env,
            &d.join("backend.log"),
            &socket,
        );
        if let Some(restarts) = self.restarts {
            let script = self.script.unwrap_or_else(|| vm_script("fio-restart.sh"));
            let console = run_with_restarts(RestartRun {
                guest,
                dir: d,
                socket: &socket,
                script: &script,
                queues: self.queues,
                timeout_s: self.timeout_s,
                cmdline: &cmdline,
                restarts,
                backend,
                start: &|n| {
                    Backend::start(
                        &config,
                        &args,
                        &self.backend_env,
                        &d.join(format!("backend-{n}.log")),
                        &socket,
                    )
                },
            });
            return GuestOutcome { dir, disk, console };
        }

        let script = self.script.unwrap_or_else(|| vm_script("fio-verify.sh"));
        let console_log = d.join("console.log");
        let mut console = String::new();
        for boot in 1..=self.boots {
            let t0 = Instant::now();
            let out = Command::new("bash")
                .arg(vm_script("run-guest.sh"))
                .arg(guest)
                .arg(&socket)
                .arg(&script)
                .arg(self.queues.to_string())
                .arg(self.timeout_s.to_string())
                .env("GUEST_CMDLINE", cmdline.join(" "))
                .env("GUEST_CONSOLE_LOG", &console_log)
                .stdin(Stdio::null())
                .output()
                .expect("cannot run tests/vm/run-guest.sh");
            let elapsed = t0.elapsed();
            console = String::from_utf8_lossy(&out.stdout).into_owned();
            let report = format!(
                "config:\n{yaml}\nguest cmdline: {}\n--- guest console (boot {boot}) ---\n{console}\n--- \
                 run-guest.sh stderr ---\n{}\n--- vhost-backend log ---\n{}",
                cmdline.join(" "),
                String::from_utf8_lossy(&out.stderr),
                backend.log_text()
            );
            eprintln!("guest boot {boot} took {:.1} s", elapsed.as_secs_f64());
            assert!(
                out.status.success(),
                "guest boot {boot} failed ({}) after {:.1} s\n{report}",
                out.status,
                elapsed.as_secs_f64()
            );
            eprintln!("{report}");
        }
        drop(backend);
        GuestOutcome { dir, disk, console }
    }
}

/// Boots the guest against a fresh 256 MiB disk served with the default config plus
/// `config_extra`, on `queues` queues, and runs fio-verify.sh; panics unless it passes.
fn run_guest_fio(config_extra: &str, queues: u32) -> GuestOutcome {
    GuestTest {
        queues,
        config_extra: config_extra.to_string(),
        ..Default::default()
    }
    .run()
}

#[test]
fn guest_fio_verify_two_queues() {
    if !require(&GUEST) {
        return;
    }
    let out = run_guest_fio("", 2);
    assert!(out.console.contains("fio-verify: PASS"));
    // The guest's writes reached the file: it is no longer all zeroes.
    let data = fs::read(&out.disk).unwrap();
    assert!(
        data.iter().any(|&b| b != 0),
        "disk file is still all zeroes"
    );
}

/// The seed's example tuning: one 4 KiB segment per request, so every larger guest I/O is split.
#[test]
fn guest_fio_verify_single_segment() {
    if !require(&GUEST) {
        return;
    }
    let out = run_guest_fio("seg_size_max: 4096\nseg_count_max: 1\nqueue_size: 128\n", 1);
    assert!(out.console.contains("fio-verify: PASS"));
}

/// The same fio verification on an AES-XTS encrypted disk (raw keys in the config).
#[test]
fn guest_fio_verify_encrypted() {
    if !require(&GUEST) {
        return;
    }
    let keys = "encryption_key:\n  - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"\n";
    let out = run_guest_fio(keys, 2);
    assert!(out.console.contains("fio-verify: PASS"));
    let data = fs::read(&out.disk).unwrap();
    assert!(
        data.iter().any(|&b| b != 0),
        "disk file is still all zeroes"
    );
}

/// A VM shuts down and a second one boots against the same backend process: the backend must
/// hand the second VM a fresh, working device (QEMU stops the rings with GET_VRING_BASE on the
/// way out, unlike libblkio).
#[test]
fn guest_second_vm_on_the_same_backend() {
    if !require(&GUEST) {
        return;
    }
    let out = GuestTest {
        queues: 2,
        boots: 2,
        guest_cmdline: vec!["ubiblk.fio_size=8M".into()],
        ..Default::default()
    }
    .run();
    assert!(out.console.contains("fio-verify: PASS"));
}

// ---------------------------------------------------------------------------------------------
// Lazy stripe fetch
// ---------------------------------------------------------------------------------------------

/// Reads `[from, to)` of the disk behind `socket` (a fresh client) and checks it against the
/// lazy image (`lazy_image(LAZY_IMAGE)`, zeros past it); `log` for the failure message.
fn assert_reads_as_image(socket: &Path, from: u64, to: u64, log: &dyn Fn() -> String) {
    let mut client = common::Client::connect_queues(socket, 1).unwrap();
    let image = lazy_image(LAZY_IMAGE);
    let chunk = 128 << 10;
    let mut off = from;
    while off < to {
        let got = client
            .read(0, off, chunk)
            .unwrap_or_else(|e| panic!("read at {off}: errno {e}\n{}", log()));
        let want: Vec<u8> = (off..off + chunk as u64)
            .map(|i| image.get(i as usize).copied().unwrap_or(0))
            .collect();
        assert!(
            got == want,
            "the disk differs from the image in the 128 KiB at {off}"
        );
        off += chunk as u64;
    }
}

/// Deterministic, non-zero-looking content for a lazy-fetch image: every 8-byte word depends on
/// its offset, so a misplaced sector or stripe shows.
fn lazy_image(len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize + 8);
    let mut word = 0u64;
    while (out.len() as u64) < len {
        let mut x = word.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x6C61_7A79_2D69_6D67;
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.truncate(len as usize);
    out
}

/// Offset of the first byte where `a` and `b` differ (lengths must match).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Lazy stripe fetch under a real guest. The disk (256 MiB, sparse) starts empty and is filled
/// from an image shorter than it (100 MiB + 37.5 KiB: not a multiple of the 1 MiB stripe, not
/// even of 4 KiB), with `copy_on_read: false` (guest reads of unfetched stripes come from the
/// image) and autofetch limited to 4 MiB/s, so that background fetches run while fio writes
/// (under TCG here fio starts ~7 s after the backend, when autofetch has reached about stripe
/// 28 of the 61 stripes fio writes, and the guest is done after ~12 s): guest writes to stripes
/// not yet fetched wait for the copy, and may race a background fetch of the same stripe. fio-verify.sh must pass as on a
/// plain disk.
///
/// fio-verify.sh's two jobs write [0, 2 * fio_size) and the guest writes the last 4 KiB block;
/// fio_size = 30.25 MiB ends the guest's data in the middle of stripe 60, whose second half must
/// keep the image. Then the host checks the metadata (every stripe the guest wrote is fetched
/// and marked written, no other is marked written, fetched stripes hold the image outside the
/// guest's data), restarts the backend without the rate limit, waits on the control socket for
/// the fetch to complete, and compares the whole disk outside the guest's writes with the image
/// (zeros past its end).
#[test]
fn guest_fio_verify_lazy() {
    if !require(&GUEST) {
        return;
    }
    guest_fio_verify_lazy_from(Image::File);
}

/// [`guest_fio_verify_lazy`] with the image in S3 (a single-node Garage on loopback, the
/// object uploaded with boto3): every stripe the guest does not write comes over S3 while
/// autofetch runs under fio; the whole disk is checked against the image at the end.
#[test]
fn guest_fio_verify_lazy_s3() {
    if !require(&GUEST) || !require(&[GARAGE, BOTO3]) {
        return;
    }
    let garage = common::servers::Garage::start();
    let key = "guest/image.raw";
    garage.put_bytes(key, &lazy_image(LAZY_IMAGE));
    guest_fio_verify_lazy_from(Image::S3 {
        url: garage.url(key),
        env: garage.env(),
    });
}

/// Where [`guest_fio_verify_lazy_from`] keeps the image.
enum Image {
    /// `image_path`: a file beside the disk.
    File,
    /// `image_url: s3://...`: an object in a Garage bucket (the same bytes), the backend
    /// given the store's endpoint and credentials through the AWS environment variables.
    S3 {
        url: String,
        env: Vec<(String, String)>,
    },
}

/// The lazy guest test's image size: not a multiple of the 1 MiB stripe, not even of 4 KiB.
const LAZY_IMAGE: u64 = 100 * MIB + 38_400;

fn guest_fio_verify_lazy_from(image_at: Image) {
    const DISK: u64 = 256 * MIB;
    const STRIPE: u64 = MIB; // init-metadata's default shift 11
    const IMAGE: u64 = LAZY_IMAGE;
    const FIO_SIZE: u64 = 30 * MIB + 256 * 1024;
    const GUEST_END: u64 = 2 * FIO_SIZE; // fio wrote [0, GUEST_END)
    const LAST_BLOCK: u64 = DISK - 4096; // fio-verify.sh's edge block

    let (source_line, env) = match image_at {
        Image::File => ("image_path: \"{dir}/image.raw\"\n".to_string(), Vec::new()),
        Image::S3 { url, env } => (format!("image_url: \"{url}\"\n"), env),
    };
    let out = GuestTest {
        disk_size: DISK,
        queues: 2,
        config_extra: source_line
            + "metadata_path: \"{dir}/metadata\"\n\
               copy_on_read: false\n\
               autofetch: true\n\
               autofetch_mib_per_sec: 4\n\
               control_socket: \"{dir}/control.sock\"\n",
        backend_env: env.clone(),
        setup: Some(Box::new(|dir, config| lazy_setup(dir, config, IMAGE))),
        guest_cmdline: vec![format!("ubiblk.fio_size={FIO_SIZE}")],
        ..Default::default()
    }
    .run();
    assert!(out.console.contains("fio-verify: PASS"));

    let d = out.dir.path();
    let image = fs::read(d.join("image.raw")).unwrap();
    let stripes = (DISK / STRIPE) as usize;
    let last_guest_stripe = ((GUEST_END - 1) / STRIPE) as usize;
    let guest_wrote = |s: usize| s <= last_guest_stripe || s == stripes - 1;
    // What the disk must hold in [from, to) where the guest did not write: the image, then zeros.
    let expected = |from: u64, to: u64| -> Vec<u8> {
        let mut v = vec![0u8; (to - from) as usize];
        let img_end = to.min(image.len() as u64);
        if img_end > from {
            v[..(img_end - from) as usize].copy_from_slice(&image[from as usize..img_end as usize]);
        }
        v
    };
    // The parts of stripe `s` the guest did not write.
    let untouched = |s: usize| -> Option<(u64, u64)> {
        let (start, end) = (s as u64 * STRIPE, (s as u64 + 1) * STRIPE);
        let from = start.max(GUEST_END);
        let to = end.min(LAST_BLOCK);
        (from < to).then_some((from, to))
    };
    let check_range = |disk: &[u8], from: u64, to: u64, what: &str| {
        let want = expected(from, to);
        if let Some(i) = first_difference(&disk[from as usize..to as usize], &want) {
            panic!(
                "{what}: disk byte {} differs from the image (zeros past its end of {IMAGE})",
                from + i as u64
            );
        }
    };

    // 1. Right after the guest (backend stopped with SIGTERM).
    let meta = fs::read(d.join("metadata")).unwrap();
    let disk = fs::read(&out.disk).unwrap();
    let state = |meta: &[u8], s: usize| meta[512 + s];
    let mut fetched = 0;
    for s in 0..stripes {
        let st = state(&meta, s);
        assert_eq!(st & !3, 0, "stripe {s}: unknown metadata bits {st:#x}");
        if guest_wrote(s) {
            assert_eq!(
                st, 3,
                "stripe {s}: the guest wrote it, yet it is not fetched + written"
            );
        } else {
            assert_eq!(
                st & 2,
                0,
                "stripe {s} is marked written; the guest never wrote it"
            );
        }
        if st & 1 != 0 {
            fetched += 1;
            if let Some((from, to)) = untouched(s) {
                check_range(
                    &disk,
                    from,
                    to,
                    &format!("stripe {s} (fetched, after the guest)"),
                );
            }
        }
    }
    eprintln!(
        "after the guest: {fetched} of {stripes} stripes fetched (rate-limited autofetch plus \
         guest writes)"
    );
    if fetched == stripes {
        eprintln!("note: autofetch finished during the guest run; it did not overlap all of it");
    }

    // 2. A second backend without the rate limit completes the fetch from the saved metadata.
    let config = d.join("config.yaml");
    let yaml = fs::read_to_string(&config).unwrap();
    let yaml2: String = yaml
        .lines()
        .filter(|l| !l.starts_with("autofetch_mib_per_sec:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let config2 = d.join("config-unlimited.yaml");
    fs::write(&config2, &yaml2).unwrap();
    let ctl = d.join("control.sock");
    let backend = Backend::start(
        &config2,
        &[],
        &env,
        &d.join("backend2.log"),
        &d.join("vhost.sock"),
    );
    let t0 = Instant::now();
    let status = loop {
        match ControlStatus::query(&ctl) {
            Ok(s) if s.complete => break s,
            Ok(s) if t0.elapsed() > Duration::from_secs(120) => {
                panic!(
                    "fetch not complete after 120 s: {}\n{}",
                    s.raw,
                    backend.log_text()
                )
            }
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                panic!("control socket: {e:#}\n{}", backend.log_text())
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let status_line = &status.raw;
    eprintln!(
        "second backend: complete after {:.1} s: {status_line}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(status.stripes, stripes as u64, "{status_line}");
    assert_eq!(status.fetched, stripes as u64, "{status_line}");
    assert_eq!(status.fetch_errors, 0, "{status_line}");
    let written = (0..stripes).filter(|&s| guest_wrote(s)).count() as u64;
    assert_eq!(status.written, written, "{status_line}");
    assert_eq!(status.stripe_bytes, STRIPE, "{status_line}");
    drop(backend);

    // 3. The whole disk: the image (then zeros) wherever the guest did not write, the guest's
    // edge block at the end; every stripe fetched, exactly the guest's stripes written.
    let disk = fs::read(&out.disk).unwrap();
    assert_eq!(disk.len() as u64, DISK);
    check_range(&disk, GUEST_END, LAST_BLOCK, "after the complete fetch");
    let edge: Vec<u8> = (0..256)
        .flat_map(|i| format!("ubiblk-edge-{i:03}\n").into_bytes())
        .collect();
    assert_eq!(edge.len(), 4096);
    assert!(
        disk[LAST_BLOCK as usize..] == edge[..],
        "the last 4 KiB block does not hold what the guest wrote there"
    );
    let meta = fs::read(d.join("metadata")).unwrap();
    for s in 0..stripes {
        let want = if guest_wrote(s) { 3 } else { 1 };
        assert_eq!(state(&meta, s), want, "stripe {s} in the final metadata");
    }
    let dump = Command::new(env!("CARGO_BIN_EXE_dump-metadata"))
        .arg("-f")
        .arg(&config2)
        .arg("--json")
        .output()
        .unwrap();
    let dump_out = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success(),
        "dump-metadata: {dump_out}{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(
        dump_out.contains(&format!("\"fetched_count\":{stripes}")),
        "dump-metadata: {dump_out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Backend restarts under a running guest
// ---------------------------------------------------------------------------------------------

struct RestartRun<'a> {
    guest: &'a Path,
    dir: &'a Path,
    socket: &'a Path,
    script: &'a Path,
    queues: u32,
    timeout_s: u32,
    cmdline: &'a [String],
    restarts: Restarts,
    backend: Backend,
    /// Starts backend number `n` (1, 2, ...) on the same config and socket.
    start: &'a dyn Fn(u32) -> Backend,
}

/// A total from the backend's `stats` (`ops`: completed requests, `in_flight`), None while it
/// does not answer.
fn stat(control: &Path, field: &str) -> Option<u64> {
    let reply = common::control_command(control, "stats").ok()?;
    let v: serde_json::Value = serde_json::from_str(&reply).ok()?;
    v["total"][field].as_u64()
}

fn completed(control: &Path) -> Option<u64> {
    stat(control, "ops")
}

/// Boots the guest with QEMU reconnecting to the socket, and while its script runs takes the
/// backend down and starts a new one `restarts.count` times, at random moments (a seed printed
/// for the record). Returns the console; panics unless the script passes. Prints each restart's
/// guest-visible pause (takedown to the first completion of the new process) and their median.
fn run_with_restarts(r: RestartRun) -> String {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("UBIBLK_RESTART_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "restart test: seed {seed} (UBIBLK_RESTART_SEED), {:?}",
        r.restarts
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let control = r.dir.join(r.restarts.control);
    let console_path = r.dir.join("console.txt");
    let stderr_path = r.dir.join("run-guest.stderr");
    let mut guest = Command::new("bash")
        .arg(vm_script("run-guest.sh"))
        .arg(r.guest)
        .arg(r.socket)
        .arg(r.script)
        .arg(r.queues.to_string())
        .arg(r.timeout_s.to_string())
        .env("GUEST_CMDLINE", r.cmdline.join(" "))
        .env("CHARDEV_OPTS", ",reconnect-ms=500")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("cannot run tests/vm/run-guest.sh");
    let console = || fs::read_to_string(&console_path).unwrap_or_default();
    let t0 = Instant::now();
    // Restarts only once fio runs (far more requests than the boot's), so that every one hits
    // I/O in flight.
    while completed(&control).is_none_or(|n| n <= 2000)
        && guest.try_wait().unwrap().is_none()
        && t0.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut backend = r.backend;
    let mut logs = vec![backend.log_text()];
    let mut pauses = Vec::new();
    for n in 1..=r.restarts.count {
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..6000)));
        if guest.try_wait().unwrap().is_some() {
            break;
        }
        // Under TCG the guest, not the backend, is the bottleneck and requests spend little
        // time in the backend: take it down at a moment it has some (within 3 s).
        let t = Instant::now();
        while stat(&control, "in_flight").is_none_or(|n| n == 0)
            && t.elapsed() < Duration::from_secs(3)
        {}
        let down = Instant::now();
        match r.restarts.how {
            Takedown::Kill => {
                let _ = backend.child.kill();
            }
            Takedown::Term => {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(backend.child.id().to_string())
                    .status();
            }
        }
        let st = backend.child.wait().unwrap();
        logs.push(backend.log_text());
        drop(backend);
        backend = (r.start)(n);
        // The pause the guest sees: until the new process completes its first request.
        let pause = loop {
            if completed(&control).is_some_and(|c| c > 0) {
                break down.elapsed();
            }
            assert!(
                down.elapsed() < Duration::from_secs(60),
                "restart {n}: no request completed within 60 s\n{}\n{}",
                console(),
                backend.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        eprintln!(
            "restart {n}: {:?} ({st}) at {:.1} s, first completion after {:.0} ms",
            r.restarts.how,
            t0.elapsed().as_secs_f64(),
            pause.as_secs_f64() * 1000.0
        );
        pauses.push(pause);
    }
    let status = guest.wait().unwrap();
    logs.push(backend.log_text());
    let console = console();
    let report = format!(
        "--- guest console ---\n{console}\n--- run-guest.sh stderr ---\n{}\n--- vhost-backend \
         logs ---\n{}",
        fs::read_to_string(&stderr_path).unwrap_or_default(),
        logs.join("\n--- next backend ---\n")
    );
    assert!(status.success(), "guest failed ({status})\n{report}");
    assert_eq!(
        pauses.len() as u32,
        r.restarts.count,
        "the guest finished before every restart was done: make it run longer\n{report}"
    );
    // How many takedowns left requests in flight for the next process to resubmit.
    let resubmitted = logs.iter().filter(|l| l.contains("resubmitting")).count();
    eprintln!(
        "{resubmitted} of {} new processes resubmitted requests",
        pauses.len()
    );
    if matches!(r.restarts.how, Takedown::Kill) {
        // fio keeps 2 x 16 requests in flight: a kill that never caught one tests nothing.
        assert!(
            resubmitted > 0,
            "no kill caught a request in flight\n{report}"
        );
    }
    pauses.sort();
    eprintln!(
        "restart pauses (ms): {:?}; median {:.0} ms",
        pauses.iter().map(|p| p.as_millis()).collect::<Vec<_>>(),
        pauses[pauses.len() / 2].as_secs_f64() * 1000.0
    );
    console
}

fn restart_test(how: Takedown, config_extra: &str, setup: Option<SetupFn>) -> GuestOutcome {
    GuestTest {
        queues: 2,
        config_extra: format!("control_socket: \"{{dir}}/control.sock\"\n{config_extra}"),
        setup,
        restarts: Some(Restarts {
            count: 5,
            how,
            control: "control.sock",
        }),
        guest_cmdline: vec!["ubiblk.fio_secs=40".into()],
        timeout_s: 240,
        ..Default::default()
    }
    .run()
}

/// `kill -9` of the backend 5 times while a 2-queue guest writes with fio and verifies every
/// block: QEMU reconnects, the new process resubmits what the old one had in flight, and the
/// guest sees pauses, never an I/O error or a bad block.
#[test]
fn guest_fio_verify_across_backend_kills() {
    if !require(&GUEST) {
        return;
    }
    // A QoS limit keeps most of fio's 32 requests queued in the backend, so every kill finds
    // some in flight. Unthrottled under TCG the backend holds a request for microseconds, and
    // a kill can miss them all (one CI run: 0 of 5 kills).
    let out = restart_test(Takedown::Kill, "qos:\n  iops_total: 400\n", None);
    assert!(out.console.contains("fio-restart: PASS"), "{}", out.console);
}

/// The graceful path: SIGTERM (the backend finishes what is in flight and exits) and a new
/// process on the same socket, 5 times under fio.
#[test]
fn guest_fio_verify_across_backend_sigterm_restarts() {
    if !require(&GUEST) {
        return;
    }
    let out = restart_test(Takedown::Term, "", None);
    assert!(out.console.contains("fio-restart: PASS"), "{}", out.console);
}

/// Writes a lazy image of `len` bytes to `{dir}/image.raw` and runs init-metadata on `config`
/// (default stripes, 1 MiB).
fn lazy_setup(dir: &Path, config: &Path, len: u64) {
    fs::write(dir.join("image.raw"), lazy_image(len)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_init-metadata"))
        .arg("-f")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "init-metadata failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// [`guest_fio_verify_across_backend_kills`] on an encrypted lazy disk whose autofetch is
/// running (4 MiB/s of a 100 MiB image, so still running at the first kills): each new process
/// resumes the fetch from the metadata as well as the guest's requests.
#[test]
fn guest_fio_verify_across_backend_kills_lazy_encrypted() {
    if !require(&GUEST) {
        return;
    }
    // Throttled like the plain kill test: the fetches alone stop parking requests once fio's
    // stripes are fetched.
    let extra = "image_path: \"{dir}/image.raw\"\n\
                 metadata_path: \"{dir}/metadata\"\n\
                 autofetch: true\n\
                 autofetch_mib_per_sec: 4\n\
                 qos:\n  iops_total: 400\n\
                 encryption_key:\n  \
                 - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  \
                 - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"\n";
    let out = restart_test(
        Takedown::Kill,
        extra,
        Some(Box::new(|dir, config| lazy_setup(dir, config, LAZY_IMAGE))),
    );
    assert!(out.console.contains("fio-restart: PASS"), "{}", out.console);
}

/// Online resize (issue #26): the guest reads its size and writes a marker; the test then
/// sends `resize` on the control socket; the running guest must see the new sector count in
/// /sys/block/vda/size within the wait (the backend's config-change message, forwarded by QEMU
/// as a config interrupt) and write and verify the new area with fio (tests/vm/resize.sh).
#[test]
fn guest_sees_its_disk_grow() {
    if !require(&GUEST) {
        return;
    }
    guest_resize("", false, false);
}

/// The same on an encrypted disk: the new area reads as zeros through the cipher.
#[test]
fn guest_sees_its_encrypted_disk_grow() {
    if !require(&GUEST) {
        return;
    }
    guest_resize(RESIZE_KEYS, true, false);
}

/// The same on an encrypted lazy disk, its autofetch running: the stripe metadata grows with
/// the disk, the new stripes fetched (no source covers them), and the new area reads as zeros.
#[test]
fn guest_sees_its_encrypted_lazy_disk_grow() {
    if !require(&GUEST) {
        return;
    }
    let extra = format!(
        "image_path: \"{{dir}}/image.raw\"\nmetadata_path: \"{{dir}}/metadata\"\n\
         autofetch: true\nautofetch_mib_per_sec: 8\n{RESIZE_KEYS}"
    );
    guest_resize(&extra, true, true);
}

const RESIZE_KEYS: &str = "encryption_key:\n  - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"\n";

/// `lazy`: the config has `image_path` and `metadata_path` in `{dir}`; a 48 MiB image is made
/// there and init-metadata run (1 MiB stripes) before the backend starts.
fn guest_resize(config_extra: &str, encrypted: bool, lazy: bool) {
    const OLD: u64 = 64 * MIB;
    const NEW: u64 = 96 * MIB;
    let answer: std::sync::Arc<Mutex<Option<String>>> = Default::default();
    let got = answer.clone();
    let setup: SetupFn = Box::new(move |dir, config| {
        if lazy {
            lazy_setup(dir, config, LAZY_RESIZE_IMAGE);
        }
        let control = dir.join("control.sock");
        std::thread::spawn(move || {
            // The guest's first write, its marker at offset 0 (ciphertext on an encrypted
            // disk), says it has read its size at boot.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(900) {
                let writes = common::control_command(&control, "stats")
                    .ok()
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                    .and_then(|v| v["total"]["write"]["ops"].as_u64());
                if writes.is_some_and(|w| w > 0) {
                    let cmd = format!("resize {{\"size_bytes\":{NEW}}}");
                    let reply = common::control_command(&control, &cmd)
                        .unwrap_or_else(|e| format!("control socket: {e:#}"));
                    *got.lock().unwrap() = Some(reply);
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    });
    let out = GuestTest {
        disk_size: OLD,
        queues: 2,
        config_extra: format!("{config_extra}control_socket: {{dir}}/control.sock\n"),
        setup: Some(setup),
        guest_cmdline: vec![format!("ubiblk.new_size={NEW}")],
        script: Some(vm_script("resize.sh")),
        ..Default::default()
    }
    .run();
    assert!(out.console.contains("resize: PASS"), "{}", out.console);
    let reply = answer
        .lock()
        .unwrap()
        .clone()
        .expect("resize was never sent");
    let v: serde_json::Value = serde_json::from_str(&reply).expect(&reply);
    assert_eq!(v["size_bytes"], NEW, "{reply}");
    assert_eq!(v["frontend_notified"], true, "{reply}");
    assert_eq!(fs::metadata(&out.disk).unwrap().len(), NEW);
    if encrypted {
        // The new area holds ciphertext, not the guest's zeros or data in the clear.
        let data = fs::read(&out.disk).unwrap();
        let tail = &data[(NEW - 4096) as usize..];
        assert!(!tail.starts_with(b"RESIZE-READY"), "plaintext on disk");
    }
    if lazy {
        // The metadata grew with the disk (encrypted with the disk's key), the new stripes
        // fetched.
        let xts = ubiblk::crypto::Xts::new(&[0x11; 32], &[0x7e; 32]);
        let meta = fs::File::open(out.dir.path().join("metadata")).unwrap();
        let md = ubiblk::lazy::Metadata::read_from(&meta, NEW / 512, Some(&xts)).unwrap();
        assert_eq!(md.stripe_count() as u64, NEW / MIB);
        assert!((OLD / MIB..NEW / MIB).all(|s| md.is_fetched(s as usize)));
    }
}

/// The image of [`guest_sees_its_encrypted_lazy_disk_grow`]: smaller than the disk, which
/// grows only past its image.
const LAZY_RESIZE_IMAGE: u64 = 48 * MIB;
