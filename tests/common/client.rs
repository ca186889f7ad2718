//! The test client: a userspace virtio-blk driver (libblkio, `virtio-blk-vhost-user`)
//! connected to a vhost-user-blk socket ([`Client`]); its queues are in [`super::queue`].

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use blkio::{Blkio, MemoryRegion};

use super::QueueIo;

/// I/O result: `Err(errno)` with a positive errno. Device status codes are mapped by libblkio:
/// VIRTIO_BLK_S_IOERR -> EIO, VIRTIO_BLK_S_UNSUPP -> ENOTSUP, anything else -> EPROTO.
/// Client-side rejections: EBADF (write on a client opened read-only), ENOTSUP (discard /
/// write-zeroes without the feature), EINVAL (offset not a multiple of 512).
pub type IoResult<T> = Result<T, i32>;

/// Formats an errno for assertion messages.
pub fn errno_name(e: i32) -> String {
    format!("{} ({})", std::io::Error::from_raw_os_error(e), e)
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: usize,
    /// virtqueue size (power of two); `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
    /// Must be true to connect to a device offering VIRTIO_BLK_F_RO (otherwise start() fails with
    /// EROFS). With it set, libblkio rejects writes *client-side* with EBADF.
    pub read_only: bool,
    /// Size of the shared memory region used for I/O buffers; split evenly between queues.
    pub mem_size: usize,
    /// How long to retry connecting while the socket refuses connections.
    pub connect_timeout: Duration,
    /// Timeout of the synchronous helpers (`Err(ETIME)` when exceeded); `None` = forever.
    pub io_timeout: Option<Duration>,
    /// Make the `num_queues` queues libblkio poll queues: no completion eventfd, `reap` spins
    /// on the used ring (a busy-polling client, like SPDK or ubicloud's blkbench).
    pub poll_queues: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: None,
            read_only: false,
            mem_size: 8 << 20,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(30)),
            poll_queues: false,
        }
    }
}

/// Device properties read after connecting.
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub max_queues: i32,
    pub max_segments: i32,
    pub max_segment_len: i32,
    pub max_transfer: i32,
    pub request_alignment: i32,
    pub optimal_io_alignment: i32,
    pub max_discard_len: u64,
    pub discard_alignment: i32,
    pub max_write_zeroes_len: u64,
    pub flush_needed: bool,
    pub max_mem_regions: u64,
}

/// Error returned by [`Client::connect`]: the failing step plus libblkio's errno/message.
#[derive(Debug)]
pub struct ClientError {
    pub step: &'static str,
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "blkio {} failed: {} ({})",
            self.step,
            self.message,
            errno_name(self.errno)
        )
    }
}

impl std::error::Error for ClientError {}

fn cerr(step: &'static str) -> impl FnOnce(blkio::Error) -> ClientError {
    move |e| ClientError {
        step,
        errno: e.errno().raw_os_error(),
        message: e.message().to_string(),
    }
}

/// A connected libblkio `virtio-blk-vhost-user` instance with `num_queues` started queues and
/// one mapped memory region split evenly between them.
pub struct Client {
    // Field order matters: queues must be dropped before the Blkio instance.
    queues: Vec<QueueIo>,
    region: MemoryRegion,
    blkio: Blkio,
    pub info: DeviceInfo,
}

impl Client {
    /// Connects with default options and `num_queues` queues.
    pub fn connect_queues(socket: &Path, num_queues: usize) -> Result<Client, ClientError> {
        Self::connect(
            socket,
            &ClientOptions {
                num_queues,
                ..Default::default()
            },
        )
    }

    /// Connects to a vhost-user-blk socket. Retries while the socket refuses connections (up to
    /// `opts.connect_timeout`), so it can be called right after the socket file appears.
    pub fn connect(socket: &Path, opts: &ClientOptions) -> Result<Client, ClientError> {
        let deadline = Instant::now() + opts.connect_timeout;
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(cerr("new"))?;
            b.set_str("path", &socket.to_string_lossy())
                .map_err(cerr("set path"))?;
            b.set_bool("read-only", opts.read_only)
                .map_err(cerr("set read-only"))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == blkio::Errno::CONNREFUSED
                        || e.errno() == blkio::Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(cerr("connect")(e)),
            }
        };
        let (irq_queues, poll_queues) = if opts.poll_queues {
            (0, opts.num_queues)
        } else {
            (opts.num_queues, 0)
        };
        blkio
            .set_i32("num-queues", irq_queues as i32)
            .map_err(cerr("set num-queues"))?;
        blkio
            .set_i32("num-poll-queues", poll_queues as i32)
            .map_err(cerr("set num-poll-queues"))?;
        if let Some(qs) = opts.queue_size {
            blkio
                .set_i32("queue-size", qs as i32)
                .map_err(cerr("set queue-size"))?;
        }
        let info = DeviceInfo {
            capacity: blkio.get_u64("capacity").map_err(cerr("get capacity"))?,
            max_queues: blkio
                .get_i32("max-queues")
                .map_err(cerr("get max-queues"))?,
            max_segments: blkio.get_i32("max-segments").unwrap_or(0),
            max_segment_len: blkio.get_i32("max-segment-len").unwrap_or(0),
            max_transfer: blkio.get_i32("max-transfer").unwrap_or(0),
            request_alignment: blkio.get_i32("request-alignment").unwrap_or(0),
            optimal_io_alignment: blkio.get_i32("optimal-io-alignment").unwrap_or(0),
            max_discard_len: blkio.get_u64("max-discard-len").unwrap_or(0),
            discard_alignment: blkio.get_i32("discard-alignment").unwrap_or(0),
            max_write_zeroes_len: blkio.get_u64("max-write-zeroes-len").unwrap_or(0),
            flush_needed: blkio.get_bool("flush-needed").unwrap_or(false),
            max_mem_regions: blkio.get_u64("max-mem-regions").unwrap_or(0),
        };
        let started = blkio.start().map_err(cerr("start"))?;

        let page = 4096usize;
        let per_queue = (opts.mem_size / opts.num_queues.max(1)) / page * page;
        let mem_size = (per_queue * opts.num_queues.max(1)).max(page);
        let region = blkio
            .alloc_mem_region(mem_size)
            .map_err(cerr("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(cerr("map_mem_region"))?;

        let queues = started
            .queues
            .into_iter()
            .chain(started.poll_queues)
            .enumerate()
            .map(|(i, q)| QueueIo {
                q,
                index: i,
                buf_addr: region.addr + i * per_queue,
                buf_len: per_queue,
                completions: Vec::new(),
                in_flight: 0,
                io_timeout: opts.io_timeout,
            })
            .collect();
        Ok(Client {
            queues,
            region,
            blkio,
            info,
        })
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Disk size in bytes (libblkio "capacity" = config.capacity * 512).
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap_or(self.info.capacity)
    }

    /// libblkio's "read-only" property (what the client was opened with, NOT the device's
    /// VIRTIO_BLK_F_RO bit; connecting read-write to an RO device fails in start() with EROFS).
    pub fn read_only(&self) -> bool {
        self.blkio.get_bool("read-only").unwrap_or(false)
    }

    /// Raw libblkio access for other properties.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    pub fn queue(&mut self, q: usize) -> &mut QueueIo {
        &mut self.queues[q]
    }

    /// All queues, e.g. to drive them from scoped threads.
    pub fn queues_mut(&mut self) -> &mut [QueueIo] {
        &mut self.queues
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        self.queues[q].read(offset, len)
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> IoResult<()> {
        self.queues[q].write(offset, data)
    }

    pub fn write_fua(&mut self, q: usize, offset: u64, data: &[u8]) -> IoResult<()> {
        self.queues[q].write_fua(offset, data)
    }

    pub fn writev(&mut self, q: usize, offset: u64, bufs: &[&[u8]]) -> IoResult<()> {
        self.queues[q].writev(offset, bufs)
    }

    pub fn writev_at(&mut self, q: usize, offset: u64, segs: &[(usize, &[u8])]) -> IoResult<()> {
        self.queues[q].writev_at(offset, segs)
    }

    pub fn readv(&mut self, q: usize, offset: u64, lens: &[usize]) -> IoResult<Vec<Vec<u8>>> {
        self.queues[q].readv(offset, lens)
    }

    pub fn readv_at(
        &mut self,
        q: usize,
        offset: u64,
        segs: &[(usize, usize)],
    ) -> IoResult<Vec<Vec<u8>>> {
        self.queues[q].readv_at(offset, segs)
    }

    pub fn flush(&mut self, q: usize) -> IoResult<()> {
        self.queues[q].flush()
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> IoResult<()> {
        self.queues[q].discard(offset, len)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        self.queues[q].write_zeroes(offset, len, unmap)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Queues first (they reference the driver's rings), then the region, then the driver.
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

/// Convenience: error out with context if an I/O result is Err.
pub fn io_ok<T>(r: IoResult<T>, what: &str) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{what}: {}", errno_name(e)))
}
