//! The shape of requests: user options capped by the device's limits.

use std::time::Duration;

use super::error::{ensure, Result};
use super::{BlkConfig, SECTOR_SIZE};

/// User-chosen I/O parameters.
#[derive(Debug, Clone)]
pub struct IoOptions {
    /// Descriptors in the virtqueue (power of two).
    pub queue_size: u16,
    /// Most requests in flight.
    pub depth: usize,
    /// Largest data transfer of one request, in bytes (multiple of 512).
    pub request_size: u32,
    /// How long to wait for any completion before giving up.
    pub timeout: Duration,
    /// Refuse a read's used length of 0 (see [`crate::frontend::BlkFrontend::set_strict`]).
    pub strict: bool,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            queue_size: 128,
            depth: 16,
            request_size: 64 * 1024,
            timeout: Duration::from_secs(30),
            strict: false,
        }
    }
}

/// How requests are shaped, derived from [`IoOptions`] and the device's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub queue_size: u16,
    /// Data bytes of a full request.
    pub chunk: u32,
    /// Largest data descriptor.
    pub seg_len: u32,
    /// Data descriptors of a full request.
    pub data_descs: u16,
    /// Descriptors reserved per request slot: header + data + status.
    pub descs_per_req: u16,
    /// Request slots (= most requests in flight).
    pub slots: u16,
}

impl Geometry {
    pub fn new(opts: &IoOptions, cfg: &BlkConfig) -> Result<Geometry> {
        let qs = opts.queue_size;
        ensure!(
            qs.is_power_of_two(),
            Options,
            "queue size {qs} is not a power of two"
        );
        ensure!(opts.depth >= 1, Options, "depth must be at least 1");
        ensure!(
            opts.request_size >= SECTOR_SIZE as u32
                && opts.request_size.is_multiple_of(SECTOR_SIZE as u32),
            Options,
            "request size {} is not a positive multiple of 512",
            opts.request_size
        );
        // size_max = 0 or seg_max = 0 from the device are treated as "no limit given".
        let size_max = cfg.size_max.filter(|&s| s > 0);
        let seg_max = cfg.seg_max.filter(|&s| s > 0);
        let mut chunk = u64::from(opts.request_size);
        if let (Some(sz), Some(sg)) = (size_max, seg_max) {
            chunk = chunk.min(u64::from(sz) * u64::from(sg));
        }
        // Each request may use at most queue_size - 2 data descriptors.
        let max_data_descs = u64::from(qs).saturating_sub(2).max(1);
        let seg_len = size_max.map_or(chunk, |s| u64::from(s).min(chunk));
        ensure!(seg_len > 0, Options, "device size_max is zero");
        chunk = chunk.min(seg_len * max_data_descs);
        if let Some(sg) = seg_max {
            chunk = chunk.min(seg_len * u64::from(sg));
        }
        chunk -= chunk % SECTOR_SIZE;
        ensure!(
            chunk >= SECTOR_SIZE,
            Options,
            "device limits (size_max {:?}, seg_max {:?}) and queue size {qs} leave no room for a \
             512-byte request",
            cfg.size_max,
            cfg.seg_max
        );
        let data_descs = chunk.div_ceil(seg_len);
        let descs_per_req = data_descs + 2;
        ensure!(
            descs_per_req <= u64::from(qs),
            Options,
            "a request needs {descs_per_req} descriptors but the queue has {qs}"
        );
        let slots = (u64::from(qs) / descs_per_req)
            .min(opts.depth as u64)
            .max(1);
        Ok(Geometry {
            queue_size: qs,
            chunk: chunk as u32,
            seg_len: seg_len as u32,
            data_descs: data_descs as u16,
            descs_per_req: descs_per_req as u16,
            slots: slots as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size_max: Option<u32>, seg_max: Option<u32>) -> BlkConfig {
        BlkConfig {
            capacity: 1000,
            size_max,
            seg_max,
            blk_size: Some(512),
            num_queues: Some(1),
            writeback: None,
            raw: Vec::new(),
        }
    }

    #[test]
    fn geometry_respects_device_limits() {
        let o = IoOptions::default();
        let g = Geometry::new(&o, &cfg(Some(65536), Some(16))).unwrap();
        assert_eq!(
            (g.chunk, g.seg_len, g.data_descs, g.slots),
            (65536, 65536, 1, 16)
        );
        // Small segments: more descriptors per request, fewer requests fit the ring.
        let g = Geometry::new(&o, &cfg(Some(4096), Some(16))).unwrap();
        assert_eq!(
            (g.chunk, g.seg_len, g.data_descs, g.descs_per_req),
            (65536, 4096, 16, 18)
        );
        assert_eq!(g.slots, 128 / 18);
        // seg_max * size_max below the request size caps the request.
        let g = Geometry::new(&o, &cfg(Some(4096), Some(2))).unwrap();
        assert_eq!((g.chunk, g.data_descs), (8192, 2));
        // No limits given.
        let g = Geometry::new(&o, &cfg(None, None)).unwrap();
        assert_eq!((g.chunk, g.data_descs), (65536, 1));
        // Size_max not a multiple of 512.
        let g = Geometry::new(&o, &cfg(Some(1000), Some(3))).unwrap();
        assert_eq!(g.chunk, 2560);
        assert_eq!(g.data_descs, 3);
        // Tiny segments that cannot carry a sector in seg_max pieces.
        assert!(Geometry::new(&o, &cfg(Some(100), Some(2))).is_err());
        assert!(Geometry::new(
            &IoOptions {
                queue_size: 100,
                ..o.clone()
            },
            &cfg(None, None)
        )
        .is_err());
    }
}
