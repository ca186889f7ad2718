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
//!
//! One job per file: [`Stage`] (stage.rs), feature bits and their names (features.rs), the
//! config space (config.rs), request shape (geometry.rs), the shared memory and its layout
//! (memory.rs), the split virtqueue (ring.rs), the vhost-user session [`BlkFrontend`]
//! (session.rs), stage 4's copy loop (copy.rs), what each stage reports (report.rs), [`run`] (run.rs),
//! [`Error`] (error.rs) and a live migration's dirty log (log.rs, [`DirtyLog`]).

mod config;
mod copy;
mod error;
mod features;
mod geometry;
mod log;
mod memory;
mod report;
mod ring;
mod run;
mod session;
mod stage;

pub use config::BlkConfig;
pub use error::Error;
pub use features::{
    protocol_feature_names, virtio_feature_names, wanted_features, wanted_protocol_features,
};
pub use geometry::{Geometry, IoOptions};
pub use log::{DirtyLog, LOG_PAGE};
pub use memory::{Layout, SharedMemory};
pub use report::{CopyInfo, MemoryInfo, Report, SetupInfo, VirtqueueInfo};
pub use ring::status_name;
pub use run::run;
pub use session::BlkFrontend;
pub use stage::Stage;

/// Sector size of the virtio-blk protocol (capacity and request sectors are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Where the shared region starts in "guest physical" address space. Deliberately not 0, so a
/// backend that confuses guest addresses with region offsets fails loudly.
pub const GUEST_BASE: u64 = 0x4000_0000;
/// Bytes of `struct virtio_blk_config` read with GET_CONFIG (up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: u32 = 60;
