//! Test helpers: [`MemDevice`], an in-memory device that can fail or delay chosen operations,
//! and [`check_stack`], the checks every stack of layers must pass.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{
    run_sync, BlockDevice, Completion, IoBuf, IoChannel, IoOp, IoVecs, Notifier, SECTOR_SHIFT,
    SECTOR_SIZE,
};

/// What a [`MemDevice`] does to an operation a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Completes with this errno without touching the data.
    Fail(i32),
    /// Completes this long after it was submitted (later operations may overtake it).
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    ReadVec,
    WriteVec,
    Flush,
    Discard,
    WriteZeroes,
}

/// An operation as a [`MemDevice`] received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Position among all operations added to the device's channels, from 0.
    pub seq: u64,
    pub kind: Kind,
    pub sector: u64,
    /// Length in sectors (rounded down); 0 for a flush.
    pub sectors: u64,
}

type Rule = (Box<dyn Fn(&Seen) -> bool + Send>, Fault);

#[derive(Default)]
struct State {
    data: Vec<u8>,
    seen: Vec<Seen>,
    rules: Vec<Rule>,
}

/// A disk in a `Vec<u8>`. Each channel runs its operations on a thread of its own, which
/// signals the channel's notifier as they finish: completions arrive asynchronously, as from
/// io_uring. It takes vectors of whole sectors at any address.
#[derive(Clone)]
pub struct MemDevice {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemDevice {
    pub fn new(sectors: u64) -> Self {
        let state = State {
            data: vec![0; (sectors << SECTOR_SHIFT) as usize],
            ..State::default()
        };
        MemDevice {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Applies `fault` to every later operation `when` matches (the first matching rule wins).
    pub fn on(&self, when: impl Fn(&Seen) -> bool + Send + 'static, fault: Fault) {
        lock(&self.state).rules.push((Box::new(when), fault));
    }

    /// Applies `fault` to operation number `seq` (see [`Seen::seq`]).
    pub fn on_nth(&self, seq: u64, fault: Fault) {
        self.on(move |s| s.seq == seq, fault);
    }

    /// Every operation added so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }

    pub fn contents(&self) -> Vec<u8> {
        lock(&self.state).data.clone()
    }
}

impl BlockDevice for MemDevice {
    fn sectors(&self) -> u64 {
        (lock(&self.state).data.len() >> SECTOR_SHIFT) as u64
    }

    fn new_channel_with(&self, notifier: Notifier) -> std::io::Result<Box<dyn IoChannel>> {
        let (jobs, rx) = mpsc::channel();
        let done = Arc::new(Done::default());
        let thread = {
            let (state, done, notifier) = (self.state.clone(), done.clone(), notifier.clone());
            std::thread::Builder::new()
                .name("mem-device".into())
                .spawn(move || run_jobs(&state, rx, &done, &notifier))?
        };
        Ok(Box::new(MemChannel {
            state: self.state.clone(),
            notifier,
            added: Vec::new(),
            jobs: Some(jobs),
            done,
            in_flight: 0,
            thread: Some(thread),
        }))
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn iovec_align(&self) -> Option<usize> {
        Some(SECTOR_SIZE)
    }
}

struct Job {
    id: u64,
    op: IoOp,
    fault: Option<Fault>,
    due: Instant,
}

/// Finished operations, handed from a channel's thread to the channel.
#[derive(Default)]
struct Done {
    list: Mutex<Vec<Completion>>,
    cond: Condvar,
}

struct MemChannel {
    state: Arc<Mutex<State>>,
    notifier: Notifier,
    /// Added, not yet submitted.
    added: Vec<Job>,
    jobs: Option<Sender<Job>>,
    done: Arc<Done>,
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
}

fn seen(seq: u64, op: &IoOp) -> Seen {
    let sectors = |bytes: usize| (bytes >> SECTOR_SHIFT) as u64;
    let (kind, sector, sectors) = match op {
        IoOp::Read { sector, buf } => (Kind::Read, *sector, sectors(buf.len())),
        IoOp::Write { sector, buf } => (Kind::Write, *sector, sectors(buf.len())),
        IoOp::ReadVec { sector, iov } => (Kind::ReadVec, *sector, sectors(iov.len())),
        IoOp::WriteVec { sector, iov } => (Kind::WriteVec, *sector, sectors(iov.len())),
        IoOp::Flush => (Kind::Flush, 0, 0),
        IoOp::Discard { sector, sectors } => (Kind::Discard, *sector, *sectors),
        IoOp::WriteZeroes { sector, sectors } => (Kind::WriteZeroes, *sector, *sectors),
    };
    Seen {
        seq,
        kind,
        sector,
        sectors,
    }
}

impl IoChannel for MemChannel {
    fn add(&mut self, id: u64, op: IoOp) {
        let mut state = lock(&self.state);
        let seen = seen(state.seen.len() as u64, &op);
        state.seen.push(seen);
        let fault = state
            .rules
            .iter()
            .find(|(when, _)| when(&seen))
            .map(|r| r.1);
        drop(state);
        self.in_flight += 1;
        self.added.push(Job {
            id,
            op,
            fault,
            due: Instant::now(),
        });
    }

    fn submit(&mut self) -> std::io::Result<()> {
        let now = Instant::now();
        for mut job in self.added.drain(..) {
            job.due = match job.fault {
                Some(Fault::Delay(d)) => now + d,
                _ => now,
            };
            if let Some(jobs) = &self.jobs {
                let _ = jobs.send(job);
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        let mut done = self.done.list.lock().unwrap();
        self.in_flight -= done.len();
        out.append(&mut done);
    }

    fn wait(&mut self) -> std::io::Result<()> {
        self.submit()?;
        let mut done = self.done.list.lock().unwrap();
        while done.is_empty() && self.in_flight > 0 {
            done = self.done.cond.wait(done).unwrap();
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

impl Drop for MemChannel {
    fn drop(&mut self) {
        // The thread finishes what it was given, then sees the sender gone.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A channel's thread: runs jobs when they are due, earliest first.
fn run_jobs(state: &Mutex<State>, rx: Receiver<Job>, done: &Done, notifier: &Notifier) {
    let mut pending: Vec<Job> = Vec::new();
    let mut open = true;
    while open || !pending.is_empty() {
        let next = pending.iter().map(|j| j.due).min();
        let received = match next {
            _ if !open => None,
            None => rx.recv().ok(),
            Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            },
        };
        match received {
            Some(job) => pending.push(job),
            None if next.is_none() => open = false,
            None => {}
        }
        let now = Instant::now();
        while let Some(i) = pending.iter().position(|j| j.due <= now) {
            let job = pending.swap_remove(i);
            let c = execute(&mut lock(state).data, job);
            done.list.lock().unwrap().push(c);
            done.cond.notify_all();
            notifier.notify();
        }
        if !open && !pending.is_empty() {
            // Disconnected: no more jobs, only the delayed ones to wait for.
            if let Some(due) = pending.iter().map(|j| j.due).min() {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
    }
}

/// Runs one operation on `data`.
fn execute(data: &mut [u8], job: Job) -> Completion {
    let Job { id, op, fault, .. } = job;
    let result = match (target(&op, data.len()), fault) {
        (Ok(_), Some(Fault::Fail(errno))) => Err(errno),
        (r, _) => r,
    };
    let mut buf = None;
    match (op, &result) {
        (IoOp::Read { buf: mut b, .. }, Ok(r)) => {
            b.copy_from_slice(&data[r.clone()]);
            buf = Some(b);
        }
        (IoOp::Write { buf: b, .. }, Ok(r)) => {
            data[r.clone()].copy_from_slice(&b);
            buf = Some(b);
        }
        (IoOp::Read { buf: b, .. } | IoOp::Write { buf: b, .. }, Err(_)) => buf = Some(b),
        (IoOp::ReadVec { iov, .. }, Ok(r)) => copy_vecs(&iov, &mut data[r.clone()], false),
        (IoOp::WriteVec { iov, .. }, Ok(r)) => copy_vecs(&iov, &mut data[r.clone()], true),
        (IoOp::Discard { .. } | IoOp::WriteZeroes { .. }, Ok(r)) => data[r.clone()].fill(0),
        _ => {}
    }
    Completion {
        id,
        result: result.map(|_| ()),
        buf,
    }
}

/// The bytes `op` covers in a disk of `len` bytes: EIO out of range, EINVAL for partial
/// sectors.
fn target(op: &IoOp, len: usize) -> Result<std::ops::Range<usize>, i32> {
    let (sector, bytes) = match op {
        IoOp::Read { sector, buf } | IoOp::Write { sector, buf } => (*sector, buf.len()),
        IoOp::ReadVec { sector, iov } | IoOp::WriteVec { sector, iov } => {
            if iov.as_slice().iter().any(|v| v.iov_len % SECTOR_SIZE != 0) {
                return Err(libc::EINVAL);
            }
            (*sector, iov.len())
        }
        IoOp::Discard { sector, sectors } | IoOp::WriteZeroes { sector, sectors } => {
            (*sector, (sectors << SECTOR_SHIFT) as usize)
        }
        IoOp::Flush => (0, 0),
    };
    if bytes % SECTOR_SIZE != 0 {
        return Err(libc::EINVAL);
    }
    let start = usize::try_from(sector)
        .ok()
        .and_then(|s| s.checked_mul(SECTOR_SIZE));
    match start.and_then(|s| Some(s..s.checked_add(bytes)?)) {
        Some(r) if r.end <= len => Ok(r),
        _ => Err(libc::EIO),
    }
}

/// Copies between caller vectors and `data`, which is exactly as long as they are.
fn copy_vecs(iov: &IoVecs, data: &mut [u8], from_vecs: bool) {
    let mut off = 0;
    for v in iov.as_slice() {
        let ours = data[off..off + v.iov_len].as_mut_ptr();
        let theirs = v.iov_base.cast::<u8>();
        // SAFETY: IoVecs guarantees each vector is valid for `iov_len` bytes while it lives;
        // ours has `iov_len` bytes left (the total was checked); caller memory is not ours.
        unsafe {
            if from_vecs {
                std::ptr::copy_nonoverlapping(theirs, ours, v.iov_len);
            } else {
                std::ptr::copy_nonoverlapping(ours, theirs, v.iov_len);
            }
        }
        off += v.iov_len;
    }
}

/// `len` bytes of a pattern that differs with `seed` and with the position.
pub fn pattern(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = ((i as u64 * 7 + (i >> 9) as u64) as u8).wrapping_add(seed) | 1;
    }
    b
}

/// Submits what was added to `ch` and returns every completion until nothing is in flight.
pub fn finish_all(ch: &mut dyn IoChannel) -> Vec<Completion> {
    ch.submit().unwrap();
    let mut done = Vec::new();
    while ch.in_flight() > 0 {
        ch.wait().unwrap();
        ch.poll(&mut done);
    }
    done
}

fn write(ch: &mut dyn IoChannel, sector: u64, data: IoBuf) {
    let (r, _) = run_sync(ch, IoOp::Write { sector, buf: data });
    assert_eq!(r, Ok(()), "write at sector {sector}");
}

fn read(ch: &mut dyn IoChannel, sector: u64, len: usize) -> IoBuf {
    let (r, buf) = run_sync(
        ch,
        IoOp::Read {
            sector,
            buf: IoBuf::new(len),
        },
    );
    assert_eq!(r, Ok(()), "read at sector {sector}");
    buf.expect("a read gives its buffer back")
}

/// Vectors over `mem` at `(offset, len)` pieces. Callers keep `mem` alive and untouched until
/// every operation using them has completed.
pub fn vecs(mem: &mut IoBuf, pieces: &[(usize, usize)]) -> IoVecs {
    let iov = pieces
        .iter()
        .map(|&(at, len)| libc::iovec {
            iov_base: mem[at..at + len].as_mut_ptr().cast(),
            iov_len: len,
        })
        .collect();
    // SAFETY: every caller keeps `mem` alive and untouched until the operation completed.
    unsafe { IoVecs::new(iov, Arc::new(())) }
}

/// The bytes of `mem` the pieces cover, in order.
fn gathered(mem: &IoBuf, pieces: &[(usize, usize)]) -> Vec<u8> {
    pieces
        .iter()
        .flat_map(|&(at, len)| mem[at..at + len].iter().copied())
        .collect()
}

/// Runs the same checks on the stack `make` builds (its files in the directory it is given):
/// what every [`BlockDevice`] promises, whatever its layers. `discard_zeroes`: discarded
/// sectors read back as zeros (the contract leaves them unspecified, e.g. under encryption).
/// Needs at least 4 MiB.
pub fn check_stack(discard_zeroes: bool, make: impl FnOnce(&Path) -> Arc<dyn BlockDevice>) {
    check_stack_with(discard_zeroes, Notifier::new, make)
}

/// [`check_stack`] on channels made with `notifier()`'s notifiers (e.g. [`Notifier::inline`]).
pub fn check_stack_with(
    discard_zeroes: bool,
    notifier: fn() -> std::io::Result<Notifier>,
    make: impl FnOnce(&Path) -> Arc<dyn BlockDevice>,
) {
    let dir = tempfile::tempdir().unwrap();
    let device = make(dir.path());
    let dev = device.as_ref();
    let end = dev.sectors();
    assert!(end >= 8192, "the suite needs 4 MiB");
    let new_channel = || dev.new_channel_with(notifier().unwrap()).unwrap();
    let mut ch = new_channel();
    let ch = ch.as_mut();

    // Round trips through our buffers, odd sizes and places included, up to the last sector.
    for (sector, len, seed) in [(0, 512, 1), (1, 4096, 2), (9, 1536, 3), (100, 65536, 4)]
        .into_iter()
        .chain([(end - 8, 4096, 5)])
    {
        write(ch, sector, pattern(len, seed));
        assert!(
            read(ch, sector, len)[..] == pattern(len, seed)[..],
            "at {sector}"
        );
    }
    // Another channel sees the data.
    let mut other = new_channel();
    assert!(read(other.as_mut(), 100, 65536)[..] == pattern(65536, 4)[..]);
    drop(other);

    check_vectors(dev, ch);

    assert_eq!(run_sync(ch, IoOp::Flush).0, Ok(()));

    // WRITE_ZEROES reads back zeros, also across several MiB (layers may split it).
    let (at, len) = (300u64, 64 * 512);
    write(ch, at, pattern(len, 6));
    let zeroes = |sector, sectors| IoOp::WriteZeroes { sector, sectors };
    assert_eq!(run_sync(ch, zeroes(at + 4, 8)).0, Ok(()));
    let got = read(ch, at, len);
    let want = pattern(len, 6);
    assert!(got[..2048] == want[..2048] && got[6144..] == want[6144..]);
    assert!(got[2048..6144].iter().all(|&b| b == 0));
    write(ch, 2000, pattern(1 << 20, 7));
    assert_eq!(run_sync(ch, zeroes(1000, 5000)).0, Ok(()));
    assert!(read(ch, 1000, 5000 * 512).iter().all(|&b| b == 0));

    // DISCARD succeeds and leaves its neighbours alone.
    write(ch, 400, pattern(len, 8));
    let discard = IoOp::Discard {
        sector: 408,
        sectors: 16,
    };
    assert_eq!(run_sync(ch, discard).0, Ok(()));
    let got = read(ch, 400, len);
    let want = pattern(len, 8);
    assert!(got[..4096] == want[..4096] && got[12288..] == want[12288..]);
    if discard_zeroes {
        assert!(got[4096..12288].iter().all(|&b| b == 0));
    }

    // Reads reaching past the end fail instead of making data up.
    for sector in [end - 1, end, end + 100] {
        let op = IoOp::Read {
            sector,
            buf: IoBuf::new(1024),
        };
        assert!(run_sync(ch, op).0.is_err(), "read at {sector} of {end}");
    }

    check_many_in_flight(ch);
    assert_eq!(ch.in_flight(), 0);
}

/// Vectors where the device takes them: aligned ones work both ways; unaligned ones are
/// either refused with EINVAL, leaving the data alone, or handled correctly.
fn check_vectors(dev: &dyn BlockDevice, ch: &mut dyn IoChannel) {
    let Some(align) = dev.iovec_align() else {
        return;
    };
    let mut mem = pattern(64 * 1024, 9);
    let sector = 600;
    let aligned = [(0, align), (4 * align, 2 * align), (2 * align, align)];
    let len = 4 * align;
    let sent = gathered(&mem, &aligned);
    let iov = vecs(&mut mem, &aligned);
    assert_eq!(run_sync(ch, IoOp::WriteVec { sector, iov }).0, Ok(()));
    assert!(read(ch, sector, len)[..] == sent[..]);
    write(ch, sector, pattern(len, 10));
    let iov = vecs(&mut mem, &aligned);
    assert_eq!(run_sync(ch, IoOp::ReadVec { sector, iov }).0, Ok(()));
    assert!(gathered(&mem, &aligned) == pattern(len, 10)[..]);

    // Misaligned address and lengths: two sectors in pieces of 511 and 513 bytes.
    let unaligned = [(1, 511), (8193, 513)];
    mem = pattern(mem.len(), 11);
    let sent = gathered(&mem, &unaligned);
    let iov = vecs(&mut mem, &unaligned);
    let mut want = pattern(1024, 10)[..1024].to_vec();
    match run_sync(ch, IoOp::WriteVec { sector, iov }).0 {
        Ok(()) => want = sent,
        Err(e) => assert_eq!(e, libc::EINVAL),
    }
    assert!(read(ch, sector, 1024)[..] == want[..]);
    let iov = vecs(&mut mem, &unaligned);
    match run_sync(ch, IoOp::ReadVec { sector, iov }).0 {
        Ok(()) => assert!(gathered(&mem, &unaligned) == want),
        Err(e) => assert_eq!(e, libc::EINVAL),
    }
}

/// Many operations in flight at once, reaped only when the notifier says so.
fn check_many_in_flight(ch: &mut dyn IoChannel) {
    let n = 96u64;
    let notifier = ch.notifier().clone();
    let run_all = |ch: &mut dyn IoChannel, ops: Vec<IoOp>| {
        for (id, op) in ops.into_iter().enumerate() {
            ch.add(id as u64, op);
        }
        let mut done = Vec::new();
        while done.len() < n as usize {
            ch.submit().unwrap();
            ch.poll(&mut done);
            if done.len() < n as usize {
                assert!(
                    notifier.wait(Duration::from_secs(10)),
                    "{} of {n} done and no notification",
                    done.len()
                );
                notifier.ack();
            }
        }
        done.sort_by_key(|c| c.id);
        assert!(done.iter().all(|c| c.result == Ok(())));
        done
    };
    // Never written: whatever the stack serves from elsewhere (e.g. a lazy image) notifies too.
    let reads = (0..n)
        .map(|i| IoOp::Read {
            sector: 7000 + i * 8,
            buf: IoBuf::new(4096),
        })
        .collect();
    run_all(ch, reads);
    let writes = (0..n)
        .map(|i| IoOp::Write {
            sector: 3000 + i * 8,
            buf: pattern(4096, i as u8),
        })
        .collect();
    run_all(ch, writes);
    let reads = (0..n)
        .map(|i| IoOp::Read {
            sector: 3000 + i * 8,
            buf: IoBuf::new(4096),
        })
        .collect();
    for (i, c) in run_all(ch, reads).into_iter().enumerate() {
        assert_eq!(c.id, i as u64);
        assert!(c.buf.as_deref() == Some(&pattern(4096, i as u8)[..]));
    }
}

/// CPU time of the calling thread (tests that a waiting channel does not spin).
pub fn thread_cpu() -> std::time::Duration {
    // SAFETY: libc::rusage is plain integers (timevals and longs), for which all-zero bytes are
    // a valid value; getrusage(2) fills that struct, ours and writable for the call.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
