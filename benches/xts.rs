//! AES-256-XTS throughput on one core, next to `openssl speed -evp aes-256-xts` in the same run.
//! `cargo bench --bench xts`. Prints medians of several rounds, for each kernel this CPU runs
//! (`UBIBLK_XTS_KERNEL=aesni` etc. to run one).
//!
//! Our format's data unit is the 512-byte sector (a tweak per sector), so the reference is
//! OpenSSL at `-bytes 512`; OpenSSL on one 4 KiB or 64 KiB data unit (one tweak for the whole
//! buffer, less work than our format allows) is printed beside it for comparison.

use std::process::Command;
use std::time::Duration;
use ubiblk::crypto::{Kernel, Xts};

/// This thread's CPU time in seconds. Both sides are timed in CPU time (`openssl speed` counts
/// user time unless given `-elapsed`), so CPU-bound neighbours on a busy host do not skew the
/// ratio: a cipher on one core is measured, not the scheduler.
fn cpu_secs() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`, a valid local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// GB/s of encrypting (or decrypting) `size`-byte buffers for about `dur`.
fn ours(kernel: Kernel, size: usize, decrypt: bool, dur: Duration) -> f64 {
    let xts = Xts::with_kernel(kernel, &[0x11; 32], &[0x22; 32]).expect("kernel is usable");
    let mut buf = vec![0x5au8; size];
    let start = cpu_secs();
    let mut bytes = 0usize;
    let mut sector = 0u64;
    while cpu_secs() - start < dur.as_secs_f64() {
        for _ in 0..64 {
            if decrypt {
                xts.decrypt(sector, &mut buf);
            } else {
                xts.encrypt(sector, &mut buf);
            }
            sector += (size / 512) as u64;
            bytes += size;
        }
    }
    std::hint::black_box(&buf);
    bytes as f64 / (cpu_secs() - start) / 1e9
}

/// GB/s of encrypting 1 MiB pieces from one 64 MiB area into another, as the data path does
/// (guest memory into a bounce buffer) once the data is not in the CPU's caches; with `copy`, of
/// copying them instead: the memory's own ceiling for that traffic.
fn out_of_cache(kernel: Kernel, copy: bool, dur: Duration) -> f64 {
    const AREA: usize = 64 << 20;
    const PIECE: usize = 1 << 20;
    let xts = Xts::with_kernel(kernel, &[0x11; 32], &[0x22; 32]).expect("kernel is usable");
    let src = vec![0x5au8; AREA];
    let mut dst = vec![0u8; AREA];
    let start = cpu_secs();
    let mut bytes = 0usize;
    let mut at = 0;
    while cpu_secs() - start < dur.as_secs_f64() {
        let (s, d) = (&src[at..at + PIECE], &mut dst[at..at + PIECE]);
        if copy {
            d.copy_from_slice(s);
        } else {
            // SAFETY: s and d are PIECE bytes each, in two different vectors.
            unsafe { xts.apply((at / 512) as u64, s.as_ptr(), d.as_mut_ptr(), PIECE, true) };
        }
        bytes += PIECE;
        at = (at + PIECE) % AREA;
    }
    std::hint::black_box(&dst);
    bytes as f64 / (cpu_secs() - start) / 1e9
}

/// OpenSSL's GB/s for `size`-byte blocks, or None if openssl is missing.
fn openssl(size: usize, decrypt: bool) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    cmd.args(["speed", "-seconds", "1", "-evp", "aes-256-xts", "-bytes"]);
    cmd.arg(size.to_string());
    if decrypt {
        cmd.arg("-decrypt");
    }
    let out = cmd.output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Last line: "AES-256-XTS    5221717.33k" (in 1000s of bytes per second).
    let line = text.lines().rev().find(|l| l.starts_with("AES-256-XTS"))?;
    let kb: f64 = line
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(kb * 1000.0 / 1e9)
}

fn main() {
    let rounds: usize = std::env::var("UBIBLK_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let kernels = match std::env::var_os(ubiblk::crypto::KERNEL_ENV) {
        Some(_) => vec![Kernel::from_env().unwrap_or_else(|e| panic!("{e}"))],
        None => Kernel::usable(),
    };
    let names: Vec<String> = kernels.iter().map(|k| k.to_string()).collect();
    println!(
        "AES-256-XTS, one core, median of {rounds} rounds (GB/s); kernels: {}",
        names.join(", ")
    );
    println!(
        "{:<12} {:<9} {:>8} {:>12} {:>7} {:>14}",
        "case", "kernel", "ubiblk", "openssl 512", "ratio", "openssl 1 unit"
    );
    for size in [512usize, 4096, 65536] {
        for decrypt in [false, true] {
            let name = format!(
                "{} {}",
                if decrypt { "decrypt" } else { "encrypt" },
                if size < 1024 {
                    format!("{size}")
                } else {
                    format!("{}K", size / 1024)
                }
            );
            // Rounds alternate between every kernel and OpenSSL, so drift hits all alike.
            let mut a = vec![Vec::new(); kernels.len()];
            let (mut unit, mut whole) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                for (k, v) in kernels.iter().zip(a.iter_mut()) {
                    v.push(ours(*k, size, decrypt, Duration::from_millis(500)));
                }
                if let Some(x) = openssl(512, decrypt) {
                    unit.push(x);
                }
                if size > 512 {
                    if let Some(x) = openssl(size, decrypt) {
                        whole.push(x);
                    }
                }
            }
            let unit = (!unit.is_empty()).then(|| median(unit));
            let whole = (!whole.is_empty()).then(|| median(whole));
            for (k, v) in kernels.iter().zip(a) {
                let ours = median(v);
                let show = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
                let ratio = unit.map_or("n/a".to_string(), |u| format!("{:.2}x", ours / u));
                println!(
                    "{name:<12} {:<9} {ours:>8.2} {:>12} {ratio:>7} {:>14}",
                    k.to_string(),
                    show(unit),
                    show(whole),
                );
            }
        }
    }
    for k in &kernels {
        let (mut enc, mut copy) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            enc.push(out_of_cache(*k, false, Duration::from_millis(500)));
            copy.push(out_of_cache(*k, true, Duration::from_millis(500)));
        }
        let (enc, copy) = (median(enc), median(copy));
        println!(
            "{:<12} {:<9} {enc:>8.2}   (1 MiB pieces, 64 MiB areas; memcpy of the same: {copy:.2} GB/s)",
            "encrypt 1M cold",
            k.to_string()
        );
    }
}
