//! The frontend's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::ring::status_name;
use super::Stage;

/// What failed, and where. Messages are short and chain through [`std::error::Error::source`]:
/// printed with its sources (anyhow's `{:#}`), an error reads e.g.
/// `stage 3 (virtqueue): SET_VRING_NUM: <the vhost error>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the socket failed (after retrying until the timeout).
    #[error("connecting to {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A vhost-user request failed, or the backend refused it (REPLY_ACK).
    #[error("{request}")]
    Request {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    /// A stage of [`super::run`] failed.
    #[error("stage {} ({stage})", stage.number())]
    Stage {
        stage: Stage,
        #[source]
        source: Box<Error>,
    },
    /// The copy stage was asked for without an output file.
    #[error("the copy stage needs --output FILE")]
    NoOutput,
    /// The output file could not be created.
    #[error("cannot create {}", path.display())]
    CreateOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A local I/O operation failed: the memfd, an eventfd, poll, the output file.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the shared "guest" memory failed.
    #[error("{what}")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The shared memory could not be set up, or does not fit the queue.
    #[error("{0}")]
    Memory(String),
    /// The I/O options do not fit each other or the device's limits.
    #[error("{0}")]
    Options(String),
    /// A method was called before the stage it builds on.
    #[error("{0}")]
    Order(&'static str),
    /// The backend broke the protocol: something it returned is impossible.
    #[error("{0}")]
    Backend(String),
    /// No request completed within the timeout.
    #[error(
        "timed out after {timeout:?} waiting for the backend to complete any of {in_flight} \
         requests (avail idx {avail_idx}, used idx {used_idx})"
    )]
    Timeout {
        timeout: Duration,
        in_flight: usize,
        avail_idx: u16,
        used_idx: u16,
    },
    /// A read completed with a status other than OK.
    #[error(
        "read of sector {sector} ({len} bytes) failed: status {}{}",
        status_name(*.status),
        used_len_note(.used_len)
    )]
    Status {
        sector: u64,
        len: u32,
        status: u8,
        /// The used length the backend reported, when it is worth showing.
        used_len: Option<u32>,
    },
}

fn used_len_note(used_len: &Option<u32>) -> String {
    used_len.map_or_else(String::new, |n| format!(" (used length {n})"))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` adapters that name what failed.
pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        what: what.into(),
        source,
    }
}

pub(super) fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::GuestMemory { what, source }
}

pub(super) fn request_err(request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Request { request, source }
}

/// Returns `Error::$kind(format!(...))` unless `$cond` holds (this module's `ensure!`).
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::frontend::Error::$kind(format!($($fmt)+)));
        }
    };
}
pub(super) use ensure;

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of `e` and of each of its sources, as the binary prints them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(e), |e| e.source())
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn messages_name_the_stage_the_request_and_the_socket() {
        let e = Error::Stage {
            stage: Stage::Virtqueue,
            source: Box::new(request_err("SET_VRING_NUM")(vhost::Error::InvalidQueue)),
        };
        assert_eq!(
            chain(&e),
            ["stage 3 (virtqueue)", "SET_VRING_NUM", "invalid virtqueue"]
        );
        let e = Error::Connect {
            socket: "/run/x.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(chain(&e)[0], "connecting to /run/x.sock");
        assert_eq!(chain(&e).len(), 2);
    }

    #[test]
    fn status_messages() {
        let e = Error::Status {
            sector: 7,
            len: 512,
            status: 1,
            used_len: Some(1),
        };
        assert_eq!(
            e.to_string(),
            "read of sector 7 (512 bytes) failed: status 1 (IOERR) (used length 1)"
        );
        let e = Error::Status {
            sector: 7,
            len: 512,
            status: 0xff,
            used_len: None,
        };
        assert_eq!(
            e.to_string(),
            "read of sector 7 (512 bytes) failed: status 0xff (never written by the backend)"
        );
    }
}
