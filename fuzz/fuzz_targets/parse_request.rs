//! Fuzzes virtio-blk request parsing the way the backend sees it: the input is the initial
//! contents of a small guest memory holding a split virtqueue, chains are popped with
//! virtio-queue, parsed with `Request::parse`, checked against invariants and a reference model
//! written from the virtio spec, and then run through a `QueueWorker` on a small file.
//!
//! Guest memory (three regions; A and B are adjacent, so accesses may straddle them):
//!   A [0x00000, 0x10000)  B [0x10000, 0x20000)  hole  C [0x30000, 0x31000)
//! The input is copied to guest address 0 (anything past 0x20000 goes to C).
//! Fixed layout at the start of A, kept compact so that small inputs cover whole chains (the
//! rest is free for headers, data and indirect tables):
//!   0x000  control: u16 next_avail, u8 chain count, u8 flags (bit 0: EVENT_IDX,
//!          bits 4..6: queue size = 16 >> n), u8 limits (bits 0..1: disk size, see `limits`)
//!   0x040  descriptor table (16 entries)
//!   0x140  avail ring (its idx is overwritten so that 1..=size chains are available)
//!   0x180  used ring
//!
//! `UBIBLK_FUZZ_NO_WORKER=1` skips the worker stage (parsing only); `UBIBLK_FUZZ_DEBUG=1` prints
//! each parse result.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex, OnceLock};
use ubiblk::block::{BlockDevice, FileDevice};
use ubiblk::virtio_blk::request::{Op, ParseError, Region, SectorRange};
use ubiblk::virtio_blk::{DeviceInfo, Finished, Limits, QueueWorker, Request};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x30000, 0x1000)];
const CTRL: u64 = 0x000;
const DESC: u64 = 0x040;
const AVAIL: u64 = 0x140;
const USED: u64 = 0x180;
const MAX_QUEUE: u16 = 16;

const SECTORS: u64 = 2048;
/// The worker's limits and disk size; parsing is also tried against smaller (and absurd) disks,
/// where a sector boundary is easier for the fuzzer to hit.
const LIMITS: Limits = Limits {
    sectors: SECTORS,
    max_data_len: 64 * 1024,
    max_descriptors: 6,
    max_discard_segs: 8,
    max_discard_sectors: 256,
};

/// The limits to parse with, chosen by the control block, and whether the worker (whose disk
/// has `LIMITS.sectors`) can run the result.
fn limits(sel: u8) -> (Limits, bool) {
    let sectors = match sel & 3 {
        0 => return (LIMITS, true),
        1 => 8,
        2 => 0,
        _ => u64::MAX,
    };
    (Limits { sectors, ..LIMITS }, sectors <= LIMITS.sectors)
}

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// `UBIBLK_FUZZ_DEBUG=1` prints every parse result (for looking at a corpus with -runs=0).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("UBIBLK_FUZZ_DEBUG").is_some_and(|v| v != "0"))
}

fn worker() -> Option<&'static Mutex<QueueWorker>> {
    static W: OnceLock<Option<Mutex<QueueWorker>>> = OnceLock::new();
    W.get_or_init(|| {
        if std::env::var_os("UBIBLK_FUZZ_NO_WORKER").is_some_and(|v| v != "0") {
            return None;
        }
        // tmpfs keeps the I/O (and fsync) cheap; the path is unlinked right after opening.
        let shm = std::path::Path::new("/dev/shm").is_dir();
        let file = if shm {
            tempfile::NamedTempFile::new_in("/dev/shm")
        } else {
            tempfile::NamedTempFile::new()
        }
        .expect("temp file");
        file.as_file().set_len(SECTORS * 512).expect("set_len");
        let dev = FileDevice::open(file.path(), false, 32).expect("open FileDevice");
        let channel = dev.new_channel().expect("io_uring channel");
        let mut device_id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        device_id[..4].copy_from_slice(b"fuzz");
        let info = Arc::new(DeviceInfo {
            limits: LIMITS,
            readonly: false,
            skip_sync: !shm,
            iovec_align: dev.iovec_align(),
            device_id,
        });
        Some(Mutex::new(QueueWorker::new(info, channel)))
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    // Shared: requests the worker sends to the device without a bounce copy pin it.
    let mem_arc = Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap());
    let mem: &GuestMemoryMmap = &mem_arc;
    let (ab, c) = data.split_at(data.len().min(0x20000));
    mem.write_slice(ab, GuestAddress(0)).unwrap();
    mem.write_slice(&c[..c.len().min(REGIONS[2].1)], GuestAddress(REGIONS[2].0))
        .unwrap();

    let mut ctrl = [0u8; 5];
    mem.read_slice(&mut ctrl, GuestAddress(CTRL)).unwrap();
    let next_avail = u16::from_le_bytes([ctrl[0], ctrl[1]]);
    let size = MAX_QUEUE >> ((ctrl[3] >> 4) & 7).min(4);
    let chains = 1 + u16::from(ctrl[2]) % size;
    let avail_idx = next_avail.wrapping_add(chains);
    mem.write_slice(&avail_idx.to_le_bytes(), GuestAddress(AVAIL + 2))
        .unwrap();

    let mut q = Queue::new(MAX_QUEUE).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(ctrl[3] & 1 != 0);
    q.set_next_avail(next_avail);
    q.set_next_used(next_avail);
    q.set_ready(true);
    assert!(q.is_valid(mem));

    let (limits, run_worker) = limits(ctrl[4]);
    let mut worker = worker()
        .filter(|_| run_worker)
        .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()));
    let mut done: Vec<Finished> = Vec::new();
    // (head, parse result) of chains started but not yet finished.
    let mut pending: Vec<(u16, Result<Request, ParseError>)> = Vec::new();
    let mut popped = 0usize;

    // Like BlockBackend::start_available: pop, parse, start, one chain at a time.
    // The device's own writes (status bytes, GET_ID) may land on the avail ring and change its
    // idx, so the count can differ from `chains`; bound it like a guest that stops kicking.
    while popped < 4 * usize::from(MAX_QUEUE) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        popped += 1;
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.clone().collect();
        let parsed = Request::parse(chain, mem, &limits);
        if debug() {
            eprintln!("head {head}: {parsed:?}");
        }
        check(mem, &limits, &descs, &parsed);
        let Some(w) = worker.as_mut() else { continue };
        match w.start(&mem_arc, head, parsed.clone()) {
            Some(f) => {
                check_finished(f, &parsed);
                done.push(f);
            }
            None => {
                assert!(parsed.is_ok(), "an unparsable chain must finish at once");
                pending.push((head, parsed));
            }
        }
    }
    assert!(popped >= 1, "no chain was available");

    let Some(w) = worker.as_mut() else { return };
    let before = done.len();
    w.drain(mem, &mut done);
    assert_eq!(w.in_flight(), 0, "requests left in flight after drain");
    for &f in &done[before..] {
        let i = pending
            .iter()
            .position(|(h, p)| *h == f.head && finished_ok(f, p))
            .unwrap_or_else(|| panic!("unexpected completion {f:?}; pending {pending:?}"));
        let _ = pending.swap_remove(i);
    }
    assert!(pending.is_empty(), "requests never finished: {pending:?}");
    assert_eq!(done.len(), popped);
    for f in done {
        // As the backend does; a head >= size is refused by virtio-queue, which is fine.
        let _ = q.add_used(mem, f.head, f.len);
    }
    let _ = q.needs_notification(mem);
});

/// The used length a finished request may report.
fn finished_ok(f: Finished, parsed: &Result<Request, ParseError>) -> bool {
    match parsed {
        // The status byte was range-checked, so writing it cannot fail.
        Ok(r) => f.len == r.used_len() || f.len == 1,
        Err(e) => f.len == u32::from(e.status.is_some()),
    }
}

fn check_finished(f: Finished, parsed: &Result<Request, ParseError>) {
    assert!(finished_ok(f, parsed), "{f:?} for {parsed:?}");
}

/// Invariants of any parse result, then agreement with the reference model.
fn check(
    mem: &GuestMemoryMmap,
    l: &Limits,
    descs: &[Descriptor],
    parsed: &Result<Request, ParseError>,
) {
    match parsed {
        Ok(r) => {
            assert!(
                mem.check_range(r.status, 1, Permissions::Write),
                "status outside memory: {r:?}"
            );
            for reg in &r.data {
                assert!(reg.len > 0, "empty data region: {r:?}");
                assert!(
                    mem.check_range(reg.addr, reg.len as usize, Permissions::ReadWrite),
                    "data region outside guest memory: {r:?}"
                );
            }
            let total: u64 = r.data.iter().map(|reg| u64::from(reg.len)).sum();
            assert_eq!(
                u64::from(r.data_len),
                total,
                "data_len != sum of regions: {r:?}"
            );
            assert!(descs.len() <= l.max_descriptors);
            match &r.op {
                Op::Read { sector } | Op::Write { sector } => {
                    assert_eq!(total % 512, 0, "{r:?}");
                    assert!(total <= u64::from(l.max_data_len), "{r:?}");
                    let end = sector.checked_add(total / 512);
                    assert!(end.is_some_and(|e| e <= l.sectors), "{r:?}");
                }
                Op::GetId => assert_eq!(total, u64::from(VIRTIO_BLK_ID_BYTES), "{r:?}"),
                Op::Flush => assert!(r.data.is_empty(), "{r:?}"),
                Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
                    assert!(r.data.is_empty(), "{r:?}");
                    assert!(!ranges.is_empty() && ranges.len() <= l.max_discard_segs as usize);
                    for s in ranges {
                        assert!(s.sectors <= u64::from(l.max_discard_sectors), "{r:?}");
                        let end = s.sector.checked_add(s.sectors);
                        assert!(end.is_some_and(|e| e <= l.sectors), "{r:?}");
                    }
                }
            }
        }
        Err(e) => {
            assert!(e.code == IOERR || e.code == UNSUPP, "{e:?}");
            if let Some(s) = e.status {
                assert!(mem.check_range(s, 1, Permissions::Write), "{e:?}");
            }
        }
    }

    let expected = model(mem, l, descs);
    match (parsed, &expected) {
        (Ok(got), Ok(want)) => assert_eq!(got, want, "chain {descs:?}"),
        (Err(got), Err(status)) => assert_eq!(got.status, *status, "chain {descs:?}"),
        _ => panic!("parse: {parsed:?}\nmodel: {expected:?}\nchain: {descs:?}"),
    }
}

/// The bytes [off, off + len) of the concatenation of `descs`, as non-empty guest regions.
fn slice_regions(descs: &[Descriptor], mut off: u64, mut len: u64) -> Vec<Region> {
    let mut out = Vec::new();
    for d in descs {
        let dlen = u64::from(d.len());
        if off >= dlen {
            off -= dlen;
            continue;
        }
        let take = (dlen - off).min(len);
        if take == 0 {
            break;
        }
        out.push(Region {
            addr: GuestAddress(d.addr().0 + off),
            len: take as u32,
        });
        len -= take;
        off = 0;
    }
    assert_eq!(len, 0, "slice_regions past the end");
    out
}

fn read_regions(mem: &GuestMemoryMmap, regions: &[Region]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in regions {
        let mut buf = vec![0u8; r.len as usize];
        mem.read_slice(&mut buf, r.addr)
            .expect("checked region unreadable");
        out.extend_from_slice(&buf);
    }
    out
}

/// Reference parser written from the virtio 1.2 spec (5.2.6) plus ubiblk's documented policy:
/// device-readable descriptors first, then device-writable ones, the status byte being the last
/// byte of the last (writable) descriptor; any framing of header and data is accepted. Returns
/// the request, or the status address an error should be reported at.
fn model(
    mem: &GuestMemoryMmap,
    l: &Limits,
    descs: &[Descriptor],
) -> Result<Request, Option<GuestAddress>> {
    let last = descs.last().ok_or(None)?;
    if !last.is_write_only()
        || last.len() == 0
        || !mem.check_range(last.addr(), last.len() as usize, Permissions::Write)
    {
        return Err(None);
    }
    let status = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
    let err = Err(Some(status));
    if descs.len() > l.max_descriptors {
        return err;
    }
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (out, inn) = descs.split_at(split);
    if inn.iter().any(|d| !d.is_write_only()) {
        return err;
    }
    for d in descs {
        let p = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, p) {
            return err;
        }
    }
    let out_total: u64 = out.iter().map(|d| u64::from(d.len())).sum();
    let in_total: u64 = inn.iter().map(|d| u64::from(d.len())).sum();
    if out_total < 16 {
        return err;
    }
    let hdr = read_regions(mem, &slice_regions(out, 0, 16));
    let req_type = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let out_data = slice_regions(out, 16, out_total - 16);
    let in_data = slice_regions(inn, 0, in_total - 1);
    let (out_len, in_len) = (out_total - 16, in_total - 1);

    let in_disk =
        |sector: u64, sectors: u64| sector.checked_add(sectors).is_some_and(|e| e <= l.sectors);
    let (op, data) = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = req_type == VIRTIO_BLK_T_IN;
            let (data, len, other) = if read {
                (in_data, in_len, out_len)
            } else {
                (out_data, out_len, in_len)
            };
            if other != 0
                || len > u64::from(l.max_data_len)
                || len % 512 != 0
                || !in_disk(sector, len / 512)
            {
                return err;
            }
            let op = if read {
                Op::Read { sector }
            } else {
                Op::Write { sector }
            };
            (op, data)
        }
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => {
            let id = u64::from(VIRTIO_BLK_ID_BYTES);
            if in_len < id {
                return err;
            }
            (Op::GetId, slice_regions(inn, 0, id))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
            if out_len == 0 || out_len % 16 != 0 || out_len / 16 > u64::from(l.max_discard_segs) {
                return err;
            }
            let payload = read_regions(mem, &out_data);
            let mut ranges = Vec::new();
            for seg in payload.chunks_exact(16) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let allowed = if zeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0
                    || sectors > l.max_discard_sectors
                    || !in_disk(sector, u64::from(sectors))
                {
                    return err;
                }
                ranges.push(SectorRange {
                    sector,
                    sectors: u64::from(sectors),
                });
            }
            if zeroes {
                (Op::WriteZeroes(ranges), Vec::new())
            } else {
                (Op::Discard(ranges), Vec::new())
            }
        }
        _ => return err,
    };
    let data_len = data.iter().map(|r| r.len).sum();
    Ok(Request {
        op,
        data,
        data_len,
        status,
    })
}
