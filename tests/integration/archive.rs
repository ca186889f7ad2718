//! Disk archives end to end: the `archive` tool on plain, encrypted and partly fetched lazy
//! disks (checked object by object), and a disk moved between two "hosts" through an archive
//! served with `archive_url`, read through libblkio while it is fetched and compared after.
//! The tests that do not depend on the store run twice: on `file:///dir` and on `s3://` (a
//! single-node Garage, tests/common/servers/, listed and altered by its boto3 client).

use crate::common::servers::Garage;
use crate::common::*;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use ubiblk::archive::ArchiveReader;
use ubiblk::crypto::Xts;
use ubiblk::remote::{FileStore, ObjectStore, S3Store};

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const ARCHIVE: &str = env!("CARGO_BIN_EXE_archive");
const MIB: usize = 1 << 20;
/// 8 chunks of 1 MiB (the chunk size of a disk without lazy fetch).
const DISK: usize = 8 * MIB;

const KEK: [u8; 32] = [0xa5; 32];
const IV: [u8; 12] = [0x3c; 12];
const AAD: &[u8] = b"vm3jgez8_0";
/// Host A's disk keys and host B's: different.
const KA: ([u8; 32], [u8; 32]) = ([0x11; 32], [0x7e; 32]);
const KB: ([u8; 32], [u8; 32]) = ([0x22; 32], [0x6d; 32]);

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn wrap(key: &[u8; 32]) -> String {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let gcm = Aes256Gcm::new_from_slice(&KEK).unwrap();
    let mut buf = key.to_vec();
    let nonce = Nonce::try_from(&IV[..]).unwrap();
    let tag = gcm
        .encrypt_inout_detached(&nonce, AAD, buf.as_mut_slice().into())
        .unwrap();
    buf.extend_from_slice(&tag);
    b64(&buf)
}

/// The `encryption_key` line of `keys`, wrapped with the KEK.
fn keys_line(keys: &([u8; 32], [u8; 32])) -> String {
    format!(
        "encryption_key: [\"{}\", \"{}\"]",
        wrap(&keys.0),
        wrap(&keys.1)
    )
}

fn xts(keys: &([u8; 32], [u8; 32])) -> Xts {
    Xts::new(&keys.0, &keys.1)
}

/// Writes the KEK file (`method` aes256-gcm or none) in `dir`.
fn kek_file(dir: &Path, method: &str) -> PathBuf {
    let path = dir.join(format!("kek-{method}.yaml"));
    let text = format!(
        "method: {method}\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
        b64(&KEK),
        b64(&IV),
        b64(AAD)
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn write_config(dir: &Path, name: &str, config: &BackendConfig) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, config.to_yaml()).unwrap();
    path
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Where an archive is written and read: a directory (`file://`), or a prefix in the bucket
/// of a Garage (`s3://`), whose objects the checks see through the fixture's boto3 client.
enum Dest<'a> {
    Dir(PathBuf),
    S3(&'a Garage, &'static str),
}

impl Dest<'_> {
    fn url(&self) -> String {
        match self {
            Dest::Dir(dir) => file_url(dir),
            Dest::S3(g, prefix) => g.url(prefix),
        }
    }

    /// The environment of the tool and of the backends: the AWS settings for S3.
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Dest::Dir(_) => Vec::new(),
            Dest::S3(g, _) => g.env(),
        }
    }

    /// The object `name` (`manifest.json`, `chunks/NAME`), None when there is none.
    fn read(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            Dest::Dir(dir) => std::fs::read(dir.join(name)).ok(),
            Dest::S3(g, prefix) => g.get(&format!("{prefix}/{name}")),
        }
    }

    fn write(&self, name: &str, data: &[u8]) {
        match self {
            Dest::Dir(dir) => std::fs::write(dir.join(name), data).unwrap(),
            Dest::S3(g, prefix) => g.put_bytes(&format!("{prefix}/{name}"), data),
        }
    }

    fn delete(&self, name: &str) {
        match self {
            Dest::Dir(dir) => std::fs::remove_file(dir.join(name)).unwrap(),
            Dest::S3(g, prefix) => g.delete(&format!("{prefix}/{name}")),
        }
    }

    /// The names of the chunk objects (under `chunks/`).
    fn objects(&self) -> HashSet<String> {
        match self {
            Dest::Dir(dir) => std::fs::read_dir(dir.join("chunks"))
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().into_string().unwrap())
                        .collect()
                })
                .unwrap_or_default(),
            Dest::S3(g, prefix) => {
                let under = format!("{prefix}/chunks/");
                g.list(&under)
                    .into_iter()
                    .map(|(key, _)| key.strip_prefix(&under).unwrap().to_string())
                    .collect()
            }
        }
    }

    /// The store, opened by the library (for its archive reader).
    fn store(&self) -> Box<dyn ObjectStore> {
        match self {
            Dest::Dir(dir) => Box::new(FileStore::open(dir).unwrap()),
            Dest::S3(g, _) => {
                Box::new(S3Store::open(&self.url(), &g.aws_config(), &Default::default()).unwrap())
            }
        }
    }
}

/// Runs `archive -f config [-k kek] --to to extra...` with `env` added.
fn run_archive(
    config: &Path,
    kek: Option<&Path>,
    to: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> Output {
    let mut cmd = Command::new(ARCHIVE);
    cmd.arg("-f").arg(config);
    if let Some(kek) = kek {
        cmd.arg("-k").arg(kek);
    }
    cmd.args(["--to", to])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().unwrap()
}

/// The counts the tool prints (`field: value` lines).
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    uploaded: u64,
    reused: u64,
    zero: u64,
}

fn archive_ok(config: &Path, kek: &Path, dest: &Dest) -> (Counts, String) {
    archive_ok_with(config, kek, &dest.url(), &[], &dest.env())
}

/// [`archive_ok`] to `to` with the flags `extra` and the environment `env`.
fn archive_ok_with(
    config: &Path,
    kek: &Path,
    to: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> (Counts, String) {
    let out = run_archive(config, Some(kek), to, extra, env);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "archive failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> u64 {
        let prefix = format!("{name}: ");
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    assert!(stdout.contains("mb_per_sec: "), "{stdout}");
    let counts = Counts {
        uploaded: field("uploaded"),
        reused: field("reused"),
        zero: field("zero"),
    };
    (counts, stdout)
}

/// The manifest's chunk list (`null` or a name).
fn manifest_chunks(dest: &Dest) -> Vec<Option<String>> {
    let text = dest.read("manifest.json").expect("no manifest.json");
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    v["body"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect()
}

/// The archive's content, read with the library's reader.
fn archive_content(dest: &Dest) -> Vec<u8> {
    let r = ArchiveReader::open(dest.store(), &KEK).unwrap();
    let mut out = vec![0xee; r.manifest().disk_bytes as usize];
    r.read_at(0, &mut out).unwrap();
    out
}

/// A disk's plaintext with structure: chunks 2 and 5 zero, chunk 6 a copy of chunk 1, so 5
/// distinct non-zero chunks.
fn plaintext() -> Vec<u8> {
    let mut d = pattern_bytes(0x1000_0000, DISK);
    d[2 * MIB..3 * MIB].fill(0);
    d[5 * MIB..6 * MIB].fill(0);
    d.copy_within(MIB..2 * MIB, 6 * MIB);
    d
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i} (MiB {}) differs: got {:#04x}, want {:#04x}",
            i / MIB,
            got[i],
            want[i]
        );
    }
}

/// The whole disk through libblkio, 256 KiB at a time.
fn read_disk(c: &mut Client, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (256 << 10).min(len - out.len());
        let got = c.read(0, out.len() as u64, n).unwrap();
        out.extend_from_slice(&got);
    }
    out
}

fn stop(mut be: Backend) {
    be.guard.signal(libc::SIGTERM);
    assert!(
        be.guard.wait_timeout(Duration::from_secs(10)).is_some(),
        "no exit on SIGTERM:\n{}",
        be.log()
    );
}

fn wait_complete(ctl: &Path, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let s = ControlStatus::query(ctl).unwrap();
        if s.complete {
            assert_eq!(s.fetch_errors, 0, "{}", s.raw);
            return;
        }
        assert!(t0.elapsed() < timeout, "fetch did not finish: {}", s.raw);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Host B: an empty disk (stale bytes 0x5a) filled from `archive_url` (with the
/// destination's environment), with 64 KiB stripes unless `shift` says otherwise, and the
/// `extra` config lines.
struct HostB {
    dir: tempfile::TempDir,
    disk: PathBuf,
    ctl: PathBuf,
    config: BackendConfig,
    env: Vec<(String, String)>,
}

impl HostB {
    fn new(archive: &Dest, kek: &Path, shift: u8, extra: &[String]) -> HostB {
        let dir = scratch_dir("ubiblk-arch-b");
        let d = dir.path();
        let (disk, ctl) = (d.join("disk-b.raw"), d.join("ctl.sock"));
        std::fs::write(&disk, vec![0x5a; DISK]).unwrap();
        let mut config = BackendConfig::new(&disk, d.join("vhost.sock"))
            .extra(format!("archive_url: {}", yaml_str(&archive.url())))
            .extra_path("metadata_path", &d.join("meta"))
            .extra_path("control_socket", &ctl);
        for line in extra {
            config = config.extra(line.clone());
        }
        let config_path = write_config(d, "config-b.yaml", &config);
        let out = Command::new(INIT)
            .arg("-f")
            .arg(&config_path)
            .arg("-k")
            .arg(kek)
            .args(["-s", &shift.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "init-metadata: {out:?}");
        HostB {
            dir,
            disk,
            ctl,
            config,
            env: archive.env(),
        }
    }

    fn start(&self, kek: &Path) -> (Backend, Client) {
        let args = ["--kek", kek.to_str().unwrap()];
        let be = Backend::start_with_env(BACKEND, &self.config, &args, &self.env).unwrap();
        let c = Client::connect_queues(&self.config.socket, 1).unwrap();
        (be, c)
    }
}

/// A plain disk ([`plaintext`]) in `d`, with its config file: (disk, config).
fn plain_disk(d: &Path, data: &[u8]) -> (PathBuf, PathBuf) {
    let disk = d.join("disk.raw");
    std::fs::write(&disk, data).unwrap();
    let config = write_config(d, "config.yaml", &BackendConfig::new(&disk, d.join("sock")));
    (disk, config)
}

#[test]
fn plain_disk_archive_stores_each_distinct_non_zero_chunk_once_under_keyed_names() {
    let dir = scratch_dir("ubiblk-arch-plain");
    archive_twice(dir.path(), &Dest::Dir(dir.path().join("archive")));
}

/// The archive of a plain disk in an `s3://` prefix: one object per distinct non-zero chunk in
/// the bucket's listing; after one stripe changed, one new object. The `--s3-endpoint` and
/// `--s3-region` flags stand in for the environment's.
#[test]
fn plain_disk_archive_in_s3_uploads_each_distinct_chunk_once() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let dir = scratch_dir("ubiblk-arch-s3-plain");
    let garage = Garage::start();
    let dest = Dest::S3(&garage, "backups/vm1");
    let (config, kek, data) = archive_twice(dir.path(), &dest);
    let keys: Vec<String> = garage.list("").into_iter().map(|(k, _)| k).collect();
    assert!(
        keys.iter().all(|k| k.starts_with("backups/vm1/")),
        "objects outside the prefix: {keys:?}"
    );

    // Endpoint and region from the flags only: nothing new to upload.
    let env: Vec<(String, String)> = garage
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL" && k != "AWS_REGION")
        .collect();
    let flags = [
        "--s3-endpoint",
        &garage.endpoint(),
        "--s3-region",
        &garage.region(),
    ];
    let (counts, stdout) = archive_ok_with(&config, &kek, &dest.url(), &flags, &env);
    let want = Counts {
        uploaded: 0,
        reused: 6,
        zero: 2,
    };
    assert_eq!(counts, want, "{stdout}");
    assert_eq!(dest.objects().len(), 6, "{stdout}");
    assert_same(
        &archive_content(&dest),
        &data,
        "archive after a run with the flags",
    );
}

/// Archives [`plaintext`] (a disk in `d`) to `dest`: each distinct non-zero chunk stored once
/// under a keyed name; then one changed stripe uploads exactly one new object. Returns the
/// config, the KEK file and the disk's content.
fn archive_twice(d: &Path, dest: &Dest) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut data = plaintext();
    let (disk, config) = plain_disk(d, &data);
    let kek = kek_file(d, "aes256-gcm");

    let (counts, stdout) = archive_ok(&config, &kek, dest);
    let want = Counts {
        uploaded: 5,
        reused: 1,
        zero: 2,
    };
    assert_eq!(counts, want, "{stdout}");
    assert!(stdout.contains("8 chunks of 1048576 bytes"), "{stdout}");
    let names = dest.objects();
    assert_eq!(names.len(), 5, "objects: {names:?}");
    let chunks = manifest_chunks(dest);
    assert_eq!(chunks.len(), 8);
    assert!(chunks[2].is_none() && chunks[5].is_none());
    assert_eq!(chunks[1], chunks[6]);
    let listed: HashSet<String> = chunks.iter().flatten().cloned().collect();
    assert_eq!(listed, names);
    // Names are keyed: no plain hash of any chunk shows up anywhere in the archive.
    let manifest = String::from_utf8(dest.read("manifest.json").unwrap()).unwrap();
    for chunk in data.chunks(MIB) {
        let plain: String = Sha256::digest(chunk)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!names.contains(&plain));
        assert!(!manifest.contains(&plain[..16]));
    }
    assert_same(&archive_content(dest), &data, "archive");
    // The tool left the disk alone.
    assert_same(&std::fs::read(&disk).unwrap(), &data, "disk");

    // One changed stripe: exactly one new object.
    data[3 * MIB + 777] ^= 0xff;
    std::fs::write(&disk, &data).unwrap();
    let (counts, stdout) = archive_ok(&config, &kek, dest);
    let want = Counts {
        uploaded: 1,
        reused: 5,
        zero: 2,
    };
    assert_eq!(counts, want, "{stdout}");
    assert!(stdout.contains("updating the archive there"), "{stdout}");
    let after = dest.objects();
    assert_eq!(after.len(), 6, "objects after the change: {after:?}");
    assert!(after.is_superset(&names));
    assert_same(&archive_content(dest), &data, "archive after the change");
    (config, kek, data)
}

#[test]
fn archives_need_an_aes_gcm_kek_in_the_tool_and_the_backend() {
    let dir = scratch_dir("ubiblk-arch-kek");
    let d = dir.path();
    let (_, config) = plain_disk(d, &plaintext());
    let arch = d.join("archive");
    let none = kek_file(d, "none");
    for kek in [None, Some(none.as_path())] {
        let out = run_archive(&config, kek, &file_url(&arch), &[], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("needs a KEK with method aes256-gcm"),
            "{stderr}"
        );
        assert!(!arch.join("manifest.json").exists());
    }
    let out = run_archive(&config, None, "ftp://x/y", &[], &[]);
    assert!(!out.status.success());

    // --unlink-kek: read, used, gone.
    let kek = kek_file(d, "aes256-gcm");
    let out = run_archive(&config, Some(&kek), &file_url(&arch), &["-u"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!kek.exists());

    // The backend: without a KEK, or with method none, archive_url is refused at start.
    let kek = kek_file(d, "aes256-gcm");
    let b = HostB::new(&Dest::Dir(arch), &kek, 7, &[]);
    for args in [
        vec![],
        vec!["--kek".to_string(), none.display().to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut g = Backend::spawn(BACKEND, &b.config, &args).unwrap();
        assert!(g.wait_timeout(Duration::from_secs(10)).is_some());
        let log = g.log();
        assert!(log.contains("archive_url"), "{log}");
        assert!(log.contains("needs a KEK with method aes256-gcm"), "{log}");
        assert!(!log.contains(&b64(&KEK)), "{log}");
    }
    // Another KEK: the archive's key does not unwrap.
    let other = d.join("other-kek.yaml");
    std::fs::write(
        &other,
        format!(
            "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: \"\"\n",
            b64(&[0x99; 32]),
            b64(&IV)
        ),
    )
    .unwrap();
    let mut g = Backend::spawn(BACKEND, &b.config, &["--kek", other.to_str().unwrap()]).unwrap();
    assert!(g.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(g.log().contains("authentication failed"), "{}", g.log());
    drop(b);
}

/// The move: host A serves an encrypted disk, the guest writes, A stops and is archived; host
/// B starts an empty disk with its own keys on `archive_url` with autofetch and serves A's
/// content at once; once B's fetch completes, B's disk decrypts to A's plaintext.
#[test]
fn moving_an_encrypted_disk_between_hosts() {
    let dir = scratch_dir("ubiblk-arch-move");
    move_between_hosts(dir.path(), &Dest::Dir(dir.path().join("archive")));
}

/// [`moving_an_encrypted_disk_between_hosts`] through S3: A archives to `s3://`, B starts on
/// `archive_url: s3://...` with the AWS environment.
#[test]
fn moving_an_encrypted_disk_between_hosts_through_s3() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let dir = scratch_dir("ubiblk-arch-s3-move");
    let garage = Garage::start();
    move_between_hosts(dir.path(), &Dest::S3(&garage, "moves/vm1"));
}

/// The move, with host A's files in `d` and the archive in `dest`.
fn move_between_hosts(d: &Path, dest: &Dest) {
    let disk_a = d.join("disk-a.raw");
    let kek = kek_file(d, "aes256-gcm");
    let mut want = plaintext();
    let mut raw = want.clone();
    xts(&KA).encrypt(0, &mut raw);
    std::fs::write(&disk_a, &raw).unwrap();

    // Host A: the guest writes into a zero chunk and across a chunk boundary.
    let config_a = BackendConfig::new(&disk_a, d.join("a.sock")).extra(keys_line(&KA));
    let be =
        Backend::start_with_args(BACKEND, &config_a, &["--kek", kek.to_str().unwrap()]).unwrap();
    let mut c = Client::connect_queues(&config_a.socket, 1).unwrap();
    for (off, seed) in [(2 * MIB + 4096, 1), (4 * MIB - 8192, 2)] {
        let data = pattern_bytes(seed << 32, 65536);
        c.write(0, off as u64, &data).unwrap();
        want[off..off + data.len()].copy_from_slice(&data);
    }
    c.flush(0).unwrap();
    drop(c);
    stop(be);
    let mut a_plain = std::fs::read(&disk_a).unwrap();
    xts(&KA).decrypt(0, &mut a_plain);
    assert_same(&a_plain, &want, "host A's disk");

    let config_a_path = write_config(d, "config-a.yaml", &config_a);
    let (counts, stdout) = archive_ok(&config_a_path, &kek, dest);
    assert_eq!(counts.zero, 1, "{stdout}");
    assert_eq!(counts.uploaded + counts.reused, 7, "{stdout}");
    assert_same(&archive_content(dest), &want, "archive");

    // Host B: its own keys, 64 KiB stripes (the archive has 1 MiB chunks), slow autofetch.
    let extra = [
        keys_line(&KB),
        "autofetch: true".to_string(),
        "autofetch_mib_per_sec: 4".to_string(),
    ];
    let b = HostB::new(dest, &kek, 7, &extra);
    let (be, mut c) = b.start(&kek);
    let first = ControlStatus::query(&b.ctl).unwrap();
    assert!(!first.complete, "{}", first.raw);
    // Served at once, before the fetch completes: reads wait for their stripes only.
    for (off, len) in [
        (2 * MIB, 128 << 10),
        (DISK - 4096, 4096),
        (4 * MIB - 4096, 8192),
    ] {
        let got = c.read(0, off as u64, len).unwrap();
        assert_same(&got, &want[off..off + len], "B, early read");
    }
    wait_complete(&b.ctl, Duration::from_secs(60));
    assert_same(&read_disk(&mut c, DISK), &want, "B through libblkio");
    drop(c);
    stop(be);
    let mut b_raw = std::fs::read(&b.disk).unwrap();
    assert_ne!(b_raw[..MIB], want[..MIB], "B's disk is not encrypted");
    xts(&KB).decrypt(0, &mut b_raw);
    assert_same(&b_raw, &want, "B's disk, decrypted with B's keys");
    assert_same(&b_raw, &a_plain, "A's disk and B's disk");
    drop(b.dir);
}

/// A damaged object and a missing one: EIO for their stripes and a log line naming the chunk,
/// every other stripe served; once the object is repaired, the next read fetches it.
#[test]
fn damaged_or_missing_chunks_fail_their_stripes_only() {
    let dir = scratch_dir("ubiblk-arch-bad");
    damaged_chunks(dir.path(), &Dest::Dir(dir.path().join("archive")));
}

/// [`damaged_or_missing_chunks_fail_their_stripes_only`] with the objects in S3 (changed and
/// deleted through boto3).
#[test]
fn damaged_or_missing_chunks_in_s3_fail_their_stripes_only() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let dir = scratch_dir("ubiblk-arch-s3-bad");
    let garage = Garage::start();
    damaged_chunks(dir.path(), &Dest::S3(&garage, "bad/vm1"));
}

/// Archives a plain disk in `d` to `dest`, damages chunk 3's object, deletes chunk 4's, and
/// reads from a host B on the archive.
fn damaged_chunks(d: &Path, dest: &Dest) {
    let want = plaintext();
    let (_, config) = plain_disk(d, &want);
    let kek = kek_file(d, "aes256-gcm");
    archive_ok(&config, &kek, dest);
    let chunks = manifest_chunks(dest);
    let object = |i: usize| format!("chunks/{}", chunks[i].as_ref().unwrap());
    let good3 = dest.read(&object(3)).unwrap();
    let mut bad = good3.clone();
    bad[100] ^= 0x10;
    dest.write(&object(3), &bad);
    let good4 = dest.read(&object(4)).unwrap();
    dest.delete(&object(4));
    assert!(dest.read(&object(4)).is_none(), "{} still there", object(4));

    // A plain host B (no encryption_key: the KEK only opens the archive).
    let b = HostB::new(dest, &kek, 7, &[]);
    let (be, mut c) = b.start(&kek);
    for i in [3, 4] {
        let e = c.read(0, (i * MIB + 65536) as u64, 4096).unwrap_err();
        assert_eq!(e, libc::EIO, "chunk {i}: {}", errno_name(e));
    }
    for i in [0, 1, 2, 5, 6, 7] {
        let got = c.read(0, (i * MIB) as u64, 65536).unwrap();
        assert_same(&got, &want[i * MIB..i * MIB + 65536], "a good chunk");
    }
    let log = be.log();
    let line3 = log.lines().find(|l| l.contains("chunk 3")).unwrap_or("");
    assert!(
        line3.contains("fetching stripe") && line3.contains("authentication failed"),
        "{log}"
    );
    let line4 = log.lines().find(|l| l.contains("chunk 4")).unwrap_or("");
    assert!(
        line4.contains("fetching stripe") && line4.contains("cannot read"),
        "{log}"
    );
    let status = ControlStatus::query(&b.ctl).unwrap();
    assert!(status.fetch_errors >= 2, "{}", status.raw);

    dest.write(&object(3), &good3);
    dest.write(&object(4), &good4);
    for i in [3, 4] {
        let off = i * MIB + 65536;
        let got = c.read(0, off as u64, 4096).unwrap();
        assert_same(&got, &want[off..off + 4096], "a repaired chunk");
    }
    drop(c);
    stop(be);
}

/// A lazy disk only partly fetched: fetched stripes come from its base disk, the others from
/// its image; the tool changes neither the disk nor the metadata. The archive has the disk's
/// stripe size, and a host B with another stripe size serves it.
#[test]
fn partly_fetched_lazy_disk_archives_with_its_image() {
    const SHIFT: u8 = 7;
    const STRIPE: usize = 512 << SHIFT;
    // The image stops 1 MiB before the end of the disk: zeros there.
    let image = pattern_bytes(0x7000_0000, DISK - MIB);
    let files = LazyFiles::new("ubiblk-arch-lazy", DISK as u64, 0x77, &image, &[]);
    files.init_metadata(INIT, SHIFT);
    let mut want = image.clone();
    want.resize(DISK, 0);

    let be = Backend::start(BACKEND, &files.config).unwrap();
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    for (off, seed) in [(5 * STRIPE + 512, 3), (DISK - STRIPE, 4)] {
        let data = pattern_bytes(seed << 32, 4096);
        c.write(0, off as u64, &data).unwrap();
        want[off..off + data.len()].copy_from_slice(&data);
    }
    // A read without copy-on-read: served from the image, nothing fetched.
    let got = c.read(0, (20 * STRIPE) as u64, STRIPE).unwrap();
    assert_same(&got, &want[20 * STRIPE..21 * STRIPE], "A's read");
    c.flush(0).unwrap();
    drop(c);
    stop(be);

    let (meta_before, base_before) = (
        std::fs::read(&files.meta).unwrap(),
        std::fs::read(&files.base).unwrap(),
    );
    let kek = kek_file(files.dir.path(), "aes256-gcm");
    let arch = files.dir.path().join("archive");
    let arch = Dest::Dir(arch);
    let (counts, stdout) = archive_ok(&files.config_file(), &kek, &arch);
    // The guest's stripe 5, and the 16 stripes past the image that init-metadata zeroed and
    // marked fetched (the last of them also written by the guest).
    assert!(
        stdout.contains("17 of 128 stripes fetched, the others read from"),
        "{stdout}"
    );
    assert!(stdout.contains("128 chunks of 65536 bytes"), "{stdout}");
    // The last MiB is past the image: zeros, except the stripe the guest wrote.
    assert_eq!(counts.zero, 15, "{stdout}");
    assert_eq!(counts.uploaded + counts.reused, 113, "{stdout}");
    assert_eq!(std::fs::read(&files.meta).unwrap(), meta_before);
    assert_eq!(std::fs::read(&files.base).unwrap(), base_before);
    assert_same(&archive_content(&arch), &want, "archive");

    // Host B with 128 KiB stripes over 64 KiB chunks, demand fetch only.
    let b = HostB::new(&arch, &kek, SHIFT + 1, &[]);
    let (be, mut c) = b.start(&kek);
    assert_same(&read_disk(&mut c, DISK), &want, "B through libblkio");
    drop(c);
    stop(be);
}

/// What a killed `archive` run leaves in a `file://` store (its `.tmp-PID-NAME` files, PID
/// gone) is removed by the next run, which logs how many; a live writer's are left alone.
#[test]
fn temporaries_of_killed_runs_are_removed_by_the_next_run() {
    let dir = scratch_dir("ubiblk-arch-tmp");
    let d = dir.path();
    let (_disk, config) = plain_disk(d, &plaintext());
    let kek = kek_file(d, "aes256-gcm");
    let store = d.join("archive");
    let dest = Dest::Dir(store.clone());
    archive_ok(&config, &kek, &dest);
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = [
        store.join(format!(".tmp-{dead}-manifest.json")),
        store.join(format!("chunks/.tmp-{dead}-0123abcd")),
    ];
    for p in &stale {
        std::fs::write(p, b"half an object").unwrap();
    }
    let live = store.join(format!("chunks/.tmp-{}-4567", std::process::id()));
    std::fs::write(&live, b"a writer still running").unwrap();
    let out = run_archive(&config, Some(&kek), &dest.url(), &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for p in &stale {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(live.exists());
    assert!(
        stderr.contains("removed 2 temporary file(s) of interrupted earlier runs"),
        "{stderr}"
    );
    assert_same(
        &archive_content(&dest),
        &plaintext(),
        "the archive after the run",
    );
}
