//! System helpers with no knowledge of disks: the bottom of the crate. Nothing here imports
//! another module of the crate.
//!
//! - [`socket`]: claiming, permissions and release of the unix socket paths we listen on.
//! - [`affinity`]: the CPUs this process may run on, pinning a thread (`cpus`).
//! - [`ratelog`]: a logger that rate-limits noisy targets (a hostile guest cannot flood logs).
//! - [`yaml`]: YAML parse errors described without repeating the file's values.
//! - [`open`]: opening a file to read without a FIFO making us wait, its kind checked.
//! - [`sched`]: asking the scheduler for short time slices on a request's path.
//! - [`zerocopy`]: a file's bytes to a socket with `sendfile`, the file reopened without O_DIRECT.

pub mod affinity;
pub mod open;
pub mod ratelog;
pub mod sched;
pub mod socket;
pub(crate) mod yaml;
pub mod zerocopy;

use std::error::Error;

/// `err` and its sources, joined by ": " (as anyhow's `{:#}`).
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
