//! The device's side of inflight tracking: handing out and taking regions (for the relay), and
//! resuming a queue after a restart by resubmitting what its region says was in flight.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use log::info;
use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::inflight::{chain_descriptors, QueueTrack, Region};
use super::relay::InflightHandler;
use super::{BlockBackend, Memory, Vring};
use crate::virtio_blk::stats::QueueStats;
use crate::virtio_blk::{Finished, QueueWorker, Request};

impl BlockBackend {
    /// Queue `q`'s tracking state; locked by its worker once per batch, and by the relay when a
    /// region is set.
    pub(super) fn track(&self, q: usize) -> MutexGuard<'_, QueueTrack> {
        self.tracks[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a region's geometry against the device's: a frontend may not make us allocate or
    /// map more than the queues we serve need.
    fn check_inflight(&self, msg: &VhostUserInflight) -> io::Result<()> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        if nq > self.settings.num_queues || qs > self.settings.queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{nq} queues of {qs} asked; the device has {} of at most {}",
                    self.settings.num_queues, self.settings.queue_size
                ),
            ));
        }
        Ok(())
    }

    /// Before queue `queue` takes anything from its avail ring after a region was set: reads
    /// the region, moves the avail ring past the chains taken before the restart, and starts
    /// again every request that was in flight, oldest first (see [`super::inflight`]).
    pub(super) fn resume(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &Memory,
        worker: &mut QueueWorker,
        stats: &QueueStats,
        done: &mut Vec<Finished>,
    ) {
        let mut track = self.track(queue);
        if !track.needs_recovery() {
            return;
        }
        let guard = mem.memory().into_inner();
        let (used, size, desc_table) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (
                q.used_idx(&*guard, Ordering::Acquire),
                q.size(),
                q.desc_table(),
            )
        };
        let used = match used {
            Ok(u) => u.0,
            Err(e) => {
                // Tried again at the next event; nothing is taken from the ring meanwhile.
                self.warn_ring_op(format_args!(
                    "queue {queue}: cannot read the used index: {e}"
                ));
                return;
            }
        };
        let Some(recovery) = track.recover(used, size) else {
            return;
        };
        drop(track);
        let Some(next_avail) = recovery.next_avail else {
            // A fresh region: nothing was taken under it.
            return;
        };
        {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            q.set_next_avail(next_avail);
            q.set_next_used(used);
        }
        if recovery.resubmit.is_empty() {
            return;
        }
        info!(
            "queue {queue}: resubmitting {} requests in flight before the restart; the avail \
             ring resumes at {next_avail}",
            recovery.resubmit.len(),
        );
        let now = Instant::now();
        for head in recovery.resubmit {
            let descs = chain_descriptors(&*guard, GuestAddress(desc_table), size, head);
            let parsed = Request::parse(descs.into_iter(), &*guard, &self.limits());
            stats.started(1);
            if let Some(f) = worker.start_at(&guard, head, parsed, now) {
                done.push(f);
            }
        }
    }
}

impl InflightHandler for BlockBackend {
    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        self.check_inflight(msg)?;
        // Our mapping is not needed: the frontend hands the region back with SET_INFLIGHT_FD.
        let (region, file) =
            Region::create(msg.num_queues, msg.queue_size).map_err(io::Error::other)?;
        drop(region);
        let size = super::inflight::queue_region_size(msg.queue_size) * u64::from(msg.num_queues);
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        self.check_inflight(msg)?;
        let region = Region::map(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(io::Error::other)?;
        let region = Arc::new(region);
        for q in 0..self.tracks.len() {
            self.track(q).attach(Some(region.clone()), q);
        }
        // At debug: a frontend may send it in a loop. The relay says it once per connection.
        log::debug!(
            "inflight region set: {} queues of {}",
            msg.num_queues,
            msg.queue_size
        );
        Ok(())
    }
}
