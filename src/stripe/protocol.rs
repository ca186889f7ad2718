//! ubiblk v0.5's remote stripe protocol, version 1, as its `docs/remote-stripe.md` specifies
//! it: one request at a time on a connection, every integer little-endian.
//!
//! | request          | client sends            | server answers                                   |
//! |------------------|-------------------------|--------------------------------------------------|
//! | HELLO `0x02`     | opcode                  | `0x00`, protocol version (u32)                   |
//! | METADATA `0x00`  | opcode                  | status, size (u64), the metadata blob            |
//! | READ_STRIPE `0x01` | opcode, index (u64)   | `0x00`, size (u64), the stripe; or a status alone |
//!
//! Statuses: `0x00` OK, `0x01` invalid stripe (out of range), `0x02` no data (never written,
//! no source: zeros), `0x03` not fetched (the server cannot read it), `0xFE` invalid command,
//! `0xFF` server error.
//!
//! The metadata blob is the reference's lazy-fetch metadata, version 2.0 ([`Geometry`]): a
//! 512-byte header (magic `BDEV_UBI\0`, major 2, minor 0, `stripe_sector_count_shift`, the
//! stripe count as u32 at byte 14, a CRC-32 of bytes 0..508 at 508..512), then one byte per
//! stripe, 508 to a sector, each sector ending in the CRC-32 of its first 508 bytes. A stripe
//! byte's bits: 0 fetched, 1 written, 2 has a source.
//!
//! Everything read from a peer is bounded before it is allocated, and every reader here
//! returns an error, never panics, on anything malformed.

use std::io::{self, IoSlice, Read, Write};

pub const METADATA_CMD: u8 = 0x00;
pub const READ_STRIPE_CMD: u8 = 0x01;
pub const HELLO_CMD: u8 = 0x02;
pub const PROTOCOL_VERSION: u32 = 1;

pub const STATUS_OK: u8 = 0x00;
pub const STATUS_INVALID_STRIPE: u8 = 0x01;
pub const STATUS_NO_DATA: u8 = 0x02;
pub const STATUS_NOT_FETCHED: u8 = 0x03;
pub const STATUS_INVALID_COMMAND: u8 = 0xFE;
pub const STATUS_SERVER_ERROR: u8 = 0xFF;

/// Stripe byte bits of the wire metadata.
pub const FETCHED: u8 = 1 << 0;
pub const WRITTEN: u8 = 1 << 1;
pub const HAS_SOURCE: u8 = 1 << 2;

const SECTOR: usize = 512;
const MAGIC: &[u8; 9] = b"BDEV_UBI\0";
const VERSION_MAJOR: u16 = 2;
const VERSION_MINOR: u16 = 0;
const CRC_AT: usize = SECTOR - 4;
/// Stripe bytes per metadata sector (the rest is its CRC).
const PER_SECTOR: usize = CRC_AT;
const COUNT_AT: usize = 14;
/// The reference's largest stripe: 2^17 sectors (64 MiB).
pub const MAX_WIRE_SHIFT: u8 = 17;
/// Largest metadata blob a client accepts (the reference's bound): 64 MiB, ~66 million stripes.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the stripe server answered {what} with status {status:#04x} ({})", status_name(*status))]
    Status { what: &'static str, status: u8 },
    #[error(
        "the stripe server speaks protocol version {0}, this client version {PROTOCOL_VERSION}"
    )]
    Version(u32),
    #[error("the stripe server sent {what} of {got} bytes, expected {expected}")]
    Size {
        what: &'static str,
        got: u64,
        expected: String,
    },
    #[error("the stripe server's metadata is invalid: {0}")]
    Metadata(String),
}

/// A status byte's name, for errors and logs.
pub fn status_name(status: u8) -> &'static str {
    match status {
        STATUS_OK => "ok",
        STATUS_INVALID_STRIPE => "invalid stripe",
        STATUS_NO_DATA => "no data",
        STATUS_NOT_FETCHED => "not fetched",
        STATUS_INVALID_COMMAND => "invalid command",
        STATUS_SERVER_ERROR => "server error",
        _ => "not a status of the protocol",
    }
}

/// What a disk looks like on the wire: the stripe size and one flag byte per stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Stripes of 2^shift sectors.
    pub shift: u8,
    /// Per stripe: [`FETCHED`], [`WRITTEN`], [`HAS_SOURCE`].
    pub flags: Vec<u8>,
}

impl Geometry {
    pub fn stripe_bytes(&self) -> u64 {
        (SECTOR as u64) << self.shift
    }

    pub fn stripe_count(&self) -> u64 {
        self.flags.len() as u64
    }

    /// Whether a client fetches stripe `i` (the reference's rule: written, or from a source;
    /// ours also counts a fetched stripe): otherwise it reads as zeros.
    pub fn has_data(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.flags.get(i))
            .is_some_and(|f| f & (FETCHED | WRITTEN | HAS_SOURCE) != 0)
    }

    /// The metadata blob (format 2.0).
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let count = u32::try_from(self.flags.len())
            .map_err(|_| ProtocolError::Metadata("more than 2^32 stripes".into()))?;
        let sectors = self.flags.len().div_ceil(PER_SECTOR);
        let mut buf = vec![0u8; SECTOR * (1 + sectors)];
        buf[..9].copy_from_slice(MAGIC);
        buf[9..11].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        buf[11..13].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        buf[13] = self.shift;
        buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&count.to_le_bytes());
        seal(&mut buf[..SECTOR]);
        for (n, chunk) in self.flags.chunks(PER_SECTOR).enumerate() {
            let sector = &mut buf[SECTOR * (n + 1)..SECTOR * (n + 2)];
            sector[..chunk.len()].copy_from_slice(chunk);
            seal(sector);
        }
        Ok(buf)
    }

    /// Parses a metadata blob, checking every CRC, the version and the bounds.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |s: String| Err(ProtocolError::Metadata(s));
        if buf.len() < SECTOR || !buf.len().is_multiple_of(SECTOR) {
            return bad(format!(
                "{} bytes, not a positive multiple of 512",
                buf.len()
            ));
        }
        let header = &buf[..SECTOR];
        if !sealed(header) {
            return bad("header CRC mismatch".into());
        }
        if &header[..9] != MAGIC {
            return bad("bad magic".into());
        }
        let major = u16::from_le_bytes([header[9], header[10]]);
        let minor = u16::from_le_bytes([header[11], header[12]]);
        if (major, minor) != (VERSION_MAJOR, VERSION_MINOR) {
            return bad(format!("version {major}.{minor}, expected 2.0"));
        }
        let shift = header[13];
        if shift > MAX_WIRE_SHIFT {
            return bad(format!("stripe shift {shift} above {MAX_WIRE_SHIFT}"));
        }
        let mut count = [0u8; 4];
        count.copy_from_slice(&header[COUNT_AT..COUNT_AT + 4]);
        let count = u32::from_le_bytes(count) as usize;
        let sectors = count.div_ceil(PER_SECTOR);
        if buf.len() / SECTOR - 1 < sectors {
            return bad(format!(
                "{count} stripes need {sectors} sectors, the blob has {}",
                buf.len() / SECTOR - 1
            ));
        }
        let mut flags = Vec::with_capacity(count);
        for n in 0..sectors {
            let sector = &buf[SECTOR * (n + 1)..SECTOR * (n + 2)];
            if !sealed(sector) {
                return bad(format!("CRC mismatch in stripe sector {n}"));
            }
            let take = PER_SECTOR.min(count - n * PER_SECTOR);
            flags.extend_from_slice(&sector[..take]);
        }
        Ok(Geometry { shift, flags })
    }
}

/// Writes the CRC-32 of a sector's first 508 bytes into its last four.
fn seal(sector: &mut [u8]) {
    let crc = crc32(&sector[..CRC_AT]);
    sector[CRC_AT..SECTOR].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(sector: &[u8]) -> bool {
    sector[CRC_AT..SECTOR] == crc32(&sector[..CRC_AT]).to_le_bytes()
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and the reference's `crc32fast`).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A request as the server reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Hello,
    Metadata,
    ReadStripe(u64),
    /// An opcode the protocol does not have (answered with [`STATUS_INVALID_COMMAND`]).
    Unknown(u8),
}

/// Reads the next request; `None` at a clean end of the stream before an opcode.
pub fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let mut op = [0u8; 1];
    loop {
        match r.read(&mut op) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Some(match op[0] {
        HELLO_CMD => Request::Hello,
        METADATA_CMD => Request::Metadata,
        READ_STRIPE_CMD => {
            let mut index = [0u8; 8];
            r.read_exact(&mut index)?;
            Request::ReadStripe(u64::from_le_bytes(index))
        }
        other => Request::Unknown(other),
    }))
}

/// Server side: the answer to HELLO.
pub fn write_hello(w: &mut impl Write) -> io::Result<()> {
    let mut out = [0u8; 5];
    out[1..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

/// Server side: what precedes a payload of `len` bytes (STATUS_OK, then the length).
pub fn payload_head(len: u64) -> [u8; 9] {
    let mut head = [0u8; 9];
    head[0] = STATUS_OK;
    head[1..].copy_from_slice(&len.to_le_bytes());
    head
}

/// Server side: an OK status, a u64 size and `payload` (METADATA, READ_STRIPE).
pub fn write_payload(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let head = payload_head(payload.len() as u64);
    // Head and payload in one write where the stream takes vectors (a plain socket: one
    // `writev`, so the client is not woken for the 9-byte head alone and again for the rest).
    let sent = loop {
        match w.write_vectored(&[IoSlice::new(&head), IoSlice::new(payload)]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    if sent < head.len() {
        w.write_all(&head[sent..])?;
        w.write_all(payload)?;
    } else {
        w.write_all(&payload[sent - head.len()..])?;
    }
    w.flush()
}

/// Server side: a status alone.
pub fn write_status(w: &mut impl Write, status: u8) -> io::Result<()> {
    w.write_all(&[status])?;
    w.flush()
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Client side: HELLO, the server's version checked.
pub fn hello<S: Read + Write>(s: &mut S) -> Result<(), ProtocolError> {
    s.write_all(&[HELLO_CMD])?;
    s.flush()?;
    let status = read_u8(s)?;
    if status != STATUS_OK {
        return Err(ProtocolError::Status {
            what: "HELLO",
            status,
        });
    }
    let mut v = [0u8; 4];
    s.read_exact(&mut v)?;
    match u32::from_le_bytes(v) {
        PROTOCOL_VERSION => Ok(()),
        other => Err(ProtocolError::Version(other)),
    }
}

/// Client side: METADATA, its size bounded before anything is allocated.
pub fn metadata<S: Read + Write>(s: &mut S) -> Result<Geometry, ProtocolError> {
    s.write_all(&[METADATA_CMD])?;
    s.flush()?;
    let status = read_u8(s)?;
    if status != STATUS_OK {
        return Err(ProtocolError::Status {
            what: "METADATA",
            status,
        });
    }
    let size = read_u64(s)?;
    if !(SECTOR as u64..=MAX_METADATA_BYTES).contains(&size) {
        return Err(ProtocolError::Size {
            what: "metadata",
            got: size,
            expected: format!("512..={MAX_METADATA_BYTES}"),
        });
    }
    // Bounded above; read in steps so a peer that stops early costs only what it sent.
    let mut buf = Vec::new();
    s.take(size).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "metadata cut short").into());
    }
    Geometry::decode(&buf)
}

/// What READ_STRIPE got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeReply {
    /// `buf` holds the stripe.
    Data,
    /// A status other than OK (the connection stays usable).
    Status(u8),
}

/// Client side: READ_STRIPE of stripe `index` into `buf`, which must be exactly the stripe's
/// size: a server announcing another size is an error before any of the payload is read.
pub fn read_stripe<S: Read + Write>(
    s: &mut S,
    index: u64,
    buf: &mut [u8],
) -> Result<StripeReply, ProtocolError> {
    let mut req = [0u8; 9];
    req[0] = READ_STRIPE_CMD;
    req[1..].copy_from_slice(&index.to_le_bytes());
    s.write_all(&req)?;
    s.flush()?;
    let status = read_u8(s)?;
    if status != STATUS_OK {
        return Ok(StripeReply::Status(status));
    }
    let size = read_u64(s)?;
    if size != buf.len() as u64 {
        return Err(ProtocolError::Size {
            what: "a stripe",
            got: size,
            expected: buf.len().to_string(),
        });
    }
    s.read_exact(buf)?;
    Ok(StripeReply::Data)
}

#[cfg(test)]
mod tests;
