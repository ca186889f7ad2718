//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings), so
//! that a backend killed with requests in flight can be replaced under a running guest.
//!
//! The backend creates a shared region (GET_INFLIGHT_FD) that the frontend keeps across
//! backend restarts and hands to every new backend (SET_INFLIGHT_FD). Per queue it holds one
//! 16-byte state per descriptor head (`inflight`, `counter`) behind a 16-byte header
//! (`features`, `version`, `desc_num`, `last_batch_head`, `used_idx`): QEMU's
//! docs/interop/vhost-user.rst, "Inflight I/O tracking", and libvhost-user, which QEMU is
//! tested against.
//!
//! Every step is ordered so that a process killed between any two stores leaves a region the
//! next process can read exactly:
//! - taking a head from the avail ring: `counter`, then `inflight = 1` ([`QueueTrack::take`]);
//! - publishing its used entry ([`QueueTrack::publish`]): `last_batch_head = head`, the used
//!   element and the ring's used index (one entry at a time), `inflight = 0`, then the
//!   region's `used_idx`;
//! - at the next start ([`QueueTrack::recover`]): a ring used index ahead of the region's
//!   means the process died after publishing `last_batch_head`'s entry and before clearing
//!   it, so it is cleared now; every head still in flight is resubmitted in `counter` order,
//!   and the avail ring resumes at `used index + heads in flight` (the ones popped before
//!   the crash, each either completed or in flight).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use virtio_queue::desc::split::Descriptor;

/// `version` of a region laid out as here (libvhost-user's `INFLIGHT_VERSION`).
const VERSION: u16 = 1;
const HEADER_SIZE: usize = 16;
const DESC_STATE_SIZE: usize = 16;
/// Each queue's part of the region starts at a multiple of this.
const ALIGNMENT: u64 = 64;

// Offsets in a queue's header and in a descriptor's state.
const OFF_VERSION: usize = 8;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const OFF_DESC_INFLIGHT: usize = 0;
const OFF_DESC_COUNTER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region for {num_queues} queues of {queue_size}: {why}")]
    Geometry {
        num_queues: u16,
        queue_size: u16,
        why: &'static str,
    },
    #[error("inflight region of {size:#x} bytes at offset {offset:#x}: {why}")]
    Mapping { size: u64, offset: u64, why: String },
    #[error("cannot create the inflight region")]
    Create(#[source] io::Error),
}

/// Bytes of one queue's part of the region (the same formula as libvhost-user, so that the
/// sizes a frontend sees do not depend on which backend created the region).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC_STATE_SIZE as u64 * u64::from(queue_size) + 2).next_multiple_of(ALIGNMENT)
}

/// The shared region, mapped: its queues' parts one after the other.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    /// Where in the mapping `ptr` is (a frontend's offset need not be page aligned).
    map_start: NonNull<u8>,
    map_len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is only reached through atomics (see `QueueRegion`), so it can be shared
// and sent between threads like any `Sync` memory; `Region` owns it until dropped.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A fresh zeroed region in a sealed memfd (GET_INFLIGHT_FD): the region and the file to
    /// hand to the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Region, File), InflightError> {
        check_geometry(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: the name is a valid C string; the returned fd is checked and then owned.
        let fd = unsafe {
            libc::memfd_create(
                c"ubiblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(InflightError::Create)?;
        // The frontend maps it too: nobody must be able to shrink it under our mapping.
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: plain fcntl on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        let region = Self::map(&file, size, 0, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps the region a frontend handed over (SET_INFLIGHT_FD). Everything in the message
    /// comes from the frontend: a size that does not hold the queues, or a range past the end
    /// of the file (which would fault on access), is refused.
    pub fn map(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let bad = |why: String| InflightError::Mapping { size, offset, why };
        let needed = queue_region_size(queue_size) * u64::from(num_queues);
        if size < needed {
            return Err(bad(format!(
                "{num_queues} queues of {queue_size} need {needed:#x} bytes"
            )));
        }
        let meta = file
            .metadata()
            .map_err(|e| bad(format!("cannot stat the fd: {e}")))?;
        if !meta.file_type().is_file() {
            // Only a regular file (memfd, shm) has a size that says which pages exist.
            return Err(bad("the fd is not a memfd or regular file".into()));
        }
        // A file that can shrink under the mapping would fault (SIGBUS) on the next store:
        // only a memfd sealed against shrinking (as `create` makes them) is taken.
        // SAFETY: plain fcntl on a descriptor `file` keeps open.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad(
                "the file is not a memfd sealed against shrinking".into()
            ));
        }
        let end = offset.checked_add(needed);
        if end.is_none_or(|end| end > meta.len()) {
            return Err(bad(format!("the file holds only {:#x} bytes", meta.len())));
        }
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let map_offset = offset - offset % page;
        let skip = offset - map_offset;
        let map_len = usize::try_from(needed + skip).map_err(|_| bad("too large".into()))?;
        let map_off = libc::off_t::try_from(map_offset).map_err(|_| bad("too large".into()))?;
        // SAFETY: a new shared mapping of a range checked to lie within the file; nothing else
        // in this process refers to the address range the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                map_off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(bad(format!("mmap: {}", io::Error::last_os_error())));
        }
        let map_start = NonNull::new(addr.cast::<u8>()).ok_or_else(|| bad("mmap: null".into()))?;
        // SAFETY: `skip` < page size <= map_len, so the pointer stays inside the mapping.
        let ptr = unsafe { map_start.add(skip as usize) };
        let region = Region {
            ptr,
            len: needed as usize,
            map_start,
            map_len,
            num_queues,
            queue_size,
        };
        if !(ptr.as_ptr() as usize).is_multiple_of(8) {
            // The states hold u64 counters read atomically.
            return Err(bad("offset is not 8-byte aligned".into()));
        }
        Ok(region)
    }

    /// Queue `q`'s part of the region, if the region has one.
    pub fn queue(&self, q: usize) -> Option<QueueRegion<'_>> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        let stride = queue_region_size(self.queue_size) as usize;
        debug_assert!((q + 1) * stride <= self.len);
        Some(QueueRegion {
            // SAFETY: q < num_queues, and the region holds num_queues strides.
            base: unsafe { self.ptr.add(q * stride) },
            desc_num: self.queue_size,
            _region: std::marker::PhantomData,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with this address and length and nothing
        // refers to it once the region is dropped (QueueRegion borrows the region).
        unsafe { libc::munmap(self.map_start.as_ptr().cast(), self.map_len) };
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    let why = if num_queues == 0 {
        "no queues"
    } else if queue_size == 0 {
        "empty queues"
    } else if queue_size > 32768 {
        // A split ring holds at most 32768 descriptors.
        "queues larger than a split ring can be"
    } else {
        return Ok(());
    };
    Err(InflightError::Geometry {
        num_queues,
        queue_size,
        why,
    })
}

/// One queue's part of a [`Region`]. The frontend maps the same memory, so it is only read and
/// written through atomics; the stores are `Release` so that none is moved after a later one:
/// the order of the stores is what makes a crash between any two of them recoverable.
#[derive(Clone, Copy)]
pub struct QueueRegion<'a> {
    base: NonNull<u8>,
    desc_num: u16,
    _region: std::marker::PhantomData<&'a Region>,
}

impl QueueRegion<'_> {
    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: callers pass offsets inside this queue's part of the mapping, which lives as
        // long as 'a; AtomicU8 has no alignment requirement.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU8>() }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: as in u8_at; every u16 field is at an even offset of a 64-byte aligned part
        // whose start `Region::map` checked to be 8-byte aligned.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU16>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as in u16_at, for the counters at offsets that are multiples of 8.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Every store to the region goes through here, so the tests can kill the "process"
    /// between any two of them (see `crash::survives`).
    fn store16(&self, off: usize, v: u16) {
        if crash::survives() {
            self.u16_at(off).store(v, Ordering::Release);
        }
    }

    fn store8(&self, off: usize, v: u8) {
        if crash::survives() {
            self.u8_at(off).store(v, Ordering::Release);
        }
    }

    fn store64(&self, off: usize, v: u64) {
        if crash::survives() {
            self.u64_at(off).store(v, Ordering::Release);
        }
    }

    fn desc_off(&self, head: u16) -> Option<usize> {
        (head < self.desc_num).then(|| HEADER_SIZE + DESC_STATE_SIZE * usize::from(head))
    }

    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    pub fn version(&self) -> u16 {
        self.u16_at(OFF_VERSION).load(Ordering::Acquire)
    }

    pub fn used_idx(&self) -> u16 {
        self.u16_at(OFF_USED_IDX).load(Ordering::Acquire)
    }

    pub fn last_batch_head(&self) -> u16 {
        self.u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire)
    }

    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc_off(head)
            .is_some_and(|o| self.u8_at(o + OFF_DESC_INFLIGHT).load(Ordering::Acquire) == 1)
    }

    pub fn counter(&self, head: u16) -> Option<u64> {
        self.desc_off(head)
            .map(|o| self.u64_at(o + OFF_DESC_COUNTER).load(Ordering::Acquire))
    }

    fn set_inflight(&self, head: u16, counter: Option<u64>) -> bool {
        let Some(o) = self.desc_off(head) else {
            return false;
        };
        match counter {
            Some(c) => {
                self.store64(o + OFF_DESC_COUNTER, c);
                self.store8(o + OFF_DESC_INFLIGHT, 1);
            }
            None => self.store8(o + OFF_DESC_INFLIGHT, 0),
        }
        true
    }
}

/// What a queue must do after a restart: resubmit `resubmit` (oldest first) and take new
/// chains from the avail ring at `next_avail` (None: where the frontend's SET_VRING_BASE
/// said, as for a fresh region nothing was taken under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub next_avail: Option<u16>,
    pub resubmit: Vec<u16>,
}

/// A queue's tracking state in this process: the region (once SET_INFLIGHT_FD handed one) and
/// the counter the next head taken gets.
#[derive(Default)]
pub struct QueueTrack {
    region: Option<std::sync::Arc<Region>>,
    queue: usize,
    counter: u64,
    /// Set when a region was handed over: [`QueueTrack::recover`] must run before the queue
    /// takes anything from its avail ring.
    needs_recovery: bool,
    /// Heads that did not fit the region (a frontend that announced a smaller queue than the
    /// ring it set up): not tracked, and said once.
    untracked: bool,
}

impl QueueTrack {
    /// Tracks queue `queue` in `region` from now on (None: stops tracking).
    pub fn attach(&mut self, region: Option<std::sync::Arc<Region>>, queue: usize) {
        self.needs_recovery = region.is_some();
        self.region = region;
        self.queue = queue;
        self.counter = 0;
    }

    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery
    }

    /// Whether the queue's requests are marked in a region (the frontend keeps it across
    /// backend processes).
    pub fn is_tracking(&self) -> bool {
        self.region.is_some()
    }

    fn part(&self) -> Option<QueueRegion<'_>> {
        self.region.as_ref()?.queue(self.queue)
    }

    /// Records `head` as taken from the avail ring (before its request is started).
    pub fn take(&mut self, head: u16) {
        let Some(part) = self.part() else {
            return;
        };
        let counter = self.counter;
        if part.set_inflight(head, Some(counter)) {
            // Wrapping: after a restart the counter continues from the region's, which the
            // frontend could have set to anything.
            self.counter = counter.wrapping_add(1);
        } else {
            self.warn_untracked(head);
        }
    }

    /// Publishes `head`'s used entry with `add_used` (which must put one entry on the used
    /// ring and return the ring's new used index), recording each step so that a crash
    /// anywhere in between is recoverable. Without a region, just `add_used`.
    pub fn publish<E>(
        &mut self,
        head: u16,
        add_used: impl FnOnce() -> Result<u16, E>,
    ) -> Result<(), E> {
        let Some(part) = self.part() else {
            return add_used().map(drop);
        };
        if part.desc_off(head).is_none() {
            return add_used().map(drop);
        }
        part.store16(OFF_LAST_BATCH_HEAD, head);
        let used = add_used()?;
        part.set_inflight(head, None);
        part.store16(OFF_USED_IDX, used);
        Ok(())
    }

    /// Reads the region after a (re)start, given the ring's used index as the guest sees it,
    /// and fixes up a crash between publishing a used entry and clearing it. Returns what the
    /// queue must resubmit and where its avail ring resumes; `None` without a region. Only
    /// heads below `ring_size` are resubmitted (the region's content is the frontend's).
    pub fn recover(&mut self, used_idx: u16, ring_size: u16) -> Option<Recovery> {
        self.needs_recovery = false;
        let part = self.part()?;
        if part.version() != VERSION {
            // Fresh (zeroed) region, or one we cannot read: start it anew.
            for head in 0..part.desc_num() {
                part.set_inflight(head, None);
            }
            part.store16(OFF_USED_IDX, used_idx);
            part.store16(OFF_VERSION, VERSION);
            self.counter = 0;
            return Some(Recovery {
                next_avail: None,
                resubmit: Vec::new(),
            });
        }
        if part.used_idx() != used_idx {
            // Died after publishing last_batch_head's used entry, before clearing it.
            part.set_inflight(part.last_batch_head(), None);
            part.store16(OFF_USED_IDX, used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..part.desc_num())
            .filter(|&h| part.is_inflight(h))
            .map(|h| (part.counter(h).unwrap_or(0), h))
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let in_use = inflight.len() as u16;
        let resubmit: Vec<u16> = inflight
            .into_iter()
            .map(|(_, h)| h)
            .filter(|&h| h < ring_size)
            .collect();
        Some(Recovery {
            next_avail: Some(used_idx.wrapping_add(in_use)),
            resubmit,
        })
    }

    fn warn_untracked(&mut self, head: u16) {
        if !std::mem::replace(&mut self.untracked, true) {
            log::warn!(
                "queue {}: head {head} is outside the inflight region the frontend set up; \
                 such requests are not tracked",
                self.queue
            );
        }
    }
}

/// The descriptors of the chain at `head` of a split ring whose table is at `desc_table`, for
/// resubmitting a head the region says is in flight (virtio-queue builds chains only from the
/// avail ring). Walks like virtio-queue's `DescriptorChain`: one level of indirection, at most
/// one pass over the table, at most 4 GiB in all; a broken chain just ends early (the request
/// parser then refuses it).
pub fn chain_descriptors<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut size = queue_size;
    let mut next = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && next < size {
        let Some(addr) = table.checked_add(u64::from(next) * 16) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            if indirect || desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) {
                break;
            }
            table = desc.addr();
            size = (desc.len() / 16) as u16;
            next = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        let Some(b) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = b;
        out.push(desc);
        if !desc.has_next() {
            break;
        }
        next = desc.next();
        ttl -= 1;
    }
    out
}

/// A kill -9 at any point between two stores, for the tests: a budget of stores after which a
/// thread's stores no longer reach the region (nor, in the tests' model, the ring).
#[cfg(not(test))]
mod crash {
    #[inline(always)]
    pub fn survives() -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod crash {
    use std::cell::Cell;

    thread_local! {
        static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Whether the next store happens (and uses up one of the budget).
    pub fn survives() -> bool {
        BUDGET.with(|b| match b.get() {
            None => true,
            Some(0) => false,
            Some(n) => {
                b.set(Some(n - 1));
                true
            }
        })
    }

    /// How many more stores get through.
    pub fn remaining() -> usize {
        BUDGET.with(|b| b.get().unwrap_or(usize::MAX))
    }

    /// Lets `n` more stores through (None: all).
    pub fn set_budget(n: Option<usize>) {
        BUDGET.with(|b| b.set(n));
    }
}

#[cfg(test)]
mod tests;
