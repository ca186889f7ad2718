//! Lazy stripe fetch from a base image (issue 4). For now only the on-disk groundwork: the
//! metadata file format ([`metadata`]) used by `init-metadata` and `dump-metadata`. The backend
//! does not serve lazy disks yet (it refuses `image_path` at start-up).

pub mod metadata;

pub use metadata::{Metadata, MetadataError};

pub use crate::block::device_size;
