//! The replay that `replay-log` runs: a debug log's WRITEs applied to a disk and its READs
//! checked against it. The format and its parser are in [`crate::block::debuglog::format`].

use std::fs::File;
use std::io::BufRead;
use std::os::unix::fs::FileExt;

pub use crate::block::debuglog::format::LogError;
use crate::block::debuglog::format::{Item, LogReader, OpKind};
use crate::SECTOR_SIZE;

/// A READ whose logged data differs from the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The record's first line.
    pub line: u64,
    /// The record's start sector.
    pub record_sector: u64,
    /// The sector holding the first differing byte.
    pub sector: u64,
    /// The first differing byte's offset from the start of the record.
    pub offset: u64,
    /// How many bytes of the record differ.
    pub bytes: u64,
    pub len: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: READ mismatch at sector {} (offset {} in the {}-byte read of sector {}): \
             {} byte(s) differ",
            self.line, self.sector, self.offset, self.len, self.record_sector, self.bytes
        )
    }
}

/// Something `replay` reports as it goes.
#[derive(Debug)]
pub enum Event {
    Mismatch(Mismatch),
    /// The log's last record is cut short (see [`Item::Truncated`]); it was skipped.
    Truncated {
        line: u64,
        what: String,
    },
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub writes: u64,
    pub reads: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// READ records that did not match the disk.
    pub mismatches: u64,
    pub truncated: bool,
}

/// Applies every WRITE of `log` to `disk` and checks every READ against it, in log order,
/// calling `report` for each mismatch and for a truncated last record. Stops at the first
/// malformed record (the writes before it stay applied). Syncs the disk at the end.
pub fn replay<R: BufRead>(
    log: R,
    disk: &File,
    mut report: impl FnMut(Event),
) -> Result<Summary, LogError> {
    let size = crate::block::device_size(disk).map_err(LogError::Disk)?;
    let mut reader = LogReader::new(log).with_disk_size(size);
    let mut sum = Summary::default();
    let mut current = Vec::new();
    while let Some(item) = reader.next_item()? {
        let rec = match item {
            Item::Record(rec) => rec,
            Item::Truncated { line, what } => {
                sum.truncated = true;
                report(Event::Truncated { line, what });
                continue;
            }
        };
        let at = rec.sector * SECTOR_SIZE as u64;
        let len = rec.data.len() as u64;
        match rec.op {
            OpKind::Write => {
                disk.write_all_at(&rec.data, at)
                    .map_err(|e| LogError::Bad {
                        line: rec.line,
                        msg: format!("cannot write {len} bytes at sector {}: {e}", rec.sector),
                    })?;
                sum.writes += 1;
                sum.bytes_written += len;
            }
            OpKind::Read => {
                current.resize(rec.data.len(), 0);
                disk.read_exact_at(&mut current, at)
                    .map_err(|e| LogError::Bad {
                        line: rec.line,
                        msg: format!("cannot read {len} bytes at sector {}: {e}", rec.sector),
                    })?;
                sum.reads += 1;
                sum.bytes_read += len;
                if let Some(first) = rec.data.iter().zip(&current).position(|(a, b)| a != b) {
                    let bytes = rec
                        .data
                        .iter()
                        .zip(&current)
                        .filter(|(a, b)| a != b)
                        .count();
                    sum.mismatches += 1;
                    report(Event::Mismatch(Mismatch {
                        line: rec.line,
                        record_sector: rec.sector,
                        sector: rec.sector + (first / SECTOR_SIZE) as u64,
                        offset: first as u64,
                        bytes: bytes as u64,
                        len,
                    }));
                }
            }
        }
    }
    if sum.writes > 0 {
        disk.sync_data().map_err(LogError::Disk)?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::debuglog::format::format_record;

    #[test]
    fn replay_applies_writes_and_checks_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut changed = vec![3u8; 1024];
        changed[700] = 4;
        let log = format_record(OpKind::Read, 0, &[0; 512])
            + &format_record(OpKind::Write, 2, &[3; 1024])
            + &format_record(OpKind::Read, 2, &[3; 1024])
            + &format_record(OpKind::Read, 2, &changed)
            + "WRITE\n0\n512\n00";
        let mut events = Vec::new();
        let sum = replay(log.as_bytes(), &disk, |e| events.push(e)).unwrap();
        assert_eq!(
            sum,
            Summary {
                writes: 1,
                reads: 3,
                bytes_written: 1024,
                bytes_read: 2560,
                mismatches: 1,
                truncated: true,
            }
        );
        assert_eq!(events.len(), 2);
        match &events[0] {
            Event::Mismatch(m) => {
                assert_eq!((m.line, m.sector, m.offset, m.bytes), (13, 3, 700, 1));
                assert!(m.to_string().contains("sector 3"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(events[1], Event::Truncated { line: 17, .. }));
        let content = std::fs::read(&path).unwrap();
        assert!(content[..1024].iter().all(|&b| b == 0));
        assert!(content[1024..2048].iter().all(|&b| b == 3));
        assert!(content[2048..].iter().all(|&b| b == 0));
    }
}
