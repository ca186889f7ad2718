//! The region against a model of a split ring, killed between every two stores.

use super::*;
use std::sync::Arc;

const SIZE: u16 = 8;

/// What the guest sees of one queue: the heads it made available, the used ring.
#[derive(Clone, Default)]
struct Guest {
    avail: Vec<u16>,
    used: Vec<u16>,
}

impl Guest {
    fn used_idx(&self) -> u16 {
        self.used.len() as u16
    }

    /// The guest driver's check of a used entry: the head is one it has outstanding.
    fn outstanding(&self) -> Vec<u16> {
        let mut out = self.avail.clone();
        for h in &self.used {
            let i = out
                .iter()
                .position(|x| x == h)
                .unwrap_or_else(|| panic!("head {h} completed but not outstanding: {self:?}"));
            out.remove(i);
        }
        out
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "avail {:?} used {:?}", self.avail, self.used)
    }
}

/// One backend process: its avail position and the heads it took and has not completed.
struct Process {
    track: QueueTrack,
    next_avail: u16,
    taken: Vec<u16>,
}

impl Process {
    fn start(region: &Arc<Region>, guest: &Guest) -> Process {
        let mut track = QueueTrack::default();
        track.attach(Some(region.clone()), 0);
        let r = track.recover(guest.used_idx(), SIZE).expect("a region");
        Process {
            track,
            // Without a position from the region, QEMU's: the used index.
            next_avail: r.next_avail.unwrap_or(guest.used_idx()),
            taken: r.resubmit,
        }
    }

    fn pop(&mut self, guest: &Guest) -> bool {
        let Some(&head) = guest.avail.get(usize::from(self.next_avail)) else {
            return false;
        };
        self.next_avail += 1;
        self.track.take(head);
        self.taken.push(head);
        true
    }

    /// Completes the `i`th request taken (out of order unless i == 0).
    fn complete(&mut self, i: usize, guest: &mut Guest) {
        let head = self.taken.remove(i % self.taken.len());
        let _ = self.track.publish(head, || {
            // The used element is invisible until the index store that follows it: one store.
            if crash::survives() {
                guest.used.push(head);
                Ok(guest.used_idx())
            } else {
                Err(())
            }
        });
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// The guest makes a head available.
    Submit(u16),
    Pop,
    /// Completes the nth request in flight.
    Complete(usize),
}

/// Runs `ops` in a process over `guest` and the region.
fn run(region: &Arc<Region>, guest: &mut Guest, ops: &[Op]) -> Process {
    let mut p = Process::start(region, guest);
    for op in ops {
        match *op {
            Op::Submit(h) => guest.avail.push(h),
            Op::Pop => {
                p.pop(guest);
            }
            Op::Complete(i) => {
                if !p.taken.is_empty() {
                    p.complete(i, guest);
                }
            }
        }
    }
    p
}

/// After a crash: a new process must resubmit exactly the outstanding heads it will not find
/// on the avail ring, oldest first, and resume the avail ring right after them.
fn check_recovery(region: &Arc<Region>, guest: &Guest, ctx: &str) -> Process {
    let outstanding = guest.outstanding();
    let p = Process::start(region, guest);
    let fresh = &guest.avail[usize::from(p.next_avail).min(guest.avail.len())..];
    let mut will_complete: Vec<u16> = p.taken.iter().chain(fresh).copied().collect();
    will_complete.sort_unstable();
    let mut want = outstanding.clone();
    want.sort_unstable();
    assert_eq!(
        will_complete, want,
        "{ctx}: resubmit {:?} + avail from {} must be the outstanding {outstanding:?} ({guest:?})",
        p.taken, p.next_avail
    );
    // Oldest first: in the order the guest made them available.
    let order: Vec<usize> = p
        .taken
        .iter()
        .map(|h| guest.avail.iter().rposition(|a| a == h).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{ctx}: order {:?}",
        p.taken
    );
    p
}

/// Completes everything the guest has outstanding with a healthy process.
fn finish(mut p: Process, guest: &mut Guest) {
    while p.pop(guest) {}
    while !p.taken.is_empty() {
        p.complete(0, guest);
    }
    assert!(guest.outstanding().is_empty(), "{guest:?}");
    let part = p.track.part().unwrap();
    assert!((0..SIZE).all(|h| !part.is_inflight(h)), "region not clear");
    assert_eq!(part.used_idx(), guest.used_idx());
}

fn fresh_region() -> Arc<Region> {
    Arc::new(Region::create(1, SIZE).unwrap().0)
}

/// Kills the process after every possible number of stores (and again during the recovery
/// and the work that follows it), then checks the next process completes every request
/// exactly once.
fn crash_everywhere(ops: &[Op]) {
    // Count the stores of an uninterrupted run.
    crash::set_budget(Some(usize::MAX));
    let mut g = Guest::default();
    run(&fresh_region(), &mut g, ops);
    let total = usize::MAX - crash::remaining();
    crash::set_budget(None);
    for k in 0..=total {
        for second in [None, Some(0), Some(1), Some(2), Some(3)] {
            let region = fresh_region();
            let mut guest = Guest::default();
            crash::set_budget(Some(k));
            drop(run(&region, &mut guest, ops));
            crash::set_budget(None);
            let ctx = format!("{ops:?} killed after {k} stores");
            let p = check_recovery(&region, &guest, &ctx);
            if let Some(k2) = second {
                // Killed again while resuming: one pop and one completion, then a restart.
                drop(p);
                crash::set_budget(Some(k2));
                let mut p = Process::start(&region, &guest);
                p.pop(&guest);
                if !p.taken.is_empty() {
                    p.complete(p.taken.len() - 1, &mut guest);
                }
                drop(p);
                crash::set_budget(None);
                let ctx = format!("{ctx}, then after {k2} more");
                finish(check_recovery(&region, &guest, &ctx), &mut guest);
            } else {
                finish(p, &mut guest);
            }
        }
    }
}

#[test]
fn in_order_completions_survive_a_kill_anywhere() {
    use Op::*;
    crash_everywhere(&[
        Submit(0),
        Submit(1),
        Pop,
        Pop,
        Complete(0),
        Submit(2),
        Pop,
        Complete(0),
        Complete(0),
    ]);
}

#[test]
fn the_out_of_order_hole_survives_a_kill_anywhere() {
    use Op::*;
    // Head 0 is parked (a slow fetch) while 1, 2 and 3 complete after it.
    crash_everywhere(&[
        Submit(0),
        Submit(1),
        Submit(2),
        Submit(3),
        Pop,
        Pop,
        Pop,
        Pop,
        Complete(1),
        Complete(2),
        Complete(1),
        Submit(4),
        Pop,
    ]);
}

#[test]
fn reused_heads_survive_a_kill_anywhere() {
    use Op::*;
    // The guest reuses head 1 as soon as it sees it completed, while head 0 is still parked.
    crash_everywhere(&[
        Submit(0),
        Submit(1),
        Pop,
        Pop,
        Complete(1),
        Submit(1),
        Pop,
        Complete(2),
        Submit(1),
        Pop,
        Complete(1),
    ]);
}

#[test]
fn random_schedules_survive_a_kill_anywhere() {
    // A small xorshift: the same schedules on every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..20 {
        let mut ops = Vec::new();
        let mut free: Vec<u16> = (0..SIZE).collect();
        let mut avail = 0;
        let mut popped = 0;
        let mut inflight = 0;
        for _ in 0..14 {
            match next(3) {
                0 if !free.is_empty() => {
                    let h = free.remove(next(free.len() as u64) as usize);
                    avail += 1;
                    ops.push(Op::Submit(h));
                }
                1 if popped < avail => {
                    popped += 1;
                    inflight += 1;
                    ops.push(Op::Pop);
                }
                _ if inflight > 0 => {
                    // Any of the requests in flight, in any order (heads are not reused here;
                    // reused_heads_survive_a_kill_anywhere covers that).
                    inflight -= 1;
                    ops.push(Op::Complete(next(inflight as u64 + 1) as usize));
                }
                _ => {}
            }
        }
        crash_everywhere(&ops);
    }
}

#[test]
fn a_fresh_region_starts_at_the_used_index() {
    let region = fresh_region();
    let mut t = QueueTrack::default();
    t.attach(Some(region.clone()), 0);
    assert!(t.needs_recovery());
    let r = t.recover(7, SIZE).unwrap();
    assert_eq!(
        r,
        Recovery {
            next_avail: None,
            resubmit: vec![]
        }
    );
    assert!(!t.needs_recovery());
    assert_eq!(region.queue(0).unwrap().version(), VERSION);
}

#[test]
fn without_a_region_nothing_is_tracked() {
    let mut t = QueueTrack::default();
    t.take(3);
    let mut published = false;
    t.publish(3, || {
        published = true;
        Ok::<_, ()>(1)
    })
    .unwrap();
    assert!(published);
    assert_eq!(t.recover(0, SIZE), None);
}

#[test]
fn heads_outside_the_region_are_not_tracked_nor_resubmitted() {
    let region = Arc::new(Region::create(1, 4).unwrap().0);
    let mut t = QueueTrack::default();
    t.attach(Some(region.clone()), 0);
    t.recover(0, 8);
    t.take(6); // beyond the 4 the frontend announced: ignored, no out-of-bounds store
    t.take(2);
    let mut t2 = QueueTrack::default();
    t2.attach(Some(region), 0);
    // The ring is 2 entries here: head 2 cannot be resubmitted on it.
    assert_eq!(t2.recover(0, 2).unwrap().resubmit, Vec::<u16>::new());
}

/// A memfd of `len` bytes, sealed against shrinking if `sealed`.
fn memfd(len: u64, sealed: bool) -> File {
    // SAFETY: a valid C string; the result is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a descriptor memfd_create just returned.
    let f = unsafe { <File as FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    if sealed {
        // SAFETY: plain fcntl on our descriptor.
        let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
    }
    f
}

#[test]
fn hostile_geometry_and_sizes_are_errors() {
    assert!(Region::create(0, 8).is_err());
    assert!(Region::create(1, 0).is_err());
    assert!(Region::create(1, 40000).is_err());
    let (_, file) = Region::create(2, 8).unwrap();
    let size = 2 * queue_region_size(8);
    assert!(Region::map(&file, size, 0, 2, 8).is_ok());
    // Claims more queues, or bigger ones, than the file holds.
    assert!(Region::map(&file, size, 0, 3, 8).is_err());
    assert!(Region::map(&file, size * 4, 0, 2, 32).is_err());
    // A size too small for the queues it announces.
    assert!(Region::map(&file, size - 1, 0, 2, 8).is_err());
    // Offsets past the end, overflowing, or misaligned.
    assert!(Region::map(&file, size, size, 2, 8).is_err());
    assert!(Region::map(&file, size, u64::MAX - 8, 2, 8).is_err());
    let big = memfd(2 * size + 8, true);
    assert!(Region::map(&big, size, 3, 2, 8).is_err());
    assert!(Region::map(&big, size, 8, 2, 8).is_ok());
    // A file the frontend could shrink under the mapping (SIGBUS): a plain file, an unsealed
    // memfd.
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(size).unwrap();
    assert!(Region::map(&plain, size, 0, 2, 8).is_err());
    assert!(Region::map(&memfd(size, false), size, 0, 2, 8).is_err());
    // Not a file at all.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let sock = File::from(std::os::fd::OwnedFd::from(a));
    assert!(Region::map(&sock, size, 0, 2, 8).is_err());
}

#[test]
fn chains_are_walked_like_virtio_queue() {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryMmap;
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let vq = MockSplitQueue::new(&m, 16);
    let descs = [
        RawDescriptor::from(Descriptor::new(0x1000, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x2000, 512, 2, 0)),
        RawDescriptor::from(Descriptor::new(0x3000, 1, 2, 0)),
    ];
    vq.build_desc_chain(&descs).unwrap();
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&m).unwrap();
    let head = chain.head_index();
    let want: Vec<(u64, u32)> = chain.map(|d| (d.addr().0, d.len())).collect();
    let got: Vec<(u64, u32)> = chain_descriptors(&m, GuestAddress(q.desc_table()), 16, head)
        .iter()
        .map(|d| (d.addr().0, d.len()))
        .collect();
    assert_eq!(got, want);
    // Heads out of the table, and tables out of memory, give nothing rather than a fault.
    assert!(chain_descriptors(&m, GuestAddress(q.desc_table()), 16, 16).is_empty());
    assert!(chain_descriptors(&m, GuestAddress(u64::MAX - 8), 16, 0).is_empty());
}

/// The data path's cost of tracking per request: `take` and `publish` (the three region stores
/// around the used entry) with a region, and without one (a frontend that did not negotiate
/// INFLIGHT_SHMFD). A measurement, not a check: `cargo test --release --lib tracking_cost --
/// --ignored --nocapture`. Test builds count stores for the crash tests (a thread-local per
/// store), so this slightly overstates the release binary's cost.
#[test]
#[ignore]
fn tracking_cost() {
    const N: u32 = 4_000_000;
    let region = Arc::new(Region::create(1, 256).unwrap().0);
    for tracked in [false, true, false, true] {
        let mut t = QueueTrack::default();
        if tracked {
            t.attach(Some(region.clone()), 0);
            t.recover(0, 256);
        }
        let mut used = 0u16;
        let start = std::time::Instant::now();
        for i in 0..N {
            let head = (i % 256) as u16;
            t.take(head);
            t.publish(head, || {
                used = used.wrapping_add(1);
                Ok::<_, ()>(std::hint::black_box(used))
            })
            .unwrap();
        }
        let ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(N);
        eprintln!("tracked {tracked}: {ns:.1} ns per request (take + publish)");
    }
}
