//! The XTS data pass with 256-bit VAES: two blocks per instruction, sixteen blocks in flight.
//!
//! The `aes` crate would do this itself, but its CPU detection (cpufeatures 0.3) requires
//! AVX-512 state for VAES and so never enables VAES on CPUs that have it without AVX-512
//! (AMD Zen 3/4, the machines we run on). std's detection gets it right, so we detect with std
//! and run this kernel; everywhere else the `aes` crate's own pipelined path is used.

use core::arch::x86_64::*;
use zeroize::Zeroize;

/// Expanded AES-256 round keys for encryption and for the equivalent inverse cipher.
#[derive(Zeroize)]
#[zeroize(drop)]
pub struct RoundKeys {
    enc: [[u8; 16]; 15],
    dec: [[u8; 16]; 15],
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("aes")
}

impl RoundKeys {
    /// Panics if [`available`] is false.
    pub fn new(key: &[u8; 32]) -> Self {
        assert!(available());
        let mut rk = RoundKeys {
            enc: [[0; 16]; 15],
            dec: [[0; 16]; 15],
        };
        // SAFETY: the CPU has AES-NI (checked above).
        unsafe { expand(key, &mut rk) };
        rk
    }

    /// Pre-whitened blocks in, cipher blocks out: `buf[i] = E(buf[i] ^ t[i]) ^ t[i]` (or D for
    /// decryption), with `tweaks[i]` as `t[i]`. `buf.len()` is a multiple of 32 bytes.
    pub fn xts(&self, buf: &mut [u8], tweaks: &[u128], decrypt: bool) {
        assert!(buf.len().is_multiple_of(32) && tweaks.len() * 16 >= buf.len());
        // SAFETY: available() held when self was built; the lengths were checked above.
        unsafe { xts_kernel(self, buf, tweaks, decrypt) }
    }
}

macro_rules! expand_round {
    ($rk:ident, $i:expr, $rcon:expr, $t1:ident, $t3:ident, $last:expr) => {
        let t2 = _mm_aeskeygenassist_si128::<$rcon>($t3);
        $t1 = mix($t1, _mm_shuffle_epi32::<0xff>(t2));
        _mm_storeu_si128($rk.enc[$i].as_mut_ptr().cast(), $t1);
        if !$last {
            let t4 = _mm_aeskeygenassist_si128::<0>($t1);
            $t3 = mix($t3, _mm_shuffle_epi32::<0xaa>(t4));
            _mm_storeu_si128($rk.enc[$i + 1].as_mut_ptr().cast(), $t3);
        }
    };
}

/// One step of the AES-256 key schedule: prefix-XOR of the previous key's words plus `t`.
#[inline(always)]
unsafe fn mix(mut k: __m128i, t: __m128i) -> __m128i {
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<8>(k));
    _mm_xor_si128(k, t)
}

#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8; 32], rk: &mut RoundKeys) {
    let mut t1 = _mm_loadu_si128(key.as_ptr().cast());
    let mut t3 = _mm_loadu_si128(key.as_ptr().add(16).cast());
    _mm_storeu_si128(rk.enc[0].as_mut_ptr().cast(), t1);
    _mm_storeu_si128(rk.enc[1].as_mut_ptr().cast(), t3);
    expand_round!(rk, 2, 0x01, t1, t3, false);
    expand_round!(rk, 4, 0x02, t1, t3, false);
    expand_round!(rk, 6, 0x04, t1, t3, false);
    expand_round!(rk, 8, 0x08, t1, t3, false);
    expand_round!(rk, 10, 0x10, t1, t3, false);
    expand_round!(rk, 12, 0x20, t1, t3, false);
    expand_round!(rk, 14, 0x40, t1, t3, true);
    // Equivalent inverse cipher: reversed order, InvMixColumns on the middle round keys.
    rk.dec[0] = rk.enc[14];
    rk.dec[14] = rk.enc[0];
    for i in 1..14 {
        let k = _mm_loadu_si128(rk.enc[14 - i].as_ptr().cast());
        _mm_storeu_si128(rk.dec[i].as_mut_ptr().cast(), _mm_aesimc_si128(k));
    }
    t1 = _mm_setzero_si128();
    t3 = _mm_setzero_si128();
    std::hint::black_box((t1, t3));
}

const LANES: usize = 8; // ymm registers in flight = 16 blocks

#[target_feature(enable = "vaes,avx2,aes")]
unsafe fn xts_kernel(rk: &RoundKeys, buf: &mut [u8], tweaks: &[u128], decrypt: bool) {
    let keys = if decrypt { &rk.dec } else { &rk.enc };
    let mut k = [_mm256_setzero_si256(); 15];
    for (dst, src) in k.iter_mut().zip(keys) {
        *dst = _mm256_broadcastsi128_si256(_mm_loadu_si128(src.as_ptr().cast()));
    }
    let n = buf.len() / 32; // ymm-sized pairs of blocks
    let p = buf.as_mut_ptr();
    let tw = tweaks.as_ptr().cast::<u8>();
    let mut i = 0;
    while i < n {
        let lanes = (n - i).min(LANES);
        let mut x = [_mm256_setzero_si256(); LANES];
        let mut t = [_mm256_setzero_si256(); LANES];
        for j in 0..lanes {
            t[j] = _mm256_loadu_si256(tw.add((i + j) * 32).cast());
            let d = _mm256_loadu_si256(p.add((i + j) * 32).cast());
            x[j] = _mm256_xor_si256(_mm256_xor_si256(d, t[j]), k[0]);
        }
        for key in &k[1..14] {
            for xj in x.iter_mut() {
                *xj = if decrypt {
                    _mm256_aesdec_epi128(*xj, *key)
                } else {
                    _mm256_aesenc_epi128(*xj, *key)
                };
            }
        }
        for j in 0..lanes {
            let last = if decrypt {
                _mm256_aesdeclast_epi128(x[j], k[14])
            } else {
                _mm256_aesenclast_epi128(x[j], k[14])
            };
            _mm256_storeu_si256(p.add((i + j) * 32).cast(), _mm256_xor_si256(last, t[j]));
        }
        i += lanes;
    }
    // Do not leave round keys in stack slots.
    for kk in k.iter_mut() {
        *kk = _mm256_setzero_si256();
    }
    std::hint::black_box(&k);
}
