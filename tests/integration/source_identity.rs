//! A lazy disk's source pinned across restarts (docs/lazy-fetch.md, "Restarts and a changed
//! source"): the real binaries, a disk stopped part-way through its fetch, its source replaced
//! (an archive written again to its `file://` store, an image served by nginx, a local image
//! file), and the next start refused with an error naming the change; an unchanged source
//! restarts, init-metadata starts over, and a kill -9 during the first start leaves no pin or
//! a whole one. Also: an archive larger than the base disk is refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::common::servers::Nginx;
use crate::common::*;
use base64::Engine;

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const ARCHIVE: &str = env!("CARGO_BIN_EXE_archive");
const MIB: usize = 1 << 20;
/// 64 KiB stripes for the image tests.
const SHIFT: u8 = 7;
const STRIPE: u64 = 512 << SHIFT;

fn pin_of(meta: &Path) -> PathBuf {
    let mut p = meta.as_os_str().to_owned();
    p.push(".source");
    PathBuf::from(p)
}

/// The pinned identity (`source` of the pin file), `None` when there is no pin.
fn pinned(meta: &Path) -> Option<serde_json::Value> {
    let text = fs::read(pin_of(meta)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("a torn pin: {e}: {}", String::from_utf8_lossy(&text)));
    assert_eq!(v["format"], "ubiblk-lazy-source", "{v}");
    Some(v["source"].clone())
}

/// Starts the backend on `config` (with `args`), waiting for its socket.
fn start(config: &BackendConfig, args: &[&str]) -> Backend {
    Backend::start_with_args(BACKEND, config, args).unwrap()
}

/// Starts the backend on `config`, expecting it to refuse to start; returns its log. Fails
/// as soon as it listens on its socket.
fn start_fails(config: &BackendConfig, args: &[&str]) -> String {
    use std::os::unix::fs::FileTypeExt;
    let mut be = Backend::spawn(BACKEND, config, args).unwrap();
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = be.try_wait() {
            assert!(!st.success(), "exit 0: {}", be.log());
            return be.log();
        }
        let listening =
            fs::symlink_metadata(&config.socket).is_ok_and(|m| m.file_type().is_socket());
        assert!(!listening, "it started: {}", be.log());
        assert!(t0.elapsed() < Duration::from_secs(60), "it did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop(mut be: Backend) {
    be.guard.signal(libc::SIGTERM);
    let st = be.guard.wait_timeout(Duration::from_secs(20));
    assert!(
        st.is_some_and(|s| s.success()),
        "no clean exit on SIGTERM:\n{}",
        be.log()
    );
}

fn init_metadata(config: &BackendConfig, dir: &Path, args: &[&str]) {
    let path = dir.join("config-init.yaml");
    fs::write(&path, config.to_yaml()).unwrap();
    let out = Command::new(INIT)
        .arg("-f")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "init-metadata: {out:?}");
}

/// Stripe `i` fetched in the (unencrypted) metadata at `meta`.
fn fetched(meta: &Path, i: usize) -> bool {
    fs::read(meta).unwrap()[512 + i] & 1 != 0
}

// ------------------------------------------------------------------------------------------
// archive_url
// ------------------------------------------------------------------------------------------

const KEK: [u8; 32] = [0x5c; 32];

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn kek_file(dir: &Path) -> PathBuf {
    let path = dir.join("kek.yaml");
    let text = format!(
        "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
        b64(&KEK),
        b64(&[0x11; 12]),
        b64(b"pin-test")
    );
    fs::write(&path, text).unwrap();
    path
}

/// Host A: a plain disk archived (again) to `store` after each change.
struct HostA {
    disk: PathBuf,
    config: PathBuf,
}

impl HostA {
    fn new(d: &Path, data: &[u8]) -> HostA {
        let disk = d.join("disk-a.raw");
        fs::write(&disk, data).unwrap();
        let config = d.join("config-a.yaml");
        fs::write(
            &config,
            BackendConfig::new(&disk, d.join("a.sock")).to_yaml(),
        )
        .unwrap();
        HostA { disk, config }
    }

    fn archive(&self, kek: &Path, store: &Path) {
        let out = Command::new(ARCHIVE)
            .arg("-f")
            .arg(&self.config)
            .arg("-k")
            .arg(kek)
            .arg("--to")
            .arg(format!("file://{}", store.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "archive: {out:?}");
    }
}

/// Host B's config: a disk of `disk_len` bytes of 0x5a filled from the archive in `store`.
fn host_b(d: &Path, store: &Path, disk_len: usize) -> (BackendConfig, PathBuf) {
    let (disk, meta) = (d.join("disk-b.raw"), d.join("meta-b"));
    fs::write(&disk, vec![0x5a; disk_len]).unwrap();
    let config = BackendConfig::new(&disk, d.join("b.sock"))
        .extra(format!(
            "archive_url: {}",
            yaml_str(&format!("file://{}", store.display()))
        ))
        .extra_path("metadata_path", &meta)
        .extra_path("control_socket", &d.join("b.ctl"));
    (config, meta)
}

fn version(n: u8) -> Vec<u8> {
    let mut data = pattern_bytes(0x0a00_0000, 4 * MIB);
    // Stripe 2 differs between versions.
    data[2 * MIB..3 * MIB].fill(n);
    data
}

#[test]
fn an_archive_written_again_between_runs_is_refused_and_init_metadata_starts_over() {
    let dir = scratch_dir("ubiblk-pin-archive");
    let d = dir.path();
    let (store, kek) = (d.join("store"), kek_file(d));
    fs::create_dir(&store).unwrap();
    let a = HostA::new(d, &version(1));
    a.archive(&kek, &store);

    let (config, meta) = host_b(d, &store, 4 * MIB);
    let k = ["--kek", kek.to_str().unwrap()];
    init_metadata(&config, d, &["-k", k[1], "-s", "11"]);
    assert!(
        pinned(&meta).is_none(),
        "init-metadata of an archive pins nothing"
    );

    // First run: stripe 0 fetched (from version 1), then a clean stop.
    let be = start(&config, &k);
    let mut c = Client::connect_queues(&config.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), version(1)[..4096]);
    // A write waits until its stripe is fetched durably (a read may not).
    c.write(0, 4096, &[0x42; 512]).unwrap();
    c.flush(0).unwrap();
    drop(c);
    stop(be);
    assert!(fetched(&meta, 0) && !fetched(&meta, 2));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let mac1 = manifest["mac"].as_str().unwrap().to_string();

    // An unchanged archive restarts.
    let be = start(&config, &k);
    let mut c = Client::connect_queues(&config.socket, 1).unwrap();
    assert_eq!(
        c.read(0, MIB as u64, 4096).unwrap(),
        version(1)[MIB..MIB + 4096]
    );
    c.write(0, MIB as u64 + 4096, &[0x42; 512]).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, 4096, 512).unwrap(), [0x42; 512]);
    drop(c);
    stop(be);

    // Version 2 written to the same place: the restart is refused, naming the change.
    fs::write(&a.disk, version(2)).unwrap();
    a.archive(&kek, &store);
    let log = start_fails(&config, &k);
    assert!(
        log.contains("archive_url: the source changed since this disk started filling")
            && log.contains(&format!("manifest_mac {mac1} -> "))
            && log.contains("2 of its 4 stripes hold the old version")
            && log.contains("init-metadata"),
        "{log}"
    );
    assert!(!fetched(&meta, 2), "the refused start fetched");
    // The pin: version 1's manifest MAC, which the refused start left alone.
    let pin = pinned(&meta).expect("no pin");
    assert_eq!(pin["kind"], "archive", "{pin}");
    assert_eq!(pin["version"]["manifest_mac"], mac1.as_str(), "{pin}");

    // The archive tool refuses to read that disk too (its unfetched stripes would be read
    // from version 2).
    let config_b = d.join("config-b.yaml");
    fs::write(&config_b, config.to_yaml()).unwrap();
    let out = Command::new(ARCHIVE)
        .arg("-f")
        .arg(&config_b)
        .arg("-k")
        .arg(&kek)
        .arg("--to")
        .arg(format!("file://{}", d.join("store-b").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("archive_url: the source changed"),
        "{out:?}"
    );

    // init-metadata starts over: the pin goes, the disk fills from version 2 alone.
    init_metadata(&config, d, &["-k", k[1], "-s", "11"]);
    assert!(pinned(&meta).is_none(), "init-metadata left the pin");
    let be = start(&config, &k);
    let mut c = Client::connect_queues(&config.socket, 1).unwrap();
    let want = version(2);
    for off in [0, 2 * MIB, 3 * MIB] {
        assert_eq!(c.read(0, off as u64, 4096).unwrap(), want[off..off + 4096]);
    }
    drop(c);
    stop(be);
    let mac2 = pinned(&meta).unwrap()["version"]["manifest_mac"].clone();
    assert_ne!(mac2, mac1.as_str());
}

#[test]
fn an_archive_larger_than_the_base_disk_is_refused_naming_both_sizes() {
    let dir = scratch_dir("ubiblk-pin-larger");
    let d = dir.path();
    let (store, kek) = (d.join("store"), kek_file(d));
    fs::create_dir(&store).unwrap();
    HostA::new(d, &version(1)).archive(&kek, &store);
    let (config, _) = host_b(d, &store, 3 * MIB);
    let k = ["--kek", kek.to_str().unwrap()];
    init_metadata(&config, d, &["-k", k[1], "-s", "11"]);
    let log = start_fails(&config, &k);
    assert!(
        log.contains("archive_url: the source")
            && log.contains("holds 4194304 bytes, more than the 3145728-byte base disk"),
        "{log}"
    );
}

// ------------------------------------------------------------------------------------------
// image_url and image_path
// ------------------------------------------------------------------------------------------

const DISK: u64 = 16 * STRIPE;
const IMAGE_LEN: usize = 10 * STRIPE as usize + 1000;

/// A lazy disk on `image.raw` in its directory, named by `image_path` (metadata not made yet).
fn image_disk(prefix: &str) -> LazyFiles {
    LazyFiles::new(
        prefix,
        DISK,
        0xee,
        &pattern_bytes(0x1ace_0000, IMAGE_LEN),
        &[],
    )
}

/// `files`' config with `image_url: url` instead of `image_path`, and its metadata made.
fn with_url(files: &LazyFiles, url: &str) -> BackendConfig {
    let mut config = files.config.clone();
    config.extra_yaml.retain(|l| !l.starts_with("image_path:"));
    config
        .extra_yaml
        .push(format!("image_url: {}", yaml_str(url)));
    init_metadata(&config, files.dir.path(), &["-s", &SHIFT.to_string()]);
    config
}

/// Runs the backend until stripe 0 is fetched (a write fetches it), then stops it cleanly.
fn run_fetching_stripe_0(config: &BackendConfig, meta: &Path) {
    let be = start(config, &[]);
    let mut c = Client::connect_queues(&config.socket, 1).unwrap();
    c.write(0, 512, &[0x42; 512]).unwrap();
    c.flush(0).unwrap();
    drop(c);
    stop(be);
    assert!(fetched(meta, 0));
}

#[test]
fn an_image_url_replaced_between_runs_is_refused_naming_the_etag() {
    if !require(&[NGINX]) {
        return;
    }
    let files = image_disk("ubiblk-pin-http");
    let nginx = Nginx::start(files.dir.path());
    let config = with_url(&files, &nginx.url("image.raw"));
    assert!(pinned(&files.meta).is_none());
    run_fetching_stripe_0(&config, &files.meta);

    // Unchanged: restarts, and the data written survives.
    let be = start(&config, &[]);
    let mut c = Client::connect_queues(&config.socket, 1).unwrap();
    assert_eq!(c.read(0, 512, 512).unwrap(), [0x42; 512]);
    drop(c);
    stop(be);

    replace_file(&files.image, &pattern_bytes(0xbad0_0000, IMAGE_LEN));
    let log = start_fails(&config, &[]);
    let pin = pinned(&files.meta).expect("no pin");
    assert_eq!(pin["kind"], "http", "{pin}");
    let etag = pin["version"]["etag"].as_str().expect("no etag");
    assert!(
        log.contains("image_url: the source changed since this disk started filling")
            && changes_in(&log).starts_with(&format!("etag {etag} -> "))
            && log.contains("1 of its 16 stripes hold the old version"),
        "{log}"
    );
}

#[test]
fn an_image_path_rewritten_or_replaced_between_runs_is_refused() {
    let files = image_disk("ubiblk-pin-file");
    files.init_metadata(INIT, SHIFT);
    let config = files.config.clone();
    // init-metadata pins the image (the stripes it zeroed past the image's end depend on it).
    let pin = pinned(&files.meta);
    run_fetching_stripe_0(&config, &files.meta);
    stop(start(&config, &[]));

    // Rewritten in place (same inode, same size, a new mtime).
    let f = fs::File::options().write(true).open(&files.image).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 4096], STRIPE).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    let log = start_fails(&config, &[]);
    assert!(
        log.contains("image_path: the source changed since this disk started filling"),
        "{log}"
    );
    let changes = changes_in(&log);
    assert!(
        changes.starts_with("mtime ") && !changes.contains("inode"),
        "{log}"
    );

    // Replaced by a rename (another inode).
    replace_file(&files.image, &pattern_bytes(0x1ace_0000, IMAGE_LEN));
    let log = start_fails(&config, &[]);
    assert!(changes_in(&log).contains("inode "), "{log}");
    let pin = pin.expect("init-metadata did not pin the image");
    assert_eq!(pin["kind"], "file", "{pin}");
    assert_eq!(pinned(&files.meta), Some(pin), "the pin changed");
}

/// The list of changes in a refusal: `... filling from it (CHANGES); ...`.
fn changes_in(log: &str) -> &str {
    let start = log.find("filling from it (").expect("no refusal") + "filling from it (".len();
    let len = log[start..].find("); ").expect("no end of the changes");
    &log[start..start + len]
}

#[test]
fn kill_9_during_the_first_start_leaves_no_pin_or_a_whole_one() {
    if !require(&[NGINX]) {
        return;
    }
    let files = image_disk("ubiblk-pin-kill");
    let nginx = Nginx::start(files.dir.path());
    let url = nginx.url("image.raw");
    let config = with_url(&files, &url).extra("autofetch: true");
    let (mut none, mut whole) = (0, 0);
    for delay_ms in [0u64, 1, 2, 4, 6, 8, 10, 15, 20, 30, 40, 60, 80, 120, 200] {
        init_metadata(&config, files.dir.path(), &["-s", &SHIFT.to_string()]);
        assert!(pinned(&files.meta).is_none(), "init-metadata left the pin");
        let mut be = Backend::spawn(BACKEND, &config, &[]).unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        be.kill();
        let fetched_any = (0..16).any(|i| fetched(&files.meta, i));
        match pinned(&files.meta) {
            None => {
                assert!(
                    !fetched_any,
                    "stripes fetched without a pin ({delay_ms} ms)"
                );
                none += 1;
            }
            Some(pin) => {
                assert_eq!(pin["location"], url.as_str(), "{pin}");
                assert!(pin["version"]["etag"].is_string(), "{pin}");
                whole += 1;
            }
        }
    }
    eprintln!("kills: {none} left no pin, {whole} a whole one");
    // And then the start completes, pinned, on the same image.
    let be = start(&config, &[]);
    let t0 = std::time::Instant::now();
    while !ControlStatus::query(&files.ctl).unwrap().complete {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", be.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(be);
    assert!(pinned(&files.meta).is_some());
}
