//! The relay against a scripted frontend and daemon: forwarding with descriptors, the inflight
//! messages answered locally, and hostile messages refused without taking the process down.

use super::*;
use std::os::linux::net::SocketAddrExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use vmm_sys_util::eventfd::EventFd;

/// Hands out memfds of a fixed size and counts the regions set.
#[derive(Default)]
struct Mock {
    set: AtomicUsize,
}

impl InflightHandler for Mock {
    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let f = tempfile::tempfile()?;
        f.set_len(4096)?;
        Ok((
            VhostUserInflight::new(4096, 0, msg.num_queues, msg.queue_size),
            f,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, _file: File) -> io::Result<()> {
        if msg.mmap_size == 0 {
            return Err(invalid("empty"));
        }
        self.set.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    frontend: UnixStream,
    daemon: UnixStream,
    mock: Arc<Mock>,
    relay: Relay,
    gate: Arc<MoveGate>,
}

fn rig() -> Rig {
    let (frontend, relay_front) = UnixStream::pair().unwrap();
    let (daemon, relay_daemon) = UnixStream::pair().unwrap();
    let mock = Arc::new(Mock::default());
    let gate = Arc::new(MoveGate::default());
    let relay = Relay::start(
        relay_front,
        relay_daemon,
        mock.clone(),
        Default::default(),
        gate.clone(),
    )
    .unwrap();
    for s in [&frontend, &daemon] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
    }
    Rig {
        frontend,
        daemon,
        mock,
        relay,
        gate,
    }
}

fn owned(e: EventFd) -> OwnedFd {
    // SAFETY: into_raw_fd gives up the EventFd's ownership of the descriptor.
    unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) }
}

fn msg(request: u32, flags: u32, body: &[u8], fds: Vec<OwnedFd>) -> Message {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(&request.to_le_bytes());
    header[4..8].copy_from_slice(&(FLAG_VERSION_1 | flags).to_le_bytes());
    header[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    Message {
        header,
        body: body.to_vec(),
        fds,
    }
}

fn inflight_body(size: u64, nq: u16, qs: u16) -> Vec<u8> {
    VhostUserInflight::new(size, 0, nq, qs).as_slice().to_vec()
}

fn ack_inflight(r: &Rig) {
    let features = VhostUserProtocolFeatures::INFLIGHT_SHMFD
        .bits()
        .to_le_bytes();
    send(
        &r.frontend,
        &msg(SET_PROTOCOL_FEATURES, 0, &features, vec![]),
    )
    .unwrap();
    let fwd = recv(&r.daemon).unwrap().unwrap();
    assert_eq!(fwd.request(), SET_PROTOCOL_FEATURES);
    assert_eq!(fwd.body, features);
}

#[test]
fn other_messages_and_replies_pass_through_with_their_descriptors() {
    let r = rig();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dup = owned(efd.try_clone().unwrap());
    send(
        &r.frontend,
        &msg(SET_VRING_CALL, 0, &0u64.to_le_bytes(), vec![dup]),
    )
    .unwrap();
    let fwd = recv(&r.daemon).unwrap().unwrap();
    assert_eq!((fwd.request(), fwd.fds.len()), (SET_VRING_CALL, 1));
    // Without a region the relay does not touch the eventfd.
    assert!(efd.read().is_err());
    send(&r.daemon, &Message::reply(1, &7u64.to_le_bytes(), vec![])).unwrap();
    let reply = recv(&r.frontend).unwrap().unwrap();
    assert_eq!((reply.request(), reply.u64_body()), (1, Some(7)));
    drop(r.frontend);
    // The frontend leaving ends the daemon's connection and the relay.
    assert!(recv(&r.daemon).unwrap().is_none());
    r.relay.join();
}

#[test]
fn inflight_messages_are_answered_by_the_relay() {
    let r = rig();
    ack_inflight(&r);
    send(
        &r.frontend,
        &msg(GET_INFLIGHT_FD, 0, &inflight_body(0, 2, 128), vec![]),
    )
    .unwrap();
    let reply = recv(&r.frontend).unwrap().unwrap();
    assert_eq!(reply.request(), GET_INFLIGHT_FD);
    assert_eq!(reply.flags(), FLAG_VERSION_1 | FLAG_REPLY);
    let info = *VhostUserInflight::from_slice(&reply.body).unwrap();
    assert_eq!({ info.mmap_size }, 4096);
    assert_eq!(reply.fds.len(), 1);

    let file = File::from(reply.fds.into_iter().next().unwrap());
    send(
        &r.frontend,
        &msg(
            SET_INFLIGHT_FD,
            FLAG_NEED_REPLY,
            &inflight_body(4096, 2, 128),
            vec![OwnedFd::from(file)],
        ),
    )
    .unwrap();
    let ack = recv(&r.frontend).unwrap().unwrap();
    assert_eq!((ack.request(), ack.u64_body()), (SET_INFLIGHT_FD, Some(0)));
    assert_eq!(r.mock.set.load(Ordering::SeqCst), 1);

    // With a region set, kicks are nudged as they pass (and still forwarded).
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dup = owned(kick.try_clone().unwrap());
    send(
        &r.frontend,
        &msg(SET_VRING_KICK, 0, &0u64.to_le_bytes(), vec![dup]),
    )
    .unwrap();
    let fwd = recv(&r.daemon).unwrap().unwrap();
    assert_eq!((fwd.request(), fwd.fds.len()), (SET_VRING_KICK, 1));
    // The nudge follows the forwarding: give it a moment.
    let t0 = std::time::Instant::now();
    let nudged = loop {
        match kick.read() {
            Ok(n) => break n,
            Err(_) if t0.elapsed() < std::time::Duration::from_secs(5) => std::thread::yield_now(),
            Err(e) => panic!("kick not nudged: {e}"),
        }
    };
    assert_eq!(nudged, 1);
    // Nothing of the inflight exchange reached the daemon.
    r.daemon.set_nonblocking(true).unwrap();
    assert!(recv(&r.daemon).is_err());
}

#[test]
fn hostile_inflight_messages_get_errors_not_a_crash() {
    let r = rig();
    // Before INFLIGHT_SHMFD is negotiated: a reply without a region.
    send(
        &r.frontend,
        &msg(GET_INFLIGHT_FD, 0, &inflight_body(0, 1, 8), vec![]),
    )
    .unwrap();
    let reply = recv(&r.frontend).unwrap().unwrap();
    assert!(reply.fds.is_empty());
    ack_inflight(&r);
    // A short body.
    send(&r.frontend, &msg(GET_INFLIGHT_FD, 0, &[1, 2, 3], vec![])).unwrap();
    let reply = recv(&r.frontend).unwrap().unwrap();
    assert!(reply.fds.is_empty());
    assert_eq!(
        {
            VhostUserInflight::from_slice(&reply.body)
                .unwrap()
                .mmap_size
        },
        0
    );
    // SET without a descriptor, with two, and one the device refuses: nacks.
    for fds in [0, 2, 1] {
        let fds: Vec<OwnedFd> = (0..fds)
            .map(|_| OwnedFd::from(tempfile::tempfile().unwrap()))
            .collect();
        let size = if fds.len() == 1 { 0 } else { 4096 };
        send(
            &r.frontend,
            &msg(
                SET_INFLIGHT_FD,
                FLAG_NEED_REPLY,
                &inflight_body(size, 1, 8),
                fds,
            ),
        )
        .unwrap();
        let ack = recv(&r.frontend).unwrap().unwrap();
        assert_eq!(ack.u64_body(), Some(1));
    }
    assert_eq!(r.mock.set.load(Ordering::SeqCst), 0);
    // A message larger than the protocol allows ends the connection, nothing more.
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&5u32.to_le_bytes());
    header[8..].copy_from_slice(&u32::MAX.to_le_bytes());
    (&r.frontend).write_all(&header).unwrap();
    assert!(recv(&r.daemon).unwrap().is_none());
    r.relay.join();
}

#[test]
fn the_private_connection_is_the_one_accepted() {
    let (listener, mut ours) = private_connection().unwrap();
    let mut accepted = listener.accept().unwrap().unwrap();
    accepted.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    ours.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}

#[test]
fn an_intruder_queued_first_is_noticed() {
    let name = b"ubiblk-relay-test-intruder";
    let listener = bind_abstract(name).unwrap();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
    let _intruder = UnixStream::connect_addr(&addr).unwrap();
    // Ours would not be the one accepted: refused at once, not queued behind it.
    assert!(connect_alone(name).unwrap().is_none());
    drop(listener);
}

/// A frontend sending SET_INFLIGHT_FD in a loop: one info line for the connection, the rest
/// at debug (the log must not grow with the loop).
#[test]
fn a_looping_set_inflight_fd_logs_one_info_line_per_connection() {
    use crate::virtio_blk::tests::capture;
    let mock = Arc::new(Mock::default());
    let mut state = RequestState {
        inflight: mock.clone(),
        inflight_acked: true,
        tracking: false,
        warned: false,
        config_change: Default::default(),
        gate: Default::default(),
    };
    capture::start();
    for _ in 0..50 {
        let fd = OwnedFd::from(tempfile::tempfile().unwrap());
        let set = msg(
            SET_INFLIGHT_FD,
            FLAG_NEED_REPLY,
            &inflight_body(4096, 1, 8),
            vec![fd],
        );
        let ack = state.inflight_message(set).unwrap();
        assert_eq!(ack.u64_body(), Some(0));
    }
    assert_eq!(mock.set.load(Ordering::SeqCst), 50);
    let logs = capture::take();
    let info: Vec<_> = logs
        .iter()
        .filter(|(l, _)| *l <= log::Level::Info)
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(
        info[0].1.contains("inflight region set: 1 queues of 8"),
        "{info:?}"
    );
    assert_eq!(logs.len(), 50, "{logs:?}");
}

/// Ring starts and stops reach the move gate; a ring start during a move closes the
/// connection instead of reaching the daemon.
#[test]
fn ring_starts_are_told_to_the_gate_and_refused_during_a_move() {
    let r = rig();
    let kick = |q: u64| {
        let dup = owned(EventFd::new(0).unwrap());
        msg(SET_VRING_KICK, 0, &q.to_le_bytes(), vec![dup])
    };
    send(&r.frontend, &kick(1)).unwrap();
    let fwd = recv(&r.daemon).unwrap().unwrap();
    assert_eq!(fwd.request(), SET_VRING_KICK);
    assert!(r.gate.status().rings_running);
    assert!(r.gate.stripe_read().is_err());
    // The daemon's reply to GET_VRING_BASE (index 1, num 0): drained, stopped.
    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    send(
        &r.daemon,
        &Message::reply(GET_VRING_BASE, &body, Vec::new()),
    )
    .unwrap();
    assert_eq!(
        recv(&r.frontend).unwrap().unwrap().request(),
        GET_VRING_BASE
    );
    assert!(!r.gate.status().rings_running);
    r.gate.stripe_read().unwrap();
    send(&r.frontend, &kick(0)).unwrap();
    // Refused: the relay closes both sides; the daemon never sees the kick.
    assert!(recv(&r.daemon).unwrap().is_none());
    assert!(!r.gate.status().rings_running);
    r.relay.join();
}
