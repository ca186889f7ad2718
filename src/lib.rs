//! ubiblk: block-device utilities for virtual machines.
//!
//! - [`block`]: the block-device trait and its layers (the data path's storage side).
//! - [`virtio_blk`]: virtio-blk request parsing and the per-queue worker.
//! - [`vhost`]: the vhost-user plumbing that connects a VMM to the workers.
//! - [`config`]: the YAML options.
//! - [`stack`]: the layers a config asks for, assembled into the device the VMM is shown.
//! - [`cli`]: start-up shared by the binaries.
//! - [`sockpath`]: claiming and releasing the unix socket paths the backend listens on.

pub mod affinity;
pub mod archive;
pub mod block;
pub mod cli;
pub mod config;
pub mod control;
pub mod crypto;
pub mod frontend;
pub mod lazy;
pub mod notify;
pub mod ratelog;
pub mod remote;
pub mod replay;
pub mod sockpath;
pub mod stack;
pub mod stats;
pub mod vhost;
pub mod virtio_blk;
mod yaml;
