//! init-metadata and dump-metadata, run as binaries on temp files; the encrypted output is
//! checked against the independent XTS reference (tests/tools/xts_ref.py).

use crate::common::{require, CRYPTOGRAPHY};
use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const DUMP: &str = env!("CARGO_BIN_EXE_dump-metadata");
const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x7e; 32];
/// 100 MiB + 512 B: 204801 sectors.
const DISK: u64 = (100 << 20) + 512;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Setup {
    dir: tempfile::TempDir,
    disk: PathBuf,
    meta: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("ubiblk-md")
            .tempdir()
            .unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
        let meta = dir.path().join("meta");
        Setup { dir, disk, meta }
    }

    /// Writes a config with `extra` lines; `with_meta` adds metadata_path. It always has
    /// `image_path` (a lazy disk's config; the tools do not open the image).
    fn config(&self, extra: &str, with_meta: bool) -> PathBuf {
        let mut text = format!(
            "path: {}\nsocket: {}\nimage_path: {}\n",
            self.disk.display(),
            self.dir.path().join("vhost.sock").display(),
            self.dir.path().join("image.raw").display()
        );
        if with_meta {
            text += &format!("metadata_path: {}\n", self.meta.display());
        }
        text += extra;
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(!out.status.success(), "{bin} {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn plain_header(shift: u8) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..9].copy_from_slice(b"BDEV_UBI\0");
    h[13] = shift;
    h
}

#[test]
fn default_shift_on_a_100mib_plus_one_sector_disk() {
    let st = Setup::new();
    let cfg = st.config("", true);
    ok(INIT, &["-f", s(&cfg)]);
    let b = std::fs::read(&st.meta).unwrap();
    // ceil(204801 / 2048) = 101 stripes: header + one sector.
    assert_eq!(b.len(), 1024);
    assert_eq!(&b[..512], &plain_header(11)[..]);
    assert!(b[512..].iter().all(|&x| x == 0));

    let out = ok(DUMP, &["--config", s(&cfg)]);
    assert!(out.contains("stripe_count: 101"), "{out}");
    assert!(out.contains("stripe_size_bytes: 1048576"), "{out}");
    assert!(out.contains("fetched_count: 0\n"), "{out}");
    assert!(out.contains("fetched: -\n"), "{out}");
    let js = ok(DUMP, &["-f", s(&cfg), "--json"]);
    assert!(js.contains("\"stripe_count\":101"), "{js}");
    assert!(js.contains("\"fetched_count\":0,"), "{js}");
    assert!(js.contains("\"fetched\":[]"), "{js}");
}

#[test]
fn dump_lists_fetched_and_written_ranges_as_text_and_json() {
    let st = Setup::new();
    let cfg = st.config("", true);
    ok(INIT, &["-f", s(&cfg)]);
    // Stripe states follow the 512-byte header, one byte each: FETCHED = 1, WRITTEN = 2.
    let mut b = std::fs::read(&st.meta).unwrap();
    for (stripe, state) in [(0, 1), (1, 3), (2, 1), (5, 1), (100, 3)] {
        b[512 + stripe] = state;
    }
    std::fs::write(&st.meta, &b).unwrap();

    let out = ok(DUMP, &["-f", s(&cfg)]);
    assert!(
        out.contains("fetched_count: 5\nwritten_count: 2\n"),
        "{out}"
    );
    assert!(
        out.contains("fetched: 0-2, 5, 100\nwritten: 1, 100\n"),
        "{out}"
    );
    let js = ok(DUMP, &["-f", s(&cfg), "--json"]);
    assert_eq!(
        js.trim_end(),
        "{\"magic\":\"BDEV_UBI\",\"version\":{\"major\":0,\"minor\":0},\"encrypted\":false,\
         \"stripe_sector_count_shift\":11,\"stripe_size_bytes\":1048576,\"stripe_count\":101,\
         \"fetched_count\":5,\"written_count\":2,\"fetched\":[[0,2],[5,5],[100,100]],\
         \"written\":[[1,1],[100,100]]}"
    );
}

#[test]
fn shift_option_and_its_range() {
    let st = Setup::new();
    let cfg = st.config("", true);
    ok(INIT, &["-f", s(&cfg), "-s", "6"]);
    // 204801 / 64 -> 3201 stripes -> 7 sectors of stripe bytes.
    assert_eq!(std::fs::metadata(&st.meta).unwrap().len(), 512 + 7 * 512);
    ok(INIT, &["-f", s(&cfg), "--stripe-sector-count-shift", "16"]);
    let b = std::fs::read(&st.meta).unwrap();
    assert_eq!((b.len(), b[13]), (1024, 16));
    for bad in ["5", "17", "0", "300", "x"] {
        let e = refused(INIT, &["-f", s(&cfg), "-s", bad]);
        assert!(e.contains("stripe-sector-count-shift"), "{bad}: {e}");
    }
    let e = refused(INIT, &["-f", s(&cfg), "-s", "17"]);
    assert!(e.contains("6..=16"), "{e}");
}

#[test]
fn missing_metadata_path_is_refused() {
    let st = Setup::new();
    let cfg = st.config("", false);
    let e = refused(INIT, &["-f", s(&cfg)]);
    assert!(e.contains("metadata_path") && e.contains("required"), "{e}");
    assert!(!st.meta.exists());
}

/// Runs `bin args`, which must fail within 10 s (a FIFO must not make it wait); its stderr.
fn refused_in_time(bin: &str, args: &[&str]) -> String {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{bin} {args:?} kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{bin} {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_disk_that_is_not_a_file_or_block_device_is_refused() {
    let st = Setup::new();
    let fifo = st.dir.path().join("fifo");
    let c_path = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for (disk, want) in [("/dev/null", "a character device"), (s(&fifo), "a FIFO")] {
        let text = format!(
            "path: {disk}\nsocket: {}\nimage_path: {}\nmetadata_path: {}\n",
            s(&st.dir.path().join("vhost.sock")),
            s(&st.dir.path().join("image.raw")),
            s(&st.meta)
        );
        let cfg = st.dir.path().join("config.yaml");
        std::fs::write(&cfg, text).unwrap();
        for bin in [INIT, DUMP] {
            let e = refused_in_time(bin, &["-f", s(&cfg)]);
            assert!(
                e.contains("path: ") && e.contains(want),
                "{bin} {disk}: {e}"
            );
        }
    }
    assert!(!st.meta.exists());
}

#[test]
fn metadata_path_without_image_path_is_refused() {
    let st = Setup::new();
    let text = format!(
        "path: {}\nsocket: {}\nmetadata_path: {}\n",
        s(&st.disk),
        s(&st.dir.path().join("vhost.sock")),
        s(&st.meta)
    );
    let cfg = st.dir.path().join("config.yaml");
    std::fs::write(&cfg, text).unwrap();
    let e = refused(INIT, &["-f", s(&cfg)]);
    assert!(
        e.contains("metadata_path") && e.contains("needs image_path"),
        "{e}"
    );
    assert!(!st.meta.exists());
}

#[test]
fn metadata_over_the_disk_is_refused() {
    let st = Setup::new();
    let cfg = st.config(&format!("metadata_path: {}\n", st.disk.display()), false);
    let e = refused(INIT, &["-f", s(&cfg)]);
    assert!(e.contains("same file"), "{e}");
    assert_eq!(std::fs::metadata(&st.disk).unwrap().len(), DISK);
}

#[test]
fn encrypted_metadata_decrypts_independently() {
    if !require(&[CRYPTOGRAPHY]) {
        return;
    }
    let st = Setup::new();
    let cfg = st.config("", true);
    ok(INIT, &["-f", s(&cfg)]);
    let plain = std::fs::read(&st.meta).unwrap();

    let keys = format!("encryption_key: [\"{}\", \"{}\"]\n", b64(&K1), b64(&K2));
    let cfg = st.config(&keys, true);
    ok(INIT, &["-f", s(&cfg)]);
    let enc = std::fs::read(&st.meta).unwrap();
    assert_eq!(enc.len(), plain.len());
    assert!(!enc.windows(8).any(|w| w == b"BDEV_UBI"));

    // Sector 0 alone, then the whole file, with LBAs from the start of the file.
    let first = st.dir.path().join("first.enc");
    std::fs::write(&first, &enc[..512]).unwrap();
    let out = st.dir.path().join("dec");
    for (input, want) in [(&first, &plain[..512]), (&st.meta, &plain[..])] {
        let status = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/xts_ref.py"
            ))
            .args(["decrypt", &hex(&K1), &hex(&K2), "0", s(input), s(&out)])
            .status()
            .expect("python3 (with the `cryptography` package) is needed");
        assert!(status.success(), "xts_ref.py failed");
        assert_eq!(std::fs::read(&out).unwrap(), want);
    }

    let dump = ok(DUMP, &["-f", s(&cfg)]);
    assert!(
        dump.contains("encrypted: true") && dump.contains("fetched_count: 0"),
        "{dump}"
    );
    // Read without the keys, the magic does not match.
    let e = refused(DUMP, &["-f", s(&st.config("", true))]);
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn kek_is_unlinked_and_required_with_keys() {
    let st = Setup::new();
    let keys = format!("encryption_key: [\"{}\", \"{}\"]\n", b64(&K1), b64(&K2));
    let cfg = st.config(&keys, true);
    let kek = st.dir.path().join("kek.yaml");
    std::fs::write(&kek, "method: none\n").unwrap();
    ok(INIT, &["-f", s(&cfg), "-k", s(&kek), "-u"]);
    assert!(!kek.exists());
    // --kek without encryption_key is a mistake, refused.
    std::fs::write(&kek, "method: none\n").unwrap();
    let e = refused(INIT, &["-f", s(&st.config("", true)), "--kek", s(&kek)]);
    assert!(e.contains("encryption_key"), "{e}");
}

#[test]
fn dump_reports_a_disk_that_does_not_match() {
    let st = Setup::new();
    let cfg = st.config("", true);
    ok(INIT, &["-f", s(&cfg), "-s", "6"]);
    // Grow the disk well past what the metadata covers.
    std::fs::File::options()
        .write(true)
        .open(&st.disk)
        .unwrap()
        .set_len(DISK * 2)
        .unwrap();
    let e = refused(DUMP, &["-f", s(&cfg)]);
    assert!(e.contains("stripe count mismatch"), "{e}");
}
