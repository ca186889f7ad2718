//! Scheduling hints for the threads on a request's path.

use std::io;

/// The kernel's `struct sched_attr` (first version, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// A short slice for a thread on a request's path: the shortest the kernel takes.
pub const SHORT_SLICE_NS: u64 = 100_000;

/// Asks the scheduler for a time slice of `ns` for the calling thread (0: the default again),
/// keeping its policy and nice value. Under EEVDF (Linux 6.12+) a waking thread whose slice is
/// shorter than the running one's preempts it at once, instead of waiting for a CPU-bound
/// neighbour's longer slice to run out: a request's hop between two of our threads then costs
/// a wake-up, not a slice. The thread's share of the CPU does not change. Only fair-class
/// threads change; older kernels ignore or refuse it (an error).
pub fn set_slice(ns: u64) -> io::Result<()> {
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is writable and `size` bytes long; pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(());
    }
    attr.size = size;
    attr.flags = 0;
    attr.runtime = ns;
    // SAFETY: `attr` is a valid sched_attr of the size it states; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's slice as the scheduler reports it (`se.slice` in
/// /proc/thread-self/sched, ns); `None` where it does not (before Linux 6.6).
#[cfg(test)]
pub(crate) fn current_slice() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = text.lines().find(|l| l.starts_with("se.slice"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_slice_is_set_and_given_back() {
        std::thread::spawn(|| {
            let Some(base) = current_slice() else {
                eprintln!("skipped: the kernel reports no se.slice");
                return;
            };
            set_slice(SHORT_SLICE_NS).unwrap();
            assert_eq!(current_slice(), Some(SHORT_SLICE_NS));
            set_slice(0).unwrap();
            assert_eq!(current_slice(), Some(base));
        })
        .join()
        .unwrap();
    }
}
