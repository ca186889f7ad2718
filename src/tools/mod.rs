//! The library side of the offline tools: what `replay-log` and `archive` do beyond parsing
//! their flags. They sit on top of the data path (they open disks, metadata and sources the way
//! the backend does) and nothing below depends on them.
//!
//! - [`replay`]: applies a debug log to a disk and checks its reads (`replay-log`).
//! - [`archive_disk`]: the disk a config describes, as the `archive` tool reads it.

pub mod archive_disk;
pub mod replay;
