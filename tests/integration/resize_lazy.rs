//! Online resize of lazy disks (issue #26) through the real binaries: the stripe metadata grows
//! with the disk, the new area has no source (its stripes are fetched from the start, read as
//! zeros and are never fetched from the image), the old area still comes from the image, and a
//! kill -9 during a grow leaves a disk that starts with a consistent size and content.

use crate::common::*;
use crate::resize::{ask, file_len, metrics, KEYS, MIB};
use std::path::Path;
use std::time::{Duration, Instant};
use ubiblk::crypto::Xts;
use ubiblk::lazy::metadata::Metadata;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const DUMP: &str = env!("CARGO_BIN_EXE_dump-metadata");
/// 32 KiB stripes.
const SHIFT: u8 = 6;
const STRIPE: u64 = 512 << SHIFT;

fn stripes(bytes: u64) -> u64 {
    bytes.div_ceil(STRIPE)
}

/// A lazy disk of `disk` bytes of 0xaa (stale bytes that must never show) over an image of
/// `image_len` bytes, with its metadata; and the model of what the guest must read (the image,
/// then zeros).
fn lazy_disk(disk: u64, image_len: usize, extra: &[&str]) -> (LazyFiles, Vec<u8>) {
    let image = pattern_bytes(0x1a2_0000, image_len);
    let files = LazyFiles::new("ubiblk-resize-lazy", disk, 0xaa, &image, extra);
    files.init_metadata(INIT, SHIFT);
    let mut model = image;
    model.resize(disk as usize, 0);
    (files, model)
}

/// Reads `[from, to)` through `c` in 64 KiB requests and compares with `model`.
fn check(c: &mut Client, model: &[u8], from: u64, to: u64) {
    let mut at = from;
    while at < to {
        let n = (to - at).min(65536) as usize;
        let got = c.read(0, at, n).unwrap();
        assert!(
            got == model[at as usize..at as usize + n],
            "content differs at {at}"
        );
        at += n as u64;
    }
}

fn write(c: &mut Client, model: &mut [u8], at: u64, data: &[u8]) {
    c.write(0, at, data).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(data);
}

fn wait_complete(ctl: &Path) {
    let t0 = Instant::now();
    while ask(ctl, "status")["complete"] != true {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "autofetch never completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resize(ctl: &Path, bytes: u64) -> serde_json::Value {
    ask(ctl, &format!("resize {{\"size_bytes\":{bytes}}}"))
}

/// Grows a lazy disk (its last stripe partial, the image ending mid-sector) while copy-on-read
/// and a slow autofetch run: the old area still reads the image, the new area reads zeros
/// without touching the image and is writable, status, metrics and dump-metadata follow, and a
/// restart keeps the size and the content.
#[test]
fn a_lazy_disk_grows_while_fetching_and_keeps_size_and_content_after_a_restart() {
    const OLD: u64 = 4 * MIB + 10 * 512;
    const NEW: u64 = 9 * MIB + 3 * 512;
    let extra = [
        "copy_on_read: true",
        "autofetch: true",
        "autofetch_mib_per_sec: 4",
    ];
    let (files, mut model) = lazy_disk(OLD, (3 * MIB + 700) as usize, &extra);
    let be = Backend::start(BIN, &files.config).unwrap();
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    check(&mut c, &model, 0, 65536);
    drop(c);

    let v = resize(&files.ctl, NEW);
    assert_eq!(v["size_bytes"], NEW, "{v}");
    assert_eq!(v["previous_size_bytes"], OLD, "{v}");
    let st = ask(&files.ctl, "status");
    assert_eq!(st["size_bytes"], NEW, "{st}");
    assert_eq!(st["stripes"], stripes(NEW), "{st}");
    assert_eq!(st["complete"], false, "autofetch was still running: {st}");
    assert_eq!(file_len(&files.base), NEW);
    let m = metrics(&files.ctl);
    assert!(
        m.contains(&format!(
            "ubiblk_lazy_stripes{{device_id=\"ubiblk\"}} {}",
            stripes(NEW)
        )),
        "{m}"
    );

    model.resize(NEW as usize, 0);
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    assert_eq!(c.capacity(), NEW);
    check(&mut c, &model, 0, NEW);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    write(&mut c, &mut model, OLD - 4096, &data);
    write(&mut c, &mut model, NEW - 8192, &data);
    write(&mut c, &mut model, 6 * MIB, &data);
    c.flush(0).unwrap();
    check(&mut c, &model, OLD - 65536, NEW);
    drop(c);
    wait_complete(&files.ctl);
    let st = ask(&files.ctl, "status");
    assert_eq!(st["fetched"], stripes(NEW), "{st}");
    // The image was never read past the old disk: no stripe of the new area was fetched from
    // it, and their stale base bytes never showed (checked above).
    let dump = std::process::Command::new(DUMP)
        .arg("-f")
        .arg(files.config_file())
        .arg("--json")
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains(&format!("\"stripe_count\":{}", stripes(NEW))),
        "{dump}"
    );

    drop(be);
    let _be = Backend::start(BIN, &files.config).unwrap();
    let st = ask(&files.ctl, "status");
    assert_eq!(st["size_bytes"], NEW, "{st}");
    assert_eq!(
        (st["stripes"].as_u64(), st["complete"].as_bool()),
        (Some(stripes(NEW)), Some(true))
    );
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    assert_eq!(c.capacity(), NEW);
    check(&mut c, &model, 0, NEW);
}

/// Bad input on a lazy disk changes nothing: shrinking, an unaligned size, an image larger
/// than the disk (its cut-off end would show in the new area), and metadata on a block device
/// too small for the new stripe count; a size whose stripes still fit that device grows.
#[test]
fn a_lazy_disk_refuses_bad_sizes_a_larger_image_and_metadata_that_cannot_grow() {
    const OLD: u64 = 4 * MIB;
    let (files, model) = lazy_disk(OLD, (2 * MIB) as usize, &[]);
    let meta_before = std::fs::read(&files.meta).unwrap();
    {
        let _be = Backend::start(BIN, &files.config).unwrap();
        for (size, want) in [(2 * MIB, "shrinking"), (OLD + 100, "multiple of 512")] {
            let v = resize(&files.ctl, size);
            assert!(v["error"].as_str().unwrap().contains(want), "{v}");
        }
        assert_eq!(file_len(&files.base), OLD);
        assert_eq!(std::fs::read(&files.meta).unwrap(), meta_before);
    }

    let (big, _) = lazy_disk(OLD, (OLD + 1) as usize, &[]);
    {
        let _be = Backend::start(BIN, &big.config).unwrap();
        let v = resize(&big.ctl, 2 * OLD);
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("image") && e.contains("more than the"), "{v}");
        assert_eq!(v["size_bytes"], OLD, "{v}");
        assert_eq!(file_len(&big.base), OLD);
    }

    // Metadata on a 1 KiB block device: 128 stripes of 32 KiB fill it (a 4 MiB disk), 256
    // still fit (8 MiB), 1024 (32 MiB) do not.
    let (dev_files, _) = lazy_disk(OLD, (2 * MIB) as usize, &[]);
    let img = dev_files.dir.path().join("meta.img");
    std::fs::write(&img, [0u8; 1024]).unwrap();
    let dev = LoopDev::attach(&img);
    std::fs::remove_file(&dev_files.meta).unwrap();
    std::os::unix::fs::symlink(&dev.0, &dev_files.meta).unwrap();
    dev_files.init_metadata(INIT, SHIFT);
    let _be = Backend::start(BIN, &dev_files.config).unwrap();
    let v = resize(&dev_files.ctl, 32 * MIB);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("metadata_path") && e.contains("block device"),
        "{v}"
    );
    assert_eq!(file_len(&dev_files.base), OLD);
    let v = resize(&dev_files.ctl, 8 * MIB);
    assert_eq!(v["size_bytes"], 8 * MIB, "{v}");
    let mut c = Client::connect_queues(&dev_files.config.socket, 1).unwrap();
    assert_eq!(c.capacity(), 8 * MIB);
    check(&mut c, &model, 0, OLD);
    assert_eq!(c.read(0, 8 * MIB - 4096, 4096).unwrap(), vec![0; 4096]);
}

/// A crash between the two steps of a grow: the metadata grown (the new stripes fetched, in
/// the boundary sector and past it), the disk not. The state is made exactly: a finished grow
/// of a plain lazy disk (whose new area is a hole) with its file cut back to the old size.
/// The next start serves the old size and content and ignores the stripes past it; `resize`
/// again finishes the grow.
#[test]
fn grown_metadata_over_a_disk_that_did_not_grow_starts_at_the_old_size_and_resize_finishes() {
    const OLD: u64 = 4 * MIB + 10 * 512;
    const NEW: u64 = 6 * MIB;
    let (files, mut model) = lazy_disk(OLD, (3 * MIB) as usize, &["copy_on_read: true"]);
    {
        let _be = Backend::start(BIN, &files.config).unwrap();
        let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
        let data = vec![0x3c; 4096];
        write(&mut c, &mut model, MIB, &data);
        c.flush(0).unwrap();
        assert_eq!(resize(&files.ctl, NEW)["size_bytes"], NEW);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files.base)
        .unwrap()
        .set_len(OLD)
        .unwrap();
    let be = Backend::start(BIN, &files.config).unwrap();
    let st = ask(&files.ctl, "status");
    assert_eq!(st["size_bytes"], OLD, "{st}");
    assert_eq!(st["stripes"], stripes(OLD), "{st}");
    assert!(
        be.log().contains("a grow that did not finish"),
        "{}",
        be.log()
    );
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    assert_eq!(c.capacity(), OLD);
    check(&mut c, &model, 0, OLD);
    drop(c);
    assert_eq!(resize(&files.ctl, NEW)["size_bytes"], NEW);
    model.resize(NEW as usize, 0);
    let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
    check(&mut c, &model, 0, NEW);
}

/// kill -9 at several moments of an encrypted lazy disk's grow from 4 to 256 MiB (metadata
/// first, then the new area written with encrypted zeros, 1 MiB at a time), while autofetch
/// runs: the base disk ends somewhere between the two sizes; its metadata reads at that size;
/// the next start serves that size with the old area's content (the image and a flushed
/// write) and zeros in the grown part (sampled), and `resize` again completes the grow.
#[test]
fn kill_9_while_an_encrypted_lazy_disk_grows_leaves_a_consistent_disk() {
    const OLD: u64 = 4 * MIB;
    const NEW: u64 = 256 * MIB;
    let xts = Xts::new(&[0x11; 32], &[0x7e; 32]);
    let extra = [
        KEYS,
        "copy_on_read: true",
        "autofetch: true",
        "autofetch_mib_per_sec: 1",
    ];
    let mut sizes = Vec::new();
    for delay_ms in [0u64, 5, 20, 60, 150] {
        let (files, mut model) = lazy_disk(OLD, (2 * MIB + 300) as usize, &extra);
        let mut be = Backend::start(BIN, &files.config).unwrap();
        let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
        write(&mut c, &mut model, MIB + 512, &[0xc3; 8192]);
        c.flush(0).unwrap();
        drop(c);
        let ctl = files.ctl.clone();
        let t = std::thread::spawn(move || {
            control_command(&ctl, &format!("resize {{\"size_bytes\":{NEW}}}"))
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        be.guard.kill();
        let _ = t.join();
        let len = file_len(&files.base) / 512 * 512;
        sizes.push(len);
        assert!(
            (OLD..=NEW).contains(&len),
            "after kill -9 at {delay_ms} ms: {len} bytes"
        );
        let meta = std::fs::File::open(&files.meta).unwrap();
        Metadata::read_from(&meta, len / 512, Some(&xts))
            .unwrap_or_else(|e| panic!("metadata at {len} bytes after {delay_ms} ms: {e}"));

        let _be = Backend::start(BIN, &files.config).unwrap();
        let st = ask(&files.ctl, "status");
        assert_eq!(st["size_bytes"], len, "{st}");
        assert_eq!(st["stripes"], stripes(len), "{st}");
        model.resize(NEW as usize, 0);
        let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
        assert_eq!(c.capacity(), len);
        check(&mut c, &model, 0, OLD);
        let mut at = OLD;
        while at < len {
            check(&mut c, &model, at, (at + MIB).min(len));
            at += 16 * MIB;
        }
        check(&mut c, &model, len.saturating_sub(MIB).max(OLD), len);
        drop(c);
        let v = resize(&files.ctl, NEW);
        assert_eq!(v["size_bytes"], NEW, "{v}");
        let st = ask(&files.ctl, "status");
        assert_eq!(st["stripes"], stripes(NEW), "{st}");
        let mut c = Client::connect_queues(&files.config.socket, 1).unwrap();
        check(&mut c, &model, NEW - MIB, NEW);
        write(&mut c, &mut model, NEW - 4096, &[0x77; 4096]);
        check(&mut c, &model, NEW - 65536, NEW);
        check(&mut c, &model, 0, OLD);
    }
    eprintln!("base disk sizes after kill -9: {sizes:?}");
}
