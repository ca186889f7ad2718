//! A file channel that runs each operation on the calling thread, during `submit`.
//!
//! For threads that block on every operation anyway ([`Notifier::inline`]): a stripe server
//! session reading a stripe, a lazy fetcher writing one. Through io_uring, a file that cannot
//! be read or written without blocking (tmpfs, buffered writes) is handed to an io-wq worker
//! thread, which copies the data and wakes the caller: two thread switches per operation, each
//! a wait for a CPU when the host is busy. Here the caller copies it itself.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::{Completion, IoBuf, IoChannel, IoOp, Notifier, SECTOR_SHIFT};

pub(super) struct InlineChannel {
    file: Arc<File>,
    notifier: Notifier,
    /// Added, not yet run.
    queued: VecDeque<(u64, IoOp)>,
    done: Vec<Completion>,
    /// See [`super::FileDevice::write_through`].
    write_through: bool,
    /// Held by the device's inline channels while they write (or punch holes) where the
    /// kernel would serialize the writes anyway and let the waiters spin (see
    /// `file::writes_take_turns`): waiting here sleeps instead.
    writers: Option<Arc<Mutex<()>>>,
}

impl InlineChannel {
    pub(super) fn new(
        file: Arc<File>,
        notifier: Notifier,
        write_through: bool,
        writers: Option<Arc<Mutex<()>>>,
    ) -> Self {
        InlineChannel {
            file,
            notifier,
            queued: VecDeque::new(),
            done: Vec::new(),
            write_through,
            writers,
        }
    }

    /// Runs `f` as the file's only inline writer where writes are copies (see `writers`).
    fn writing<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self
            .writers
            .as_ref()
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()));
        f()
    }

    /// Runs `op`; the buffer comes back with the result.
    fn run(&self, op: IoOp) -> (Result<(), i32>, Option<IoBuf>) {
        let one = |ptr: *mut u8, len| {
            [libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            }]
        };
        match op {
            IoOp::Read { sector, mut buf } => {
                let iov = one(buf.as_mut_ptr(), buf.len());
                (self.transfer(false, &iov, sector), Some(buf))
            }
            IoOp::Write { sector, mut buf } => {
                let iov = one(buf.as_mut_ptr(), buf.len());
                (
                    self.writing(|| self.transfer(true, &iov, sector)),
                    Some(buf),
                )
            }
            IoOp::ReadVec { sector, iov } => (self.transfer(false, iov.as_slice(), sector), None),
            IoOp::WriteVec { sector, iov } => {
                let r = self.writing(|| self.transfer(true, iov.as_slice(), sector));
                (r, None)
            }
            IoOp::Flush if self.write_through => (Ok(()), None),
            IoOp::Flush => (self.file.sync_data().map_err(errno), None),
            IoOp::Discard { sector, sectors } | IoOp::WriteZeroes { sector, sectors } => {
                // A punched hole reads back as zeros on files and block devices alike.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let (fd, at, len) = (self.file.as_raw_fd(), offset(sector), offset(sectors));
                let punched = self.writing(|| {
                    // SAFETY: fallocate touches no memory of ours.
                    match unsafe { libc::fallocate(fd, mode, at, len) } {
                        0 => Ok(()),
                        // Read before the lock is let go, which may make a syscall.
                        _ => Err(errno(io::Error::last_os_error())),
                    }
                });
                let r = punched.and_then(|()| match self.write_through {
                    true => self.file.sync_data().map_err(errno),
                    false => Ok(()),
                });
                (r, None)
            }
        }
    }

    /// Reads into (or writes from) `iov` at `sector`, all of it or an error: a short transfer
    /// (past the end of a shrunk file, or a device error) is EIO, as on the io_uring channel.
    fn transfer(&self, write: bool, iov: &[libc::iovec], sector: u64) -> Result<(), i32> {
        let fd = self.file.as_raw_fd();
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let (ptr, n) = (iov.as_ptr(), iov.len() as i32);
        loop {
            let done = if write {
                let dsync = if self.write_through {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                // SAFETY: the vectors point into a buffer the operation owns, or into memory
                // its IoVecs keeps alive, for the duration of the call; a write only reads it.
                unsafe { libc::pwritev2(fd, ptr, n, offset(sector), dsync) }
            } else {
                // SAFETY: as above; the memory is writable (IoBuf, or IoVecs' contract).
                unsafe { libc::preadv2(fd, ptr, n, offset(sector), 0) }
            };
            if done < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(errno(e));
            }
            return if done as usize == len {
                Ok(())
            } else {
                Err(libc::EIO)
            };
        }
    }
}

fn offset(sector: u64) -> i64 {
    (sector << SECTOR_SHIFT) as i64
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl IoChannel for InlineChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        self.queued.push_back((id, op));
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        while let Some((id, op)) = self.queued.pop_front() {
            let (result, buf) = self.run(op);
            self.done.push(Completion { id, result, buf });
        }
        // As a channel below signals its completions: a layer above may wait on the notifier.
        self.notifier.notify();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn wait(&mut self) -> io::Result<()> {
        // Everything submitted has run: nothing to wait for.
        self.submit()
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

#[cfg(test)]
mod tests {
    use crate::block::{run_sync, BlockDevice, FileDevice, IoBuf, IoOp, Notifier};
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Arc;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    /// Writes into tmpfs are CPU copies under the inode lock, and writers waiting for it in
    /// the kernel spin on their cores (40% of the fetchers' CPU while hydrating a tmpfs
    /// disk). Inline channels of one such device take turns on a lock of ours instead, where
    /// waiting sleeps: a write waits while another holds it, and runs once it is let go.
    #[test]
    fn writers_into_a_tmpfs_file_take_turns() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("skipped: no /dev/shm");
            return;
        }
        let f = tempfile::NamedTempFile::new_in(shm).unwrap();
        f.as_file().set_len(MIB as u64).unwrap();
        let d = Arc::new(FileDevice::open(f.path(), false, 8).unwrap());
        let lock = d.writers_lock().expect("tmpfs (O_DIRECT or not) copies");
        let held = lock.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut ch = d.new_channel_with(Notifier::inline().unwrap()).unwrap();
                let mut buf = IoBuf::new(MIB);
                buf.fill(9);
                let r = run_sync(&mut *ch, IoOp::Write { sector: 0, buf }).0;
                tx.send(r).unwrap();
            })
        };
        let waited = rx.recv_timeout(Duration::from_millis(100));
        assert!(
            waited.is_err(),
            "the write ran while another writer held the lock"
        );
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
        writer.join().unwrap();
        // Reads do not take turns: one runs while a writer holds the lock.
        let _held = lock.lock().unwrap();
        let mut ch = d.new_channel_with(Notifier::inline().unwrap()).unwrap();
        let (r, buf) = run_sync(
            &mut *ch,
            IoOp::Read {
                sector: 0,
                buf: IoBuf::new(4096),
            },
        );
        assert_eq!(r, Ok(()));
        assert!(buf.is_some_and(|b| b.iter().all(|&x| x == 9)));
    }

    #[test]
    fn direct_writes_to_a_disk_file_system_run_side_by_side() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(MIB as u64).unwrap();
        let d = FileDevice::open(f.path(), false, 8).unwrap();
        let tmpfs = crate::block::file::on_tmpfs(f.as_file());
        // Buffered where O_DIRECT is refused (and tmpfs copies either way): serialized.
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(f.path())
            .is_ok();
        assert_eq!(d.writers_lock().is_some(), tmpfs || !direct);
    }

    #[test]
    fn operations_run_at_submit_and_complete_in_order() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = FileDevice::open(f.path(), false, 8).unwrap();
        let mut ch = d.new_channel_with(Notifier::inline().unwrap()).unwrap();
        let mut buf = IoBuf::new(4096);
        buf.fill(7);
        ch.add(1, IoOp::Write { sector: 8, buf });
        ch.add(2, IoOp::Flush);
        ch.add(
            3,
            IoOp::Read {
                sector: 8,
                buf: IoBuf::new(4096),
            },
        );
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert!(done.is_empty(), "nothing runs before submit");
        assert_eq!(ch.in_flight(), 3);
        ch.submit().unwrap();
        assert!(
            ch.notifier().wait(std::time::Duration::ZERO),
            "submit notifies"
        );
        ch.poll(&mut done);
        let ids: Vec<u64> = done.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert!(done[2]
            .buf
            .as_ref()
            .is_some_and(|b| b.iter().all(|&x| x == 7)));
        assert_eq!(ch.in_flight(), 0);
        ch.wait().unwrap();
    }
}
