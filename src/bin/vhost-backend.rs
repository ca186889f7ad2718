//! vhost-backend: serves a disk to a VMM over vhost-user-blk.

use anyhow::Context;
use clap::Parser;
use log::{error, info};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ubiblk::block::{BlockDevice, CryptDevice, DebugLogDevice, FileDevice};
use ubiblk::config::Options;
use ubiblk::crypto::keys::KekArgs;
use ubiblk::lazy::{control, LazyDevice, LazyOptions};
use ubiblk::vhost::{self, BlockBackend, QueueSettings};
use ubiblk::virtio_blk::{self, ConfigSpace, DeviceInfo, Limits};

/// Serve a file or block device to a VM as a vhost-user-blk disk.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Path to the backend YAML configuration file.
    #[arg(short = 'f', long = "config", value_name = "CONFIG_YAML")]
    config: PathBuf,
    #[command(flatten)]
    kek: KekArgs,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-backend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let opts = Options::load(&args.config)?;
    let cipher = args
        .kek
        .cipher_for(opts.encryption_key.as_deref())?
        .map(Arc::new);

    let ring_entries = u32::from(opts.queue_size) * 2;
    let mut device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&opts.path, opts.readonly, ring_entries)
            .with_context(|| format!("path: cannot open {}", opts.path.display()))?,
    );
    if let Some(xts) = &cipher {
        device = Arc::new(CryptDevice::new(device, xts.clone()));
        info!("AES-256-XTS encryption on");
    }
    if let Some(lazy) = lazy_options(&opts) {
        ubiblk::lazy::check_distinct(&opts.path, &lazy.image_path, &lazy.metadata_path)?;
        // Above encryption: fetched image data is encrypted on its way to the base disk, and
        // the metadata file is encrypted with the same key.
        let lazy_device = Arc::new(LazyDevice::open(device, cipher, &lazy, ring_entries)?);
        if let Some(path) = &opts.control_socket {
            control::serve(path, lazy_device.clone())?;
            info!("control socket: {}", path.display());
        }
        device = lazy_device;
    }
    if let Some(path) = &opts.io_debug_path {
        // Outermost, so it logs the guest's plaintext.
        device = Arc::new(
            DebugLogDevice::new(device, path)
                .with_context(|| format!("io_debug_path: cannot open {}", path.display()))?,
        );
        info!("I/O debug log: {}", path.display());
    }
    let sectors = device.sectors();
    info!("{}: {} sectors", opts.path.display(), sectors);

    let mut device_id = [0u8; 20];
    device_id[..opts.device_id.len()].copy_from_slice(opts.device_id.as_bytes());
    let info = Arc::new(DeviceInfo {
        limits: Limits {
            sectors,
            max_data_len: opts.seg_size_max * opts.seg_count_max,
            max_descriptors: opts.seg_count_max as usize + 2,
            max_discard_segs: virtio_blk::MAX_DISCARD_SEGS,
            max_discard_sectors: virtio_blk::MAX_DISCARD_SECTORS,
        },
        readonly: opts.readonly,
        skip_sync: opts.skip_sync,
        iovec_align: device.iovec_align(),
        device_id,
    });
    let config = ConfigSpace {
        capacity: sectors,
        size_max: opts.seg_size_max,
        seg_max: opts.seg_count_max,
        num_queues: opts.num_queues,
    };
    let settings = QueueSettings {
        num_queues: opts.num_queues,
        queue_size: opts.queue_size,
        poll_timeout: Duration::from_micros(opts.poll_queue_timeout_us),
    };

    let current: Arc<Mutex<Option<Arc<BlockBackend>>>> = Arc::default();
    spawn_signal_handler(device.clone(), current.clone(), opts.socket.clone())?;
    vhost::serve(&opts.socket, device, info, config, settings, current)
}

fn lazy_options(opts: &Options) -> Option<LazyOptions> {
    Some(LazyOptions {
        image_path: opts.image_path.clone()?,
        // Config validation guarantees metadata_path with image_path.
        metadata_path: opts.metadata_path.clone()?,
        copy_on_read: opts.copy_on_read,
        autofetch: opts.autofetch,
        autofetch_mib_per_sec: opts.autofetch_mib_per_sec,
    })
}

/// On SIGTERM/SIGINT: let in-flight I/O finish, sync the disk, remove the socket, exit.
fn spawn_signal_handler(
    device: Arc<dyn BlockDevice>,
    current: Arc<Mutex<Option<Arc<BlockBackend>>>>,
    socket: PathBuf,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: shutting down");
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
                let _ = std::fs::remove_file(&socket);
                std::process::exit(code);
            }
        })
        .context("cannot start signal thread")?;
    Ok(())
}
