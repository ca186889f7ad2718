//! The vhost-user messages vhost-user-backend cannot answer: GET/SET_INFLIGHT_FD.
//!
//! vhost-user-backend 0.24 refuses both in its `VhostUserHandler`, which is private to the
//! crate, so it can be neither wrapped nor replaced without forking it. Instead each
//! connection runs through a relay: the frontend talks to [`Relay`], which answers the
//! inflight messages itself (through [`InflightHandler`]) and forwards every other message,
//! descriptors included, unchanged to the daemon over a private socket, and the daemon's
//! replies back. Only the control channel goes through it: the rings, kicks and calls are
//! shared memory and eventfds between the frontend and the workers, as before.
//!
//! With inflight tracking on (a region was set on this connection), the relay also writes to
//! each kick and call eventfd as it passes: a queue must look at its region at once after a
//! restart (the guest may be waiting on a resubmitted request and not kick), and a used entry
//! published just before a crash may not have been signalled (libvhost-user does the same).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use libc::{c_void, iovec};
use log::warn;
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::Listener;
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::stripe::MoveGate;
use crate::sys::socket;

const HEADER_LEN: usize = 12;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// SET_VRING_KICK/CALL: no descriptor comes with the message.
const VRING_NOFD: u64 = 0x100;

/// What the relay asks of the device about inflight regions.
pub trait InflightHandler: Send + Sync {
    /// GET_INFLIGHT_FD: a fresh region for `num_queues` queues of `queue_size`.
    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)>;
    /// SET_INFLIGHT_FD: track (and recover from) the region in `file`.
    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()>;
}

/// One message: header, body, and the descriptors that came with it (closed on drop).
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn u32_body(&self) -> Option<u32> {
        Some(u32::from_le_bytes(self.body.get(..4)?.try_into().ok()?))
    }

    fn u64_body(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.get(..8)?.try_into().ok()?))
    }

    fn reply(request: u32, body: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut header = [0; HEADER_LEN];
        header[..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        header[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body: body.to_vec(),
            fds,
        }
    }
}

/// Reads one message; `None` at a clean end of stream.
fn recv(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [0 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [iovec {
        iov_base: header.as_mut_ptr().cast::<c_void>(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, borrowed mutably for the call, and any bytes are
    // valid for it.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds)? };
    let fds: Vec<OwnedFd> = fds[..nfds]
        .iter()
        // SAFETY: recv_with_fds handed these descriptors to us and nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    reader.read_exact(&mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {size} bytes"),
        ));
    }
    let mut body = vec![0; size];
    reader.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

fn send(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut bytes = Vec::with_capacity(HEADER_LEN + m.body.len());
    bytes.extend_from_slice(&m.header);
    bytes.extend_from_slice(&m.body);
    let sent = sock.send_with_fds(&[&bytes[..]], &raw)?;
    // The descriptors went with the first byte; the rest, if the socket took only part of it.
    let mut writer = sock;
    writer.write_all(&bytes[sent..])
}

/// A running relay; [`Relay::join`] waits for both directions to end.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and the daemon's end of `daemon`, until either side closes.
    pub fn start(
        frontend: UnixStream,
        daemon: UnixStream,
        inflight: Arc<dyn InflightHandler>,
        config_change: super::ConfigChange,
        gate: Arc<MoveGate>,
    ) -> io::Result<Relay> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let from_daemon = daemon.try_clone()?;
        let replies = {
            let to_frontend = to_frontend.clone();
            let frontend = frontend.try_clone()?;
            let gate = gate.clone();
            std::thread::Builder::new()
                .name("vhost-relay-reply".into())
                .spawn(move || {
                    forward_replies(&from_daemon, &to_frontend, &gate);
                    let _ = frontend.shutdown(std::net::Shutdown::Both);
                    let _ = from_daemon.shutdown(std::net::Shutdown::Both);
                })?
        };
        let requests = std::thread::Builder::new()
            .name("vhost-relay".into())
            .spawn(move || {
                let mut state = RequestState {
                    inflight,
                    inflight_acked: false,
                    tracking: false,
                    warned: false,
                    config_change,
                    gate,
                };
                if let Err(e) = state.forward_requests(&frontend, &daemon, &to_frontend) {
                    log::debug!("relay: frontend connection: {e}");
                }
                let _ = daemon.shutdown(std::net::Shutdown::Both);
                let _ = frontend.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(Relay {
            threads: vec![requests, replies],
        })
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn forward_replies(daemon: &UnixStream, frontend: &Mutex<UnixStream>, gate: &MoveGate) {
    loop {
        match recv(daemon) {
            Ok(Some(m)) => {
                // The daemon answers GET_VRING_BASE once the queue is drained: stopped.
                if m.request() == GET_VRING_BASE {
                    if let Some(queue) = m.u32_body() {
                        gate.ring_stopped(queue);
                    }
                }
                let f = frontend.lock().unwrap_or_else(|p| p.into_inner());
                if send(&f, &m).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                log::debug!("relay: daemon connection: {e}");
                return;
            }
        }
    }
}

struct RequestState {
    inflight: Arc<dyn InflightHandler>,
    /// The frontend acked INFLIGHT_SHMFD.
    inflight_acked: bool,
    /// A region was set on this connection: kicks and calls are nudged as they pass.
    tracking: bool,
    /// A refused inflight message was logged at warn.
    warned: bool,
    /// Gets a duplicate of the backend request channel (SET_BACKEND_REQ_FD), which the
    /// daemon's `vhost::Backend` cannot send a config change on.
    config_change: super::ConfigChange,
    /// Told of each ring start (SET_VRING_KICK), which it may refuse: a move is under way.
    gate: Arc<MoveGate>,
}

impl RequestState {
    fn forward_requests(
        &mut self,
        frontend: &UnixStream,
        daemon: &UnixStream,
        to_frontend: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        while let Some(m) = recv(frontend)? {
            match m.request() {
                GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
                    if let Some(reply) = self.inflight_message(m) {
                        let f = to_frontend.lock().unwrap_or_else(|p| p.into_inner());
                        send(&f, &reply)?;
                    }
                }
                req => {
                    if req == SET_BACKEND_REQ_FD {
                        self.keep_backend_channel(&m);
                    }
                    if req == SET_VRING_KICK {
                        // The queue index is the body's low byte.
                        let queue = m.u64_body().map_or(0, |b| (b & 0xff) as u32);
                        if let Err(why) = self.gate.ring_started(queue) {
                            warn!("frontend refused: it starts queue {queue} but {why}");
                            return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
                        }
                    }
                    if req == SET_PROTOCOL_FEATURES {
                        self.inflight_acked = m.u64_body().is_some_and(|f| {
                            f & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0
                        });
                    }
                    send(daemon, &m)?;
                    if self.tracking && (req == SET_VRING_KICK || req == SET_VRING_CALL) {
                        nudge(&m);
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps a duplicate of SET_BACKEND_REQ_FD's descriptor for config-change messages.
    fn keep_backend_channel(&self, m: &Message) {
        let Some(fd) = m.fds.first() else {
            return;
        };
        match fd.try_clone() {
            Ok(fd) => self.config_change.set(Some(UnixStream::from(fd))),
            Err(e) => log::warn!("cannot keep the backend request channel: {e}"),
        }
    }

    /// Answers GET/SET_INFLIGHT_FD; the reply to send, if any. A refused message is logged
    /// and answered as an error, never fatal: the frontend only loses tracking.
    fn inflight_message(&mut self, mut m: Message) -> Option<Message> {
        let request = m.request();
        let need_reply = m.flags() & FLAG_NEED_REPLY != 0;
        let msg = if !self.inflight_acked {
            Err(invalid("INFLIGHT_SHMFD was not negotiated"))
        } else {
            VhostUserInflight::from_slice(&m.body)
                .copied()
                .ok_or_else(|| invalid("malformed message"))
        };
        if request == GET_INFLIGHT_FD {
            // Always a reply: the frontend waits for one. A zero size means no region.
            let (info, fds) = match msg.and_then(|msg| self.inflight.get_inflight_fd(&msg)) {
                Ok((info, file)) => (info, vec![OwnedFd::from(file)]),
                Err(e) => {
                    self.warn(format_args!("GET_INFLIGHT_FD refused: {e}"));
                    (VhostUserInflight::default(), Vec::new())
                }
            };
            return Some(Message::reply(request, info.as_slice(), fds));
        }
        let result = msg.and_then(|msg| match m.fds.len() {
            1 => {
                let file = File::from(m.fds.remove(0));
                self.inflight.set_inflight_fd(&msg, file).map(|()| msg)
            }
            n => Err(invalid(&format!("{n} descriptors instead of 1"))),
        });
        match &result {
            Ok(msg) => {
                let (queues, size) = (msg.num_queues, msg.queue_size);
                // Once per connection at info: a frontend may send it in a loop.
                if std::mem::replace(&mut self.tracking, true) {
                    log::debug!("inflight region set again: {queues} queues of {size}");
                } else {
                    log::info!("inflight region set: {queues} queues of {size}");
                }
            }
            Err(e) => self.warn(format_args!("SET_INFLIGHT_FD refused: {e}")),
        }
        let nack = u64::from(result.is_err()).to_le_bytes();
        need_reply.then(|| Message::reply(request, &nack, Vec::new()))
    }

    /// A frontend can send bad messages in a loop: warn once per connection, then at debug.
    fn warn(&mut self, what: std::fmt::Arguments) {
        if std::mem::replace(&mut self.warned, true) {
            log::debug!("{what}");
        } else {
            warn!("{what}");
        }
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.to_string())
}

/// Writes 1 to the eventfd a SET_VRING_KICK/CALL carried (see the module comment).
fn nudge(m: &Message) {
    if m.u64_body().is_none_or(|v| v & VRING_NOFD != 0) {
        return;
    }
    if let Some(fd) = m.fds.first() {
        // SAFETY: writing 8 bytes from a local to a descriptor we own; an eventfd takes them
        // as an increment, anything else the frontend sent just gets the bytes or an error.
        let _ = unsafe { libc::write(fd.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
    }
}

/// A listener with a connection from this process already queued, for
/// `VhostUserDaemon::start` (which takes only a listener), whose other end the relay drives.
///
/// No file is involved (an abstract socket with a random name), so it works whatever the
/// file system lets the backend write. Abstract sockets can be connected to by anyone in the
/// network namespace, so the listener is made with a backlog of 0, which queues one
/// connection: if ours is queued, the daemon's accept can only take ours; if someone else's
/// got there first, ours fails at once and a new name is tried.
pub fn private_connection() -> io::Result<(Listener, UnixStream)> {
    for _ in 0..16 {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(io::Error::other)?;
        let name = format!("ubiblk-relay-{}", u128::from_ne_bytes(name));
        let listener = match bind_abstract(name.as_bytes()) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        };
        if let Some(stream) = connect_alone(name.as_bytes())? {
            return Ok((Listener::from(listener), stream));
        }
    }
    Err(io::Error::other(
        "another process keeps connecting to the relay's private sockets",
    ))
}

/// Listens on the abstract address `name` with a backlog of 0 (one queued connection).
fn bind_abstract(name: &[u8]) -> io::Result<UnixListener> {
    let fd = socket::new_socket(false)?;
    socket::bind_abstract(&fd, name)?;
    // SAFETY: plain listen(2) on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

/// Connects to the abstract address `name` without waiting: `None` if the listener's one
/// queued connection is someone else's.
fn connect_alone(name: &[u8]) -> io::Result<Option<UnixStream>> {
    let fd = socket::new_socket(true)?;
    match socket::connect_abstract(&fd, name) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(Some(stream))
}

#[cfg(test)]
mod tests;
