//! The accept loop: one frontend at a time on a listening socket, a fresh [`BlockBackend`] and
//! vhost-user daemon for each connection, the device drained and synced between them.

use log::{error, info, warn};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use super::{relay, BlockBackend, ConfigChange, QueueSettings};
use crate::block::{BlockDevice, Capacity};
use crate::stripe::MoveGate;
use crate::virtio_blk::stats::DeviceStats;
use crate::virtio_blk::{ConfigSpace, DeviceInfo};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A queue's channel to the device could not be opened.
    #[error(transparent)]
    Channel(io::Error),
    /// The daemon's error, formatted: it can hold a thread's panic payload, which is not Sync.
    #[error("cannot create vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch io completions")]
    Watch(#[source] io::Error),
}

/// What [`serve`] shows each frontend: the device stack and the virtio-blk device on top.
pub struct Disk {
    /// The outermost layer: what the queue workers talk to.
    pub device: Arc<dyn BlockDevice>,
    pub info: Arc<DeviceInfo>,
    pub config: ConfigSpace,
    pub settings: QueueSettings,
    /// Every connection's queues record into these.
    pub stats: Arc<DeviceStats>,
    /// The disk's size, which `resize` grows: each connection's requests and config space
    /// follow it (a disk grown between connections is seen by the next).
    pub capacity: Capacity,
    /// The live connection's backend request channel, for `resize` to notify the frontend.
    pub config_change: ConfigChange,
    /// Who may use the disk, when several backends serve it (live migration).
    pub owner: Option<Arc<dyn super::DiskOwner>>,
    /// Told of every ring started and stopped; refuses ring starts while the disk is copied
    /// away (see [`MoveGate`]).
    pub gate: Arc<MoveGate>,
}

/// What [`serve`] shares with the rest of the service while it runs.
#[derive(Clone, Default)]
pub struct Connection {
    /// The backend of the live connection, for shutdown (it drains the queues).
    pub current: Arc<Mutex<Option<Arc<BlockBackend>>>>,
    /// Whether a frontend is connected (the control socket reports it).
    pub connected: Arc<AtomicBool>,
}

impl Connection {
    /// Completes every request of the live connection, if any (see [`BlockBackend::drain_all`]).
    pub fn drain(&self) {
        if let Some(b) = self.backend() {
            b.drain_all();
        }
    }

    /// Whether a frontend is connected whose every queue is tracked in an inflight region (see
    /// [`BlockBackend::tracks_inflight`]).
    pub fn tracks_inflight(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self.backend().is_some_and(|b| b.tracks_inflight())
    }

    fn backend(&self) -> Option<Arc<BlockBackend>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Pause before retrying after setting up or accepting a connection failed (e.g. EMFILE, which
/// persists until a descriptor is freed: retrying at once would spin and flood the log).
const RETRY_DELAY: Duration = Duration::from_millis(100);

type Daemon = VhostUserDaemon<Arc<BlockBackend>>;

/// A fresh backend and daemon for the next connection, the completion notifiers registered.
fn setup(disk: &Disk) -> Result<(Arc<BlockBackend>, Daemon), ServeError> {
    let mut backend = BlockBackend::with_stats(
        disk.device.as_ref(),
        disk.info.clone(),
        disk.config.clone(),
        disk.settings.clone(),
        disk.stats.clone(),
    )
    .map_err(ServeError::Channel)?
    .growing(disk.capacity.clone(), disk.config_change.clone());
    if let Some(owner) = &disk.owner {
        backend = backend.owned_by(owner.clone());
    }
    let backend = Arc::new(backend);
    let daemon = VhostUserDaemon::new(
        "ubiblk".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(super::dirty::LoggedMemory::new()),
    )
    .map_err(|e| ServeError::Daemon(format!("{e:?}")))?;
    for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let fd = backend.worker(q).channel().notifier().as_raw_fd();
        handler
            .register_listener(fd, EventSet::IN, backend.completion_token())
            .map_err(ServeError::Watch)?;
    }
    Ok((backend, daemon))
}

/// Accepts the next frontend on `listener` and connects it to `daemon` through a
/// [`relay::Relay`] that answers the inflight messages with `backend`.
fn accept(
    listener: &mut Listener,
    daemon: &mut Daemon,
    backend: &Arc<BlockBackend>,
    gate: &Arc<MoveGate>,
) -> io::Result<relay::Relay> {
    let frontend = loop {
        if let Some(s) = listener.accept().map_err(io::Error::other)? {
            break s;
        }
    };
    let (mut private, ours) = relay::private_connection()?;
    daemon
        .start(&mut private)
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    relay::Relay::start(
        frontend,
        ours,
        backend.clone(),
        backend.config_change().clone(),
        gate.clone(),
    )
}

/// Serves `disk` on `listener` forever: one frontend at a time, a fresh device state for each.
/// `conn` is kept up to date with the live connection. Only the first set-up's errors are
/// returned (a config the device refuses); later a failure to set up or accept a connection
/// (e.g. out of descriptors) is logged once per run of failures and retried after
/// [`RETRY_DELAY`]: the backend never exits over a connection.
pub fn serve(mut listener: Listener, disk: &Disk, conn: &Connection) -> Result<(), ServeError> {
    let mut next = Some(setup(disk)?);
    // Whether the last attempt failed: its error was logged, repeats are not.
    let mut failing = false;
    loop {
        let (backend, mut daemon) = match next.take() {
            Some(ready) => ready,
            None => match setup(disk) {
                Ok(ready) => ready,
                Err(e) => {
                    if !failing {
                        error!(
                            "setting up the next connection failed (retrying every \
                             {RETRY_DELAY:?}): {e}"
                        );
                        failing = true;
                    }
                    std::thread::sleep(RETRY_DELAY);
                    continue;
                }
            },
        };
        let handlers = daemon.get_epoll_handlers();
        *conn.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(backend.clone());
        let relay = match accept(&mut listener, &mut daemon, &backend, &disk.gate) {
            Ok(relay) => relay,
            Err(e) => {
                if !failing {
                    error!("accepting a frontend failed (retrying every {RETRY_DELAY:?}): {e}");
                    failing = true;
                }
                std::thread::sleep(RETRY_DELAY);
                continue;
            }
        };
        if failing {
            info!("serving connections again");
            failing = false;
        }
        info!("frontend connected");
        conn.connected.store(true, Ordering::Relaxed);
        let ended = daemon.wait();
        conn.connected.store(false, Ordering::Relaxed);
        disk.config_change.set(None);
        relay.join();
        disk.gate.frontend_gone();
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e:?}"),
        }
        for h in &handlers {
            h.send_exit_event();
        }
        drop(handlers);
        // Dropping the daemon joins the worker threads; then nothing races the drain.
        drop(daemon);
        backend.close_leaked_exit_fds();
        backend.drain_all();
        backend.log_poll_stats();
        if let Err(e) = disk.device.sync() {
            error!("sync after disconnect failed: {e}");
        }
    }
}
