use super::*;
use std::io::Cursor;

/// A canned peer: reads come from `input`, writes are collected.
struct Peer {
    input: Cursor<Vec<u8>>,
    out: Vec<u8>,
}

impl Peer {
    fn new(input: Vec<u8>) -> Self {
        Peer {
            input: Cursor::new(input),
            out: Vec::new(),
        }
    }
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn crc32_is_the_ieee_crc() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

/// The layout of the reference's `UbiMetadata::write_to_buf`, built by hand.
#[test]
fn metadata_blob_has_the_reference_layout() {
    let mut flags = vec![0u8; 600];
    flags[0] = WRITTEN;
    flags[507] = HAS_SOURCE | FETCHED;
    flags[599] = HAS_SOURCE;
    let g = Geometry { shift: 11, flags };
    let blob = g.encode().unwrap();
    assert_eq!(blob.len(), 3 * 512);
    assert_eq!(&blob[..9], b"BDEV_UBI\0");
    assert_eq!(&blob[9..14], &[2, 0, 0, 0, 11]);
    assert_eq!(&blob[14..18], &600u32.to_le_bytes());
    assert!(blob[18..508].iter().all(|&b| b == 0));
    assert_eq!(&blob[508..512], &crc32(&blob[..508]).to_le_bytes());
    assert_eq!(blob[512], WRITTEN);
    assert_eq!(blob[512 + 507], HAS_SOURCE | FETCHED);
    assert_eq!(&blob[1020..1024], &crc32(&blob[512..1020]).to_le_bytes());
    assert_eq!(blob[1024 + 91], HAS_SOURCE);
    assert!(blob[1024 + 92..1024 + 508].iter().all(|&b| b == 0));
    assert_eq!(Geometry::decode(&blob).unwrap(), g);
    assert!(g.has_data(0) && g.has_data(507) && !g.has_data(1) && !g.has_data(600));
    assert!(!g.has_data(u64::MAX));
}

#[test]
fn hostile_metadata_blobs_are_errors() {
    let g = Geometry {
        shift: 6,
        flags: vec![WRITTEN; 1000],
    };
    let good = g.encode().unwrap();
    let mut cases: Vec<Vec<u8>> = vec![Vec::new(), good[..511].to_vec(), good[..1024].to_vec()];
    let mut crc = good.clone();
    crc[600] ^= 1;
    cases.push(crc);
    // A stripe count far past the blob, CRC fixed up.
    let mut huge = good.clone();
    huge[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
    seal(&mut huge[..512]);
    cases.push(huge);
    let mut shift = good.clone();
    shift[13] = 40;
    seal(&mut shift[..512]);
    cases.push(shift);
    let mut version = good.clone();
    version[9] = 0;
    seal(&mut version[..512]);
    cases.push(version);
    for case in cases {
        assert!(Geometry::decode(&case).is_err(), "{} bytes", case.len());
    }
}

#[test]
fn requests_and_answers_on_the_wire() {
    let mut input = vec![HELLO_CMD, METADATA_CMD, READ_STRIPE_CMD];
    input.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    input.push(0x77);
    let mut peer = Peer::new(input);
    assert_eq!(read_request(&mut peer).unwrap(), Some(Request::Hello));
    assert_eq!(read_request(&mut peer).unwrap(), Some(Request::Metadata));
    assert_eq!(
        read_request(&mut peer).unwrap(),
        Some(Request::ReadStripe(0x0102_0304_0506_0708))
    );
    assert_eq!(
        read_request(&mut peer).unwrap(),
        Some(Request::Unknown(0x77))
    );
    assert_eq!(read_request(&mut peer).unwrap(), None);
    // A READ_STRIPE cut short is an error, not a request.
    let mut short = Peer::new(vec![READ_STRIPE_CMD, 1, 2]);
    assert!(read_request(&mut short).is_err());

    let mut w = Peer::new(Vec::new());
    write_hello(&mut w).unwrap();
    write_payload(&mut w, b"abc").unwrap();
    write_status(&mut w, STATUS_NO_DATA).unwrap();
    assert_eq!(
        w.out,
        [0, 1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 2]
    );
}

/// Records each write call; takes vectors (as a socket's `writev`), but at most `limit` bytes
/// a call, so partial writes are exercised too.
struct Calls {
    calls: Vec<Vec<u8>>,
    limit: usize,
}

impl Write for Calls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = all.len().min(self.limit);
        self.calls.push(all[..n].to_vec());
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A payload goes out with its head in one write where the stream takes vectors: a client is
/// not woken for the 9-byte head alone. Partial writes still send every byte once.
#[test]
fn a_payload_and_its_head_go_in_one_write() {
    let payload: Vec<u8> = (0..100u8).collect();
    let mut want = vec![0u8; 9];
    want[1] = 100;
    want.extend_from_slice(&payload);
    let mut w = Calls {
        calls: vec![],
        limit: usize::MAX,
    };
    write_payload(&mut w, &payload).unwrap();
    assert_eq!(w.calls, [want.clone()]);
    for limit in [1, 5, 9, 10, 50] {
        let mut w = Calls {
            calls: vec![],
            limit,
        };
        write_payload(&mut w, &payload).unwrap();
        assert_eq!(w.calls.concat(), want, "at most {limit} bytes a call");
    }
}

#[test]
fn client_checks_what_the_server_sends() {
    // HELLO: another version, an old server, a server error.
    let mut p = Peer::new(vec![0, 2, 0, 0, 0]);
    assert!(matches!(hello(&mut p), Err(ProtocolError::Version(2))));
    assert_eq!(p.out, [HELLO_CMD]);
    let mut p = Peer::new(vec![STATUS_INVALID_COMMAND]);
    assert!(matches!(
        hello(&mut p),
        Err(ProtocolError::Status { status: 0xFE, .. })
    ));
    assert!(hello(&mut Peer::new(vec![0, 1, 0, 0, 0])).is_ok());

    // METADATA: a size past the bound is refused before anything is allocated; a blob cut
    // short is an error.
    let mut huge = vec![0];
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        metadata(&mut Peer::new(huge)),
        Err(ProtocolError::Size { .. })
    ));
    let mut short = vec![0];
    short.extend_from_slice(&4096u64.to_le_bytes());
    short.extend_from_slice(&[0; 100]);
    assert!(metadata(&mut Peer::new(short)).is_err());
    let g = Geometry {
        shift: 6,
        flags: vec![HAS_SOURCE; 3],
    };
    let mut good = vec![0];
    let blob = g.encode().unwrap();
    good.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    good.extend_from_slice(&blob);
    assert_eq!(metadata(&mut Peer::new(good)).unwrap(), g);

    // READ_STRIPE: the request bytes, a wrong size, a short stripe, a status, garbage.
    let mut buf = vec![0u8; 8];
    let mut ok = vec![0];
    ok.extend_from_slice(&8u64.to_le_bytes());
    ok.extend_from_slice(b"12345678");
    let mut p = Peer::new(ok);
    assert_eq!(read_stripe(&mut p, 5, &mut buf).unwrap(), StripeReply::Data);
    assert_eq!(&buf, b"12345678");
    assert_eq!(p.out, [1, 5, 0, 0, 0, 0, 0, 0, 0]);
    let mut wrong = vec![0];
    wrong.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        read_stripe(&mut Peer::new(wrong), 0, &mut buf),
        Err(ProtocolError::Size { .. })
    ));
    let mut short = vec![0];
    short.extend_from_slice(&8u64.to_le_bytes());
    short.extend_from_slice(b"123");
    assert!(read_stripe(&mut Peer::new(short), 0, &mut buf).is_err());
    assert_eq!(
        read_stripe(&mut Peer::new(vec![STATUS_NO_DATA]), 0, &mut buf).unwrap(),
        StripeReply::Status(STATUS_NO_DATA)
    );
    assert_eq!(
        read_stripe(&mut Peer::new(vec![0x42]), 0, &mut buf).unwrap(),
        StripeReply::Status(0x42)
    );
    assert!(read_stripe(&mut Peer::new(Vec::new()), 0, &mut buf).is_err());
}
