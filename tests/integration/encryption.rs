//! The encrypted backend, checked against an independent XTS implementation (OpenSSL via
//! Python's `cryptography`, tests/tools/xts_ref.py) in both directions, through libblkio.

use crate::common::*;
use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const DUMP: &str = env!("CARGO_BIN_EXE_dump-metadata");
const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x7e; 32];
const SIZE: u64 = 8 << 20;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the reference over `data` (starting at `sector`).
fn reference(op: &str, sector: u64, data: &[u8], dir: &Path) -> Vec<u8> {
    let (src, dst) = (dir.join("ref.in"), dir.join("ref.out"));
    std::fs::write(&src, data).unwrap();
    let st = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/xts_ref.py"
        ))
        .args([op, &hex(&K1), &hex(&K2), &sector.to_string()])
        .args([&src, &dst])
        .status()
        .expect("python3 (with the `cryptography` package) is needed: .ci/run installs it");
    assert!(st.success(), "xts_ref.py failed");
    std::fs::read(dst).unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
}

fn setup() -> Setup {
    let dir = scratch_dir("ubiblk-enc");
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let sock = dir.path().join("vhost.sock");
    Setup { dir, img, sock }
}

fn raw_keys() -> String {
    format!("encryption_key: [\"{}\", \"{}\"]", b64(&K1), b64(&K2))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect()
}

#[test]
fn writes_land_encrypted_and_decrypt_independently() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let s = setup();
    let _be = Backend::start(BIN, &BackendConfig::new(&s.img, &s.sock).extra(raw_keys())).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    let data = pattern(65536);
    let off = 3 * 512; // an odd sector: the tweak is the absolute sector number
    c.write(0, off, &data).unwrap();
    assert_eq!(c.read(0, off, data.len()).unwrap(), data);
    c.flush(0).unwrap();
    let raw = read_file_at(&s.img, off, data.len()).unwrap();
    assert_ne!(raw, data);
    // No 512-byte piece of the plaintext appears on disk.
    let disk = std::fs::read(&s.img).unwrap();
    assert!(!disk.windows(64).any(|w| w == &data[512..576]));
    assert_eq!(reference("decrypt", off / 512, &raw, s.dir.path()), data);
}

#[test]
fn independently_encrypted_disk_reads_back_plain() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let s = setup();
    let data = pattern(1 << 20);
    let cipher = reference("encrypt", 2048, &data, s.dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.img)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &cipher, 2048 * 512).unwrap();
    drop(f);
    let _be = Backend::start(BIN, &BackendConfig::new(&s.img, &s.sock).extra(raw_keys())).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    // And the whole MiB in one request (decrypted in place in the client's buffer).
    let pieces = [
        (0usize, 65536usize),
        (512, 4096),
        (1048576 - 8192, 8192),
        (0, 1 << 20),
    ];
    for (off, len) in pieces {
        let got = c.read(0, 2048 * 512 + off as u64, len).unwrap();
        assert_eq!(got, data[off..off + len], "offset {off}");
    }
}

#[test]
fn large_writes_land_encrypted_like_the_reference() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    // 1 MiB requests, the largest the backend takes, at an odd sector.
    let s = setup();
    let _be = Backend::start(BIN, &BackendConfig::new(&s.img, &s.sock).extra(raw_keys())).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    let len = 1 << 20;
    let data = pattern(3 * len);
    for i in 0..3 {
        let off = 3 * 512 + (i * len) as u64;
        c.write(0, off, &data[i * len..(i + 1) * len]).unwrap();
    }
    c.flush(0).unwrap();
    let raw = read_file_at(&s.img, 3 * 512, data.len()).unwrap();
    assert!(reference("decrypt", 3, &raw, s.dir.path()) == data);
    for i in 0..3 {
        let off = 3 * 512 + (i * len) as u64;
        assert!(c.read(0, off, len).unwrap() == data[i * len..(i + 1) * len]);
    }
}

#[test]
fn write_zeroes_stores_encrypted_zeros() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let s = setup();
    let _be = Backend::start(BIN, &BackendConfig::new(&s.img, &s.sock).extra(raw_keys())).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    c.write(0, 0, &pattern(16384)).unwrap();
    c.write_zeroes(0, 4096, 8192, true).unwrap();
    let got = c.read(0, 0, 16384).unwrap();
    assert_eq!(&got[..4096], &pattern(16384)[..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    let raw = read_file_at(&s.img, 4096, 8192).unwrap();
    assert!(
        raw.iter().any(|&b| b != 0),
        "zeros must be stored encrypted"
    );
    assert_eq!(reference("decrypt", 8, &raw, s.dir.path()), vec![0u8; 8192]);
}

fn wrap(kek: &[u8; 32], iv: &[u8; 12], aad: &[u8], key: &[u8; 32]) -> String {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let gcm = Aes256Gcm::new_from_slice(kek).unwrap();
    let mut buf = key.to_vec();
    let tag = gcm
        .encrypt_inout_detached(
            &Nonce::try_from(&iv[..]).unwrap(),
            aad,
            buf.as_mut_slice().into(),
        )
        .unwrap();
    buf.extend_from_slice(&tag);
    b64(&buf)
}

const KEK: [u8; 32] = [0xa5; 32];
const IV: [u8; 12] = [0x3c; 12];
const AAD: &[u8] = b"vm3jgez8_0";

fn kek_yaml(key: &[u8; 32]) -> String {
    format!(
        "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
        b64(key),
        b64(&IV),
        b64(AAD)
    )
}

fn wrapped_keys() -> String {
    format!(
        "encryption_key: [\"{}\", \"{}\"]",
        wrap(&KEK, &IV, AAD, &K1),
        wrap(&KEK, &IV, AAD, &K2)
    )
}

#[test]
fn kek_wrapped_keys_unlink_and_agree_with_raw_keys() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let s = setup();
    let kek = s.dir.path().join("kek.yaml");
    std::fs::write(&kek, kek_yaml(&KEK)).unwrap();
    let cfg = BackendConfig::new(&s.img, &s.sock).extra(wrapped_keys());
    let args = ["--kek", kek.to_str().unwrap(), "--unlink-kek"];
    let be = Backend::start_with_args(BIN, &cfg, &args).unwrap();
    assert!(!kek.exists(), "--unlink-kek left the KEK file");
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    c.write(0, 0, &pattern(4096)).unwrap();
    drop(c);
    drop(be);
    let raw = read_file_at(&s.img, 0, 4096).unwrap();
    assert_eq!(reference("decrypt", 0, &raw, s.dir.path()), pattern(4096));
}

#[test]
fn kek_from_a_fifo() {
    let s = setup();
    let fifo = s.dir.path().join("kek.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let cfg = BackendConfig::new(&s.img, &s.sock).extra(wrapped_keys());
    let mut be = Backend::spawn(BIN, &cfg, &["--kek", fifo.to_str().unwrap()]).unwrap();
    // With no writer yet it says what it waits for, and waits.
    let line = format!("waiting for a writer on the KEK FIFO {}", fifo.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !be.log().contains(&line) {
        assert!(be.try_wait().is_none(), "exited: {}", be.log());
        assert!(
            std::time::Instant::now() < deadline,
            "no {line:?} in {}",
            be.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(be.try_wait().is_none() && !s.sock.exists(), "{}", be.log());
    std::fs::write(&fifo, kek_yaml(&KEK)).unwrap();
    be.wait_for_socket(&s.sock, SOCKET_TIMEOUT).unwrap();
    assert_eq!(be.log().matches("KEK FIFO").count(), 1, "{}", be.log());
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    c.write(0, 512, &pattern(1024)).unwrap();
    assert_eq!(c.read(0, 512, 1024).unwrap(), pattern(1024));
}

/// Runs `bin -f config ARGS` to its end (it must fail); returns stdout + stderr.
fn failed_run(bin: &str, config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("-f")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{bin} succeeded: {text}");
    text
}

/// No tool prints key material, whatever the config or the KEK file holds: not the base64 of a
/// key, a wrapped key or the KEK, nor any 12 characters of one; the error still names the file
/// and the field.
#[test]
fn malformed_configs_and_kek_files_never_print_a_key() {
    let s = setup();
    let kek = s.dir.path().join("kek.yaml");
    let cfg = s.dir.path().join("config.yaml");
    let raw = b64(&K1);
    let (w1, w2) = (wrap(&KEK, &IV, AAD, &K1), wrap(&KEK, &IV, AAD, &K2));
    let kek_key = b64(&KEK);
    let secrets = [
        raw.clone(),
        b64(&K2),
        w1.clone(),
        w2.clone(),
        kek_key.clone(),
    ];
    let head = format!("path: {}\nsocket: {}\n", s.img.display(), s.sock.display());
    let good_kek = kek_yaml(&KEK);
    let good_keys = format!("encryption_key: [{w1}, {w2}]");
    // (config lines, KEK file, what the error says, the file it names: the config, the KEK,
    // or neither for a problem found after parsing).
    let (c, k, none) = (cfg.to_str().unwrap(), kek.to_str().unwrap(), "");
    let configs = [
        (
            format!("encryption_key: {raw}"),
            "`encryption_key`: expected a sequence",
            c,
        ),
        (format!("encryption_key: \"{w1}\""), "`encryption_key`", c),
        (
            format!("encryption_key: {{{raw}: {w1}}}"),
            "`encryption_key`",
            c,
        ),
        (
            format!("encryption_key: [[{raw}], {w2}]"),
            "`encryption_key[0]`",
            c,
        ),
        (
            format!("encryption_key:\n  - {raw}\n  - {{a: {w2}}}"),
            "`encryption_key[1]`",
            c,
        ),
        (format!("num_queues: {raw}"), "`num_queues`", c),
        (format!("device_id: [{raw}]"), "`device_id`", c),
        (format!("{raw}: 1"), "unknown field", c),
        (format!("encryption_key: [\"{raw}"), "not valid YAML", c),
        (
            format!("encryption_key: [{raw}, \" {raw}\"]"),
            "the same",
            none,
        ),
    ];
    let kek_files = [
        (kek_key.clone(), "not a KEK file"),
        (w1.clone(), "not a KEK file"),
        (format!("\"{kek_key}\""), "not a KEK file"),
        (format!("- {kek_key}"), "not a KEK file"),
        (format!("{kek_key}: 1"), "unknown field"),
        (format!("method: {kek_key}"), "`method`"),
        (format!("method: aes256-gcm\nkey: [{kek_key}]"), "`key`"),
        (format!("{good_kek}key: {kek_key}"), "duplicate field `key`"),
        (
            format!("method: aes256-gcm\nkey: \"{kek_key}"),
            "not valid YAML",
        ),
    ];
    // Configs without a KEK, KEK files with wrapped keys in the config, and wrapped keys given
    // as one string or twice, with the right KEK.
    let cases = configs
        .into_iter()
        .map(|(config, want, file)| (config, None, want, file))
        .chain(
            kek_files
                .into_iter()
                .map(|(text, want)| (good_keys.clone(), Some(text), want, k)),
        )
        .chain([
            (
                format!("encryption_key: {w1}"),
                Some(good_kek.clone()),
                "`encryption_key`",
                c,
            ),
            (
                format!("encryption_key: [{w1}, {w1}]"),
                Some(good_kek.clone()),
                "the same",
                none,
            ),
        ]);
    for (config, kek_text, want, file) in cases {
        std::fs::write(&cfg, format!("{head}{config}\n")).unwrap();
        let mut args = vec![];
        if let Some(text) = &kek_text {
            std::fs::write(&kek, format!("{text}\n")).unwrap();
            args = vec!["--kek", k];
        }
        for bin in [BIN, INIT, DUMP] {
            let out = failed_run(bin, &cfg, &args);
            for secret in &secrets {
                for start in 0..=secret.len() - 12 {
                    let piece = &secret[start..start + 12];
                    assert!(
                        !out.contains(piece),
                        "{bin} printed {piece:?} of a key: {out}"
                    );
                }
            }
            assert!(
                out.contains(want),
                "{bin}, {config} {kek_text:?}: want {want:?} in {out}"
            );
            assert!(out.contains(file), "{bin}: want {file:?} in {out}");
            assert_eq!(out.trim_end().lines().count(), 1, "{bin}: {out}");
        }
    }
}

/// `--unlink-kek` removes the KEK however the start fails, in every tool.
#[test]
fn unlink_kek_removes_it_whatever_fails() {
    let s = setup();
    let kek = s.dir.path().join("kek.yaml");
    let cfg = s.dir.path().join("config.yaml");
    let missing = s.dir.path().join("missing.yaml");
    let head = format!("path: {}\nsocket: {}\n", s.img.display(), s.sock.display());
    let cases = [
        (None, kek_yaml(&KEK), "cannot read config file"),
        (
            Some("path: [\n".to_string()),
            kek_yaml(&KEK),
            "invalid config file",
        ),
        (
            Some(format!("{head}num_queues: 0\n")),
            kek_yaml(&KEK),
            "num_queues",
        ),
        (Some(format!("{head}bogus: 1\n")), kek_yaml(&KEK), "bogus"),
        (
            Some(format!("{head}{}\n", wrapped_keys())),
            "method: rot13\n".into(),
            "method",
        ),
        (
            Some(format!("{head}{}\n", wrapped_keys())),
            "[\n".into(),
            "--kek",
        ),
        (
            Some(format!("{head}{}\n", wrapped_keys())),
            kek_yaml(&[9; 32]),
            "authentication",
        ),
    ];
    for (config, kek_text, want) in cases {
        let config_path = match &config {
            Some(text) => {
                std::fs::write(&cfg, text).unwrap();
                &cfg
            }
            None => &missing,
        };
        for bin in [BIN, INIT, DUMP] {
            std::fs::write(&kek, &kek_text).unwrap();
            let out = failed_run(bin, config_path, &["--kek", kek.to_str().unwrap(), "-u"]);
            assert!(out.contains(want), "{bin}, {config:?}: {out}");
            assert!(
                !kek.exists(),
                "{bin}, {config:?}: the KEK is still there ({out})"
            );
        }
    }
}

/// Starts the backend expecting it to refuse; returns its log.
fn refused(s: &Setup, cfg: &BackendConfig, args: &[&str]) -> String {
    let mut guard = Backend::spawn(BIN, cfg, args).unwrap();
    let st = guard
        .wait_timeout(Duration::from_secs(10))
        .expect("backend kept running");
    assert!(!st.success());
    assert!(!s.sock.exists(), "a refused backend must not serve");
    guard.log()
}

#[test]
fn bad_keys_are_refused_with_a_clear_error() {
    let s = setup();
    let kek = s.dir.path().join("kek.yaml");
    let cfg = BackendConfig::new(&s.img, &s.sock).extra(wrapped_keys());
    let kek_arg = ["--kek", kek.to_str().unwrap()];

    std::fs::write(&kek, kek_yaml(&[0x5a; 32])).unwrap();
    let log = refused(&s, &cfg, &kek_arg);
    assert!(log.contains("authentication failed"), "{log}");

    std::fs::write(
        &kek,
        "method: aes256-gcm\nkey: nope!\ninit_vector: AA==\nauth_data: \"\"\n",
    )
    .unwrap();
    let log = refused(&s, &cfg, &kek_arg);
    assert!(log.contains("key") && log.contains("base64"), "{log}");

    // Wrapped keys without --kek.
    let log = refused(&s, &cfg, &[]);
    assert!(log.contains("--kek"), "{log}");

    // A 31-byte raw key.
    let short = BackendConfig::new(&s.img, &s.sock).extra(format!(
        "encryption_key: [\"{}\", \"{}\"]",
        b64(&[1; 31]),
        b64(&K2)
    ));
    let log = refused(&s, &short, &[]);
    assert!(
        log.contains("encryption_key[0]") && log.contains("31 bytes"),
        "{log}"
    );

    // --kek without encryption_key.
    std::fs::write(&kek, kek_yaml(&KEK)).unwrap();
    let plain = BackendConfig::new(&s.img, &s.sock);
    let log = refused(&s, &plain, &kek_arg);
    assert!(log.contains("encryption_key"), "{log}");
}

/// Unaligned guest buffers go through a bounce buffer, aligned ones are transformed straight
/// between guest memory and the device buffer: both must produce the same disk.
#[test]
fn bounced_and_direct_paths_agree() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let s = setup();
    let _be = Backend::start(BIN, &BackendConfig::new(&s.img, &s.sock).extra(raw_keys())).unwrap();
    let mut c = Client::connect_queues(&s.sock, 1).unwrap();
    let data = pattern(16384);
    // Odd buffer addresses: bounced.
    c.writev_at(0, 0, &[(1, &data[..4096]), (9001, &data[4096..])])
        .unwrap();
    // Aligned: direct.
    c.write(0, 16384, &data).unwrap();
    let raw_a = read_file_at(&s.img, 0, 16384).unwrap();
    let raw_b = read_file_at(&s.img, 16384, 16384).unwrap();
    assert_eq!(reference("decrypt", 0, &raw_a, s.dir.path()), data);
    assert_eq!(reference("decrypt", 32, &raw_b, s.dir.path()), data);
    // And read back both ways.
    assert_eq!(c.read(0, 0, 16384).unwrap(), data);
    let parts = c.readv_at(0, 16384, &[(3, 8192), (20011, 8192)]).unwrap();
    assert_eq!(parts.concat(), data);
}

/// Every XTS kernel this CPU runs (`UBIBLK_XTS_KERNEL`), through the real backend, against the
/// OpenSSL reference on every path: aligned guest buffers (written from and decrypted in place),
/// odd addresses (bounced), and 1 MiB requests across the kernels' batch boundaries.
#[test]
fn every_kernel_matches_the_reference_on_every_path() {
    let kernels = ubiblk::crypto::Kernel::usable();
    assert!(kernels.contains(&ubiblk::crypto::Kernel::Portable));
    for kernel in kernels {
        let s = setup();
        let env = [(ubiblk::crypto::KERNEL_ENV.to_string(), kernel.to_string())];
        let cfg = BackendConfig::new(&s.img, &s.sock).extra(raw_keys());
        let be = Backend::start_with_env(BIN, &cfg, &[], &env).unwrap();
        let mut c = Client::connect_queues(&s.sock, 1).unwrap();
        let data = pattern(16384);
        c.writev_at(0, 0, &[(1, &data[..4096]), (9001, &data[4096..])])
            .unwrap();
        c.write(0, 16384, &data).unwrap();
        let big = pattern(1 << 20);
        c.write(0, 3 * 512 + 65536, &big).unwrap();
        c.flush(0).unwrap();
        let raw = read_file_at(&s.img, 0, 32768).unwrap();
        assert_eq!(
            reference("decrypt", 0, &raw, s.dir.path()),
            [&data[..], &data[..]].concat(),
            "{kernel}"
        );
        let raw_big = read_file_at(&s.img, 3 * 512 + 65536, big.len()).unwrap();
        assert!(
            reference("decrypt", 3 + 128, &raw_big, s.dir.path()) == big,
            "{kernel}: 1 MiB write"
        );
        assert_eq!(c.read(0, 0, 16384).unwrap(), data, "{kernel}");
        let parts = c.readv_at(0, 16384, &[(3, 8192), (20011, 8192)]).unwrap();
        assert_eq!(parts.concat(), data, "{kernel}");
        assert!(
            c.read(0, 3 * 512 + 65536, big.len()).unwrap() == big,
            "{kernel}"
        );
        let log = be.log();
        assert!(
            log.contains(&format!("AES-256-XTS, {kernel} kernel")),
            "{kernel}: {log}"
        );
    }
}

/// A kernel name that is not one, or one this CPU cannot run, is refused at start-up with the
/// variable's name and the kernels it can run; nothing is served.
#[test]
fn a_forced_kernel_that_cannot_run_is_refused() {
    let s = setup();
    let cfg = BackendConfig::new(&s.img, &s.sock).extra(raw_keys());
    for name in ["aesni-fast", "vaes2"] {
        let env = [(ubiblk::crypto::KERNEL_ENV.to_string(), name.to_string())];
        let mut guard = Backend::spawn_with_env(BIN, &cfg, &[], &env).unwrap();
        let st = guard
            .wait_timeout(Duration::from_secs(10))
            .expect("backend kept running");
        assert_eq!(st.code(), Some(1));
        assert!(!s.sock.exists(), "a refused backend must not serve");
        let log = guard.log();
        assert!(
            log.contains(&format!("UBIBLK_XTS_KERNEL=\"{name}\": unknown kernel")),
            "{log}"
        );
    }
    // A kernel this CPU lacks (on a CPU with VAES none is; src/crypto/xts.rs tests the message).
    if !ubiblk::crypto::Kernel::Vaes.available() {
        let env = [(ubiblk::crypto::KERNEL_ENV.to_string(), "vaes".to_string())];
        let mut guard = Backend::spawn_with_env(BIN, &cfg, &[], &env).unwrap();
        let st = guard.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(st.code(), Some(1));
        assert!(guard.log().contains("this CPU cannot run it"));
    }
}
