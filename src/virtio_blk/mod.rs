//! virtio-blk: feature bits, config space, request parsing and the per-queue worker.

pub mod request;
pub mod stats;
pub mod worker;

pub use request::{Limits, Request};
pub use worker::{DeviceInfo, Finished, QueueWorker};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Most segments accepted in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEGS: u32 = 32;
/// Most sectors per DISCARD / WRITE_ZEROES segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Virtio feature bits the device offers.
pub fn features(readonly: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b);
    if readonly {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    bits
}

/// Values of the virtio-blk config space.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub num_queues: u16,
    /// The `writeback` byte: false with `write_through` (every write durable on completion).
    pub writeback: bool,
}

impl ConfigSpace {
    /// The `struct virtio_blk_config` layout, little-endian, up to write_zeroes_may_unmap.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&self.capacity.to_le_bytes()); // 0 capacity
        b.extend_from_slice(&self.size_max.to_le_bytes()); // 8 size_max
        b.extend_from_slice(&self.seg_max.to_le_bytes()); // 12 seg_max
        b.extend_from_slice(&[0; 4]); // 16 geometry
        b.extend_from_slice(&512u32.to_le_bytes()); // 20 blk_size
        b.push(0); // 24 physical_block_exp
        b.push(0); // 25 alignment_offset
        b.extend_from_slice(&1u16.to_le_bytes()); // 26 min_io_size (in blocks)
        b.extend_from_slice(&8u32.to_le_bytes()); // 28 opt_io_size (4 KiB)
        b.push(self.writeback.into()); // 32 writeback
        b.push(0); // 33 unused
        b.extend_from_slice(&self.num_queues.to_le_bytes()); // 34 num_queues
        b.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // 36 max_discard_sectors
        b.extend_from_slice(&MAX_DISCARD_SEGS.to_le_bytes()); // 40 max_discard_seg
        b.extend_from_slice(&1u32.to_le_bytes()); // 44 discard_sector_alignment
        b.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // 48 max_write_zeroes_sectors
        b.extend_from_slice(&MAX_DISCARD_SEGS.to_le_bytes()); // 52 max_write_zeroes_seg
        b.push(1); // 56 write_zeroes_may_unmap
        b.extend_from_slice(&[0; 3]); // 57 unused1
        b
    }

    /// `size` bytes at `offset`. Frontends address the config at 0 (QEMU) or at
    /// VHOST_USER_CONFIG_OFFSET = 0x100 (cloud-hypervisor); both are served.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let offset = if offset >= 0x100 {
            offset - 0x100
        } else {
            offset
        } as usize;
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        if offset < bytes.len() {
            let n = (bytes.len() - offset).min(out.len());
            out[..n].copy_from_slice(&bytes[offset..offset + n]);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
