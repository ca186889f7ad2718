//! The disk's ownership between backends, for live migration (see [`crate::vhost::DiskOwner`]):
//! an exclusive `flock` on the disk (`path`), held by the backend whose guest runs.
//!
//! A backend takes the lock at start-up if it is free, and serves as before. If another
//! backend holds it (a live migration's source, with the same config), it starts in standby:
//! it listens and answers its VMM, but fetches nothing and writes nothing until its guest
//! starts its rings (after switchover); then it waits up to `handover_wait_secs` for the lock,
//! re-reads the lazy metadata the other backend left, and serves. The holder hands the disk
//! over when QEMU stops its last ring (GET_VRING_BASE, at switchover): requests drained,
//! lazy fetches finished and held, WRITTEN bits persisted, the disk synced, then unlocked.
//!
//! A second backend serving the same disk to a second running VM (a mistake) therefore waits
//! and fails its guest's requests: the disk is never written by two backends at once. `flock`
//! works across hosts only where the shared file system implements it (NFS, CephFS, GFS2,
//! OCFS2); on a block device it is local to the host.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::block::BlockDevice;
use crate::lazy::LazyDevice;
use crate::vhost::DiskOwner;

/// How often a waiting backend tries the lock.
const RETRY: Duration = Duration::from_millis(5);

/// Takes the lock on `file` without waiting; false if another process holds it. A readonly
/// disk takes a shared lock: several readonly backends may serve one image.
pub fn try_lock(file: &File, readonly: bool) -> io::Result<bool> {
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: as in try_lock.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The lock and what a hand-over makes durable.
pub struct DiskLock {
    file: Arc<File>,
    readonly: bool,
    device: Arc<dyn BlockDevice>,
    lazy: Option<Arc<LazyDevice>>,
    wait: Duration,
    /// Serializes acquire and release.
    state: Mutex<State>,
    /// Whether this backend has the disk: changed under `state`, read without it (`status`
    /// must not wait up to `handover_wait_secs` while an acquire waits).
    held: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The last acquire timed out: later ones try once without waiting (and without logging),
    /// so a guest's requests fail at once instead of each waiting.
    refused: bool,
}

impl DiskLock {
    /// `held`: whether [`try_lock`] took the lock on `file` at start-up.
    pub fn new(
        file: Arc<File>,
        readonly: bool,
        held: bool,
        device: Arc<dyn BlockDevice>,
        lazy: Option<Arc<LazyDevice>>,
        wait: Duration,
    ) -> Self {
        DiskLock {
            file,
            readonly,
            device,
            lazy,
            wait,
            state: Mutex::new(State { refused: false }),
            held: AtomicBool::new(held),
        }
    }

    /// Whether this backend has the disk (for `status`); never waits.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    fn take(&self) -> io::Result<()> {
        if let Some(lazy) = &self.lazy {
            lazy.take_over().map_err(io::Error::other)?;
        }
        Ok(())
    }
}

impl DiskOwner for DiskLock {
    fn acquire(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.held() {
            return true;
        }
        let deadline = Instant::now()
            + if state.refused {
                Duration::ZERO
            } else {
                self.wait
            };
        let mut announced = false;
        loop {
            match try_lock(&self.file, self.readonly) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => {
                    if !announced {
                        info!("waiting for the backend holding the disk to hand it over");
                        announced = true;
                    }
                    std::thread::sleep(RETRY);
                }
                Ok(false) => {
                    if !state.refused {
                        error!(
                            "the disk is in use by another backend (still not handed over after \
                             {:?}): the guest's requests fail until it is",
                            self.wait
                        );
                        state.refused = true;
                    }
                    return false;
                }
                Err(e) => {
                    if !state.refused {
                        error!("cannot lock the disk: {e}");
                        state.refused = true;
                    }
                    return false;
                }
            }
        }
        if let Err(e) = self.take() {
            error!("taking the disk over failed: {e}; handing it back");
            let _ = unlock(&self.file);
            state.refused = true;
            return false;
        }
        self.held.store(true, Ordering::Release);
        state.refused = false;
        info!("took the disk over: serving");
        true
    }

    fn release(&self) {
        let _serial = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.held() {
            return;
        }
        let started = Instant::now();
        if let Some(lazy) = &self.lazy {
            lazy.hand_over();
        }
        // Syncs the data and persists the lazy layer's WRITTEN bits. If that fails, keep the
        // disk (and fetch again) rather than hand over metadata that misses them.
        if let Err(e) = self.device.sync() {
            error!("handing the disk over failed (sync: {e}); keeping it");
            if let Some(lazy) = &self.lazy {
                let _ = lazy.take_over();
            }
            return;
        }
        if let Err(e) = unlock(&self.file) {
            warn!("unlocking the disk failed: {e}");
        }
        self.held.store(false, Ordering::Release);
        info!(
            "guest stopped: disk handed over in {:?} (another backend may take it)",
            started.elapsed()
        );
    }
}
