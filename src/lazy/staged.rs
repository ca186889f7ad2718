//! A demand fetch's stripe as it arrives from the source ([`Staged`]): guest reads of it are
//! served from here at once, instead of after the base disk write, its fdatasync and the
//! metadata update (see [`Shared::staged`](super::fetch::Shared::staged)); a read whose bytes
//! come early in the transfer (a source streaming the stripe in order, `ubiblk://`), before
//! the rest of the stripe is in.
//!
//! The fetcher reads the stripe into its own buffer, which becomes the whole staged stripe
//! once complete ([`Staged::complete`]). Before that, only the [`CHUNK`]-byte pieces that
//! parked reads wait for are copied out as they come in ([`Staged::arrived`]), each set once:
//! a read never sees bytes being written, and a transfer nobody waits on the start of costs
//! no copy.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use super::split::Dest;

/// Bytes per piece copied early: a guest read waits for at most this much more than it
/// asked for.
pub(crate) const CHUNK: usize = 64 << 10;

/// No parked read waits for bytes of the stripe.
const NOBODY: usize = usize::MAX;

pub(crate) struct Staged {
    pub stripe: usize,
    len: usize,
    chunk: usize,
    /// Pieces parked reads waited for, copied as they came in.
    pieces: Vec<OnceLock<Box<[u8]>>>,
    /// All of it, once in.
    whole: OnceLock<Arc<[u8]>>,
    /// The least start and end (bytes into the stripe) of the parked reads waiting; `end` is
    /// [`NOBODY`] when none waits. They start as the first byte: reads parked before the
    /// stripe was staged have not said what they wait for, so the first piece wakes them.
    wanted_from: AtomicUsize,
    wanted_end: AtomicUsize,
}

impl Staged {
    /// An empty stripe `stripe` of `len` bytes.
    pub fn new(stripe: usize, len: usize) -> Self {
        let chunk = CHUNK.min(len.max(1));
        Staged {
            stripe,
            len,
            chunk,
            pieces: (0..len.div_ceil(chunk)).map(|_| OnceLock::new()).collect(),
            whole: OnceLock::new(),
            wanted_from: AtomicUsize::new(0),
            wanted_end: AtomicUsize::new(1),
        }
    }

    /// The source has the stripe's first `prefix.len()` bytes, `prefix` (an attempt retried
    /// after an error may bring the same bytes again). Copies the pieces parked reads wait
    /// for that are now in; returns true if some read's bytes are all in: the caller wakes
    /// the channels.
    pub fn arrived(&self, prefix: &[u8]) -> bool {
        let end = self.wanted_end.load(SeqCst);
        // Whole pieces only.
        if end == NOBODY || (end.div_ceil(self.chunk) * self.chunk).min(self.len) > prefix.len() {
            return false;
        }
        let from = self.wanted_from.load(SeqCst).min(end - 1);
        for i in from / self.chunk..end.div_ceil(self.chunk) {
            let piece_end = ((i + 1) * self.chunk).min(self.len);
            if let Some(bytes) = prefix.get(i * self.chunk..piece_end) {
                // Only the fetcher sets pieces; one kept from an earlier attempt stays.
                self.pieces[i].get_or_init(|| bytes.into());
            }
        }
        // After the pieces (see `copy_to`): a read that says what it waits for after this
        // finds its pieces, one that said it before is woken (and says it again if its
        // bytes are not all in).
        self.wanted_from.store(NOBODY, SeqCst);
        self.wanted_end.swap(NOBODY, SeqCst) != NOBODY
    }

    /// The whole stripe, `data`, is in. Returns true if a parked read waits: the caller
    /// wakes the channels.
    pub fn complete(&self, data: Arc<[u8]>) -> bool {
        let _ = self.whole.set(data);
        self.wanted_from.store(NOBODY, SeqCst);
        self.wanted_end.swap(NOBODY, SeqCst) != NOBODY
    }

    /// Copies bytes `from..from + dest.len()` of the stripe into `dest` if they are in; else
    /// notes that a read waits for them (the [`Staged::arrived`] or [`Staged::complete`]
    /// bringing them in returns true) and returns false.
    pub fn copy_to(&self, from: usize, dest: &mut Dest) -> bool {
        let end = from + dest.len();
        if end > self.len {
            return false;
        }
        if self.copy(from, end, dest) {
            return true;
        }
        self.wanted_from.fetch_min(from, SeqCst);
        self.wanted_end.fetch_min(end, SeqCst);
        // The fetcher may have brought them in before it could see the wait.
        self.copy(from, end, dest)
    }

    fn copy(&self, from: usize, end: usize, dest: &mut Dest) -> bool {
        if let Some(whole) = self.whole.get() {
            dest.put(0, end - from, Some(&whole[from..end]));
            return true;
        }
        let first = from / self.chunk;
        let last = (end - 1) / self.chunk;
        if (first..=last).any(|i| self.pieces[i].get().is_none()) {
            return false;
        }
        let mut at = from;
        for piece in self.pieces[first..=last].iter().filter_map(OnceLock::get) {
            let within = at % self.chunk;
            let n = (piece.len() - within).min(end - at);
            dest.put(at - from, n, Some(&piece[within..within + n]));
            at += n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::IoBuf;

    fn read(s: &Staged, from: usize, len: usize) -> Option<Vec<u8>> {
        let mut d = Dest::Buf(IoBuf::new(len));
        if !s.copy_to(from, &mut d) {
            return None;
        }
        match d {
            Dest::Buf(b) => Some(b.to_vec()),
            Dest::Vecs(_) => None,
        }
    }

    #[test]
    fn reads_are_served_from_the_pieces_in_and_waits_are_woken_once() {
        let len = 3 * CHUNK + 4096;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let s = Staged::new(7, len);
        assert_eq!(read(&s, 512, 512), None);
        // Less than a piece: nothing is kept, nobody woken.
        assert!(!s.arrived(&data[..CHUNK - 1]));
        assert!(s.arrived(&data[..CHUNK + 100]));
        assert_eq!(read(&s, 512, 4096).as_deref(), Some(&data[512..4608]));
        // Across pieces 1 and 2: waits, and is woken only when both are in.
        let (from, n) = (2 * CHUNK - 512, 1024);
        assert_eq!(read(&s, from, n), None);
        assert!(!s.arrived(&data[..2 * CHUNK + 1]));
        assert!(s.arrived(&data[..3 * CHUNK]));
        assert!(!s.arrived(&data[..3 * CHUNK]), "woken twice");
        assert_eq!(read(&s, from, n).as_deref(), Some(&data[from..from + n]));
        // A retried attempt brings the first pieces again: kept as they were.
        assert!(!s.arrived(&data[..CHUNK]));
        assert_eq!(read(&s, len - 512, 512), None);
        assert!(!s.arrived(&data[..len - 1]));
        assert!(s.complete(Arc::from(&data[..])));
        assert_eq!(read(&s, 0, len).as_deref(), Some(&data[..]));
        assert_eq!(read(&s, len - 512, 1024), None, "past the stripe's end");
    }

    #[test]
    fn pieces_nobody_waits_for_are_not_copied() {
        let len = 4 * CHUNK;
        let data = vec![9u8; len];
        let s = Staged::new(0, len);
        // Nobody parked before: the first piece is kept (it may be waited for).
        assert!(s.arrived(&data[..CHUNK]));
        assert_eq!(read(&s, len - 4096, 4096), None);
        assert!(!s.arrived(&data[..3 * CHUNK]));
        assert!(s.pieces[1].get().is_none() && s.pieces[2].get().is_none());
        assert!(s.arrived(&data));
        assert!(s.pieces[1].get().is_none() && s.pieces[3].get().is_some());
        assert_eq!(read(&s, len - 4096, 4096), Some(vec![9; 4096]));
    }
}
