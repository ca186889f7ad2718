//! The lazy-fetch metadata file (`metadata_path`), byte-compatible with the reference tools
//! (docs/formats.md; the layout is specified in docs/lazy-fetch.md, "Metadata file format"):
//!
//! | bytes        | content                                                        |
//! |--------------|----------------------------------------------------------------|
//! | `0..9`       | magic `BDEV_UBI\0`                                             |
//! | `9..11`      | version major, u16 LE (0)                                      |
//! | `11..13`     | version minor, u16 LE (0)                                      |
//! | `13`         | `stripe_sector_count_shift` (6..=16)                           |
//! | `14..512`    | zero                                                           |
//! | `512 + i`    | stripe `i`: bit 0 fetched, bit 1 written, other bits zero      |
//! | ... to a 512-byte boundary | zero padding                                     |
//!
//! The stripe count is `ceil(disk_sectors / 2^shift)`. With encryption configured the whole file
//! is AES-XTS encrypted with the disk key, one 512-byte sector per data unit, the LBA counted
//! from the start of the metadata file (sector 0 is the header).
//!
//! Every stripe byte lives in exactly one 512-byte sector ([`Metadata::sector_of_stripe_byte`]),
//! so a state change can be persisted with a single-sector write ([`Metadata::write_sector`]),
//! which storage writes atomically.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::crypto::Xts;

/// Size of a sector, of the header, and of the unit of encryption.
pub const SECTOR_SIZE: usize = 512;
/// The magic at offset 0, NUL included.
pub const MAGIC: &[u8; 9] = b"BDEV_UBI\0";
/// The version this build writes and reads.
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 0;
/// Offsets in the header.
pub const VERSION_MAJOR_OFFSET: usize = 9;
pub const VERSION_MINOR_OFFSET: usize = 11;
pub const SHIFT_OFFSET: usize = 13;
/// First byte after the used header fields; bytes from here to 512 are reserved (zero).
pub const RESERVED_OFFSET: usize = 14;
/// Allowed values of `stripe_sector_count_shift` (32 KiB to 32 MiB stripes).
pub const MIN_SHIFT: u8 = 6;
pub const MAX_SHIFT: u8 = 16;
/// init-metadata's default shift (1 MiB stripes).
pub const DEFAULT_SHIFT: u8 = 11;
/// Stripe byte bits.
pub const FETCHED: u8 = 1 << 0;
pub const WRITTEN: u8 = 1 << 1;
const KNOWN_BITS: u8 = FETCHED | WRITTEN;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(
        "stripe_sector_count_shift {shift} is out of range: allowed {MIN_SHIFT}..={MAX_SHIFT}"
    )]
    Shift { shift: u8 },
    #[error("metadata is {len} bytes, too short for the 512-byte header")]
    NoHeader { len: usize },
    #[error(
        "bad magic: expected \"BDEV_UBI\\0\", found {found:02x?} (not a metadata file made by \
         init-metadata, or its encryption does not match the configured encryption_key)"
    )]
    Magic { found: [u8; 9] },
    #[error("unsupported metadata version {major}.{minor} (this build reads 0.0)")]
    Version { major: u16, minor: u16 },
    #[error("reserved header byte {offset} is {value:#04x}, bytes 14..512 must be zero")]
    Reserved { offset: usize, value: u8 },
    #[error(
        "stripe count mismatch: a disk of {disk_sectors} sectors needs {need} stripes of \
         2^{shift} sectors ({need_bytes} bytes of metadata), but the metadata is only {len} bytes \
         (made for a smaller disk or another stripe size?)"
    )]
    TooShort {
        disk_sectors: u64,
        shift: u8,
        need: u64,
        need_bytes: u64,
        len: u64,
    },
    #[error(
        "stripe count mismatch: padding byte {offset} after the last of {stripes} stripes is \
         {value:#04x}, expected zero (metadata made for a larger disk?)"
    )]
    Padding {
        offset: usize,
        stripes: usize,
        value: u8,
    },
    #[error("stripe {stripe} has unknown bits set ({value:#04x}); only bit 0 (fetched) and bit 1 (written) are defined")]
    UnknownBits { stripe: usize, value: u8 },
    #[error("a disk of {disk_sectors} sectors needs too many stripes for this machine")]
    TooLarge { disk_sectors: u64 },
    #[error("metadata {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn check_shift(shift: u8) -> Result<(), MetadataError> {
    if (MIN_SHIFT..=MAX_SHIFT).contains(&shift) {
        Ok(())
    } else {
        Err(MetadataError::Shift { shift })
    }
}

/// Number of stripes of `2^shift` sectors covering `disk_sectors` (the last one may be partial).
pub fn stripe_count(disk_sectors: u64, shift: u8) -> u64 {
    disk_sectors.div_ceil(1u64 << shift)
}

/// Length of the metadata file for `stripes` stripes: header + stripe bytes, padded to a sector.
pub fn file_len(stripes: u64) -> u64 {
    SECTOR_SIZE as u64 + stripes.div_ceil(SECTOR_SIZE as u64) * SECTOR_SIZE as u64
}

/// The in-memory metadata: the stripe size and one state byte per stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub stripe_shift: u8,
    /// One byte per stripe: bit 0 fetched, bit 1 written.
    pub stripes: Vec<u8>,
}

impl Metadata {
    /// Fresh metadata (nothing fetched, nothing written) for a disk of `disk_sectors` sectors
    /// with stripes of `2^shift` sectors.
    pub fn new(disk_sectors: u64, shift: u8) -> Result<Self, MetadataError> {
        check_shift(shift)?;
        let count = usize::try_from(stripe_count(disk_sectors, shift))
            .map_err(|_| MetadataError::TooLarge { disk_sectors })?;
        Ok(Metadata {
            stripe_shift: shift,
            stripes: vec![0; count],
        })
    }

    pub fn stripe_count(&self) -> usize {
        self.stripes.len()
    }

    /// Sectors per stripe.
    pub fn stripe_sectors(&self) -> u64 {
        1 << self.stripe_shift
    }

    /// Bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        (SECTOR_SIZE as u64) << self.stripe_shift
    }

    /// Length of the metadata file in bytes (a multiple of 512).
    pub fn file_len(&self) -> u64 {
        file_len(self.stripes.len() as u64)
    }

    /// Number of 512-byte sectors of the metadata file (header included).
    pub fn sector_count(&self) -> u64 {
        self.file_len() / SECTOR_SIZE as u64
    }

    /// Panics if `i` is not a stripe.
    pub fn is_fetched(&self, i: usize) -> bool {
        self.stripes[i] & FETCHED != 0
    }

    /// Panics if `i` is not a stripe.
    pub fn set_fetched(&mut self, i: usize) {
        self.stripes[i] |= FETCHED;
    }

    /// Panics if `i` is not a stripe.
    pub fn is_written(&self, i: usize) -> bool {
        self.stripes[i] & WRITTEN != 0
    }

    /// Panics if `i` is not a stripe.
    pub fn set_written(&mut self, i: usize) {
        self.stripes[i] |= WRITTEN;
    }

    pub fn fetched_count(&self) -> usize {
        self.stripes.iter().filter(|&&b| b & FETCHED != 0).count()
    }

    pub fn written_count(&self) -> usize {
        self.stripes.iter().filter(|&&b| b & WRITTEN != 0).count()
    }

    /// Maximal runs of fetched stripes, as inclusive `(first, last)` pairs in order.
    pub fn fetched_ranges(&self) -> Vec<(usize, usize)> {
        self.ranges(FETCHED)
    }

    /// Maximal runs of written stripes, as inclusive `(first, last)` pairs in order.
    pub fn written_ranges(&self) -> Vec<(usize, usize)> {
        self.ranges(WRITTEN)
    }

    fn ranges(&self, bit: u8) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (i, b) in self.stripes.iter().enumerate() {
            if b & bit == 0 {
                continue;
            }
            match out.last_mut() {
                Some((_, last)) if *last + 1 == i => *last = i,
                _ => out.push((i, i)),
            }
        }
        out
    }

    /// The 512-byte metadata sector (counted from the start of the file) that holds stripe `i`'s
    /// byte: persisting a change of stripe `i` means rewriting this one sector.
    pub fn sector_of_stripe_byte(i: usize) -> u64 {
        ((SECTOR_SIZE + i) / SECTOR_SIZE) as u64
    }

    /// The plaintext of metadata sector `n` (0 is the header). Panics if `n >= sector_count()`.
    pub fn encode_sector(&self, n: u64) -> [u8; SECTOR_SIZE] {
        assert!(
            n < self.sector_count(),
            "metadata sector {n} out of range (file has {} sectors)",
            self.sector_count()
        );
        let mut out = [0u8; SECTOR_SIZE];
        if n == 0 {
            out[..MAGIC.len()].copy_from_slice(MAGIC);
            out[VERSION_MAJOR_OFFSET..VERSION_MAJOR_OFFSET + 2]
                .copy_from_slice(&VERSION_MAJOR.to_le_bytes());
            out[VERSION_MINOR_OFFSET..VERSION_MINOR_OFFSET + 2]
                .copy_from_slice(&VERSION_MINOR.to_le_bytes());
            out[SHIFT_OFFSET] = self.stripe_shift;
        } else {
            let start = (n as usize - 1) * SECTOR_SIZE;
            let end = (start + SECTOR_SIZE).min(self.stripes.len());
            out[..end - start].copy_from_slice(&self.stripes[start..end]);
        }
        out
    }

    /// The whole plaintext file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.file_len() as usize);
        for n in 0..self.sector_count() {
            out.extend_from_slice(&self.encode_sector(n));
        }
        out
    }

    /// Parses and validates plaintext metadata for a disk of `disk_sectors` sectors. `bytes` may
    /// be longer than the file (e.g. a whole block device): bytes past the last padded sector are
    /// ignored.
    pub fn from_bytes(bytes: &[u8], disk_sectors: u64) -> Result<Self, MetadataError> {
        let shift = parse_header(bytes)?;
        let need = stripe_count(disk_sectors, shift);
        let need_bytes = file_len(need);
        if (bytes.len() as u64) < need_bytes {
            return Err(MetadataError::TooShort {
                disk_sectors,
                shift,
                need,
                need_bytes,
                len: bytes.len() as u64,
            });
        }
        let count = usize::try_from(need).map_err(|_| MetadataError::TooLarge { disk_sectors })?;
        let stripes = &bytes[SECTOR_SIZE..SECTOR_SIZE + count];
        if let Some((stripe, &value)) = stripes
            .iter()
            .enumerate()
            .find(|(_, &b)| b & !KNOWN_BITS != 0)
        {
            return Err(MetadataError::UnknownBits { stripe, value });
        }
        let end = need_bytes as usize;
        // A grow (resize) that did not finish marked the stripes past the disk's end fetched,
        // in one run from the first: accepted and ignored (see crate::lazy `grow`).
        let padding = &bytes[SECTOR_SIZE + count..end];
        let grown = padding.iter().take_while(|&&b| b == FETCHED).count();
        if grown > 0 {
            log::warn!(
                "metadata: {grown} stripes past the disk's {count} are marked fetched by a grow \
                 that did not finish; ignored (resize again to finish it)"
            );
        }
        if let Some((i, &value)) = padding[grown..]
            .iter()
            .enumerate()
            .map(|(i, b)| (i + grown, b))
            .find(|(_, &b)| b != 0)
        {
            return Err(MetadataError::Padding {
                offset: SECTOR_SIZE + count + i,
                stripes: count,
                value,
            });
        }
        Ok(Metadata {
            stripe_shift: shift,
            stripes: stripes.to_vec(),
        })
    }

    /// Writes the whole file at offset 0 of `file` (encrypted when `xts` is given), durably.
    /// Does not truncate: the caller creates/truncates a regular file.
    ///
    /// On a block device (or any file that held metadata before) the old contents are
    /// overwritten in place, and a process killed inside one large write leaves it half
    /// written: a new header over the old stripe states would claim stripes fetched that are
    /// not. So the header is invalidated first, the stripe states written next, and the new
    /// header last, each step synced: a crash anywhere leaves either the old metadata, an
    /// invalid header (refused at start: run init-metadata again) or the new metadata, never
    /// a mix.
    pub fn write_to(&self, file: &File, xts: Option<&Xts>) -> Result<(), MetadataError> {
        self.write_to_with(file, xts, |_| Ok(()))
    }

    /// [`Metadata::write_to`], calling `after` once each of its three steps is durable (tests
    /// stop it there, as a crash would).
    fn write_to_with(
        &self,
        file: &File,
        xts: Option<&Xts>,
        mut after: impl FnMut(usize) -> std::io::Result<()>,
    ) -> Result<(), MetadataError> {
        let mut buf = self.to_bytes();
        if let Some(xts) = xts {
            xts.encrypt(0, &mut buf);
        }
        let (header, states) = buf.split_at(SECTOR_SIZE);
        let io = |what: &'static str| move |source| MetadataError::Io { what, source };
        let steps: [(&[u8], u64); 3] = [
            (&[0; SECTOR_SIZE], 0),
            (states, SECTOR_SIZE as u64),
            (header, 0),
        ];
        for (step, (bytes, at)) in steps.into_iter().enumerate() {
            file.write_all_at(bytes, at).map_err(io("write"))?;
            file.sync_data().map_err(io("fdatasync"))?;
            after(step).map_err(io("write"))?;
        }
        Ok(())
    }

    /// Writes metadata sector `n` alone (encrypted with LBA `n` when `xts` is given), without
    /// syncing: the crash-safe update of one stripe's state is `write_sector` then fdatasync.
    pub fn write_sector(
        &self,
        file: &File,
        n: u64,
        xts: Option<&Xts>,
    ) -> Result<(), MetadataError> {
        write_sector(file, n, self.encode_sector(n), xts).map_err(|source| MetadataError::Io {
            what: "write",
            source,
        })
    }

    /// Reads and validates the metadata of a disk of `disk_sectors` sectors from `file`
    /// (a regular file or a block device), decrypting it when `xts` is given.
    pub fn read_from(
        file: &File,
        disk_sectors: u64,
        xts: Option<&Xts>,
    ) -> Result<Self, MetadataError> {
        let read = |buf: &mut [u8], offset: u64| -> Result<usize, MetadataError> {
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(MetadataError::Io {
                            what: "read",
                            source,
                        })
                    }
                }
            }
            Ok(done)
        };
        let mut header = [0u8; SECTOR_SIZE];
        let got = read(&mut header, 0)?;
        if got < SECTOR_SIZE {
            return Err(MetadataError::NoHeader { len: got });
        }
        if let Some(xts) = xts {
            xts.decrypt(0, &mut header);
        }
        let shift = parse_header(&header)?;
        let need_bytes = file_len(stripe_count(disk_sectors, shift));
        let need =
            usize::try_from(need_bytes).map_err(|_| MetadataError::TooLarge { disk_sectors })?;
        let mut buf = vec![0u8; need];
        buf[..SECTOR_SIZE].copy_from_slice(&header);
        let got = SECTOR_SIZE + read(&mut buf[SECTOR_SIZE..], SECTOR_SIZE as u64)?;
        // Decrypt whole sectors only; a short file is reported by from_bytes.
        let whole = got / SECTOR_SIZE * SECTOR_SIZE;
        buf.truncate(whole);
        if let Some(xts) = xts {
            xts.decrypt(1, &mut buf[SECTOR_SIZE..]);
        }
        Self::from_bytes(&buf, disk_sectors)
    }
}

/// Writes the plaintext `sector` as metadata sector `n` of `file`, encrypted with LBA `n` when
/// `xts` is given; no sync.
pub fn write_sector(
    file: &File,
    n: u64,
    mut sector: [u8; SECTOR_SIZE],
    xts: Option<&Xts>,
) -> std::io::Result<()> {
    if let Some(xts) = xts {
        xts.encrypt(n, &mut sector);
    }
    file.write_all_at(&sector, n * SECTOR_SIZE as u64)
}

/// Validates the header sector and returns the shift.
fn parse_header(bytes: &[u8]) -> Result<u8, MetadataError> {
    if bytes.len() < SECTOR_SIZE {
        return Err(MetadataError::NoHeader { len: bytes.len() });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        let mut found = [0u8; 9];
        found.copy_from_slice(&bytes[..9]);
        return Err(MetadataError::Magic { found });
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let (major, minor) = (u16_at(VERSION_MAJOR_OFFSET), u16_at(VERSION_MINOR_OFFSET));
    if (major, minor) != (VERSION_MAJOR, VERSION_MINOR) {
        return Err(MetadataError::Version { major, minor });
    }
    let shift = bytes[SHIFT_OFFSET];
    check_shift(shift)?;
    if let Some((i, &value)) = bytes[RESERVED_OFFSET..SECTOR_SIZE]
        .iter()
        .enumerate()
        .find(|(_, &b)| b != 0)
    {
        return Err(MetadataError::Reserved {
            offset: RESERVED_OFFSET + i,
            value,
        });
    }
    Ok(shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8], disk_sectors: u64) -> String {
        Metadata::from_bytes(bytes, disk_sectors)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn header_layout_is_exactly_compat() {
        let m = Metadata::new(4096, 11).unwrap();
        let b = m.to_bytes();
        assert_eq!(&b[0..9], b"BDEV_UBI\0");
        assert_eq!(&b[9..11], &[0, 0]); // major LE
        assert_eq!(&b[11..13], &[0, 0]); // minor LE
        assert_eq!(b[13], 11);
        assert!(b[14..512].iter().all(|&x| x == 0));
        assert_eq!(b.len(), 1024);
        assert!(b[512..].iter().all(|&x| x == 0));
    }

    #[test]
    fn stripe_bytes_start_at_512_and_pad_to_a_sector() {
        let mut m = Metadata::new(3 << 6, 6).unwrap();
        assert_eq!(m.stripe_count(), 3);
        m.set_fetched(0);
        m.set_written(2);
        m.set_fetched(2);
        let b = m.to_bytes();
        assert_eq!(b.len(), 1024);
        assert_eq!(b[512], FETCHED);
        assert_eq!(b[513], 0);
        assert_eq!(b[514], FETCHED | WRITTEN);
        assert!(b[515..].iter().all(|&x| x == 0));
    }

    #[test]
    fn partial_last_stripe_and_sizes() {
        // 100 MiB + 512 B: 204801 sectors, shift 11 -> 101 stripes.
        let m = Metadata::new(204_801, 11).unwrap();
        assert_eq!(m.stripe_count(), 101);
        assert_eq!(m.file_len(), 1024);
        assert_eq!(Metadata::new(204_800, 11).unwrap().stripe_count(), 100);
        assert_eq!(Metadata::new(0, 11).unwrap().stripe_count(), 0);
        assert_eq!(Metadata::new(0, 11).unwrap().to_bytes().len(), 512);
        assert_eq!(Metadata::new(1, 16).unwrap().stripe_count(), 1);
        // 512 stripes fill exactly one sector; 513 need two.
        assert_eq!(Metadata::new(512 << 6, 6).unwrap().file_len(), 1024);
        assert_eq!(Metadata::new((512 << 6) + 1, 6).unwrap().file_len(), 1536);
        assert_eq!(m.stripe_bytes(), 1 << 20);
        assert_eq!(m.stripe_sectors(), 2048);
    }

    #[test]
    fn shift_range() {
        for s in [0, 5, 17, 255] {
            let e = Metadata::new(100, s).unwrap_err().to_string();
            assert!(
                e.contains("stripe_sector_count_shift") && e.contains("6..=16"),
                "{e}"
            );
        }
        for s in 6..=16 {
            assert_eq!(Metadata::new(100, s).unwrap().stripe_shift, s);
        }
    }

    #[test]
    fn round_trip() {
        let mut m = Metadata::new(2000 << 6, 6).unwrap();
        for i in (0..2000).step_by(7) {
            m.set_fetched(i);
        }
        for i in (0..2000).step_by(11) {
            m.set_written(i);
            m.set_fetched(i);
        }
        let b = m.to_bytes();
        assert_eq!(b.len() % 512, 0);
        let back = Metadata::from_bytes(&b, 2000 << 6).unwrap();
        assert_eq!(back, m);
        assert!(back.is_fetched(7) && !back.is_written(7));
        assert!(back.is_fetched(11) && back.is_written(11));
        assert!(!back.is_fetched(1) && !back.is_written(1));
        // Longer input (a block device) is accepted; the tail is ignored.
        let mut long = b.clone();
        long.extend_from_slice(&[0xff; 4096]);
        assert_eq!(Metadata::from_bytes(&long, 2000 << 6).unwrap(), m);
    }

    #[test]
    fn counts_ranges_and_sectors() {
        let mut m = Metadata::new(64 << 6, 6).unwrap();
        for i in (0..10).chain([12]).chain(40..64) {
            m.set_fetched(i);
        }
        m.set_written(3);
        assert_eq!(m.fetched_count(), 35);
        assert_eq!(m.written_count(), 1);
        assert_eq!(m.fetched_ranges(), vec![(0, 9), (12, 12), (40, 63)]);
        assert_eq!(m.written_ranges(), vec![(3, 3)]);
        assert!(Metadata::new(10, 6).unwrap().fetched_ranges().is_empty());
        assert_eq!(Metadata::sector_of_stripe_byte(0), 1);
        assert_eq!(Metadata::sector_of_stripe_byte(511), 1);
        assert_eq!(Metadata::sector_of_stripe_byte(512), 2);
        assert_eq!(Metadata::sector_of_stripe_byte(1500), 3);
    }

    #[test]
    fn encode_sector_matches_to_bytes() {
        let mut m = Metadata::new(1300 << 6, 6).unwrap();
        m.set_fetched(0);
        m.set_fetched(511);
        m.set_written(512);
        m.set_fetched(1299);
        let b = m.to_bytes();
        assert_eq!(m.sector_count(), 4);
        for n in 0..4u64 {
            let s = m.encode_sector(n);
            assert_eq!(
                &s[..],
                &b[n as usize * 512..(n as usize + 1) * 512],
                "sector {n}"
            );
        }
        let s = m.encode_sector(Metadata::sector_of_stripe_byte(1299));
        assert_eq!(s[1299 - 1024], FETCHED);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let disk = 100u64 << 6;
        let good = Metadata::new(disk, 6).unwrap().to_bytes();

        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b, disk).contains("magic"));
        let mut b = good.clone();
        b[8] = b'!';
        assert!(err(&b, disk).contains("magic"));

        let mut b = good.clone();
        b[9] = 1;
        let e = err(&b, disk);
        assert!(e.contains("version 1.0"), "{e}");
        let mut b = good.clone();
        b[12] = 1; // minor high byte: 256
        let e = err(&b, disk);
        assert!(e.contains("version 0.256"), "{e}");

        for s in [5u8, 17] {
            let mut b = good.clone();
            b[13] = s;
            let e = err(&b, disk);
            assert!(e.contains("stripe_sector_count_shift") && e.contains(&s.to_string()));
        }

        for off in [14usize, 200, 511] {
            let mut b = good.clone();
            b[off] = 0x5a;
            let e = err(&b, disk);
            assert!(
                e.contains("reserved") && e.contains(&off.to_string()),
                "{e}"
            );
        }

        // The disk needs more stripes than the file holds.
        let e = err(&good, 600 << 6);
        assert!(
            e.contains("stripe count mismatch") && e.contains("600"),
            "{e}"
        );
        // Fewer stripes than the file marks: the extra stripe bytes are in the padding.
        let mut m = Metadata::new(disk, 6).unwrap();
        m.set_written(99);
        let e = err(&m.to_bytes(), 50 << 6);
        assert!(
            e.contains("stripe count mismatch") && e.contains("padding"),
            "{e}"
        );

        let mut b = good.clone();
        b[512 + 42] = 0x04;
        let e = err(&b, disk);
        assert!(e.contains("stripe 42") && e.contains("unknown bits"), "{e}");
        let mut b = good.clone();
        b[512 + 99] = 0x83;
        assert!(err(&b, disk).contains("stripe 99"));

        let e = err(&good[..100], disk);
        assert!(e.contains("too short"), "{e}");
        let e = err(&good[..512], disk);
        assert!(e.contains("stripe count mismatch"), "{e}");
    }

    /// A grow that did not finish: the stripes past the disk's end, marked fetched in one run
    /// from the first, are ignored; anything else in the padding is still refused.
    #[test]
    fn fetched_stripes_past_the_end_from_an_unfinished_grow_are_ignored() {
        let mut grown = Metadata::new(100 << 6, 6).unwrap();
        for i in 50..100 {
            grown.set_fetched(i);
        }
        grown.set_fetched(3);
        let b = grown.to_bytes();
        let md = Metadata::from_bytes(&b, 50 << 6).unwrap();
        assert_eq!(md.stripe_count(), 50);
        assert_eq!(md.fetched_ranges(), vec![(3, 3)]);
        // A gap in the run, or a written stripe, is not a grow.
        let mut gap = grown.clone();
        gap.stripes[60] = 0;
        assert!(err(&gap.to_bytes(), 50 << 6).contains("padding byte 573"));
        let mut written = grown.clone();
        written.set_written(70);
        assert!(err(&written.to_bytes(), 50 << 6).contains("padding byte 582"));
    }

    fn xts() -> Xts {
        Xts::new(&[0x11; 32], &[0x7e; 32])
    }

    #[test]
    fn encrypted_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let disk = 1000u64 << 6;
        let mut m = Metadata::new(disk, 6).unwrap();
        m.set_fetched(3);
        m.set_fetched(700);
        m.set_written(700);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let x = xts();
        m.write_to(&f, Some(&x)).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len(), 1536);
        assert!(!raw.windows(8).any(|w| w == b"BDEV_UBI"));
        let plain = m.to_bytes();
        for k in 0..3usize {
            let mut s = raw[k * 512..(k + 1) * 512].to_vec();
            x.decrypt(k as u64, &mut s);
            assert_eq!(s, &plain[k * 512..(k + 1) * 512], "sector {k}");
        }
        assert_eq!(Metadata::read_from(&f, disk, Some(&x)).unwrap(), m);
        // Without the key, or with another key, the magic is wrong.
        let e = Metadata::read_from(&f, disk, None).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        let other = Xts::new(&[1; 32], &[2; 32]);
        let e = Metadata::read_from(&f, disk, Some(&other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic"), "{e}");

        // A single-sector update lands encrypted with its own LBA.
        m.set_fetched(600);
        let n = Metadata::sector_of_stripe_byte(600);
        m.write_sector(&f, n, Some(&x)).unwrap();
        assert_eq!(Metadata::read_from(&f, disk, Some(&x)).unwrap(), m);

        // Plain write/read and a short file.
        m.write_to(&f, None).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..9], MAGIC);
        assert_eq!(Metadata::read_from(&f, disk, None).unwrap(), m);
        f.set_len(1024).unwrap();
        let e = Metadata::read_from(&f, disk, None).unwrap_err().to_string();
        assert!(e.contains("stripe count mismatch"), "{e}");
        f.set_len(10).unwrap();
        let e = Metadata::read_from(&f, disk, None).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
    }

    /// Old metadata (every stripe fetched) overwritten in place by new metadata (nothing
    /// fetched), with a crash after each step of the write: what is read back is the old
    /// metadata, an error, or the new metadata, never the new header over old states.
    #[test]
    fn an_in_place_rewrite_cut_short_never_mixes_old_states_with_a_new_header() {
        for xts in [None, Some(Xts::new(&[5; 32], &[6; 32]))] {
            let sectors = 1 << 16; // 64 stripes of 512 sectors (shift 9)
            let mut old = Metadata::new(sectors, 9).unwrap();
            for s in 0..old.stripe_count() {
                old.set_fetched(s);
            }
            let new = Metadata::new(sectors, 9).unwrap();
            for crash_after in 0..3 {
                let f = tempfile::tempfile().unwrap();
                old.write_to(&f, xts.as_ref()).unwrap();
                let cut = new.write_to_with(&f, xts.as_ref(), |step| {
                    if step == crash_after {
                        Err(std::io::Error::other("crash"))
                    } else {
                        Ok(())
                    }
                });
                assert!(cut.is_err());
                match Metadata::read_from(&f, sectors, xts.as_ref()) {
                    Ok(m) => {
                        assert_eq!(crash_after, 2, "a whole metadata before the last step");
                        assert_eq!(m.fetched_count(), 0, "the new metadata, whole");
                    }
                    Err(_) => assert!(crash_after < 2, "step {crash_after}"),
                }
            }
        }
    }
}
