//! The common suite ([`check_stack`]) over every stack of layers the backend builds.

use std::path::Path;
use std::sync::Arc;

use super::testing::{check_stack, check_stack_with, MemDevice};
use super::QosLimits;
use super::{BlockDevice, CryptDevice, DebugLogDevice, FileDevice, Notifier, Qos, QosDevice};
use crate::crypto::Xts;
use crate::lazy::source::SourceSpec;
use crate::lazy::{LazyDevice, LazyOptions, Metadata};

const DISK: usize = 4 << 20;

fn xts() -> Xts {
    Xts::new(&[0x11; 32], &[0x22; 32])
}

/// A zeroed file of DISK bytes in `dir`, opened as a device.
fn file(dir: &Path) -> Arc<dyn BlockDevice> {
    let path = dir.join("disk");
    std::fs::write(&path, vec![0u8; DISK]).unwrap();
    Arc::new(FileDevice::open(&path, false, 64).unwrap())
}

#[test]
fn file_device() {
    check_stack(true, file);
}

#[test]
fn mem_device() {
    check_stack(true, |_| Arc::new(MemDevice::new((DISK / 512) as u64)));
}

#[test]
fn crypt_over_file() {
    check_stack(false, |d| Arc::new(CryptDevice::new(file(d), xts())));
}

#[test]
fn crypt_over_mem_device() {
    let mem = Arc::new(MemDevice::new((DISK / 512) as u64));
    check_stack(false, |_| Arc::new(CryptDevice::new(mem, xts())));
}

/// A debug log (io.log in `dir`) over [`file`].
fn logged(dir: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(DebugLogDevice::new(file(dir), &dir.join("io.log")).unwrap())
}

#[test]
fn debuglog_over_file() {
    check_stack(true, logged);
}

#[test]
fn debuglog_over_crypt_over_file() {
    check_stack(false, |d| {
        let crypt = Arc::new(CryptDevice::new(file(d), xts()));
        Arc::new(DebugLogDevice::new(crypt, &d.join("io.log")).unwrap())
    });
}

/// A lazy disk over a file in `dir`, filled from an image file, nothing fetched yet.
fn lazy(dir: &Path) -> Arc<dyn BlockDevice> {
    lazy_over(dir, file(dir))
}

/// A lazy disk over `base`, as [`lazy`].
fn lazy_over(dir: &Path, base: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
    let (image, meta) = (dir.join("image"), dir.join("meta"));
    let data: Vec<u8> = (0..DISK).map(|i| (i / 512 + i % 253) as u8).collect();
    std::fs::write(&image, data).unwrap();
    let md = Metadata::new((DISK / 512) as u64, 6).unwrap();
    md.write_to(&std::fs::File::create(&meta).unwrap(), None)
        .unwrap();
    let opts = LazyOptions::new(SourceSpec::File(image), meta);
    Arc::new(LazyDevice::open(base, None, &opts, 64).unwrap())
}

#[test]
fn lazy_over_file() {
    check_stack(true, lazy);
}

/// Below the lazy layer a device that takes no vectors: a demand fetch writes a copy of its
/// staged stripe instead of the staged copy itself.
#[test]
fn lazy_over_debuglog_over_file() {
    check_stack(true, |d| lazy_over(d, logged(d)));
}

// The stacks again with inline channels (a thread that waits for each operation: stripe
// server sessions, lazy fetchers): the file device then runs operations during submit.

#[test]
fn file_device_inline() {
    check_stack_with(true, Notifier::inline, file);
}

#[test]
fn crypt_over_file_inline() {
    check_stack_with(false, Notifier::inline, |d| {
        Arc::new(CryptDevice::new(file(d), xts()))
    });
}

#[test]
fn lazy_over_file_inline() {
    check_stack_with(true, Notifier::inline, lazy);
}

#[test]
fn qos_over_debuglog_over_file_inline() {
    check_stack_with(true, Notifier::inline, |d| {
        Arc::new(QosDevice::new(logged(d), Qos::new(qos_limits()).unwrap()))
    });
}

/// Limits low enough that the suite's batches of 96 requests wait (40 go at once, the rest at
/// 400 a second, released through the notifier), high enough to keep it quick.
fn qos_limits() -> QosLimits {
    serde_json::from_str(r#"{"iops_read":400,"iops_write":400,"bps_total":1073741824}"#).unwrap()
}

#[test]
fn qos_over_file() {
    check_stack(true, |d| {
        Arc::new(QosDevice::new(file(d), Qos::new(qos_limits()).unwrap()))
    });
}

#[test]
fn qos_over_debuglog_over_crypt_over_mem_device() {
    let mem = Arc::new(MemDevice::new((DISK / 512) as u64));
    check_stack(false, |d| {
        let crypt = Arc::new(CryptDevice::new(mem, xts()));
        let log = Arc::new(DebugLogDevice::new(crypt, &d.join("io.log")).unwrap());
        Arc::new(QosDevice::new(log, Qos::new(qos_limits()).unwrap()))
    });
}
