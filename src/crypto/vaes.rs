//! The XTS data pass with 256-bit VAES: two blocks per instruction, sixteen blocks in flight.
//!
//! The `aes` crate would do this itself, but its CPU detection (cpufeatures 0.3) requires
//! AVX-512 state for VAES and so never enables VAES on CPUs that have it without AVX-512
//! (AMD Zen 3/4, the machines we run on). std's detection gets it right, so we detect with std
//! and run this kernel; everywhere else the `aes` crate's own pipelined path is used.

use core::arch::x86_64::*;

use super::aesni::{load128, RoundKeys};

/// [`RoundKeys`] for a CPU that runs these kernels.
pub struct Keys(RoundKeys);

/// Every target feature the functions below are compiled with (their
/// `#[target_feature(enable = ...)]` lists, pinned by a test): running them on a CPU that lacks
/// one is an illegal instruction, so the kernels are used only when all are present.
const KERNEL_FEATURES: [&str; 5] = ["aes", "sse2", "avx2", "vaes", "vpclmulqdq"];

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    runs_kernels(|feature| detected(feature).unwrap_or(false))
}

/// The decision, apart from the hardware: whether a CPU that has exactly the features for which
/// `has` is true runs the kernels.
fn runs_kernels(has: impl Fn(&str) -> bool) -> bool {
    KERNEL_FEATURES.iter().all(|f| has(f))
}

/// std's run-time detection of one of [`KERNEL_FEATURES`] (the macro takes only literals);
/// `None` for a name it is not asked about here, which [`available`] treats as absent.
fn detected(feature: &str) -> Option<bool> {
    Some(match feature {
        "aes" => is_x86_feature_detected!("aes"),
        "sse2" => is_x86_feature_detected!("sse2"),
        "avx2" => is_x86_feature_detected!("avx2"),
        "vaes" => is_x86_feature_detected!("vaes"),
        "vpclmulqdq" => is_x86_feature_detected!("vpclmulqdq"),
        _ => return None,
    })
}

impl Keys {
    /// Panics if [`available`] is false.
    pub fn new(key: &[u8; 32]) -> Self {
        assert!(available());
        Keys(RoundKeys::new(key))
    }

    /// Encrypts each 16-byte block of `blocks` (ECB) with these keys.
    pub fn encrypt_blocks(&self, blocks: &mut [u128]) {
        // SAFETY: a Keys is only built by `new`, which asserted available(): the CPU has every
        // feature the kernel is compiled with.
        unsafe { ecb_encrypt_kernel(&self.0, blocks) }
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
        unsafe { xts_kernel(&self.0, src, dst, len, initial, decrypt) }
    }
}

/// Encrypts 16-byte blocks in place (ECB), two per instruction: the sectors' first tweaks.
///
/// Callers that are not compiled with these features call it in `unsafe`, having checked
/// [`available`].
#[target_feature(enable = "vaes,avx2,aes")]
fn ecb_encrypt_kernel(rk: &RoundKeys, blocks: &mut [u128]) {
    let mut k = [_mm256_setzero_si256(); 15];
    for (dst, src) in k.iter_mut().zip(&rk.enc) {
        *dst = _mm256_broadcastsi128_si256(load128(src));
    }
    for pair in blocks.chunks_mut(2) {
        let p = pair.as_mut_ptr().cast::<u8>();
        // SAFETY: `pair` is 2 or 1 blocks of `blocks`, held exclusively (&mut): 32 bytes are
        // read only when it has 2 blocks, else 16 (unaligned loads).
        let mut x = unsafe {
            if pair.len() == 2 {
                _mm256_loadu_si256(p.cast())
            } else {
                _mm256_castsi128_si256(_mm_loadu_si128(p.cast()))
            }
        };
        x = _mm256_xor_si256(x, k[0]);
        for key in &k[1..14] {
            x = _mm256_aesenc_epi128(x, *key);
        }
        x = _mm256_aesenclast_epi128(x, k[14]);
        // SAFETY: as for the load: the same `pair`, written with the width it has.
        unsafe {
            if pair.len() == 2 {
                _mm256_storeu_si256(p.cast(), x);
            } else {
                _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(x));
            }
        }
    }
    for kk in k.iter_mut() {
        *kk = _mm256_setzero_si256();
    }
    std::hint::black_box(&k);
}

const LANES: usize = 8; // ymm registers in flight = 16 blocks = half a sector
const YMM_PER_SECTOR: usize = 16;

/// The tweaks of blocks 2i and 2i+1 of a sector whose first tweak is `t0` (in both lanes):
/// `t0 * x^j` for j = `c` (per 64-bit element: [2i, 2i, 2i+1, 2i+1]); `rc` = 64 - `c`.
/// A shift of the 128-bit value by j < 64 bits, with the j bits shifted out reduced back in
/// as `top * 0x87` (carry-less). Each block's tweak is computed independently, so there is no
/// serial chain from one block to the next.
///
/// Called only from [`xts_kernel`], which has these features (and into which it is inlined).
#[target_feature(enable = "avx2,vpclmulqdq")]
#[inline]
fn tweak_pair(t0: __m256i, c: __m256i, rc: __m256i, poly: __m256i) -> __m256i {
    let shifted = _mm256_sllv_epi64(t0, c);
    let spill = _mm256_srlv_epi64(t0, rc); // per half: the bits shifted out (0 when c = 0)
    let carry = _mm256_slli_si256::<8>(spill); // low half's spill into the high half
    let top = _mm256_srli_si256::<8>(spill); // high half's spill, to reduce
    let reduced = _mm256_clmulepi64_epi128::<0x00>(top, poly);
    _mm256_xor_si256(_mm256_xor_si256(shifted, carry), reduced)
}

/// The data pass of [`Keys::xts`].
///
/// # Safety
/// The CPU has every feature enabled here ([`available`]); `src` is valid for reads and `dst`
/// for writes of `len` bytes (same buffer or not overlapping), `len` is a multiple of 512 and
/// `initial` has a tweak for each of its sectors.
#[target_feature(enable = "vaes,vpclmulqdq,avx2,aes")]
unsafe fn xts_kernel(
    rk: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    initial: &[u128],
    decrypt: bool,
) {
    let keys = if decrypt { &rk.dec } else { &rk.enc };
    let mut k = [_mm256_setzero_si256(); 15];
    for (dst, src) in k.iter_mut().zip(keys) {
        *dst = _mm256_broadcastsi128_si256(load128(src));
    }
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let mut counts = [[_mm256_setzero_si256(); 2]; YMM_PER_SECTOR];
    for (i, c) in counts.iter_mut().enumerate() {
        let (a, b) = (2 * i as i64, 2 * i as i64 + 1);
        *c = [
            _mm256_set_epi64x(b, b, a, a),
            _mm256_set_epi64x(64 - b, 64 - b, 64 - a, 64 - a),
        ];
    }
    let sectors = len / 512;
    for (s, t0) in initial.iter().enumerate().take(sectors) {
        // SAFETY: `t0` is a reference to 16 readable bytes (unaligned load).
        let t0 =
            _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128((t0 as *const u128).cast()) });
        for half in 0..YMM_PER_SECTOR / LANES {
            let base = s * 512 + half * LANES * 32;
            let mut x = [_mm256_setzero_si256(); LANES];
            let mut t = [_mm256_setzero_si256(); LANES];
            for j in 0..LANES {
                let [c, rc] = counts[half * LANES + j];
                t[j] = tweak_pair(t0, c, rc, poly);
                // SAFETY: base + j * 32 + 32 <= (s + 1) * 512 <= sectors * 512 <= len, so the
                // 32 bytes are inside `src`, valid for reads of len bytes (caller's contract);
                // the load is unaligned.
                let d = unsafe { _mm256_loadu_si256(src.add(base + j * 32).cast()) };
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
            for j in 0..LANES {
                let last = if decrypt {
                    _mm256_aesdeclast_epi128(x[j], k[14])
                } else {
                    _mm256_aesenclast_epi128(x[j], k[14])
                };
                let out = _mm256_xor_si256(last, t[j]);
                // SAFETY: the same 32 bytes as the load, inside `dst`, valid for writes of len
                // bytes (caller's contract); if `dst` is `src`, these bytes were already read.
                unsafe { _mm256_storeu_si256(dst.add(base + j * 32).cast(), out) };
            }
        }
    }
    // Do not leave round keys in stack slots.
    for kk in k.iter_mut() {
        *kk = _mm256_setzero_si256();
    }
    std::hint::black_box(&k);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runs_kernels` for a CPU with exactly `features`.
    fn runs_with(features: &[&str]) -> bool {
        runs_kernels(|f| features.contains(&f))
    }

    #[test]
    fn needs_every_kernel_feature() {
        assert!(runs_with(&KERNEL_FEATURES));
        // Zen 4 or Ice Lake: all of them, plus others that do not matter.
        let zen4 = ["sse2", "aes", "avx2", "avx512f", "vaes", "vpclmulqdq"];
        assert!(runs_with(&zen4));
        // Any one missing falls back to the portable path.
        for missing in KERNEL_FEATURES {
            let rest: Vec<&str> = KERNEL_FEATURES
                .into_iter()
                .filter(|&f| f != missing)
                .collect();
            assert!(!runs_with(&rest), "runs without {missing}");
        }
        // The defect this pins: VAES without VPCLMULQDQ would fault in the tweak computation.
        assert!(!runs_with(&["sse2", "aes", "avx2", "vaes"]));
        // AES-NI only (pre-VAES CPUs), and nothing at all.
        assert!(!runs_with(&["sse2", "aes", "avx2"]));
        assert!(!runs_with(&[]));
    }

    /// Every feature in a `#[target_feature(enable = ...)]` of this file is checked, so a
    /// kernel gaining an instruction set cannot run on a CPU without it.
    #[test]
    fn kernel_features_cover_every_target_feature() {
        let lists = super::super::target_feature_lists(include_str!("vaes.rs"));
        assert_eq!(
            lists.len(),
            3,
            "expected the three target_feature functions"
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
        assert_eq!(detected("avx512f"), None);
        assert_eq!(
            available(),
            KERNEL_FEATURES.iter().all(|f| detected(f) == Some(true))
        );
    }
}
