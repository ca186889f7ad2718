//! How a read of partly unfetched stripes is split (without fetching): fetched runs come from
//! the base disk, unfetched ones through the source's read-through channel, and past the
//! source's end zeros (with its partial last sector); and where the pieces land.

use std::io;

use super::source::StripeSource;
use super::states::StripeStates;
use crate::block::{IoBuf, IoVecs, SECTOR_SHIFT, SECTOR_SIZE};

/// One piece of a split read: sectors `[from, to)` and where they come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    Base(u64, u64),
    Source(u64, u64),
    /// Past the source's end.
    Zeros(u64, u64),
}

/// The end of the source as split reads see it.
#[derive(Clone)]
pub(crate) struct SourceEnd {
    /// Whole source sectors that lie inside the disk.
    pub sectors: u64,
    /// The source's last partial sector, zero-padded, when its size is not a multiple of 512
    /// and it lies inside the disk.
    tail: Option<(u64, Box<[u8; SECTOR_SIZE]>)>,
}

impl SourceEnd {
    /// Reads the partial last sector, so read-through channels only ever see whole sectors.
    pub fn read(source: &dyn StripeSource, disk_sectors: u64) -> io::Result<Self> {
        let bytes = source.bytes();
        let sector = bytes >> SECTOR_SHIFT;
        let partial = (bytes % SECTOR_SIZE as u64) as usize;
        let tail = if partial == 0 || sector >= disk_sectors {
            None
        } else {
            let mut tail = Box::new([0u8; SECTOR_SIZE]);
            source.read_at(sector << SECTOR_SHIFT, &mut tail[..])?;
            Some((sector, tail))
        };
        Ok(SourceEnd {
            sectors: sector.min(disk_sectors),
            tail,
        })
    }

    /// Fills `[from, to)` (past the source's end) of `dest`, a read starting at `start`.
    pub fn fill(&self, dest: &mut Dest, start: u64, from: u64, to: u64) {
        let offset = |s: u64| ((s - start) << SECTOR_SHIFT) as usize;
        dest.put(offset(from), ((to - from) << SECTOR_SHIFT) as usize, None);
        if let Some((t, data)) = &self.tail {
            if (from..to).contains(t) {
                dest.put(offset(*t), SECTOR_SIZE, Some(&data[..]));
            }
        }
    }
}

/// The pieces of a read of sectors `[at, end)`: runs of stripes in the same state, unfetched
/// runs cut at the source's end.
pub(crate) struct Pieces<'a> {
    states: &'a StripeStates,
    source_sectors: u64,
    at: u64,
    end: u64,
    /// The zeros after a source piece, yielded next.
    next: Option<Piece>,
}

impl<'a> Pieces<'a> {
    pub fn new(states: &'a StripeStates, source: &SourceEnd, at: u64, end: u64) -> Self {
        Pieces {
            states,
            source_sectors: source.sectors,
            at,
            end,
            next: None,
        }
    }
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if let Some(p) = self.next.take() {
            return Some(p);
        }
        let (at, end, st) = (self.at, self.end, self.states);
        if at >= end {
            return None;
        }
        let fetched = st.is_fetched(st.stripe_of(at));
        // Extend over following stripes in the same state.
        let mut run_end = at;
        while run_end < end && st.is_fetched(st.stripe_of(run_end)) == fetched {
            run_end = ((st.stripe_of(run_end) as u64 + 1) << st.shift).min(end);
        }
        self.at = run_end;
        if fetched {
            return Some(Piece::Base(at, run_end));
        }
        let source_end = run_end.min(self.source_sectors).max(at);
        let zeros = (source_end < run_end).then_some(Piece::Zeros(source_end, run_end));
        if source_end > at {
            self.next = zeros;
            Some(Piece::Source(at, source_end))
        } else {
            zeros
        }
    }
}

/// Where a split read's pieces land.
pub(crate) enum Dest {
    Buf(IoBuf),
    Vecs(IoVecs),
}

impl Dest {
    pub fn len(&self) -> usize {
        match self {
            Dest::Buf(b) => b.len(),
            Dest::Vecs(iov) => iov.len(),
        }
    }

    /// Copies `data` (or zeros, if `None`) to byte `offset` of the destination.
    pub fn put(&mut self, offset: usize, len: usize, data: Option<&[u8]>) {
        match self {
            Dest::Buf(b) => match data {
                Some(d) => b[offset..offset + len].copy_from_slice(&d[..len]),
                None => b[offset..offset + len].fill(0),
            },
            Dest::Vecs(iov) => {
                let mut skip = offset;
                let mut done = 0;
                for v in iov.as_slice() {
                    if done == len {
                        break;
                    }
                    if skip >= v.iov_len {
                        skip -= v.iov_len;
                        continue;
                    }
                    let n = (v.iov_len - skip).min(len - done);
                    // SAFETY: IoVecs guarantees each vector is valid for writes of `iov_len`
                    // bytes while it lives; `skip + n <= iov_len`. Our data never overlaps it.
                    unsafe {
                        let dst = v.iov_base.cast::<u8>().add(skip);
                        match data {
                            Some(d) => std::ptr::copy_nonoverlapping(d[done..].as_ptr(), dst, n),
                            None => std::ptr::write_bytes(dst, 0, n),
                        }
                    }
                    done += n;
                    skip = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::Metadata;

    #[test]
    fn pieces_follow_stripe_states_and_the_source_end() {
        // Five stripes of 64 sectors, stripe 1 fetched; the source ends in sector 160.
        let mut md = Metadata::new(5 * 64, 6).unwrap();
        md.set_fetched(1);
        let states = StripeStates::new(&md, 5 * 64);
        let mut tail = Box::new([0u8; SECTOR_SIZE]);
        tail[..100].fill(7);
        let end = SourceEnd {
            sectors: 160,
            tail: Some((160, tail)),
        };
        let pieces: Vec<Piece> = Pieces::new(&states, &end, 10, 300).collect();
        assert_eq!(
            pieces,
            [
                Piece::Source(10, 64),
                Piece::Base(64, 128),
                Piece::Source(128, 160),
                Piece::Zeros(160, 300),
            ]
        );
        // Zeros past the end, except the source's partial last sector.
        let mut dest = Dest::Buf(IoBuf::new(3 * SECTOR_SIZE));
        dest.put(0, 3 * SECTOR_SIZE, Some(&[0xff; 3 * SECTOR_SIZE]));
        end.fill(&mut dest, 159, 160, 162);
        let Dest::Buf(b) = dest else { unreachable!() };
        assert!(b[..512].iter().all(|&x| x == 0xff));
        assert!(b[512..612].iter().all(|&x| x == 7));
        assert!(b[612..].iter().all(|&x| x == 0));
    }
}
