//! qemu-storage-daemon, the reference vhost-user-blk backend: [`Qsd`], [`start_qsd`].

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ChildGuard, SOCKET_TIMEOUT};

pub const QSD_BIN: &str = "/usr/bin/qemu-storage-daemon";

#[derive(Clone, Debug)]
pub struct QsdOptions {
    pub num_queues: usize,
    /// `cache.direct=on` (O_DIRECT). tmpfs supports O_DIRECT since Linux 6.6.
    pub direct: bool,
    /// `aio=` value ("io_uring", "native", "threads").
    pub aio: String,
    pub writable: bool,
    /// Run the export in an iothread (`--object iothread,id=iot0 ... iothread=iot0`).
    pub iothread: bool,
    pub extra_args: Vec<String>,
}

impl Default for QsdOptions {
    fn default() -> Self {
        QsdOptions {
            num_queues: 1,
            direct: true,
            aio: "io_uring".into(),
            writable: true,
            iothread: false,
            extra_args: Vec::new(),
        }
    }
}

/// A running qemu-storage-daemon exporting a raw file as vhost-user-blk.
pub struct Qsd {
    pub guard: ChildGuard,
    pub socket: PathBuf,
}

impl Qsd {
    pub fn start(file: &Path, socket: &Path, opts: &QsdOptions) -> anyhow::Result<Qsd> {
        let dir = tempfile::Builder::new().prefix("ubiblk-qsd").tempdir()?;
        let _ = fs::remove_file(socket);
        let mut cmd = Command::new(QSD_BIN);
        if opts.iothread {
            cmd.arg("--object").arg("iothread,id=iot0");
        }
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f,filename={},cache.direct={},aio={}",
            qemu_escape(&file.to_string_lossy()),
            on_off(opts.direct),
            opts.aio
        ));
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
            qemu_escape(&socket.to_string_lossy()),
            on_off(opts.writable),
            opts.num_queues
        );
        if opts.iothread {
            export += ",iothread=iot0";
        }
        cmd.arg("--export").arg(export);
        cmd.args(&opts.extra_args);
        let mut guard = ChildGuard::spawn("qemu-storage-daemon", cmd, dir)?;
        guard.wait_for_socket(socket, SOCKET_TIMEOUT)?;
        Ok(Qsd {
            guard,
            socket: socket.to_path_buf(),
        })
    }
}

/// `qemu-storage-daemon` with `cache.direct=on,aio=io_uring`, writable, `num_queues` queues.
pub fn start_qsd(file: &Path, socket: &Path, num_queues: usize) -> anyhow::Result<Qsd> {
    Qsd::start(
        file,
        socket,
        &QsdOptions {
            num_queues,
            ..Default::default()
        },
    )
}

/// Same as [`start_qsd`] but with `cache.direct=off` (for filesystems rejecting O_DIRECT).
pub fn start_qsd_buffered(file: &Path, socket: &Path, num_queues: usize) -> anyhow::Result<Qsd> {
    Qsd::start(
        file,
        socket,
        &QsdOptions {
            num_queues,
            direct: false,
            ..Default::default()
        },
    )
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// QEMU option values escape ',' as ",,".
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Whether `path` can be opened with O_DIRECT (tmpfs: yes since Linux 6.6).
pub fn supports_o_direct(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}
