//! Validates the test client (tests/common) end-to-end against qemu-storage-daemon, the
//! reference vhost-user-blk backend. Skipped without qemu-storage-daemon (a failure under
//! `UBIBLK_REQUIRE_ALL=1`, as in CI).

use crate::common::*;

/// CI installs qemu-utils (.ci/run); elsewhere a missing daemon skips the test.
fn have_qsd() -> bool {
    require(&[QSD])
}

const SIZE: u64 = 64 << 20;

fn setup(num_queues: usize) -> (tempfile::TempDir, std::path::PathBuf, Qsd) {
    let dir = scratch_dir("ubiblk-qsd-test");
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, SIZE).unwrap();
    let sock = dir.path().join("vhost.sock");
    let qsd = if supports_o_direct(&img) {
        start_qsd(&img, &sock, num_queues)
    } else {
        start_qsd_buffered(&img, &sock, num_queues)
    }
    .unwrap();
    (dir, img, qsd)
}

#[test]
fn qsd_sync_ops() {
    if !have_qsd() {
        return;
    }
    let (_dir, img, qsd) = setup(2);
    let mut c = Client::connect_queues(&qsd.socket, 2).unwrap();
    eprintln!("device info: {:?}", c.info);
    assert_eq!(c.capacity(), SIZE);
    assert!(!c.read_only());
    assert_eq!(c.num_queues(), 2);

    // read existing pattern
    let got = c.read(0, 4096, 8192).unwrap();
    assert_eq!(got, pattern_bytes(4096, 8192));
    let got = c.read(1, 512 * 7, 512 * 3).unwrap();
    assert_eq!(got, pattern_bytes(512 * 7, 512 * 3));

    // write + read back on both queues, and check the file itself
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    c.write(0, 1 << 20, &data).unwrap();
    assert_eq!(c.read(1, 1 << 20, data.len()).unwrap(), data);
    c.flush(0).unwrap();
    assert_eq!(read_file_at(&img, 1 << 20, data.len()).unwrap(), data);
    c.write_fua(1, 2 << 20, &data[..4096]).unwrap();
    assert_eq!(read_file_at(&img, 2 << 20, 4096).unwrap(), &data[..4096]);

    // scatter-gather write with segments at odd 512-multiple buffer offsets
    let a = vec![0xaau8; 512];
    let b = vec![0xbbu8; 3 * 512];
    let d = vec![0xddu8; 4096];
    c.writev(0, 3 << 20, &[&a, &b, &d]).unwrap();
    let mut expect = a.clone();
    expect.extend_from_slice(&b);
    expect.extend_from_slice(&d);
    assert_eq!(c.read(0, 3 << 20, expect.len()).unwrap(), expect);
    let parts = c.readv(1, 3 << 20, &[1024, 512, 4096 + 512]).unwrap();
    assert_eq!(parts.concat(), expect);
    let parts = c
        .readv_at(0, 3 << 20, &[(4096 * 3 + 512, 2048), (1536, 4096)])
        .unwrap();
    assert_eq!(parts.concat(), expect[..6144]);

    // write zeroes / discard
    c.write_zeroes(0, 4 << 20, 8192, false).unwrap();
    assert_eq!(c.read(0, 4 << 20, 8192).unwrap(), vec![0u8; 8192]);
    c.write_zeroes(0, 5 << 20, 1 << 20, true).unwrap();
    assert_eq!(c.read(0, 5 << 20, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    c.discard(1, 8 << 20, 1 << 20).unwrap();

    // errors come back as Err
    let e = c.read(0, SIZE, 4096).unwrap_err();
    eprintln!("read past end: {}", errno_name(e));
    let e = c.write(0, 100, &[0u8; 512]).unwrap_err();
    assert_eq!(e, libc::EINVAL, "unaligned offset rejected client-side");
    // still usable afterwards
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
}

#[test]
fn qsd_queue_depth() {
    if !have_qsd() {
        return;
    }
    let (_dir, _img, qsd) = setup(1);
    let mut c = Client::connect_queues(&qsd.socket, 1).unwrap();
    let q = c.queue(0);
    // 64 reads in flight (more than fit comfortably; exercise the backlog too)
    let n = 300usize;
    for i in 0..n {
        q.submit_read(i as u64 * 4096, i * 4096, 4096, i);
    }
    let done = q.drain().unwrap();
    assert_eq!(done.len(), n);
    let mut seen = vec![false; n];
    for d in done {
        assert_eq!(d.ret, 0);
        seen[d.user_data] = true;
    }
    assert!(seen.iter().all(|&s| s));
    for i in 0..n {
        assert_eq!(
            &q.buf()[i * 4096..(i + 1) * 4096],
            &pattern_bytes(i as u64 * 4096, 4096)[..],
            "block {i}"
        );
    }
}

#[test]
fn qsd_read_only() {
    if !have_qsd() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, 1 << 20).unwrap();
    let sock = dir.path().join("vhost.sock");
    let qsd = Qsd::start(
        &img,
        &sock,
        &QsdOptions {
            writable: false,
            ..Default::default()
        },
    )
    .unwrap();
    // Read-write client on an RO device: libblkio refuses in start() with EROFS.
    let err = Client::connect_queues(&qsd.socket, 1).err().unwrap();
    eprintln!("{err}");
    assert_eq!(err.errno, libc::EROFS);
    drop(qsd);
    // Read-only client: reads work, writes fail client-side with EBADF.
    let qsd = Qsd::start(
        &img,
        &sock,
        &QsdOptions {
            writable: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = Client::connect(
        &qsd.socket,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(c.read_only());
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern_bytes(0, 4096));
    assert_eq!(c.write(0, 0, &[1u8; 512]).unwrap_err(), libc::EBADF);
}
