//! ubiblk: block-device utilities for virtual machines.
//!
//! The crate reads bottom-up: a module uses only modules listed above it in this list
//! (`scripts/structure-check` refuses an import cycle between them).
//!
//! System helpers
//! - [`sys`]: unix sockets, CPU affinity, rate-limited logging, YAML error text.
//!
//! The data path, from storage up to the VMM
//! - [`crypto`]: AES-XTS for the disk (AES-NI / VAES kernels) and the key files.
//! - [`remote`]: object stores and HTTP/S3 clients, with their retry and timeout settings.
//! - [`archive`]: disk archives: encrypted, compressed chunks and a signed manifest.
//! - [`block`]: the block-device trait and its layers (file, encryption, QoS, debug log).
//! - [`stripe`]: moving a disk host to host: the remote stripe protocol (TLS-PSK), its server,
//!   and the gate between a VM's rings and a copy.
//! - [`lazy`]: the lazy-fetch layer, its metadata and its stripe sources (file, HTTP, S3,
//!   archive).
//! - [`virtio_blk`]: virtio-blk request parsing, the per-queue worker and its statistics.
//! - [`vhost`]: the vhost-user backend that connects a VMM to the workers.
//!
//! Configuration and the service around the data path
//! - [`config`]: the YAML options, validated with errors that name the field.
//! - [`service`]: the backend daemon: the layer stack a config asks for, the socket it
//!   listens on, the control socket, systemd notification, signals, and the binaries'
//!   start-up.
//! - [`tools`]: the library side of the offline tools (`replay-log`, `archive`).
//!
//! Beside the stack
//! - [`frontend`]: a vhost-user-blk frontend (`vhost-frontend`), for checks and benchmarks;
//!   it uses nothing else of the crate.

pub mod sys;

pub mod archive;
pub mod block;
pub mod crypto;
pub mod lazy;
pub mod remote;
pub mod stripe;
pub mod vhost;
pub mod virtio_blk;

pub mod config;
pub mod service;
pub mod tools;

pub mod frontend;

/// The virtio-blk sector: the unit of every offset on the data path, and the XTS data unit.
pub const SECTOR_SIZE: usize = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
