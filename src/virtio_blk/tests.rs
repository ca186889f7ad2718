//! Hostile-guest tests: chains built in guest memory with virtio-queue's mock split queue.

use super::request::{Op, ParseError, Region, Request, SectorRange};
use super::*;
use crate::block::FileDevice;
use std::sync::Arc;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x100_0000; // 16 MiB of guest RAM
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SECTORS: u64 = 2048;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        sectors: SECTORS,
        max_data_len: 128 * 1024,
        max_descriptors: 6,
        max_discard_segs: 4,
        max_discard_sectors: 1024,
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(m: &GuestMemoryMmap, req_type: u32, sector: u64) {
    m.write_obj(req_type, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

fn parse(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
    let vq = MockSplitQueue::new(m, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    Request::parse(chain, m, &limits())
}

fn ioerr(r: Result<Request, ParseError>) -> ParseError {
    let e = r.expect_err("chain must be refused");
    assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8, "{e:?}");
    e
}

#[test]
fn read_write_flush_get_id_parse() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 8);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.op, Op::Read { sector: 8 });
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(r.status, GuestAddress(STATUS));
    assert_eq!(r.used_len(), 4097);

    header(&m, VIRTIO_BLK_T_OUT, SECTORS - 8);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 4096, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(
        r.op,
        Op::Write {
            sector: SECTORS - 8
        }
    );
    assert_eq!(r.used_len(), 1);

    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.op, Op::Flush);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.op, Op::GetId);
    assert_eq!(r.data_len, 20);
}

#[test]
fn any_framing_is_accepted() {
    let m = mem();
    // Header split over two descriptors; data and status sharing one descriptor.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let r = parse(&m, &[d(HDR, 8, 0), d(HDR + 8, 8, 0), d(DATA, 1025, W)]).unwrap();
    assert_eq!(r.op, Op::Read { sector: 0 });
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(DATA),
            len: 1024
        }]
    );
    assert_eq!(r.status, GuestAddress(DATA + 1024));
    // Header and write data in one descriptor.
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let r = parse(&m, &[d(HDR, 16 + 512, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(HDR + 16),
            len: 512
        }]
    );
}

#[test]
fn chain_without_writable_status_has_nowhere_to_report() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let e = ioerr(parse(&m, &[d(HDR, 16, 0)]));
    assert_eq!(e.status, None);
    let e = ioerr(parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, 0)]));
    assert_eq!(e.status, None);
    let e = ioerr(parse(&m, &[d(HDR, 16, 0), d(STATUS, 0, W)]));
    assert_eq!(e.status, None);
}

#[test]
fn short_header_is_ioerr_with_status() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = ioerr(parse(&m, &[d(HDR, 8, 0), d(STATUS, 1, W)]));
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
}

#[test]
fn too_long_chain_is_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![d(HDR, 16, 0)];
    descs.extend((0..8).map(|i| d(DATA + i * 512, 512, W)));
    descs.push(d(STATUS, 1, W));
    let e = ioerr(parse(&m, &descs));
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
}

#[test]
fn looping_chain_terminates_and_is_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let next = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ...: the chain never ends.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | next, 2)),
        RawDescriptor::from(SplitDescriptor::new(DATA + 512, 512, W | next, 1)),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    assert!(Request::parse(chain, &m, &limits()).is_err());
}

#[test]
fn wrong_direction_is_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
    ));
    header(&m, VIRTIO_BLK_T_OUT, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
    ));
    // A readable descriptor after a writable one.
    header(&m, VIRTIO_BLK_T_OUT, 0);
    ioerr(parse(
        &m,
        &[
            d(HDR, 16, 0),
            d(DATA, 512, W),
            d(DATA, 512, 0),
            d(STATUS, 1, W),
        ],
    ));
    // The header itself device-writable.
    header(&m, VIRTIO_BLK_T_IN, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, W), d(DATA, 512, W), d(STATUS, 1, W)],
    ));
}

#[test]
fn buffers_outside_guest_memory_are_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(MEM - 256, 512, W), d(STATUS, 1, W)],
    ));
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(u64::MAX - 10, 512, W), d(STATUS, 1, W)],
    ));
    header(&m, VIRTIO_BLK_T_OUT, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(MEM + 4096, 512, 0), d(STATUS, 1, W)],
    ));
    // Status outside memory: nowhere to report.
    let e = ioerr(parse(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(MEM, 1, W)]));
    assert_eq!(e.status, None);
}

#[test]
fn unaligned_length_is_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 513, W), d(STATUS, 1, W)],
    ));
    header(&m, VIRTIO_BLK_T_OUT, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 100, 0), d(STATUS, 1, W)],
    ));
}

#[test]
fn out_of_range_sectors_are_ioerr() {
    let m = mem();
    for sector in [SECTORS, SECTORS - 7, u64::MAX, u64::MAX - 3] {
        header(&m, VIRTIO_BLK_T_IN, sector);
        ioerr(parse(
            &m,
            &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)],
        ));
    }
}

#[test]
fn huge_length_is_ioerr() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 0x20_0000, W), d(STATUS, 1, W)],
    ));
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, u32::MAX, W), d(STATUS, 1, W)],
    ));
}

#[test]
fn unknown_type_is_unsupp() {
    let m = mem();
    for t in [2, 3, 14, 0xdead_beef] {
        header(&m, t, 0);
        let e = parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
    }
}

fn discard_seg(m: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    m.write_obj(sector, GuestAddress(at)).unwrap();
    m.write_obj(sectors, GuestAddress(at + 8)).unwrap();
    m.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes_are_checked() {
    let m = mem();
    discard_seg(&m, DATA, 8, 16, 0);
    discard_seg(&m, DATA + 16, 100, 1, 0);
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(
        r.op,
        Op::Discard(vec![
            SectorRange {
                sector: 8,
                sectors: 16
            },
            SectorRange {
                sector: 100,
                sectors: 1
            }
        ])
    );
    // The unmap flag is valid for write-zeroes only.
    discard_seg(&m, DATA, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let e = parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap_err();
    assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
    assert!(matches!(r.op, Op::WriteZeroes(_)));
    // Past the end, partial segment, too many segments, too big a segment.
    discard_seg(&m, DATA, SECTORS - 1, 2, 0);
    ioerr(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
    ioerr(parse(&m, &[d(HDR, 16, 0), d(DATA, 15, 0), d(STATUS, 1, W)]));
    ioerr(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 16 * 5, 0), d(STATUS, 1, W)],
    ));
    discard_seg(&m, DATA, 0, 1025, 0);
    ioerr(parse(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
}

#[test]
fn get_id_needs_twenty_bytes() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    ioerr(parse(&m, &[d(HDR, 16, 0), d(DATA, 19, W), d(STATUS, 1, W)]));
}

#[test]
fn indirect_tables_are_followed_and_nesting_refused() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 4);
    let table = 0x40_0000;
    let next = VRING_DESC_F_NEXT as u16;
    let entries = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(DATA, 1024, W | next, 2),
        SplitDescriptor::new(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let r = parse(&m, &[d(table, 48, VRING_DESC_F_INDIRECT as u16)]).unwrap();
    assert_eq!(r.op, Op::Read { sector: 4 });
    assert_eq!(r.data_len, 1024);

    // An indirect descriptor inside an indirect table ends the chain early: refused.
    let nested = SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16 | next, 2);
    m.write_obj(RawDescriptor::from(nested), GuestAddress(table + 16))
        .unwrap();
    assert!(parse(&m, &[d(table, 48, VRING_DESC_F_INDIRECT as u16)]).is_err());
}

// --- the worker against a real file ---

struct Rig {
    _file: Option<tempfile::NamedTempFile>,
    mem: Arc<GuestMemoryMmap>,
    worker: QueueWorker,
}

fn rig(readonly: bool, skip_sync: bool) -> Rig {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(SECTORS * 512).unwrap();
    let dev = FileDevice::open(file.path(), readonly, 32).unwrap();
    let mut r = rig_on(&dev, readonly, skip_sync);
    r._file = Some(file);
    r
}

fn rig_on(dev: &dyn crate::block::BlockDevice, readonly: bool, skip_sync: bool) -> Rig {
    let mut device_id = [0u8; 20];
    device_id[..4].copy_from_slice(b"test");
    let info = Arc::new(DeviceInfo {
        limits: limits(),
        readonly,
        skip_sync,
        iovec_align: dev.iovec_align(),
        device_id,
    });
    let worker = QueueWorker::new(info, dev.new_channel().unwrap());
    Rig {
        _file: None,
        mem: Arc::new(mem()),
        worker,
    }
}

impl Rig {
    /// Runs one chain to completion; returns (status byte, used length).
    fn run(&mut self, descs: &[RawDescriptor]) -> (u8, u32) {
        let f = self.finish(descs, std::time::Instant::now());
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, f.len)
    }

    /// Runs one chain taken off the ring at `started` to completion; returns its entry.
    fn finish(&mut self, descs: &[RawDescriptor], started: std::time::Instant) -> Finished {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let parsed = parse(&self.mem, descs);
        let mut out = Vec::new();
        if let Some(f) = self.worker.start_at(&self.mem, 0, parsed, started) {
            out.push(f);
        }
        self.worker.drain(&*self.mem, &mut out);
        assert_eq!(out.len(), 1);
        out[0]
    }
}

#[test]
fn worker_writes_and_reads_back() {
    let mut r = rig(false, false);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&r.mem, VIRTIO_BLK_T_OUT, 16);
    // Scatter-gather over two unaligned guest buffers.
    r.mem
        .write_slice(&data[..512], GuestAddress(DATA + 0x10001))
        .unwrap();
    r.mem
        .write_slice(&data[512..], GuestAddress(DATA + 0x20003))
        .unwrap();
    let out = [
        d(HDR, 16, 0),
        d(DATA + 0x10001, 512, 0),
        d(DATA + 0x20003, 7680, 0),
        d(STATUS, 1, W),
    ];
    assert_eq!(r.run(&out), (VIRTIO_BLK_S_OK as u8, 1));
    header(&r.mem, VIRTIO_BLK_T_IN, 16);
    let inb = [d(HDR, 16, 0), d(DATA + 0x50000, 8192, W), d(STATUS, 1, W)];
    assert_eq!(r.run(&inb), (VIRTIO_BLK_S_OK as u8, 8193));
    let mut back = vec![0u8; 8192];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x50000))
        .unwrap();
    assert_eq!(back, data);
    header(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(STATUS, 1, W)]).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn worker_reports_parse_errors_per_request() {
    let mut r = rig(false, true);
    header(&r.mem, VIRTIO_BLK_T_IN, SECTORS);
    let bad = [d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)];
    assert_eq!(r.run(&bad), (VIRTIO_BLK_S_IOERR as u8, 1));
    header(&r.mem, 77, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(STATUS, 1, W)]),
        (VIRTIO_BLK_S_UNSUPP as u8, 1)
    );
    // The queue keeps working after errors.
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]).0,
        0
    );
}

#[test]
fn worker_get_id_and_skip_sync_flush() {
    let mut r = rig(false, true);
    header(&r.mem, VIRTIO_BLK_T_GET_ID, 0);
    r.mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)]),
        (0, 21)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"test\0\0");
    header(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[d(HDR, 16, 0), d(STATUS, 1, W)]).0, 0);
}

#[test]
fn readonly_worker_rejects_writes_and_discards() {
    let mut r = rig(true, false);
    header(&r.mem, VIRTIO_BLK_T_OUT, 0);
    let out = [d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)];
    assert_eq!(r.run(&out).0, VIRTIO_BLK_S_IOERR as u8);
    discard_seg(&r.mem, DATA, 0, 8, 0);
    header(&r.mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).0,
        1
    );
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]).0,
        0
    );
}

#[test]
fn worker_discard_zeroes_multiple_ranges() {
    let mut r = rig(false, false);
    r.mem
        .write_slice(&[0x5a; 8192], GuestAddress(DATA))
        .unwrap();
    header(&r.mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 8192, 0), d(STATUS, 1, W)]).0,
        0
    );
    let segs = 0x60_0000;
    discard_seg(&r.mem, segs, 1, 2, 0);
    discard_seg(&r.mem, segs + 16, 8, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    header(&r.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(segs, 32, 0), d(STATUS, 1, W)]).0,
        0
    );
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, 0), d(DATA, 8192, W), d(STATUS, 1, W)]).0,
        0
    );
    let mut back = vec![0u8; 8192];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    for (s, chunk) in back.chunks(512).enumerate() {
        let zero = (1..3).contains(&s) || (8..12).contains(&s);
        assert!(
            chunk.iter().all(|&b| b == if zero { 0 } else { 0x5a }),
            "sector {s}"
        );
    }
}

/// Log records of the threads that asked for them ([`capture_logs`]); other threads' records
/// are dropped. Installed once per test process as the global logger.
pub(crate) mod capture {
    use std::sync::{Mutex, OnceLock};
    use std::thread::ThreadId;

    struct Capture(
        Mutex<Vec<(ThreadId, log::Level, String)>>,
        Mutex<Vec<ThreadId>>,
    );

    static LOGGER: OnceLock<&'static Capture> = OnceLock::new();

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let me = std::thread::current().id();
            if self
                .1
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&me)
            {
                let line = (me, record.level(), record.args().to_string());
                self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        }
        fn flush(&self) {}
    }

    fn logger() -> &'static Capture {
        LOGGER.get_or_init(|| {
            let c: &'static Capture = Box::leak(Box::new(Capture(
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
            )));
            log::set_logger(c).expect("no other logger in the library's tests");
            log::set_max_level(log::LevelFilter::Debug);
            c
        })
    }

    /// Starts capturing this thread's records.
    pub fn start() {
        let me = std::thread::current().id();
        logger().1.lock().unwrap().push(me);
    }

    /// This thread's records since [`start`], emptied.
    pub fn take() -> Vec<(log::Level, String)> {
        let me = std::thread::current().id();
        let mut all = logger().0.lock().unwrap();
        let (mine, rest) = all.drain(..).partition(|(t, _, _)| *t == me);
        *all = rest;
        mine.into_iter().map(|(_, l, s)| (l, s)).collect::<Vec<_>>()
    }
}

#[test]
fn failing_disk_logs_one_warning_then_counts() {
    let dev = crate::block::testing::MemDevice::new(SECTORS);
    dev.on(
        |s| s.sector >= 100,
        crate::block::testing::Fault::Fail(libc::EIO),
    );
    let mut r = rig_on(&dev, false, false);
    capture::start();
    let read = [d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)];
    for i in 0..50 {
        header(&r.mem, VIRTIO_BLK_T_IN, 100 + i);
        assert_eq!(r.run(&read), (VIRTIO_BLK_S_IOERR as u8, 1), "read {i}");
    }
    header(&r.mem, VIRTIO_BLK_T_OUT, 200);
    let write = [d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)];
    assert_eq!(r.run(&write).0, VIRTIO_BLK_S_IOERR as u8);
    // Requests the disk serves still succeed.
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.run(&read).0, VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.worker.device_errors(), 51);

    let logs = capture::take();
    let warns: Vec<_> = logs
        .iter()
        .filter(|(l, _)| *l <= log::Level::Warn)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(warns.len(), 1, "one warning for 51 failures: {warns:?}");
    let eio = std::io::Error::from_raw_os_error(libc::EIO).to_string();
    assert!(
        warns[0].contains("read of 4096 bytes at sector 100") && warns[0].contains(&eio),
        "{}",
        warns[0]
    );
    let debugs: Vec<_> = logs
        .iter()
        .filter(|(l, m)| *l == log::Level::Debug && m.contains("device error"))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(debugs.len(), 50, "{debugs:?}");
    assert!(
        debugs[49].contains("write of 512 bytes at sector 200")
            && debugs[49].contains("(51 on this queue)")
    );

    // At the end of the connection: one summary line, and only once.
    r.worker.log_error_summary(3);
    r.worker.log_error_summary(3);
    let logs = capture::take();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0].0, log::Level::Warn);
    assert!(
        logs[0].1.contains("queue 3: 51 device errors"),
        "{}",
        logs[0].1
    );
}

#[test]
fn config_space_at_both_offsets() {
    let c = ConfigSpace {
        capacity: 0x1234,
        size_max: 65536,
        seg_max: 4,
        num_queues: 3,
        writeback: true,
    };
    let a = c.read(0, 60);
    let b = c.read(0x100, 60);
    assert_eq!(a, b);
    assert_eq!(&a[0..8], &0x1234u64.to_le_bytes());
    assert_eq!(&a[8..12], &65536u32.to_le_bytes());
    assert_eq!(&a[12..16], &4u32.to_le_bytes());
    assert_eq!(&a[20..24], &512u32.to_le_bytes());
    assert_eq!(a[32], 1);
    assert_eq!(&a[34..36], &3u16.to_le_bytes());
    assert_eq!(c.read(0x100 + 34, 2), vec![3, 0]);
    assert_eq!(c.read(0x200, 4), vec![0; 4]);
    let wt = ConfigSpace {
        writeback: false,
        ..c
    };
    assert_eq!(wt.read(0x100 + 32, 1), vec![0]);
}

#[test]
fn features_follow_readonly() {
    let rw = features(false);
    let ro = features(true);
    assert_ne!(rw & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
    assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(ro & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    for bit in [
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(rw & 1 << bit, 0);
    }
}

/// What each finished request tells the statistics: its kind, status and bytes, and when it
/// was taken off the ring.
#[test]
fn finished_requests_carry_kind_status_bytes_and_start() {
    use crate::virtio_blk::stats::OpKind;
    let t0 = std::time::Instant::now();
    let mut r = rig(false, false);
    let kinds = |f: Finished| (f.kind, f.ok, f.bytes, f.started == t0);
    header(&r.mem, VIRTIO_BLK_T_OUT, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(DATA, 8192, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Write, true, 8192, true));
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Read, true, 4096, true));
    header(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Flush, true, 0, true));
    let segs = 0x60_0000;
    discard_seg(&r.mem, segs, 1, 2, 0);
    discard_seg(&r.mem, segs + 16, 8, 4, 0);
    header(&r.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(segs, 32, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::WriteZeroes, true, 6 * 512, true));
    header(&r.mem, VIRTIO_BLK_T_DISCARD, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(segs, 16, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Discard, true, 2 * 512, true));
    header(&r.mem, VIRTIO_BLK_T_GET_ID, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Other, true, 0, true));
    // A chain that does not parse, and a read past the end: errors, no bytes.
    header(&r.mem, 77, 0);
    let f = r.finish(&[d(HDR, 16, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Other, false, 0, true));
    header(&r.mem, VIRTIO_BLK_T_IN, SECTORS);
    let f = r.finish(&[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Other, false, 0, true));
    // Refused by a read-only device: counted as the kind it is.
    let mut ro = rig(true, false);
    header(&ro.mem, VIRTIO_BLK_T_OUT, 0);
    let f = ro.finish(&[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)], t0);
    assert_eq!(kinds(f), (OpKind::Write, false, 512, true));
}
