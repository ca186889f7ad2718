//! The block-device layer.
//!
//! A [`BlockDevice`] is anything that stores sectors; it hands out one [`IoChannel`] per
//! virtqueue worker. Channels are asynchronous: operations are queued with [`IoChannel::add`],
//! started with [`IoChannel::submit`] and reaped with [`IoChannel::poll`]. Features such as
//! encryption or lazy fetch are devices that wrap another device's channel, the way
//! device-mapper targets stack, so the virtio front end never knows which layers are present.
//! A layer says what it does to operations going down and completions coming up ([`Layer`]);
//! [`LayerChannel`] does the forwarding. Every channel of a stack signals one [`Notifier`].

mod buf;
mod crypt;
pub mod debuglog;
mod file;
mod inline;
mod layer;
mod notifier;
mod qos;
mod slab;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use buf::{BufPool, IoBuf};
pub use crypt::CryptDevice;
pub use debuglog::DebugLogDevice;
pub use file::{check_disk_kind, device_size, Capacity, FileDevice, MAX_DISK_BYTES};
pub use layer::{Below, Layer, LayerChannel};
pub use notifier::Notifier;
pub use qos::limits::{
    QosGroup, QosInvalid, QosKind, QosLimits, QOS_FIELDS, QOS_MAX_LENGTH, QOS_PATHS, QOS_VALUE_MAX,
};
pub use qos::{Qos, QosDevice};
pub use slab::Slab;

use std::any::Any;
use std::io;
use std::sync::Arc;

pub use crate::{SECTOR_SHIFT, SECTOR_SIZE};

/// One operation on a channel. Data operations own their buffer while in flight and give it
/// back in the [`Completion`].
#[derive(Debug)]
pub enum IoOp {
    Read {
        sector: u64,
        buf: IoBuf,
    },
    Write {
        sector: u64,
        buf: IoBuf,
    },
    /// Read straight into caller memory (no bounce copy); see [`BlockDevice::iovec_align`].
    ReadVec {
        sector: u64,
        iov: IoVecs,
    },
    /// Write straight from caller memory.
    WriteVec {
        sector: u64,
        iov: IoVecs,
    },
    Flush,
    /// Deallocate; the range reads back as unspecified data (zeros on a file, not through
    /// encryption), as virtio allows.
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
}

/// Memory outside our own buffers (the guest's) handed to the device for one operation.
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    len: usize,
    /// Keeps the mapping the vectors point into alive until the operation is done.
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the vectors are plain addresses, only dereferenced by the kernel while `_owner`
// keeps them mapped; nothing in this process reads through them.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// # Safety
    /// Every vector must stay valid for reads and writes for as long as `owner` lives.
    pub unsafe fn new(iov: Vec<libc::iovec>, owner: Arc<dyn Any + Send + Sync>) -> Self {
        let len = iov.iter().map(|v| v.iov_len).sum();
        IoVecs {
            iov,
            len,
            _owner: owner,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The same vectors, keeping the same memory mapped: for a layer that hands the vectors
    /// down and works on the memory itself once the device below is done with it.
    pub fn duplicate(&self) -> IoVecs {
        IoVecs {
            iov: self.iov.clone(),
            len: self.len,
            _owner: self._owner.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iov
    }
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoVecs({} vectors, {} bytes)", self.iov.len(), self.len)
    }
}

/// A finished operation: `result` is `Err(errno)` on failure.
#[derive(Debug)]
pub struct Completion {
    pub id: u64,
    pub result: Result<(), i32>,
    pub buf: Option<IoBuf>,
}

/// A per-thread, asynchronous path to a device.
///
/// Operations lie within [`BlockDevice::sectors`] (the virtio layer checks every request); a
/// read reaching past the end fails rather than returning made-up data.
pub trait IoChannel: Send {
    /// Queues `op`; it is started no later than the next [`IoChannel::submit`].
    fn add(&mut self, id: u64, op: IoOp);
    /// Starts every queued operation.
    fn submit(&mut self) -> io::Result<()>;
    /// Appends finished operations to `out` without blocking.
    fn poll(&mut self, out: &mut Vec<Completion>);
    /// Blocks until at least one operation finishes (or none is in flight).
    fn wait(&mut self) -> io::Result<()>;
    /// Operations added but not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// Signalled when an operation below finishes: the notifier the channel was created with
    /// (see [`BlockDevice::new_channel_with`]). Operations a layer finishes during `add`
    /// (refused ones) are returned by the next `poll` without a signal: callers poll after
    /// `submit`.
    fn notifier(&self) -> &Notifier;
}

/// A store of 512-byte sectors.
pub trait BlockDevice: Send + Sync {
    fn sectors(&self) -> u64;
    /// Creates an independent channel for one worker thread, which signals `notifier` when
    /// it has completions. A layer hands the same notifier to the channels it opens below.
    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>>;
    /// [`BlockDevice::new_channel_with`] a notifier of its own.
    fn new_channel(&self) -> io::Result<Box<dyn IoChannel>> {
        self.new_channel_with(Notifier::new()?)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// If the device takes [`IoOp::ReadVec`] / [`IoOp::WriteVec`], the alignment their vectors'
    /// addresses and lengths need. Layers that transform data keep the default: `None`.
    fn iovec_align(&self) -> Option<usize> {
        None
    }
}

/// Runs one operation to completion on `channel`; for tools and tests, not the data path.
pub fn run_sync(channel: &mut dyn IoChannel, op: IoOp) -> (Result<(), i32>, Option<IoBuf>) {
    const ID: u64 = u64::MAX;
    channel.add(ID, op);
    let mut done = Vec::new();
    loop {
        if let Err(e) = channel.submit() {
            return (Err(e.raw_os_error().unwrap_or(libc::EIO)), None);
        }
        channel.poll(&mut done);
        if let Some(pos) = done.iter().position(|c| c.id == ID) {
            let c = done.swap_remove(pos);
            return (c.result, c.buf);
        }
        if let Err(e) = channel.wait() {
            return (Err(e.raw_os_error().unwrap_or(libc::EIO)), None);
        }
    }
}
