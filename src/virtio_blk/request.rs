//! Parsing of virtio-blk requests out of guest descriptor chains.
//!
//! The guest is untrusted: every length, address, direction and sector is checked here, before
//! any I/O is started, so the rest of the data path only sees well-formed requests.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::block::{SECTOR_SHIFT, SECTOR_SIZE};

const HEADER_LEN: usize = 16;
const DISCARD_SEG_LEN: usize = 16;

/// What the device allows; derived from the config and the disk.
#[derive(Debug, Clone)]
pub struct Limits {
    pub sectors: u64,
    /// Largest data transfer of one request, in bytes.
    pub max_data_len: u32,
    /// Longest descriptor chain accepted.
    pub max_descriptors: usize,
    /// Most segments in one DISCARD or WRITE_ZEROES request.
    pub max_discard_segs: u32,
    /// Most sectors one DISCARD or WRITE_ZEROES segment may cover.
    pub max_discard_sectors: u32,
}

/// A contiguous piece of guest memory, already checked to be inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub sectors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read { sector: u64 },
    Write { sector: u64 },
    Flush,
    GetId,
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// The data buffers: device-readable for writes, device-writable for reads and GET_ID.
    pub data: Vec<Region>,
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused. `status` is where to report it, when the chain has a place for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub status: Option<GuestAddress>,
    /// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP.
    pub code: u8,
    pub reason: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason)
    }
}

impl Request {
    /// Parses one chain. `descs` is the chain in order (virtio-queue's iterator already bounds
    /// loops and follows indirect tables).
    pub fn parse<M: GuestMemory>(
        descs: impl Iterator<Item = Descriptor>,
        mem: &M,
        limits: &Limits,
    ) -> Result<Request, ParseError> {
        let mut readable: Vec<Region> = Vec::new();
        let mut writable: Vec<Region> = Vec::new();
        let mut count = 0usize;
        let mut misordered = false;
        let mut out_of_memory = false;
        let mut last: Option<Descriptor> = None;
        for d in descs {
            count += 1;
            last = Some(d);
            if count > limits.max_descriptors {
                // Keep walking (bounded by the ring or indirect table size) to find the status.
                continue;
            }
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                out_of_memory = true;
                continue;
            }
            let r = Region {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                writable.push(r);
            } else if !writable.is_empty() {
                misordered = true;
            } else {
                readable.push(r);
            }
        }

        // The status byte is the last byte of the last descriptor, which must be writable.
        let status = match last {
            Some(d)
                if d.is_write_only()
                    && d.len() > 0
                    && mem.check_range(d.addr(), d.len() as usize, Permissions::Write) =>
            {
                d.addr().checked_add(u64::from(d.len()) - 1)
            }
            _ => None,
        };
        let fail = |code: u32, reason| ParseError {
            status,
            code: code as u8,
            reason,
        };
        let ioerr = |reason| fail(VIRTIO_BLK_S_IOERR, reason);
        if status.is_none() {
            return Err(ioerr("chain has no writable status byte"));
        }
        if count > limits.max_descriptors {
            return Err(ioerr("descriptor chain too long"));
        }
        if out_of_memory {
            return Err(ioerr("descriptor outside guest memory"));
        }
        if misordered {
            return Err(ioerr("device-readable descriptor after a writable one"));
        }

        let mut header = [0u8; HEADER_LEN];
        if total_len(&readable) < HEADER_LEN as u64 {
            return Err(ioerr("request header too short"));
        }
        if !gather(mem, &readable, &mut header) {
            return Err(ioerr("unreadable header"));
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let out_data = trim(&readable, HEADER_LEN as u64, 0);
        let in_data = trim(&writable, 0, 1);
        let out_len = total_len(&out_data);
        let in_len = total_len(&in_data);

        let (op, data) = match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (data, other_len) = if req_type == VIRTIO_BLK_T_IN {
                    (in_data, out_len)
                } else {
                    (out_data, in_len)
                };
                if other_len != 0 {
                    return Err(ioerr("data buffer in the wrong direction"));
                }
                let len = total_len(&data);
                if len > u64::from(limits.max_data_len) {
                    return Err(ioerr("request larger than seg_size_max * seg_count_max"));
                }
                if !len.is_multiple_of(SECTOR_SIZE as u64) {
                    return Err(ioerr("data length not a multiple of 512"));
                }
                check_range(sector, len >> SECTOR_SHIFT, limits.sectors).map_err(ioerr)?;
                let op = if req_type == VIRTIO_BLK_T_IN {
                    Op::Read { sector }
                } else {
                    Op::Write { sector }
                };
                (op, data)
            }
            VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
            VIRTIO_BLK_T_GET_ID => {
                if in_len < VIRTIO_BLK_ID_BYTES as u64 {
                    return Err(ioerr("GET_ID buffer shorter than 20 bytes"));
                }
                (
                    Op::GetId,
                    trim(&in_data, 0, in_len - VIRTIO_BLK_ID_BYTES as u64),
                )
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                if out_len == 0 || !out_len.is_multiple_of(DISCARD_SEG_LEN as u64) {
                    return Err(ioerr("discard payload not a whole number of segments"));
                }
                if out_len / DISCARD_SEG_LEN as u64 > u64::from(limits.max_discard_segs) {
                    return Err(ioerr("too many discard segments"));
                }
                let mut payload = vec![0u8; out_len as usize];
                if !gather(mem, &out_data, &mut payload) {
                    return Err(ioerr("unreadable discard payload"));
                }
                let mut ranges = Vec::with_capacity(payload.len() / DISCARD_SEG_LEN);
                for seg in payload.chunks_exact(DISCARD_SEG_LEN) {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&seg[0..8]);
                    let sector = u64::from_le_bytes(s);
                    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    let allowed = if zeroes {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    if flags & !allowed != 0 {
                        return Err(fail(VIRTIO_BLK_S_UNSUPP, "unsupported discard flags"));
                    }
                    if sectors > limits.max_discard_sectors {
                        return Err(ioerr("discard segment too large"));
                    }
                    check_range(sector, u64::from(sectors), limits.sectors).map_err(ioerr)?;
                    ranges.push(SectorRange {
                        sector,
                        sectors: u64::from(sectors),
                    });
                }
                let op = if zeroes {
                    Op::WriteZeroes(ranges)
                } else {
                    Op::Discard(ranges)
                };
                (op, Vec::new())
            }
            _ => return Err(fail(VIRTIO_BLK_S_UNSUPP, "unsupported request type")),
        };
        let data_len = total_len(&data) as u32;
        Ok(Request {
            op,
            data,
            data_len,
            status: status.unwrap_or(GuestAddress(0)),
        })
    }

    /// Bytes the device writes into the chain on success: data for reads, plus the status byte.
    pub fn used_len(&self) -> u32 {
        match self.op {
            Op::Read { .. } | Op::GetId => self.data_len + 1,
            _ => 1,
        }
    }
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), &'static str> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err("sector range past the end of the disk"),
    }
}

fn total_len(regions: &[Region]) -> u64 {
    regions.iter().map(|r| u64::from(r.len)).sum()
}

/// `regions` without their first `front` and last `back` bytes.
fn trim(regions: &[Region], mut front: u64, back: u64) -> Vec<Region> {
    let total = total_len(regions);
    let mut keep = total.saturating_sub(front).saturating_sub(back);
    let mut out = Vec::new();
    for r in regions {
        if keep == 0 {
            break;
        }
        let len = u64::from(r.len);
        if front >= len {
            front -= len;
            continue;
        }
        let take = (len - front).min(keep);
        out.push(Region {
            addr: r.addr.unchecked_add(front),
            len: take as u32,
        });
        keep -= take;
        front = 0;
    }
    out
}

/// Copies the start of `regions` into `buf`; false if guest memory could not be read.
pub fn gather<M: GuestMemory>(mem: &M, regions: &[Region], buf: &mut [u8]) -> bool {
    let mut off = 0;
    for r in regions {
        if off == buf.len() {
            break;
        }
        let n = (r.len as usize).min(buf.len() - off);
        if mem.read_slice(&mut buf[off..off + n], r.addr).is_err() {
            return false;
        }
        off += n;
    }
    off == buf.len()
}

/// Copies `buf` into the start of `regions`; false if guest memory could not be written.
pub fn scatter<M: GuestMemory>(mem: &M, regions: &[Region], buf: &[u8]) -> bool {
    let mut off = 0;
    for r in regions {
        if off == buf.len() {
            break;
        }
        let n = (r.len as usize).min(buf.len() - off);
        if mem.write_slice(&buf[off..off + n], r.addr).is_err() {
            return false;
        }
        off += n;
    }
    off == buf.len()
}
