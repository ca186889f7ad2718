//! What each stage negotiated or did, as printed.

use std::fmt;
use std::time::Duration;

use super::features::fmt_features;
use super::{protocol_feature_names, virtio_feature_names, BlkConfig, Geometry};

/// What stage 0 negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupInfo {
    pub features_offered: u64,
    pub features_acked: u64,
    pub protocol_offered: u64,
    pub protocol_acked: u64,
    /// GET_QUEUE_NUM's answer, when MQ was negotiated.
    pub backend_queues: Option<u64>,
}

impl fmt::Display for SetupInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stage 0 setup:")?;
        fmt_features(
            f,
            "virtio features offered",
            self.features_offered,
            &virtio_feature_names(self.features_offered),
        )?;
        fmt_features(
            f,
            "virtio features acked",
            self.features_acked,
            &virtio_feature_names(self.features_acked),
        )?;
        fmt_features(
            f,
            "protocol features offered",
            self.protocol_offered,
            &protocol_feature_names(self.protocol_offered),
        )?;
        fmt_features(
            f,
            "protocol features acked",
            self.protocol_acked,
            &protocol_feature_names(self.protocol_acked),
        )?;
        match self.backend_queues {
            Some(n) => writeln!(f, "  backend queues: {n}"),
            None => writeln!(f, "  backend queues: (MQ not negotiated)"),
        }
    }
}
/// What stage 2 set up.
#[derive(Debug, Clone)]
pub struct MemoryInfo {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
}

impl fmt::Display for MemoryInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stage 2 memory:")?;
        writeln!(
            f,
            "  region: guest {:#x}..{:#x} ({} bytes, memfd, mapped at {:#x})",
            self.guest_addr,
            self.guest_addr + self.size,
            self.size,
            self.user_addr
        )
    }
}

/// What stage 3 set up.
#[derive(Debug, Clone)]
pub struct VirtqueueInfo {
    pub index: usize,
    pub geometry: Geometry,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl fmt::Display for VirtqueueInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.geometry;
        writeln!(f, "stage 3 virtqueue:")?;
        writeln!(
            f,
            "  queue {}: size {}, desc {:#x}, avail {:#x}, used {:#x} (guest addresses), enabled",
            self.index, g.queue_size, self.desc, self.avail, self.used
        )?;
        writeln!(
            f,
            "  requests: up to {} in flight x {} bytes ({} data descriptor(s) of <= {} bytes)",
            g.slots, g.chunk, g.data_descs, g.seg_len
        )
    }
}

/// What stage 4 did.
#[derive(Debug, Clone)]
pub struct CopyInfo {
    pub bytes: u64,
    pub sectors: u64,
    pub requests: u64,
    pub max_in_flight: usize,
    pub elapsed: Duration,
    /// GET_VRING_BASE's answer after the copy (the backend's next avail index).
    pub vring_base: Option<u32>,
}

impl fmt::Display for CopyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let mibs = if secs > 0.0 {
            self.bytes as f64 / secs / (1024.0 * 1024.0)
        } else {
            0.0
        };
        writeln!(f, "stage 4 copy:")?;
        writeln!(
            f,
            "  copied: {} bytes ({} sectors) in {} requests, up to {} in flight, {:.3} s ({:.1} MiB/s)",
            self.bytes, self.sectors, self.requests, self.max_in_flight, secs, mibs
        )?;
        if let Some(b) = self.vring_base {
            writeln!(f, "  vring base after stop: {b}")?;
        }
        Ok(())
    }
}
/// Everything [`run`](super::run) learned, one entry per stage that ran.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub setup: Option<SetupInfo>,
    pub config: Option<BlkConfig>,
    pub memory: Option<MemoryInfo>,
    pub virtqueue: Option<VirtqueueInfo>,
    pub copy: Option<CopyInfo>,
}
