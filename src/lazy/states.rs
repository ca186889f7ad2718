//! The in-memory state of every stripe: the metadata bits (FETCHED, WRITTEN) plus QUEUED while
//! a fetch is pending or running, one atomic byte per stripe so the data path reads them
//! without a lock.
//!
//! The bytes live in chunks of [`CHUNK`] stripes that never move once allocated, behind a
//! table sized at start for the largest disk `resize` accepts: growing the disk
//! ([`StripeStates::grow`]) adds chunks while channels and fetchers keep reading the old ones,
//! without a lock on the data path (a lookup is one more load, of the chunk's pointer).

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;

use super::metadata::{stripe_count, Metadata, FETCHED, SECTOR_SIZE, WRITTEN};
use crate::block::{MAX_DISK_BYTES, SECTOR_SHIFT};

/// In memory only: a fetch of the stripe is queued or running.
pub(crate) const QUEUED: u8 = 1 << 7;

/// Stripes per chunk (1 MiB of state; allocated zeroed, so the pages of stripes past the
/// disk's end are never touched).
const CHUNK_SHIFT: u32 = 20;
const CHUNK: usize = 1 << CHUNK_SHIFT;

pub(crate) struct StripeStates {
    chunks: Box<[OnceLock<Box<[AtomicU8]>>]>,
    /// Stripes of the disk (every one's chunk is allocated).
    count: AtomicUsize,
    /// Stripes the metadata file holds, new ones marked fetched, while a grow is under way
    /// (see [`StripeStates::begin_grow`]); `count` otherwise.
    on_file: AtomicUsize,
    /// Stripes hold 2^shift sectors.
    pub shift: u8,
    disk_sectors: AtomicU64,
    fetched: AtomicUsize,
}

/// A zeroed chunk.
fn new_chunk() -> Box<[AtomicU8]> {
    let chunk = Box::<[AtomicU8]>::new_zeroed_slice(CHUNK);
    // SAFETY: an AtomicU8 has the size, alignment and bit validity of a u8, so all zeros is a
    // valid AtomicU8 (holding 0).
    unsafe { chunk.assume_init() }
}

impl StripeStates {
    pub fn new(md: &Metadata, disk_sectors: u64) -> Self {
        let max = stripe_count(MAX_DISK_BYTES >> SECTOR_SHIFT, md.stripe_shift) as usize;
        let slots = max.max(md.stripe_count()).div_ceil(CHUNK);
        let states = StripeStates {
            chunks: (0..slots).map(|_| OnceLock::new()).collect(),
            count: AtomicUsize::new(0),
            on_file: AtomicUsize::new(0),
            shift: md.stripe_shift,
            disk_sectors: AtomicU64::new(disk_sectors),
            fetched: AtomicUsize::new(md.fetched_count()),
        };
        states.allocate(md.stripe_count());
        for (i, &b) in md.stripes.iter().enumerate() {
            states.state(i).store(b, SeqCst);
        }
        states.count.store(md.stripe_count(), SeqCst);
        states.on_file.store(md.stripe_count(), SeqCst);
        states
    }

    /// Allocates the chunks of stripes `0..count`.
    fn allocate(&self, count: usize) {
        for slot in &self.chunks[..count.div_ceil(CHUNK)] {
            slot.get_or_init(new_chunk);
        }
    }

    /// Stripe `i`'s byte. Panics if its chunk is not allocated (`i` past the disk's end).
    fn state(&self, i: usize) -> &AtomicU8 {
        let chunk = self.chunks[i >> CHUNK_SHIFT].get();
        &chunk.expect("stripe inside the disk")[i & (CHUNK - 1)]
    }

    /// Adds the FETCHED and WRITTEN bits `md` (the metadata file, as another process left it)
    /// has and memory lacks, for the disk's stripes. Bits are only ever set, so the union is
    /// the disk's state.
    pub fn merge(&self, md: &Metadata) {
        for (i, &bits) in md.stripes.iter().enumerate().take(self.count()) {
            let old = self.state(i).fetch_or(bits & (FETCHED | WRITTEN), SeqCst);
            if bits & FETCHED != 0 && old & FETCHED == 0 {
                self.fetched.fetch_add(1, SeqCst);
            }
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(SeqCst)
    }

    /// The disk's size in sectors, as the stripes cover it.
    pub fn disk_sectors(&self) -> u64 {
        self.disk_sectors.load(SeqCst)
    }

    /// The number of stripes a disk of `sectors` sectors has.
    pub fn count_for(&self, sectors: u64) -> u64 {
        stripe_count(sectors, self.shift)
    }

    /// The most stripes the table holds (those of a 1 PiB disk, or of the disk at start if
    /// it was larger).
    pub fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// Growing to `count` stripes has begun: from now on the metadata sectors encoded here
    /// show the stripes `self.count()..count` as fetched, so no sector written while the grow
    /// is under way unmarks them. The caller holds the metadata file's lock.
    pub fn begin_grow(&self, count: usize) {
        self.on_file.store(count.max(self.count()), SeqCst);
    }

    /// The grow did not happen: the new stripes are no longer encoded.
    pub fn abort_grow(&self) {
        self.on_file.store(self.count(), SeqCst);
    }

    /// Grows to a disk of `disk_sectors` sectors (at least the current size), its new
    /// stripes fetched (they hold zeros; no source covers them). Safe to call while channels
    /// and fetchers use the states: a new stripe is fetched before it is counted, and counted
    /// before the disk's size covers it.
    pub fn grow(&self, disk_sectors: u64) {
        let old = self.count();
        let new = usize::try_from(self.count_for(disk_sectors)).unwrap_or(usize::MAX);
        let new = new.min(self.chunks.len() * CHUNK).max(old);
        self.allocate(new);
        for i in old..new {
            self.state(i).store(FETCHED, SeqCst);
        }
        // Counted first, then fetched: `status` never shows complete when it is not.
        self.count.store(new, SeqCst);
        self.on_file.store(new, SeqCst);
        self.fetched.fetch_add(new - old, SeqCst);
        self.disk_sectors.fetch_max(disk_sectors, SeqCst);
    }

    pub fn stripe_bytes(&self) -> u64 {
        (SECTOR_SIZE as u64) << self.shift
    }

    /// The sectors of `stripe`: its first, and how many (the last stripe may be partial).
    pub fn sectors_of(&self, stripe: usize) -> (u64, u64) {
        let first = (stripe as u64) << self.shift;
        (first, (1u64 << self.shift).min(self.disk_sectors() - first))
    }

    pub fn fetched_count(&self) -> usize {
        self.fetched.load(SeqCst)
    }

    pub fn count_with(&self, bit: u8) -> usize {
        // The allocated chunks are a prefix of the slots.
        self.chunks
            .iter()
            .map_while(OnceLock::get)
            .flat_map(|chunk| chunk.iter())
            .take(self.count())
            .filter(|s| s.load(SeqCst) & bit != 0)
            .count()
    }

    /// The stripe holding `sector`.
    pub fn stripe_of(&self, sector: u64) -> usize {
        (sector >> self.shift) as usize
    }

    pub fn is_fetched(&self, stripe: usize) -> bool {
        self.state(stripe).load(SeqCst) & FETCHED != 0
    }

    pub fn all_fetched(&self, first: usize, last: usize) -> bool {
        (first..=last).all(|s| self.is_fetched(s))
    }

    /// True when one of the stripes is neither fetched nor being fetched: its fetch failed.
    pub fn any_abandoned(&self, first: usize, last: usize) -> bool {
        (first..=last).any(|s| self.state(s).load(SeqCst) & (FETCHED | QUEUED) == 0)
    }

    /// Sets WRITTEN; true if it was not set when looked at. Two racing callers may both get
    /// true: each then records the sector as dirty before its write goes down, so a FLUSH
    /// behind either write persists the bit.
    pub fn set_written(&self, stripe: usize) -> bool {
        // A load first: the common case (already written) stays a shared cache line.
        if self.state(stripe).load(SeqCst) & WRITTEN != 0 {
            return false;
        }
        self.state(stripe).fetch_or(WRITTEN, SeqCst);
        true
    }

    /// Sets QUEUED if the stripe is neither fetched nor queued; true if this call set it.
    pub fn claim(&self, stripe: usize) -> bool {
        self.state(stripe)
            .fetch_update(SeqCst, SeqCst, |v| {
                (v & (FETCHED | QUEUED) == 0).then_some(v | QUEUED)
            })
            .is_ok()
    }

    /// A claimed stripe's fetch failed: nobody is fetching it any more.
    pub fn unclaim(&self, stripe: usize) {
        self.state(stripe).fetch_and(!QUEUED, SeqCst);
    }

    /// A claimed stripe's fetch is durable: guest I/O may use it.
    pub fn set_fetched(&self, stripe: usize) {
        self.state(stripe)
            .fetch_update(SeqCst, SeqCst, |v| Some((v | FETCHED) & !QUEUED))
            .ok();
    }

    /// Counts one more fetched stripe (after [`StripeStates::set_fetched`] and after the
    /// fetch left the pool's running count, so `status` never shows complete with work
    /// pending); returns the new count.
    pub fn count_fetched(&self) -> usize {
        self.fetched.fetch_add(1, SeqCst) + 1
    }

    /// One stripe's persistent bits (FETCHED, WRITTEN); `None` past the last stripe.
    pub fn bits_of(&self, stripe: usize) -> Option<u8> {
        (stripe < self.count()).then(|| self.state(stripe).load(SeqCst) & (FETCHED | WRITTEN))
    }

    /// Every stripe's persistent bits (FETCHED, WRITTEN), as they are now.
    pub fn bits(&self) -> Vec<u8> {
        (0..self.count()).filter_map(|i| self.bits_of(i)).collect()
    }

    /// Plaintext of metadata sector `n` (>= 1) from the in-memory state.
    pub fn encode_sector(&self, n: u64) -> [u8; SECTOR_SIZE] {
        let mut out = [0u8; SECTOR_SIZE];
        let start = (n as usize - 1) * SECTOR_SIZE;
        let (count, on_file) = (self.count(), self.on_file.load(SeqCst));
        for (i, b) in out.iter_mut().enumerate() {
            let s = start + i;
            if s < count {
                *b = self.state(s).load(SeqCst) & (FETCHED | WRITTEN);
            } else if s < on_file {
                // A grow under way: the new stripe is fetched once the disk covers it.
                *b = FETCHED;
            }
        }
        out
    }
}
