//! Object storage for disk archives and remote sources: the [`ObjectStore`] trait and
//! [`open_store`], which picks the implementation a URL names (`file:///dir`, `s3://bucket/prefix`).

pub mod aws;
mod file;
pub mod http;
mod options;
pub mod retry;
pub mod s3;

use std::fmt;
use std::io::{self, Read as _};

pub use file::FileStore;
pub use options::{
    RemoteOptions, S3Overrides, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_FETCH_CONNECTIONS,
    DEFAULT_RETRY_BUDGET,
};
pub use s3::S3Store;

/// A flat namespace of immutable objects under one prefix (a directory, a bucket prefix).
///
/// Keys are relative, `/`-separated names made of `[A-Za-z0-9._/-]`, never starting with
/// `/` or containing `..`; the store joins them to its prefix. Every call blocks (fetcher
/// threads and the `archive` tool call it from plain threads); implementations retry
/// transient failures within their [`RemoteOptions`] budget and return the final error.
/// Errors: [`io::ErrorKind::NotFound`] for a missing object, anything else for the rest.
pub trait ObjectStore: fmt::Display + Send + Sync {
    /// The whole object, if it is at most `max` bytes: a larger one is an
    /// [`io::ErrorKind::InvalidData`] error before more than `max + 1` bytes are read (a
    /// hostile store must not make us allocate what it likes).
    fn get(&self, key: &str, max: usize) -> io::Result<Vec<u8>>;

    /// Stores `data` under `key`, replacing an object of that name; durable when it returns.
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()>;

    /// Whether an object named `key` exists.
    fn exists(&self, key: &str) -> io::Result<bool>;

    /// `Some` while the store is known down (see [`retry`]).
    fn outage(&self) -> Option<retry::Outage> {
        None
    }

    /// Removes what interrupted writers of this store left behind (a `file://` store's
    /// temporary files of processes that are gone; S3 puts are atomic and leave nothing);
    /// returns how many. Writers call it before they start.
    fn remove_stale_temporaries(&self) -> io::Result<usize> {
        Ok(0)
    }
}

/// Why a store could not be opened; the error names the configuration field or flag.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{field}: must start with file:// or s3://")]
    Scheme { field: &'static str },
    #[error("{field}: cannot use {url}")]
    Open {
        field: &'static str,
        url: String,
        source: io::Error,
    },
}

/// Opens the store `url` names; `field` is the config field or flag it came from.
pub fn open_store(
    field: &'static str,
    url: &str,
    remote: &RemoteOptions,
) -> Result<Box<dyn ObjectStore>, StoreError> {
    let open_err = |source| StoreError::Open {
        field,
        url: url.to_string(),
        source,
    };
    if let Some(dir) = url.strip_prefix("file://") {
        let store = FileStore::open(dir.as_ref()).map_err(open_err)?;
        return Ok(Box::new(store));
    }
    if url.starts_with("s3://") {
        let cfg = aws::resolve(&aws::ProcessEnv, &remote.s3)
            .map_err(|e| open_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        return Ok(Box::new(
            S3Store::open(url, &cfg, remote).map_err(open_err)?,
        ));
    }
    Err(StoreError::Scheme { field })
}

/// Reads `reader` to its end into a vector, refusing more than `max` bytes (see
/// [`ObjectStore::get`]); `what` names the object in the error.
pub fn read_bounded(reader: impl io::Read, max: usize, what: &str) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    reader.take(max as u64 + 1).read_to_end(&mut data)?;
    if data.len() > max {
        return Err(too_large(what, max));
    }
    Ok(data)
}

/// The error of an object `what` over the `max` bytes it may be.
pub fn too_large(what: &str, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what} is larger than the {max} bytes it may be"),
    )
}

/// Refuses keys outside the rules of [`ObjectStore`] (a key is never taken from a peer
/// unchecked: a manifest could name `../../etc/passwd`).
pub fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid object name {key:?}"),
        ))
    }
}
