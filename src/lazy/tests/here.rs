//! A queue's worker fetching a lone demand read's stripe itself (`LazyChannel::fetch_here`),
//! and when it must leave the stripe to the fetcher pool instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{on_disk_at, open_memory, read, settle, write, SHIFT, STRIPE, STRIPES};
use crate::block::{BlockDevice, FileDevice, IoBuf, IoChannel, IoOp};
use crate::lazy::testing::{Fault, MemSource};
use crate::lazy::{LazyDevice, Metadata};

const S: u64 = (STRIPE / 512) as u64;

fn image() -> Vec<u8> {
    (0..STRIPE * STRIPES).map(|i| (i % 253) as u8).collect()
}

/// A zeroed base disk and fresh metadata in `dir`; the layer over them with [`image`] in a
/// [`MemSource`] that offers `read_now`.
fn disk(dir: &Path) -> (LazyDevice, std::sync::Arc<MemSource>, PathBuf, PathBuf) {
    let base = dir.join("base");
    std::fs::write(&base, vec![0; STRIPE * STRIPES]).unwrap();
    let meta = dir.join("meta");
    Metadata::new((STRIPE * STRIPES / 512) as u64, SHIFT)
        .unwrap()
        .write_to(&std::fs::File::create(&meta).unwrap(), None)
        .unwrap();
    let inner: std::sync::Arc<dyn BlockDevice> =
        std::sync::Arc::new(FileDevice::open(&base, false, 64).unwrap());
    let (device, source) = open_memory(inner, image(), &meta, false);
    source.offer_read_now();
    (device, source, base, meta)
}

/// Submits a 4 KiB read at `sector` (id 1) without waiting for it.
fn start_read(ch: &mut dyn IoChannel, sector: u64) {
    ch.add(
        1,
        IoOp::Read {
            sector,
            buf: IoBuf::new(4096),
        },
    );
    ch.submit().unwrap();
}

/// Waits for the read [`start_read`] submitted; its bytes (it must have succeeded).
fn finish_read(ch: &mut dyn IoChannel) -> Vec<u8> {
    let mut out = Vec::new();
    while out.is_empty() {
        ch.wait().unwrap();
        ch.poll(&mut out);
    }
    assert_eq!(out[0].result, Ok(()));
    out[0].buf.as_ref().unwrap().to_vec()
}

/// The stripes `read_now` was asked for, in order.
fn now_stripes(source: &MemSource) -> Vec<u64> {
    source.now_reads().iter().map(|r| r.0).collect()
}

fn stripe_of(data: &[u8], stripe: usize) -> &[u8] {
    &data[stripe * STRIPE..(stripe + 1) * STRIPE]
}

/// With nothing else fetching, the read is fetched on the thread that submitted it (the
/// queue's worker), not by a fetcher; the pool then stores the stripe as any demand fetch's.
#[test]
fn a_lone_demand_read_is_fetched_on_the_queues_own_thread_and_stored_by_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source, base, meta) = disk(dir.path());
    let image = image();
    let mut ch = device.new_channel().unwrap();
    let got = read(&mut *ch, S + 8, 4096);
    assert_eq!(got, image[STRIPE + 4096..STRIPE + 8192]);
    assert_eq!(source.now_reads(), vec![(1, std::thread::current().id())]);
    assert_eq!(source.reads(1), 0, "a fetcher read the stripe again");
    settle(&device);
    assert!(on_disk_at(&meta).is_fetched(1));
    let disk = std::fs::read(&base).unwrap();
    assert_eq!(stripe_of(&disk, 1), stripe_of(&image, 1));
    // Fetched: a write now goes straight down, and reads see it.
    write(&mut *ch, S, &[7; 512]).unwrap();
    assert_eq!(read(&mut *ch, S, 512), vec![7; 512]);
    assert_eq!(source.now_reads().len(), 1);
}

/// While another fetch runs, a demand read goes to the pool, which runs fetches side by side
/// (a worker fetching them one after another would serialize them).
#[test]
fn a_demand_read_beside_a_running_fetch_goes_to_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source, _, _) = disk(dir.path());
    let image = image();
    source.set(2, Fault::Delay(Duration::from_millis(500)));
    source.fail_now(libc::EIO);
    // Fails here (a pause follows: cleared below), so stripe 2 goes to the slow pool fetch.
    let mut slow = device.new_channel().unwrap();
    start_read(&mut *slow, 2 * S);
    *device.shared.here_paused_until.lock().unwrap() = None;
    source.fail_now(0);
    let mut ch = device.new_channel().unwrap();
    assert_eq!(
        read(&mut *ch, 3 * S, 4096),
        image[3 * STRIPE..3 * STRIPE + 4096]
    );
    let asked = now_stripes(&source);
    assert_eq!(
        asked,
        vec![2],
        "stripe 3 was fetched beside a running fetch"
    );
    assert_eq!(source.reads(3), 1);
    assert_eq!(
        finish_read(&mut *slow),
        image[2 * STRIPE..2 * STRIPE + 4096]
    );
}

/// A worker's own fetch that fails costs the read nothing (the pool fetches it, with its
/// retries), and workers leave the next fetches to the pool for a while.
#[test]
fn a_failed_own_fetch_is_left_to_the_pool_and_pauses_own_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source, _, meta) = disk(dir.path());
    let image = image();
    source.fail_now(libc::ETIMEDOUT);
    let mut ch = device.new_channel().unwrap();
    assert_eq!(read(&mut *ch, S, 4096), image[STRIPE..STRIPE + 4096]);
    assert_eq!(source.reads(1), 1);
    settle(&device);
    assert!(on_disk_at(&meta).is_fetched(1));
    source.fail_now(0);
    assert_eq!(
        read(&mut *ch, 4 * S, 4096),
        image[4 * STRIPE..4 * STRIPE + 4096]
    );
    assert_eq!(source.reads(4), 1);
    let asked = now_stripes(&source);
    assert_eq!(asked, vec![1], "fetched on the worker during the pause");
}

/// A disk handed to another process (a live migration's source) fetches nothing, on a
/// worker neither: the other process may have written the stripe.
#[test]
fn a_handed_over_disk_fetches_nothing_on_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source, _, _) = disk(dir.path());
    device.hand_over();
    let mut ch = device.new_channel().unwrap();
    start_read(&mut *ch, 5 * S);
    std::thread::sleep(Duration::from_millis(50));
    let mut out = Vec::new();
    ch.poll(&mut out);
    assert!(out.is_empty(), "a read completed on a handed-over disk");
    assert!(source.now_reads().is_empty());
    assert_eq!(source.reads(5), 0);
    device.take_over().unwrap();
    assert_eq!(
        finish_read(&mut *ch),
        image()[5 * STRIPE..5 * STRIPE + 4096]
    );
}

/// An own fetch that succeeds but slowly (a far source) pauses own fetches as a failed one:
/// the next lone read goes to the pool.
#[test]
fn a_slow_own_fetch_pauses_own_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let (device, source, _, _) = disk(dir.path());
    let image = image();
    source.set(1, Fault::Delay(Duration::from_millis(8)));
    let mut ch = device.new_channel().unwrap();
    assert_eq!(read(&mut *ch, S, 4096), image[STRIPE..STRIPE + 4096]);
    assert_eq!(source.reads(1), 0, "the pool read it again");
    settle(&device);
    assert_eq!(
        read(&mut *ch, 6 * S, 4096),
        image[6 * STRIPE..6 * STRIPE + 4096]
    );
    assert_eq!(source.reads(6), 1);
    let asked = now_stripes(&source);
    assert_eq!(
        asked,
        vec![1],
        "fetched on the worker after a slow own fetch"
    );
}
