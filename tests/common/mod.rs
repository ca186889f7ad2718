//! Shared helpers for integration tests and benchmarks, one concern per module:
//!
//! * [`process`]: [`ChildGuard`], a child process killed on drop, and [`CpuHogs`].
//! * [`backend`]: [`Backend`] starts `vhost-backend --config <yaml>` ([`BackendConfig`]) and
//!   kills it on drop.
//! * [`qsd`]: [`Qsd`] / [`start_qsd`], the same for `qemu-storage-daemon` (reference backend).
//! * [`client`] and [`queue`]: [`Client`], a userspace virtio-blk driver (libblkio,
//!   `virtio-blk-vhost-user`) connected to a vhost-user-blk socket, with synchronous helpers
//!   and a low-level submit/reap API ([`QueueIo`]) for issuing many requests in flight.
//! * [`control`]: the control socket ([`ControlStatus`], [`control_command`]).
//! * [`images`]: pattern-filled disks, the files of a lazy disk, scratch directories.
//! * [`migrate`]: live migration of the test guest between QEMUs ([`migrate()`]).
//! * [`require`]: tests that need a tool (QEMU, nginx, Garage, ...) skip without it, or fail
//!   when `UBIBLK_REQUIRE_ALL=1` ([`require()`]).
//! * [`servers`]: real HTTP (nginx) and S3 (Garage) servers for the remote-source tests.
//!
//! Everything but [`servers`] is re-exported here, so `use common::*;` brings it all in.
//! Include from a bench with `#[path = "../tests/common/mod.rs"] mod common;`.

#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod control;
pub mod images;
pub mod migrate;
pub mod process;
pub mod qsd;
pub mod queue;
pub mod require;
pub mod servers;

// A binary that uses none of a module's items would warn about its re-export.
#[allow(unused_imports)]
pub use {
    backend::*, client::*, control::*, images::*, migrate::*, process::*, qsd::*, queue::*,
    require::*,
};
