//! Memory tables a frontend sends: refused when they would fault, and logged like the rest
//! during a live migration.

use std::io;
use std::sync::Mutex;

use log::warn;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{self, DirtyBitmap, LoggedMemory};

/// After a new table (`table`): during a migration, memory added or remapped is logged like
/// the rest (`previous` holds the bitmaps of the table it replaced, and then of this one). A
/// log that does not cover the new table is QEMU's error; logging what it covers and saying so
/// beats refusing the table under a running guest.
pub(super) fn carry_log(previous: &Mutex<Vec<DirtyBitmap>>, table: &LoggedMemory) {
    let mut previous = previous.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = dirty::extend_log(table, &previous) {
        warn!("the dirty log does not cover the new memory table: {e}");
    }
    *previous = dirty::bitmaps(table);
}

/// Refuses a memory table whose regions reach past the end of the regular file behind them
/// (a memfd, a hugetlbfs or shm file): touching such a page raises SIGBUS, which would kill the
/// backend. Other kinds of descriptor (e.g. /dev/zero) do not fault that way.
pub(super) fn check_regions(mem: &LoggedMemory) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the region at guest address {:#x} maps {:#x} bytes from offset {:#x} of a \
                     file of {:#x} bytes",
                    region.start_addr().raw_value(),
                    region.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}
