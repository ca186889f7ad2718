//! Dirty-page logging for live migration, seen from the frontend: our own frontend
//! (`ubiblk::frontend`) acks `VHOST_F_LOG_ALL` and LOG_SHMFD, hands the real `vhost-backend` a
//! log with SET_LOG_BASE, as QEMU does when a migration starts, and checks which pages each
//! read marks: exactly the data buffer's pages, the status byte's and the used ring's, on
//! every path a read takes into guest memory (io_uring straight into the buffer, our bounce
//! buffer, decryption in place or from our buffer, a lazy stripe fetched on demand or read
//! through), also after a new memory table. After SET_FEATURES without LOG_ALL, nothing is
//! marked.
//!
//! The direct paths write guest memory behind vm-memory's back: the worker marks them when
//! the request completes (`mark_written` in `virtio_blk::worker`); these tests fail without it.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use ubiblk::frontend::{BlkFrontend, Geometry, IoOptions, GUEST_BASE, LOG_PAGE};

use crate::common::*;

const BACKEND: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");
const T: Duration = Duration::from_secs(10);
const DISK: u64 = 4 << 20;

/// Our frontend on `socket`, its queue running and logging started.
fn logging_frontend(socket: &std::path::Path) -> BlkFrontend {
    let mut fe = BlkFrontend::connect(socket, T).unwrap().with_dirty_log();
    fe.setup().unwrap();
    let cfg = fe.read_config().unwrap();
    let g = Geometry::new(&IoOptions::default(), &cfg).unwrap();
    fe.setup_memory(&g).unwrap();
    fe.setup_virtqueue(&g).unwrap();
    fe.start_dirty_log().unwrap();
    fe
}

/// The page holding guest-physical address `gpa`.
fn page(gpa: u64) -> u64 {
    gpa / LOG_PAGE * LOG_PAGE
}

fn pages(v: &BTreeSet<u64>) -> String {
    let list: Vec<String> = v.iter().map(|p| format!("{p:#x}")).collect();
    format!("[{}]", list.join(" "))
}

/// Clears the log, reads `len` bytes at `sector` into a buffer `data_off` bytes into slot 0's
/// data area, and checks that the read marked exactly the buffer's pages, the status byte's
/// and the used ring's (so not the descriptor table's, nor the next slot's buffer). Returns
/// the data.
fn read_logged(
    fe: &mut BlkFrontend,
    be: &Backend,
    what: &str,
    sector: u64,
    len: u32,
    data_off: u32,
) -> Vec<u8> {
    fe.dirty_log().unwrap().take();
    let data = fe
        .read_sectors_at(sector, len, data_off, T)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", be.log()));
    let marked: BTreeSet<u64> = fe.dirty_log().unwrap().take().into_iter().collect();
    let l = fe.layout().unwrap().clone();
    let buf = GUEST_BASE + l.data + u64::from(data_off);
    let mut want: BTreeSet<u64> = (page(buf)..buf + u64::from(len))
        .step_by(LOG_PAGE as usize)
        .collect();
    let status = page(GUEST_BASE + l.status);
    let used = page(GUEST_BASE + l.used);
    want.extend([status, used]);
    let missing: BTreeSet<u64> = want.difference(&marked).copied().collect();
    let extra: BTreeSet<u64> = marked.difference(&want).copied().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: pages written but not marked: {} (data {:#x}..{:#x}, status {status:#x}, used \
         ring {used:#x}); marked but never written: {}\nbackend log:\n{}",
        pages(&missing),
        buf,
        buf + u64::from(len),
        pages(&extra),
        be.log()
    );
    // Spelled out: pages the backend never writes stay clear.
    let log = fe.dirty_log().unwrap();
    assert!(
        !log.is_dirty(GUEST_BASE + l.desc),
        "{what}: descriptor table"
    );
    assert!(
        !log.is_dirty(GUEST_BASE + l.size - 1),
        "{what}: the last slot's buffer"
    );
    data
}

/// Reads that mark nothing once SET_FEATURES dropped LOG_ALL (the migration ended).
fn stop_and_check_quiet(fe: &mut BlkFrontend, be: &Backend, sector: u64) {
    fe.stop_dirty_log().unwrap();
    fe.dirty_log().unwrap().take();
    for data_off in [0, 1] {
        fe.read_sectors_at(sector, 8192, data_off, T)
            .unwrap_or_else(|e| panic!("read after logging stopped: {e}\n{}", be.log()));
    }
    let marked = fe.dirty_log().unwrap().take();
    assert!(
        marked.is_empty(),
        "pages marked after SET_FEATURES without LOG_ALL: {marked:x?}"
    );
}

#[test]
fn plain_disk_marks_direct_and_bounced_reads() {
    let d = pattern_disk("ubiblk-dirty", DISK);
    let be = Backend::start(BACKEND, &BackendConfig::new(&d.img, &d.sock)).unwrap();
    let mut fe = logging_frontend(&d.sock);
    // Page-aligned: io_uring reads straight into guest memory.
    let got = read_logged(&mut fe, &be, "direct read", 8, 16384, 0);
    assert_eq!(got, pattern_bytes(8 * 512, 16384), "direct read data");
    // A new memory table during the migration: its regions are logged too.
    fe.resend_mem_table().unwrap();
    let got = read_logged(
        &mut fe,
        &be,
        "direct read after SET_MEM_TABLE",
        64,
        16384,
        0,
    );
    assert_eq!(got, pattern_bytes(64 * 512, 16384), "direct read data");
    // Not page-aligned (the file wants 4 KiB): through our buffer, then copied.
    for data_off in [1, 512, 4095] {
        let what = format!("bounced read at buffer offset {data_off}");
        let got = read_logged(&mut fe, &be, &what, 24, 8192, data_off);
        assert_eq!(got, pattern_bytes(24 * 512, 8192), "{what} data");
    }
    stop_and_check_quiet(&mut fe, &be, 40);
}

#[test]
fn encrypted_disk_marks_reads_decrypted_in_place_and_from_our_buffer() {
    let d = pattern_disk("ubiblk-dirty-enc", DISK);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let keys = format!(
        "encryption_key: [\"{}\", \"{}\"]",
        b64(&[0x42; 32]),
        b64(&[0x99; 32])
    );
    let be = Backend::start(BACKEND, &BackendConfig::new(&d.img, &d.sock).extra(keys)).unwrap();
    let plain = pattern_bytes(0x1234_5000, 64 << 10);
    {
        let mut c = Client::connect_queues(&d.sock, 1).unwrap();
        io_ok(c.write(0, 0, &plain), "write").unwrap();
        io_ok(c.flush(0), "flush").unwrap();
    }
    assert_ne!(read_file_at(&d.img, 0, 512).unwrap(), plain[..512]);
    let mut fe = logging_frontend(&d.sock);
    // Page-aligned: the ciphertext is read into guest memory and decrypted there; 512-aligned:
    // read into our buffer and decrypted into guest memory; unaligned: the worker's bounce.
    for (data_off, what) in [
        (0, "decrypted in place"),
        (512, "decrypted from our buffer"),
        (1, "bounced"),
    ] {
        let got = read_logged(&mut fe, &be, what, 16, 16384, data_off);
        assert!(got == plain[8192..8192 + 16384], "{what}: wrong plaintext");
    }
    stop_and_check_quiet(&mut fe, &be, 0);
}

#[test]
fn lazy_disk_marks_reads_of_unfetched_stripes() {
    // 64 KiB stripes; the image covers the whole disk.
    let shift = 7;
    let stripe = 512u64 << shift;
    let image = pattern_bytes(0x5eed_0000, DISK as usize);
    for copy_on_read in [true, false] {
        let what = if copy_on_read {
            "demand fetch"
        } else {
            "read through"
        };
        let files = LazyFiles::new(
            "ubiblk-dirty-lazy",
            DISK,
            0xee,
            &image,
            &[&format!("copy_on_read: {copy_on_read}")],
        );
        files.init_metadata(INIT, shift);
        let be = Backend::start(BACKEND, &files.config).unwrap();
        let mut fe = logging_frontend(&files.config.socket);
        assert_eq!(ControlStatus::query(&files.ctl).unwrap().fetched, 0);
        // Stripe 3 (direct), stripe 5 (unaligned buffer: bounced).
        for (s, data_off) in [(3, 0), (5, 1)] {
            let at = s * stripe + 4096;
            let w = format!("{what} of stripe {s}, buffer offset {data_off}");
            let got = read_logged(&mut fe, &be, &w, at / 512, 32768, data_off);
            assert!(got == image[at as usize..at as usize + 32768], "{w}: data");
        }
        if copy_on_read {
            let st = ControlStatus::query(&files.ctl).unwrap();
            // A read is answered once its stripe is read from the image, before the fetch
            // has put it on the base disk and counted it.
            assert!(
                st.fetched + st.fetching >= 2,
                "stripes not fetched on demand: {}",
                st.raw
            );
        }
        stop_and_check_quiet(&mut fe, &be, 9 * stripe / 512);
    }
}
