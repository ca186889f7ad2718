//! The XTS data pass with 128-bit AES-NI, for CPUs without VAES (Intel before Ice Lake, AMD
//! Zen 2, cloud VMs that hide VAES): eight blocks in flight, the tweaks computed in registers
//! as the blocks are loaded, the data read and written once. Also the AES-256 key schedule
//! both x86 kernels use ([`RoundKeys`]).
//!
//! AES-NI runs one block per instruction with a latency of several cycles, so a single chain
//! of blocks leaves the unit mostly idle; eight independent blocks per round keep it busy
//! (OpenSSL interleaves six). The tweak of block j+1 is that of block j times x in GF(2^128):
//! five cheap vector instructions, overlapped with the previous group's rounds.

use core::arch::x86_64::*;
use zeroize::Zeroize;

/// Expanded AES-256 round keys for encryption and for the equivalent inverse cipher.
#[derive(Zeroize)]
#[zeroize(drop)]
pub struct RoundKeys {
    pub(super) enc: [[u8; 16]; 15],
    pub(super) dec: [[u8; 16]; 15],
}

/// Every target feature the functions below are compiled with (their
/// `#[target_feature(enable = ...)]` lists, pinned by a test): running them on a CPU that lacks
/// one is an illegal instruction, so the kernels are used only when all are present.
const KERNEL_FEATURES: [&str; 2] = ["aes", "sse2"];

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    KERNEL_FEATURES.iter().all(|f| detected(f).unwrap_or(false))
}

/// std's run-time detection of one of [`KERNEL_FEATURES`] (the macro takes only literals);
/// `None` for a name it is not asked about here, which [`available`] treats as absent.
fn detected(feature: &str) -> Option<bool> {
    Some(match feature {
        "aes" => is_x86_feature_detected!("aes"),
        "sse2" => is_x86_feature_detected!("sse2"),
        _ => return None,
    })
}

impl RoundKeys {
    /// Panics if [`available`] is false.
    pub fn new(key: &[u8; 32]) -> Self {
        assert!(available());
        let mut rk = RoundKeys {
            enc: [[0; 16]; 15],
            dec: [[0; 16]; 15],
        };
        // SAFETY: available() held just above, so the CPU has every feature `expand` is compiled
        // with (aes, sse2).
        unsafe { expand(key, &mut rk) };
        rk
    }

    /// Encrypts each 16-byte block of `blocks` (ECB) with these keys.
    pub fn encrypt_blocks(&self, blocks: &mut [u128]) {
        // SAFETY: a RoundKeys is only built by `new`, which asserted available(): the CPU has
        // every feature the kernel is compiled with.
        unsafe { ecb_encrypt_kernel(self, blocks) }
    }

    /// XTS over whole sectors: `dst = XTS(src)` where sector `s`'s first tweak (already
    /// encrypted with the tweak key) is `initial[s]`; `len` is a multiple of 512.
    ///
    /// # Safety
    /// `src` must be valid for reads and `dst` for writes of `len` bytes; they may be the same
    /// buffer but must not partially overlap.
    pub unsafe fn xts(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        initial: &[u128],
        decrypt: bool,
    ) {
        assert!(len.is_multiple_of(512) && initial.len() * 512 >= len);
        // SAFETY: the CPU has the kernel's features (available() held when self was built, as in
        // encrypt_blocks); len is whole sectors with a tweak each (asserted above); the pointers
        // are valid for len bytes and do not partially overlap (this fn's contract).
        unsafe {
            if decrypt {
                xts_kernel::<true>(self, src, dst, len, initial)
            } else {
                xts_kernel::<false>(self, src, dst, len, initial)
            }
        }
    }
}

/// The 16 bytes of `b` as a vector.
#[inline(always)]
pub(super) fn load128(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; the load is unaligned (no alignment requirement) and
    // SSE2 is part of the x86_64 baseline.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// Stores `v` into the 16 bytes of `b`.
#[inline(always)]
fn store128(b: &mut [u8; 16], v: __m128i) {
    // SAFETY: `b` is 16 bytes we hold exclusively (&mut); the store is unaligned and SSE2 is
    // part of the x86_64 baseline.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
}

macro_rules! expand_round {
    ($rk:ident, $i:expr, $rcon:expr, $t1:ident, $t3:ident, $last:expr) => {
        let t2 = _mm_aeskeygenassist_si128::<$rcon>($t3);
        $t1 = mix($t1, _mm_shuffle_epi32::<0xff>(t2));
        store128(&mut $rk.enc[$i], $t1);
        if !$last {
            let t4 = _mm_aeskeygenassist_si128::<0>($t1);
            $t3 = mix($t3, _mm_shuffle_epi32::<0xaa>(t4));
            store128(&mut $rk.enc[$i + 1], $t3);
        }
    };
}

/// One step of the AES-256 key schedule: prefix-XOR of the previous key's words plus `t`.
/// Called only from [`expand`], which has SSE2 (and into which it is inlined).
#[target_feature(enable = "sse2")]
#[inline]
fn mix(mut k: __m128i, t: __m128i) -> __m128i {
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<8>(k));
    _mm_xor_si128(k, t)
}

/// Expands `key` into `rk`'s encryption and decryption round keys.
///
/// Callers that are not compiled with these features call it in `unsafe`, having checked
/// [`available`].
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8; 32], rk: &mut RoundKeys) {
    // SAFETY: `key` is 32 readable bytes, so both 16-byte loads are in bounds; they are
    // unaligned loads (no alignment requirement).
    let (mut t1, mut t3) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    store128(&mut rk.enc[0], t1);
    store128(&mut rk.enc[1], t3);
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
        let k = load128(&rk.enc[14 - i]);
        store128(&mut rk.dec[i], _mm_aesimc_si128(k));
    }
    t1 = _mm_setzero_si128();
    t3 = _mm_setzero_si128();
    std::hint::black_box((t1, t3));
}

/// Blocks in flight per round: enough independent work to cover AESENC's latency.
const LANES: usize = 8;

/// `keys` as vectors.
#[target_feature(enable = "sse2")]
#[inline]
fn load_keys(keys: &[[u8; 16]; 15]) -> [__m128i; 15] {
    let mut k = [_mm_setzero_si128(); 15];
    for (dst, src) in k.iter_mut().zip(keys) {
        *dst = load128(src);
    }
    k
}

/// Overwrites round keys left in vectors (stack slots) once a kernel is done.
#[target_feature(enable = "sse2")]
#[inline]
fn wipe(k: &mut [__m128i; 15]) {
    for kk in k.iter_mut() {
        *kk = _mm_setzero_si128();
    }
    std::hint::black_box(k);
}

/// Encrypts 16-byte blocks in place (ECB), [`LANES`] at a time: the sectors' first tweaks.
///
/// Callers that are not compiled with these features call it in `unsafe`, having checked
/// [`available`].
#[target_feature(enable = "aes,sse2")]
fn ecb_encrypt_kernel(rk: &RoundKeys, blocks: &mut [u128]) {
    let mut k = load_keys(&rk.enc);
    for group in blocks.chunks_mut(LANES) {
        let mut x = [_mm_setzero_si128(); LANES];
        for (xj, b) in x.iter_mut().zip(group.iter()) {
            // SAFETY: `b` is a reference to 16 readable bytes (unaligned load).
            *xj = _mm_xor_si128(unsafe { _mm_loadu_si128((b as *const u128).cast()) }, k[0]);
        }
        for key in &k[1..14] {
            for xj in x.iter_mut() {
                *xj = _mm_aesenc_si128(*xj, *key);
            }
        }
        for (b, xj) in group.iter_mut().zip(x) {
            // SAFETY: `b` is 16 bytes of `blocks`, held exclusively (&mut); unaligned store.
            unsafe { _mm_storeu_si128((b as *mut u128).cast(), _mm_aesenclast_si128(xj, k[14])) };
        }
    }
    wipe(&mut k);
}

/// `t` times x in GF(2^128), IEEE 1619 bit order: each 64-bit half shifted left by one, the
/// low half's top bit carried into the high half, the high half's top bit reduced back into
/// the low byte as 0x87. `mask` is `[0x87, 0, 1, 0]` as four u32 lanes.
#[target_feature(enable = "sse2")]
#[inline]
fn mul_x(t: __m128i, mask: __m128i) -> __m128i {
    // Each u32 lane all ones where its top bit is set; lanes 3 (bit 127) and 1 (bit 63) moved
    // to lanes 0 and 2, then masked to the bits they contribute.
    let signs = _mm_srai_epi32::<31>(t);
    let carries = _mm_and_si128(_mm_shuffle_epi32::<0x13>(signs), mask);
    _mm_xor_si128(_mm_slli_epi64::<1>(t), carries)
}

/// The data pass of [`RoundKeys::xts`].
///
/// # Safety
/// The CPU has every feature enabled here ([`available`]); `src` is valid for reads and `dst`
/// for writes of `len` bytes (same buffer or not overlapping), `len` is a multiple of 512 and
/// `initial` has a tweak for each of its sectors.
#[target_feature(enable = "aes,sse2")]
unsafe fn xts_kernel<const DECRYPT: bool>(
    rk: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    initial: &[u128],
) {
    let mut k = load_keys(if DECRYPT { &rk.dec } else { &rk.enc });
    let mask = _mm_set_epi32(0, 1, 0, 0x87);
    let sectors = len / 512;
    for (s, t0) in initial.iter().enumerate().take(sectors) {
        // SAFETY: `t0` is a reference to 16 readable bytes (unaligned load).
        let mut t = unsafe { _mm_loadu_si128((t0 as *const u128).cast()) };
        for group in 0..512 / (16 * LANES) {
            let base = s * 512 + group * 16 * LANES;
            let mut x = [_mm_setzero_si128(); LANES];
            let mut tw = [_mm_setzero_si128(); LANES];
            for j in 0..LANES {
                tw[j] = t;
                t = mul_x(t, mask);
                // SAFETY: base + 16 * j + 16 <= (s + 1) * 512 <= sectors * 512 <= len, so the
                // 16 bytes are inside `src`, valid for reads of len bytes (caller's contract);
                // the load is unaligned.
                let d = unsafe { _mm_loadu_si128(src.add(base + 16 * j).cast()) };
                x[j] = _mm_xor_si128(_mm_xor_si128(d, tw[j]), k[0]);
            }
            // (LLVM unrolls this and orders it block by block; forcing round-by-round order
            // measured 8% slower on an Ice Lake-class Xeon: the core overlaps the chains.)
            for key in &k[1..14] {
                for xj in x.iter_mut() {
                    *xj = if DECRYPT {
                        _mm_aesdec_si128(*xj, *key)
                    } else {
                        _mm_aesenc_si128(*xj, *key)
                    };
                }
            }
            for j in 0..LANES {
                let last = if DECRYPT {
                    _mm_aesdeclast_si128(x[j], k[14])
                } else {
                    _mm_aesenclast_si128(x[j], k[14])
                };
                // SAFETY: the same 16 bytes as the load, inside `dst`, valid for writes of len
                // bytes (caller's contract); if `dst` is `src`, these bytes were already read.
                unsafe {
                    _mm_storeu_si128(dst.add(base + 16 * j).cast(), _mm_xor_si128(last, tw[j]))
                };
            }
        }
    }
    wipe(&mut k);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every feature in a `#[target_feature(enable = ...)]` of this file is checked, so a
    /// kernel gaining an instruction set cannot run on a CPU without it.
    #[test]
    fn kernel_features_cover_every_target_feature() {
        let lists = super::super::target_feature_lists(include_str!("aesni.rs"));
        assert_eq!(
            lists.len(),
            7,
            "expected the seven target_feature functions"
        );
        for feature in lists.iter().flatten() {
            assert!(
                KERNEL_FEATURES.contains(&feature.as_str()),
                "{feature} is not in KERNEL_FEATURES"
            );
        }
    }

    #[test]
    fn detection_knows_every_kernel_feature() {
        for f in KERNEL_FEATURES {
            assert!(detected(f).is_some(), "{f} is never detected");
        }
        assert_eq!(detected("vaes"), None);
    }

    /// `mul_x` against the scalar definition, on values whose carries cross both halves.
    #[test]
    fn mul_x_matches_the_scalar_doubling() {
        if !available() {
            return;
        }
        for v in [
            1u128,
            1 << 63,
            1 << 64,
            1 << 127,
            u128::MAX,
            0x8000_0000_8000_0000_8000_0000_8000_0000,
        ] {
            let want = (v << 1) ^ ((v >> 127) * 0x87);
            // SAFETY: available() held, so the CPU has SSE2 (mul_x's only feature); the loads and
            // stores are of local u128s (16 bytes each, unaligned).
            let got = unsafe {
                let t = _mm_loadu_si128((&v as *const u128).cast());
                let r = mul_x(t, _mm_set_epi32(0, 1, 0, 0x87));
                let mut out = 0u128;
                _mm_storeu_si128((&mut out as *mut u128).cast(), r);
                out
            };
            assert_eq!(got, want, "{v:#x}");
        }
    }
}
