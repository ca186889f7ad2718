//! The bottom of every stack: a regular file or block device, driven through io_uring.

use super::inline::InlineChannel;
use super::{
    BlockDevice, Completion, IoBuf, IoChannel, IoOp, IoVecs, Notifier, Slab, SECTOR_SHIFT,
};
use io_uring::{opcode, squeue, types, IoUring};
use log::warn;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The largest disk `resize` grows to (1 PiB); the lazy layer sizes its stripe table for it.
pub const MAX_DISK_BYTES: u64 = 1 << 50;

/// The disk's size in sectors, shared by everything that checks requests against it or reports
/// it: it changes only by growing (the control socket's `resize`), so a reader holding an
/// older value only refuses what it could have allowed.
#[derive(Debug, Clone, Default)]
pub struct Capacity(Arc<AtomicU64>);

impl Capacity {
    pub fn new(sectors: u64) -> Self {
        Capacity(Arc::new(AtomicU64::new(sectors)))
    }

    /// The current size in sectors.
    pub fn sectors(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Grows to `sectors` (never shrinks); call once the new area is ready to be read.
    pub fn grow(&self, sectors: u64) {
        self.0.fetch_max(sectors, Ordering::AcqRel);
    }
}

/// A file or block device holding the disk's sectors.
pub struct FileDevice {
    file: Arc<File>,
    sectors: Capacity,
    ring_entries: u32,
    /// `write_through`: every write durable when it completes (see [`FileDevice::write_through`]).
    write_through: bool,
    /// Where the kernel writes by copying under the inode lock (see [`writes_take_turns`]): the
    /// lock the device's inline channels take around a write instead of spinning on it.
    writers: Option<Arc<Mutex<()>>>,
}

impl FileDevice {
    /// Opens `path` with O_DIRECT (falling back to buffered I/O where the file system refuses
    /// it). `ring_entries` bounds the submissions one channel keeps in its ring at once.
    /// Anything but a regular file or a block device is refused (see [`check_disk_kind`]).
    pub fn open(path: &Path, readonly: bool, ring_entries: u32) -> io::Result<Self> {
        // Checked before opening: opening a FIFO read-only would wait for a writer.
        check_disk_kind(&std::fs::metadata(path)?)?;
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        let (file, direct) = match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn!("{}: O_DIRECT refused, using buffered I/O", path.display());
                (open(false)?, false)
            }
            other => (other?, true),
        };
        // And what was opened, in case the path changed in between.
        let meta = file.metadata()?;
        check_disk_kind(&meta)?;
        let bytes = device_size(&file)?;
        let block_device = meta.file_type().is_block_device();
        let writers = writes_take_turns(block_device, direct, on_tmpfs(&file)).then(Arc::default);
        Ok(FileDevice {
            file: Arc::new(file),
            sectors: Capacity::new(bytes >> SECTOR_SHIFT),
            ring_entries: ring_entries.clamp(8, 4096).next_power_of_two(),
            write_through: false,
            writers,
        })
    }

    /// With `on`, every write is durable when it completes: writes carry RWF_DSYNC (FUA on a
    /// device that has it), a discard or write-zeroes is followed by an fdatasync before it
    /// completes, and FLUSH completes at once (there is nothing left to flush).
    pub fn write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }

    /// The size every layer above reports: [`Capacity::grow`] grows the whole stack.
    pub fn capacity(&self) -> Capacity {
        self.sectors.clone()
    }

    /// The open file or block device (for growing it).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// The lock inline writers take turns on, where they do (see [`writes_take_turns`]).
    #[cfg(test)]
    pub(crate) fn writers_lock(&self) -> Option<Arc<Mutex<()>>> {
        self.writers.clone()
    }
}

/// Whether `file` lives on tmpfs (see [`writes_take_turns`]).
pub(super) fn on_tmpfs(file: &File) -> bool {
    // SAFETY: statfs is plain data; all zeros is a valid value for fstatfs to overwrite.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a writable statfs; the descriptor is open for the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
    rc == 0 && fs.f_type == libc::TMPFS_MAGIC
}

/// Buffered writes into a regular file (no O_DIRECT), and any write into a tmpfs file (its
/// O_DIRECT copies too), are CPU copies made under the file's inode lock: two never run at
/// once, and a waiting writer spins on its core while the holder copies (measured: 16 lazy
/// fetchers hydrating a tmpfs disk spent ~40% of their CPU spinning, on cores the source's
/// sessions needed). Those writers take turns on a lock of ours instead, where waiting
/// sleeps. A block device takes no inode lock (its node may sit on devtmpfs, a tmpfs), and
/// direct writes to a disk file system wait for the I/O asleep: both left side by side.
fn writes_take_turns(block_device: bool, direct: bool, tmpfs: bool) -> bool {
    !block_device && (!direct || tmpfs)
}

/// Refuses what cannot hold a disk's sectors: a disk is a regular file or a block device. A
/// character device (/dev/null, /dev/zero) or a FIFO would read as empty or endless, or block.
pub fn check_disk_kind(meta: &std::fs::Metadata) -> io::Result<()> {
    crate::sys::open::check_kind(meta, crate::sys::open::Kinds::RegularOrBlock)
}

/// The size in bytes of a regular file or block device.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl BlockDevice for FileDevice {
    fn sectors(&self) -> u64 {
        self.sectors.sectors()
    }

    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
        if notifier.is_inline() {
            let (file, wt) = (self.file.clone(), self.write_through);
            let writers = self.writers.clone();
            return Ok(Box::new(InlineChannel::new(file, notifier, wt, writers)));
        }
        let mut channel = UringChannel::new(self.file.clone(), self.ring_entries, notifier)?;
        channel.write_through = self.write_through;
        Ok(Box::new(channel))
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn iovec_align(&self) -> Option<usize> {
        // Page alignment satisfies O_DIRECT on every logical block size up to 4 KiB.
        Some(4096)
    }
}

fn datasync(fd: types::Fd) -> squeue::Entry {
    opcode::Fsync::new(fd)
        .flags(types::FsyncFlags::DATASYNC)
        .build()
}

/// An operation the kernel is working on: what to give back and what length to expect.
struct Slot {
    id: u64,
    buf: Option<IoBuf>,
    /// Caller memory in use by the kernel; dropped once the operation is reaped.
    _iov: Option<IoVecs>,
    expect: Option<usize>,
    /// Write-through: an fdatasync to run once this operation succeeds, before it completes.
    then_sync: bool,
}

pub struct UringChannel {
    file: Arc<File>,
    ring: IoUring,
    notifier: Notifier,
    slots: Slab<Slot>,
    /// Built entries waiting for room in the submission queue.
    backlog: std::collections::VecDeque<squeue::Entry>,
    /// See [`FileDevice::write_through`].
    write_through: bool,
}

impl UringChannel {
    fn new(file: Arc<File>, entries: u32, notifier: Notifier) -> io::Result<Self> {
        // COOP_TASKRUN: completions from io-wq workers must not interrupt our (often polling)
        // thread with an IPI; we run their task work when we enter the kernel, and the
        // TASKRUN flag tells the polling loop when to do so.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        Ok(UringChannel {
            file,
            ring,
            notifier,
            slots: Slab::default(),
            backlog: Default::default(),
            write_through: false,
        })
    }

    /// Moves backlog entries into the submission queue while it has room.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        while let Some(e) = self.backlog.front() {
            // SAFETY: every entry's buffer is owned by its slot until the completion is reaped,
            // and the file is kept open by self.file.
            if unsafe { sq.push(e) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }
}

impl IoChannel for UringChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut iov_keep = None;
        let write_flags = if self.write_through {
            libc::RWF_DSYNC
        } else {
            0
        };
        let then_sync =
            self.write_through && matches!(op, IoOp::Discard { .. } | IoOp::WriteZeroes { .. });
        let (entry, buf, expect) = match op {
            IoOp::Read { sector, mut buf } => {
                let len = buf.len();
                let e = opcode::Read::new(fd, buf.as_mut_ptr(), len as u32)
                    .offset(sector << SECTOR_SHIFT)
                    .build();
                (e, Some(buf), Some(len))
            }
            IoOp::Write { sector, buf } => {
                let len = buf.len();
                let e = opcode::Write::new(fd, buf.as_ptr(), len as u32)
                    .offset(sector << SECTOR_SHIFT)
                    .rw_flags(write_flags)
                    .build();
                (e, Some(buf), Some(len))
            }
            IoOp::ReadVec { sector, iov } => {
                let v = iov.as_slice();
                let e = opcode::Readv::new(fd, v.as_ptr(), v.len() as u32)
                    .offset(sector << SECTOR_SHIFT)
                    .build();
                let len = iov.len();
                iov_keep = Some(iov);
                (e, None, Some(len))
            }
            IoOp::WriteVec { sector, iov } => {
                let v = iov.as_slice();
                let e = opcode::Writev::new(fd, v.as_ptr(), v.len() as u32)
                    .offset(sector << SECTOR_SHIFT)
                    .rw_flags(write_flags)
                    .build();
                let len = iov.len();
                iov_keep = Some(iov);
                (e, None, Some(len))
            }
            // Write-through: every completed write is already durable.
            IoOp::Flush if self.write_through => (opcode::Nop::new().build(), None, None),
            IoOp::Flush => (datasync(fd), None, None),
            IoOp::Discard { sector, sectors } | IoOp::WriteZeroes { sector, sectors } => {
                // A punched hole reads back as zeros on files and block devices alike.
                let e = opcode::Fallocate::new(fd, sectors << SECTOR_SHIFT)
                    .offset(sector << SECTOR_SHIFT)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build();
                (e, None, None)
            }
        };
        let key = self.slots.insert(Slot {
            id,
            buf,
            _iov: iov_keep,
            expect,
            then_sync,
        });
        self.backlog.push_back(entry.user_data(key as u64));
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            self.fill_sq();
            if self.ring.submission().is_empty() {
                // Nothing new: skip the io_uring_enter syscall (polling loops call this often).
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: the caller must reap first.
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
            // The SQ was full: the submit made room; if nothing was consumed, stop spinning.
            if self.ring.submission().is_full() {
                return Ok(());
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        if self.ring.completion().is_empty() && self.ring.submission().taskrun() {
            // Completions are waiting as task work: an io_uring_enter runs it.
            let _ = self.ring.submit();
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let mut syncs = Vec::new();
        let cq = self.ring.completion();
        for cqe in cq {
            let key = cqe.user_data() as usize;
            let res = cqe.result();
            if res >= 0 {
                if let Some(slot) = self.slots.get_mut(key).filter(|s| s.then_sync) {
                    // Done, but not durable yet: the same slot completes with the fdatasync.
                    slot.then_sync = false;
                    syncs.push(datasync(fd).user_data(key as u64));
                    continue;
                }
            }
            let Some(slot) = self.slots.remove(key) else {
                continue;
            };
            let result = if res < 0 {
                Err(-res)
            } else if slot.expect.is_some_and(|n| n != res as usize) {
                // Short transfer: past the end of a shrunk file, or a device error.
                Err(libc::EIO)
            } else {
                Ok(())
            };
            out.push(Completion {
                id: slot.id,
                result,
                buf: slot.buf,
            });
        }
        self.backlog.extend(syncs);
        if !self.backlog.is_empty() {
            let _ = self.submit();
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        self.fill_sq();
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // Buffers must outlive the kernel's use of them: drain before freeing.
        while !self.slots.is_empty() {
            let mut done = Vec::new();
            if self.wait().is_err() {
                break;
            }
            self.poll(&mut done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::run_sync;

    fn device(len: u64) -> (tempfile::NamedTempFile, FileDevice) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let d = FileDevice::open(f.path(), false, 64).unwrap();
        (f, d)
    }

    fn filled(len: usize, seed: u8) -> IoBuf {
        let mut b = IoBuf::new(len);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        b
    }

    #[test]
    fn only_copying_writes_into_one_file_take_turns() {
        // (block device, O_DIRECT, on tmpfs) -> take turns
        assert!(
            writes_take_turns(false, false, false),
            "buffered regular file"
        );
        assert!(
            writes_take_turns(false, true, true),
            "tmpfs, O_DIRECT or not"
        );
        assert!(
            !writes_take_turns(false, true, false),
            "O_DIRECT on a disk file system"
        );
        assert!(
            !writes_take_turns(true, true, true),
            "a block device node on devtmpfs"
        );
        assert!(
            !writes_take_turns(true, false, false),
            "a block device, buffered"
        );
    }

    #[test]
    fn size_is_in_sectors_rounded_down() {
        let (_f, d) = device(10 * 512 + 100);
        assert_eq!(d.sectors(), 10);
    }

    #[test]
    fn write_read_roundtrip_and_file_content() {
        let (f, d) = device(1 << 20);
        let mut ch = d.new_channel().unwrap();
        let data = filled(8192, 3);
        let expect = data.to_vec();
        let (r, _) = run_sync(
            ch.as_mut(),
            IoOp::Write {
                sector: 8,
                buf: data,
            },
        );
        r.unwrap();
        let (r, buf) = run_sync(
            ch.as_mut(),
            IoOp::Read {
                sector: 8,
                buf: IoBuf::new(8192),
            },
        );
        r.unwrap();
        assert_eq!(&buf.unwrap()[..], &expect[..]);
        run_sync(ch.as_mut(), IoOp::Flush).0.unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[4096..4096 + 8192], &expect[..]);
    }

    /// Both kinds of channel: io_uring, and inline (see `block::inline`).
    const NOTIFIERS: [fn() -> io::Result<Notifier>; 2] = [Notifier::new, Notifier::inline];

    #[test]
    fn write_through_writes_zeroes_and_flushes_complete_once_each() {
        for notifier in NOTIFIERS {
            write_through_on(notifier);
        }
    }

    fn write_through_on(notifier: fn() -> io::Result<Notifier>) {
        let (f, d) = device(1 << 20);
        let d = d.write_through(true);
        let mut ch = d.new_channel_with(notifier().unwrap()).unwrap();
        let data = filled(65536, 9);
        run_sync(
            ch.as_mut(),
            IoOp::Write {
                sector: 0,
                buf: data,
            },
        )
        .0
        .unwrap();
        // Several at once: each completes once, with its own id, after its fdatasync.
        for id in 0..4u64 {
            let (sector, sectors) = (id * 16, 8);
            ch.add(id, IoOp::WriteZeroes { sector, sectors });
        }
        ch.add(4, IoOp::Flush);
        ch.add(
            5,
            IoOp::Discard {
                sector: 64,
                sectors: 8,
            },
        );
        let mut done = Vec::new();
        while done.len() < 6 {
            ch.submit().unwrap();
            ch.wait().unwrap();
            ch.poll(&mut done);
        }
        let mut ids: Vec<u64> = done.iter().map(|c| c.id).collect();
        ids.sort();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(ch.in_flight(), 0);
        let on_disk = std::fs::read(f.path()).unwrap();
        let want = filled(65536, 9);
        for s in 0..128usize {
            let zeroed = s < 72 && s % 16 < 8;
            let got = &on_disk[s * 512..(s + 1) * 512];
            match zeroed {
                true => assert!(got.iter().all(|&b| b == 0), "sector {s}"),
                false => assert_eq!(got, &want[s * 512..(s + 1) * 512], "sector {s}"),
            }
        }
    }

    #[test]
    fn many_in_flight_and_more_than_ring_entries() {
        let (_f, d) = device(4 << 20);
        let mut ch = d.new_channel().unwrap();
        // 200 ops > 64 ring entries: the backlog must carry the rest.
        for i in 0..200u64 {
            ch.add(
                i,
                IoOp::Write {
                    sector: i * 8,
                    buf: filled(4096, i as u8),
                },
            );
        }
        let mut done = Vec::new();
        while done.len() < 200 {
            ch.submit().unwrap();
            ch.poll(&mut done);
            if done.len() < 200 {
                ch.wait().unwrap();
            }
        }
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(ch.in_flight(), 0);
        for i in [0u64, 77, 199] {
            let (r, b) = run_sync(
                ch.as_mut(),
                IoOp::Read {
                    sector: i * 8,
                    buf: IoBuf::new(4096),
                },
            );
            r.unwrap();
            assert_eq!(&b.unwrap()[..], &filled(4096, i as u8)[..]);
        }
    }

    #[test]
    fn read_past_end_is_an_error() {
        let (f, d) = device(8192);
        for notifier in NOTIFIERS {
            let mut ch = d.new_channel_with(notifier().unwrap()).unwrap();
            let read = |ch: &mut dyn IoChannel, sector| {
                let buf = IoBuf::new(4096);
                run_sync(ch, IoOp::Read { sector, buf }).0
            };
            assert_eq!(read(ch.as_mut(), 16), Err(libc::EIO));
            // Short: the file shrank under the device.
            f.as_file().set_len(6144).unwrap();
            assert_eq!(read(ch.as_mut(), 8), Err(libc::EIO));
            f.as_file().set_len(8192).unwrap();
            assert_eq!(read(ch.as_mut(), 8), Ok(()));
        }
    }

    #[test]
    fn discard_reads_back_zeros() {
        let (_f, d) = device(1 << 20);
        let mut ch = d.new_channel().unwrap();
        run_sync(
            ch.as_mut(),
            IoOp::Write {
                sector: 0,
                buf: filled(65536, 9),
            },
        )
        .0
        .unwrap();
        run_sync(
            ch.as_mut(),
            IoOp::Discard {
                sector: 8,
                sectors: 16,
            },
        )
        .0
        .unwrap();
        run_sync(
            ch.as_mut(),
            IoOp::WriteZeroes {
                sector: 64,
                sectors: 8,
            },
        )
        .0
        .unwrap();
        let (r, b) = run_sync(
            ch.as_mut(),
            IoOp::Read {
                sector: 0,
                buf: IoBuf::new(65536),
            },
        );
        r.unwrap();
        let b = b.unwrap();
        let orig = filled(65536, 9);
        assert_eq!(&b[..4096], &orig[..4096]);
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert_eq!(&b[12288..32768], &orig[12288..32768]);
        assert!(b[32768..36864].iter().all(|&x| x == 0));
        assert_eq!(&b[36864..], &orig[36864..]);
    }

    #[test]
    fn readonly_device_rejects_writes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let d = FileDevice::open(f.path(), true, 8).unwrap();
        let mut ch = d.new_channel().unwrap();
        let (r, _) = run_sync(
            ch.as_mut(),
            IoOp::Write {
                sector: 0,
                buf: IoBuf::new(512),
            },
        );
        assert_eq!(r, Err(libc::EBADF));
    }
}
