//! A minimal vhost-user-blk frontend (the VMM side), built on rust-vmm's
//! [`vhost::vhost_user::Frontend`].
//!
//! It brings a device up in stages, each building on the previous one:
//!
//! 0. [`Stage::Setup`]: connect, SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES
//!    (and GET_QUEUE_NUM when MQ was negotiated);
//! 1. [`Stage::Config`]: GET_CONFIG, decoded into a [`BlkConfig`];
//! 2. [`Stage::Memory`]: one memfd-backed "guest RAM" region shared with SET_MEM_TABLE;
//! 3. [`Stage::Virtqueue`]: a split virtqueue laid out in that memory and handed over with
//!    SET_VRING_NUM/ADDR/BASE/KICK/CALL and SET_VRING_ENABLE;
//! 4. [`Stage::Copy`]: reads the whole disk with virtio-blk IN requests, several in flight.
//!
//! The backend is not trusted: everything it returns (feature bits, config values, used ring
//! entries, lengths, status bytes) is checked, and a misbehaving backend produces an error, never
//! a panic.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Sector size of the virtio-blk protocol (capacity and request sectors are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Where the shared region starts in "guest physical" address space. Deliberately not 0, so a
/// backend that confuses guest addresses with region offsets fails loudly.
pub const GUEST_BASE: u64 = 0x4000_0000;
/// Bytes of `struct virtio_blk_config` read with GET_CONFIG (up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: u32 = 60;

const DESC_SIZE: u64 = 16;
const HEADER_LEN: u64 = 16;
/// Status value written before a request is submitted, so a backend that completes a request
/// without writing its status is caught.
const STATUS_UNSET: u8 = 0xff;

// ---------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------

/// How far to bring the device up. Each stage runs the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Setup = 0,
    Config = 1,
    Memory = 2,
    Virtqueue = 3,
    Copy = 4,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Setup,
        Stage::Config,
        Stage::Memory,
        Stage::Virtqueue,
        Stage::Copy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Config => "config",
            Stage::Memory => "memory",
            Stage::Virtqueue => "virtqueue",
            Stage::Copy => "copy",
        }
    }

    pub fn number(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;

    /// A stage number (0-4) or name (setup, config, memory, virtqueue, copy), case-insensitive.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        Stage::ALL
            .iter()
            .copied()
            .find(|st| st.name().eq_ignore_ascii_case(s) || st.number().to_string() == s)
            .ok_or_else(|| {
                format!(
                    "unknown stage {s:?}: expected 0-4 or setup, config, memory, virtqueue, copy"
                )
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Feature names
// ---------------------------------------------------------------------------------------------

const VIRTIO_FEATURE_NAMES: &[(u32, &str)] = &[
    (VIRTIO_BLK_F_BARRIER, "BARRIER"),
    (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
    (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
    (VIRTIO_BLK_F_RO, "RO"),
    (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (VIRTIO_BLK_F_SCSI, "SCSI"),
    (VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
    (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
    (VIRTIO_BLK_F_MQ, "MQ"),
    (VIRTIO_BLK_F_DISCARD, "DISCARD"),
    (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    (15, "LIFETIME"),
    (16, "SECURE_ERASE"),
    (17, "ZONED"),
    (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (30, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
];

/// Names of the set bits of a virtio feature word (virtio-blk and transport bits);
/// unknown bits show as `bit<N>`.
pub fn virtio_feature_names(bits: u64) -> Vec<String> {
    (0..64u32)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            VIRTIO_FEATURE_NAMES
                .iter()
                .find(|(bit, _)| *bit == b)
                .map(|(_, n)| n.to_string())
                .unwrap_or_else(|| format!("bit{b}"))
        })
        .collect()
}

/// Names of the set bits of a vhost-user protocol feature word.
pub fn protocol_feature_names(bits: u64) -> Vec<String> {
    let known = VhostUserProtocolFeatures::from_bits_truncate(bits);
    let mut names: Vec<String> = known.iter_names().map(|(n, _)| n.to_string()).collect();
    let unknown = bits & !known.bits();
    names.extend(
        (0..64u32)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| format!("bit{b}")),
    );
    names
}

fn fmt_features(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    bits: u64,
    names: &[String],
) -> fmt::Result {
    writeln!(f, "  {label}: {bits:#018x} [{}]", names.join(" "))
}

// ---------------------------------------------------------------------------------------------
// Stage results
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Request geometry
// ---------------------------------------------------------------------------------------------

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
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            queue_size: 128,
            depth: 16,
            request_size: 64 * 1024,
            timeout: Duration::from_secs(30),
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
            "queue size {qs} is not a power of two"
        );
        ensure!(opts.depth >= 1, "depth must be at least 1");
        ensure!(
            opts.request_size >= SECTOR_SIZE as u32
                && opts.request_size.is_multiple_of(SECTOR_SIZE as u32),
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
        ensure!(seg_len > 0, "device size_max is zero");
        chunk = chunk.min(seg_len * max_data_descs);
        if let Some(sg) = seg_max {
            chunk = chunk.min(seg_len * u64::from(sg));
        }
        chunk -= chunk % SECTOR_SIZE;
        ensure!(
            chunk >= SECTOR_SIZE,
            "device limits (size_max {:?}, seg_max {:?}) and queue size {qs} leave no room for a \
             512-byte request",
            cfg.size_max,
            cfg.seg_max
        );
        let data_descs = chunk.div_ceil(seg_len);
        let descs_per_req = data_descs + 2;
        ensure!(
            descs_per_req <= u64::from(qs),
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

// ---------------------------------------------------------------------------------------------
// Shared memory layout
// ---------------------------------------------------------------------------------------------

/// Offsets (from [`GUEST_BASE`]) of everything in the shared region.
#[derive(Debug, Clone)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub headers: u64,
    pub status: u64,
    pub data: u64,
    pub size: u64,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    pub fn new(g: &Geometry) -> Layout {
        let q = u64::from(g.queue_size);
        let desc = 0;
        let avail = desc + DESC_SIZE * q;
        // flags, idx, ring[q], used_event
        let used = align(avail + 4 + 2 * q + 2, 4096);
        // flags, idx, ring[q] of {id u32, len u32}, avail_event
        let headers = align(used + 4 + 8 * q + 2, 4096);
        let status = headers + HEADER_LEN * u64::from(g.slots);
        let data = align(status + u64::from(g.slots), 4096);
        let size = align(data + u64::from(g.chunk) * u64::from(g.slots), 4096);
        Layout {
            desc,
            avail,
            used,
            headers,
            status,
            data,
            size,
        }
    }
}

/// The "guest RAM": one memfd mapped shared, so the backend can map it too.
pub struct SharedMemory {
    pub mem: GuestMemoryMmap,
    pub info: VhostUserMemoryRegionInfo,
}

impl SharedMemory {
    pub fn new(size: u64) -> Result<SharedMemory> {
        let size = align(size.max(4096), 4096);
        // SAFETY: a valid NUL-terminated name; the returned fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).context("sizing the memfd")?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(GUEST_BASE),
            usize::try_from(size).context("memory size")?,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| anyhow!("mapping the memfd: {e:?}"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(&region)
            .map_err(|e| anyhow!("describing the memory region: {e:?}"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| anyhow!("building guest memory: {e:?}"))?;
        Ok(SharedMemory { mem, info })
    }

    /// The address of guest address `gpa` in this process (what SET_VRING_ADDR wants).
    fn user_addr(&self, gpa: u64) -> Result<u64> {
        let off = gpa
            .checked_sub(self.info.guest_phys_addr)
            .filter(|&o| o < self.info.memory_size)
            .ok_or_else(|| anyhow!("address {gpa:#x} outside guest memory"))?;
        Ok(self.info.userspace_addr + off)
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

// ---------------------------------------------------------------------------------------------
// The frontend
// ---------------------------------------------------------------------------------------------

/// Virtio feature bits this frontend can use (others are never acked).
pub fn wanted_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |acc, b| acc | 1u64 << b,
    )
}

/// Protocol features this frontend can use.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// Queue 0's state once stage 3 ran.
struct Ring {
    geometry: Geometry,
    layout: Layout,
    kick: EventFd,
    call: EventFd,
    /// Next avail index we publish (free-running).
    avail_idx: u16,
    /// Next used index we consume (free-running).
    used_idx: u16,
}

/// A connection to a vhost-user-blk backend, brought up stage by stage.
pub struct BlkFrontend {
    fe: Frontend,
    acked_features: u64,
    config: Option<BlkConfig>,
    memory: Option<SharedMemory>,
    ring: Option<Ring>,
}

fn vhost_err(what: &'static str) -> impl FnOnce(vhost::Error) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

impl BlkFrontend {
    /// Connects to `socket`, retrying for up to `timeout` while it does not exist yet or
    /// refuses connections.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<BlkFrontend> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()))
                }
            }
        };
        Ok(BlkFrontend {
            fe: Frontend::from_stream(stream, 1),
            acked_features: 0,
            config: None,
            memory: None,
            ring: None,
        })
    }

    /// The underlying rust-vmm frontend, for messages this type does not wrap.
    pub fn inner(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Stage 0: SET_OWNER, GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
    pub fn setup(&mut self) -> Result<SetupInfo> {
        self.fe.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = self.fe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        ensure!(
            offered & (1u64 << VIRTIO_F_VERSION_1) != 0,
            "backend does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
        );
        ensure!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {offered:#x})"
        );
        let acked = offered & wanted_features();
        self.fe
            .set_features(acked)
            .map_err(vhost_err("SET_FEATURES"))?;
        self.acked_features = acked;

        let proto_offered = self
            .fe
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        // Keep the raw bits, including any the vhost crate does not know.
        let proto_offered_bits = proto_offered.bits();
        let proto_acked = proto_offered & wanted_protocol_features();
        self.fe
            .set_protocol_features(proto_acked)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        if proto_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // From now on every request that has no reply of its own is acknowledged, so a
            // backend refusing something is reported at the request that caused it.
            self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if proto_acked.contains(VhostUserProtocolFeatures::MQ) {
            let n = self
                .fe
                .get_queue_num()
                .map_err(vhost_err("GET_QUEUE_NUM"))?;
            ensure!(n >= 1, "backend reports {n} queues");
            Some(n)
        } else {
            None
        };
        Ok(SetupInfo {
            features_offered: offered,
            features_acked: acked,
            protocol_offered: proto_offered_bits,
            protocol_acked: proto_acked.bits(),
            backend_queues,
        })
    }

    /// Stage 1: GET_CONFIG (at offset 0, like QEMU).
    pub fn read_config(&mut self) -> Result<BlkConfig> {
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, payload) = self
            .fe
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &buf)
            .map_err(vhost_err("GET_CONFIG"))?;
        let cfg = BlkConfig::parse(&payload, self.acked_features)?;
        ensure!(
            cfg.size_bytes().is_some(),
            "absurd capacity {} sectors",
            cfg.capacity
        );
        if let Some(n) = cfg.num_queues {
            ensure!(n >= 1, "config reports num_queues = 0");
        }
        self.config = Some(cfg.clone());
        Ok(cfg)
    }

    /// Stage 2: allocates the shared memory for the geometry `g` and sends SET_MEM_TABLE.
    pub fn setup_memory(&mut self, g: &Geometry) -> Result<MemoryInfo> {
        let layout = Layout::new(g);
        let mem = SharedMemory::new(layout.size)?;
        self.fe
            .set_mem_table(&[mem.info])
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        let info = MemoryInfo {
            guest_addr: mem.info.guest_phys_addr,
            size: mem.info.memory_size,
            user_addr: mem.info.userspace_addr,
        };
        self.memory = Some(mem);
        Ok(info)
    }

    /// Stage 3: lays out queue 0 in the shared memory and hands it to the backend.
    pub fn setup_virtqueue(&mut self, g: &Geometry) -> Result<VirtqueueInfo> {
        let mem = self
            .memory
            .as_ref()
            .ok_or_else(|| anyhow!("virtqueue stage needs the memory stage first"))?;
        let layout = Layout::new(g);
        ensure!(
            layout.size <= mem.info.memory_size,
            "memory region too small for the queue"
        );
        let base = GUEST_BASE;
        // Fresh rings: everything zero (avail/used flags and indexes included).
        let zeroes = vec![0u8; layout.headers as usize];
        mem.mem
            .write_slice(&zeroes, GuestAddress(base + layout.desc))
            .context("clearing the rings")?;
        let q = g.queue_size;
        let config = VringConfigData {
            queue_max_size: q,
            queue_size: q,
            flags: 0,
            desc_table_addr: mem.user_addr(base + layout.desc)?,
            used_ring_addr: mem.user_addr(base + layout.used)?,
            avail_ring_addr: mem.user_addr(base + layout.avail)?,
            log_addr: None,
        };
        let kick = EventFd::new(EFD_NONBLOCK).context("kick eventfd")?;
        let call = EventFd::new(EFD_NONBLOCK).context("call eventfd")?;
        self.fe
            .set_vring_num(0, q)
            .map_err(vhost_err("SET_VRING_NUM"))?;
        self.fe
            .set_vring_addr(0, &config)
            .map_err(vhost_err("SET_VRING_ADDR"))?;
        self.fe
            .set_vring_base(0, 0)
            .map_err(vhost_err("SET_VRING_BASE"))?;
        self.fe
            .set_vring_call(0, &call)
            .map_err(vhost_err("SET_VRING_CALL"))?;
        self.fe
            .set_vring_kick(0, &kick)
            .map_err(vhost_err("SET_VRING_KICK"))?;
        self.fe
            .set_vring_enable(0, true)
            .map_err(vhost_err("SET_VRING_ENABLE"))?;
        self.ring = Some(Ring {
            geometry: g.clone(),
            layout: layout.clone(),
            kick,
            call,
            avail_idx: 0,
            used_idx: 0,
        });
        Ok(VirtqueueInfo {
            index: 0,
            geometry: g.clone(),
            desc: base + layout.desc,
            avail: base + layout.avail,
            used: base + layout.used,
        })
    }

    /// One synchronous IN request for `len` bytes (a multiple of 512, at most the geometry's
    /// request size) at `sector`, after stage 3. No range check against the capacity is made
    /// here, so tests can send out-of-range requests: a non-OK status is an error that names
    /// it (e.g. "status 1 (IOERR)").
    pub fn read_sectors(&mut self, sector: u64, len: u32, timeout: Duration) -> Result<Vec<u8>> {
        let mem = self
            .memory
            .as_ref()
            .ok_or_else(|| anyhow!("reads need the memory stage first"))?;
        let ring = self
            .ring
            .as_mut()
            .ok_or_else(|| anyhow!("reads need the virtqueue stage first"))?;
        ensure!(
            len > 0 && u64::from(len).is_multiple_of(SECTOR_SIZE) && len <= ring.geometry.chunk,
            "read length {len} is not a multiple of 512 in 512..={}",
            ring.geometry.chunk
        );
        ring.submit_read(mem, 0, sector, len)?;
        ring.notify(mem)?;
        let done = ring.wait_used(mem, 1, timeout)?;
        let &[(id, used_len)] = done.as_slice() else {
            bail!("expected one completion, got {}", done.len());
        };
        ensure!(
            ring.slot_of(id)? == 0,
            "backend completed descriptor {id}, which is not in flight"
        );
        let status: u8 = mem
            .mem
            .read_obj(GuestAddress(GUEST_BASE + ring.layout.status))
            .context("reading the status byte")?;
        if status != VIRTIO_BLK_S_OK as u8 {
            bail!(
                "read of sector {sector} ({len} bytes) failed: status {} (used length {used_len})",
                status_name(status)
            );
        }
        ensure!(
            used_len == len + 1,
            "backend reported used length {used_len} for a {len}-byte read (expected {})",
            len + 1
        );
        let mut data = vec![0u8; len as usize];
        mem.mem
            .read_slice(&mut data, ring.data_addr(0))
            .context("reading request data")?;
        Ok(data)
    }

    /// Stage 4: reads the whole disk (`capacity` sectors, from stage 1) into `out`.
    /// `progress` is called with the number of bytes copied so far after each completion.
    pub fn copy_disk(
        &mut self,
        out: &File,
        timeout: Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<CopyInfo> {
        let capacity = self
            .config
            .as_ref()
            .ok_or_else(|| anyhow!("copy needs the config stage first"))?
            .capacity;
        let mem = self
            .memory
            .as_ref()
            .ok_or_else(|| anyhow!("copy needs the memory stage first"))?;
        let ring = self
            .ring
            .as_mut()
            .ok_or_else(|| anyhow!("copy needs the virtqueue stage first"))?;
        let start = Instant::now();
        let total_bytes = capacity
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| anyhow!("capacity overflows"))?;
        out.set_len(total_bytes).context("sizing the output file")?;

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
                        anyhow!("backend completed descriptor {id}, which is not in flight")
                    })?;
                in_flight -= 1;
                let status: u8 = mem
                    .mem
                    .read_obj(GuestAddress(
                        GUEST_BASE + ring.layout.status + u64::from(slot),
                    ))
                    .context("reading a status byte")?;
                if status != VIRTIO_BLK_S_OK as u8 {
                    bail!(
                        "read of sector {sector} ({len} bytes) failed: status {}",
                        status_name(status)
                    );
                }
                ensure!(
                    used_len == len + 1,
                    "backend reported used length {used_len} for a {len}-byte read at sector \
                     {sector} (expected {})",
                    len + 1
                );
                let data = &mut buf[..len as usize];
                mem.mem
                    .read_slice(data, ring.data_addr(slot))
                    .context("reading request data")?;
                out.write_all_at(data, sector * SECTOR_SIZE)
                    .with_context(|| format!("writing the output at sector {sector}"))?;
                copied += u64::from(len);
                free.push(slot);
                progress(copied);
            }
        }
        // Stop the ring the way a VMM does (the backend finishes what it has and reports where
        // it stopped), then check it consumed exactly what we made available.
        let base = self
            .fe
            .get_vring_base(0)
            .map_err(vhost_err("GET_VRING_BASE"))?;
        let ring = self.ring.take();
        if let Some(r) = &ring {
            ensure!(
                base == u32::from(r.avail_idx),
                "GET_VRING_BASE says the backend stopped at avail index {base}, but {} requests \
                 were made available",
                r.avail_idx
            );
        }
        Ok(CopyInfo {
            bytes: copied,
            sectors: capacity,
            requests,
            max_in_flight,
            elapsed: start.elapsed(),
            vring_base: Some(base),
        })
    }
}

/// A status byte as text.
pub fn status_name(s: u8) -> String {
    match u32::from(s) {
        VIRTIO_BLK_S_OK => "0 (OK)".into(),
        VIRTIO_BLK_S_IOERR => "1 (IOERR)".into(),
        VIRTIO_BLK_S_UNSUPP => "2 (UNSUPP)".into(),
        _ if s == STATUS_UNSET => format!("{s:#x} (never written by the backend)"),
        _ => format!("{s:#x} (invalid)"),
    }
}

impl Ring {
    fn desc_addr(&self, i: u16) -> GuestAddress {
        GuestAddress(GUEST_BASE + self.layout.desc + DESC_SIZE * u64::from(i))
    }

    fn data_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(
            GUEST_BASE + self.layout.data + u64::from(self.geometry.chunk) * u64::from(slot),
        )
    }

    /// The slot whose chain starts at descriptor `id`, if `id` is such a head.
    fn slot_of(&self, id: u32) -> Result<u16> {
        let per = u32::from(self.geometry.descs_per_req);
        ensure!(
            id < u32::from(self.geometry.queue_size),
            "backend returned descriptor id {id}, queue size is {}",
            self.geometry.queue_size
        );
        ensure!(
            id.is_multiple_of(per) && id / per < u32::from(self.geometry.slots),
            "backend returned descriptor id {id}, which is not the head of a request"
        );
        Ok((id / per) as u16)
    }

    fn write_desc(
        &self,
        mem: &SharedMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; DESC_SIZE as usize];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.mem
            .write_slice(&d, self.desc_addr(i))
            .context("writing a descriptor")
    }

    /// Builds an IN request for `len` bytes at `sector` in `slot` and makes it available.
    fn submit_read(&mut self, mem: &SharedMemory, slot: u16, sector: u64, len: u32) -> Result<()> {
        let g = &self.geometry;
        let head = slot * g.descs_per_req;
        let hdr_addr = GUEST_BASE + self.layout.headers + HEADER_LEN * u64::from(slot);
        let status_addr = GUEST_BASE + self.layout.status + u64::from(slot);
        let mut hdr = [0u8; HEADER_LEN as usize];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.mem
            .write_slice(&hdr, GuestAddress(hdr_addr))
            .context("writing a request header")?;
        mem.mem
            .write_obj(STATUS_UNSET, GuestAddress(status_addr))
            .context("writing a status byte")?;

        let next_flag = VRING_DESC_F_NEXT as u16;
        let write_flag = VRING_DESC_F_WRITE as u16;
        self.write_desc(mem, head, hdr_addr, HEADER_LEN as u32, next_flag, head + 1)?;
        let data = self.data_addr(slot).0;
        let mut i = head + 1;
        let mut off = 0u32;
        while off < len {
            let n = (len - off).min(g.seg_len);
            self.write_desc(
                mem,
                i,
                data + u64::from(off),
                n,
                write_flag | next_flag,
                i + 1,
            )?;
            off += n;
            i += 1;
        }
        self.write_desc(mem, i, status_addr, 1, write_flag, 0)?;

        // avail->ring[avail_idx % q] = head, then publish the new index.
        let q = g.queue_size;
        let avail = GUEST_BASE + self.layout.avail;
        let entry = avail + 4 + 2 * u64::from(self.avail_idx % q);
        mem.mem
            .write_obj(head.to_le(), GuestAddress(entry))
            .context("writing the avail ring")?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(avail + 2),
                Ordering::Release,
            )
            .context("publishing the avail index")?;
        Ok(())
    }

    /// Kicks the backend unless it asked not to be (VRING_USED_F_NO_NOTIFY), like a Linux guest.
    fn notify(&self, mem: &SharedMemory) -> Result<()> {
        // The avail index store must be visible before we look at the used flags; pairs with
        // the backend's barrier between clearing NO_NOTIFY and re-checking the avail index.
        fence(Ordering::SeqCst);
        let flags: u16 = mem
            .mem
            .load(
                GuestAddress(GUEST_BASE + self.layout.used),
                Ordering::Acquire,
            )
            .context("reading the used flags")?;
        if u16::from_le(flags) & VRING_USED_F_NO_NOTIFY as u16 == 0 {
            self.kick.write(1).context("kicking the backend")?;
        }
        Ok(())
    }

    /// Waits (on the call eventfd, up to `timeout` without progress) until the backend put at
    /// least one entry on the used ring; returns the new (id, len) entries.
    fn wait_used(
        &mut self,
        mem: &SharedMemory,
        in_flight: usize,
        timeout: Duration,
    ) -> Result<Vec<(u32, u32)>> {
        let used = GUEST_BASE + self.layout.used;
        let deadline = Instant::now() + timeout;
        loop {
            let idx: u16 = mem
                .mem
                .load(GuestAddress(used + 2), Ordering::Acquire)
                .context("reading the used index")?;
            let idx = u16::from_le(idx);
            let new = idx.wrapping_sub(self.used_idx);
            if new > 0 {
                ensure!(
                    usize::from(new) <= in_flight,
                    "backend advanced the used index by {new} with only {in_flight} requests in \
                     flight (used idx {} -> {idx})",
                    self.used_idx
                );
                let q = self.geometry.queue_size;
                let mut out = Vec::with_capacity(usize::from(new));
                for _ in 0..new {
                    let elem = used + 4 + 8 * u64::from(self.used_idx % q);
                    let mut e = [0u8; 8];
                    mem.mem
                        .read_slice(&mut e, GuestAddress(elem))
                        .context("reading the used ring")?;
                    let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                    let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                    out.push((id, len));
                    self.used_idx = self.used_idx.wrapping_add(1);
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the backend to complete any of \
                     {in_flight} requests (avail idx {}, used idx {idx})",
                    self.avail_idx
                );
            }
            wait_readable(&self.call, deadline - now)?;
            // Consume the notification; the used index is re-read above either way.
            match self.call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("reading the call eventfd"),
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passed.
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).context("poll on the call eventfd");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running the stages
// ---------------------------------------------------------------------------------------------

/// Everything [`run`] learned, one entry per stage that ran.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub setup: Option<SetupInfo>,
    pub config: Option<BlkConfig>,
    pub memory: Option<MemoryInfo>,
    pub virtqueue: Option<VirtqueueInfo>,
    pub copy: Option<CopyInfo>,
}

/// Runs stages 0..=`stage` against `socket`. `output` is required for [`Stage::Copy`].
/// `print` receives each stage's report as soon as the stage completes.
pub fn run(
    socket: &Path,
    stage: Stage,
    output: Option<&Path>,
    opts: &IoOptions,
    mut print: impl FnMut(&str),
) -> Result<Report> {
    let out = if stage >= Stage::Copy {
        let path = output.ok_or_else(|| anyhow!("the copy stage needs --output FILE"))?;
        Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )
    } else {
        None
    };
    let mut report = Report::default();
    let mut fe = BlkFrontend::connect(socket, opts.timeout)?;
    print(&format!("connected to {}\n", socket.display()));

    let s = fe.setup().context("stage 0 (setup)")?;
    print(&s.to_string());
    report.setup = Some(s);
    if stage == Stage::Setup {
        return Ok(report);
    }

    let cfg = fe.read_config().context("stage 1 (config)")?;
    print(&cfg.to_string());
    report.config = Some(cfg.clone());
    if stage == Stage::Config {
        return Ok(report);
    }

    let geometry = Geometry::new(opts, &cfg)?;
    let m = fe.setup_memory(&geometry).context("stage 2 (memory)")?;
    print(&m.to_string());
    report.memory = Some(m);
    if stage == Stage::Memory {
        return Ok(report);
    }

    let v = fe
        .setup_virtqueue(&geometry)
        .context("stage 3 (virtqueue)")?;
    print(&v.to_string());
    report.virtqueue = Some(v);
    if stage == Stage::Virtqueue {
        return Ok(report);
    }

    let out = out.ok_or_else(|| anyhow!("the copy stage needs --output FILE"))?;
    let c = fe
        .copy_disk(&out, opts.timeout, |_| {})
        .context("stage 4 (copy)")?;
    out.sync_all().context("syncing the output file")?;
    print(&c.to_string());
    report.copy = Some(c);
    Ok(report)
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
    fn stage_parsing() {
        assert_eq!("0".parse::<Stage>().unwrap(), Stage::Setup);
        assert_eq!("Copy".parse::<Stage>().unwrap(), Stage::Copy);
        assert_eq!("virtqueue".parse::<Stage>().unwrap(), Stage::Virtqueue);
        assert_eq!("3".parse::<Stage>().unwrap(), Stage::Virtqueue);
        assert!("5".parse::<Stage>().is_err());
        assert!("nope".parse::<Stage>().is_err());
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

    #[test]
    fn feature_names() {
        let n = virtio_feature_names(1 << 32 | 1 << 2 | 1 << 63);
        assert_eq!(n, vec!["SEG_MAX", "VERSION_1", "bit63"]);
        let p = protocol_feature_names(
            (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG).bits(),
        );
        assert!(p.contains(&"MQ".to_string()) && p.contains(&"CONFIG".to_string()));
    }

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
