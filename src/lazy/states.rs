//! The in-memory state of every stripe: the metadata bits (FETCHED, WRITTEN) plus QUEUED while
//! a fetch is pending or running, one atomic byte per stripe so the data path reads them
//! without a lock.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};

use super::metadata::{Metadata, FETCHED, SECTOR_SIZE, WRITTEN};

/// In memory only: a fetch of the stripe is queued or running.
pub(crate) const QUEUED: u8 = 1 << 7;

pub(crate) struct StripeStates {
    states: Box<[AtomicU8]>,
    /// Stripes hold 2^shift sectors.
    pub shift: u8,
    pub disk_sectors: u64,
    fetched: AtomicUsize,
}

impl StripeStates {
    pub fn new(md: &Metadata, disk_sectors: u64) -> Self {
        StripeStates {
            states: md.stripes.iter().map(|&b| AtomicU8::new(b)).collect(),
            shift: md.stripe_shift,
            disk_sectors,
            fetched: AtomicUsize::new(md.fetched_count()),
        }
    }

    pub fn count(&self) -> usize {
        self.states.len()
    }

    pub fn stripe_bytes(&self) -> u64 {
        (SECTOR_SIZE as u64) << self.shift
    }

    /// The sectors of `stripe`: its first, and how many (the last stripe may be partial).
    pub fn sectors_of(&self, stripe: usize) -> (u64, u64) {
        let first = (stripe as u64) << self.shift;
        (first, (1u64 << self.shift).min(self.disk_sectors - first))
    }

    pub fn fetched_count(&self) -> usize {
        self.fetched.load(SeqCst)
    }

    pub fn count_with(&self, bit: u8) -> usize {
        self.states
            .iter()
            .filter(|s| s.load(SeqCst) & bit != 0)
            .count()
    }

    /// The stripe holding `sector`.
    pub fn stripe_of(&self, sector: u64) -> usize {
        (sector >> self.shift) as usize
    }

    pub fn is_fetched(&self, stripe: usize) -> bool {
        self.states[stripe].load(SeqCst) & FETCHED != 0
    }

    pub fn all_fetched(&self, first: usize, last: usize) -> bool {
        (first..=last).all(|s| self.is_fetched(s))
    }

    /// True when one of the stripes is neither fetched nor being fetched: its fetch failed.
    pub fn any_abandoned(&self, first: usize, last: usize) -> bool {
        (first..=last).any(|s| self.states[s].load(SeqCst) & (FETCHED | QUEUED) == 0)
    }

    /// Sets WRITTEN; true if it was not set when looked at. Two racing callers may both get
    /// true: each then records the sector as dirty before its write goes down, so a FLUSH
    /// behind either write persists the bit.
    pub fn set_written(&self, stripe: usize) -> bool {
        // A load first: the common case (already written) stays a shared cache line.
        if self.states[stripe].load(SeqCst) & WRITTEN != 0 {
            return false;
        }
        self.states[stripe].fetch_or(WRITTEN, SeqCst);
        true
    }

    /// Sets QUEUED if the stripe is neither fetched nor queued; true if this call set it.
    pub fn claim(&self, stripe: usize) -> bool {
        self.states[stripe]
            .fetch_update(SeqCst, SeqCst, |v| {
                (v & (FETCHED | QUEUED) == 0).then_some(v | QUEUED)
            })
            .is_ok()
    }

    /// A claimed stripe's fetch failed: nobody is fetching it any more.
    pub fn unclaim(&self, stripe: usize) {
        self.states[stripe].fetch_and(!QUEUED, SeqCst);
    }

    /// A claimed stripe's fetch is durable: guest I/O may use it.
    pub fn set_fetched(&self, stripe: usize) {
        self.states[stripe]
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
        Some(self.states.get(stripe)?.load(SeqCst) & (FETCHED | WRITTEN))
    }

    /// Every stripe's persistent bits (FETCHED, WRITTEN), as they are now.
    pub fn bits(&self) -> Vec<u8> {
        self.states
            .iter()
            .map(|s| s.load(SeqCst) & (FETCHED | WRITTEN))
            .collect()
    }

    /// Plaintext of metadata sector `n` (>= 1) from the in-memory state.
    pub fn encode_sector(&self, n: u64) -> [u8; SECTOR_SIZE] {
        let mut out = [0u8; SECTOR_SIZE];
        let start = (n as usize - 1) * SECTOR_SIZE;
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(s) = self.states.get(start + i) {
                *b = s.load(SeqCst) & (FETCHED | WRITTEN);
            }
        }
        out
    }
}
