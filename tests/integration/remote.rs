//! Lazy fetch from remote sources (`image_url`) through libblkio, against real servers:
//! nginx for HTTP(S) and Garage for S3. Each test checks one rule of docs/lazy-fetch.md
//! ("Remote sources") and fails if it breaks.

use std::fs;
use std::time::{Duration, Instant};

use crate::common::servers::{Garage, Nginx};
use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
/// 64 KiB stripes.
const SHIFT: u8 = 7;
const STRIPE: u64 = 512 << SHIFT;
const DISK: u64 = 32 * STRIPE;
/// Not a multiple of the stripe or of 512: the tail and the zeros past it are checked too.
const IMAGE_LEN: usize = 20 * STRIPE as usize + 1234;

/// A lazy disk whose image is served from `files.dir/image.raw` (nginx's root) or uploaded to
/// Garage, with the config naming it by `image_url`.
struct Remote {
    files: LazyFiles,
    image: Vec<u8>,
    disk: u64,
}

impl Remote {
    fn new(prefix: &str) -> Remote {
        Self::with_size(prefix, DISK, IMAGE_LEN)
    }

    /// A disk of `disk` bytes (a multiple of [`STRIPE`]) on an image of `image_len` bytes.
    fn with_size(prefix: &str, disk: u64, image_len: usize) -> Remote {
        let image = pattern_bytes(0x7e70_0000, image_len);
        let files = LazyFiles::new(prefix, disk, 0xee, &image, &[]);
        // init-metadata needs only the base disk and the stripe size.
        files.init_metadata(INIT, SHIFT);
        Remote { files, image, disk }
    }

    /// The config with `image_url: url` instead of `image_path`.
    fn config(&self, url: &str) -> BackendConfig {
        self.config_with(url, &[])
    }

    /// [`Remote::config`] plus `extra` YAML lines.
    fn config_with(&self, url: &str, extra: &[&str]) -> BackendConfig {
        let mut config = self.files.config.clone();
        config.extra_yaml.retain(|l| !l.starts_with("image_path:"));
        config
            .extra_yaml
            .push(format!("image_url: {}", yaml_str(url)));
        config
            .extra_yaml
            .extend(extra.iter().map(|l| l.to_string()));
        config
    }

    /// What the guest must read at `offset`: the image, then zeros.
    fn expect(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let off = offset as usize;
        if off < self.image.len() {
            let n = (self.image.len() - off).min(len);
            v[..n].copy_from_slice(&self.image[off..off + n]);
        }
        v
    }

    fn check_all(&self, c: &mut Client) {
        let chunk = 128 << 10;
        let mut off = 0;
        while off < self.disk {
            let got = c.read(0, off, chunk).unwrap_or_else(|e| {
                panic!("read at {off}: {}", errno_name(e));
            });
            assert!(got == self.expect(off, chunk), "data differs at {off}");
            off += chunk as u64;
        }
    }

    fn status(&self) -> serde_json::Value {
        let s = ControlStatus::query(&self.files.ctl).unwrap();
        serde_json::from_str(&s.raw).unwrap()
    }

    /// Polls the status until `done` holds, failing after `timeout` with the status and `log`.
    fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        log: &dyn Fn() -> String,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "{what}: not after {timeout:?}: {s}\nbackend log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the control socket says `complete`, then checks the whole disk through
    /// `c` and the base disk's bytes against the image.
    fn complete_and_equal(
        &self,
        be: &ChildGuard,
        c: &mut Client,
        timeout: Duration,
    ) -> serde_json::Value {
        let s = self.wait_status("the fetch complete", timeout, &|| be.log(), |s| {
            s["complete"] == true
        });
        self.check_all(c);
        let base = fs::read(&self.files.base).unwrap();
        assert!(
            base == self.expect(0, self.disk as usize),
            "the base disk differs from the image after the fetch completed"
        );
        s
    }
}

/// A server that can be taken down (SIGKILL: connections reset, the port refuses) and brought
/// back on the same port with the same data.
trait Outage {
    fn down(&mut self);
    fn up(&mut self);
}

impl Outage for Nginx {
    fn down(&mut self) {
        self.stop();
    }
    fn up(&mut self) {
        self.restart();
    }
}

/// A single-node Garage.
impl Outage for Garage {
    fn down(&mut self) {
        self.kill_node(0);
    }
    fn up(&mut self) {
        self.restart_node(0);
    }
}

/// Starts the backend on `config` with `env` added, waiting for its socket.
fn start(config: &BackendConfig, env: &[(String, String)]) -> (ChildGuard, Client) {
    let mut be = Backend::spawn_as_is(BIN, config, &[], |cmd| {
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    })
    .unwrap();
    be.wait_for_socket(&config.socket, Duration::from_secs(40))
        .unwrap();
    let c = Client::connect_queues(&config.socket, config.num_queues).unwrap();
    (be, c)
}

/// Starts the backend on `config`, expecting it to fail at start-up; returns its log.
fn start_fails(config: &BackendConfig, env: &[(String, String)]) -> String {
    let mut be = Backend::spawn_as_is(BIN, config, &[], |cmd| {
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    })
    .unwrap();
    let st = be
        .wait_timeout(Duration::from_secs(60))
        .expect("the backend did not exit");
    assert!(!st.success(), "started: {}", be.log());
    be.log()
}

#[test]
fn http_image_reads_equal_the_image() {
    if !require(&[NGINX]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-http");
    let nginx = Nginx::start(r.files.dir.path());
    let (_be, mut c) = start(&r.config(&nginx.url("image.raw")), &[]);
    r.check_all(&mut c);
    let s = r.status();
    assert_eq!(s["fetch_errors"], 0, "{s}");
    // Read-through is off for remote sources: every stripe with image data was fetched.
    assert!(s["fetched"].as_u64().unwrap() >= 21, "{s}");
}

/// Once every stripe is on the disk, the backend restarts with the image's server gone: a
/// complete disk does not open its remote source (or wait on it for the retry budget).
#[test]
fn a_complete_disk_restarts_without_its_http_server() {
    if !require(&[NGINX]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-done");
    let mut nginx = Nginx::start(r.files.dir.path());
    let config = r.config_with(&nginx.url("image.raw"), &["autofetch: true"]);
    let (be, mut c) = start(&config, &[]);
    r.complete_and_equal(&be, &mut c, Duration::from_secs(30));
    drop(c);
    drop(be);
    nginx.down();
    let t0 = Instant::now();
    let (be, mut c) = start(&config, &[]);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the start took {:?}",
        t0.elapsed()
    );
    assert!(be.log().contains("which is not opened"), "{}", be.log());
    r.check_all(&mut c);
    let s = r.status();
    assert_eq!(
        (s["complete"].as_bool(), s["fetch_errors"].as_u64()),
        (Some(true), Some(0)),
        "{s}"
    );
}

#[test]
fn https_image_trusts_the_ca_in_ssl_cert_file() {
    if !require(&[NGINX, OPENSSL]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-https");
    let nginx = Nginx::start_tls(r.files.dir.path());
    let ca = nginx.ca_cert().unwrap();
    let url = nginx.url("image.raw");
    assert!(url.starts_with("https://"));

    // Without the CA the certificate is refused, at start-up, naming the field.
    let log = start_fails(
        &r.config(&url),
        &[("SSL_CERT_FILE".into(), "/nonexistent".into())],
    );
    assert!(log.contains("image_url"), "{log}");

    let env = [("SSL_CERT_FILE".to_string(), ca.display().to_string())];
    let (_be, mut c) = start(&r.config(&url), &env);
    r.check_all(&mut c);
}

#[test]
fn outage_fails_unfetched_reads_in_the_budget_and_heals_after() {
    if !require(&[NGINX]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-outage");
    let mut nginx = Nginx::start(r.files.dir.path());
    let config = r.config_with(&nginx.url("image.raw"), &["fetch_retry_secs: 2"]);
    outage(&r, &config, &[], &mut nginx);
}

/// An S3 server (single-node Garage) killed during an autofetch and restarted: the failed
/// fetches are counted, no stripe stays failed, and the autofetch completes after the restart
/// with the disk equal to the image.
#[test]
fn s3_outage_during_autofetch_heals_and_the_fetch_completes() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    // 128 stripes, 96 of them with image data; autofetch paced at 2 MiB/s (32 stripes/s), so
    // the kill below lands in the first fraction of the fetch.
    let r = Remote::with_size(
        "ubiblk-remote-s3-outage",
        128 * STRIPE,
        96 * STRIPE as usize - 777,
    );
    let mut garage = Garage::start();
    garage.put_bytes("image.raw", &r.image);
    let url = format!("s3://{}/image.raw", garage.bucket());
    let config = r.config_with(
        &url,
        &[
            "fetch_retry_secs: 2",
            "autofetch: true",
            "autofetch_mib_per_sec: 2",
        ],
    );
    let (be, mut c) = outage(&r, &config, &garage.env(), &mut garage);
    let s = r.complete_and_equal(&be, &mut c, Duration::from_secs(60));
    assert!(s["fetch_errors"].as_u64().unwrap() >= 1, "{s}");
}

/// The outage rules on `config`, whose source is served by `server`: stripes 0 to 3 read, then
/// the server goes down; fetched stripes keep working (reads and writes), the last stripe
/// with image data (not fetched yet) fails with EIO after about `fetch_retry_secs: 2`, the
/// failure is counted; the server comes back and the same stripe reads fine. Returns the
/// backend and the client for more checks.
fn outage(
    r: &Remote,
    config: &BackendConfig,
    env: &[(String, String)],
    server: &mut dyn Outage,
) -> (ChildGuard, Client) {
    let (be, mut c) = start(config, env);
    for s in 0..4 {
        assert_eq!(
            c.read(0, s * STRIPE, STRIPE as usize).unwrap(),
            r.expect(s * STRIPE, STRIPE as usize)
        );
    }
    let unfetched = (r.image.len() as u64 - 1) / STRIPE;

    server.down();
    let s = r.status();
    assert_eq!(
        s["complete"], false,
        "the fetch finished before the outage: {s}"
    );
    // Fetched stripes keep working, reads and writes.
    assert_eq!(c.read(0, 0, 4096).unwrap(), r.expect(0, 4096));
    let data = vec![0xa5u8; 8192];
    c.write(0, STRIPE + 4096, &data).unwrap();
    assert_eq!(c.read(0, STRIPE + 4096, 8192).unwrap(), data);

    // An unfetched stripe fails with EIO after about the retry budget, not never.
    let t0 = Instant::now();
    let e = c.read(0, unfetched * STRIPE, 4096).unwrap_err();
    let took = t0.elapsed();
    assert!(
        e.abs() == libc::EIO,
        "read of an unfetched stripe: {}",
        errno_name(e)
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "failed after {took:?}: {}",
        be.log()
    );
    let s = r.status();
    assert!(s["fetch_errors"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["fetch_retries"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["last_fetch_error"].is_string(), "{s}");

    // Back up: the same stripe reads fine (a failure is not remembered).
    server.up();
    assert_eq!(
        c.read(0, unfetched * STRIPE, 4096).unwrap(),
        r.expect(unfetched * STRIPE, 4096)
    );
    assert_eq!(c.read(0, STRIPE + 4096, 8192).unwrap(), data);
    // The image's bytes back, so the disk equals the image again.
    c.write(0, STRIPE + 4096, &r.expect(STRIPE + 4096, 8192))
        .unwrap();
    (be, c)
}

#[test]
fn an_image_replaced_under_a_running_backend_fails_fetches_never_mixes() {
    if !require(&[NGINX]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-replaced");
    let nginx = Nginx::start(r.files.dir.path());
    let (_be, mut c) = start(&r.config(&nginx.url("image.raw")), &[]);
    assert_eq!(c.read(0, 0, 4096).unwrap(), r.expect(0, 4096));

    // Same size, other content, another mtime (nginx's ETag is mtime and size): only the
    // validator tells the two images apart.
    replace_file(
        &r.files.dir.path().join("image.raw"),
        &pattern_bytes(0xbad0_0000, IMAGE_LEN),
    );
    for s in [5u64, 6, 19] {
        let got = c.read(0, s * STRIPE, 4096);
        assert!(got.is_err(), "stripe {s} was read from the replaced image");
    }
    let s = r.status();
    let last = s["last_fetch_error"].as_str().unwrap_or("").to_string();
    assert!(last.contains("changed since the backend started"), "{s}");
    // What was fetched before stays the old image.
    assert_eq!(c.read(0, 0, 4096).unwrap(), r.expect(0, 4096));
}

#[test]
fn s3_image_reads_equal_and_the_secret_is_never_logged() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-s3");
    let garage = Garage::start();
    garage.put_bytes("disks/image.raw", &r.image);
    let url = format!("s3://{}/disks/image.raw", garage.bucket());
    let mut env = garage.env();
    env.push(("RUST_LOG".into(), "debug".into()));
    env.push(("HOME".into(), r.files.dir.path().display().to_string()));
    let (mut be, mut c) = start(&r.config(&url), &env);
    r.check_all(&mut c);
    drop(c);
    be.kill();
    let log = be.log();
    assert!(log.contains("access key"), "{log}");
    assert!(log.contains("DEBUG"), "not a debug log: {log}");
    assert!(
        !log.contains(&garage.secret_key()),
        "the secret is in the log"
    );
    // Nor are signatures (a presigned URL is a credential for 5 minutes).
    assert!(!log.contains("X-Amz-Signature"), "{log}");
}

#[test]
fn s3_wrong_credentials_fail_clearly_without_the_secret() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-s3-creds");
    let garage = Garage::start();
    garage.put_bytes("image.raw", &r.image);
    let url = format!("s3://{}/image.raw", garage.bucket());
    let wrong = "0".repeat(64);
    let env: Vec<(String, String)> = garage
        .env()
        .into_iter()
        .map(|(k, v)| {
            let v = if k == "AWS_SECRET_ACCESS_KEY" {
                wrong.clone()
            } else {
                v
            };
            (k, v)
        })
        .chain([
            ("RUST_LOG".to_string(), "debug".to_string()),
            ("HOME".to_string(), r.files.dir.path().display().to_string()),
        ])
        .collect();
    let log = start_fails(&r.config(&url), &env);
    assert!(log.contains("image_url"), "{log}");
    assert!(log.contains("403"), "{log}");
    assert!(log.contains("check the credentials"), "{log}");
    assert!(!log.contains(&wrong), "the secret is in the log");
}

#[test]
fn s3_unknown_bucket_or_key_is_a_startup_error_naming_image_url() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let r = Remote::new("ubiblk-remote-s3-missing");
    let garage = Garage::start();
    let mut env = garage.env();
    env.push(("HOME".into(), r.files.dir.path().display().to_string()));
    for url in [
        format!("s3://{}/no/such/key", garage.bucket()),
        "s3://no-such-bucket/image.raw".to_string(),
    ] {
        let log = start_fails(&r.config(&url), &env);
        assert!(
            log.contains(&format!("image_url: cannot use {url}")),
            "{log}"
        );
        assert!(log.contains("404") || log.contains("NoSuch"), "{log}");
    }
}

/// The `s3://bucket/prefix` object store: PUT, GET, HEAD, and NotFound for a missing object.
#[test]
fn s3_store_put_get_exists() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    use ubiblk::remote::{ObjectStore, S3Store};

    let garage = Garage::start();
    let cfg = garage.aws_config();
    let url = format!("s3://{}/archives/a1", garage.bucket());
    let store = S3Store::open(&url, &cfg, &Default::default()).unwrap();
    assert_eq!(store.to_string(), format!("{url}/"));
    assert!(!store.exists("chunks/0").unwrap());
    let e = store.get("chunks/0", 1 << 20).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let data = pattern_bytes(1, 3 << 20);
    store.put("chunks/0", &data).unwrap();
    assert!(store.exists("chunks/0").unwrap());
    assert!(store.get("chunks/0", 3 << 20).unwrap() == data);
    // An object over the caller's bound is refused at once (not retried for the budget).
    let t0 = Instant::now();
    let e = store.get("chunks/0", (3 << 20) - 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{e}");
    // Under the prefix, as the key says.
    assert!(garage.get("archives/a1/chunks/0").unwrap() == data);
    assert!(store.get("../x", 1 << 20).is_err());
}

/// A 3-node Garage cluster (every object on every node) loses a node that is not the
/// endpoint during an autofetch: the fetch completes with no failed fetch, the disk equals the
/// image, and while the node is down, stripes already fetched read at once.
#[test]
fn s3_cluster_node_lost_during_autofetch_the_fetch_completes() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    // 20 MiB of image on a 24 MiB disk (384 stripes), autofetch paced at 8 MiB/s: about 3 s.
    let r = Remote::with_size(
        "ubiblk-remote-s3-cluster",
        384 * STRIPE,
        320 * STRIPE as usize - 4321,
    );
    let mut garage = Garage::cluster(3);
    garage.put_bytes("image.raw", &r.image);
    let url = format!("s3://{}/image.raw", garage.bucket());
    // After the kill, node 0 (the endpoint) may still send reads to node 2 until its pings
    // notice (~8-10 s, see Garage::kill_node), so one request can stall that long. A 5 s
    // attempt timeout gives up on a stalled request and retries it, and the 30 s budget
    // (fetch_retry_secs) covers the detection window three times: no fetch may fail.
    let config = r.config_with(
        &url,
        &[
            "autofetch: true",
            "autofetch_mib_per_sec: 8",
            "fetch_timeout_secs: 5",
            "fetch_retry_secs: 30",
        ],
    );
    let (be, mut c) = start(&config, &garage.env());
    // Stripes 0 to 3 fetched (read, so fetched whatever the autofetch's order).
    for s in 0..4 {
        assert_eq!(
            c.read(0, s * STRIPE, STRIPE as usize).unwrap(),
            r.expect(s * STRIPE, STRIPE as usize),
            "stripe {s} before the kill"
        );
    }
    r.wait_status(
        "32 stripes fetched",
        Duration::from_secs(30),
        &|| be.log(),
        |s| s["fetched"].as_u64().unwrap() >= 32,
    );

    garage.kill_node(2);
    // The autofetch goes in order: fewer than 320 fetched means image stripes are still to
    // be read from the cluster.
    let s = r.status();
    assert!(
        s["fetched"].as_u64().unwrap() < 320,
        "the kill did not land mid-fetch: {s}"
    );
    // Fetched stripes are on the base disk: read at once while node 2 is down (and the cluster
    // has not noticed yet).
    for s in 0..4 {
        let t0 = Instant::now();
        assert_eq!(
            c.read(0, s * STRIPE, STRIPE as usize).unwrap(),
            r.expect(s * STRIPE, STRIPE as usize),
            "stripe {s} with node 2 down"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "a fetched stripe took {:?} with node 2 down",
            t0.elapsed()
        );
    }

    let s = r.complete_and_equal(&be, &mut c, Duration::from_secs(90));
    assert_eq!(s["fetch_errors"], 0, "a fetch failed: {s}\n{}", be.log());
    assert!(garage.pid(2).is_none(), "node 2 came back");
}
