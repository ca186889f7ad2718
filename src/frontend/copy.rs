//! Stage 4's data pass: the whole disk read into a file, every request slot kept busy.

use log::warn;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use vm_memory::Bytes;

use super::error::{ensure, io_err, mem_err, Error, Result};
use super::ring::Ring;
use super::{SharedMemory, SECTOR_SIZE};

/// What [`copy`] moved.
pub(super) struct Copied {
    pub(super) bytes: u64,
    pub(super) requests: u64,
    pub(super) max_in_flight: usize,
}

/// Reads sectors `0..capacity` through `ring` into `out` (sized to `capacity` sectors first);
/// `progress` gets the number of bytes copied so far after each completion. Every completion
/// is checked: its descriptor, status byte and used length (which may be 0 unless `strict`:
/// see [`super::BlkFrontend::set_strict`]).
pub(super) fn copy(
    ring: &mut Ring,
    mem: &SharedMemory,
    capacity: u64,
    out: &File,
    timeout: Duration,
    strict: bool,
    progress: &mut impl FnMut(u64),
) -> Result<Copied> {
    let total_bytes = capacity
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| Error::Backend("capacity overflows".into()))?;
    out.set_len(total_bytes)
        .map_err(io_err("sizing the output file"))?;

    let g = ring.geometry.clone();
    let chunk_sectors = u64::from(g.chunk) / SECTOR_SIZE;
    // Per slot: Some((sector, data bytes)) while in flight.
    let mut slots: Vec<Option<(u64, u32)>> = vec![None; usize::from(g.slots)];
    let mut free: Vec<u16> = (0..g.slots).rev().collect();
    let mut next_sector = 0u64;
    let mut in_flight = 0usize;
    let mut max_in_flight = 0usize;
    let mut requests = 0u64;
    let mut copied = 0u64;
    let mut buf = vec![0u8; g.chunk as usize];
    let mut warned_zero_len = false;

    while next_sector < capacity || in_flight > 0 {
        // Fill every free slot.
        let mut submitted = false;
        while next_sector < capacity {
            let Some(slot) = free.pop() else { break };
            let sectors = chunk_sectors.min(capacity - next_sector);
            let len = (sectors * SECTOR_SIZE) as u32;
            ring.submit_read(mem, slot, next_sector, len)?;
            slots[usize::from(slot)] = Some((next_sector, len));
            next_sector += sectors;
            in_flight += 1;
            requests += 1;
            submitted = true;
        }
        max_in_flight = max_in_flight.max(in_flight);
        if submitted {
            ring.notify(mem)?;
        }
        // Reap at least one completion.
        let done = ring.wait_used(mem, in_flight, timeout)?;
        for (id, used_len) in done {
            let slot = ring.slot_of(id)?;
            let (sector, len) = slots
                .get_mut(usize::from(slot))
                .and_then(Option::take)
                .ok_or_else(|| {
                    Error::Backend(format!(
                        "backend completed descriptor {id}, which is not in flight"
                    ))
                })?;
            in_flight -= 1;
            ring.check_status(mem, slot, sector, len, None)?;
            if used_len == 0 && !strict {
                if !warned_zero_len {
                    warn!(
                        "backend reported used length 0 for a {len}-byte read at sector \
                         {sector} (expected {}); trusting the status byte and the request's \
                         length for this and later reads (--strict refuses it)",
                        len + 1
                    );
                    warned_zero_len = true;
                }
            } else {
                ensure!(
                    used_len == len + 1,
                    Backend,
                    "backend reported used length {used_len} for a {len}-byte read at sector \
                     {sector} (expected {})",
                    len + 1
                );
            }
            let data = &mut buf[..len as usize];
            mem.mem
                .read_slice(data, ring.data_addr(slot))
                .map_err(mem_err("reading request data"))?;
            out.write_all_at(data, sector * SECTOR_SIZE)
                .map_err(io_err(format!("writing the output at sector {sector}")))?;
            copied += u64::from(len);
            free.push(slot);
            progress(copied);
        }
    }
    Ok(Copied {
        bytes: copied,
        requests,
        max_in_flight,
    })
}
