//! The lazy-fetch layer: a [`BlockDevice`] over the base disk that serves stripes not yet
//! copied from the image.
//!
//! Per request, on the channel's own thread:
//! - every stripe touched is fetched: the request goes straight down (the fast path);
//! - a write (or discard, write-zeroes), or a read with `copy_on_read`, touching an unfetched
//!   stripe is parked: its stripes are queued for the fetcher pool and the request goes down
//!   once they are all fetched (or fails with EIO if a fetch failed). Fetchers wake the channel
//!   through its completion eventfd, so a waiting queue sleeps instead of spinning;
//! - a read without `copy_on_read` is split at stripe boundaries: fetched runs come from the
//!   base disk, the rest from the image (zeros past its end); nothing is fetched.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use log::{info, warn};

use super::fetch::{fetcher, Image, MetaFile, Shared, WaitState, Waker};
use super::metadata::Metadata;
use crate::block::{
    BlockDevice, BufPool, Completion, FileDevice, IoBuf, IoChannel, IoOp, IoVecs, Notifier, Slab,
    SECTOR_SHIFT, SECTOR_SIZE,
};
use crate::crypto::Xts;

/// Fetcher threads: enough to overlap image reads, base writes and syncs of several stripes.
const FETCHERS: usize = 4;

/// What the lazy layer needs from the configuration.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    pub image_path: PathBuf,
    pub metadata_path: PathBuf,
    pub copy_on_read: bool,
    pub autofetch: bool,
    /// Background fetch rate limit in MiB/s; `None`: unlimited.
    pub autofetch_mib_per_sec: Option<u32>,
}

/// Progress, as reported by the control socket's `status` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyStatus {
    pub stripes: usize,
    pub fetched: usize,
    pub written: usize,
    /// Stripes queued for or being fetched.
    pub fetching: usize,
    pub fetch_errors: u64,
    pub stripe_bytes: u64,
    pub copy_on_read: bool,
    pub autofetch: bool,
}

impl LazyStatus {
    pub fn complete(&self) -> bool {
        self.fetched == self.stripes
    }

    /// One line of JSON.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"stripes\":{},\"fetched\":{},\"written\":{},\"fetching\":{},\"fetch_errors\":{},\
             \"complete\":{},\"stripe_bytes\":{},\"copy_on_read\":{},\"autofetch\":{}}}",
            self.stripes,
            self.fetched,
            self.written,
            self.fetching,
            self.fetch_errors,
            self.complete(),
            self.stripe_bytes,
            self.copy_on_read,
            self.autofetch
        )
    }
}

pub struct LazyDevice {
    inner: Arc<dyn BlockDevice>,
    image: FileDevice,
    /// The image's last partial sector, zero-padded, when its size is not a multiple of 512.
    image_tail: Option<(u64, Box<[u8; SECTOR_SIZE]>)>,
    /// Whole image sectors that lie inside the disk.
    image_sectors: u64,
    shared: Arc<Shared>,
    fetchers: Vec<JoinHandle<()>>,
}

impl LazyDevice {
    /// Opens the image and the metadata (decrypted with `xts` when given) and starts the
    /// fetcher pool. `inner` is the base disk, encryption included. Errors name the field.
    pub fn open(
        inner: Arc<dyn BlockDevice>,
        xts: Option<Arc<Xts>>,
        opts: &LazyOptions,
        ring_entries: u32,
    ) -> anyhow::Result<Self> {
        let disk_sectors = inner.sectors();
        let (meta, md) = open_metadata(&opts.metadata_path, disk_sectors, xts)?;
        let image_err = || format!("image_path: cannot open {}", opts.image_path.display());
        let image =
            FileDevice::open(&opts.image_path, true, ring_entries).with_context(image_err)?;
        let file = std::fs::File::open(&opts.image_path).with_context(image_err)?;
        let bytes = crate::block::device_size(&file).with_context(image_err)?;
        let disk_bytes = disk_sectors << SECTOR_SHIFT;
        if bytes > disk_bytes {
            warn!(
                "image_path {} is {bytes} bytes, larger than the {disk_bytes}-byte disk: \
                 the rest is ignored",
                opts.image_path.display()
            );
        }
        let image_sectors = (bytes >> SECTOR_SHIFT).min(disk_sectors);
        let image_tail = read_tail(&file, bytes, disk_sectors).with_context(image_err)?;

        let shared = Arc::new(Shared::new(
            &md,
            disk_sectors,
            meta,
            opts.copy_on_read,
            opts.autofetch,
            opts.autofetch_mib_per_sec.map(|m| u64::from(m) << 20),
        ));
        info!(
            "lazy fetch from {}: {} of {} stripes of {} KiB fetched, copy_on_read {}, autofetch {}",
            opts.image_path.display(),
            shared.fetched_count(),
            shared.stripe_count(),
            shared.stripe_bytes() >> 10,
            opts.copy_on_read,
            opts.autofetch
        );
        let image_file = Arc::new(Image { file, bytes });
        let channels = (0..FETCHERS)
            .map(|_| inner.new_channel())
            .collect::<io::Result<Vec<_>>>()
            .context("cannot open the fetchers' channels to the base disk")?;
        let mut fetchers = Vec::new();
        for (i, channel) in channels.into_iter().enumerate() {
            let (shared, base, image_file) = (shared.clone(), inner.clone(), image_file.clone());
            let handle = std::thread::Builder::new()
                .name(format!("fetch-{i}"))
                .spawn(move || fetcher(shared, base, channel, image_file))
                .context("cannot start a fetcher thread")?;
            fetchers.push(handle);
        }
        Ok(LazyDevice {
            inner,
            image,
            image_tail,
            image_sectors,
            shared,
            fetchers,
        })
    }

    pub fn status(&self) -> LazyStatus {
        let s = &self.shared;
        LazyStatus {
            stripes: s.stripe_count(),
            fetched: s.fetched_count(),
            written: s.count_with(super::metadata::WRITTEN),
            fetching: s.pending(),
            fetch_errors: s.errors.load(SeqCst),
            stripe_bytes: s.stripe_bytes(),
            copy_on_read: s.copy_on_read,
            autofetch: s.autofetch,
        }
    }
}

fn open_metadata(
    path: &Path,
    disk_sectors: u64,
    xts: Option<Arc<Xts>>,
) -> anyhow::Result<(MetaFile, Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("metadata_path: cannot open {}", path.display()))?;
    let md = Metadata::read_from(&file, disk_sectors, xts.as_deref()).with_context(|| {
        format!(
            "metadata_path: {} is not usable (run init-metadata to create it)",
            path.display()
        )
    })?;
    Ok((MetaFile { file, xts }, md))
}

/// The image's trailing partial sector (zero-padded) and its sector number, if it has one
/// inside the disk.
fn read_tail(
    file: &std::fs::File,
    bytes: u64,
    disk_sectors: u64,
) -> io::Result<Option<(u64, Box<[u8; SECTOR_SIZE]>)>> {
    use std::os::unix::fs::FileExt;
    let sector = bytes >> SECTOR_SHIFT;
    let partial = (bytes % SECTOR_SIZE as u64) as usize;
    if partial == 0 || sector >= disk_sectors {
        return Ok(None);
    }
    let mut tail = Box::new([0u8; SECTOR_SIZE]);
    file.read_exact_at(&mut tail[..partial], sector << SECTOR_SHIFT)?;
    Ok(Some((sector, tail)))
}

impl Drop for LazyDevice {
    fn drop(&mut self) {
        self.shared.stop();
        for h in self.fetchers.drain(..) {
            let _ = h.join();
        }
    }
}

impl BlockDevice for LazyDevice {
    fn sectors(&self) -> u64 {
        self.inner.sectors()
    }

    fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
        // Image reads and fetcher wake-ups signal the base channel's notifier too, so the
        // worker watches a single descriptor.
        let inner = self.inner.new_channel_with(notifier.clone())?;
        let image = self.image.new_channel_with(notifier.clone())?;
        let waker = Arc::new(Waker {
            fd: notifier.try_clone_eventfd()?,
            parked: AtomicUsize::new(0),
        });
        self.shared.register(&waker);
        Ok(Box::new(LazyChannel {
            shared: self.shared.clone(),
            image_sectors: self.image_sectors,
            image_tail: self.image_tail.clone(),
            inner,
            image,
            waker,
            seen_generation: 0,
            ops: Slab::default(),
            parked: Vec::new(),
            ready: Vec::new(),
            below: Vec::new(),
            pool: BufPool::default(),
        }))
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()?;
        self.shared.persist_written()
    }

    fn iovec_align(&self) -> Option<usize> {
        // Vectors only ever go to the base disk's channel (image reads use our buffers).
        self.inner.iovec_align()
    }
}

/// A request waiting for its stripes, or a FLUSH waiting for WRITTEN bits to be durable.
struct Parked {
    id: u64,
    op: IoOp,
    wait: Wait,
}

enum Wait {
    Stripes {
        first: usize,
        last: usize,
        write: bool,
    },
    Persist(u64),
}

/// Where a split read's pieces land.
enum Dest {
    Buf(IoBuf),
    Vecs(IoVecs),
}

impl Dest {
    fn len(&self) -> usize {
        match self {
            Dest::Buf(b) => b.len(),
            Dest::Vecs(iov) => iov.len(),
        }
    }

    /// Copies `data` (or zeros, if `None`) to byte `offset` of the destination.
    fn put(&mut self, offset: usize, len: usize, data: Option<&[u8]>) {
        match self {
            Dest::Buf(b) => match data {
                Some(d) => b[offset..offset + len].copy_from_slice(&d[..len]),
                None => b[offset..offset + len].fill(0),
            },
            Dest::Vecs(iov) => {
                let mut skip = offset;
                let mut done = 0;
                for v in iov.as_slice() {
                    if done == len {
                        break;
                    }
                    if skip >= v.iov_len {
                        skip -= v.iov_len;
                        continue;
                    }
                    let n = (v.iov_len - skip).min(len - done);
                    // SAFETY: IoVecs guarantees each vector is valid for writes of `iov_len`
                    // bytes while it lives; `skip + n <= iov_len`. Our data never overlaps it.
                    unsafe {
                        let dst = v.iov_base.cast::<u8>().add(skip);
                        match data {
                            Some(d) => std::ptr::copy_nonoverlapping(d[done..].as_ptr(), dst, n),
                            None => std::ptr::write_bytes(dst, 0, n),
                        }
                    }
                    done += n;
                    skip = 0;
                }
            }
        }
    }
}

enum Kind {
    /// Went down whole: hand the completion up as is.
    Pass,
    /// A read assembled from `parts` pieces.
    Split(Dest),
}

struct Op {
    id: u64,
    kind: Kind,
    parts: u32,
    result: Result<(), i32>,
}

/// Pieces of split reads carry their byte offset (in sectors) in the id's high half.
const OFFSET_SHIFT: u32 = 32;

struct LazyChannel {
    shared: Arc<Shared>,
    image_sectors: u64,
    image_tail: Option<(u64, Box<[u8; SECTOR_SIZE]>)>,
    inner: Box<dyn IoChannel>,
    image: Box<dyn IoChannel>,
    waker: Arc<Waker>,
    seen_generation: u64,
    ops: Slab<Op>,
    parked: Vec<Parked>,
    /// Finished without going down (failed fetches, reads served from zeros).
    ready: Vec<Completion>,
    below: Vec<Completion>,
    pool: BufPool,
}

/// The stripes `op` touches and whether it modifies them; `None` for operations the layer
/// passes down untouched (flush, empty, or out of range, which the layer below rejects).
fn span(op: &IoOp, shared: &Shared) -> Option<(usize, usize, bool)> {
    let (sector, sectors, write) = match op {
        IoOp::Read { sector, buf } => (*sector, (buf.len() >> SECTOR_SHIFT) as u64, false),
        IoOp::ReadVec { sector, iov } => (*sector, (iov.len() >> SECTOR_SHIFT) as u64, false),
        IoOp::Write { sector, buf } => (*sector, (buf.len() >> SECTOR_SHIFT) as u64, true),
        IoOp::WriteVec { sector, iov } => (*sector, (iov.len() >> SECTOR_SHIFT) as u64, true),
        IoOp::Discard { sector, sectors } | IoOp::WriteZeroes { sector, sectors } => {
            (*sector, *sectors, true)
        }
        IoOp::Flush => return None,
    };
    let end = sector.checked_add(sectors)?;
    if sectors == 0 || end > shared.disk_sectors {
        return None;
    }
    Some((shared.stripe_of(sector), shared.stripe_of(end - 1), write))
}

impl LazyChannel {
    fn pass(&mut self, id: u64, op: IoOp) {
        let key = self.ops.insert(Op {
            id,
            kind: Kind::Pass,
            parts: 1,
            result: Ok(()),
        });
        self.inner.add(key as u64, op);
    }

    fn park(&mut self, id: u64, op: IoOp, wait: Wait) {
        // Announce the wait before queuing: a fetcher finishing now must see it and wake us.
        self.waker.parked.store(self.parked.len() + 1, SeqCst);
        if let Wait::Stripes { first, last, .. } = wait {
            for s in first..=last {
                self.shared.request(s);
            }
        }
        self.parked.push(Parked { id, op, wait });
    }

    /// Sends down the parked requests that can go; fails those whose fetch (or WRITTEN
    /// persistence) failed.
    fn retry_parked(&mut self) {
        let mut sent = false;
        for p in std::mem::take(&mut self.parked) {
            let state = match p.wait {
                Wait::Stripes { first, last, write } => {
                    if self.shared.all_fetched(first, last) {
                        if write {
                            self.shared.mark_written(first, last);
                        }
                        WaitState::Ready
                    } else if self.shared.any_abandoned(first, last) {
                        WaitState::Failed
                    } else {
                        WaitState::Pending
                    }
                }
                Wait::Persist(ticket) => self.shared.persisted(ticket),
            };
            match state {
                WaitState::Ready => {
                    self.pass(p.id, p.op);
                    sent = true;
                }
                WaitState::Failed => {
                    let buf = match p.op {
                        IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                        _ => None,
                    };
                    self.ready.push(Completion {
                        id: p.id,
                        result: Err(libc::EIO),
                        buf,
                    });
                }
                WaitState::Pending => self.parked.push(p),
            }
        }
        self.waker.parked.store(self.parked.len(), SeqCst);
        if sent {
            let _ = self.inner.submit();
        }
    }

    /// Serves a read without fetching: fetched runs from the base disk, the rest from the
    /// image, past the image's end zeros.
    fn read_split(&mut self, id: u64, sector: u64, dest: Dest) {
        let end = sector + (dest.len() >> SECTOR_SHIFT) as u64;
        let key = self.ops.insert(Op {
            id,
            kind: Kind::Split(dest),
            parts: 0,
            result: Ok(()),
        });
        let mut at = sector;
        let mut parts = 0;
        while at < end {
            let fetched = self.shared.is_fetched(self.shared.stripe_of(at));
            // Extend over following stripes in the same state.
            let mut run_end = at;
            while run_end < end && self.shared.is_fetched(self.shared.stripe_of(run_end)) == fetched
            {
                run_end =
                    ((self.shared.stripe_of(run_end) as u64 + 1) << self.shared.shift).min(end);
            }
            if fetched {
                self.read_piece(key, sector, at, run_end, true);
                parts += 1;
            } else {
                let image_end = run_end.min(self.image_sectors).max(at);
                if image_end > at {
                    self.read_piece(key, sector, at, image_end, false);
                    parts += 1;
                }
                // Past the image: zeros, except its partial last sector.
                if let Some(Op {
                    kind: Kind::Split(dest),
                    ..
                }) = self.ops.get_mut(key)
                {
                    let offset = |s: u64| ((s - sector) << SECTOR_SHIFT) as usize;
                    let zeros = ((run_end - image_end) << SECTOR_SHIFT) as usize;
                    dest.put(offset(image_end), zeros, None);
                    if let Some((t, data)) = &self.image_tail {
                        if (image_end..run_end).contains(t) {
                            dest.put(offset(*t), SECTOR_SIZE, Some(&data[..]));
                        }
                    }
                }
            }
            at = run_end;
        }
        if let Some(op) = self.ops.get_mut(key) {
            op.parts = parts;
        }
        if parts == 0 {
            self.complete(key);
        }
    }

    /// Queues one piece `[from, to)` of split read `key` (which starts at `start`).
    fn read_piece(&mut self, key: usize, start: u64, from: u64, to: u64, base: bool) {
        let buf = self.pool.get(((to - from) << SECTOR_SHIFT) as usize);
        let id = key as u64 | ((from - start) << OFFSET_SHIFT);
        let op = IoOp::Read { sector: from, buf };
        if base {
            self.inner.add(id, op);
        } else {
            self.image.add(id, op);
        }
    }

    /// Hands finished op `key` up.
    fn complete(&mut self, key: usize) {
        if let Some(op) = self.ops.remove(key) {
            let buf = match op.kind {
                Kind::Split(Dest::Buf(b)) => Some(b),
                _ => None,
            };
            self.ready.push(Completion {
                id: op.id,
                result: op.result,
                buf,
            });
        }
    }

    /// Accounts one completion from below.
    fn reap_one(&mut self, c: Completion) {
        let key = (c.id & ((1 << OFFSET_SHIFT) - 1)) as usize;
        let offset = ((c.id >> OFFSET_SHIFT) << SECTOR_SHIFT) as usize;
        let Some(op) = self.ops.get_mut(key) else {
            return;
        };
        match &mut op.kind {
            Kind::Pass => {
                let id = op.id;
                self.ops.remove(key);
                self.ready.push(Completion {
                    id,
                    result: c.result,
                    buf: c.buf,
                });
            }
            Kind::Split(dest) => {
                if let Some(piece) = c.buf {
                    if c.result.is_ok() {
                        dest.put(offset, piece.len(), Some(&piece));
                    }
                    self.pool.put(piece);
                }
                if c.result.is_err() {
                    op.result = c.result;
                }
                op.parts -= 1;
                if op.parts == 0 {
                    self.complete(key);
                }
            }
        }
    }
}

impl IoChannel for LazyChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        if let IoOp::Flush = op {
            // WRITTEN bits set before this FLUSH become durable before it completes.
            if let Some(ticket) = self.shared.request_persist() {
                return self.park(id, op, Wait::Persist(ticket));
            }
        }
        let Some((first, last, write)) = span(&op, &self.shared) else {
            return self.pass(id, op);
        };
        if self.shared.all_fetched(first, last) {
            if write {
                self.shared.mark_written(first, last);
            }
            return self.pass(id, op);
        }
        if write || self.shared.copy_on_read {
            return self.park(id, op, Wait::Stripes { first, last, write });
        }
        match op {
            IoOp::Read { sector, buf } => self.read_split(id, sector, Dest::Buf(buf)),
            IoOp::ReadVec { sector, iov } => self.read_split(id, sector, Dest::Vecs(iov)),
            other => self.pass(id, other),
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.image.submit()?;
        self.inner.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        if !self.parked.is_empty() {
            let generation = self.shared.generation.load(SeqCst);
            if generation != self.seen_generation {
                self.seen_generation = generation;
                self.retry_parked();
            }
        }
        let mut below = std::mem::take(&mut self.below);
        self.inner.poll(&mut below);
        self.image.poll(&mut below);
        for c in below.drain(..) {
            self.reap_one(c);
        }
        self.below = below;
        out.append(&mut self.ready);
    }

    fn wait(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() {
            return Ok(());
        }
        if self.inner.in_flight() > 0 {
            return self.inner.wait();
        }
        if self.image.in_flight() > 0 {
            return self.image.wait();
        }
        if !self.parked.is_empty() {
            // Only fetches are outstanding: sleep until a fetcher signals (bounded, to
            // re-check even if a wake-up raced with the generation check).
            let mut pfd = libc::pollfd {
                fd: self.waker.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.waker.fd.read();
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.ops.len() + self.parked.len() + self.ready.len()
    }

    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::run_sync;
    use crate::lazy::metadata::{FETCHED, WRITTEN};

    const SHIFT: u8 = 6; // 32 KiB stripes
    const STRIPE: usize = 512 << SHIFT;
    const STRIPES: usize = 8;

    struct Fixture {
        _dir: tempfile::TempDir,
        meta: PathBuf,
        image_path: PathBuf,
        image: Vec<u8>,
        device: LazyDevice,
    }

    fn fixture(image_len: usize, copy_on_read: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (base, image_path, meta) = (
            dir.path().join("base"),
            dir.path().join("image"),
            dir.path().join("meta"),
        );
        std::fs::write(&base, vec![0xee; STRIPE * STRIPES]).unwrap();
        let image: Vec<u8> = (0..image_len).map(|i| (i / 512 + i % 251) as u8).collect();
        std::fs::write(&image_path, &image).unwrap();
        let md = Metadata::new((STRIPE * STRIPES / 512) as u64, SHIFT).unwrap();
        md.write_to(&std::fs::File::create(&meta).unwrap(), None)
            .unwrap();
        let inner: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&base, false, 64).unwrap());
        let opts = LazyOptions {
            image_path: image_path.clone(),
            metadata_path: meta.clone(),
            copy_on_read,
            autofetch: false,
            autofetch_mib_per_sec: None,
        };
        let device = LazyDevice::open(inner, None, &opts, 64).unwrap();
        Fixture {
            _dir: dir,
            meta,
            image_path,
            image,
            device,
        }
    }

    fn buf_of(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    fn read(ch: &mut dyn IoChannel, sector: u64, len: usize) -> Vec<u8> {
        let (r, buf) = run_sync(
            ch,
            IoOp::Read {
                sector,
                buf: IoBuf::new(len),
            },
        );
        r.unwrap();
        buf.unwrap().to_vec()
    }

    fn on_disk(f: &Fixture) -> Metadata {
        let file = std::fs::File::open(&f.meta).unwrap();
        Metadata::read_from(&file, (STRIPE * STRIPES / 512) as u64, None).unwrap()
    }

    #[test]
    fn write_to_unfetched_stripe_parks_until_the_fetch_is_durable() {
        let f = fixture(STRIPE * STRIPES, false);
        let mut ch = f.device.new_channel().unwrap();
        let sector = (STRIPE / 512 + 3) as u64;
        let (r, _) = run_sync(
            &mut *ch,
            IoOp::Write {
                sector,
                buf: buf_of(&[7; 1024]),
            },
        );
        r.unwrap();
        // Completed only after the metadata said "fetched" on disk.
        assert_eq!(on_disk(&f).stripes[1], FETCHED);
        assert_eq!(f.device.shared.count_with(WRITTEN), 1);
        let got = read(&mut *ch, (STRIPE / 512) as u64, STRIPE);
        let mut want = f.image[STRIPE..2 * STRIPE].to_vec();
        want[3 * 512..4 * 512 + 512].fill(7);
        assert_eq!(got, want);
        // WRITTEN is durable once a FLUSH completes.
        let (r, _) = run_sync(&mut *ch, IoOp::Flush);
        r.unwrap();
        assert_eq!(on_disk(&f).stripes[1], FETCHED | WRITTEN);
        // A FLUSH with nothing new to persist goes straight down.
        assert!(!f.device.shared.written_dirty());
        let (r, _) = run_sync(&mut *ch, IoOp::Flush);
        r.unwrap();
    }

    #[test]
    fn concurrent_writers_on_one_stripe_fetch_it_once() {
        let f = fixture(STRIPE * STRIPES, false);
        let mut channels: Vec<_> = (0..3).map(|_| f.device.new_channel().unwrap()).collect();
        for (i, ch) in channels.iter_mut().enumerate() {
            ch.add(
                i as u64,
                IoOp::Write {
                    sector: (2 * STRIPE / 512 + i) as u64,
                    buf: buf_of(&[i as u8 + 1; 512]),
                },
            );
            ch.submit().unwrap();
        }
        for ch in &mut channels {
            let mut done = Vec::new();
            while done.is_empty() {
                ch.submit().unwrap();
                ch.poll(&mut done);
                if done.is_empty() {
                    ch.wait().unwrap();
                }
            }
            assert!(done[0].result.is_ok());
        }
        assert_eq!(f.device.status().fetched, 1);
        let got = read(&mut *channels[0], (2 * STRIPE / 512) as u64, 2048);
        assert_eq!(&got[..512], &[1; 512]);
        assert_eq!(&got[512..1024], &[2; 512]);
        assert_eq!(&got[1024..1536], &[3; 512]);
        assert_eq!(&got[1536..], &f.image[2 * STRIPE + 1536..2 * STRIPE + 2048]);
    }

    #[test]
    fn split_read_into_caller_vectors() {
        // Image ends mid-sector inside stripe 2; stripe 1 fetched by a write.
        let f = fixture(2 * STRIPE + 700, false);
        let mut ch = f.device.new_channel().unwrap();
        let (r, _) = run_sync(
            &mut *ch,
            IoOp::Write {
                sector: (STRIPE / 512) as u64,
                buf: buf_of(&[9; 512]),
            },
        );
        r.unwrap();
        let mut want = f.image.clone();
        want.resize(4 * STRIPE, 0);
        want[STRIPE..STRIPE + 512].fill(9);
        // Three odd-sized vectors over stripes 0..=3.
        let mut mem = vec![0xffu8; 4 * STRIPE];
        let lens = [STRIPE - 1000, 2 * STRIPE + 1512, STRIPE - 512];
        let mut iov = Vec::new();
        let mut at = 0;
        for len in lens {
            iov.push(libc::iovec {
                iov_base: mem[at..].as_mut_ptr().cast(),
                iov_len: len,
            });
            at += len;
        }
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(());
        // SAFETY: `mem` outlives the synchronous operation.
        let iov = unsafe { IoVecs::new(iov, owner) };
        let (r, _) = run_sync(&mut *ch, IoOp::ReadVec { sector: 0, iov });
        r.unwrap();
        assert_eq!(&mem[..4 * STRIPE - 512], &want[..4 * STRIPE - 512]);
        assert_eq!(f.device.status().fetched, 1);
    }

    #[test]
    fn copy_on_read_fetches_and_a_failed_fetch_is_an_error_not_a_hang() {
        let f = fixture(STRIPE * STRIPES, true);
        let mut ch = f.device.new_channel().unwrap();
        assert_eq!(read(&mut *ch, 0, 1024), f.image[..1024]);
        assert!(on_disk(&f).is_fetched(0));
        // The image shrinks: stripe 5 cannot be fetched.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.image_path)
            .unwrap()
            .set_len(STRIPE as u64)
            .unwrap();
        let (r, _) = run_sync(
            &mut *ch,
            IoOp::Read {
                sector: (5 * STRIPE / 512) as u64,
                buf: IoBuf::new(512),
            },
        );
        assert_eq!(r, Err(libc::EIO));
        let s = f.device.status();
        assert_eq!((s.fetched, s.fetch_errors, s.fetching), (1, 1, 0));
        assert!(!on_disk(&f).is_fetched(5));
    }

    #[test]
    fn status_json_is_one_line() {
        let f = fixture(STRIPE, false);
        let json = f.device.status().to_json();
        assert_eq!(
            json,
            "{\"stripes\":8,\"fetched\":0,\"written\":0,\"fetching\":0,\"fetch_errors\":0,\
             \"complete\":false,\"stripe_bytes\":32768,\"copy_on_read\":false,\"autofetch\":false}"
        );
        assert!(crate::lazy::control::answer("bogus\"\n", &f.device).contains("\"bogus\\\"\""));
    }

    /// A base disk whose writes to gated sectors wait until the gate opens: a slow fetch.
    struct Gated {
        inner: FileDevice,
        gate: Arc<Gate>,
    }

    #[derive(Default)]
    struct Gate {
        /// Sectors below this are gated while closed.
        below: u64,
        state: std::sync::Mutex<(bool, usize, usize)>, // (open, held now, most held at once)
        cond: std::sync::Condvar,
    }

    impl Gate {
        fn open(&self) {
            self.state.lock().unwrap().0 = true;
            self.cond.notify_all();
        }
        /// Blocks while closed; records how many writers wait together.
        fn pass(&self) {
            let mut st = self.state.lock().unwrap();
            st.1 += 1;
            st.2 = st.2.max(st.1);
            while !st.0 {
                st = self.cond.wait(st).unwrap();
            }
            st.1 -= 1;
        }
        fn most_held(&self) -> usize {
            self.state.lock().unwrap().2
        }
    }

    struct GatedChannel {
        inner: Box<dyn IoChannel>,
        gate: Arc<Gate>,
    }

    impl BlockDevice for Gated {
        fn sectors(&self) -> u64 {
            self.inner.sectors()
        }
        fn new_channel_with(&self, notifier: Notifier) -> io::Result<Box<dyn IoChannel>> {
            Ok(Box::new(GatedChannel {
                inner: self.inner.new_channel_with(notifier)?,
                gate: self.gate.clone(),
            }))
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()
        }
    }

    impl IoChannel for GatedChannel {
        fn add(&mut self, id: u64, op: IoOp) {
            if let IoOp::Write { sector, .. } = &op {
                if *sector < self.gate.below {
                    self.gate.pass();
                }
            }
            self.inner.add(id, op)
        }
        fn submit(&mut self) -> io::Result<()> {
            self.inner.submit()
        }
        fn poll(&mut self, out: &mut Vec<Completion>) {
            self.inner.poll(out)
        }
        fn wait(&mut self) -> io::Result<()> {
            self.inner.wait()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn notifier(&self) -> &Notifier {
            self.inner.notifier()
        }
    }

    fn thread_cpu() -> Duration {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    use std::time::{Duration, Instant};

    #[test]
    fn slow_fetches_run_concurrently_without_blocking_fetched_stripes_or_spinning() {
        let f = fixture(STRIPE * STRIPES, false);
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0; STRIPE * STRIPES]).unwrap();
        let mut md = Metadata::new((STRIPE * STRIPES / 512) as u64, SHIFT).unwrap();
        md.set_fetched(7);
        let meta = dir.path().join("meta");
        md.write_to(&std::fs::File::create(&meta).unwrap(), None)
            .unwrap();
        // Writes to stripes 0..=2 (the fetches) hang until the gate opens.
        let gate = Arc::new(Gate {
            below: (3 * STRIPE / 512) as u64,
            ..Gate::default()
        });
        let inner = Arc::new(Gated {
            inner: FileDevice::open(&base, false, 64).unwrap(),
            gate: gate.clone(),
        });
        let opts = LazyOptions {
            image_path: f.image_path.clone(),
            metadata_path: meta,
            copy_on_read: false,
            autofetch: false,
            autofetch_mib_per_sec: None,
        };
        let device = LazyDevice::open(inner, None, &opts, 64).unwrap();
        let mut ch = device.new_channel().unwrap();
        for s in 0..3u64 {
            ch.add(
                s,
                IoOp::Write {
                    sector: s * (STRIPE / 512) as u64,
                    buf: buf_of(&[s as u8 + 1; 512]),
                },
            );
        }
        ch.submit().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.most_held() < 3 {
            assert!(
                Instant::now() < deadline,
                "fetches did not run concurrently"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Fetched stripe 7 and unfetched-stripe reads from the image are served meanwhile.
        let sector7 = (7 * STRIPE / 512) as u64;
        let (r, _) = run_sync(
            &mut *ch,
            IoOp::Write {
                sector: sector7,
                buf: buf_of(&[0x77; 512]),
            },
        );
        r.unwrap();
        assert_eq!(read(&mut *ch, sector7, 512), vec![0x77; 512]);
        assert_eq!(
            read(&mut *ch, (4 * STRIPE / 512) as u64, 512),
            &f.image[4 * STRIPE..4 * STRIPE + 512]
        );
        // The three writes still wait; waiting for them does not burn the CPU.
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert!(done.is_empty());
        let (cpu0, t0) = (thread_cpu(), Instant::now());
        while t0.elapsed() < Duration::from_millis(300) {
            ch.wait().unwrap();
            ch.poll(&mut done);
        }
        assert!(done.is_empty());
        let cpu = thread_cpu() - cpu0;
        assert!(
            cpu < Duration::from_millis(60),
            "waiting used {cpu:?} of CPU"
        );
        gate.open();
        while done.len() < 3 {
            ch.wait().unwrap();
            ch.poll(&mut done);
        }
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(device.status().fetched, 4);
    }

    /// xorshift64*: deterministic randomness for the model test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random batches of non-overlapping requests on two channels (reads and writes, plain and
    /// vectored with odd splits, write-zeroes, flushes) over a random image length, a random
    /// set of stripes fetched beforehand and either read policy, checked against a model of
    /// the disk; at the end the base disk and the metadata must agree with it too.
    #[test]
    fn random_requests_match_a_model() {
        const DISK: usize = 16 * STRIPE;
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let copy_on_read = seed % 2 == 0;
            let image_len = match seed % 3 {
                0 => DISK,
                1 => rng.below(DISK as u64) as usize,
                _ => DISK + 4096 + 77,
            };
            let dir = tempfile::tempdir().unwrap();
            let (base_path, image_path, meta) = (
                dir.path().join("base"),
                dir.path().join("image"),
                dir.path().join("meta"),
            );
            let image: Vec<u8> = (0..image_len)
                .map(|i| (i as u64).wrapping_mul(seed | 0x100).to_le_bytes()[1])
                .collect();
            std::fs::write(&image_path, &image).unwrap();
            let mut model = image.clone();
            model.resize(DISK, 0);
            // Stripes fetched beforehand hold the image on the base disk; the rest is stale.
            let mut base = vec![0xee; DISK];
            let mut md = Metadata::new((DISK / 512) as u64, SHIFT).unwrap();
            for st in 0..16 {
                if rng.below(3) == 0 {
                    md.set_fetched(st);
                    base[st * STRIPE..(st + 1) * STRIPE]
                        .copy_from_slice(&model[st * STRIPE..(st + 1) * STRIPE]);
                }
            }
            std::fs::write(&base_path, &base).unwrap();
            md.write_to(&std::fs::File::create(&meta).unwrap(), None)
                .unwrap();
            let inner: Arc<dyn BlockDevice> =
                Arc::new(FileDevice::open(&base_path, false, 64).unwrap());
            let opts = LazyOptions {
                image_path,
                metadata_path: meta.clone(),
                copy_on_read,
                autofetch: false,
                autofetch_mib_per_sec: None,
            };
            let device = LazyDevice::open(inner, None, &opts, 64).unwrap();
            let mut channels = [device.new_channel().unwrap(), device.new_channel().unwrap()];
            // Page-aligned memory for vectored requests (the base disk's iovec alignment).
            let mut mem = IoBuf::new(256 * 1024);
            if !copy_on_read {
                // Mostly unfetched: the whole disk through the split path (image, its tail,
                // zeros past it) before writes fetch the stripes.
                let whole = read(&mut *channels[0], 0, DISK);
                assert!(
                    whole == model,
                    "seed {seed}: first read differs from the model"
                );
            }

            for batch in 0..150 {
                // (channel, id, start byte, len, kind, data written)
                let mut reqs: Vec<(usize, u64, usize, usize, u8, Vec<u8>)> = Vec::new();
                let mut mem_used = 0;
                for id in 0..rng.below(4) + 1 {
                    let max = if rng.below(4) == 0 { 160 } else { 16 };
                    let len = 512 * (rng.below(max) + 1);
                    let start = 512 * rng.below(((DISK - len as usize) / 512 + 1) as u64);
                    let (start, len) = (start as usize, len as usize);
                    if reqs.iter().any(|r| start < r.2 + r.3 && r.2 < start + len) {
                        continue;
                    }
                    let kind = rng.below(6) as u8; // 0 read 1 readv 2 write 3 writev 4 zeroes 5 flush
                    if kind == 1 || kind == 3 {
                        let need = len.div_ceil(4096) * 4096;
                        if mem_used + need > mem.len() || len % 4096 != 0 {
                            continue;
                        }
                    }
                    let data: Vec<u8> = (0..len)
                        .map(|i| (i as u64 ^ (batch << 8) ^ id).to_le_bytes()[0] | 1)
                        .collect();
                    let ch = rng.below(2) as usize;
                    let sector = (start / 512) as u64;
                    let op = match kind {
                        0 => IoOp::Read {
                            sector,
                            buf: IoBuf::new(len),
                        },
                        2 => IoOp::Write {
                            sector,
                            buf: buf_of(&data),
                        },
                        4 => IoOp::WriteZeroes {
                            sector,
                            sectors: (len / 512) as u64,
                        },
                        5 => IoOp::Flush,
                        _ => {
                            // Vectors of 4 KiB multiples, split at random page boundaries.
                            let region = &mut mem[mem_used..mem_used + len];
                            if kind == 3 {
                                region.copy_from_slice(&data);
                            }
                            let mut iov = Vec::new();
                            let mut at = 0;
                            while at < len {
                                let n = (4096 * (rng.below(4) as usize + 1)).min(len - at);
                                iov.push(libc::iovec {
                                    iov_base: region[at..].as_mut_ptr().cast(),
                                    iov_len: n,
                                });
                                at += n;
                            }
                            mem_used += len;
                            let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(());
                            // SAFETY: `mem` outlives the batch, which completes below.
                            let iov = unsafe { IoVecs::new(iov, owner) };
                            if kind == 1 {
                                IoOp::ReadVec { sector, iov }
                            } else {
                                IoOp::WriteVec { sector, iov }
                            }
                        }
                    };
                    channels[ch].add(id, op);
                    reqs.push((ch, id, start, len, kind, data));
                }
                for ch in &mut channels {
                    ch.submit().unwrap();
                }
                let mut done: Vec<(usize, Completion)> = Vec::new();
                while done.len() < reqs.len() {
                    for (i, ch) in channels.iter_mut().enumerate() {
                        let mut out = Vec::new();
                        ch.poll(&mut out);
                        done.extend(out.into_iter().map(|c| (i, c)));
                        ch.submit().unwrap();
                    }
                    if done.len() < reqs.len() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                let mut vec_at = 0;
                for (ch, id, start, len, kind, data) in &reqs {
                    let (_, c) = done
                        .iter()
                        .find(|(i, c)| i == ch && c.id == *id)
                        .expect("request completed");
                    assert_eq!(c.result, Ok(()), "seed {seed} batch {batch} kind {kind}");
                    let want = &model[*start..start + len];
                    match kind {
                        0 => assert!(
                            c.buf.as_deref() == Some(want),
                            "seed {seed} batch {batch}: read of {len} at {start} differs"
                        ),
                        1 => {
                            assert!(
                                &mem[vec_at..vec_at + len] == want,
                                "seed {seed} batch {batch}: readv of {len} at {start} differs"
                            );
                            vec_at += len;
                        }
                        3 => vec_at += len,
                        _ => {}
                    }
                    match kind {
                        2 | 3 => model[*start..start + len].copy_from_slice(data),
                        4 => model[*start..start + len].fill(0),
                        _ => {}
                    }
                }
            }
            // Everything reads back; the base disk and the metadata agree with the model.
            let whole = read(&mut *channels[0], 0, DISK);
            assert!(
                whole == model,
                "seed {seed}: final read differs from the model"
            );
            device.sync().unwrap();
            let on_disk = Metadata::read_from(
                &std::fs::File::open(&meta).unwrap(),
                (DISK / 512) as u64,
                None,
            )
            .unwrap();
            let base = std::fs::read(&base_path).unwrap();
            for st in 0..16 {
                let r = st * STRIPE..(st + 1) * STRIPE;
                assert_eq!(on_disk.is_fetched(st), device.shared.is_fetched(st));
                if on_disk.is_fetched(st) {
                    assert!(
                        base[r.clone()] == model[r],
                        "seed {seed}: stripe {st} on disk"
                    );
                } else {
                    assert!(
                        base[r].iter().all(|&b| b == 0xee),
                        "seed {seed}: stripe {st}"
                    );
                }
            }
        }
    }
}
