//! Crash consistency of lazy stripe fetch: the real `vhost-backend` serving a lazy disk
//! (`image_path` + `metadata_path`, small stripes, rate-limited `autofetch`) is SIGKILLed while
//! two queues have many 4 KiB writes (and some multi-stripe writes, reads and FLUSHes) in
//! flight, then restarted on the same files, three times in a row.
//!
//! After every restart the whole disk is read back and each 4 KiB block must hold:
//! * its latest *durable* write (one that completed before a FLUSH was submitted, and that FLUSH
//!   completed), or any write to that block issued after it (it may or may not have landed);
//! * with no durable write since the last restart: what it held after the last restart (the
//!   image for a block never written), or any write issued to it since.
//!
//! Every write carries a unique generation tag in its data, so a block's content identifies the
//! exact write (or the image) it comes from; zeros, torn blocks and misplaced data are reported
//! with the block index, its stripe and what was allowed. Reads issued while the workload runs
//! are checked too (they must see the latest completed write). After the last restart autofetch
//! is let finish (control socket `status` until `complete`), the disk is checked again, the
//! backend is stopped with SIGTERM and the base disk file, read raw, must equal the image with
//! the writes applied, and the metadata must mark every stripe fetched.
//!
//! `plain_disk_crash_control` runs the same workload and checks on a plain (non-lazy) disk that
//! starts as a copy of the image: if it passes and the lazy test fails, the lazy layer is at
//! fault, not the oracle. `LAZY_CRASH_SEED=<n>` replays a run's random choices (kill timing still
//! varies).

use crate::common::*;
use anyhow::{bail, ensure, Context};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT_METADATA: &str = env!("CARGO_BIN_EXE_init-metadata");

/// Block size of the model: every write covers whole blocks.
const BS: usize = 4096;
const DISK_BYTES: u64 = 64 << 20;
const BLOCKS: u64 = DISK_BYTES / BS as u64;
/// The image ends inside the last stripe and inside a sector (not a multiple of 512): the disk
/// shows its last partial sector zero-padded, then zeros.
const IMAGE_BYTES: u64 = DISK_BYTES - 5 * BS as u64 - 1000;
/// 2^6 sectors = 32 KiB stripes: 2048 stripes, many fetches.
const SHIFT: u8 = 6;
const STRIPE_BYTES: u64 = 512 << SHIFT;
const BLOCKS_PER_STRIPE: u64 = STRIPE_BYTES / BS as u64;
const STRIPES: u64 = DISK_BYTES / STRIPE_BYTES;
/// Slow enough that the background fetch is still running at every kill.
const FETCH_MIB_PER_SEC: u64 = 8;
const QUEUES: usize = 2;
/// Requests in flight per queue (FLUSH not counted).
const QD: usize = 16;
/// Largest request of the workload, in blocks (one buffer slot).
const MAX_REQ_BLOCKS: u64 = 16;
const SLOT_BYTES: usize = MAX_REQ_BLOCKS as usize * BS;
/// Per queue: requests that may write a not yet touched stripe (the rest of the writes go to the
/// hot region and the focus stripe), so that many stripes are still unfetched at each kill.
const COLD_OPS_PER_SEC: f64 = 150.0;
/// Single-block writes land here half of the time, so blocks get many generations.
const HOT_BLOCKS: u64 = 1024;
const CRASHES: usize = 3;
const FLUSH_TAG: usize = usize::MAX;
/// Header of every written block: magic, block index (LE), generation (LE).
const MAGIC: &[u8; 8] = b"LZCRASH\0";

// ---------------------------------------------------------------------------------------------
// Block contents
// ---------------------------------------------------------------------------------------------

/// Content of block `block` written with generation `gen` (> 0): a header naming both, then
/// pseudo-random bytes derived from them.
fn gen_block(block: u64, gen: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&gen.to_le_bytes());
    let mut x =
        (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xBF58_476D_1CE4_E5B9)) | 1;
    for chunk in out[24..BS].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
}

/// What block `block` must hold for content `gen`: 0 = the image (zeros past its end).
fn expected_block(block: u64, gen: u64, image: &[u8]) -> Vec<u8> {
    if gen == 0 {
        let o = block as usize * BS;
        image[o..o + BS].to_vec()
    } else {
        let mut v = vec![0u8; BS];
        gen_block(block, gen, &mut v);
        v
    }
}

/// Which content `data` is for block `block`: Some(0) = the image, Some(g) = write generation g
/// of this block, None = anything else.
fn identify(block: u64, data: &[u8], image: &[u8]) -> Option<u64> {
    let o = block as usize * BS;
    if data == &image[o..o + BS] {
        return Some(0);
    }
    if &data[..8] != MAGIC || data[8..16] != block.to_le_bytes() {
        return None;
    }
    let gen = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
    if gen == 0 {
        return None;
    }
    (data == expected_block(block, gen, image).as_slice()).then_some(gen)
}

fn content_name(gen: u64) -> String {
    if gen == 0 {
        "image content".to_string()
    } else {
        format!("write gen {gen}")
    }
}

/// Human description of unexpected block content, per 512-byte sector: `I` image, `0` zeros,
/// a digit k = sector of candidate k, `?` anything else.
fn describe(block: u64, data: &[u8], image: &[u8], candidates: &[u64]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "all zeros".to_string();
    }
    let mut what = String::new();
    if &data[..8] == MAGIC {
        let b = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let g = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
        if b != block {
            what = format!("header of write gen {g} of block {b} (misplaced); ");
        } else {
            what = format!("header of write gen {g} of this block, body differs; ");
        }
    }
    let o = block as usize * BS;
    let img = &image[o..o + BS];
    let cands: Vec<Vec<u8>> = candidates
        .iter()
        .map(|&g| expected_block(block, g, image))
        .collect();
    let mut map = String::new();
    for s in 0..BS / 512 {
        let r = s * 512..(s + 1) * 512;
        let c = if data[r.clone()] == img[r.clone()] {
            'I'
        } else if data[r.clone()].iter().all(|&b| b == 0) {
            '0'
        } else if let Some(k) = cands.iter().position(|c| c[r.clone()] == data[r.clone()]) {
            char::from_digit(k as u32 % 10, 10).expect("digit")
        } else {
            '?'
        };
        map.push(c);
    }
    format!(
        "{what}sectors [{map}] (I image, 0 zeros, k = candidate k, ? other), first bytes {:02x?}",
        &data[..16]
    )
}

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

/// One write request: blocks `first..first+n`, all tagged `gen`. Clock values order events
/// across queues.
#[derive(Clone, Debug)]
struct WriteRec {
    first: u64,
    n: u64,
    gen: u64,
    submit: u64,
    complete: Option<u64>,
}

#[derive(Clone, Debug)]
struct FlushRec {
    submit: u64,
    complete: Option<u64>,
}

#[derive(Default)]
struct WorkerOut {
    writes: Vec<WriteRec>,
    flushes: Vec<FlushRec>,
    reads_checked: u64,
    in_flight_at_stop: usize,
}

/// State shared by the queue threads of one run (one backend incarnation).
struct Shared<'a> {
    clock: AtomicU64,
    next_gen: &'a AtomicU64,
    /// A block with a request in flight is claimed: never two requests on one block at once,
    /// so the writes to a block are totally ordered.
    busy: Vec<AtomicBool>,
    /// Content of each block as of its latest completed write (0 = image).
    current: Vec<AtomicU64>,
    /// A stripe both queues hammer for a while (races between its fetch and writes).
    focus: AtomicU64,
    /// Set shortly before the kill: every write goes to a random stripe (most unfetched), so
    /// the kill lands while guest writes wait for fetches and fetches are running.
    burst: AtomicBool,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    image: &'a [u8],
    /// copy_on_read: reads of unfetched stripes fetch them, so they count as cold too.
    reads_fetch: bool,
}

impl Shared<'_> {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst)
    }

    fn claim(&self, first: u64, n: u64) -> bool {
        for b in first..first + n {
            if self.busy[b as usize]
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_err()
            {
                self.release(first, b - first);
                return false;
            }
        }
        true
    }

    fn release(&self, first: u64, n: u64) {
        for b in first..first + n {
            self.busy[b as usize].store(false, SeqCst);
        }
    }

    fn error(&self, msg: String) {
        let mut e = self.errors.lock().expect("errors lock");
        if e.len() < 50 {
            e.push(msg);
        }
    }
}

enum Op {
    Write { rec: usize },
    Read { first: u64, n: u64 },
}

/// A run of blocks across one or more stripe boundaries: (first block, block count).
fn across_stripes(rng: &mut SmallRng) -> (u64, u64) {
    let n = rng.random_range(2..=MAX_REQ_BLOCKS);
    let boundary = rng.random_range(1..STRIPES) * BLOCKS_PER_STRIPE;
    let first = boundary
        .saturating_sub(rng.random_range(1..n))
        .min(BLOCKS - n);
    (first, n)
}

/// Picks the next request: (is_write, first block, block count, touches a cold stripe).
/// With `cold_ok` false only the hot region and the focus stripe are written (and anything
/// read), so most stripes stay unfetched for the background fetch.
fn pick(rng: &mut SmallRng, sh: &Shared, cold_ok: bool) -> (bool, u64, u64, bool) {
    let r: u32 = rng.random_range(0..100);
    if sh.burst.load(SeqCst) && r >= 12 {
        if r < 30 {
            // Both queues into one fresh stripe.
            if rng.random_range(0..100) < 30 {
                sh.focus.store(rng.random_range(0..STRIPES), SeqCst);
            }
            let s = sh.focus.load(SeqCst);
            let b = s * BLOCKS_PER_STRIPE + rng.random_range(0..BLOCKS_PER_STRIPE);
            return (true, b, 1, true);
        }
        if r < 50 {
            let (first, n) = across_stripes(rng);
            return (true, first, n, true);
        }
        return (true, rng.random_range(0..BLOCKS), 1, true);
    }
    if r < 12 {
        let n = rng.random_range(1..=8u64);
        if sh.reads_fetch && !cold_ok {
            return (false, rng.random_range(0..=HOT_BLOCKS - n), n, false);
        }
        return (false, rng.random_range(0..=BLOCKS - n), n, sh.reads_fetch);
    }
    if r < 22 && cold_ok {
        let (first, n) = across_stripes(rng);
        return (true, first, n, true);
    }
    if (22..45).contains(&r) {
        let mut cold = false;
        if cold_ok && rng.random_range(0..100) < 5 {
            sh.focus.store(rng.random_range(0..STRIPES), SeqCst);
            cold = true;
        }
        let s = sh.focus.load(SeqCst);
        return (
            true,
            s * BLOCKS_PER_STRIPE + rng.random_range(0..BLOCKS_PER_STRIPE),
            1,
            cold,
        );
    }
    if r >= 70 && cold_ok {
        return (true, rng.random_range(0..BLOCKS), 1, true);
    }
    (true, rng.random_range(0..HOT_BLOCKS), 1, false)
}

/// Drives one queue until `sh.stop`: up to QD reads/writes in flight, a FLUSH every few ms.
fn worker(q: &mut QueueIo, sh: &Shared, seed: u64) -> WorkerOut {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = WorkerOut::default();
    let mut slots: Vec<Option<Op>> = (0..QD).map(|_| None).collect();
    let mut flush_in_flight: Option<usize> = None;
    let mut next_flush = Instant::now() + Duration::from_millis(rng.random_range(3..25));
    let mut done = Vec::new();
    let qi = q.index();
    // Token bucket for requests touching cold stripes.
    let mut cold_tokens = 0.0f64;
    let mut last_refill = Instant::now();
    while !sh.stop.load(SeqCst) {
        let now = Instant::now();
        cold_tokens = (cold_tokens
            + now.duration_since(last_refill).as_secs_f64() * COLD_OPS_PER_SEC)
            .min(8.0);
        last_refill = now;
        for (slot, entry) in slots.iter_mut().enumerate() {
            if entry.is_some() {
                continue;
            }
            let (is_write, first, n, cold) = pick(&mut rng, sh, cold_tokens >= 1.0);
            if !sh.claim(first, n) {
                continue;
            }
            if cold {
                cold_tokens -= 1.0;
            }
            let off = slot * SLOT_BYTES;
            if is_write {
                let gen = sh.next_gen.fetch_add(1, SeqCst);
                let buf = &mut q.buf_mut()[off..off + n as usize * BS];
                for (i, chunk) in buf.chunks_mut(BS).enumerate() {
                    gen_block(first + i as u64, gen, chunk);
                }
                out.writes.push(WriteRec {
                    first,
                    n,
                    gen,
                    submit: sh.tick(),
                    complete: None,
                });
                *entry = Some(Op::Write {
                    rec: out.writes.len() - 1,
                });
                q.submit_write(first * BS as u64, off, n as usize * BS, slot);
            } else {
                *entry = Some(Op::Read { first, n });
                q.submit_read(first * BS as u64, off, n as usize * BS, slot);
            }
        }
        if flush_in_flight.is_none() && Instant::now() >= next_flush {
            out.flushes.push(FlushRec {
                submit: sh.tick(),
                complete: None,
            });
            flush_in_flight = Some(out.flushes.len() - 1);
            q.submit_flush(FLUSH_TAG);
            next_flush = Instant::now() + Duration::from_millis(rng.random_range(3..25));
        }
        done.clear();
        match q.reap(1, &mut done, Some(Duration::from_millis(10))) {
            Ok(_) => {}
            Err(e) if e == libc::ETIME => {}
            Err(e) => {
                sh.error(format!("queue {qi}: reap failed: {}", errno_name(e)));
                break;
            }
        }
        handle(q, sh, &mut out, &mut slots, &mut flush_in_flight, &done);
    }
    // Completions the device posted before it died are real: collect them.
    done.clear();
    if q.reap(0, &mut done, Some(Duration::ZERO)).is_ok() {
        handle(q, sh, &mut out, &mut slots, &mut flush_in_flight, &done);
    }
    out.in_flight_at_stop = q.in_flight();
    out
}

fn handle(
    q: &QueueIo,
    sh: &Shared,
    out: &mut WorkerOut,
    slots: &mut [Option<Op>],
    flush_in_flight: &mut Option<usize>,
    done: &[Done],
) {
    let qi = q.index();
    for d in done {
        if d.user_data == FLUSH_TAG {
            let i = flush_in_flight
                .take()
                .expect("flush completion without a flush");
            if d.ret == 0 {
                out.flushes[i].complete = Some(sh.tick());
            } else {
                sh.error(format!("queue {qi}: FLUSH failed: {}", errno_name(-d.ret)));
            }
            continue;
        }
        let slot = d.user_data;
        match slots[slot].take().expect("completion for an empty slot") {
            Op::Write { rec } => {
                let w = &mut out.writes[rec];
                if d.ret == 0 {
                    w.complete = Some(sh.tick());
                    for b in w.first..w.first + w.n {
                        sh.current[b as usize].store(w.gen, SeqCst);
                    }
                } else {
                    sh.error(format!(
                        "queue {qi}: write of blocks {}..{} (gen {}) failed: {}",
                        w.first,
                        w.first + w.n,
                        w.gen,
                        errno_name(-d.ret)
                    ));
                }
                sh.release(w.first, w.n);
            }
            Op::Read { first, n } => {
                out.reads_checked += 1;
                let off = slot * SLOT_BYTES;
                if d.ret != 0 {
                    sh.error(format!(
                        "queue {qi}: read of blocks {first}..{} failed: {}",
                        first + n,
                        errno_name(-d.ret)
                    ));
                } else {
                    for b in first..first + n {
                        let i = (b - first) as usize;
                        let data = &q.buf()[off + i * BS..off + (i + 1) * BS];
                        let want = sh.current[b as usize].load(SeqCst);
                        if data != expected_block(b, want, sh.image).as_slice() {
                            sh.error(format!(
                                "queue {qi}: read during the run: block {b} (stripe {}) should hold \
                                 its latest completed content ({}), found {}",
                                b / BLOCKS_PER_STRIPE,
                                content_name(want),
                                describe(b, data, sh.image, &[want])
                            ));
                        }
                    }
                }
                sh.release(first, n);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test scaffolding
// ---------------------------------------------------------------------------------------------

struct Setup {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    meta: PathBuf,
    ctl: PathBuf,
    cfg: BackendConfig,
    /// With copy_on_read the whole-disk verification read would fetch every stripe: it runs
    /// on a backend with this config (copy_on_read off) before the workload's backend starts.
    verify_cfg: Option<BackendConfig>,
    lazy: bool,
    /// The image as the disk must show it: image bytes, then zeros up to DISK_BYTES.
    image_view: Vec<u8>,
}

fn setup(lazy: bool, copy_on_read: bool) -> anyhow::Result<Setup> {
    let dir = scratch_dir("ubiblk-lazycrash");
    let image = dir.path().join("image.raw");
    let disk = dir.path().join("disk.raw");
    let meta = dir.path().join("disk.meta");
    let ctl = dir.path().join("ctl.sock");
    let sock = dir.path().join("vhost.sock");
    create_pattern_file(&image, IMAGE_BYTES.next_multiple_of(BS as u64))
        .and_then(|()| Ok(std::fs::OpenOptions::new().write(true).open(&image)?))
        .and_then(|f| Ok(f.set_len(IMAGE_BYTES)?))
        .context("creating the image")?;
    let mut image_view = read_file(&image).context("reading the image back")?;
    image_view.resize(DISK_BYTES as usize, 0);
    let mut cfg = BackendConfig::new(&disk, &sock).num_queues(QUEUES);
    if lazy {
        // Sparse, zero-filled base disk: anything not fetched reads as zeros there.
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_BYTES))
            .context("creating the base disk")?;
        let init_cfg = dir.path().join("init.yaml");
        std::fs::write(
            &init_cfg,
            format!(
                "path: {}\nsocket: {}\nimage_path: {}\nmetadata_path: {}\n",
                yaml_str(&disk.to_string_lossy()),
                yaml_str(&sock.to_string_lossy()),
                yaml_str(&image.to_string_lossy()),
                yaml_str(&meta.to_string_lossy()),
            ),
        )?;
        let out = std::process::Command::new(INIT_METADATA)
            .arg("-f")
            .arg(&init_cfg)
            .arg("-s")
            .arg(SHIFT.to_string())
            .output()
            .context("running init-metadata")?;
        ensure!(
            out.status.success(),
            "init-metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cfg = cfg
            .extra_path("image_path", &image)
            .extra_path("metadata_path", &meta)
            .extra(format!("copy_on_read: {copy_on_read}"))
            .extra("autofetch: true")
            .extra(format!("autofetch_mib_per_sec: {FETCH_MIB_PER_SEC}"))
            .extra_path("control_socket", &ctl);
    } else {
        std::fs::write(&disk, &image_view).context("creating the plain disk")?;
    }
    Ok(Setup {
        _dir: dir,
        disk,
        meta,
        ctl,
        verify_cfg: (lazy && copy_on_read).then(|| {
            let mut v = cfg.clone();
            v.extra_yaml.retain(|l| !l.starts_with("copy_on_read:"));
            v.extra("copy_on_read: false")
        }),
        cfg,
        lazy,
        image_view,
    })
}

/// Last lines of a backend log, for failure messages.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn connect(s: &Setup, be: &Backend) -> anyhow::Result<Client> {
    let c = Client::connect(
        &s.cfg.socket,
        &ClientOptions {
            num_queues: QUEUES,
            mem_size: 8 << 20,
            ..Default::default()
        },
    )
    .with_context(|| format!("connecting; backend log:\n{}", log_tail(&be.log())))?;
    ensure!(
        c.capacity() == DISK_BYTES,
        "capacity {} != disk size {DISK_BYTES}",
        c.capacity()
    );
    Ok(c)
}

fn read_disk(c: &mut Client) -> anyhow::Result<Vec<u8>> {
    let chunk = 1usize << 20;
    let mut all = Vec::with_capacity(DISK_BYTES as usize);
    for off in (0..DISK_BYTES).step_by(chunk) {
        all.extend(io_ok(
            c.read(0, off, chunk),
            &format!("reading the disk at {off}"),
        )?);
    }
    Ok(all)
}

/// A write is durable if it completed before this clock value: the submission of the last
/// FLUSH that completed (a FLUSH covers the writes completed before it was submitted).
fn flush_cut(run: &[WorkerOut]) -> u64 {
    run.iter()
        .flat_map(|o| &o.flushes)
        .filter(|f| f.complete.is_some())
        .map(|f| f.submit)
        .max()
        .unwrap_or(0)
}

/// Reads the metadata file of the killed backend: every stripe holding a durable write must be
/// marked fetched (guest writes only reach stripes whose fetch is durable) and written (a FLUSH
/// makes the WRITTEN bits of the writes before it durable).
fn check_metadata_after_crash(s: &Setup, run: &[WorkerOut], crash: usize) -> anyhow::Result<()> {
    let f = std::fs::File::open(&s.meta).context("opening the metadata")?;
    let md = ubiblk::lazy::Metadata::read_from(&f, DISK_BYTES / 512, None)
        .with_context(|| format!("metadata unreadable after crash {crash}"))?;
    let cut = flush_cut(run);
    let mut stripes: HashMap<u64, u64> = HashMap::new();
    for w in run.iter().flat_map(|o| &o.writes) {
        if w.complete.is_some_and(|c| c < cut) {
            for b in w.first..w.first + w.n {
                stripes.insert(b / BLOCKS_PER_STRIPE, w.gen);
            }
        }
    }
    let mut not_fetched: Vec<String> = stripes
        .iter()
        .filter(|(&st, _)| !md.is_fetched(st as usize))
        .map(|(st, g)| format!("stripe {st} (durable write gen {g})"))
        .collect();
    not_fetched.sort();
    ensure!(
        not_fetched.is_empty(),
        "after crash {crash}: {} stripes hold durable guest writes but the metadata on disk does \
         not mark them fetched (a restart would re-fetch them from the image over the writes): {}",
        not_fetched.len(),
        not_fetched[..not_fetched.len().min(10)].join(", ")
    );
    let mut not_written: Vec<u64> = stripes
        .keys()
        .copied()
        .filter(|&st| !md.is_written(st as usize))
        .collect();
    not_written.sort();
    ensure!(
        not_written.is_empty(),
        "after crash {crash}: {} stripes hold durable guest writes but the metadata on disk does          not mark them written: {:?}",
        not_written.len(),
        &not_written[..not_written.len().min(10)]
    );
    Ok(())
}

/// Checks the whole disk after a crash against the writes of the run that crashed and returns
/// the content each block was found with (the baseline of the next run).
fn verify_after_crash(
    data: &[u8],
    baseline: &[u64],
    run: &[WorkerOut],
    image: &[u8],
    crash: usize,
) -> Result<(Vec<u64>, String), Vec<String>> {
    let flush_cut = flush_cut(run);
    let mut writes: Vec<&WriteRec> = run.iter().flat_map(|o| &o.writes).collect();
    writes.sort_by_key(|w| w.submit);
    // Per block: its writes in order (gen, completed, durable).
    let mut per_block: HashMap<u64, Vec<(u64, bool, bool)>> = HashMap::new();
    for w in &writes {
        let durable = w.complete.is_some_and(|c| c < flush_cut);
        for b in w.first..w.first + w.n {
            per_block
                .entry(b)
                .or_default()
                .push((w.gen, w.complete.is_some(), durable));
        }
    }
    let mut errors = Vec::new();
    let mut found_all = Vec::with_capacity(BLOCKS as usize);
    let (mut lost_completed, mut landed_in_flight, mut durable_blocks) = (0u64, 0u64, 0u64);
    for b in 0..BLOCKS {
        let data = &data[b as usize * BS..(b as usize + 1) * BS];
        let hist = per_block.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        let last_durable = hist.iter().rposition(|h| h.2);
        // Allowed contents, oldest first.
        let (floor, allowed): (String, Vec<u64>) = match last_durable {
            Some(d) => {
                durable_blocks += 1;
                (
                    format!("its latest durable write gen {}", hist[d].0),
                    hist[d..].iter().map(|h| h.0).collect(),
                )
            }
            None => (
                format!(
                    "{} (no durable write to it in this run)",
                    if baseline[b as usize] == 0 {
                        "the image content".to_string()
                    } else {
                        format!(
                            "its content after the previous restart, write gen {}",
                            baseline[b as usize]
                        )
                    }
                ),
                std::iter::once(baseline[b as usize])
                    .chain(hist.iter().map(|h| h.0))
                    .collect(),
            ),
        };
        let found = identify(b, data, image);
        match found {
            Some(g) if allowed.contains(&g) => {
                // Index of the surviving write in this run's history (None: the baseline).
                let k = hist.iter().position(|h| h.0 == g);
                // Later completed writes that did not survive (legal without a flush).
                if hist
                    .iter()
                    .enumerate()
                    .any(|(i, h)| h.1 && k.is_none_or(|k| i > k))
                {
                    lost_completed += 1;
                }
                if k.is_some_and(|k| !hist[k].1) {
                    landed_in_flight += 1;
                }
                found_all.push(g);
            }
            _ => {
                let later: Vec<String> = match last_durable {
                    Some(d) => &hist[d + 1..],
                    None => hist,
                }
                .iter()
                .map(|h| {
                    format!(
                        "gen {} ({})",
                        h.0,
                        if h.1 {
                            "completed, not flushed"
                        } else {
                            "in flight"
                        }
                    )
                })
                .collect();
                errors.push(format!(
                    "after crash {crash}: block {b} (stripe {}, disk offset {}): expected {floor}{}; \
                     found {} [candidates: {}]",
                    b / BLOCKS_PER_STRIPE,
                    b * BS as u64,
                    if later.is_empty() {
                        String::new()
                    } else {
                        format!(" or one of the later writes {}", later.join(", "))
                    },
                    match found {
                        Some(g) => content_name(g),
                        None => describe(b, data, image, &allowed),
                    },
                    allowed
                        .iter()
                        .enumerate()
                        .map(|(k, g)| format!("{k}={}", content_name(*g)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                found_all.push(u64::MAX);
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let n_writes = writes.len();
    let completed = writes.iter().filter(|w| w.complete.is_some()).count();
    let durable = writes
        .iter()
        .filter(|w| w.complete.is_some_and(|c| c < flush_cut))
        .count();
    let summary = format!(
        "{n_writes} writes ({completed} completed, {durable} durable), {durable_blocks} blocks \
         with a durable write, {landed_in_flight} blocks show a write that was in flight, \
         {lost_completed} blocks lost a completed unflushed write"
    );
    Ok((found_all, summary))
}

/// Compares the disk with the model exactly (no crash in between).
fn verify_exact(data: &[u8], model: &[u64], image: &[u8], what: &str) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for b in 0..BLOCKS {
        let got = &data[b as usize * BS..(b as usize + 1) * BS];
        let want = model[b as usize];
        if got != expected_block(b, want, image).as_slice() {
            errors.push(format!(
                "{what}: block {b} (stripe {}, offset {}): expected {}, found {}",
                b / BLOCKS_PER_STRIPE,
                b * BS as u64,
                content_name(want),
                describe(b, got, image, &[want])
            ));
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} blocks wrong; first ones:\n{}",
            errors.len(),
            errors[..errors.len().min(20)].join("\n")
        );
    }
    Ok(())
}

fn seed() -> u64 {
    std::env::var("LAZY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn crash_cycles(lazy: bool, copy_on_read: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let seed = seed();
    let name = match (lazy, copy_on_read) {
        (false, _) => "plain",
        (true, false) => "lazy",
        (true, true) => "lazy copy_on_read",
    };
    eprintln!("[{name}] seed {seed} (LAZY_CRASH_SEED={seed} to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let s = setup(lazy, copy_on_read)?;
    let image = &s.image_view;
    let next_gen = AtomicU64::new(1);
    let mut model = vec![0u64; BLOCKS as usize];
    // Logs of the killed incarnations, for failure messages.
    let mut old_logs: Vec<String> = Vec::new();
    let mut last_run: Option<Vec<WorkerOut>> = None;

    for crash in 0..=CRASHES {
        let mut be =
            Backend::start(BIN, s.verify_cfg.as_ref().unwrap_or(&s.cfg)).with_context(|| {
                format!(
                    "starting the backend (start {}, after {crash} crashes); previous log:\n{}",
                    crash + 1,
                    old_logs.last().map(|l| log_tail(l)).unwrap_or_default()
                )
            })?;
        let mut c = connect(&s, &be)?;
        let data = read_disk(&mut c)?;
        match last_run.take() {
            None => verify_exact(&data, &model, image, "fresh disk")?,
            Some(run) => match verify_after_crash(&data, &model, &run, image, crash) {
                Ok((found, summary)) => {
                    eprintln!("[{name}] after crash {crash}: ok; {summary}");
                    model = found;
                }
                Err(errors) => bail!(
                    "[{name}] seed {seed}: {} blocks wrong after crash {crash}; first ones:\n{}\n\
                     log of the killed backend (tail):\n{}\nlog of the restarted backend (tail):\n{}",
                    errors.len(),
                    errors[..errors.len().min(20)].join("\n"),
                    old_logs.last().map(|l| log_tail(l)).unwrap_or_default(),
                    log_tail(&be.log())
                ),
            },
        }
        // What we just read is the state now; make it durable before the next crash.
        io_ok(c.flush(0), "flush after verification")?;
        if let (Some(_), true) = (&s.verify_cfg, crash < CRASHES) {
            // Verified; now the copy_on_read backend for the workload.
            drop(c);
            be.guard.signal(libc::SIGTERM);
            ensure!(
                be.guard.wait_timeout(Duration::from_secs(10)).is_some(),
                "verification backend did not stop on SIGTERM"
            );
            drop(be);
            be = Backend::start(BIN, &s.cfg).context("starting the copy_on_read backend")?;
            c = connect(&s, &be)?;
        }
        if crash == CRASHES {
            return finish(&s, be, c, &model, t0);
        }

        // Run the workload and SIGKILL the backend in the middle of it.
        let sh = Shared {
            clock: AtomicU64::new(1),
            next_gen: &next_gen,
            busy: (0..BLOCKS).map(|_| AtomicBool::new(false)).collect(),
            current: model.iter().map(|&g| AtomicU64::new(g)).collect(),
            focus: AtomicU64::new(rng.random_range(0..STRIPES)),
            burst: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            image,
            reads_fetch: copy_on_read,
        };
        let run_for = Duration::from_millis(rng.random_range(200..=800));
        let seeds: Vec<u64> = (0..QUEUES).map(|_| rng.random()).collect();
        let mut status_before = None;
        let burst_for = Duration::from_micros(rng.random_range(500..=4000));
        let outs: Vec<WorkerOut> = std::thread::scope(|scope| {
            let sh = &sh;
            let handles: Vec<_> = c
                .queues_mut()
                .iter_mut()
                .zip(seeds)
                .map(|(q, seed)| scope.spawn(move || worker(q, sh, seed)))
                .collect();
            std::thread::sleep(run_for - burst_for);
            if s.lazy {
                status_before = Some(ControlStatus::query(&s.ctl));
            }
            sh.burst.store(true, SeqCst);
            std::thread::sleep(burst_for);
            be.guard.kill();
            sh.stop.store(true, SeqCst);
            handles
                .into_iter()
                .map(|h| h.join().expect("a queue thread panicked"))
                .collect()
        });
        // Let the dead process's io_uring requests drain before anyone reopens the files.
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
        old_logs.push(be.log());
        let errors = sh.errors.into_inner().expect("errors lock");
        ensure!(
            errors.is_empty(),
            "[{name}] seed {seed}: errors during run {} (before the kill):\n{}\nbackend log (tail):\n{}",
            crash + 1,
            errors.join("\n"),
            log_tail(old_logs.last().expect("just pushed"))
        );
        let writes: usize = outs.iter().map(|o| o.writes.len()).sum();
        let reads: u64 = outs.iter().map(|o| o.reads_checked).sum();
        let flushes: usize = outs
            .iter()
            .flat_map(|o| &o.flushes)
            .filter(|f| f.complete.is_some())
            .count();
        let in_flight: usize = outs.iter().map(|o| o.in_flight_at_stop).sum();
        eprintln!(
            "[{name}] run {}: killed after {run_for:?} with {in_flight} requests in flight (each \
             queue's count includes its FLUSH, if one was pending); \
             {writes} writes, {reads} reads checked, {flushes} flushes completed",
            crash + 1
        );
        if let Some(st) = status_before {
            let st = st.context("control socket status just before the burst and the kill")?;
            eprintln!(
                "[{name}]   status before the last {burst_for:?} (burst of cold writes): {}",
                st.raw
            );
            ensure!(
                st.stripes == STRIPES && st.stripe_bytes == STRIPE_BYTES,
                "status reports {} stripes of {} bytes, expected {STRIPES} of {STRIPE_BYTES}: {}",
                st.stripes,
                st.stripe_bytes,
                st.raw
            );
            ensure!(st.fetch_errors == 0, "fetch errors: {}", st.raw);
            if crash == 0 {
                ensure!(
                    !st.complete,
                    "fetching already complete at the first kill: the test would not crash \
                     during fetches; lower FETCH_MIB_PER_SEC ({})",
                    st.raw
                );
            }
        }
        ensure!(
            outs.iter()
                .flat_map(|o| &o.flushes)
                .any(|f| f.complete.is_some()),
            "run {}: no FLUSH completed before the kill: nothing to check",
            crash + 1
        );
        if s.lazy {
            check_metadata_after_crash(&s, &outs, crash + 1)?;
        }
        last_run = Some(outs);
    }
    unreachable!("the last iteration returns");
}

/// After the last restart: let autofetch finish, check again, stop cleanly and compare the base
/// disk and metadata files.
fn finish(s: &Setup, be: Backend, mut c: Client, model: &[u64], t0: Instant) -> anyhow::Result<()> {
    let name = if s.lazy { "lazy" } else { "plain" };
    let image = &s.image_view;
    if s.lazy {
        let st = ControlStatus::query(&s.ctl)?;
        let remaining = st.stripes.saturating_sub(st.fetched) * st.stripe_bytes;
        let timeout = Duration::from_secs(10)
            + Duration::from_secs_f64(2.0 * remaining as f64 / (FETCH_MIB_PER_SEC << 20) as f64);
        eprintln!(
            "[{name}] waiting up to {timeout:?} for autofetch: {}",
            st.raw
        );
        let deadline = Instant::now() + timeout;
        loop {
            let st = ControlStatus::query(&s.ctl)?;
            ensure!(st.fetch_errors == 0, "fetch errors: {}", st.raw);
            if st.complete {
                ensure!(
                    st.fetched == st.stripes,
                    "complete but not every stripe fetched: {}",
                    st.raw
                );
                eprintln!("[{name}] autofetch complete: {}", st.raw);
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "autofetch not complete after {timeout:?}: {}\nbackend log (tail):\n{}",
                st.raw,
                log_tail(&be.log())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let data = read_disk(&mut c)?;
    verify_exact(&data, model, image, "after autofetch completed")?;
    drop(c);

    let mut guard = be.guard;
    guard.signal(libc::SIGTERM);
    let status = guard
        .wait_timeout(Duration::from_secs(10))
        .context("backend did not exit on SIGTERM")?;
    ensure!(
        status.success(),
        "backend exited with {status:?} on SIGTERM: {}",
        log_tail(&guard.log())
    );
    let raw = read_file(&s.disk).context("reading the base disk")?;
    ensure!(
        raw.len() as u64 == DISK_BYTES,
        "base disk is {} bytes, expected {DISK_BYTES}",
        raw.len()
    );
    verify_exact(&raw, model, image, "base disk file read raw")
        .context("the base disk does not equal the image with the writes applied")?;
    if s.lazy {
        let f = std::fs::File::open(&s.meta).context("opening the metadata")?;
        let md = ubiblk::lazy::Metadata::read_from(&f, DISK_BYTES / 512, None)
            .context("reading the metadata back")?;
        let unfetched: Vec<usize> = (0..md.stripe_count())
            .filter(|&i| !md.is_fetched(i))
            .collect();
        ensure!(
            unfetched.is_empty(),
            "after autofetch completed and SIGTERM, {} stripes are not marked fetched in the \
             metadata, e.g. {:?}",
            unfetched.len(),
            &unfetched[..unfetched.len().min(10)]
        );
        // Informational: stripes holding guest data without the written bit.
        let unmarked = (0..STRIPES)
            .filter(|&st| {
                (st * BLOCKS_PER_STRIPE..(st + 1) * BLOCKS_PER_STRIPE)
                    .any(|b| model[b as usize] != 0)
                    && !md.is_written(st as usize)
            })
            .count();
        eprintln!(
            "[{name}] metadata: {} stripes fetched, {} written; {unmarked} stripes hold guest \
             writes without the written bit",
            md.fetched_count(),
            md.written_count()
        );
    }
    eprintln!("[{name}] passed in {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn lazy_fetch_survives_sigkill_during_writes_and_fetches() -> anyhow::Result<()> {
    crash_cycles(true, false)
}

/// With copy_on_read the workload's reads of unfetched stripes trigger fetches too.
#[test]
fn lazy_fetch_with_copy_on_read_survives_sigkill() -> anyhow::Result<()> {
    crash_cycles(true, true)
}

/// The same workload and oracle on a plain disk: validates the test itself.
#[test]
fn plain_disk_crash_control() -> anyhow::Result<()> {
    crash_cycles(false, false)
}
