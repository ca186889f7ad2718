//! The I/O debug log layer (`io_debug_path`): records every completed READ and WRITE, with its
//! data, in a text file that `replay-log` can apply to (and check against) another disk.
//!
//! # Format
//!
//! (Written by [`format::format_record`], parsed by [`format::LogReader`].)
//!
//! Plain ASCII, one record per operation, four lines each:
//!
//! ```text
//! WRITE            (or READ)
//! 2048             start sector, decimal
//! 4096             length in bytes, decimal
//! 00ff10...        the data, lowercase hex without separators (length * 2 characters)
//! ```
//!
//! # What is logged, and when
//!
//! - Only operations that *succeeded* are logged: a failed READ returned no data and a failed
//!   WRITE left the disk in an unknown state, so neither can be replayed or checked.
//! - WRITE data is captured as received from the guest (when the operation is added, before
//!   any lower layer such as encryption touches the buffer) and the record is appended when the
//!   write completes. READ records are appended when the read completes, with the data the guest
//!   gets. Either way the record is in the file before the guest sees the completion, so
//!   operations that the guest orders (a read issued after a write completed) appear in the log
//!   in that order. Requests that are in flight at the same time on different queues are logged
//!   in completion order; if they overlap, the disk's result is unspecified anyway.
//! - FLUSH, DISCARD and WRITE_ZEROES pass through unlogged (the format has no record for them),
//!   so a replay does not reproduce their effect.
//!
//! This layer sits above the encryption layer: the log holds the guest's **plaintext**.
//!
//! Records from all queues go through one shared, append-mode file; each record is formatted
//! first and written with one `write_all` under a lock, so records never interleave. If writing
//! fails (e.g. the disk is full) the error is logged and the debug log stops for good, so the
//! file ends with at most one truncated record, which `replay-log` skips with a warning; guest
//! I/O is not affected. Each record reaches the file (the page cache) before its request
//! completes, so it survives a crash of the backend; the file is fsynced by [`BlockDevice::sync`]
//! (at shutdown), not on every guest FLUSH.

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{
    Below, BlockDevice, Completion, IoBuf, IoChannel, IoOp, Layer, LayerChannel, Notifier, Slab,
    SECTOR_SIZE,
};
use format::{format_record, OpKind};

/// The shared log file.
struct LogFile {
    file: Mutex<File>,
    path: String,
    /// Set after a failed write: nothing more is logged.
    broken: AtomicBool,
}

impl LogFile {
    fn append(&self, record: &str) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: a record must not follow a partly written one.
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = file.write_all(record.as_bytes()) {
            self.broken.store(true, Ordering::Relaxed);
            log::error!(
                "io_debug_path: cannot write {}: {e}; the I/O debug log stops here",
                self.path
            );
        }
    }
}

/// Logs the READs and WRITEs of the device it wraps; see the module documentation.
pub struct DebugLogDevice {
    inner: Arc<dyn BlockDevice>,
    log: Arc<LogFile>,
}

impl DebugLogDevice {
    /// Opens `path` for appending (creating it with mode 0600 if needed); records are added
    /// after any existing content.
    pub fn new(inner: Arc<dyn BlockDevice>, path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            // The log holds guest plaintext: private to the backend's user when we create it.
            .mode(0o600)
            .open(path)?;
        Ok(DebugLogDevice {
            inner,
            log: Arc::new(LogFile {
                file: Mutex::new(file),
                path: path.display().to_string(),
                broken: AtomicBool::new(false),
            }),
        })
    }
}

impl BlockDevice for DebugLogDevice {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }

    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
        let layer = DebugLog {
            log: self.log.clone(),
            ops: Slab::default(),
        };
        let below = self.inner.new_channel_with(notifier)?;
        Ok(Box::new(LayerChannel::new(layer, below)))
    }

    fn sync(&self) -> io::Result<()> {
        // Called at shutdown: make the log durable too (guest FLUSHes do not sync it). A
        // failure here is reported but does not fail the disk's sync.
        let file = self.log.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.sync_data() {
            log::error!("io_debug_path: cannot sync {}: {e}", self.log.path);
        }
        drop(file);
        self.inner.sync()
    }

    // `iovec_align` stays `None`: the worker then always hands us READ/WRITE with our own
    // buffers, whose data we can log without touching guest memory.
}

enum Kind {
    /// Log the buffer that comes back, read from this sector.
    Read(u64),
    /// The formatted record of a write, appended if it succeeds.
    Write(String),
    /// Pass through unlogged.
    Other,
}

struct Op {
    id: u64,
    kind: Kind,
}

/// The debug log layer's side of a channel.
struct DebugLog {
    log: Arc<LogFile>,
    /// Our operations in flight, indexed by the id we give them below.
    ops: Slab<Op>,
}

fn sector_aligned(buf: &IoBuf) -> bool {
    buf.len().is_multiple_of(SECTOR_SIZE)
}

impl Layer for DebugLog {
    fn add(&mut self, below: &mut Below, id: u64, op: IoOp) {
        let (kind, op) = match op {
            IoOp::Read { sector, buf } if sector_aligned(&buf) => {
                (Kind::Read(sector), IoOp::Read { sector, buf })
            }
            IoOp::Write { sector, buf } if sector_aligned(&buf) => {
                // Captured now: a layer below (encryption) may transform the buffer in place.
                let record = format_record(OpKind::Write, sector, &buf);
                (Kind::Write(record), IoOp::Write { sector, buf })
            }
            // Never sent to us (iovec_align is None); guest memory is not ours to log. Partial
            // sectors cannot be expressed in the log either.
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => {
                return below.finish(id, Err(libc::EINVAL), Some(buf));
            }
            IoOp::ReadVec { .. } | IoOp::WriteVec { .. } => {
                return below.finish(id, Err(libc::EINVAL), None);
            }
            op @ (IoOp::Flush | IoOp::Discard { .. } | IoOp::WriteZeroes { .. }) => {
                (Kind::Other, op)
            }
        };
        let key = self.ops.insert(Op { id, kind });
        below.add(key as u64, op);
    }

    fn reap(&mut self, c: Completion, out: &mut Vec<Completion>) {
        let Some(op) = self.ops.remove(c.id as usize) else {
            return;
        };
        if c.result.is_ok() {
            match (&op.kind, &c.buf) {
                (Kind::Read(sector), Some(buf)) => {
                    self.log.append(&format_record(OpKind::Read, *sector, buf));
                }
                (Kind::Write(record), _) => self.log.append(record),
                _ => {}
            }
        }
        out.push(Completion {
            id: op.id,
            result: c.result,
            buf: c.buf,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{run_sync, FileDevice};

    #[test]
    fn logs_successful_reads_and_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![0u8; 64 * 1024]).unwrap();
        let log = dir.path().join("io.log");
        std::fs::write(&log, "").unwrap();
        let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, false, 8).unwrap());
        let dev = DebugLogDevice::new(file, &log).unwrap();
        let mut ch = dev.new_channel().unwrap();

        let mut buf = IoBuf::new(1024);
        buf.fill(0x5a);
        let (r, _) = run_sync(ch.as_mut(), IoOp::Write { sector: 3, buf });
        r.unwrap();
        let (r, _) = run_sync(ch.as_mut(), IoOp::Flush);
        r.unwrap();
        let (r, buf) = run_sync(
            ch.as_mut(),
            IoOp::Read {
                sector: 2,
                buf: IoBuf::new(1024),
            },
        );
        r.unwrap();
        assert_eq!(buf.as_deref().map(|b| &b[..512]), Some(&[0u8; 512][..]));
        // Fails below (the file is open read-only there), so it is not logged.
        let ro: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, true, 8).unwrap());
        let ro = DebugLogDevice::new(ro, &log).unwrap();
        let (r, _) = run_sync(
            ro.new_channel().unwrap().as_mut(),
            IoOp::Write {
                sector: 0,
                buf: IoBuf::new(512),
            },
        );
        assert!(r.is_err());
        // Partial sector: refused.
        let (r, _) = run_sync(
            ch.as_mut(),
            IoOp::Read {
                sector: 0,
                buf: IoBuf::new(100),
            },
        );
        assert_eq!(r, Err(libc::EINVAL));

        let text = std::fs::read_to_string(&log).unwrap();
        let mut read = vec![0u8; 512];
        read.extend_from_slice(&[0x5a; 512]);
        let expected =
            format_record(OpKind::Write, 3, &[0x5a; 1024]) + &format_record(OpKind::Read, 2, &read);
        assert_eq!(text, expected);
    }

    #[test]
    fn failed_operations_below_are_not_logged() {
        use crate::block::testing::{pattern, Fault, Kind, MemDevice};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("io.log");
        let mem = MemDevice::new(64);
        // Writes at sector 8 fail; so does the first read there.
        mem.on(
            |s| s.sector == 8 && s.kind == Kind::Write,
            Fault::Fail(libc::ENOSPC),
        );
        mem.on_nth(2, Fault::Fail(libc::EIO));
        let dev = DebugLogDevice::new(Arc::new(mem.clone()), &log).unwrap();
        let mut ch = dev.new_channel().unwrap();
        let write = |sector| IoOp::Write {
            sector,
            buf: pattern(4096, 5),
        };
        let read = || IoOp::Read {
            sector: 8,
            buf: IoBuf::new(512),
        };
        assert_eq!(run_sync(ch.as_mut(), write(8)).0, Err(libc::ENOSPC));
        assert_eq!(run_sync(ch.as_mut(), write(4)).0, Ok(()));
        assert_eq!(run_sync(ch.as_mut(), read()).0, Err(libc::EIO));
        assert_eq!(run_sync(ch.as_mut(), read()).0, Ok(()));
        let text = std::fs::read_to_string(&log).unwrap();
        let expected = format_record(OpKind::Write, 4, &pattern(4096, 5))
            + &format_record(OpKind::Read, 8, &pattern(4096, 5)[2048..2560]);
        assert_eq!(text, expected);
    }
}
