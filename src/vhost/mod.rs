//! vhost-user plumbing: exposes the virtio-blk workers to a VMM through rust-vmm's
//! `vhost-user-backend`. One worker thread per virtqueue; each owns a [`QueueWorker`] and the
//! io_uring of its device channel, whose completion eventfd is watched by the same epoll loop
//! as the queue's kick.

use log::{error, info, warn};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::block::{BlockDevice, Capacity};
use crate::virtio_blk::stats::{DeviceStats, QueueStats};
use crate::virtio_blk::{self, ConfigSpace, DeviceInfo, Finished, QueueWorker, Request};
use poll::AdaptivePoll;

mod config_change;
pub mod dirty;
mod inflight;
mod memory;
mod owner;
mod poll;
mod relay;
mod resume;
mod serve;

pub use config_change::ConfigChange;
pub use owner::DiskOwner;
pub use serve::{serve, Connection, Disk, ServeError};

/// Most virtqueues. Each queue has its own worker thread, and vhost-user-backend gives each
/// thread its queues as a bit mask in a u64: queue 64 and up cannot be assigned (they used to
/// alias queues 0..).
pub const MAX_NUM_QUEUES: u16 = 64;

type Memory = GuestMemoryAtomic<LoggedMemory>;
/// A virtqueue over [`Memory`].
type Vring = vhost_user_backend::VringRwLock<Memory>;
use dirty::{DirtyBitmap, LoggedMemory};

/// Queue-level settings from the config.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    pub poll_timeout: Duration,
    /// `cpus`: the CPU each queue's worker thread is pinned to.
    pub cpus: Option<Vec<usize>>,
}

/// The device as seen by one frontend connection.
pub struct BlockBackend {
    settings: QueueSettings,
    info: Arc<DeviceInfo>,
    config: ConfigSpace,
    /// The disk's current size, when it can grow (see [`BlockBackend::growing`]): requests and
    /// the config space's capacity follow it instead of `info` and `config`.
    capacity: Option<Capacity>,
    /// Where the relay keeps the frontend's backend request channel.
    config_change: ConfigChange,
    workers: Vec<Mutex<QueueWorker>>,
    /// The device's statistics (shared with the control socket and later connections); queue
    /// `q`'s are written only under `workers[q]`'s lock.
    stats: Arc<DeviceStats>,
    /// Each queue's polling policy; used only by the queue's own thread.
    polls: Vec<Mutex<AdaptivePoll>>,
    /// Whether each queue's worker thread (new with each connection) has been pinned.
    pinned: Vec<AtomicBool>,
    /// Each queue's inflight tracking (a no-op until the frontend sets a region).
    tracks: Vec<Mutex<inflight::QueueTrack>>,
    /// Each queue's ring, remembered from its first event so requests drained outside the
    /// worker thread (stop, shutdown) can still be completed to the guest.
    vrings: Vec<OnceLock<Vring>>,
    mem: RwLock<Memory>,
    /// The bitmaps of the memory table's regions, to carry a migration's dirty log over to
    /// the regions of a table that replaces it (see [`dirty::extend_log`]).
    region_bitmaps: Mutex<Vec<DirtyBitmap>>,
    event_idx: AtomicBool,
    /// Set at shutdown so polling loops let go of their worker.
    stopping: AtomicBool,
    /// A guest can corrupt its ring at will: warn once per connection, not per kick.
    warned_bad_ring: AtomicBool,
    /// Likewise for memory tables a frontend sends.
    warned_bad_memory: AtomicBool,
    /// Likewise for failing ring operations (used ring, notifications) and odd epoll events:
    /// a frontend can make them fail on every request.
    warned_ring_op: AtomicBool,
    /// Which queues run, and the disk's owner they take it from (see [`owner`]).
    activity: owner::Activity,
    /// Exit eventfds handed to vhost-user-backend, which takes them with `into_raw_fd()` and
    /// never closes them (0.24, `VringEpollHandler::new`); closed by us once its threads are
    /// gone, or every connection would leak one fd per queue.
    exit_fds: Mutex<Vec<RawFd>>,
}

impl BlockBackend {
    pub fn new(
        device: &dyn BlockDevice,
        info: Arc<DeviceInfo>,
        config: ConfigSpace,
        settings: QueueSettings,
    ) -> io::Result<Self> {
        let stats = Arc::new(DeviceStats::new(settings.num_queues));
        Self::with_stats(device, info, config, settings, stats)
    }

    /// [`BlockBackend::new`] recording into `stats`, which must have a slot for every queue.
    pub fn with_stats(
        device: &dyn BlockDevice,
        info: Arc<DeviceInfo>,
        config: ConfigSpace,
        settings: QueueSettings,
        stats: Arc<DeviceStats>,
    ) -> io::Result<Self> {
        if stats.num_queues() < usize::from(settings.num_queues) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "statistics for {} queues, not the {} served",
                    stats.num_queues(),
                    settings.num_queues
                ),
            ));
        }
        if settings.num_queues > MAX_NUM_QUEUES {
            // queues_per_thread() gives each thread its queue as a bit of a u64.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "num_queues: {} is more than the {} queues a backend serves",
                    settings.num_queues, MAX_NUM_QUEUES
                ),
            ));
        }
        let workers = (0..settings.num_queues)
            .map(|_| {
                Ok(Mutex::new(QueueWorker::new(
                    info.clone(),
                    device.new_channel()?,
                )))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let vrings = (0..settings.num_queues).map(|_| OnceLock::new()).collect();
        let queues = usize::from(settings.num_queues);
        let polls = (0..settings.num_queues)
            .map(|_| Mutex::new(AdaptivePoll::new(settings.poll_timeout)))
            .collect();
        let tracks = (0..settings.num_queues)
            .map(|_| Mutex::new(inflight::QueueTrack::default()))
            .collect();
        Ok(BlockBackend {
            vrings,
            polls,
            pinned: (0..settings.num_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            tracks,
            settings,
            info,
            config,
            capacity: None,
            config_change: ConfigChange::default(),
            workers,
            stats,
            mem: RwLock::new(GuestMemoryAtomic::new(LoggedMemory::new())),
            region_bitmaps: Mutex::new(Vec::new()),
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            warned_bad_ring: AtomicBool::new(false),
            warned_bad_memory: AtomicBool::new(false),
            warned_ring_op: AtomicBool::new(false),
            activity: owner::Activity::new(None, queues),
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// Follows `capacity` (the device's, which `resize` grows) for the requests' range checks
    /// and the config space, and keeps the frontend's backend request channel in `change`.
    pub fn growing(mut self, capacity: Capacity, change: ConfigChange) -> Self {
        self.capacity = Some(capacity);
        self.config_change = change;
        self
    }

    /// Takes the disk from `owner` when a queue starts, and hands it back when the last one
    /// stops (live migration, see [`owner`]).
    pub fn owned_by(mut self, owner: Arc<dyn DiskOwner>) -> Self {
        self.activity = owner::Activity::new(Some(owner), usize::from(self.settings.num_queues));
        self
    }

    /// Where the relay puts the frontend's backend request channel.
    fn config_change(&self) -> &ConfigChange {
        &self.config_change
    }

    /// The limits requests are checked against: the current size.
    fn limits(&self) -> std::borrow::Cow<'_, virtio_blk::Limits> {
        match &self.capacity {
            Some(c) => std::borrow::Cow::Owned(virtio_blk::Limits {
                sectors: c.sectors(),
                ..self.info.limits.clone()
            }),
            None => std::borrow::Cow::Borrowed(&self.info.limits),
        }
    }

    /// The epoll token of queue workers' completion eventfds (above the queue and exit tokens).
    fn completion_token(&self) -> u64 {
        u64::from(self.settings.num_queues) + 1
    }

    fn worker(&self, queue: usize) -> MutexGuard<'_, QueueWorker> {
        // A poisoned lock means a worker panicked; its state is still consistent enough to
        // drain, and refusing to serve would only turn one bug into an outage.
        self.workers[queue]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `q`'s statistics (`with_stats` checked there is a slot for every queue).
    fn queue_stats(&self, q: usize) -> &QueueStats {
        static UNUSED: std::sync::LazyLock<QueueStats> =
            std::sync::LazyLock::new(QueueStats::default);
        self.stats.queue(q).unwrap_or(&UNUSED)
    }

    fn memory(&self) -> Memory {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pops every available chain and starts it. Returns whether any chain was found, and
    /// whether the ring is corrupt: nothing to pop while the avail index claims more than a
    /// ring's worth of chains (or cannot be read), which no amount of polling will fix.
    fn start_available(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &Memory,
        worker: &mut QueueWorker,
        stats: &QueueStats,
        done: &mut Vec<Finished>,
    ) -> (bool, bool) {
        // Another backend has the disk (see `owner`): requests fail, they do not wait.
        let refuse = !self.activity.is_running(queue);
        // An owned snapshot: requests keep it to pin guest buffers the device is using.
        let guard = mem.memory().into_inner();
        let mut found = false;
        // Read once per batch, when the first chain is popped (not on every empty poll).
        let mut now = None;
        let limits = self.limits();
        let mut track = self.track(queue);
        if track.needs_recovery() {
            // The region was not read yet (see `resume`): popping now would take chains the
            // old process had taken already.
            return (false, false);
        }
        loop {
            let chain = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                if !queue.ready() {
                    break;
                }
                match queue.pop_descriptor_chain(&*guard) {
                    Some(c) => c,
                    None => {
                        let corrupt = match queue.avail_idx(&*guard, Ordering::Acquire) {
                            Ok(avail) => avail.0.wrapping_sub(queue.next_avail()) > queue.size(),
                            Err(_) => true,
                        };
                        return (found, corrupt);
                    }
                }
            };
            found = true;
            let started = *now.get_or_insert_with(Instant::now);
            stats.started(1);
            let head = chain.head_index();
            // In the region before the request can complete (see `inflight`).
            track.take(head);
            let mut parsed = Request::parse(chain, &*guard, &limits);
            if refuse {
                parsed = parsed.and_then(|req| Err(not_owner(req.status)));
            }
            if let Some(f) = worker.start_at(&guard, head, parsed, started) {
                done.push(f);
            }
        }
        (found, false)
    }

    /// Warns about a failed ring operation once per connection; later ones at debug.
    fn warn_ring_op(&self, what: std::fmt::Arguments) {
        if self.warned_ring_op.swap(true, Ordering::Relaxed) {
            log::debug!("{what}");
        } else {
            warn!("{what} (further ring errors on this connection are logged at debug)");
        }
    }

    /// Puts finished requests on the used ring, records them in `stats` (call with the queue's
    /// worker locked) and notifies the guest if it wants it.
    fn complete(&self, queue: usize, vring: &Vring, stats: &QueueStats, done: &mut Vec<Finished>) {
        if done.is_empty() {
            return;
        }
        {
            let mut track = self.track(queue);
            let mut state = vring.get_mut();
            for f in done.iter() {
                // One used entry at a time, each recorded in the inflight region.
                let published = track.publish(f.head, || {
                    state.add_used(f.head, f.len)?;
                    Ok::<_, virtio_queue::Error>(state.get_queue().next_used())
                });
                if let Err(e) = published {
                    self.warn_ring_op(format_args!("add_used failed: {e}"));
                }
            }
        }
        record(stats, done);
        let notify = if self.event_idx.load(Ordering::Relaxed) {
            vring.needs_notification().unwrap_or(true)
        } else {
            true
        };
        if notify {
            if let Err(e) = vring.signal_used_queue() {
                self.warn_ring_op(format_args!("signal_used_queue failed: {e}"));
            }
        }
    }

    /// Runs queue `queue`: starts new requests, reaps finished ones, and keeps polling for as
    /// long as its [`AdaptivePoll`] allows before going back to sleeping on the kick.
    fn process(&self, queue: usize, vring: &Vring, woken_by_completion: bool) {
        let mem = self.memory();
        let mut worker = self.worker(queue);
        let stats = self.queue_stats(queue);
        let mut poll = self.polls[queue].lock().unwrap_or_else(|p| p.into_inner());
        if woken_by_completion {
            worker.ack_completion_fd();
        }
        let mut now = Instant::now();
        poll.woke(now);
        let mut done = Vec::new();
        // Without the disk (another backend has it, see `owner`) the loop below fails the
        // requests it pops (`start_available`) and re-enables notifications as usual, so the
        // guest's next request fails too instead of waiting for a kick that never comes.
        if vring.get_ref().get_queue().ready() && self.activity.start(queue) {
            self.resume(queue, vring, &mem, &mut worker, stats, &mut done);
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut last_activity = now;
        let mut notifications_on = true;
        // Set when enable_notification() reported more chains: the next pass must find some.
        let mut rechecking = false;
        loop {
            if self.stopping.load(Ordering::Relaxed) || !vring.get_ref().get_queue().ready() {
                break;
            }
            if notifications_on && poll.keep_polling(now, now - last_activity) {
                let _ = vring.disable_notification();
                notifications_on = false;
            }
            let (started, corrupt) =
                self.start_available(queue, vring, &mem, &mut worker, stats, &mut done);
            worker.submit();
            worker.reap(&*mem.memory(), &mut done);
            let progressed = started || !done.is_empty();
            self.complete(queue, vring, stats, &mut done);
            if corrupt || (rechecking && !progressed) {
                // The avail index says there is work but no chain can be popped: a corrupt
                // ring (e.g. an index more than a ring ahead). Do not spin on it; the next
                // kick tries again.
                if !self.warned_bad_ring.swap(true, Ordering::Relaxed) {
                    warn!("queue {queue}: available ring is inconsistent; waiting for a kick");
                }
                if !notifications_on {
                    let _ = vring.enable_notification();
                }
                break;
            }
            rechecking = false;
            now = Instant::now();
            if progressed {
                last_activity = now;
            }
            if !notifications_on && poll.keep_polling(now, now - last_activity) {
                // Poll politely: io-wq workers carrying out our I/O, or the client, may need
                // this core. If the yield lost the core for a slice, the core is contended:
                // stop polling (see `poll`), since a kick cannot wake a runnable thread.
                std::thread::yield_now();
                let after = Instant::now();
                let uncontended = poll.yielded(now, after);
                now = after;
                if uncontended {
                    continue;
                }
            }
            if notifications_on && !event_idx && !progressed {
                break;
            }
            // enable_notification() says whether chains arrived while notifications were off
            // (or, with EVENT_IDX, since the last avail_event update); those would otherwise
            // wait for a kick that never comes.
            notifications_on = true;
            match vring.enable_notification() {
                Ok(true) => {
                    rechecking = true;
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    self.warn_ring_op(format_args!("enable_notification failed: {e}"));
                    break;
                }
            }
        }
        poll.sleeping(Instant::now());
    }

    /// With `cpus`, pins the calling thread, queue `q`'s worker, to its CPU on its first event:
    /// vhost-user-backend starts the thread, and the first event (the guest's first kick, or
    /// a completion) comes before it handles any request. A failure is logged, not fatal: the
    /// CPUs were checked at start-up, and an unpinned queue still works.
    fn pin_once(&self, q: usize) {
        let Some(cpu) = self.settings.cpus.as_ref().and_then(|c| c.get(q).copied()) else {
            return;
        };
        if self
            .pinned
            .get(q)
            .is_none_or(|p| p.swap(true, Ordering::Relaxed))
        {
            return;
        }
        match crate::sys::affinity::pin_current_thread(cpu) {
            Ok(()) => info!("queue {q}: worker thread pinned to CPU {cpu}"),
            Err(e) => error!("queue {q}: cannot pin the worker thread to CPU {cpu}: {e}"),
        }
    }

    /// Waits for queue `q`'s requests in flight and completes them to the guest.
    fn drain(&self, q: usize) {
        let mem = self.memory();
        let mut done = Vec::new();
        // Held until the completions are recorded: the queue's statistics have one writer.
        let mut worker = self.worker(q);
        worker.drain(&*mem.memory(), &mut done);
        let stats = self.queue_stats(q);
        match self.vrings[q].get() {
            Some(vring) => self.complete(q, vring, stats, &mut done),
            None => record(stats, &mut done),
        }
    }

    /// Closes the exit eventfds vhost-user-backend leaked. Call only after the daemon that
    /// used them is dropped (its worker threads joined and their epoll instances closed).
    fn close_leaked_exit_fds(&self) {
        for fd in self
            .exit_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            // SAFETY: the daemon gave up ownership of this fd (into_raw_fd) and no longer
            // exists; nothing else refers to it, so taking ownership to close it is sound.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Logs (debug) what each queue's polling policy did during the connection.
    fn log_poll_stats(&self) {
        for (q, p) in self.polls.iter().enumerate() {
            let s = p.lock().unwrap_or_else(|p| p.into_inner()).stats();
            log::debug!(
                "queue {q}: {} wake-ups, {} followed by polling, {} polling pauses (core contended)",
                s.wakeups,
                s.polled,
                s.preemptions
            );
        }
    }

    /// Whether every queue's requests are marked in an inflight region: then a process that
    /// exits with requests in flight leaves them for the next one to resubmit.
    pub fn tracks_inflight(&self) -> bool {
        self.tracks
            .iter()
            .all(|t| t.lock().unwrap_or_else(|p| p.into_inner()).is_tracking())
    }

    /// Finishes every request in flight on every queue and stops polling; before exit.
    pub fn drain_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for q in 0..self.workers.len() {
            self.drain(q);
            // A failing disk logged its first error at once; here, once, how many followed.
            self.worker(q).log_error_summary(q);
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = DirtyBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.settings.queue_size)
    }

    fn features(&self) -> u64 {
        virtio_blk::features(self.info.readonly)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Live migration: guest pages we write are marked in QEMU's log (see `dirty`).
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        if features & VhostUserVirtioFeatures::LOG_ALL.bits() == 0 {
            // Migration over or cancelled: QEMU no longer reads the log.
            dirty::stop_logging(&self.memory().memory());
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // For the config-change message after `resize` (see `config_change`).
            | VhostUserProtocolFeatures::BACKEND_REQ
            // Answered by the relay (see `relay`), not by vhost-user-backend.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // SET_LOG_BASE with the log's memfd (see `dirty`).
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match &self.capacity {
            Some(c) => ConfigSpace {
                capacity: c.sectors(),
                ..self.config.clone()
            }
            .read(offset, size),
            None => self.config.read(offset, size),
        }
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE). The mode is the config's: a write is
        // ignored, and a driver reading `writeback` back (Linux does) keeps using the mode
        // the device has, so its FLUSHes match what the device needs.
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        if let Err(e) = memory::check_regions(&mem.memory()) {
            // vhost-user-backend has already handed this table to the rings: take it back from
            // them too, so that nothing touches a mapping that faults.
            if let Ok(guard) = mem.lock() {
                guard.replace(LoggedMemory::new());
            }
            *self.mem.write().unwrap_or_else(|p| p.into_inner()) =
                GuestMemoryAtomic::new(LoggedMemory::new());
            if !self.warned_bad_memory.swap(true, Ordering::Relaxed) {
                warn!("memory table refused: {e}");
            }
            return Err(e);
        }
        memory::carry_log(&self.region_bitmaps, &mem.memory());
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.settings.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.exit_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: finish what the guest already handed us before the ring goes away.
        if (queue_index as usize) < self.workers.len() {
            self.drain(queue_index as usize);
            // The last queue to stop hands the disk over (switchover of a live migration).
            self.activity.stop(queue_index as usize);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            self.warn_ring_op(format_args!(
                "unexpected event set {evset:?} on queue {thread_id}"
            ));
            return Ok(());
        }
        // One queue per thread: thread_id is the queue index, vrings[0] its ring.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        self.pin_once(thread_id);
        let completion = u64::from(device_event) == self.completion_token();
        if completion || device_event == 0 {
            if let Some(slot) = self.vrings.get(thread_id) {
                slot.get_or_init(|| vring.clone());
            }
            self.process(thread_id, vring, completion);
        }
        Ok(())
    }
}

/// How a request fails on a backend that does not have the disk.
fn not_owner(status: GuestAddress) -> virtio_blk::request::ParseError {
    virtio_blk::request::ParseError {
        status: Some(status),
        code: virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8,
        reason: "the disk is in use by another backend",
    }
}

/// Records finished requests (their used entries just published, or never to be) and empties
/// `done`: one clock read for the batch.
fn record(stats: &QueueStats, done: &mut Vec<Finished>) {
    if done.is_empty() {
        return;
    }
    let now = Instant::now();
    for f in done.drain(..) {
        stats.finished(
            f.kind,
            f.ok,
            f.bytes,
            now.saturating_duration_since(f.started),
        );
    }
}

#[cfg(test)]
mod tests;
