//! The queue loop against a vring in test memory: progress, and no spinning on a corrupt ring.

use super::*;
use crate::block::FileDevice;
use crate::virtio_blk::Limits;
use std::sync::mpsc;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

const SIZE: u16 = 16;

struct Rig {
    _file: tempfile::NamedTempFile,
    backend: Arc<BlockBackend>,
    vring: Vring,
    mem: Memory,
    used: GuestAddress,
    avail: GuestAddress,
}

/// A backend over a 1 MiB file and one 16-entry ring holding a single 4 KiB read.
fn rig(event_idx: bool, poll_us: u64) -> Rig {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let dev = FileDevice::open(file.path(), false, 32).unwrap();
    let info = Arc::new(DeviceInfo {
        limits: Limits {
            sectors: 2048,
            max_data_len: 65536,
            max_descriptors: 6,
            max_discard_segs: 1,
            max_discard_sectors: 8,
        },
        readonly: false,
        skip_sync: false,
        iovec_align: dev.iovec_align(),
        device_id: [0; 20],
    });
    let config = ConfigSpace {
        capacity: 2048,
        size_max: 65536,
        seg_max: 4,
        num_queues: 1,
        writeback: true,
    };
    let settings = QueueSettings {
        num_queues: 1,
        queue_size: SIZE,
        poll_timeout: Duration::from_micros(poll_us),
        cpus: None,
    };
    let backend = Arc::new(BlockBackend::new(&dev, info, config, settings).unwrap());

    let raw = LoggedMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let (desc, avail, used) = {
        let vq = MockSplitQueue::new(&raw, SIZE);
        raw.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        raw.write_obj(8u64, GuestAddress(0x10_0008)).unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 4096, w, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, w, 0)),
        ];
        vq.build_desc_chain(&descs).unwrap();
        (vq.desc_table_addr(), vq.avail_addr(), vq.used_addr())
    };
    let mem = GuestMemoryAtomic::new(raw);
    backend.update_memory(mem.clone()).unwrap();
    backend.set_event_idx(event_idx);
    let vring = Vring::new(mem.clone(), SIZE).unwrap();
    vring.set_queue_size(SIZE);
    vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    Rig {
        _file: file,
        backend,
        vring,
        mem,
        used,
        avail,
    }
}

/// Runs one `process` pass in a thread; panics if it does not return within 5 s.
fn process_with_deadline(r: &Rig) {
    let (tx, rx) = mpsc::channel();
    let (backend, vring) = (r.backend.clone(), r.vring.clone());
    std::thread::spawn(move || {
        backend.process(0, &vring, false);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the queue loop did not return: it spins");
}

fn used_idx(r: &Rig) -> u16 {
    r.mem.memory().read_obj(r.used.unchecked_add(2)).unwrap()
}

#[test]
fn a_kick_completes_the_request() {
    for (event_idx, poll) in [(true, 0), (false, 0), (true, 200), (false, 200)] {
        let r = rig(event_idx, poll);
        process_with_deadline(&r);
        // The read may complete in this pass or via the completion event.
        let deadline = Instant::now() + Duration::from_secs(5);
        while used_idx(&r) == 0 && Instant::now() < deadline {
            r.backend.process(0, &r.vring, true);
        }
        assert_eq!(used_idx(&r), 1, "event_idx {event_idx} poll {poll}");
        let status: u8 = r.mem.memory().read_obj(GuestAddress(0x30_0000)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }
}

#[test]
fn corrupt_avail_index_does_not_spin() {
    for (event_idx, poll) in [(true, 0), (false, 0), (true, 200), (false, 200)] {
        let r = rig(event_idx, poll);
        // An avail index far more than a ring ahead of what was consumed.
        r.mem
            .memory()
            .write_obj(1000u16, r.avail.unchecked_add(2))
            .unwrap();
        process_with_deadline(&r);
        process_with_deadline(&r);
        // It waits for the next kick with notifications on (not suppressed, as while polling).
        if !event_idx {
            let flags: u16 = r.mem.memory().read_obj(r.used).unwrap();
            assert_eq!(flags & VRING_USED_F_NO_NOTIFY as u16, 0, "poll {poll}");
        }
    }
}

/// Guest memory of `map` bytes over a file of `file_len` bytes, like a frontend's memfd.
fn file_backed(map: usize, file_len: u64) -> Memory {
    let file = tempfile::tempfile().unwrap();
    file.set_len(file_len).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), map, Some(FileOffset::new(file, 0))).unwrap();
    GuestMemoryAtomic::new(LoggedMemory::from_regions(vec![region]).unwrap())
}

#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    // Touching the pages past the file's end would raise SIGBUS and kill the backend.
    let r = rig(false, 0);
    let mem = file_backed(0x20_0000, 0x10_0000);
    let e = r.backend.update_memory(mem.clone()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("of a file of 0x100000 bytes"), "{e}");
    // Neither the backend nor the rings (which share `mem`) keep the table.
    assert_eq!(mem.memory().num_regions(), 0);
    assert_eq!(r.backend.memory().memory().num_regions(), 0);

    // A table that fits its file is taken.
    let good = file_backed(0x10_0000, 0x10_0000);
    r.backend.update_memory(good).unwrap();
    assert_eq!(r.backend.memory().memory().num_regions(), 1);
}

/// A region from the frontend that marks in flight a head whose chain is garbage (never made
/// available), ahead of a real one: after SET_INFLIGHT_FD the queue resubmits both in counter
/// order, fails the garbage one, serves the real one, and a ring that then claims fewer chains
/// than the region does is treated as corrupt, not spun on.
#[test]
fn a_region_with_garbage_heads_fails_requests_not_the_backend() {
    use super::inflight::{QueueTrack, Region};
    use super::relay::InflightHandler;
    use vhost::vhost_user::message::VhostUserInflight;

    let r = rig(false, 0);
    let (info, file) = r
        .backend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, SIZE))
        .unwrap();
    // What a dead process (or a hostile frontend) left: head 7 (zeroed descriptors), then 0.
    let region = Region::map(&file, info.mmap_size, 0, 1, SIZE).unwrap();
    let mut dead = QueueTrack::default();
    dead.attach(Some(Arc::new(region)), 0);
    dead.recover(0, SIZE);
    dead.take(7);
    dead.take(0);
    drop(dead);
    r.backend.set_inflight_fd(&info, file).unwrap();

    process_with_deadline(&r);
    let deadline = Instant::now() + Duration::from_secs(5);
    while used_idx(&r) < 2 && Instant::now() < deadline {
        process_with_deadline(&r);
    }
    assert_eq!(used_idx(&r), 2);
    let m = r.mem.memory();
    let id = |i: u64| -> u32 { m.read_obj(r.used.unchecked_add(4 + 8 * i)).unwrap() };
    assert_eq!((id(0), id(1)), (7, 0), "resubmitted oldest first");
    let status: u8 = m.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

/// SET_INFLIGHT_FD accepted again and again (a looping frontend) logs nothing at info here:
/// the relay says it once per connection.
#[test]
fn setting_the_inflight_region_again_logs_no_info() {
    use super::relay::InflightHandler;
    use crate::virtio_blk::tests::capture;
    use vhost::vhost_user::message::VhostUserInflight;

    let r = rig(false, 0);
    capture::start();
    for _ in 0..50 {
        let (info, file) = r
            .backend
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, SIZE))
            .unwrap();
        r.backend.set_inflight_fd(&info, file).unwrap();
    }
    let info: Vec<_> = capture::take()
        .into_iter()
        .filter(|(l, _)| *l <= log::Level::Info)
        .collect();
    assert!(info.is_empty(), "{} info lines: {info:?}", info.len());
}
