//! Growing a lazy disk (`lazy::grow`): the metadata first, with the new stripes fetched and
//! kept so by every later save; then the disk; then the stripe table.

use super::*;
use crate::lazy::persist::{MetaFile, MetaStore};
use crate::lazy::states::StripeStates;
use crate::lazy::GrowError;

/// Old disk: 8 stripes and 10 sectors (9 stripes, the last partial); new: 12 stripes and 5
/// sectors (13 stripes).
const OLD: u64 = 8 * 64 + 10;
const NEW: u64 = 12 * 64 + 5;

fn read_md(meta: &Path, sectors: u64) -> Metadata {
    Metadata::read_from(&std::fs::File::open(meta).unwrap(), sectors, None).unwrap()
}

/// A base file of [`OLD`] sectors of 0xee, fresh metadata, and a source ending inside the
/// partial last stripe.
fn setup(dir: &Path, image_len: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    let (base, meta) = (dir.join("base"), dir.join("meta"));
    std::fs::write(&base, vec![0xee; OLD as usize * 512]).unwrap();
    Metadata::new(OLD, SHIFT)
        .unwrap()
        .write_to(&std::fs::File::create(&meta).unwrap(), None)
        .unwrap();
    let image = (0..image_len).map(|i| (i % 251) as u8 | 1).collect();
    (base, meta, image)
}

/// Waits until `device` has `n` stripes fetched (a read may be served from a fetch's staged
/// copy before the fetch is saved).
fn wait_fetched(device: &LazyDevice, n: usize) {
    let t0 = std::time::Instant::now();
    while device.status().fetched < n {
        assert!(t0.elapsed().as_secs() < 10, "{n} stripes never fetched");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn a_grown_disk_reads_zeros_past_the_image_and_a_save_never_unmarks_the_new_stripes() {
    let dir = tempfile::tempdir().unwrap();
    let image_len = 8 * STRIPE + 3 * 512 + 100;
    let (base, meta, image) = setup(dir.path(), image_len);
    let file = FileDevice::open(&base, false, 64).unwrap();
    let capacity = file.capacity();
    let (device, source) = open_memory(Arc::new(file), image.clone(), &meta, true);
    let mut ch = device.new_channel().unwrap();

    device.begin_grow(OLD, NEW).unwrap();
    // On the file: the new stripes fetched, the partial old one not; a start at the old
    // size accepts it (a grow that did not finish).
    let md = read_md(&meta, NEW);
    assert_eq!(md.fetched_ranges(), vec![(9, 12)]);
    assert_eq!(read_md(&meta, OLD).stripe_count(), 9);
    // A fetch now saves the sector holding the new stripes' bytes: they stay fetched.
    read(&mut *ch, 2 * 64, 512);
    wait_fetched(&device, 1);
    assert_eq!(read_md(&meta, NEW).fetched_ranges(), vec![(2, 2), (9, 12)]);

    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(NEW * 512)
        .unwrap();
    device.finish_grow(NEW);
    capacity.grow(NEW);
    let st = device.status();
    assert_eq!((st.stripes, st.fetched, st.complete), (13, 5, false));

    // The old partial stripe: the image, then zeros (fetched whole now); the new area: zeros.
    let got = read(&mut *ch, 8 * 64, ((NEW - 8 * 64) * 512) as usize);
    let mut want = image[8 * STRIPE..].to_vec();
    want.resize(got.len(), 0);
    assert!(got == want, "the grown end differs");
    for s in 9..13 {
        assert_eq!(source.reads(s), 0, "stripe {s} read from the source");
    }
    // The new area is writable without a fetch, and its WRITTEN bit persists.
    let (r, _) = run_sync(
        &mut *ch,
        IoOp::Write {
            sector: 11 * 64 + 1,
            buf: buf_of(&[0x5a; 1024]),
        },
    );
    r.unwrap();
    run_sync(&mut *ch, IoOp::Flush).0.unwrap();
    assert_eq!(read(&mut *ch, 11 * 64 + 1, 1024), vec![0x5a; 1024]);
    let md = read_md(&meta, NEW);
    assert_eq!(md.stripes[11], FETCHED | WRITTEN);
    assert_eq!(md.fetched_ranges(), vec![(2, 2), (8, 12)]);
    assert_eq!(source.reads(11), 0);
}

#[test]
fn an_aborted_grow_is_forgotten_by_the_next_save() {
    let dir = tempfile::tempdir().unwrap();
    let (base, meta, image) = setup(dir.path(), 4 * STRIPE);
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&base, false, 64).unwrap());
    let (device, _source) = open_memory(file, image, &meta, true);
    device.begin_grow(OLD, NEW).unwrap();
    device.abort_grow();
    let mut ch = device.new_channel().unwrap();
    read(&mut *ch, 0, 512);
    wait_fetched(&device, 1);
    assert_eq!(read_md(&meta, NEW).fetched_ranges(), vec![(0, 0)]);
    assert_eq!(device.status().stripes, 9);
}

#[test]
fn an_image_larger_than_the_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, meta, image) = setup(dir.path(), OLD as usize * 512 + 1);
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&base, false, 64).unwrap());
    let (device, _source) = open_memory(file, image, &meta, true);
    let e = device.begin_grow(OLD, NEW).unwrap_err();
    assert!(matches!(e, GrowError::ImageLarger { .. }), "{e}");
    assert_eq!(std::fs::metadata(&meta).unwrap().len(), 1024);
}

/// The metadata cannot be written (here: opened readonly): the error is answered, the file
/// and the in-memory states stay as they were.
#[test]
fn a_metadata_write_failing_leaves_everything_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, meta, _) = setup(dir.path(), 0);
    let before = std::fs::read(&meta).unwrap();
    let md = read_md(&meta, OLD);
    let states = StripeStates::new(&md, OLD);
    let store = MetaStore::new(MetaFile {
        file: std::fs::File::open(&meta).unwrap(),
        xts: None,
    });
    assert!(store.begin_grow(&states, 13).is_err());
    assert_eq!(std::fs::read(&meta).unwrap(), before);
    assert_eq!(states.encode_sector(1), [0; 512]);
    assert_eq!(states.count(), 9);
}

/// Growing past one chunk of the table allocates the next; the old chunk stays where it was.
#[test]
fn the_table_grows_across_chunks() {
    let md = Metadata::new(10 << SHIFT, SHIFT).unwrap();
    let states = StripeStates::new(&md, 10 << SHIFT);
    let first: *const StripeStates = &states;
    let stripes = (1usize << 20) + 10;
    states.grow((stripes as u64) << SHIFT);
    assert_eq!(states.count(), stripes);
    assert_eq!(states.fetched_count(), stripes - 10);
    assert!(!states.is_fetched(9) && states.is_fetched(10) && states.is_fetched(stripes - 1));
    assert_eq!(states.disk_sectors(), (stripes as u64) << SHIFT);
    assert!(std::ptr::eq(first, &states));
}
