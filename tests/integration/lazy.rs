//! Lazy stripe fetch through libblkio: every rule of the feature, checked against a model of
//! the disk (image content, zeros past its end, guest writes on top) and against the raw base
//! disk and metadata files.

use crate::common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use ubiblk::crypto::Xts;
use ubiblk::lazy::metadata::{Metadata, FETCHED, WRITTEN};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
/// 64 KiB stripes.
const SHIFT: u8 = 7;
const STRIPE: u64 = 512 << SHIFT;
const DISK: u64 = 64 * STRIPE;

struct Lazy {
    files: LazyFiles,
    /// What the guest must see: image, zeros past it, then the test's writes.
    model: Vec<u8>,
}

/// The files (base, image, meta, ctl, config, dir) are the fixture's.
impl std::ops::Deref for Lazy {
    type Target = LazyFiles;
    fn deref(&self) -> &LazyFiles {
        &self.files
    }
}

impl std::ops::DerefMut for Lazy {
    fn deref_mut(&mut self) -> &mut LazyFiles {
        &mut self.files
    }
}

/// Image bytes: distinct in every 512-byte piece.
fn image_bytes(len: usize) -> Vec<u8> {
    pattern_bytes(0x5eed_0000, len)
}

impl Lazy {
    /// A disk of `DISK` bytes over an image of `image_len` bytes; `base_fill` is the base
    /// disk's initial content (stale data that must never show through).
    fn new(image_len: usize, base_fill: u8, extra: &[&str]) -> Lazy {
        let img = image_bytes(image_len);
        let files = LazyFiles::new("ubiblk-lazy", DISK, base_fill, &img, extra);
        let mut model = img;
        model.resize(DISK as usize, 0);
        let lazy = Lazy { files, model };
        lazy.init_metadata();
        lazy
    }

    fn init_metadata(&self) {
        self.files.init_metadata(INIT, SHIFT);
    }

    fn start(&self) -> (Backend, Client) {
        let be = Backend::start(BIN, &self.config).unwrap();
        let c = Client::connect_queues(&self.config.socket, self.config.num_queues).unwrap();
        (be, c)
    }

    fn write(&mut self, c: &mut Client, offset: u64, data: &[u8]) {
        c.write(0, offset, data).unwrap();
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn expect(&self, offset: u64, len: usize) -> &[u8] {
        &self.model[offset as usize..offset as usize + len]
    }

    /// Reads the whole disk through the client in `chunk`-byte requests and compares.
    fn check_all(&self, c: &mut Client, chunk: usize) {
        let mut off = 0;
        while off < DISK {
            let len = chunk.min((DISK - off) as usize);
            let got = c.read(0, off, len).unwrap();
            assert_same(&got, self.expect(off, len), off);
            off += len as u64;
        }
        self.settle();
    }

    /// Waits until no fetch is queued or running: a read of one unfetched stripe is answered
    /// as soon as the stripe is read from the image, before it is on the base disk.
    fn settle(&self) {
        let t0 = Instant::now();
        while self.status().fetching > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "fetches still running"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn metadata(&self, xts: Option<&Xts>) -> Metadata {
        let f = std::fs::File::open(&self.meta).unwrap();
        Metadata::read_from(&f, DISK / 512, xts).unwrap()
    }

    fn raw_stripe(&self, s: u64) -> Vec<u8> {
        read_file_at(&self.base, s * STRIPE, STRIPE as usize).unwrap()
    }

    fn status(&self) -> ControlStatus {
        ControlStatus::query(&self.ctl).unwrap()
    }

    /// Waits until autofetch reports completion.
    fn wait_complete(&self, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if s.complete {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "autofetch did not finish: {}",
                s.raw
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Truncates or extends the existing file at `path`.
fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("resizing {}: {e}", path.display()));
}

/// `config` with the top-level YAML line `line` replacing any extra line of the same key.
fn with(mut config: BackendConfig, line: &str) -> BackendConfig {
    let key = format!("{}:", line.split(':').next().unwrap_or(line));
    config.extra_yaml.retain(|l| !l.starts_with(&key));
    config.extra(line)
}

fn assert_same(got: &[u8], want: &[u8], offset: u64) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let at = offset + i as u64;
        panic!(
            "byte {at} (stripe {}, sector {}): got {:#04x}, want {:#04x}",
            at / STRIPE,
            at / 512,
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len());
}

#[test]
fn write_to_unfetched_stripe_fetches_it_first() {
    let mut l = Lazy::new(DISK as usize, 0xaa, &[]);
    let (mut be, mut c) = l.start();
    let data = pattern_bytes(1, 4096);
    l.write(&mut c, 3 * STRIPE + 8192, &data);
    c.flush(0).unwrap();
    // The rest of the stripe is the image's, on the base disk.
    assert_same(
        &l.raw_stripe(3),
        l.expect(3 * STRIPE, STRIPE as usize),
        3 * STRIPE,
    );
    // Neighbours are untouched.
    assert_eq!(l.raw_stripe(2), vec![0xaa; STRIPE as usize]);
    assert_eq!(l.raw_stripe(4), vec![0xaa; STRIPE as usize]);
    let s = l.status();
    assert_eq!((s.fetched, s.written), (1, 1), "{}", s.raw);
    // The FLUSH made the WRITTEN bit durable too.
    let md = l.metadata(None);
    assert_eq!(md.stripes[3], FETCHED | WRITTEN);
    assert_eq!((md.fetched_count(), md.written_count()), (1, 1));
    l.check_all(&mut c, 65536);
    drop(c);
    be.guard.signal(libc::SIGTERM);
    assert!(be.guard.wait_timeout(Duration::from_secs(10)).is_some());
    let md = l.metadata(None);
    assert_eq!(md.stripes[3], FETCHED | WRITTEN);
    assert_eq!(md.written_count(), 1);
}

#[test]
fn reads_without_copy_on_read_come_from_the_image_and_leave_the_base_untouched() {
    let l = Lazy::new(DISK as usize, 0xaa, &["copy_on_read: false"]);
    let (_be, mut c) = l.start();
    l.check_all(&mut c, 65536);
    // Unaligned, stripe-crossing requests, plain and scattered.
    for (off, len) in [
        (STRIPE - 512, 1024),
        (5 * STRIPE - 4096, 3 * STRIPE as usize),
    ] {
        assert_same(&c.read(0, off, len).unwrap(), l.expect(off, len), off);
    }
    let parts = c
        .readv(0, 7 * STRIPE - 1536, &[512, 4096, 1024, 65536])
        .unwrap();
    assert_same(
        &parts.concat(),
        l.expect(7 * STRIPE - 1536, 71168),
        7 * STRIPE - 1536,
    );
    c.flush(0).unwrap();
    assert_eq!(std::fs::read(&l.base).unwrap(), vec![0xaa; DISK as usize]);
    assert_eq!(l.status().fetched, 0);
    assert_eq!(l.metadata(None).fetched_count(), 0);
}

#[test]
fn copy_on_read_fetches_and_completes_from_the_base_disk() {
    let l = Lazy::new(DISK as usize, 0xaa, &["copy_on_read: true"]);
    let (_be, mut c) = l.start();
    let (off, len) = (STRIPE + 4096, STRIPE as usize);
    assert_same(&c.read(0, off, len).unwrap(), l.expect(off, len), off);
    for s in [1, 2] {
        assert_same(
            &l.raw_stripe(s),
            l.expect(s * STRIPE, STRIPE as usize),
            s * STRIPE,
        );
    }
    assert_eq!(l.raw_stripe(0), vec![0xaa; STRIPE as usize]);
    let md = l.metadata(None);
    assert_eq!(md.fetched_ranges(), vec![(1, 2)]);
    assert_eq!(md.written_count(), 0);
    l.check_all(&mut c, 3 * 65536 / 2);
    assert_eq!(std::fs::read(&l.base).unwrap(), l.model);
}

#[test]
fn requests_spanning_fetched_and_unfetched_stripes() {
    let mut l = Lazy::new(DISK as usize, 0xaa, &["copy_on_read: false"]);
    let (_be, mut c) = l.start();
    // Fetch stripes 5 and 9 with small writes, then cross them with reads and writes.
    l.write(&mut c, 5 * STRIPE + 512, &pattern_bytes(2, 512));
    l.write(&mut c, 9 * STRIPE + 60 * 1024, &pattern_bytes(3, 8192));
    let (off, len) = (4 * STRIPE + 3584, 3 * STRIPE as usize);
    assert_same(&c.read(0, off, len).unwrap(), l.expect(off, len), off);
    let parts = c
        .readv(0, 4 * STRIPE, &[4096, 65536, 512, 65536 - 512])
        .unwrap();
    assert_same(
        &parts.concat(),
        l.expect(4 * STRIPE, 2 * 65536 + 4096),
        4 * STRIPE,
    );
    // A write over stripes 8 (unfetched), 9 (fetched) and 10 (unfetched).
    l.write(
        &mut c,
        8 * STRIPE + 1024,
        &pattern_bytes(4, 2 * STRIPE as usize),
    );
    // Discard / write-zeroes on unfetched stripes keep the rest of the stripe.
    c.write_zeroes(0, 20 * STRIPE + 4096, 8192, false).unwrap();
    l.model[(20 * STRIPE + 4096) as usize..(20 * STRIPE + 12288) as usize].fill(0);
    l.check_all(&mut c, 65536);
    let md = l.metadata(None);
    assert_eq!(md.fetched_ranges(), vec![(5, 5), (8, 10), (20, 20)]);
    c.flush(0).unwrap();
    for s in [5, 8, 9, 10, 20] {
        assert_same(
            &l.raw_stripe(s),
            l.expect(s * STRIPE, STRIPE as usize),
            s * STRIPE,
        );
    }
}

#[test]
fn image_shorter_than_the_disk_and_not_stripe_aligned() {
    // 2.5 stripes plus 100 bytes: a partial sector at the end of the image.
    let image_len = (5 * STRIPE / 2) as usize + 100;
    for cor in [false, true] {
        let l = Lazy::new(image_len, 0xaa, &[&format!("copy_on_read: {cor}")]);
        let (_be, mut c) = l.start();
        l.check_all(&mut c, 65536);
        let (off, len) = (2 * STRIPE + STRIPE / 2 - 512, 4096);
        assert_same(&c.read(0, off, len).unwrap(), l.expect(off, len), off);
        if cor {
            // Every stripe was fetched: stale base bytes never survive, the image's end is
            // followed by zeros.
            assert_eq!(std::fs::read(&l.base).unwrap(), l.model);
        } else {
            // Only init-metadata wrote the base disk: zeros in the stripes wholly past the
            // image (3 and up), which it marked fetched.
            let mut want = vec![0xaa; 3 * STRIPE as usize];
            want.resize(DISK as usize, 0);
            assert_eq!(std::fs::read(&l.base).unwrap(), want);
        }
    }
}

/// The disk as the reference v0.2 backend serves it from these files: a stripe the metadata
/// calls fetched, or wholly past the image (`i >= ceil(image_sectors / stripe_sectors)`: its
/// init-metadata marks those fetched and never fetches them), comes from the base disk
/// (decrypted with `xts`); any other from the image, zeros past its end.
fn as_the_reference_reads(l: &Lazy, xts: Option<&Xts>) -> Vec<u8> {
    let md = l.metadata(xts);
    let image = std::fs::read(&l.image).unwrap();
    let past = (image.len() as u64 / 512).div_ceil(STRIPE / 512);
    let mut base = std::fs::read(&l.base).unwrap();
    if let Some(x) = xts {
        x.decrypt(0, &mut base);
    }
    let mut out = vec![0u8; DISK as usize];
    for s in 0..DISK / STRIPE {
        let r = (s * STRIPE) as usize..((s + 1) * STRIPE) as usize;
        if md.is_fetched(s as usize) || s >= past {
            out[r.clone()].copy_from_slice(&base[r]);
        } else if r.start < image.len() {
            let end = r.end.min(image.len());
            out[r.start..end].copy_from_slice(&image[r.start..end]);
        }
    }
    out
}

#[test]
fn a_partly_fetched_disk_reads_the_same_where_past_image_stripes_count_as_fetched() {
    // 10.5 stripes of image on a 64-stripe disk whose base holds stale bytes.
    let image_len = (21 * STRIPE / 2) as usize;
    let (k1, k2) = ([0x21u8; 32], [0x43u8; 32]);
    use base64::Engine;
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let keys = format!("encryption_key: [\"{}\", \"{}\"]", b64(&k1), b64(&k2));
    let xts = Xts::new(&k1, &k2);
    for encrypted in [false, true] {
        let mut extra = vec!["copy_on_read: false"];
        if encrypted {
            extra.push(&keys);
        }
        let xts = encrypted.then_some(&xts);
        let mut l = Lazy::new(image_len, 0xee, &extra);
        let (mut be, mut c) = l.start();
        // Fetches stripe 1; writes into stripe 40, past the image.
        l.write(&mut c, STRIPE + 512, &pattern_bytes(3, 4096));
        l.write(&mut c, 40 * STRIPE + 1024, &pattern_bytes(4, 8192));
        c.flush(0).unwrap();
        l.check_all(&mut c, 65536);
        drop(c);
        be.guard.signal(libc::SIGTERM);
        assert!(be.guard.wait_timeout(Duration::from_secs(10)).is_some());
        let md = l.metadata(xts);
        assert!(md.is_fetched(1) && !md.is_fetched(0) && !md.is_fetched(10));
        assert_same(&as_the_reference_reads(&l, xts), &l.model, 0);
        // Ours reads the same after a restart: zeros, not stale bytes, past the image.
        let (_be, mut c) = l.start();
        l.check_all(&mut c, 65536);
    }
}

#[test]
fn image_larger_than_the_disk_is_cut_with_one_warning() {
    // Three stripes and 100 bytes more than the disk: the guest sees the image's first DISK
    // bytes, and the start-up log says so once.
    let l = Lazy::new(
        (DISK + 3 * STRIPE) as usize + 100,
        0xaa,
        &["copy_on_read: true"],
    );
    assert_eq!(l.model.len() as u64, DISK);
    let (be, mut c) = l.start();
    l.check_all(&mut c, 65536);
    assert_eq!(std::fs::read(&l.base).unwrap(), l.model);
    drop(c);
    let log = be.log();
    assert_eq!(
        log.matches("larger than the").count(),
        1,
        "one size warning in the log:\n{log}"
    );
}

#[test]
fn autofetch_copies_everything_reports_progress_and_survives_restart() {
    let image_len = DISK as usize - 3 * STRIPE as usize - 700;
    let mut l = Lazy::new(
        image_len,
        0xaa,
        &["autofetch: true", "autofetch_mib_per_sec: 4"],
    );
    let (mut be, mut c) = l.start();
    // Guest writes race the background copy.
    for i in 0..16u64 {
        l.write(
            &mut c,
            i * 4 * STRIPE + 512 * i,
            &pattern_bytes(100 + i, 4096),
        );
    }
    let first = l.status();
    assert!(first.fetched < 64, "rate limit ignored: {}", first.raw);
    assert_eq!(first.stripes, 64);
    assert_eq!(first.stripe_bytes, STRIPE);
    l.wait_complete(Duration::from_secs(30));
    l.check_all(&mut c, 65536);
    c.flush(0).unwrap();
    assert_eq!(std::fs::read(&l.base).unwrap(), l.model);
    let md = l.metadata(None);
    assert_eq!(md.fetched_count(), 64);
    let log = be.log();
    assert!(log.contains("lazy fetch complete"), "{log}");
    assert!(log.contains("stripes fetched (50%)"), "{log}");
    drop(c);
    be.guard.signal(libc::SIGTERM);
    assert!(be.guard.wait_timeout(Duration::from_secs(10)).is_some());
    drop(be);

    // Restarted on a changed image: fetched stripes are never fetched again.
    std::fs::write(&l.image, vec![0x55; image_len]).unwrap();
    let (_be, mut c) = l.start();
    assert!(l.status().complete);
    l.check_all(&mut c, 65536);
}

#[test]
fn autofetch_rate_limit_is_honoured() {
    // 4 MiB at 8 MiB/s: about half a second; unlimited it takes a few milliseconds here.
    let l = Lazy::new(
        DISK as usize,
        0,
        &["autofetch: true", "autofetch_mib_per_sec: 8"],
    );
    let (_be, _c) = l.start();
    let took = l.wait_complete(Duration::from_secs(30));
    assert!(took >= Duration::from_millis(350), "took only {took:?}");
}

#[test]
fn restart_keeps_fetched_stripes_and_unfetched_ones_follow_the_image() {
    let mut l = Lazy::new(DISK as usize, 0, &["copy_on_read: false"]);
    let (be, mut c) = l.start();
    l.write(&mut c, 2 * STRIPE + 4096, &pattern_bytes(7, 4096));
    c.flush(0).unwrap();
    drop(c);
    drop(be); // SIGKILL: the flushed write and the fetched stripe must survive it
              // The same image: stripe 2 (fetched, written) keeps the write, the others are still read
              // from the image. (A different image under a half-fetched disk would mix two versions and
              // is refused: source_identity.rs.)
    let (_be, mut c) = l.start();
    l.check_all(&mut c, 65536);
}

#[test]
fn encrypted_lazy_disk_stores_ciphertext_and_encrypted_metadata() {
    let (k1, k2) = ([0x21u8; 32], [0x43u8; 32]);
    use base64::Engine;
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let keys = format!("encryption_key: [\"{}\", \"{}\"]", b64(&k1), b64(&k2));
    let mut l = Lazy::new(DISK as usize - 1000, 0, &["copy_on_read: true", &keys]);
    let (_be, mut c) = l.start();
    l.write(&mut c, 6 * STRIPE + 512, &pattern_bytes(9, 1024));
    l.check_all(&mut c, 65536);
    c.flush(0).unwrap();
    let xts = Xts::new(&k1, &k2);
    let mut raw = std::fs::read(&l.base).unwrap();
    assert!(!raw.windows(64).any(|w| w == &l.model[4096..4160]));
    xts.decrypt(0, &mut raw);
    assert_eq!(raw, l.model);
    let header = read_file_at(&l.meta, 0, 9).unwrap();
    assert_ne!(&header[..], b"BDEV_UBI\0", "metadata is not encrypted");
    assert_eq!(l.metadata(Some(&xts)).fetched_count(), 64);
}

#[test]
fn failed_fetch_fails_the_request_and_the_backend_keeps_serving() {
    let l = Lazy::new(DISK as usize, 0, &["copy_on_read: false"]);
    let (be, mut c) = l.start();
    // Fetch stripe 1 while the image is whole.
    c.write(0, STRIPE, &[1u8; 4096]).unwrap();
    // The image shrinks under the backend: later stripes cannot be read any more.
    set_len(&l.image, 2 * STRIPE);
    let e = c.write(0, 10 * STRIPE, &[2u8; 4096]).unwrap_err();
    assert_eq!(e, libc::EIO, "{}", errno_name(e));
    assert!(c.read(0, 10 * STRIPE, 4096).is_err());
    assert_eq!(c.read(0, STRIPE, 4096).unwrap(), vec![1u8; 4096]);
    assert!(l.status().fetch_errors >= 1);
    assert!(
        be.log().contains("fetching stripe 10 failed"),
        "{}",
        be.log()
    );
    assert!(!l.metadata(None).is_fetched(10));
}

/// The control socket is 0600 whatever the umask, and a clean stop removes it along with the
/// vhost socket.
#[test]
fn control_socket_is_private_and_removed_after_sigterm() {
    let l = Lazy::new(DISK as usize, 0, &[]);
    let mut g = Backend::spawn_as_is(BIN, &l.config, &[], umask(0)).unwrap();
    g.wait_listening(&l.config.socket, SOCKET_TIMEOUT).unwrap();
    use std::os::unix::fs::MetadataExt;
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&l.ctl), 0o600);
    assert_eq!(mode(&l.config.socket), 0o600);
    assert_eq!(l.status().stripes, 64);
    g.signal(libc::SIGTERM);
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .expect("no exit on SIGTERM");
    assert!(st.success(), "{}", g.log());
    assert!(
        std::fs::symlink_metadata(&l.ctl).is_err(),
        "control socket left behind"
    );
    assert!(std::fs::symlink_metadata(&l.config.socket).is_err());
}

/// A control socket path holding another file is refused and kept; the vhost socket is not
/// left behind.
#[test]
fn control_socket_on_a_regular_file_is_refused_and_kept() {
    let l = Lazy::new(DISK as usize, 0, &[]);
    std::fs::write(&l.ctl, b"keep me").unwrap();
    let mut g = Backend::spawn_as_is(BIN, &l.config, &[], |_| {}).unwrap();
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .expect("backend kept running");
    assert_eq!(st.code(), Some(1));
    let want = format!(
        "control_socket: {} exists and is a regular file, not a socket",
        l.ctl.display()
    );
    assert!(g.log().contains(&want), "{}", g.log());
    assert_eq!(std::fs::read(&l.ctl).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&l.config.socket).is_err());
}

#[test]
fn startup_errors_name_the_field() {
    let l = Lazy::new(DISK as usize, 0, &[]);
    let cases: Vec<(BackendConfig, &str)> = vec![
        (
            with(l.config.clone(), "metadata_path: /nonexistent/meta"),
            "metadata_path: cannot open /nonexistent/meta",
        ),
        (
            with(l.config.clone(), "image_path: /nonexistent/image"),
            "image_path: cannot open /nonexistent/image",
        ),
        (
            with(l.config.clone(), "autofetch_mib_per_sec: 5"),
            "autofetch_mib_per_sec",
        ),
        (with(l.config.clone(), "readonly: true"), "readonly"),
        (
            with(
                l.config.clone(),
                &format!("image_path: {}", yaml_str(&l.base.to_string_lossy())),
            ),
            "image_path: ",
        ),
    ];
    let same = format!("is the same file as path ({})", l.base.display());
    for (config, want) in cases {
        let want = if want == "image_path: " {
            same.as_str()
        } else {
            want
        };
        let mut g = Backend::spawn(BIN, &config, &[]).unwrap();
        let st = g
            .wait_timeout(Duration::from_secs(10))
            .expect("backend kept running");
        assert!(!st.success());
        assert!(g.log().contains(want), "want {want:?} in {}", g.log());
    }
    // Metadata made for a much smaller disk (one metadata sector holds 512 stripes).
    set_len(&l.base, 600 * STRIPE);
    let mut g = Backend::spawn(BIN, &l.config, &[]).unwrap();
    assert!(g.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(g.log().contains("metadata_path"), "{}", g.log());
    assert!(g.log().contains("stripe count mismatch"), "{}", g.log());
}
