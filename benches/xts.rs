//! AES-256-XTS throughput on one core, next to `openssl speed -evp aes-256-xts` in the same run.
//! `cargo bench --bench xts`. Prints medians of several rounds.

use std::process::Command;
use std::time::{Duration, Instant};
use ubiblk::crypto::Xts;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// GB/s of encrypting (or decrypting) `size`-byte buffers for about `dur`.
fn ours(size: usize, decrypt: bool, dur: Duration) -> f64 {
    let xts = Xts::new(&[0x11; 32], &[0x22; 32]);
    let mut buf = vec![0x5au8; size];
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut sector = 0u64;
    while start.elapsed() < dur {
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
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// GB/s of encrypting 1 MiB pieces from one 64 MiB area into another, as the data path does
/// (guest memory into a bounce buffer) once the data is not in the CPU's caches; with `copy`, of
/// copying them instead: the memory's own ceiling for that traffic.
fn out_of_cache(copy: bool, dur: Duration) -> f64 {
    const AREA: usize = 64 << 20;
    const PIECE: usize = 1 << 20;
    let xts = Xts::new(&[0x11; 32], &[0x22; 32]);
    let src = vec![0x5au8; AREA];
    let mut dst = vec![0u8; AREA];
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut at = 0;
    while start.elapsed() < dur {
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
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
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
    println!("AES-256-XTS, one core, median of {rounds} rounds (GB/s)");
    println!(
        "{:<16} {:>10} {:>10} {:>8}",
        "case", "ubiblk", "openssl", "ratio"
    );
    for size in [4096usize, 65536] {
        for decrypt in [false, true] {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for _ in 0..rounds {
                a.push(ours(size, decrypt, Duration::from_millis(500)));
                if let Some(x) = openssl(size, decrypt) {
                    b.push(x);
                }
            }
            let name = format!(
                "{} {}K",
                if decrypt { "decrypt" } else { "encrypt" },
                size / 1024
            );
            let ours = median(a);
            if b.is_empty() {
                println!("{name:<16} {ours:>10.2} {:>10} {:>8}", "n/a", "n/a");
            } else {
                let theirs = median(b);
                println!(
                    "{name:<16} {ours:>10.2} {theirs:>10.2} {:>7.2}x",
                    ours / theirs
                );
            }
        }
    }
    let (mut enc, mut copy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        enc.push(out_of_cache(false, Duration::from_millis(500)));
        copy.push(out_of_cache(true, Duration::from_millis(500)));
    }
    let (enc, copy) = (median(enc), median(copy));
    println!(
        "{:<16} {enc:>10.2} {:>10} {:>8}   (1 MiB pieces, 64 MiB areas; memcpy of the same: {copy:.2} GB/s)",
        "encrypt 1M cold", "n/a", "n/a"
    );
}
