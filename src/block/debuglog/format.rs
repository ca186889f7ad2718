//! The I/O debug log's text format (`io_debug_path`): what [`super::DebugLogDevice`] writes,
//! and a streaming parser of it (`replay-log` replays what it reads, see `crate::tools::replay`).
//!
//! # Format
//!
//! Plain ASCII, one record = four lines, each ending in `\n`:
//!
//! 1. `READ` or `WRITE`;
//! 2. the start sector, decimal;
//! 3. the length in bytes, decimal: a multiple of 512 (the backend only moves whole sectors);
//! 4. the data, `length * 2` lowercase hex digits without separators (an empty line for a
//!    zero-length record).
//!
//! The parser is strict: anything else (an unknown op line, a number with signs, spaces or
//! `\r`, uppercase or odd-length hex, a hex line whose length is not twice the length field, a
//! length that is not a multiple of 512) is an error naming the 1-based line. The one
//! exception is the end of the file: a record cut short there (the file ends between its lines,
//! or inside a line whose text so far is valid) is what a crash leaves behind, and is reported
//! as [`Item::Truncated`] instead. A final line that is complete but lacks its `\n` is accepted.
//!
//! Records are read one at a time, so a log of any size is replayed in constant memory (plus
//! the largest record).

use std::io::{self, BufRead, Read};

use crate::SECTOR_SIZE;

/// The two kinds of record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "READ",
            OpKind::Write => "WRITE",
        }
    }
}

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub op: OpKind,
    pub sector: u64,
    pub data: Vec<u8>,
    /// The 1-based line of the record's first (`READ`/`WRITE`) line.
    pub line: u64,
}

/// What the parser found next.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Record(Record),
    /// The file ends inside a record, which starts at `line`; nothing follows.
    Truncated {
        line: u64,
        what: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is malformed, or a record does not fit the disk.
    #[error("line {line}: {msg}")]
    Bad { line: u64, msg: String },
    #[error("cannot read the log: {0}")]
    Read(io::Error),
    /// The disk could not be examined or synced.
    #[error("{0}")]
    Disk(io::Error),
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Formats one record, with its trailing newline. `len` is `data.len()`.
pub fn format_record(op: OpKind, sector: u64, data: &[u8]) -> String {
    let head = format!("{}\n{}\n{}\n", op.name(), sector, data.len());
    let mut s = Vec::with_capacity(head.len() + data.len() * 2 + 1);
    s.extend_from_slice(head.as_bytes());
    for &b in data {
        s.push(HEX[usize::from(b >> 4)]);
        s.push(HEX[usize::from(b & 15)]);
    }
    s.push(b'\n');
    // Every byte pushed is ASCII.
    String::from_utf8(s).unwrap_or_default()
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// `s` for an error message: escaped, and cut after a few characters.
fn show(s: &[u8]) -> String {
    const MAX: usize = 40;
    let mut out: String = s[..s.len().min(MAX)].escape_ascii().to_string();
    if s.len() > MAX {
        out += "...";
    }
    format!("\"{out}\"")
}

/// Longest valid op, sector or length line, without its newline (u64::MAX has 20 digits;
/// leading zeros are allowed up to this length).
const SHORT_LINE: usize = 32;

/// One line as read: complete (ended by `\n`, which is stripped), or cut off by the end of
/// the file (possibly empty), or longer than allowed.
enum Line {
    Complete,
    AtEof,
    TooLong,
}

/// Reads a log one record at a time.
pub struct LogReader<R> {
    r: R,
    /// Lines consumed so far.
    line: u64,
    buf: Vec<u8>,
    /// Bytes a record may reach from its start; longer records are errors.
    limit: u64,
    finished: bool,
}

impl<R: BufRead> LogReader<R> {
    pub fn new(r: R) -> Self {
        LogReader {
            r,
            line: 0,
            buf: Vec::new(),
            limit: u64::MAX,
            finished: false,
        }
    }

    /// Rejects records that do not lie within the first `bytes` bytes of the disk.
    pub fn with_disk_size(mut self, bytes: u64) -> Self {
        self.limit = bytes;
        self
    }

    /// Reads the next line into `self.buf`, at most `max` bytes plus the newline.
    fn read_line(&mut self, max: usize) -> Result<Line, LogError> {
        self.buf.clear();
        let cap = max as u64 + 1;
        let n = (&mut self.r)
            .take(cap)
            .read_until(b'\n', &mut self.buf)
            .map_err(LogError::Read)?;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            self.line += 1;
            Ok(Line::Complete)
        } else if n as u64 == cap {
            self.line += 1;
            Ok(Line::TooLong)
        } else {
            if n > 0 {
                self.line += 1;
            }
            Ok(Line::AtEof)
        }
    }

    fn bad<T>(&self, msg: impl Into<String>) -> Result<T, LogError> {
        Err(LogError::Bad {
            line: self.line,
            msg: msg.into(),
        })
    }

    /// The number on the line just read (`what` names it), or why not.
    fn number(&self, what: &str, state: Line) -> Result<Option<u64>, LogError> {
        let digits = self.buf.iter().all(u8::is_ascii_digit);
        match state {
            Line::TooLong => self.bad(format!("{what}: line too long")),
            Line::AtEof if digits => Ok(None),
            Line::Complete if digits && !self.buf.is_empty() => {
                // All digits, so the only possible failure is overflow.
                std::str::from_utf8(&self.buf)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(Some)
                    .map_or_else(|| self.bad(format!("{what}: number too large")), Ok)
            }
            _ => self.bad(format!(
                "{what}: expected a decimal number, found {}",
                show(&self.buf)
            )),
        }
    }

    /// The next record, `Ok(None)` at the end of the log.
    pub fn next_item(&mut self) -> Result<Option<Item>, LogError> {
        if self.finished {
            return Ok(None);
        }
        let start = self.line + 1;
        let truncated = |this: &mut Self, what: String| {
            this.finished = true;
            Ok(Some(Item::Truncated { line: start, what }))
        };

        let state = self.read_line(SHORT_LINE)?;
        let op = match (&state, self.buf.as_slice()) {
            (Line::Complete, b"READ") => OpKind::Read,
            (Line::Complete, b"WRITE") => OpKind::Write,
            (Line::AtEof, []) => {
                self.finished = true;
                return Ok(None);
            }
            (Line::AtEof, p) if b"READ".starts_with(p) || b"WRITE".starts_with(p) => {
                return truncated(self, "the file ends inside the READ/WRITE line".into());
            }
            _ => return self.bad(format!("expected READ or WRITE, found {}", show(&self.buf))),
        };

        let state = self.read_line(SHORT_LINE)?;
        let Some(sector) = self.number("sector", state)? else {
            return truncated(
                self,
                format!("the file ends before the sector of a {}", op.name()),
            );
        };

        let state = self.read_line(SHORT_LINE)?;
        let Some(len) = self.number("length", state)? else {
            return truncated(
                self,
                format!("the file ends before the length of a {}", op.name()),
            );
        };
        if !len.is_multiple_of(SECTOR_SIZE as u64) {
            return self.bad(format!("length {len} is not a multiple of {SECTOR_SIZE}"));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE as u64)
            .and_then(|at| at.checked_add(len));
        if end.is_none_or(|end| end > self.limit) {
            return Err(LogError::Bad {
                line: start,
                msg: format!(
                    "{} of {len} bytes at sector {sector} goes past the end of the disk \
                     ({} bytes)",
                    op.name(),
                    self.limit
                ),
            });
        }
        let Some(digits) = len.checked_mul(2).and_then(|d| usize::try_from(d).ok()) else {
            return self.bad(format!("length {len} is too large"));
        };

        let state = self.read_line(digits)?;
        let found = self.buf.len();
        if let Some(col) = self.buf.iter().position(|&c| hex_value(c).is_none()) {
            return self.bad(format!(
                "data: {} at column {} is not a lowercase hex digit",
                show(&self.buf[col..col + 1]),
                col + 1
            ));
        }
        match state {
            Line::TooLong => {
                return self.bad(format!(
                    "data: more than the {digits} hex digits a length of {len} needs"
                ))
            }
            Line::AtEof if found < digits => {
                return truncated(
                    self,
                    format!(
                        "the file ends inside the data of a {} ({found} of {digits} hex digits)",
                        op.name()
                    ),
                );
            }
            _ if found % 2 == 1 => {
                return self.bad(format!("data: odd number of hex digits ({found})"))
            }
            _ if found != digits => {
                return self.bad(format!(
                    "data: {found} hex digits, but a length of {len} needs {digits}"
                ))
            }
            _ => {}
        }
        let data = self
            .buf
            .chunks_exact(2)
            .map(|p| (hex_value(p[0]).unwrap_or(0) << 4) | hex_value(p[1]).unwrap_or(0))
            .collect();
        Ok(Some(Item::Record(Record {
            op,
            sector,
            data,
            line: start,
        })))
    }
}

impl<R: BufRead> Iterator for LogReader<R> {
    type Item = Result<Item, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_item() {
            Ok(item) => item.map(Ok),
            Err(e) => {
                self.finished = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Item>, LogError> {
        LogReader::new(text.as_bytes()).collect()
    }

    fn parse_disk(text: &str, size: u64) -> Result<Vec<Item>, LogError> {
        LogReader::new(text.as_bytes())
            .with_disk_size(size)
            .collect()
    }

    fn err_line(text: &str) -> (u64, String) {
        match parse(text) {
            Err(LogError::Bad { line, msg }) => (line, msg),
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    fn rec(op: OpKind, sector: u64, data: Vec<u8>, line: u64) -> Item {
        Item::Record(Record {
            op,
            sector,
            data,
            line,
        })
    }

    fn hex(n: usize, byte: &str) -> String {
        byte.repeat(n)
    }

    #[test]
    fn round_trips_format() {
        let a: Vec<u8> = (0..=255).chain(0..=255).collect();
        let b = vec![0xa5; 1024];
        let text = format_record(OpKind::Write, 7, &a) + &format_record(OpKind::Read, 0, &b);
        assert!(text.starts_with("WRITE\n7\n512\n000102"));
        let data_line = text.lines().nth(3).unwrap();
        assert_eq!(data_line, data_line.to_lowercase());
        assert_eq!(
            parse(&text).unwrap(),
            vec![rec(OpKind::Write, 7, a, 1), rec(OpKind::Read, 0, b, 5)]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse("READ\n3\n0\n\n").unwrap(),
            vec![rec(OpKind::Read, 3, vec![], 1)]
        );
    }

    #[test]
    fn final_newline_is_optional() {
        let text = format!("WRITE\n1\n512\n{}", hex(512, "0f"));
        assert_eq!(
            parse(&text).unwrap(),
            vec![rec(OpKind::Write, 1, vec![0x0f; 512], 1)]
        );
    }

    #[test]
    fn malformed_lines_are_numbered() {
        let ok = format_record(OpKind::Write, 0, &[1; 512]);
        let cases: Vec<(String, u64, &str)> = vec![
            (format!("{ok}WRTE\n0\n512\n"), 5, "expected READ or WRITE"),
            (format!("{ok}read\n"), 5, "expected READ or WRITE"),
            (format!("{ok}\n"), 5, "expected READ or WRITE"),
            (format!("{ok}READ\n-1\n512\n"), 6, "sector"),
            (format!("{ok}READ\n 1\n512\n"), 6, "sector"),
            (format!("{ok}READ\n\n512\n"), 6, "sector"),
            (format!("{ok}READ\n1\n0x200\n"), 7, "length"),
            (format!("{ok}READ\n1\n512\r\n"), 7, "length"),
            (
                format!("{ok}READ\n1\n99999999999999999999\n"),
                7,
                "too large",
            ),
            (format!("{ok}READ\n1\n100\n"), 7, "not a multiple of 512"),
            (
                format!("{ok}READ\n1\n512\n{}\n", hex(511, "00")),
                8,
                "1022 hex digits, but a length of 512 needs 1024",
            ),
            (
                format!("{ok}READ\n1\n512\n{}0\n", hex(511, "00")),
                8,
                "odd number of hex digits (1023)",
            ),
            (
                format!("{ok}READ\n1\n512\n{}0\n", hex(512, "00")),
                8,
                "more than the 1024 hex digits",
            ),
            (
                format!("{ok}READ\n1\n512\n{}AB\n", hex(511, "00")),
                8,
                "\"A\" at column 1023 is not a lowercase hex digit",
            ),
            (
                format!("{ok}READ\n1\n512\n{}g\n", hex(10, "00")),
                8,
                "\"g\" at column 21",
            ),
            (
                format!("{ok}{}", "X".repeat(100)),
                5,
                "expected READ or WRITE",
            ),
        ];
        for (text, line, msg) in cases {
            let (l, m) = err_line(&text);
            assert_eq!(l, line, "{text:?}: {m}");
            assert!(m.contains(msg), "{text:?}: {m:?} lacks {msg:?}");
        }
    }

    #[test]
    fn truncated_last_record_is_reported() {
        let ok = format_record(OpKind::Write, 2, &[1; 512]);
        let full = format_record(OpKind::Read, 9, &[2; 1024]);
        // Every proper prefix of the second record is a truncation of it, not an error.
        for cut in 1..full.len() - 1 {
            let text = format!("{ok}{}", &full[..cut]);
            let items = parse(&text).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert_eq!(items.len(), 2, "cut {cut}");
            assert_eq!(items[0], rec(OpKind::Write, 2, vec![1; 512], 1));
            match &items[1] {
                Item::Truncated { line, .. } => assert_eq!(*line, 5, "cut {cut}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        // Only the newline missing: complete.
        let text = format!("{ok}{}", &full[..full.len() - 1]);
        assert_eq!(parse(&text).unwrap().len(), 2);
    }

    #[test]
    fn garbage_at_the_end_is_not_a_truncation() {
        let ok = format_record(OpKind::Write, 2, &[1; 512]);
        assert_eq!(err_line(&format!("{ok}RAED")).0, 5);
        assert_eq!(err_line(&format!("{ok}READ\n1x")).0, 6);
        assert_eq!(err_line(&format!("{ok}READ\n1\n512\n00zz")).0, 8);
        assert_eq!(err_line(&format!("{ok}READ\n1\n512\n0F")).0, 8);
    }

    #[test]
    fn records_must_fit_the_disk() {
        let text = format_record(OpKind::Write, 7, &[0; 1024]);
        assert_eq!(parse_disk(&text, 9 * 512).unwrap().len(), 1);
        match parse_disk(&text, 8 * 512) {
            Err(LogError::Bad { line: 1, msg }) => assert!(msg.contains("past the end"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let text = format!("READ\n{}\n512\n", u64::MAX / 2);
        assert!(matches!(
            parse_disk(&text, 1 << 20),
            Err(LogError::Bad { line: 1, .. })
        ));
    }
}
