//! The eventfd a channel signals when it has completions.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Becomes readable when a channel's [`IoChannel::poll`](super::IoChannel::poll) has something
/// to return. Clones share one eventfd: every channel of a stack (and any thread working for
/// one, such as the lazy fetchers) signals the notifier it was created with, so the worker
/// watches a single descriptor.
///
/// A notifier also says how its channels' caller waits: an [`inline`](Notifier::inline) one
/// belongs to a thread that blocks on every operation (a stripe server session, a lazy
/// fetcher), and the file device then runs operations on that thread instead of through
/// io_uring (see `block::inline`).
#[derive(Clone, Debug)]
pub struct Notifier {
    fd: Arc<EventFd>,
    inline: bool,
}

impl Notifier {
    pub fn new() -> io::Result<Self> {
        Ok(Notifier {
            fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            inline: false,
        })
    }

    /// For a thread that waits for each operation it starts (with [`super::run_sync`]): its
    /// operations may run on it, during `submit`.
    pub fn inline() -> io::Result<Self> {
        Ok(Notifier {
            inline: true,
            ..Notifier::new()?
        })
    }

    /// See [`Notifier::inline`].
    pub fn is_inline(&self) -> bool {
        self.inline
    }

    /// Makes the descriptor readable.
    pub fn notify(&self) {
        // Fails only when the counter would overflow, and then it is readable already.
        let _ = self.fd.write(1);
    }

    /// Clears readiness after it woke the caller; call before polling, so that a completion
    /// posted meanwhile makes it readable again. (Polling loops skip this: it costs a syscall.)
    pub fn ack(&self) {
        // EAGAIN means it was not readable: nothing to clear.
        let _ = self.fd.read();
    }

    /// Blocks until the descriptor is readable or `timeout` passes; true if it is readable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, ours, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// A descriptor of its own for the same eventfd, for code that keeps an [`EventFd`].
    pub fn try_clone_eventfd(&self) -> io::Result<EventFd> {
        self.fd.try_clone()
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_eventfd() {
        let n = Notifier::new().unwrap();
        let m = n.clone();
        assert!(!n.wait(Duration::ZERO));
        m.notify();
        assert!(n.wait(Duration::ZERO));
        n.ack();
        assert!(!m.wait(Duration::ZERO));
        let e = n.try_clone_eventfd().unwrap();
        e.write(1).unwrap();
        assert!(m.wait(Duration::from_millis(10)));
    }
}
