//! The stripe server against a device in memory: which stripes go out with `sendfile` from
//! the layout's file, and which through the block layer.

use super::*;
use crate::block::testing::MemDevice;
use crate::stripe::protocol::StripeReply;
use std::os::unix::fs::FileExt;

const SHIFT: u8 = 7;
const STRIPE: usize = 512 << SHIFT;
const STRIPES: u64 = 4;

fn bytes(seed: u8) -> Vec<u8> {
    (0..STRIPE * STRIPES as usize)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}

/// Every stripe has data; `in_file` offers `file` for the stripes `from_file` says.
struct FileLayout {
    file: File,
    from_file: fn(u64) -> bool,
}

impl Layout for FileLayout {
    fn geometry(&self) -> Geometry {
        Geometry {
            shift: SHIFT,
            flags: vec![WRITTEN; STRIPES as usize],
        }
    }
    fn stripe(&self, index: u64) -> Option<(u8, u8)> {
        (index < STRIPES).then_some((SHIFT, WRITTEN))
    }
    fn in_file(&self, index: u64) -> Option<(&File, u64)> {
        (self.from_file)(index).then_some((&self.file, index * STRIPE as u64))
    }
}

/// A server of a device holding `bytes(1)`, its layout's file `file`.
fn server(file: File, from_file: fn(u64) -> bool, psk: Option<Arc<Psk>>) -> SocketAddr {
    let dev = MemDevice::new(STRIPES << SHIFT);
    let mut ch = dev.new_channel_with(Notifier::inline().unwrap()).unwrap();
    let mut buf = IoBuf::new(STRIPE * STRIPES as usize);
    buf.copy_from_slice(&bytes(1));
    let (r, _) = run_sync(&mut *ch, IoOp::Write { sector: 0, buf });
    r.unwrap();
    let layout = Arc::new(FileLayout { file, from_file });
    let gate = Arc::new(MoveGate::default());
    start("127.0.0.1:0", psk, Arc::new(dev), layout, gate)
        .unwrap()
        .addr
}

fn file_of(dir: &tempfile::TempDir, data: &[u8]) -> File {
    let path = dir.path().join("disk");
    std::fs::write(&path, data).unwrap();
    File::open(path).unwrap()
}

fn psk() -> Arc<Psk> {
    Arc::new(Psk::new("test", b"sixteen byte key and more".to_vec()).unwrap())
}

fn connect(addr: SocketAddr, psk: Option<Arc<Psk>>) -> Stream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match psk {
        Some(p) => tls::connect(&tls::client_context(p).unwrap(), tcp).unwrap(),
        None => Stream::Plain(tcp),
    }
}

fn read(s: &mut Stream, index: u64) -> Result<Vec<u8>, protocol::ProtocolError> {
    let mut buf = vec![0u8; STRIPE];
    match protocol::read_stripe(s, index, &mut buf)? {
        StripeReply::Data => Ok(buf),
        StripeReply::Status(st) => panic!("stripe {index}: status {st:#x}"),
    }
}

fn stripe(data: &[u8], index: u64) -> &[u8] {
    &data[index as usize * STRIPE..][..STRIPE]
}

#[test]
fn plaintext_sends_what_the_layout_puts_in_a_file_and_tls_reads_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (device, in_file) = (bytes(1), bytes(2));
    let from_file = |i| i != 2;
    let addr = server(file_of(&dir, &in_file), from_file, None);
    let mut c = connect(addr, None);
    for i in 0..STRIPES {
        let want = if from_file(i) { &in_file } else { &device };
        assert!(read(&mut c, i).unwrap() == stripe(want, i), "stripe {i}");
    }
    // Over TLS the file is not used: every stripe is the device's.
    let addr = server(file_of(&dir, &in_file), from_file, Some(psk()));
    let mut c = connect(addr, Some(psk()));
    for i in 0..STRIPES {
        assert!(read(&mut c, i).unwrap() == stripe(&device, i), "stripe {i}");
    }
}

#[test]
fn a_file_that_ends_within_a_stripe_cuts_the_connection_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    // Stripe 3 is half in the file.
    let mut short = bytes(2);
    short.truncate(STRIPE * 3 + STRIPE / 2);
    let addr = server(file_of(&dir, &short), |_| true, None);
    let mut c = connect(addr, None);
    assert!(read(&mut c, 0).unwrap() == stripe(&short, 0));
    assert!(read(&mut c, 3).is_err(), "a short stripe read whole");
    // A new connection is served.
    let mut c = connect(addr, None);
    assert!(read(&mut c, 1).unwrap() == stripe(&short, 1));
}

#[test]
fn where_sendfile_cannot_read_the_file_the_stripes_are_read_and_sent() {
    // A directory: sendfile refuses it (EINVAL) before sending a byte.
    let dir = tempfile::tempdir().unwrap();
    let addr = server(File::open(dir.path()).unwrap(), |_| true, None);
    let mut c = connect(addr, None);
    let device = bytes(1);
    for i in [1, 0, 3] {
        assert!(read(&mut c, i).unwrap() == stripe(&device, i), "stripe {i}");
    }
}

#[test]
fn stripes_sent_from_a_file_stay_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(3);
    let file = file_of(&dir, &data);
    let check = file.try_clone().unwrap();
    let addr = server(file, |_| true, None);
    let mut c = connect(addr, None);
    for i in 0..STRIPES {
        read(&mut c, i).unwrap();
    }
    // The page cache was let go of (POSIX_FADV_DONTNEED): the file is unchanged.
    let mut back = vec![0u8; data.len()];
    check.read_exact_at(&mut back, 0).unwrap();
    assert!(back == data);
}
