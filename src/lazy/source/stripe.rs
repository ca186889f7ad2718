//! Another host's stripe server as the source (`image_url: ubiblk://HOST:PORT`): ubiblk v0.5's
//! remote stripe protocol ([`crate::stripe::protocol`]) over TLS-PSK (`psk_identity`,
//! `psk_file`), or plaintext with the `danger_zone` opt-in.
//!
//! A pool of connections, one request at a time on each (the protocol's rule), as many as
//! fetches run at once (`fetch_connections`); a connection that failed is dropped, never
//! reused. Every fetch runs under the remote sources' retry policy ([`RetryPolicy`]:
//! backoff, budget, circuit breaker): dropped connections, timeouts and the server's
//! `0xFF` (a server error, or a VM running on the served disk) are retried; a refused
//! handshake (wrong PSK), a protocol violation or a server that cannot read a stripe is not.
//! A new connection must show the geometry the first one did (stripe size and count), or
//! the server now serves another disk: a permanent error.

use std::fmt;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;
use openssl::ssl::SslContext;

use super::{SourceIdentity, SourceKind, StripeSource};
use crate::remote::retry::{Failure, Outage, RetryPolicy};
use crate::remote::RemoteOptions;
use crate::stripe::protocol::{self, Geometry, ProtocolError, StripeReply};
use crate::stripe::protocol::{STATUS_NOT_FETCHED, STATUS_NO_DATA, STATUS_SERVER_ERROR};
use crate::stripe::tls::PskSpec;
use crate::stripe::tls::{self, Psk, Stream, TlsError};

pub struct StripeServerSource {
    url: String,
    addr: String,
    tls: Option<SslContext>,
    policy: RetryPolicy,
    geometry: Geometry,
    pool: Mutex<Vec<Stream>>,
}

/// Connects to the stripe server `url` names and learns its disk's geometry.
pub fn open(
    url: &str,
    psk: Option<&PskSpec>,
    remote: &RemoteOptions,
) -> io::Result<StripeServerSource> {
    let addr = url
        .strip_prefix("ubiblk://")
        .map(|a| a.trim_end_matches('/'))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a ubiblk:// URL"))?;
    let tls = match psk {
        Some(spec) => {
            let psk = Psk::load(&spec.identity, &spec.file)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Some(tls::client_context(Arc::new(psk)).map_err(io::Error::other)?)
        }
        None => {
            log::warn!(
                "{url}: WITHOUT ENCRYPTION OR AUTHENTICATION \
                 (danger_zone.allow_unencrypted_connection)"
            );
            None
        }
    };
    let policy = RetryPolicy::new(remote.attempt_timeout, remote.retry_budget);
    let mut src = StripeServerSource {
        url: url.to_string(),
        addr: addr.to_string(),
        tls,
        policy,
        geometry: Geometry {
            shift: 0,
            flags: Vec::new(),
        },
        pool: Mutex::default(),
    };
    let (conn, geometry) = src.policy.run(|timeout| src.dial(timeout))?;
    info!(
        "{url}: {} stripes of {} KiB, {} with data{}",
        geometry.stripe_count(),
        geometry.stripe_bytes() >> 10,
        (0..geometry.stripe_count())
            .filter(|&i| geometry.has_data(i))
            .count(),
        if src.tls.is_some() { ", TLS-PSK" } else { "" }
    );
    src.geometry = geometry;
    src.pool_put(conn);
    Ok(src)
}

/// Connects, says HELLO and asks for METADATA, each step bounded by `timeout`.
pub fn dial(
    addr: &str,
    tls: Option<&SslContext>,
    timeout: Duration,
) -> Result<(Stream, Geometry), Failure> {
    let timeout = timeout.max(Duration::from_millis(1));
    let addrs = addr.to_socket_addrs().map_err(Failure::transient)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last = io::Error::new(e.kind(), format!("connecting to {a}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| Failure::transient(last))?;
    set_timeouts(&tcp, timeout).map_err(Failure::transient)?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match tls {
        Some(ctx) => tls::connect(ctx, tcp).map_err(tls_failure)?,
        None => Stream::Plain(tcp),
    };
    protocol::hello(&mut stream).map_err(protocol_failure)?;
    let geometry = protocol::metadata(&mut stream).map_err(protocol_failure)?;
    Ok((stream, geometry))
}

fn set_timeouts(tcp: &TcpStream, timeout: Duration) -> io::Result<()> {
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    tcp.set_read_timeout(timeout)?;
    tcp.set_write_timeout(timeout)
}

/// A handshake the server refused with an alert (a wrong key or identity) is permanent; one
/// cut short (a server at its connection limit closes at once) is transient.
fn tls_failure(e: TlsError) -> Failure {
    let text = e.to_string();
    let err = io::Error::new(io::ErrorKind::PermissionDenied, text.clone());
    match e {
        TlsError::Io(e) => Failure::transient(e),
        TlsError::Handshake(m) if m.contains("alert") => Failure::permanent(err),
        _ => Failure::transient(err),
    }
}

fn protocol_failure(e: ProtocolError) -> Failure {
    match e {
        ProtocolError::Io(e) => Failure::transient(e),
        ProtocolError::Status {
            status: STATUS_SERVER_ERROR,
            ..
        } => Failure::transient(io::Error::other(e.to_string())),
        other => Failure::permanent(io::Error::new(
            io::ErrorKind::InvalidData,
            other.to_string(),
        )),
    }
}

/// Whether a pooled connection can carry a request: the server sends nothing unasked, so
/// anything to read on an idle connection is its end (a TLS close_notify, or EOF: the
/// reference's server closes sessions idle longer than its operation timeout).
fn idle_and_open(conn: &Stream) -> bool {
    let tcp = conn.tcp();
    if tcp.set_nonblocking(true).is_err() {
        return false;
    }
    let peeked = tcp.peek(&mut [0u8; 1]);
    let restored = tcp.set_nonblocking(false).is_ok();
    restored && matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl StripeServerSource {
    /// The served disk's geometry, as the first connection showed it.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn dial(&self, timeout: Duration) -> Result<(Stream, Geometry), Failure> {
        dial(&self.addr, self.tls.as_ref(), timeout).map_err(|mut f| {
            f.error = io::Error::new(f.error.kind(), format!("{}: {}", self.url, f.error));
            f
        })
    }

    fn pool_put(&self, conn: Stream) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    /// A pooled connection the server has not closed, its reads and writes bounded by
    /// `timeout`.
    fn pooled(&self, timeout: Duration) -> Option<io::Result<Stream>> {
        loop {
            let conn = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if idle_and_open(&conn) {
                return Some(set_timeouts(conn.tcp(), timeout).map(|()| conn));
            }
        }
    }

    /// A pooled connection the server has not closed, or a new one showing the same geometry.
    fn checkout(&self, timeout: Duration) -> Result<Stream, Failure> {
        if let Some(conn) = self.pooled(timeout) {
            return conn.map_err(Failure::transient);
        }
        let (conn, geometry) = self.dial(timeout)?;
        if geometry.shift != self.geometry.shift
            || geometry.stripe_count() != self.geometry.stripe_count()
        {
            return Err(Failure::permanent(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the server now serves another disk ({} stripes of 2^{} sectors, \
                     was {} of 2^{})",
                    self.url,
                    geometry.stripe_count(),
                    geometry.shift,
                    self.geometry.stripe_count(),
                    self.geometry.shift
                ),
            )));
        }
        Ok(conn)
    }

    /// One stripe into `out` (exactly a stripe long).
    fn fetch(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        self.policy.run(|timeout| {
            let conn = self.checkout(timeout)?;
            let what = |e: &dyn fmt::Display| format!("{}: stripe {index}: {e}", self.url);
            match self.exchange(conn, index, out) {
                Ok(None) => Ok(()),
                Ok(Some(s)) => {
                    let e = io::Error::other(what(&status_message(s)));
                    Err(match s {
                        STATUS_SERVER_ERROR => Failure::transient(e),
                        _ => Failure::permanent(e),
                    })
                }
                Err(e) => {
                    let mut f = protocol_failure(e);
                    f.error = io::Error::new(f.error.kind(), what(&f.error));
                    Err(f)
                }
            }
        })
    }

    /// Asks `conn` for stripe `index` into `out` (zeros for NO_DATA): `Ok(Some(status))` when
    /// the server answered with an error status. The connection goes back to the pool after
    /// the stripe, NO_DATA or `0xFF` (a busy server); after any other status, or a failed
    /// exchange, it is dropped.
    fn exchange(
        &self,
        mut conn: Stream,
        index: u64,
        out: &mut [u8],
    ) -> Result<Option<u8>, ProtocolError> {
        match protocol::read_stripe(&mut conn, index, out)? {
            StripeReply::Data => {}
            StripeReply::Status(STATUS_NO_DATA) => out.fill(0),
            StripeReply::Status(s) => {
                if s == STATUS_SERVER_ERROR {
                    self.pool_put(conn);
                }
                return Ok(Some(s));
            }
        }
        self.pool_put(conn);
        Ok(None)
    }
}

/// What an error status answering READ_STRIPE means.
fn status_message(s: u8) -> String {
    match s {
        STATUS_SERVER_ERROR => "server error (or a VM runs on the served disk)".to_string(),
        STATUS_NOT_FETCHED => {
            format!("status {s:#04x}: the server has not fetched it and cannot read its own source")
        }
        _ => format!("status {s:#04x}: {}", protocol::status_name(s)),
    }
}

impl fmt::Display for StripeServerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl StripeSource for StripeServerSource {
    /// The served disk's stripes, whole (its last one may be padded with zeros).
    fn bytes(&self) -> u64 {
        self.geometry.stripe_count() * self.geometry.stripe_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let sb = self.geometry.stripe_bytes();
        let mut pos = 0usize;
        let mut whole = Vec::new();
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (index, within) = (at / sb, (at % sb) as usize);
            let n = (sb as usize - within).min(buf.len() - pos);
            let out = &mut buf[pos..pos + n];
            if !self.geometry.has_data(index) {
                out.fill(0);
            } else if within == 0 && n as u64 == sb {
                self.fetch(index, out)?;
            } else {
                whole.resize(sb as usize, 0);
                self.fetch(index, &mut whole)?;
                out.copy_from_slice(&whole[within..within + n]);
            }
            pos += n;
        }
        Ok(())
    }

    /// Over a pooled connection only (a new one would cost a handshake), no retries: a
    /// failure, the server's `0xFF` included, leaves the stripe to the pool.
    fn read_now(&self, offset: u64, buf: &mut [u8], within: Duration) -> Option<io::Result<()>> {
        let sb = self.geometry.stripe_bytes();
        if !offset.is_multiple_of(sb) || buf.len() as u64 != sb {
            return None;
        }
        let index = offset / sb;
        if !self.geometry.has_data(index) {
            buf.fill(0);
            return Some(Ok(()));
        }
        let conn = match self.pooled(within)? {
            Ok(conn) => conn,
            Err(e) => return Some(Err(e)),
        };
        let what =
            |e: &dyn fmt::Display| io::Error::other(format!("{}: stripe {index}: {e}", self.url));
        Some(match self.exchange(conn, index, buf) {
            Ok(None) => Ok(()),
            Ok(Some(s)) => Err(what(&status_message(s))),
            // Cut short (a timeout mid-stripe): the connection is dropped, never reused.
            Err(e) => Err(what(&e)),
        })
    }

    fn retries(&self) -> u64 {
        self.policy.retries()
    }

    /// The server's address and its disk's geometry: the protocol has nothing that tells one
    /// disk from another of the same shape.
    fn identity(&self) -> SourceIdentity {
        SourceIdentity::new(SourceKind::StripeServer, self.url.clone(), self.bytes())
            .with("stripe_shift", self.geometry.shift.to_string())
            .with("stripes", self.geometry.stripe_count().to_string())
    }

    fn outage(&self) -> Option<Outage> {
        self.policy.outage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::protocol::{write_hello, write_payload, write_status, Request, HAS_SOURCE};
    use std::net::TcpListener;

    /// A fake stripe server: connection `n` is served by `script(n, request)`, which answers
    /// or returns false to close the connection.
    fn server(script: impl Fn(usize, Request, &mut TcpStream) -> bool + Send + 'static) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for (n, c) in l.incoming().enumerate() {
                let mut c = c.unwrap();
                while let Ok(Some(req)) = protocol::read_request(&mut c) {
                    if !script(n, req, &mut c) {
                        break;
                    }
                }
            }
        });
        format!("ubiblk://{addr}")
    }

    fn meta(c: &mut TcpStream, shift: u8) -> bool {
        let g = Geometry {
            shift,
            flags: vec![HAS_SOURCE; 4],
        };
        write_payload(c, &g.encode().unwrap()).is_ok()
    }

    fn opts() -> RemoteOptions {
        RemoteOptions {
            attempt_timeout: Duration::from_secs(1),
            retry_budget: Duration::from_secs(3),
            ..RemoteOptions::default()
        }
    }

    #[test]
    fn a_busy_server_is_retried_and_a_changed_disk_on_reconnect_is_refused() {
        let url = server(|n, req, c| match req {
            Request::Hello => write_hello(c).is_ok(),
            // The second connection shows another stripe size.
            Request::Metadata => meta(c, if n == 0 { 6 } else { 7 }),
            Request::ReadStripe(0) => write_payload(c, &[0x5a; 32768]).is_ok(),
            // Busy once, then the connection drops.
            Request::ReadStripe(1) => {
                let _ = write_status(c, STATUS_SERVER_ERROR);
                false
            }
            _ => false,
        });
        let src = open(&url, None, &opts()).unwrap();
        assert_eq!((src.bytes(), src.geometry().shift), (4 * 32768, 6));
        let mut buf = vec![0u8; 4096];
        src.read_at(512, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        let e = src.read_at(32768, &mut buf).unwrap_err().to_string();
        assert!(e.contains("now serves another disk"), "{e}");
        assert!(src.retries() >= 1);
    }

    /// `read_now` takes a pooled connection (never dials), gives up within its bound on a
    /// stalled stripe and drops that connection; the next fetch dials a new one.
    #[test]
    fn read_now_uses_an_idle_connection_and_gives_up_in_time() {
        let url = server(|_, req, c| match req {
            Request::Hello => write_hello(c).is_ok(),
            Request::Metadata => meta(c, 6),
            Request::ReadStripe(0) => write_payload(c, &[0x11; 32768]).is_ok(),
            Request::ReadStripe(1) => {
                std::thread::sleep(Duration::from_millis(500));
                write_payload(c, &[0x22; 32768]).is_ok()
            }
            _ => write_status(c, STATUS_NO_DATA).is_ok(),
        });
        let src = open(&url, None, &opts()).unwrap();
        let within = Duration::from_millis(50);
        let mut buf = vec![0u8; 32768];
        // Whole stripes only.
        assert!(src.read_now(512, &mut buf[..512], within).is_none());
        src.read_now(0, &mut buf, within).unwrap().unwrap();
        assert!(buf.iter().all(|&b| b == 0x11));
        let t = std::time::Instant::now();
        let e = src.read_now(32768, &mut buf, within).unwrap().unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        assert!(e.to_string().contains("stripe 1"), "{e}");
        // The stalled connection is gone, and read_now does not dial.
        assert!(src.read_now(0, &mut buf, within).is_none());
        src.read_at(3 * 32768, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "no data reads as zeros");
        buf.fill(9);
        src.read_now(2 * 32768, &mut buf, within).unwrap().unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn garbage_statuses_and_wrong_sizes_fail_at_once() {
        let url = server(|_, req, c| match req {
            Request::Hello => write_hello(c).is_ok(),
            Request::Metadata => meta(c, 6),
            Request::ReadStripe(0) => write_status(c, 0x42).is_ok(),
            Request::ReadStripe(1) => write_payload(c, &[1; 512]).is_ok(),
            Request::ReadStripe(2) => write_status(c, STATUS_NOT_FETCHED).is_ok(),
            _ => write_status(c, STATUS_NO_DATA).is_ok(),
        });
        let src = open(&url, None, &opts()).unwrap();
        let mut buf = vec![7u8; 32768];
        let t = std::time::Instant::now();
        for (stripe, want) in [
            (0, "0x42"),
            (1, "512 bytes"),
            (2, "cannot read its own source"),
        ] {
            let e = src
                .read_at(stripe * 32768, &mut buf)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{stripe}: {e}");
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        src.read_at(3 * 32768, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "no data reads as zeros");
    }
}
