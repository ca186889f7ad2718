//! TLS 1.2 with an external PSK, cipher suite PSK-AES256-GCM-SHA384, as ubiblk v0.5's remote
//! stripe protocol uses it; through the `openssl` crate (rustls has no TLS 1.2 PSK).
//!
//! The PSK is the bytes of `psk_file` (16 to 256 of them, a trailing newline included: the
//! file's bytes are the secret), which must be a regular file without group or other
//! permissions; `psk_identity` (1 to 128 printable ASCII characters) names it. The server
//! refuses a client naming another identity, and the handshake fails for a client holding
//! another key. Neither the PSK nor anything derived from it is logged or put in an error;
//! [`Psk`]'s `Debug` shows the identity only, and the key is zeroed when dropped.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use openssl::error::ErrorStack;
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream,
    SslVersion,
};
use zeroize::Zeroizing;

use crate::sys::open::{open_for_reading, Kinds};
use crate::sys::ratelog::{self, RateLimiter, Verdict};

/// The only cipher suite offered or accepted.
pub const CIPHER: &str = "PSK-AES256-GCM-SHA384";
/// Shortest PSK (the reference's bound) and longest (what OpenSSL's callbacks hold).
pub const MIN_PSK_BYTES: usize = 16;
pub const MAX_PSK_BYTES: usize = 256;
/// Longest identity (OpenSSL's `PSK_MAX_IDENTITY_LEN`).
pub const MAX_IDENTITY_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("psk_identity: {0}")]
    Identity(&'static str),
    #[error("psk_file: {}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    #[error("cannot set up TLS-PSK: {0}")]
    Context(#[from] ErrorStack),
    /// The handshake failed: a wrong key or identity on either side, or not TLS at all.
    #[error("TLS-PSK handshake failed (a wrong psk_identity or psk_file on either side, or a peer that does not speak TLS-PSK {CIPHER}): {0}")]
    Handshake(String),
    #[error("TLS-PSK handshake: {0}")]
    Io(#[from] io::Error),
}

/// Where a PSK comes from (the config's `psk_identity` and `psk_file`): read by [`Psk::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskSpec {
    pub identity: String,
    pub file: PathBuf,
}

/// An identity and its key.
pub struct Psk {
    identity: String,
    key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Psk {{ identity: {:?}, key: (not shown) }}",
            self.identity
        )
    }
}

impl Psk {
    pub fn new(identity: &str, key: Vec<u8>) -> Result<Self, TlsError> {
        let key = Zeroizing::new(key);
        check_identity(identity)?;
        if !(MIN_PSK_BYTES..=MAX_PSK_BYTES).contains(&key.len()) {
            return Err(TlsError::File {
                path: PathBuf::new(),
                problem: format!(
                    "the key is {} bytes, must be {MIN_PSK_BYTES}..={MAX_PSK_BYTES}",
                    key.len()
                ),
            });
        }
        Ok(Psk {
            identity: identity.to_string(),
            key,
        })
    }

    /// Reads `path` (see the module documentation for what it must be).
    pub fn load(identity: &str, path: &Path) -> Result<Self, TlsError> {
        check_identity(identity)?;
        let err = |problem: String| TlsError::File {
            path: path.to_owned(),
            problem,
        };
        let file = open_for_reading(path, Kinds::Regular).map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {mode:04o} gives the group or others access to a secret: chmod 600 it"
            )));
        }
        let mut key = Zeroizing::new(Vec::new());
        file.take(MAX_PSK_BYTES as u64 + 1)
            .read_to_end(&mut key)
            .map_err(|e| err(e.to_string()))?;
        if !(MIN_PSK_BYTES..=MAX_PSK_BYTES).contains(&key.len()) {
            return Err(err(format!(
                "holds {}{} bytes, a PSK must be {MIN_PSK_BYTES}..={MAX_PSK_BYTES}",
                if key.len() > MAX_PSK_BYTES {
                    "more than "
                } else {
                    ""
                },
                key.len().min(MAX_PSK_BYTES)
            )));
        }
        Ok(Psk {
            identity: identity.to_string(),
            key: Zeroizing::new(key.to_vec()),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }
}

fn check_identity(identity: &str) -> Result<(), TlsError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY_BYTES {
        return Err(TlsError::Identity("must be 1..=128 bytes"));
    }
    if !identity.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TlsError::Identity("must be printable ASCII without spaces"));
    }
    Ok(())
}

fn builder() -> Result<SslContextBuilder, ErrorStack> {
    let mut b = SslContext::builder(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_cipher_list(CIPHER)?;
    b.set_options(SslOptions::NO_TICKET | SslOptions::NO_COMPRESSION);
    // Whole records (and more) per read(2), not a header and a body.
    b.set_read_ahead(true);
    Ok(b)
}

/// The server's context: only a client naming `psk`'s identity gets its key.
pub fn server_context(psk: Arc<Psk>) -> Result<SslContext, TlsError> {
    let mut b = builder()?;
    b.set_psk_server_callback(move |_, identity, out| {
        let given = identity.unwrap_or_default();
        let want = psk.identity.as_bytes();
        // memcmp::eq needs equal lengths (and compares in constant time).
        if given.len() != want.len() || !openssl::memcmp::eq(given, want) {
            let shown = String::from_utf8_lossy(&given[..given.len().min(MAX_IDENTITY_BYTES)]);
            refused_identity(&shown);
            return Ok(0);
        }
        let key = &psk.key;
        match out.get_mut(..key.len()) {
            Some(slot) => {
                slot.copy_from_slice(key);
                Ok(key.len())
            }
            None => Ok(0),
        }
    });
    Ok(b.build())
}

/// Logs a refused identity at warn, at most [`ratelog::BURST`] per [`ratelog::WINDOW`] (a
/// client can try identities in a loop); the rest at debug.
fn refused_identity(shown: &str) {
    static LIMIT: OnceLock<Mutex<RateLimiter>> = OnceLock::new();
    let limit = LIMIT.get_or_init(|| Mutex::new(RateLimiter::new(ratelog::BURST, ratelog::WINDOW)));
    let verdict = limit.lock().unwrap_or_else(|p| p.into_inner()).check(
        "stripe-psk",
        log::Level::Warn,
        Instant::now(),
    );
    match verdict {
        Verdict::Pass { .. } | Verdict::StartSuppressing => {
            log::warn!("stripe server: a client named PSK identity {shown:?}, not ours: refused")
        }
        Verdict::Drop => log::debug!("stripe server: PSK identity {shown:?} refused"),
    }
}

/// The client's context: it names `psk`'s identity and uses its key.
pub fn client_context(psk: Arc<Psk>) -> Result<SslContext, TlsError> {
    let mut b = builder()?;
    b.set_psk_client_callback(move |_, _hint, identity, out| {
        let id = psk.identity.as_bytes();
        let key = &psk.key;
        // The identity goes NUL-terminated; both were bounded when the Psk was made.
        if id.len() >= identity.len() || key.len() > out.len() {
            return Err(ErrorStack::get());
        }
        identity[..id.len()].copy_from_slice(id);
        identity[id.len()] = 0;
        out[..key.len()].copy_from_slice(key);
        Ok(key.len())
    });
    Ok(b.build())
}

/// The socket under TLS: reads go straight to it; once the handshake is done (OpenSSL does
/// not flush its flights), writes are gathered until a flush (the end of a message) or
/// [`WRITE_BUFFER`] bytes, so a stripe's 16 KiB records do not cost a system call each.
pub struct Buffered {
    tcp: TcpStream,
    out: Vec<u8>,
    gather: bool,
}

/// Bytes gathered before they are sent without waiting for a flush.
const WRITE_BUFFER: usize = 256 << 10;

impl Buffered {
    fn new(tcp: TcpStream) -> Self {
        Buffered {
            tcp,
            out: Vec::new(),
            gather: false,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let r = self.tcp.write_all(&self.out);
        self.out.clear();
        r
    }
}

impl Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.gather {
            return self.tcp.write(buf);
        }
        self.out.extend_from_slice(buf);
        if self.out.len() >= WRITE_BUFFER {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()?;
        self.tcp.flush()
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

fn handshake_error(e: HandshakeError<Buffered>) -> TlsError {
    match e {
        HandshakeError::SetupFailure(e) => TlsError::Context(e),
        HandshakeError::Failure(m) | HandshakeError::WouldBlock(m) => {
            let e = m.error();
            match e.io_error() {
                Some(io) => TlsError::Io(io::Error::new(io.kind(), io.to_string())),
                None => TlsError::Handshake(e.to_string()),
            }
        }
    }
}

fn established(mut s: SslStream<Buffered>) -> Stream {
    s.get_mut().gather = true;
    Stream::Tls(Box::new(s))
}

/// Server side: a TLS-PSK handshake on `tcp` (its timeouts bound it).
pub fn accept(ctx: &SslContext, tcp: TcpStream) -> Result<Stream, TlsError> {
    let ssl = Ssl::new(ctx)?;
    ssl.accept(Buffered::new(tcp))
        .map(established)
        .map_err(handshake_error)
}

/// Client side: a TLS-PSK handshake on `tcp` (its timeouts bound it).
pub fn connect(ctx: &SslContext, tcp: TcpStream) -> Result<Stream, TlsError> {
    let ssl = Ssl::new(ctx)?;
    ssl.connect(Buffered::new(tcp))
        .map(established)
        .map_err(handshake_error)
}

/// A connection, with TLS or (the `danger_zone` opt-in) without.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<Buffered>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.get_ref().tcp,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A plain stream hands vectors to the socket (`writev`), not just the first of them.
    #[test]
    fn a_plain_stream_writes_vectors_in_one_call() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut s = Stream::Plain(c);
        let bufs = [io::IoSlice::new(b"head"), io::IoSlice::new(b"payload")];
        assert_eq!(s.write_vectored(&bufs).unwrap(), 11);
    }

    fn pair(server: Arc<Psk>, client: Arc<Psk>) -> (Result<(), String>, Result<(), String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ctx = server_context(server).unwrap();
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let mut s = accept(&ctx, tcp).map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            s.write_all(&b).map_err(|e| e.to_string())?;
            s.flush().map_err(|e| e.to_string())
        });
        let ctx = client_context(client).unwrap();
        let c = (|| {
            let mut s =
                connect(&ctx, TcpStream::connect(addr).unwrap()).map_err(|e| e.to_string())?;
            s.write_all(b"ping").map_err(|e| e.to_string())?;
            // Gathered until the flush (see Buffered).
            s.flush().map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            assert_eq!(&b, b"ping");
            Ok(())
        })();
        (t.join().unwrap(), c)
    }

    #[test]
    fn the_same_psk_connects_another_key_or_identity_does_not() {
        let psk = |id: &str, k: u8| Arc::new(Psk::new(id, vec![k; 32]).unwrap());
        let (s, c) = pair(psk("a", 1), psk("a", 1));
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        let (s, c) = pair(psk("a", 1), psk("a", 2));
        assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
        let (s, c) = pair(psk("a", 1), psk("bb", 1));
        assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
        // No error shows the key.
        let key_hex = "0101010101010101";
        assert!(!format!("{s:?}{c:?}").contains(key_hex));
    }

    #[test]
    fn psk_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::load("id", &path).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let psk = Psk::load("id", &path).unwrap();
        assert_eq!(
            format!("{psk:?}"),
            "Psk { identity: \"id\", key: (not shown) }"
        );
        std::fs::write(&path, [7u8; 15]).unwrap();
        assert!(Psk::load("id", &path)
            .unwrap_err()
            .to_string()
            .contains("15 bytes"));
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let e = Psk::load("id", &path).unwrap_err().to_string();
        assert!(e.contains("more than 256 bytes"), "{e}");
        assert!(Psk::load("", &path).is_err());
        assert!(Psk::load("a b", &path).is_err());
        assert!(Psk::load("id", &dir.path().join("missing")).is_err());
        assert!(Psk::load("id", dir.path()).is_err());
    }
}
