//! The virtio-blk config space (GET_CONFIG), decoded.

use std::fmt;

use virtio_bindings::virtio_blk::*;

use super::error::{ensure, Result};
use super::SECTOR_SIZE;

/// The virtio-blk config space fields this tool uses. Fields whose feature bit was not
/// negotiated are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    pub blk_size: Option<u32>,
    pub num_queues: Option<u16>,
    pub writeback: Option<u8>,
    /// The raw bytes returned by GET_CONFIG.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Decodes `struct virtio_blk_config` (little-endian) given the acked features.
    pub fn parse(raw: &[u8], features: u64) -> Result<BlkConfig> {
        ensure!(
            raw.len() >= 36,
            Backend,
            "config space too short: {} bytes",
            raw.len()
        );
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&raw[0..8]);
        Ok(BlkConfig {
            capacity: u64::from_le_bytes(cap),
            size_max: has(VIRTIO_BLK_F_SIZE_MAX).then(|| u32_at(8)),
            seg_max: has(VIRTIO_BLK_F_SEG_MAX).then(|| u32_at(12)),
            blk_size: has(VIRTIO_BLK_F_BLK_SIZE).then(|| u32_at(20)),
            writeback: has(VIRTIO_BLK_F_CONFIG_WCE).then(|| raw[32]),
            num_queues: has(VIRTIO_BLK_F_MQ).then(|| u16::from_le_bytes([raw[34], raw[35]])),
            raw: raw.to_vec(),
        })
    }

    /// Disk size in bytes (`None` if the capacity is absurd).
    pub fn size_bytes(&self) -> Option<u64> {
        self.capacity.checked_mul(SECTOR_SIZE)
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "(not negotiated)".to_string(),
    }
}

impl fmt::Display for BlkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stage 1 config:")?;
        match self.size_bytes() {
            Some(b) => writeln!(f, "  capacity: {} sectors ({b} bytes)", self.capacity)?,
            None => writeln!(
                f,
                "  capacity: {} sectors (overflows u64 bytes)",
                self.capacity
            )?,
        }
        // Without MQ the device has exactly one queue.
        match self.num_queues {
            Some(n) => writeln!(f, "  num_queues: {n}")?,
            None => writeln!(f, "  num_queues: 1 (MQ not negotiated)")?,
        }
        writeln!(f, "  seg_max: {}", opt(&self.seg_max))?;
        writeln!(f, "  size_max: {}", opt(&self.size_max))?;
        writeln!(f, "  blk_size: {}", opt(&self.blk_size))?;
        writeln!(f, "  writeback: {}", opt(&self.writeback))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::wanted_features;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    #[test]
    fn config_parsing() {
        let mut raw = vec![0u8; 60];
        raw[0..8].copy_from_slice(&10243u64.to_le_bytes());
        raw[8..12].copy_from_slice(&65536u32.to_le_bytes());
        raw[12..16].copy_from_slice(&16u32.to_le_bytes());
        raw[20..24].copy_from_slice(&512u32.to_le_bytes());
        raw[34..36].copy_from_slice(&4u16.to_le_bytes());
        let c = BlkConfig::parse(&raw, wanted_features()).unwrap();
        assert_eq!(c.capacity, 10243);
        assert_eq!(c.size_max, Some(65536));
        assert_eq!(c.seg_max, Some(16));
        assert_eq!(c.blk_size, Some(512));
        assert_eq!(c.num_queues, Some(4));
        let c = BlkConfig::parse(&raw, 1 << VIRTIO_F_VERSION_1).unwrap();
        assert_eq!((c.size_max, c.num_queues), (None, None));
        assert!(BlkConfig::parse(&raw[..10], 0).is_err());
    }
}
