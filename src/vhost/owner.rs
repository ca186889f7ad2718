//! Which backend may use the disk: the one whose guest's rings run. In a live migration both
//! the source's and the destination's backend serve the same disk (shared storage, the same
//! config); the source hands the disk over when QEMU stops its rings at switchover, and the
//! destination takes it when its rings start. The policy (a lock, what to make durable) is
//! the service's, behind [`DiskOwner`]; this module only tells it when rings start and stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The disk's ownership, as the service implements it.
pub trait DiskOwner: Send + Sync {
    /// Takes the disk for this process's guest (at once if it has it), waiting a bounded
    /// time for a previous owner to hand it over; false if it could not (the error is logged).
    fn acquire(&self) -> bool;
    /// Hands the disk over: makes everything durable, stops background writes and lets another
    /// process take it. Called with no request in flight.
    fn release(&self);
}

/// One connection's queues as the owner sees them: the disk is needed while any runs.
pub(super) struct Activity {
    owner: Option<Arc<dyn DiskOwner>>,
    /// Whether each queue runs (has been started and not stopped with GET_VRING_BASE); read
    /// without the lock on every wake-up.
    running: Vec<AtomicBool>,
    /// Serializes starts and stops, so the last stop and a new start cannot interleave.
    transitions: Mutex<()>,
}

impl Activity {
    pub fn new(owner: Option<Arc<dyn DiskOwner>>, queues: usize) -> Self {
        Activity {
            owner,
            running: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            transitions: Mutex::new(()),
        }
    }

    /// Whether queue `q` runs with the disk taken.
    pub fn is_running(&self, q: usize) -> bool {
        self.running
            .get(q)
            .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// Queue `q` has work: true if the disk is ours to serve it (taken now if need be).
    pub fn start(&self, q: usize) -> bool {
        let Some(flag) = self.running.get(q) else {
            return false;
        };
        if flag.load(Ordering::Acquire) {
            return true;
        }
        let _t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = &self.owner {
            if !owner.acquire() {
                return false;
            }
        }
        flag.store(true, Ordering::Release);
        true
    }

    /// Queue `q` was stopped (its requests drained): the last one to stop hands the disk over.
    pub fn stop(&self, q: usize) {
        let Some(flag) = self.running.get(q) else {
            return;
        };
        let _t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        if !flag.swap(false, Ordering::AcqRel) {
            return;
        }
        if self.running.iter().all(|r| !r.load(Ordering::Acquire)) {
            if let Some(owner) = &self.owner {
                owner.release();
            }
        }
    }
}
