//! Online resize through the real binary (issue #26): `resize` on the control socket grows the
//! disk file, the answer and `status` follow, a frontend with a backend request channel gets
//! the config-change message and reads the new capacity, a fresh libblkio connection does I/O
//! in the new area, and bad input changes nothing.

use crate::common::*;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
pub(crate) const MIB: u64 = 1 << 20;
/// The `encryption_key` lines of the encrypted disks' configs.
pub(crate) const KEYS: &str = "encryption_key:\n  - \"ERERERERERERERERERERERERERERERERERERERERERE=\"\n  - \"fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn5+fn4=\"";

fn disk(size: u64) -> PatternDisk {
    pattern_disk("ubiblk-resize", size)
}

fn start(d: &PatternDisk, extra: &[&str]) -> Backend {
    let mut cfg = BackendConfig::new(&d.img, &d.sock).extra_path("control_socket", &d.ctl);
    for e in extra {
        cfg = cfg.extra(*e);
    }
    Backend::start(BIN, &cfg).unwrap()
}

pub(crate) fn ask(ctl: &Path, cmd: &str) -> Value {
    let line = control_command(ctl, cmd).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{cmd}: {e}: {line}"))
}

/// The `metrics` reply, up to its `# EOF` line.
pub(crate) fn metrics(ctl: &Path) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"metrics\n").unwrap();
    let mut text = String::new();
    for line in std::io::BufReader::new(s).lines() {
        let line = line.unwrap();
        text += &line;
        text += "\n";
        if line == "# EOF" {
            break;
        }
    }
    text
}

pub(crate) fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn a_grown_file_serves_io_in_the_new_area_and_keeps_its_size_after_a_restart() {
    let d = disk(4 * MIB);
    let be = start(&d, &[]);
    {
        let c = Client::connect_queues(&d.sock, 1).unwrap();
        assert_eq!(c.capacity(), 4 * MIB);
    }
    let v = ask(&d.ctl, "resize {\"size_bytes\":12582912}");
    assert_eq!(v["size_bytes"], 12 * MIB, "{v}");
    assert_eq!(v["previous_size_bytes"], 4 * MIB, "{v}");
    assert_eq!(file_len(&d.img), 12 * MIB);
    assert_eq!(ask(&d.ctl, "status")["size_bytes"], 12 * MIB);
    let metrics = metrics(&d.ctl);
    assert!(
        metrics.contains(&format!(
            "ubiblk_size_bytes{{device_id=\"ubiblk\"}} {}",
            12 * MIB
        )),
        "{metrics}"
    );
    // A new connection sees the new size and does I/O past the old end.
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 12 * MIB);
    assert_eq!(c.read(0, 4 * MIB, 65536).unwrap(), vec![0; 65536]);
    let last = 12 * MIB - 4096;
    assert_eq!(c.read(0, last, 4096).unwrap(), vec![0; 4096]);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write(0, 4 * MIB - 4096, &data).unwrap();
    c.write(0, last - 4096, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, last - 4096, 8192).unwrap(), data);
    // Past the new end: refused.
    assert!(c.read(0, 12 * MIB, 4096).is_err());
    // The old area is untouched.
    assert_eq!(c.read(0, 0, 65536).unwrap(), pattern_bytes(0, 65536));
    drop(c);
    assert_eq!(read_file_at(&d.img, last - 4096, 8192).unwrap(), data);
    // A restart serves the grown file.
    drop(be);
    let _be = start(&d, &[]);
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 12 * MIB);
    assert_eq!(c.read(0, 4 * MIB - 4096, 8192).unwrap(), data);
}

#[test]
fn bad_sizes_are_refused_with_the_limits_and_change_nothing() {
    let d = disk(4 * MIB);
    let _be = start(&d, &[]);
    for (cmd, want) in [
        ("resize {\"size_bytes\":2097152}", "shrinking is refused"),
        ("resize {\"size_bytes\":8388609}", "multiple of 512"),
        (
            "resize {\"size_bytes\":18446744073709551104}",
            "over the limit",
        ),
        ("resize {\"size_bytes\":-1}", "non-negative integer"),
        ("resize {\"bytes\":8388608}", "unknown field"),
    ] {
        let v = ask(&d.ctl, cmd);
        let error = v["error"].as_str().unwrap_or_else(|| panic!("{cmd}: {v}"));
        assert!(error.contains(want), "{cmd}: {v}");
        assert_eq!(v["min_size_bytes"], 4 * MIB, "{cmd}: {v}");
        assert_eq!(v["max_size_bytes"], 1u64 << 50, "{cmd}: {v}");
    }
    assert_eq!(file_len(&d.img), 4 * MIB);
    assert_eq!(ask(&d.ctl, "status")["size_bytes"], 4 * MIB);
    // The same size, or `resize {}` on an unchanged file: nothing to do.
    let v = ask(&d.ctl, "resize {}");
    assert_eq!(
        (v["size_bytes"].as_u64(), v["error"].as_str()),
        (Some(4 * MIB), None)
    );
}

#[test]
fn a_readonly_disk_is_not_grown() {
    let d = disk(4 * MIB);
    let _be = start(&d, &["readonly: true"]);
    let v = ask(&d.ctl, "resize {\"size_bytes\":8388608}");
    assert!(v["error"].as_str().unwrap().contains("readonly"), "{v}");
    assert_eq!(file_len(&d.img), 4 * MIB);
}

#[test]
fn a_file_grown_underneath_is_picked_up_by_resize_without_a_size() {
    let d = disk(4 * MIB);
    let _be = start(&d, &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.img)
        .unwrap()
        .set_len(6 * MIB + 100)
        .unwrap();
    // Not before `resize`.
    assert_eq!(ask(&d.ctl, "status")["size_bytes"], 4 * MIB);
    let v = ask(&d.ctl, "resize {}");
    assert_eq!(v["size_bytes"], 6 * MIB, "{v}");
    let c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 6 * MIB);
}

/// Counts config-change messages from the backend.
#[derive(Default)]
struct Changes(AtomicUsize);

impl VhostUserFrontendReqHandler for Changes {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

fn capacity(frontend: &mut Frontend) -> u64 {
    let (_, payload) = frontend
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap();
    u64::from_le_bytes(payload[..8].try_into().unwrap())
}

#[test]
fn the_connected_frontend_gets_the_config_change_and_reads_the_new_capacity() {
    let d = disk(4 * MIB);
    let _be = start(&d, &[]);
    let mut frontend = Frontend::connect(&d.sock, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    frontend.set_features(features).unwrap();
    let offered = frontend.get_protocol_features().unwrap();
    assert!(
        offered.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "{offered:?}"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ,
        )
        .unwrap();
    assert_eq!(capacity(&mut frontend), 4 * MIB / 512);
    let changes = Arc::new(Changes::default());
    let mut handler = FrontendReqHandler::new(changes.clone()).unwrap();
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handler.handle_request().map_err(|e| e.to_string()));
    });
    // SET_BACKEND_REQ_FD has no reply: wait for the backend to have it (the next request is
    // answered after it was handled).
    assert_eq!(capacity(&mut frontend), 4 * MIB / 512);

    let v = ask(&d.ctl, "resize {\"size_bytes\":16777216}");
    assert_eq!(v["frontend_notified"], true, "{v}");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("no config-change message within 10 s")
        .unwrap();
    assert_eq!(changes.0.load(Ordering::SeqCst), 1);
    assert_eq!(capacity(&mut frontend), 16 * MIB / 512);
}

/// On an encrypted disk the new area reads as zeros through the cipher (the file holds
/// encrypted zeros there, not raw zeros, which would decrypt to garbage).
#[test]
fn an_encrypted_disk_grows_with_an_area_reading_as_zeros() {
    const NEW: u64 = 7 * MIB + 512;
    let d = disk(4 * MIB);
    let keys = KEYS;
    let _be = start(&d, &[keys]);
    let before = {
        let mut c = Client::connect_queues(&d.sock, 1).unwrap();
        c.read(0, 0, 65536).unwrap()
    };
    let v = ask(&d.ctl, "resize {\"size_bytes\":7340544}");
    assert_eq!(v["size_bytes"], NEW, "{v}");
    assert_eq!(file_len(&d.img), NEW);
    let raw = read_file_at(&d.img, 4 * MIB, 4096).unwrap();
    assert_ne!(
        raw,
        vec![0; 4096],
        "raw zeros in the new area of an encrypted disk"
    );
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), NEW);
    let mut at = 4 * MIB;
    while at < NEW {
        let len = (NEW - at).min(65536) as usize;
        assert_eq!(c.read(0, at, len).unwrap(), vec![0; len], "at {at}");
        at += len as u64;
    }
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    c.write(0, NEW - 8192, &data).unwrap();
    assert_eq!(c.read(0, NEW - 8192, 8192).unwrap(), data);
    assert_eq!(c.read(0, 0, 65536).unwrap(), before);
}

/// A block device grown underneath (here a loop device, as LVM would be) is picked up by
/// `resize {}`; a size for a block device other than its own is refused.
#[test]
fn a_block_device_grown_underneath_is_picked_up_by_resize_without_a_size() {
    let d = disk(4 * MIB);
    let dev = LoopDev::attach(&d.img);
    let cfg = BackendConfig::new(&dev.0, &d.sock).extra_path("control_socket", &d.ctl);
    let _be = Backend::start(BIN, &cfg).unwrap();
    let v = ask(&d.ctl, "resize {\"size_bytes\":8388608}");
    assert!(v["error"].as_str().unwrap().contains("block device"), "{v}");
    // Nothing grew underneath yet: the same size.
    assert_eq!(ask(&d.ctl, "resize {}")["size_bytes"], 4 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.img)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    dev.refresh();
    let v = ask(&d.ctl, "resize {}");
    assert_eq!(v["size_bytes"], 8 * MIB, "{v}");
    assert_eq!(v["previous_size_bytes"], 4 * MIB, "{v}");
    let mut c = Client::connect_queues(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 8 * MIB);
    let data = vec![0xa5u8; 4096];
    c.write(0, 8 * MIB - 4096, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, 8 * MIB - 4096, 4096).unwrap(), data);
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
}

/// kill -9 while an encrypted disk grows (its new area written with encrypted zeros, 1 MiB at
/// a time from the old end): the file ends where the writing stopped (not always on a chunk
/// boundary: a write is cut short too), somewhere between the old and the new size; the next
/// backend serves that size (in whole sectors), every sector of the grown part reads as zeros,
/// and `resize` again finishes the job.
#[test]
fn kill_9_while_an_encrypted_disk_grows_leaves_a_consistent_smaller_disk() {
    const OLD: u64 = 4 * MIB;
    const NEW: u64 = 256 * MIB;
    let keys = KEYS;
    let mut sizes = Vec::new();
    for delay_ms in [0u64, 5, 20, 60, 150] {
        let d = disk(OLD);
        let mut be = start(&d, &[keys]);
        let ctl = d.ctl.clone();
        let t =
            std::thread::spawn(move || control_command(&ctl, "resize {\"size_bytes\":268435456}"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        be.guard.kill();
        let _ = t.join();
        let len = file_len(&d.img) / 512 * 512;
        sizes.push(file_len(&d.img));
        assert!(
            (OLD..=NEW).contains(&len),
            "after kill -9 at {delay_ms} ms: {len} bytes"
        );
        let _be = start(&d, &[keys]);
        assert_eq!(ask(&d.ctl, "status")["size_bytes"], len);
        let mut c = Client::connect_queues(&d.sock, 1).unwrap();
        assert_eq!(c.capacity(), len);
        let mut at = OLD;
        while at < len {
            let n = (len - at).min(65536) as usize;
            assert_eq!(c.read(0, at, n).unwrap(), vec![0; n], "at {at} of {len}");
            at += n as u64;
        }
        drop(c);
        let v = ask(&d.ctl, "resize {\"size_bytes\":268435456}");
        assert_eq!(v["size_bytes"], NEW, "{v}");
        let mut c = Client::connect_queues(&d.sock, 1).unwrap();
        assert_eq!(c.read(0, NEW - 65536, 65536).unwrap(), vec![0; 65536]);
    }
    eprintln!("file sizes after kill -9: {sizes:?}");
}
