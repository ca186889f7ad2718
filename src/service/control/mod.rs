//! The control socket (`control_socket`): a unix stream socket taking one command per line,
//! for any disk.
//!
//! `status` answers one line of JSON: the device's facts, whether a frontend is connected,
//! whether this backend has the disk (`disk_owner`, see [`super::handover`]), and with lazy
//! fetch its progress ([`LazyStatus`], flattened in); `stats` one line of JSON with
//! the request statistics per queue and in total ([`crate::virtio_blk::stats`]); `metrics` the same and
//! `status`'s numbers in the Prometheus text exposition format, several lines ending with a
//! line `# EOF`; `qos` the I/O limits in force (every field of `qos:`, `null` when not
//! limited); `set-qos {JSON}` replaces them all with the object's (fields left out: no limit),
//! checked as the config's are, and answers the new limits (a problem answers `{"error":...}`
//! naming it, and nothing changes); `resize {"size_bytes":N}` / `resize {}` grows the disk
//! ([`crate::service::resize`]) and answers the new size, or an error with the limits;
//! with `stripe_server`, `move-status` answers whether a move is under way and whether a VM's
//! rings run, and `move-end` declares the move over or cancelled (a VM may start again);
//! anything else answers `{"error":"unknown command",...}`.
//! Connections are served one thread each, at most [`MAX_CONNECTIONS`] at once (more are
//! closed unanswered); a client may send several commands, and one silent for [`IO_TIMEOUT`] is
//! disconnected. The data path never waits for it: the answers read atomics and short-lived
//! locks the queues do not take (`set-qos` takes the limits' lock, which queues take while
//! something is limited).

mod commands;
mod metrics;
mod server;

pub use server::{serve, IO_TIMEOUT, MAX_CONNECTIONS};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::block::{Capacity, Qos};
use crate::lazy::LazyDevice;
use crate::sys::socket::SocketError;
use crate::virtio_blk::stats::DeviceStats;

/// What the control socket reports on and acts upon: one disk's backend.
pub struct Control {
    pub facts: DeviceFacts,
    /// When the backend started (for `uptime_secs`).
    pub started: Instant,
    /// Whether a frontend (VMM) is connected; the vhost loop keeps it current.
    pub connected: Arc<AtomicBool>,
    /// The lazy-fetch layer, with a source.
    pub lazy: Option<Arc<LazyDevice>>,
    /// The queues' request statistics.
    pub stats: Arc<DeviceStats>,
    /// The disk's I/O limits (`qos`, `set-qos`).
    pub qos: Option<Arc<Qos>>,
    /// The disk's current size (`status`'s `size_bytes`, which `resize` grows).
    pub capacity: Capacity,
    /// What `resize` acts on (`None`: `resize` is refused).
    pub resizer: Option<Arc<super::resize::Resizer>>,
    /// The disk's lock between backends (`status`'s `disk_owner`; `None`: always the owner).
    pub owner: Option<Arc<super::handover::DiskLock>>,
    /// The one-point-in-time gate between the VM's rings and the stripe server
    /// (`move-status`, `move-end`); `None` without `stripe_server`.
    pub gate: Option<Arc<crate::stripe::MoveGate>>,
}

/// What the config and the opened stack say about the device (the size is `capacity`).
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub device_id: String,
    pub num_queues: u16,
    pub readonly: bool,
    pub encrypted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `control_socket` could not be claimed (the error names the field).
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot start the control socket thread")]
    Thread(#[source] std::io::Error),
}

#[cfg(test)]
mod tests;
