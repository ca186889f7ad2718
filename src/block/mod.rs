//! The block-device layer.
//!
//! A [`BlockDevice`] is anything that stores sectors; it hands out one [`IoChannel`] per
//! virtqueue worker. Channels are asynchronous: operations are queued with [`IoChannel::add`],
//! started with [`IoChannel::submit`] and reaped with [`IoChannel::poll`]. Features such as
//! encryption or lazy fetch are devices that wrap another device's channel, the way
//! device-mapper targets stack, so the virtio front end never knows which layers are present.

mod buf;
mod crypt;
mod file;

pub use buf::{BufPool, IoBuf};
pub use crypt::CryptDevice;
pub use file::FileDevice;

use std::io;
use std::os::fd::RawFd;

pub const SECTOR_SIZE: usize = 512;
pub const SECTOR_SHIFT: u32 = 9;

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
    Flush,
    /// Deallocate; the range reads as zeros afterwards.
    Discard {
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
}

/// A finished operation: `result` is `Err(errno)` on failure.
#[derive(Debug)]
pub struct Completion {
    pub id: u64,
    pub result: Result<(), i32>,
    pub buf: Option<IoBuf>,
}

/// A per-thread, asynchronous path to a device.
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
    /// A file descriptor that becomes readable when `poll` has something to return.
    fn completion_fd(&self) -> RawFd;
}

/// A store of 512-byte sectors.
pub trait BlockDevice: Send + Sync {
    fn sectors(&self) -> u64;
    /// Creates an independent channel for one worker thread.
    fn new_channel(&self) -> io::Result<Box<dyn IoChannel>>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
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
