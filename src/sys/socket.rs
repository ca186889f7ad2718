//! The unix sockets the backend listens on (`socket`, `control_socket`): how a path is claimed
//! and how it is given back. One set of rules for both:
//!
//! - A path holding anything but a socket (a regular file, the disk itself, a directory, a
//!   symbolic link) is refused; nothing is removed.
//! - A socket that accepts a connection belongs to a live process: refused.
//! - A socket that refuses connections (twice, 20 ms apart: one just bound refuses until it
//!   listens) is stale, its server gone: it is replaced.
//! - The new socket gets its mode (0600 unless configured) and group between bind(2) and
//!   listen(2): nobody can connect before they are set, whatever the umask.
//! - It is removed only if the path still holds the inode bind(2) created (same device and
//!   inode number; the inode is kept open with `O_PATH` so its number cannot be reused), so
//!   whatever replaced it meanwhile is left alone.
//!
//! The directory holding the socket must be writable only by the operator: whoever can write
//! it can always rename the socket away and put their own there.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};

/// The mode of a socket without `socket_mode`: only the backend's user may connect.
pub const PRIVATE_MODE: u32 = 0o600;

/// How often a path that keeps turning up again is inspected before giving up.
const ATTEMPTS: usize = 3;
/// How long a socket refusing connections is given to start listening before it is stale.
const STALE_PAUSE: Duration = Duration::from_millis(20);

/// `socket_group`, resolved from its text: a gid, or a name looked up when the socket is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketGroup {
    Id(u32),
    Name(String),
}

/// Who may connect to a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perms {
    /// Permission bits (at most 0o777; connecting needs write permission).
    pub mode: u32,
    /// The socket's group, if not the one it is created with.
    pub group: Option<SocketGroup>,
}

impl Perms {
    /// 0600 and the creator's group.
    pub fn private() -> Perms {
        Perms {
            mode: PRIVATE_MODE,
            group: None,
        }
    }
}

/// Why a socket path could not be claimed; every variant names the config field.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{field}: {} exists and is {kind}, not a socket; refusing to replace it", path.display())]
    NotASocket {
        field: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{field}: {} is in use: another process is listening on it", path.display())]
    InUse { field: &'static str, path: PathBuf },
    #[error("{field}: cannot tell whether the socket {} is in use", path.display())]
    Probe {
        field: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{field}: cannot listen on {}", path.display())]
    Listen {
        field: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{field}: cannot set mode {mode:04o} on {}", path.display())]
    Mode {
        field: &'static str,
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("socket_group: no group named {name:?}")]
    UnknownGroup { name: String },
    #[error("socket_group: cannot look up group {name:?}")]
    GroupLookup { name: String, source: io::Error },
    #[error("socket_group: cannot give {} to group {gid}", path.display())]
    Group {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
    #[error("{field}: {} was replaced by another file while it was being set up", path.display())]
    Replaced { field: &'static str, path: PathBuf },
}

/// A socket file this process created: removed (by [`SocketFile::remove`] or on drop) only
/// while the path still holds that inode.
#[derive(Debug)]
pub struct SocketFile {
    field: &'static str,
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// An `O_PATH` descriptor of the socket inode: while it is open the inode lives on, so no
    /// other file (created after ours was removed) can get its inode number, which file
    /// systems otherwise reuse at once.
    pin: std::fs::File,
    released: AtomicBool,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `meta` (from `symlink_metadata`) is the socket we created.
    fn is(&self, meta: &std::fs::Metadata) -> bool {
        meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino
    }

    /// Removes the socket file if the path still holds the one we created; anything else there
    /// is left alone. Acts once; returns whether it removed the file.
    pub fn remove(&self) -> bool {
        if self.released.swap(true, Ordering::SeqCst) {
            return false;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if self.is(&meta) => match std::fs::remove_file(&self.path) {
                Ok(()) => true,
                Err(e) => {
                    warn!("{}: cannot remove {}: {e}", self.field, self.path.display());
                    false
                }
            },
            Ok(_) => {
                warn!(
                    "{}: {} is no longer the socket this process created; leaving it",
                    self.field,
                    self.path.display()
                );
                false
            }
            Err(_) => false,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Claims `path` (see the module documentation), sets `perms` on the new socket and listens on
/// it. `field` names the path in errors and logs.
pub fn listen(
    field: &'static str,
    path: &Path,
    perms: &Perms,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let listen_err = |source| SocketError::Listen {
        field,
        path: path.to_owned(),
        source,
    };
    // Resolved first: a bad group must not leave a socket behind.
    let gid = perms.group.as_ref().map(group_id).transpose()?;
    for _ in 0..ATTEMPTS {
        let fd = new_socket(false).map_err(listen_err)?;
        match bind(&fd, path) {
            Ok(()) => return finish(field, path, fd, perms.mode, gid),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => clear_stale(field, path)?,
            Err(e) => return Err(listen_err(e)),
        }
    }
    Err(listen_err(io::Error::from_raw_os_error(libc::EADDRINUSE)))
}

/// After bind(2): records the new inode, sets mode and group, checks the inode is still there
/// with that mode, and only then listens.
fn finish(
    field: &'static str,
    path: &Path,
    fd: OwnedFd,
    mode: u32,
    gid: Option<u32>,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let listen_err = |source| SocketError::Listen {
        field,
        path: path.to_owned(),
        source,
    };
    let replaced = || SocketError::Replaced {
        field,
        path: path.to_owned(),
    };
    let pin = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(listen_err)?;
    let meta = pin.metadata().map_err(listen_err)?;
    if !meta.file_type().is_socket() {
        return Err(replaced());
    }
    // From here on, an early return removes the socket (if it is still ours).
    let file = SocketFile {
        field,
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        pin,
        released: AtomicBool::new(false),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SocketError::Mode {
            field,
            path: path.to_owned(),
            mode,
            source,
        }
    })?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|source| SocketError::Group {
            path: path.to_owned(),
            gid,
            source,
        })?;
    }
    // The path still names our socket, and our socket (not a file swapped in meanwhile) got
    // the mode and group.
    let ours = file.pin.metadata().map_err(listen_err)?;
    let named = std::fs::symlink_metadata(path).map_err(listen_err)?;
    if !file.is(&named) || ours.mode() & 0o7777 != mode || gid.is_some_and(|g| ours.gid() != g) {
        return Err(replaced());
    }
    // SAFETY: listen(2) on a descriptor we own; it touches no memory of ours.
    if unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } != 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    Ok((UnixListener::from(fd), file))
}

/// Checks, changing nothing, that [`listen`] could claim `path` with `perms`: the group exists,
/// and `path` is free or a stale socket. Lets the backend refuse a path before it opens or
/// starts anything; [`listen`] applies the same rules again when it binds.
pub fn check(field: &'static str, path: &Path, perms: &Perms) -> Result<(), SocketError> {
    perms.group.as_ref().map(group_id).transpose()?;
    inspect(field, path, &[Duration::ZERO])?;
    Ok(())
}

/// What is at `path`: nothing (`None`) or a socket that refused a connection after each of
/// `pauses` (its metadata). Anything else is refused.
fn inspect(
    field: &'static str,
    path: &Path,
    pauses: &[Duration],
) -> Result<Option<std::fs::Metadata>, SocketError> {
    let probe_err = |source| SocketError::Probe {
        field,
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SocketError::Listen {
                field,
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            field,
            path: path.to_owned(),
            kind: kind_of(&meta.file_type()),
        });
    }
    for pause in pauses {
        std::thread::sleep(*pause);
        match probe(path) {
            Ok(Probe::Listening) => {
                return Err(SocketError::InUse {
                    field,
                    path: path.to_owned(),
                })
            }
            Ok(Probe::Refused) => {}
            Ok(Probe::Gone) => return Ok(None),
            Err(e) => return Err(probe_err(e)),
        }
    }
    Ok(Some(meta))
}

/// `path` exists (bind said EADDRINUSE): removes it if it is a stale socket, refuses anything
/// else. Returns when the path may be bound again.
fn clear_stale(field: &'static str, path: &Path) -> Result<(), SocketError> {
    // A socket another process has just bound refuses connections until it listens, a moment
    // later: only one that still refuses after a pause is stale.
    let Some(before) = inspect(field, path, &[Duration::ZERO, STALE_PAUSE])? else {
        return Ok(());
    };
    // Nobody listens: remove it, unless it changed since it was inspected.
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.dev() == before.dev() && now.ino() == before.ino() => {
            match std::fs::remove_file(path) {
                Ok(()) => info!("{field}: replacing the stale socket {}", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SocketError::Listen {
                        field,
                        path: path.to_owned(),
                        source: e,
                    })
                }
            }
            Ok(())
        }
        // Changed or gone: look again on the next attempt.
        _ => Ok(()),
    }
}

enum Probe {
    /// A connection was accepted, or queued behind a full backlog.
    Listening,
    Refused,
    Gone,
}

/// Tries to connect to the socket at `path`, without blocking.
fn probe(path: &Path) -> io::Result<Probe> {
    let fd = new_socket(true)?;
    match connect(&fd, path) {
        Ok(()) => Ok(Probe::Listening),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(Probe::Listening),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Probe::Refused),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Probe::Gone),
        Err(e) => Err(e),
    }
}

/// What kind of file `t` is, for messages ("a regular file", "a FIFO", ...).
pub(crate) fn kind_of(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "another kind of file"
    }
}

/// The gid `group` names.
fn group_id(group: &SocketGroup) -> Result<u32, SocketError> {
    let name = match group {
        SocketGroup::Id(gid) => return Ok(*gid),
        SocketGroup::Name(name) => name,
    };
    let lookup_err = |source| SocketError::GroupLookup {
        name: name.clone(),
        source,
    };
    let cname = CString::new(name.as_bytes())
        .map_err(|e| lookup_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `libc::group` is plain data (integers and pointers); all zeros is a valid
        // value, overwritten by getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated, `grp` and `result` are valid for writes, and
        // `buf` is valid for `buf.len()` bytes; getgrnam_r keeps no pointer after returning
        // (the strings it points `grp` at live in `buf`, which we do not read).
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(lookup_err(io::Error::from_raw_os_error(rc)));
        }
        if result.is_null() {
            return Err(SocketError::UnknownGroup { name: name.clone() });
        }
        return Ok(grp.gr_gid);
    }
}

/// A new unix stream socket, close-on-exec.
pub(crate) fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        kind |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket(2) takes integers only.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket(2) just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `path` as a socket address (at most 107 bytes, no NUL).
fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a unix socket path (empty, longer than 107 bytes or holding a NUL byte)",
        ));
    }
    // The path and its terminating NUL.
    Ok(sockaddr(bytes, 0, 1))
}

/// The abstract socket address `name` (at most 107 bytes): a NUL, then the name, counted
/// exactly (abstract names are not NUL-terminated).
fn abstract_address(name: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    if name.len() >= SUN_PATH_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "abstract socket name longer than 107 bytes",
        ));
    }
    Ok(sockaddr(name, 1, 0))
}

/// `sun_path`'s size (108 bytes on Linux).
const SUN_PATH_LEN: usize =
    std::mem::size_of::<libc::sockaddr_un>() - std::mem::offset_of!(libc::sockaddr_un, sun_path);

/// A unix address holding `bytes` from `sun_path[at]`, its length counting `extra` bytes more
/// (callers check that it all fits in `sun_path`).
fn sockaddr(bytes: &[u8], at: usize, extra: usize) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: `sockaddr_un` is plain data (integers and a byte array); all zeros is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path[at..].iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + at + bytes.len() + extra;
    // Bounded by size_of::<sockaddr_un>() (110 bytes), so the cast is exact.
    (addr, len as libc::socklen_t)
}

/// The signature bind(2) and connect(2) share.
type AddressCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

fn bind(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    with_address(fd, address(path)?, libc::bind)
}

fn connect(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    with_address(fd, address(path)?, libc::connect)
}

/// Binds `fd` to the abstract socket address `name`.
pub(crate) fn bind_abstract(fd: &OwnedFd, name: &[u8]) -> io::Result<()> {
    with_address(fd, abstract_address(name)?, libc::bind)
}

/// Connects `fd` to the abstract socket address `name`.
pub(crate) fn connect_abstract(fd: &OwnedFd, name: &[u8]) -> io::Result<()> {
    with_address(fd, abstract_address(name)?, libc::connect)
}

/// `call` (bind or connect) on `fd` with the address `(addr, len)`.
fn with_address(
    fd: &OwnedFd,
    (addr, len): (libc::sockaddr_un, libc::socklen_t),
    call: AddressCall,
) -> io::Result<()> {
    // SAFETY: `call` is bind(2) or connect(2): `fd` is an open socket we own, and `addr` is a
    // valid sockaddr_un of at least `len` bytes, only read during the call.
    let rc = unsafe {
        call(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn ino(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    #[test]
    fn a_fresh_path_gets_a_private_listening_socket_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, file) = listen("socket", &path, &Perms::private()).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(file.path(), path);
        UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn other_kinds_of_file_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        std::fs::write(&file, b"precious").unwrap();
        let e = listen("socket", &file, &Perms::private()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{text}");
        assert!(
            text.starts_with("socket: ") && text.contains("a regular file"),
            "{text}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let sub = dir.path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        let e = listen("control_socket", &sub, &Perms::private()).unwrap_err();
        assert!(e.to_string().starts_with("control_socket: "), "{e}");
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(sub.is_dir());

        // A symbolic link, even to a stale socket, is not replaced (nor is its target).
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let e = listen("socket", &link, &Perms::private()).unwrap_err();
        assert!(e.to_string().contains("a symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata(&stale).is_ok());
    }

    #[test]
    fn a_socket_someone_listens_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, file) = listen("socket", &path, &Perms::private()).unwrap();
        let before = ino(&path);
        let e = listen("socket", &path, &Perms::private()).unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        assert!(e.to_string().starts_with("socket: ") && e.to_string().contains("in use"));
        assert_eq!(ino(&path), before);
        // The first listener still serves (the probe's connection is in its backlog).
        assert!(listener.accept().is_ok());
        UnixStream::connect(&path).unwrap();
        drop(file);
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err());
        // (tmpfs may give the new socket the stale one's inode number: connect instead.)
        let (_listener, file) = listen("socket", &path, &Perms::private()).unwrap();
        UnixStream::connect(&path).unwrap();
        assert!(file.remove());
        assert!(!path.exists());
    }

    #[test]
    fn check_applies_the_same_rules_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = Perms::private();
        let path = dir.path().join("s.sock");
        check("socket", &path, &p).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_err());
        // Stale: accepted, and left for listen() to replace.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let stale = ino(&path);
        check("socket", &path, &p).unwrap();
        assert_eq!(ino(&path), stale);
        std::fs::remove_file(&path).unwrap();
        let (_l, _file) = listen("socket", &path, &p).unwrap();
        let e = check("socket", &path, &p).unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check("socket", &file, &p).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        let group = Perms {
            mode: 0o660,
            group: Some(SocketGroup::Name("no-such-group-ubiblk".into())),
        };
        let e = check("socket", &dir.path().join("t.sock"), &group).unwrap_err();
        assert!(matches!(e, SocketError::UnknownGroup { .. }), "{e}");
    }

    #[test]
    fn only_the_socket_we_made_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (_l, file) = listen("socket", &path, &Perms::private()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        assert!(!file.remove());
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");

        // Another socket put in its place is left alone too, even when it gets the same inode
        // number (tmpfs reuses them at once).
        for _ in 0..20 {
            std::fs::remove_file(&path).unwrap();
            let (_l, file) = listen("socket", &path, &Perms::private()).unwrap();
            std::fs::remove_file(&path).unwrap();
            let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
            assert!(!file.remove());
            assert!(std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket());
        }
    }

    #[test]
    fn mode_and_group_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // SAFETY: getegid(2) takes no arguments and cannot fail.
        let gid = unsafe { libc::getegid() };
        let perms = Perms {
            mode: 0o660,
            group: Some(SocketGroup::Id(gid)),
        };
        let (_l, _file) = listen("socket", &path, &perms).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o660);
        assert_eq!(meta.gid(), gid);
    }

    #[test]
    fn groups_are_looked_up_by_name() {
        assert_eq!(group_id(&SocketGroup::Name("root".into())).unwrap(), 0);
        assert_eq!(group_id(&SocketGroup::Id(1234)).unwrap(), 1234);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let perms = Perms {
            mode: 0o660,
            group: Some(SocketGroup::Name("no-such-group-ubiblk".into())),
        };
        let e = listen("socket", &path, &perms).unwrap_err();
        assert!(matches!(e, SocketError::UnknownGroup { .. }), "{e}");
        assert!(e.to_string().starts_with("socket_group: "), "{e}");
        assert!(std::fs::symlink_metadata(&path).is_err());
    }

    #[test]
    fn paths_that_cannot_be_socket_addresses_are_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = listen("socket", &long, &Perms::private()).unwrap_err();
        assert!(matches!(e, SocketError::Listen { .. }), "{e}");
        let e = listen(
            "socket",
            Path::new("/nonexistent-dir/s.sock"),
            &Perms::private(),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("socket: cannot listen on "),
            "{e}"
        );
    }
}
