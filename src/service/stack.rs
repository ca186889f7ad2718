//! The block stack a config describes: which layers wrap the disk, in which order, and the
//! virtio-blk device the VMM is shown on top of them.
//!
//! From the disk up, each layer wrapping the one below (like device-mapper targets):
//! 1. [`FileDevice`]: `path`, through io_uring.
//! 2. [`CryptDevice`], with `encryption_key`: nothing below it sees plaintext.
//! 3. [`LazyDevice`], with `image_path`: above encryption, so stripes fetched from the image
//!    are encrypted on their way to the base disk, and its metadata file uses the same key.
//! 4. [`DebugLogDevice`], with `io_debug_path`: it records what the guest reads and writes
//!    (plaintext, also on encrypted disks), which replays onto a plain copy.
//! 5. [`QosDevice`], with a `qos:` section (its limits; the control socket's `set-qos`
//!    changes them, `qos: {}` starts without any): outermost, so the limits apply
//!    to guest requests as the guest sent them, before lazy fetch splits reads or encryption
//!    splits write-zeroes, and held requests are not yet in the debug log, which records them
//!    when they run.

use log::info;
use std::error::Error;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::block::{
    BlockDevice, Capacity, CryptDevice, DebugLogDevice, FileDevice, Qos, QosDevice,
};
use crate::config::{ConfigError, Options, DEVICE_ID_LEN};
use crate::crypto::keys::Kek;
use crate::crypto::Xts;
use crate::lazy::LazyDevice;
use crate::service::control::{self, Control, DeviceFacts};
use crate::service::handover::{self, DiskLock};
use crate::service::resize::Resizer;
use crate::stripe::server::{ServerError, StripeServer};
use crate::stripe::MoveGate;
use crate::sys::socket::SocketFile;
use crate::vhost::{ConfigChange, QueueSettings};
use crate::virtio_blk::stats::DeviceStats;
use crate::virtio_blk::{self, ConfigSpace, DeviceInfo, Limits};

/// An opened stack and what the VMM is told about it.
pub struct Stack {
    /// The outermost layer: what the queue workers talk to.
    pub device: Arc<dyn BlockDevice>,
    /// The lazy-fetch layer, with `image_path` (for its progress).
    pub lazy: Option<Arc<LazyDevice>>,
    /// The QoS limits (the outermost layer's), shared with the control socket.
    pub qos: Option<Arc<Qos>>,
    /// The control socket's file, with `control_socket`: removed when dropped (if still ours).
    pub control_socket: Option<SocketFile>,
    /// Whether a frontend is connected: the vhost loop sets it, the control socket reports it.
    pub connected: Arc<AtomicBool>,
    /// Per-queue request statistics: the queue workers record, the control socket reports.
    pub stats: Arc<DeviceStats>,
    pub info: Arc<DeviceInfo>,
    pub config: ConfigSpace,
    pub settings: QueueSettings,
    /// The disk's size, which `resize` grows (every layer's `sectors()` reads it).
    pub capacity: Capacity,
    /// The frontend's backend request channel, for `resize` to announce the new size.
    pub config_change: ConfigChange,
    /// The disk's ownership between backends (live migration, see [`handover`]).
    pub owner: Arc<DiskLock>,
    /// What the control socket's `resize` acts on.
    pub resizer: Arc<Resizer>,
    /// Between the VM's rings (the vhost relay reports them) and the stripe server.
    pub gate: Arc<MoveGate>,
    /// With `stripe_server`: the running server (its address).
    pub stripe_server: Option<StripeServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("path: cannot open {}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("path: {} is smaller than one 512-byte sector", path.display())]
    EmptyDisk { path: PathBuf },
    #[error("io_debug_path: cannot open {}", path.display())]
    DebugLog { path: PathBuf, source: io::Error },
    #[error("qos: cannot start the QoS timer thread")]
    QosTimer(#[source] io::Error),
    /// The lazy-fetch layer; the error names the field.
    #[error(transparent)]
    Lazy(Box<dyn Error + Send + Sync>),
    /// The control socket; the error names the field.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// `stripe_server`; the error names the field.
    #[error(transparent)]
    StripeServer(#[from] ServerError),
}

/// Opens the layers `opts` asks for, with `cipher` (from `encryption_key`) for the encryption
/// layer and the lazy-fetch metadata, and starts the control socket if one is configured.
/// `opts` is validated first: the layers rely on it (`image_path` needs `metadata_path`), and
/// no two of its files may be one file.
pub fn open(opts: &Options, cipher: Option<Arc<Xts>>) -> Result<Stack, StackError> {
    open_with_kek(opts, cipher, None)
}

/// [`open`], with the KEK that unwraps an `archive_url` archive's key.
pub fn open_with_kek(
    opts: &Options,
    cipher: Option<Arc<Xts>>,
    kek: Option<Arc<Kek>>,
) -> Result<Stack, StackError> {
    opts.validate()?;
    opts.check_distinct_files()?;
    opts.check_cpus()?;
    let ring_entries = u32::from(opts.queue_size) * 2;
    let file = FileDevice::open(&opts.path, opts.readonly, ring_entries)
        .map_err(|source| StackError::Open {
            path: opts.path.clone(),
            source,
        })?
        .write_through(opts.write_through);
    if file.sectors() == 0 {
        return Err(StackError::EmptyDisk {
            path: opts.path.clone(),
        });
    }
    let capacity = file.capacity();
    let disk_file = file.file();
    // Another backend with this disk is a live migration's source: stand by (see `handover`).
    // With `standby`, a post-copy migration's destination stands by all the same.
    let held = !opts.standby
        && handover::try_lock(&disk_file, opts.readonly).map_err(|source| StackError::Open {
            path: opts.path.clone(),
            source,
        })?;
    if opts.standby {
        info!(
            "{}: standby: serving nothing and fetching nothing until the guest starts its \
             rings (the destination of a live migration)",
            opts.path.display()
        );
    } else if !held {
        info!(
            "{}: another backend holds the disk; standing by until its guest stops and it \
             hands the disk over (live migration)",
            opts.path.display()
        );
    }
    let mut device: Arc<dyn BlockDevice> = Arc::new(file);
    let mut crypt = None;
    if let Some(xts) = &cipher {
        device = Arc::new(CryptDevice::new(device, xts.clone()));
        crypt = Some(device.clone());
        info!("AES-256-XTS encryption on");
    }
    let encrypted = cipher.is_some();
    // The disk's own bytes are the logical disk's: a stripe server may send them as they are.
    let plain_file = (!encrypted).then(|| disk_file.clone());
    let mut lazy_device = None;
    if let Some(mut lazy) = opts.lazy_options() {
        lazy.archive_kek = kek;
        lazy.standby = !held;
        let layer = Arc::new(
            LazyDevice::open(device, cipher, &lazy, ring_entries)
                .map_err(|e| StackError::Lazy(Box::new(e)))?,
        );
        device = layer.clone();
        lazy_device = Some(layer);
    }
    // What a stripe server reads: plaintext, unfetched stripes through the source.
    let logical = device.clone();
    if let Some(path) = &opts.io_debug_path {
        let layer = DebugLogDevice::new(device, path).map_err(|source| StackError::DebugLog {
            path: path.clone(),
            source,
        })?;
        device = Arc::new(layer);
        info!("I/O debug log: {}", path.display());
    }
    // Only with `qos:`: even without limits the layer cost ~6 % of 4 KiB random-read IOPS on
    // tmpfs (one more channel on every request and poll, and a timer thread per disk).
    let mut qos = None;
    if let Some(limits) = opts.qos {
        let q = Qos::new(limits).map_err(StackError::QosTimer)?;
        device = Arc::new(QosDevice::new(device, q.clone()));
        qos = Some(q);
        info!(
            "QoS limits: {}",
            serde_json::to_string(&limits).unwrap_or_default()
        );
    }
    let sectors = device.sectors();
    info!("{}: {} sectors", opts.path.display(), sectors);
    let connected = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DeviceStats::new(opts.num_queues));
    let config_change = ConfigChange::default();
    let owner = Arc::new(DiskLock::new(
        disk_file.clone(),
        opts.readonly,
        held,
        device.clone(),
        lazy_device.clone(),
        Duration::from_secs(opts.handover_wait_secs.unwrap_or(30).into()),
    ));
    let resizer = Arc::new(Resizer {
        file: disk_file,
        capacity: capacity.clone(),
        readonly: opts.readonly,
        lazy: lazy_device.clone(),
        crypt,
        config_change: config_change.clone(),
        owner: Some(owner.clone()),
        busy: Mutex::new(()),
    });
    let gate = Arc::new(MoveGate::default());
    let stripe_server = super::moving::start(
        opts,
        logical,
        lazy_device.clone(),
        plain_file.as_deref(),
        gate.clone(),
    )?;
    let mut control_socket = None;
    if let Some(path) = &opts.control_socket {
        let control = Control {
            facts: DeviceFacts {
                device_id: opts.device_id.clone(),
                num_queues: opts.num_queues,
                readonly: opts.readonly,
                encrypted,
            },
            started: Instant::now(),
            connected: connected.clone(),
            lazy: lazy_device.clone(),
            stats: stats.clone(),
            qos: qos.clone(),
            capacity: capacity.clone(),
            resizer: Some(resizer.clone()),
            owner: Some(owner.clone()),
            gate: stripe_server.as_ref().map(|_| gate.clone()),
        };
        control_socket = Some(control::serve(path, Arc::new(control))?);
        info!("control socket: {}", path.display());
    }
    Ok(Stack {
        info: Arc::new(device_info(opts, sectors, device.iovec_align())),
        config: ConfigSpace {
            capacity: sectors,
            size_max: opts.seg_size_max,
            seg_max: opts.seg_count_max,
            num_queues: opts.num_queues,
            writeback: !opts.write_through,
        },
        settings: QueueSettings {
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            poll_timeout: Duration::from_micros(opts.poll_queue_timeout_us),
            cpus: opts.cpus.clone(),
        },
        device,
        lazy: lazy_device,
        qos,
        control_socket,
        connected,
        stats,
        capacity,
        config_change,
        resizer,
        owner,
        gate,
        stripe_server,
    })
}

/// What the queue workers check requests against. `opts` must be valid (the products and the
/// device id length are bounded by validation).
fn device_info(opts: &Options, sectors: u64, iovec_align: Option<usize>) -> DeviceInfo {
    let mut device_id = [0u8; DEVICE_ID_LEN];
    device_id[..opts.device_id.len()].copy_from_slice(opts.device_id.as_bytes());
    DeviceInfo {
        limits: Limits {
            sectors,
            max_data_len: opts.seg_size_max * opts.seg_count_max,
            max_descriptors: opts.seg_count_max as usize + 2,
            max_discard_segs: virtio_blk::MAX_DISCARD_SEGS,
            max_discard_sectors: virtio_blk::MAX_DISCARD_SECTORS,
        },
        readonly: opts.readonly,
        skip_sync: opts.skip_sync,
        iovec_align,
        device_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{run_sync, IoBuf, IoChannel, IoOp, SECTOR_SIZE};
    use crate::lazy::Metadata;
    use std::path::Path;

    const SHIFT: u8 = 6; // 32 KiB stripes
    const STRIPE: usize = SECTOR_SIZE << SHIFT;
    const DISK: usize = 4 * STRIPE;

    /// A valid config over `dir/disk` (zeros, DISK bytes), plus `extra` YAML lines.
    fn options(dir: &Path, extra: &str) -> Options {
        std::fs::write(dir.join("disk"), vec![0u8; DISK]).unwrap();
        let d = dir.display();
        Options::parse(&format!("path: {d}/disk\nsocket: {d}/sock\n{extra}")).unwrap()
    }

    fn write(ch: &mut dyn IoChannel, sector: u64, data: &[u8]) {
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(data);
        run_sync(ch, IoOp::Write { sector, buf }).0.unwrap();
    }

    fn read(ch: &mut dyn IoChannel, sector: u64, len: usize) -> Vec<u8> {
        let buf = IoBuf::new(len);
        let (r, buf) = run_sync(ch, IoOp::Read { sector, buf });
        r.unwrap();
        buf.unwrap().to_vec()
    }

    fn hex(data: &[u8]) -> String {
        data.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn plain_config_serves_the_file_directly_with_the_configured_limits() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(
            dir.path(),
            "num_queues: 2\nseg_size_max: 4096\nseg_count_max: 8\npoll_queue_timeout_us: 100\n\
             device_id: abc\nskip_sync: true\n",
        );
        let stack = open(&opts, None).unwrap();
        assert!(stack.lazy.is_none());
        let sectors = (DISK / SECTOR_SIZE) as u64;
        assert_eq!(stack.device.sectors(), sectors);
        // Only the (unlimited) QoS layer above the file, which passes guest buffers through:
        // they may go to the kernel as they are.
        assert_eq!(stack.info.iovec_align, Some(4096));
        let limits = &stack.info.limits;
        assert_eq!((limits.sectors, limits.max_data_len), (sectors, 8 * 4096));
        assert_eq!(limits.max_descriptors, 10);
        assert!(stack.info.skip_sync && !stack.info.readonly);
        assert_eq!(&stack.info.device_id[..4], b"abc\0");
        assert_eq!(stack.config.capacity, sectors);
        assert_eq!((stack.config.size_max, stack.config.seg_max), (4096, 8));
        assert_eq!((stack.config.num_queues, stack.settings.num_queues), (2, 2));
        assert_eq!(stack.settings.queue_size, opts.queue_size);
        assert_eq!(stack.settings.poll_timeout, Duration::from_micros(100));

        let mut ch = stack.device.new_channel().unwrap();
        write(&mut *ch, 3, &[0x5a; 1024]);
        let disk = std::fs::read(&opts.path).unwrap();
        assert!(disk[3 * 512..5 * 512].iter().all(|&b| b == 0x5a));
    }

    /// Every layer at once: each one's place shows in what the files below it hold.
    #[test]
    fn layers_stack_file_crypt_lazy_debuglog() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let opts = options(
            dir.path(),
            &format!("image_path: {d}/image\nmetadata_path: {d}/meta\nio_debug_path: {d}/io.log\n"),
        );
        let image: Vec<u8> = (0..DISK).map(|i| (i / 512 + i % 251) as u8).collect();
        std::fs::write(dir.path().join("image"), &image).unwrap();
        let xts = Xts::new(&[1; 32], &[2; 32]);
        let meta = std::fs::File::create(dir.path().join("meta")).unwrap();
        let sectors = (DISK / SECTOR_SIZE) as u64;
        let md = Metadata::new(sectors, SHIFT).unwrap();
        md.write_to(&meta, Some(&xts)).unwrap();

        let stack = open(&opts, Some(Arc::new(Xts::new(&[1; 32], &[2; 32])))).unwrap();
        assert!(stack.lazy.is_some());
        // The debug log needs our own buffers to log them.
        assert_eq!(stack.info.iovec_align, None);
        let mut ch = stack.device.new_channel().unwrap();
        // Into stripe 0, unfetched: fetched first, then written.
        write(&mut *ch, 1, &[0xab; 512]);
        // From stripe 1, unfetched: read from the image.
        assert_eq!(read(&mut *ch, 64, 512), image[64 * 512..65 * 512]);
        stack.device.sync().unwrap();

        // Lazy above encryption: the fetched stripe went down encrypted.
        let mut stripe0 = std::fs::read(&opts.path).unwrap()[..STRIPE].to_vec();
        xts.decrypt(0, &mut stripe0);
        let mut want = image[..STRIPE].to_vec();
        want[512..1024].fill(0xab);
        assert_eq!(stripe0, want);
        // ... and the metadata with the same key.
        let meta = std::fs::File::open(dir.path().join("meta")).unwrap();
        let md = Metadata::read_from(&meta, sectors, Some(&xts)).unwrap();
        assert!(md.is_fetched(0) && !md.is_fetched(1));
        // The debug log outermost: it holds the guest's plaintext.
        let log = std::fs::read_to_string(dir.path().join("io.log")).unwrap();
        let want_log = format!(
            "WRITE\n1\n512\n{}\nREAD\n64\n512\n{}\n",
            hex(&[0xab; 512]),
            hex(&image[64 * 512..65 * 512])
        );
        assert_eq!(log, want_log);
    }

    /// QoS outermost: held writes have not reached the debug log below it; limits from the
    /// config are in force, and guest buffers still go to the file directly.
    #[test]
    fn qos_is_outermost_with_the_configured_limits() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let opts = options(
            dir.path(),
            &format!("io_debug_path: {d}/io.log\nqos: {{iops_write: 1}}\n"),
        );
        let stack = open(&opts, None).unwrap();
        let qos = stack.qos.as_ref().expect("a qos: section makes the layer");
        assert_eq!(qos.limits().iops_write, Some(1));
        assert_eq!(qos.limits().iops_total, None);
        // Without the section there is no layer: unlimited disks pay nothing for it.
        let plain = open(&options(dir.path(), ""), None).unwrap();
        assert!(plain.qos.is_none());
        let mut ch = stack.device.new_channel().unwrap();
        for i in 0..3u64 {
            let mut buf = IoBuf::new(512);
            buf.fill(i as u8 + 1);
            ch.add(i, IoOp::Write { sector: i, buf });
        }
        ch.submit().unwrap();
        // The first write goes (the bucket starts empty), the others wait a second each.
        let mut done = Vec::new();
        let t0 = Instant::now();
        while done.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            ch.notifier().wait(Duration::from_millis(50));
            ch.submit().unwrap();
            ch.poll(&mut done);
        }
        assert_eq!(done.len(), 1);
        let log = std::fs::read_to_string(dir.path().join("io.log")).unwrap();
        assert_eq!(log.matches("WRITE").count(), 1, "{log}");
        // Lifting the limits lets them go at once.
        qos.set(Default::default()).unwrap();
        while done.len() < 3 && t0.elapsed() < Duration::from_secs(5) {
            ch.notifier().wait(Duration::from_millis(50));
            ch.notifier().ack();
            ch.submit().unwrap();
            ch.poll(&mut done);
        }
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(done.len(), 3);
        let log = std::fs::read_to_string(dir.path().join("io.log")).unwrap();
        assert_eq!(log.matches("WRITE").count(), 3, "{log}");
    }

    #[test]
    fn lazy_config_without_metadata_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), "");
        opts.image_path = Some(dir.path().join("image"));
        let e = open(&opts, None).err().unwrap();
        assert!(matches!(e, StackError::Config(_)), "{e}");
        assert!(e.to_string().contains("metadata_path"), "{e}");
    }

    /// The debug log onto the disk or the metadata would append guest plaintext to them.
    #[test]
    fn a_file_named_by_two_fields_is_refused_before_anything_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("meta"), b"m").unwrap();
        for (extra, want) in [
            (
                format!("io_debug_path: {d}/disk\n"),
                format!("io_debug_path: {d}/disk is the same file as path ({d}/disk)"),
            ),
            (
                format!(
                    "image_path: {d}/image\nmetadata_path: {d}/meta\nio_debug_path: {d}/meta\n"
                ),
                format!("io_debug_path: {d}/meta is the same file as metadata_path ({d}/meta)"),
            ),
        ] {
            let opts = options(dir.path(), &extra);
            let e = open(&opts, None).err().unwrap();
            assert!(matches!(e, StackError::Config(_)), "{e}");
            assert_eq!(e.to_string(), want);
        }
        assert_eq!(
            std::fs::read(dir.path().join("disk")).unwrap(),
            vec![0u8; DISK]
        );
        assert_eq!(std::fs::read(dir.path().join("meta")).unwrap(), b"m");
    }

    #[test]
    fn a_disk_without_a_whole_sector_or_not_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let mut opts = options(dir.path(), "");
        std::fs::write(&opts.path, [0u8; 511]).unwrap();
        let e = open(&opts, None).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("path: {d}/disk is smaller than one 512-byte sector")
        );
        opts.path = PathBuf::from("/dev/null");
        let e = open(&opts, None).err().unwrap();
        let text = crate::sys::error_chain(&e);
        assert_eq!(
            text,
            "path: cannot open /dev/null: a character device, not a regular file or block device"
        );
    }

    #[test]
    fn open_errors_name_the_field_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();

        let mut opts = options(dir.path(), "");
        opts.path = dir.path().join("missing");
        let e = open(&opts, None).err().unwrap();
        assert_eq!(e.to_string(), format!("path: cannot open {d}/missing"));
        assert!(e.source().is_some());

        let opts = options(dir.path(), &format!("io_debug_path: {d}/no/dir/io.log\n"));
        let e = open(&opts, None).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("io_debug_path: cannot open {d}/no/dir/io.log")
        );

        // Errors from the lazy layer keep their own wording.
        let md = Metadata::new((DISK / SECTOR_SIZE) as u64, SHIFT).unwrap();
        md.write_to(
            &std::fs::File::create(dir.path().join("meta")).unwrap(),
            None,
        )
        .unwrap();
        let lazy = format!("image_path: {d}/image\nmetadata_path: {d}/meta\n");
        let e = open(&options(dir.path(), &lazy), None).err().unwrap();
        assert!(matches!(e, StackError::Lazy(_)), "{e}");
        assert_eq!(e.to_string(), format!("image_path: cannot open {d}/image"));
    }
}
