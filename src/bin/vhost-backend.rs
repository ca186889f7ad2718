//! vhost-backend: serves a disk to a VMM over vhost-user-blk.

use anyhow::Context;
use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use ubiblk::block::BlockDevice;
use ubiblk::cli::{self, ConfigArgs};
use ubiblk::notify;
use ubiblk::sockpath::SocketFile;
use ubiblk::stack;
use ubiblk::vhost::{self, BlockBackend};

/// Serve a file or block device to a VM as a vhost-user-blk disk.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit(env!("CARGO_BIN_NAME"), run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (opts, keys) = args.config.load_keys(false)?;
    for (field, why) in opts.ignored_fields() {
        warn!("config field `{field}` has no effect: {why}");
    }
    if opts.write_through {
        info!("write-through: every write is durable when it completes");
    }
    // Registered before anything is created, so that a SIGTERM arriving while we start up (even
    // right after the socket appears) waits for the handler instead of killing us mid-way.
    let signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    // A socket path that is not ours to take (another kind of file, another backend's socket)
    // is refused before anything is opened or started.
    vhost::check(&opts)?;
    let mut stack = stack::open_with_kek(&opts, keys.cipher, keys.kek)?;
    // Listening last: once the socket is there, the device (and control socket) are ready, and
    // so is the service for a `Type=notify` unit (READY=1).
    let (listener, socket) = vhost::listen(&opts)?;
    notify::ready(&opts.socket);
    let sockets: Vec<Arc<SocketFile>> = std::iter::once(socket)
        .chain(stack.control_socket.take())
        .map(Arc::new)
        .collect();
    let current: Arc<Mutex<Option<Arc<BlockBackend>>>> = Arc::default();
    spawn_signal_handler(
        signals,
        stack.device.clone(),
        current.clone(),
        sockets.clone(),
    )?;
    let served = vhost::serve(
        listener,
        stack.device,
        stack.info,
        stack.config,
        stack.settings,
        current,
        stack.connected,
        stack.stats,
    );
    // serve returns only on error; the signal thread holds the sockets too, so remove them here.
    for s in &sockets {
        s.remove();
    }
    served?;
    Ok(())
}

/// On SIGTERM/SIGINT: tell the service manager (STOPPING=1), let in-flight I/O finish, sync the
/// disk, remove the sockets (those still ours), exit.
fn spawn_signal_handler(
    mut signals: Signals,
    device: Arc<dyn BlockDevice>,
    current: Arc<Mutex<Option<Arc<BlockBackend>>>>,
    sockets: Vec<Arc<SocketFile>>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: shutting down");
                notify::stopping();
                let backend = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(b) = backend {
                    b.drain_all();
                }
                let code = match device.sync() {
                    Ok(()) => 0,
                    Err(e) => {
                        error!("final sync failed: {e}");
                        1
                    }
                };
                for s in &sockets {
                    s.remove();
                }
                std::process::exit(code);
            }
        })
        .context("cannot start signal thread")?;
    Ok(())
}
