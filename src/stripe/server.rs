//! The stripe server (`stripe_server:`): serves the disk's logical content, decrypted and
//! with unfetched stripes read through the disk's own source, to clients of ubiblk v0.5's
//! remote stripe protocol (ours, the `ubiblk://` source, or the reference's).
//!
//! - One thread per connection, at most [`MAX_CONNECTIONS`] at once: more are closed at once,
//!   unanswered. The TLS handshake times out after [`HANDSHAKE_TIMEOUT`], every later read
//!   and write after [`IO_TIMEOUT`]: a silent or stalled client loses its connection.
//! - TLS-PSK ([`super::tls`]) unless the config opts out with `danger_zone`.
//! - METADATA describes the disk as it is ([`Layout`]); READ_STRIPE reads through the block
//!   layer it was given, and is refused with [`STATUS_SERVER_ERROR`] while a VM's rings run
//!   ([`MoveGate`]). Out-of-range indexes get [`STATUS_INVALID_STRIPE`], stripes without data
//!   [`STATUS_NO_DATA`], unknown opcodes [`STATUS_INVALID_COMMAND`]; a read that fails
//!   [`STATUS_SERVER_ERROR`]. Malformed requests close the connection.

use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use openssl::ssl::SslContext;

use super::gate::MoveGate;
use super::protocol::{self, Geometry, Request};
use super::protocol::{
    FETCHED, HAS_SOURCE, STATUS_INVALID_COMMAND, STATUS_INVALID_STRIPE, STATUS_NO_DATA,
    STATUS_SERVER_ERROR, WRITTEN,
};
use super::tls::{self, Psk, Stream, TlsError};
use crate::block::{run_sync, BlockDevice, IoBuf, IoChannel, IoOp, Notifier, SECTOR_SHIFT};
use crate::sys::ratelog::{self, RateLimiter, Verdict};
use crate::sys::zerocopy;

/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest wait for a client's next bytes or for it to take ours.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest TLS handshake: a connection holds one of [`MAX_CONNECTIONS`] slots before it has
/// shown it holds the key, so a flood of silent connections is shed sooner.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server says about the disk, taken afresh for every request.
pub trait Layout: Send + Sync {
    /// For METADATA: every stripe.
    fn geometry(&self) -> Geometry;
    /// For READ_STRIPE, without copying the others: the stripe size (a shift) and stripe
    /// `index`'s flags; `None` past the last stripe.
    fn stripe(&self, index: u64) -> Option<(u8, u8)>;
    /// Reads stripe `index` into `buf` (its bytes on the disk) from somewhere other than the
    /// disk, if it is not on the disk yet: a lazy disk's unfetched stripe, from its source.
    /// `None`: read the disk.
    fn read_elsewhere(&self, index: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let _ = (index, buf);
        None
    }
    /// Where stripe `index`'s bytes lie as they are served (not encrypted, on the disk) in a
    /// file opened without O_DIRECT, and at which byte offset: a plaintext connection sends
    /// them from there with `sendfile`, without reading them into a buffer and copying that
    /// into the socket. `None`: read it through the block layer.
    fn in_file(&self, index: u64) -> Option<(&File, u64)> {
        let _ = index;
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("stripe_server.listen: {listen}: {source}")]
    Listen { listen: String, source: io::Error },
    #[error("stripe_server: {0}")]
    Tls(#[from] TlsError),
    #[error("stripe_server: cannot start its thread: {0}")]
    Thread(io::Error),
}

/// What every connection shares.
struct Shared {
    device: Arc<dyn BlockDevice>,
    layout: Arc<dyn Layout>,
    gate: Arc<MoveGate>,
    tls: Option<SslContext>,
    connections: AtomicUsize,
    /// The connection limit was hit and logged at warn; again at debug until a client is
    /// served.
    warned_full: AtomicBool,
    /// Failed connections (a wrong key, no TLS, a silent client) are logged at info at most
    /// [`ratelog::BURST`] per [`ratelog::WINDOW`]: a flood must not flood the log.
    failures: Mutex<RateLimiter>,
}

/// A running server; it runs until the process ends.
pub struct StripeServer {
    pub addr: SocketAddr,
}

/// Binds `listen` and serves `device` (the logical disk: above encryption and lazy fetch,
/// below the debug log and QoS) as `layout` describes it. `psk`: `None` only with the
/// `danger_zone` opt-in (plaintext).
pub fn start(
    listen: &str,
    psk: Option<Arc<Psk>>,
    device: Arc<dyn BlockDevice>,
    layout: Arc<dyn Layout>,
    gate: Arc<MoveGate>,
) -> Result<StripeServer, ServerError> {
    let listen_err = |source| ServerError::Listen {
        listen: listen.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = listen.to_socket_addrs().map_err(listen_err)?.collect();
    let listener = TcpListener::bind(&addrs[..]).map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    let tls = match &psk {
        Some(psk) => Some(tls::server_context(psk.clone())?),
        None => {
            warn!(
                "stripe server on {addr}: WITHOUT ENCRYPTION OR AUTHENTICATION \
                 (danger_zone.allow_unencrypted_connection): anyone who reaches this port \
                 reads the whole disk in the clear"
            );
            None
        }
    };
    let shared = Arc::new(Shared {
        device,
        layout,
        gate,
        tls,
        connections: AtomicUsize::new(0),
        warned_full: AtomicBool::new(false),
        failures: Mutex::new(RateLimiter::new(ratelog::BURST, ratelog::WINDOW)),
    });
    std::thread::Builder::new()
        .name("stripe-server".into())
        .spawn(move || accept_loop(listener, shared))
        .map_err(ServerError::Thread)?;
    match &psk {
        Some(p) => info!(
            "stripe server on {addr}: TLS-PSK ({}), identity {:?}",
            tls::CIPHER,
            p.identity()
        ),
        None => info!("stripe server on {addr}: plaintext"),
    }
    Ok(StripeServer { addr })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let tcp = match conn {
            Ok(tcp) => tcp,
            Err(e) => {
                // EMFILE and the like: wait for a descriptor instead of spinning.
                debug!("stripe server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let n = shared.connections.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            if !shared.warned_full.swap(true, Ordering::Relaxed) {
                warn!(
                    "stripe server: {MAX_CONNECTIONS} connections already: closing new ones \
                     unanswered"
                );
            }
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("stripe-conn".into())
            .spawn(move || {
                let peer = tcp.peer_addr().ok();
                if let Err(e) = connection(&s, tcp) {
                    s.failed(peer, &*e);
                }
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Shared {
    fn failed(&self, peer: Option<SocketAddr>, e: &dyn std::error::Error) {
        let verdict = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check("stripe-server", log::Level::Info, Instant::now());
        match verdict {
            Verdict::Pass { suppressed: 0 } => info!("stripe server: client {peer:?}: {e}"),
            Verdict::Pass { suppressed } => info!(
                "stripe server: client {peer:?}: {e} ({suppressed} failed connections not \
                 logged before)"
            ),
            Verdict::StartSuppressing => info!(
                "stripe server: client {peer:?}: {e}; more failed connections are not logged \
                 for {:?}",
                ratelog::WINDOW
            ),
            Verdict::Drop => debug!("stripe server: client {peer:?}: {e}"),
        }
    }
}

fn connection(s: &Shared, tcp: TcpStream) -> Result<(), Box<dyn std::error::Error>> {
    // A request is a guest's demand read on the other host (see set_slice).
    let _ = crate::sys::sched::set_slice(crate::sys::sched::SHORT_SLICE_NS);
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let peer = tcp.peer_addr()?;
    let mut stream = match &s.tls {
        Some(ctx) => tls::accept(ctx, tcp)?,
        None => Stream::Plain(tcp),
    };
    stream.tcp().set_read_timeout(Some(IO_TIMEOUT))?;
    stream.tcp().set_write_timeout(Some(IO_TIMEOUT))?;
    s.warned_full.store(false, Ordering::Relaxed);
    info!("stripe server: client {peer} connected");
    // The session waits for each read: it runs on this thread (see Notifier::inline).
    let mut channel = s.device.new_channel_with(Notifier::inline()?)?;
    let mut session = Session {
        s,
        channel: &mut *channel,
        io: None,
        padded: Vec::new(),
        served: 0,
        refused: false,
        no_sendfile: false,
    };
    let end = session.serve(&mut stream);
    info!(
        "stripe server: client {peer} gone after {} stripes{}",
        session.served,
        match &end {
            Ok(()) => String::new(),
            Err(e) => format!(" ({e})"),
        }
    );
    Ok(())
}

struct Session<'a> {
    s: &'a Shared,
    channel: &'a mut dyn IoChannel,
    /// The stripe being read, reused (it comes back with each completion).
    io: Option<IoBuf>,
    /// A partial last stripe, padded with zeros.
    padded: Vec<u8>,
    served: u64,
    /// A refused READ_STRIPE was logged at warn (later ones at debug).
    refused: bool,
    /// `sendfile` failed for want of support: read and copy from then on.
    no_sendfile: bool,
}

impl Session<'_> {
    fn serve(&mut self, stream: &mut Stream) -> io::Result<()> {
        while let Some(req) = protocol::read_request(stream)? {
            match req {
                Request::Hello => protocol::write_hello(stream)?,
                Request::Metadata => match self.s.layout.geometry().encode() {
                    Ok(blob) => protocol::write_payload(stream, &blob)?,
                    Err(e) => {
                        warn!("stripe server: METADATA: {e}");
                        protocol::write_status(stream, STATUS_SERVER_ERROR)?
                    }
                },
                Request::ReadStripe(index) => self.read_stripe(stream, index)?,
                Request::Unknown(op) => {
                    debug!("stripe server: unknown opcode {op:#04x}");
                    protocol::write_status(stream, STATUS_INVALID_COMMAND)?
                }
            }
        }
        Ok(())
    }

    /// The session's stripe buffer (a new one if it has none of `bytes`).
    fn stripe_buf(&mut self, bytes: usize) -> IoBuf {
        match self.io.take() {
            Some(b) if b.capacity() >= bytes => b,
            _ => IoBuf::new(bytes),
        }
    }

    /// Reads stripe `index` (from sector `first`, `buf.len()` bytes) into `buf`: where the
    /// layout says it is if not on the disk, else from the disk. A failure is logged; the
    /// buffer comes back with it unless the channel kept it.
    fn read(&mut self, index: u64, first: u64, mut buf: IoBuf) -> Result<IoBuf, Option<IoBuf>> {
        if let Some(r) = self.s.layout.read_elsewhere(index, &mut buf[..]) {
            return match r {
                Ok(()) => Ok(buf),
                Err(e) => {
                    warn!(
                        "stripe server: reading stripe {index} from the disk's source failed: {e}"
                    );
                    Err(Some(buf))
                }
            };
        }
        match run_sync(self.channel, IoOp::Read { sector: first, buf }) {
            (Ok(()), Some(b)) => Ok(b),
            (r, back) => {
                let errno = r.err().unwrap_or(libc::EIO);
                warn!(
                    "stripe server: reading stripe {index} failed: {}",
                    io::Error::from_raw_os_error(errno)
                );
                Err(back)
            }
        }
    }

    fn read_stripe(&mut self, stream: &mut Stream, index: u64) -> io::Result<()> {
        let Some((shift, flags)) = self.s.layout.stripe(index) else {
            return protocol::write_status(stream, STATUS_INVALID_STRIPE);
        };
        if flags & (FETCHED | WRITTEN | HAS_SOURCE) == 0 {
            return protocol::write_status(stream, STATUS_NO_DATA);
        }
        if let Err(why) = self.s.gate.stripe_read() {
            if !std::mem::replace(&mut self.refused, true) {
                warn!("stripe server: READ_STRIPE refused: {why}");
            } else {
                debug!("stripe server: READ_STRIPE {index} refused: {why}");
            }
            return protocol::write_status(stream, STATUS_SERVER_ERROR);
        }
        let stripe_bytes = 1usize << (shift as u32 + SECTOR_SHIFT);
        let first = index << shift;
        let n = (1u64 << shift).min(self.s.device.sectors().saturating_sub(first));
        let len = (n << SECTOR_SHIFT) as usize;
        if len == stripe_bytes && !self.no_sendfile {
            if let Stream::Plain(tcp) = &*stream {
                if let Some((file, offset)) = self.s.layout.in_file(index) {
                    return self.send_from_file(tcp, (index, first), file, offset, len);
                }
            }
        }
        let mut buf = self.stripe_buf(stripe_bytes);
        if len > 0 {
            buf.set_len(len);
            buf = match self.read(index, first, buf) {
                Ok(b) => b,
                Err(back) => {
                    self.io = back;
                    return protocol::write_status(stream, STATUS_SERVER_ERROR);
                }
            };
        }
        let sent = if len == stripe_bytes {
            protocol::write_payload(stream, &buf)
        } else {
            // The disk's partial last stripe (or one wholly past a shrunk end): zeros after it.
            self.padded.clear();
            self.padded.extend_from_slice(&buf[..len]);
            self.padded.resize(stripe_bytes, 0);
            protocol::write_payload(stream, &self.padded)
        };
        self.io = Some(buf);
        sent?;
        self.served += 1;
        Ok(())
    }

    /// Stripe `index` (from sector `first`), `len` bytes at `offset` in `file`, sent with
    /// `sendfile` after its head.
    /// Where the kernel cannot (the head is out, nothing more), the stripe is read and sent
    /// as usual, and so are the session's later ones.
    fn send_from_file(
        &mut self,
        tcp: &TcpStream,
        (index, first): (u64, u64),
        file: &File,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let head = protocol::payload_head(len as u64);
        match zerocopy::send_head_and_file(tcp, &head, file, offset, len) {
            Ok(()) => zerocopy::drop_cached(file, offset, len),
            Err((0, e)) if unsupported(&e) => {
                debug!("stripe server: sendfile: {e}; reading and sending stripes instead");
                self.no_sendfile = true;
                let mut buf = self.stripe_buf(len);
                buf.set_len(len);
                match self.read(index, first, buf) {
                    Ok(b) => {
                        let sent = (&*tcp).write_all(&b);
                        self.io = Some(b);
                        sent?;
                    }
                    // The head promised a stripe: the client sees the connection end.
                    Err(back) => {
                        self.io = back;
                        return Err(io::Error::other("reading the stripe failed"));
                    }
                }
            }
            // The connection ends; its "gone" line says why.
            Err((_, e)) => return Err(e),
        }
        self.served += 1;
        Ok(())
    }
}

/// `sendfile` cannot read this file or write this socket (as opposed to a failed transfer).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests;
