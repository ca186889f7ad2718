//! The backend daemon around the data path: what `vhost-backend` runs.
//!
//! - [`stack`]: the layers a config asks for, assembled into the device the VMM is shown.
//! - [`control`]: the control socket (`status`, `stats`, `metrics`, `qos`, `set-qos`, `resize`).
//! - [`resize`]: growing the disk while it is served (the control socket's `resize`).
//! - [`moving`]: the stripe server (`stripe_server:`) that moves the disk to another host.
//! - [`sdnotify`]: service-manager notifications (`READY=1`, `STOPPING=1`).
//! - [`cli`]: start-up shared by the binaries (logging, config and KEK flags, exit status).
//! - [`run`]: the daemon itself: claim the socket, open the stack, serve until a signal.

pub mod cli;
pub mod control;
pub mod handover;
pub mod moving;
pub mod resize;
pub mod sdnotify;
pub mod stack;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::vhost::vhost_user::Listener;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::block::BlockDevice;
use crate::config::{ConfigError, Options};
use crate::lazy::LazyDevice;
use crate::sys::socket::{self, Perms, SocketError, SocketFile};
use crate::vhost::{self, Connection, ServeError};
use cli::Keys;
use stack::StackError;

/// Why the daemon could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `socket` (or `socket_group`) could not be claimed: see [`crate::sys::socket`].
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    #[error("cannot start signal thread")]
    SignalThread(#[source] io::Error),
}

/// How long a stop (SIGTERM, SIGINT) waits for fetches that requests wait for, before those
/// requests fail with EIO (a source may be slow or silent).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What a signal stops once the daemon serves; `None` while it starts up.
type Serving = Arc<Mutex<Option<Stop>>>;

/// What the signal thread needs to stop a serving daemon.
struct Stop {
    device: Arc<dyn BlockDevice>,
    lazy: Option<Arc<LazyDevice>>,
    conn: Connection,
    sockets: Vec<Arc<SocketFile>>,
}

/// Serves the disk `opts` describes (with `keys`, from [`cli::ConfigArgs::load_keys`]) until
/// SIGTERM or SIGINT, which end the process (see [`spawn_signal_handler`]). Returns only on
/// error.
pub fn run(opts: &Options, keys: Keys) -> Result<(), DaemonError> {
    // Registered before anything is created, so that a SIGTERM arriving while we start up (even
    // right after the socket appears) waits for the handler instead of killing us mid-way.
    let signals = Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    // A socket path that is not ours to take (another kind of file, another backend's socket)
    // is refused before anything is opened or started.
    check(opts)?;
    if let Some(cipher) = &keys.cipher {
        info!("encryption: AES-256-XTS, {} kernel", cipher.kernel());
    }
    // Handling signals from now on: opening the stack may wait for a remote source (up to
    // `fetch_retry_secs`), and a stop meanwhile must not wait for it.
    let serving = Serving::default();
    spawn_signal_handler(signals, serving.clone())?;
    let mut stack = stack::open_with_kek(opts, keys.cipher, keys.kek)?;
    let conn = Connection {
        current: Arc::default(),
        connected: stack.connected.clone(),
    };
    // Listening last: once the socket is there, the device (and control socket) are ready, and
    // so is the service for a `Type=notify` unit (READY=1). A signal waits for the lock, so it
    // finds the sockets to remove.
    let mut stop = serving.lock().unwrap_or_else(|p| p.into_inner());
    let (listener, socket) = listen(opts)?;
    let sockets: Vec<Arc<SocketFile>> = std::iter::once(socket)
        .chain(stack.control_socket.take())
        .map(Arc::new)
        .collect();
    *stop = Some(Stop {
        device: stack.device.clone(),
        lazy: stack.lazy.clone(),
        conn: conn.clone(),
        sockets: sockets.clone(),
    });
    drop(stop);
    sdnotify::ready(&opts.socket);
    let disk = vhost::Disk {
        device: stack.device,
        info: stack.info,
        config: stack.config,
        settings: stack.settings,
        stats: stack.stats,
        capacity: stack.capacity,
        config_change: stack.config_change,
        owner: Some(stack.owner),
        gate: stack.gate,
    };
    let served = vhost::serve(listener, &disk, &conn);
    // serve returns only on error; the signal thread holds the sockets too, so remove them here.
    for s in &sockets {
        s.remove();
    }
    served?;
    Ok(())
}

/// Drains `conn` for at most [`SHUTDOWN_GRACE`]; requests still running then (waiting for a
/// slow or unreachable source) stay marked in the inflight region the VMM keeps, and the next
/// process resubmits them: the guest sees a longer pause, not an error.
fn drain_or_leave_in_flight(conn: &Connection) {
    let (done, finished) = std::sync::mpsc::channel();
    let draining = conn.clone();
    let started = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            draining.drain();
            let _ = done.send(());
        });
    if started.is_err() || finished.recv_timeout(SHUTDOWN_GRACE).is_err() {
        info!(
            "requests still waiting after {SHUTDOWN_GRACE:?} are left in flight: the next \
             process resubmits them from the inflight region"
        );
    }
}

/// Checks, changing nothing, that [`listen`] could claim `opts.socket` (see
/// [`crate::sys::socket::check`]): a refused path is reported before anything is opened.
pub fn check(opts: &Options) -> Result<(), DaemonError> {
    socket::check("socket", &opts.socket, &perms(opts)?)?;
    Ok(())
}

fn perms(opts: &Options) -> Result<Perms, ConfigError> {
    Ok(Perms {
        mode: opts.socket_mode()?,
        group: opts.socket_group()?,
    })
}

/// Claims `opts.socket` with `socket_mode` and `socket_group` and listens on it (the rules are
/// in [`crate::sys::socket`]): a path holding another kind of file, or a socket another process
/// listens on, is refused. The [`SocketFile`] removes the socket when dropped, if it is still
/// ours.
pub fn listen(opts: &Options) -> Result<(Listener, SocketFile), DaemonError> {
    let perms = perms(opts)?;
    let (listener, file) = socket::listen("socket", &opts.socket, &perms)?;
    info!(
        "listening on {} (mode {:04o})",
        opts.socket.display(),
        perms.mode
    );
    // From a std listener the vhost crate's Listener records no path, so it never unlinks.
    Ok((Listener::from(listener), file))
}

/// On SIGTERM/SIGINT: tell the service manager (STOPPING=1), let in-flight I/O finish, sync the
/// disk, remove the sockets (those still ours), exit. Requests that wait for lazy fetches get
/// [`SHUTDOWN_GRACE`]: with an inflight region on every queue, whatever is still running then
/// is left marked there for the next process to resubmit (as after a kill); without one, it
/// fails (EIO). During start-up (nothing served, nothing written but crash-safe fetches), exit
/// at once, with the same status 0.
fn spawn_signal_handler(mut signals: Signals, serving: Serving) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                sdnotify::stopping();
                let stop = serving.lock().unwrap_or_else(|p| p.into_inner());
                let Some(stop) = stop.as_ref() else {
                    info!("signal {sig} during start-up: stopping");
                    std::process::exit(0);
                };
                info!("signal {sig}: shutting down");
                if stop.conn.tracks_inflight() {
                    drain_or_leave_in_flight(&stop.conn);
                } else {
                    if let Some(lazy) = &stop.lazy {
                        lazy.shutdown(SHUTDOWN_GRACE);
                    }
                    stop.conn.drain();
                }
                let code = match stop.device.sync() {
                    Ok(()) => 0,
                    Err(e) => {
                        error!("final sync failed: {e}");
                        1
                    }
                };
                for s in &stop.sockets {
                    s.remove();
                }
                std::process::exit(code);
            }
        })
        .map_err(DaemonError::SignalThread)?;
    Ok(())
}
