//! AES-256-XTS over 512-byte data units, many blocks per cipher call.
//!
//! Convention (docs/formats.md, SPDK's): key = data key || tweak key; every 512-byte sector is its own
//! data unit; the initial tweak is 8 zero bytes followed by the absolute sector number as
//! little-endian u64. Equivalent to OpenSSL's `aes-256-xts` on one sector at a time.
//!
//! Three kernels do the work ([`Kernel`]); the best the CPU has is used unless
//! `UBIBLK_XTS_KERNEL` names one (for tests and benchmarks):
//! - `vaes`: 256-bit VAES + VPCLMULQDQ, two blocks per instruction (src/crypto/vaes.rs);
//! - `aesni`: 128-bit AES-NI, eight blocks in flight (src/crypto/aesni.rs);
//! - `portable`: the `aes` crate's parallel block API over a private copy, with the tweaks of a
//!   whole chunk computed first (any CPU).
//!
//! The x86 kernels read the source once and write the destination once, computing the tweaks in
//! registers.

use std::fmt;

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::Aes256;

use crate::SECTOR_SIZE;

const BLOCK: usize = 16;
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / BLOCK;
/// Sectors per cipher call: 32 sectors = 16 KiB = 1024 blocks (tweaks kept on the stack).
/// Large batches keep the parallel AES pipeline full; its tail is done a block at a time.
const BATCH_SECTORS: usize = 32;
const BATCH: usize = BATCH_SECTORS * SECTOR_SIZE;

type Block = Array<u8, aes::cipher::consts::U16>;

/// The environment variable that forces a kernel: `vaes`, `aesni`, `portable` (or `auto`).
pub const KERNEL_ENV: &str = "UBIBLK_XTS_KERNEL";

/// An implementation of the XTS data pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 256-bit VAES: x86_64 with AES-NI, AVX2, VAES and VPCLMULQDQ.
    Vaes,
    /// 128-bit AES-NI: x86_64 with AES-NI.
    AesNi,
    /// The `aes` crate (any CPU).
    Portable,
}

/// A kernel that cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{KERNEL_ENV}={0:?}: unknown kernel (vaes, aesni, portable or auto)")]
    Unknown(String),
    #[error("{KERNEL_ENV}={}: this CPU cannot run it (it needs {}); it can run: {}", .0, .0.needs(), usable_list())]
    Unavailable(Kernel),
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Vaes, Kernel::AesNi, Kernel::Portable];

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes => super::vaes::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AesNi => super::aesni::available(),
            Kernel::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU runs, fastest first.
    pub fn usable() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.available()).collect()
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        Kernel::usable()
            .first()
            .copied()
            .unwrap_or(Kernel::Portable)
    }

    /// The kernel `UBIBLK_XTS_KERNEL` names, or the best one without it (or with `auto`).
    pub fn from_env() -> Result<Kernel, KernelError> {
        Kernel::named(std::env::var(KERNEL_ENV).ok().as_deref())
    }

    /// The kernel `name` names (`None`, empty or `auto`: the best), if this CPU runs it.
    pub fn named(name: Option<&str>) -> Result<Kernel, KernelError> {
        let kernel = match name.map(str::trim) {
            None | Some("") | Some("auto") => return Ok(Kernel::best()),
            Some(name) => Kernel::ALL
                .into_iter()
                .find(|k| k.to_string() == name)
                .ok_or_else(|| KernelError::Unknown(name.chars().take(32).collect()))?,
        };
        if kernel.available() {
            Ok(kernel)
        } else {
            Err(KernelError::Unavailable(kernel))
        }
    }

    /// The CPU features it needs, for errors.
    fn needs(self) -> &'static str {
        match self {
            Kernel::Vaes => "x86_64 with AES-NI, AVX2, VAES and VPCLMULQDQ",
            Kernel::AesNi => "x86_64 with AES-NI",
            Kernel::Portable => "nothing",
        }
    }
}

/// [`Kernel::usable`] as text, for errors.
fn usable_list() -> String {
    let names: Vec<String> = Kernel::usable().iter().map(|k| k.to_string()).collect();
    names.join(", ")
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Kernel::Vaes => "vaes",
            Kernel::AesNi => "aesni",
            Kernel::Portable => "portable",
        })
    }
}

/// The x86 kernels' own copies of the data and tweak keys.
#[cfg(target_arch = "x86_64")]
enum Fast {
    Vaes(super::vaes::Keys, super::vaes::Keys),
    AesNi(super::aesni::RoundKeys, super::aesni::RoundKeys),
}

/// An AES-256-XTS key schedule. The round keys are zeroized on drop (`aes`' zeroize feature,
/// and the x86 kernels' key types).
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
    #[cfg(target_arch = "x86_64")]
    fast: Option<Fast>,
}

impl Xts {
    /// `data_key` encrypts the data, `tweak_key` the tweak; the fastest kernel this CPU runs.
    pub fn new(data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Self {
        Self::build(Kernel::best(), data_key, tweak_key)
    }

    /// [`Xts::new`] with `kernel`, if this CPU runs it.
    pub fn with_kernel(
        kernel: Kernel,
        data_key: &[u8; 32],
        tweak_key: &[u8; 32],
    ) -> Result<Self, KernelError> {
        if !kernel.available() {
            return Err(KernelError::Unavailable(kernel));
        }
        Ok(Self::build(kernel, data_key, tweak_key))
    }

    /// `kernel` must be available.
    fn build(kernel: Kernel, data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Self {
        // Built from slices so no key copy is left on the stack.
        Xts {
            data: Aes256::new(data_key.into()),
            tweak: Aes256::new(tweak_key.into()),
            #[cfg(target_arch = "x86_64")]
            fast: match kernel {
                Kernel::Vaes => Some(Fast::Vaes(
                    super::vaes::Keys::new(data_key),
                    super::vaes::Keys::new(tweak_key),
                )),
                Kernel::AesNi => Some(Fast::AesNi(
                    super::aesni::RoundKeys::new(data_key),
                    super::aesni::RoundKeys::new(tweak_key),
                )),
                Kernel::Portable => None,
            },
        }
    }

    /// The kernel that does the work.
    pub fn kernel(&self) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        match &self.fast {
            Some(Fast::Vaes(..)) => return Kernel::Vaes,
            Some(Fast::AesNi(..)) => return Kernel::AesNi,
            None => {}
        }
        Kernel::Portable
    }

    /// Encrypts whole sectors in place; `buf` starts at sector `first_sector`.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        // SAFETY: src and dst are both `buf`, valid for reads and writes of buf.len() bytes and
        // held exclusively (&mut) for the call; the same buffer is allowed by apply's contract.
        unsafe {
            self.apply(
                first_sector,
                buf.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                true,
            )
        }
    }

    /// Decrypts whole sectors in place; `buf` starts at sector `first_sector`.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        // SAFETY: as in encrypt: both pointers are `buf`, exclusively ours, buf.len() bytes.
        unsafe {
            self.apply(
                first_sector,
                buf.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                false,
            )
        }
    }

    /// Encrypts (or decrypts) `len` bytes of whole sectors from `src` into `dst`, so data
    /// moving between guest memory and our buffers is transformed in the same pass.
    ///
    /// # Safety
    /// `src` must be valid for reads and `dst` for writes of `len` bytes; they may be the same
    /// buffer but must not partially overlap. Either may be memory another party writes
    /// concurrently (guest RAM): the result is then unspecified but memory stays safe, as
    /// every access goes through raw-pointer loads and stores.
    pub unsafe fn apply(
        &self,
        first_sector: u64,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        encrypt: bool,
    ) {
        assert!(
            len.is_multiple_of(SECTOR_SIZE),
            "XTS works on whole sectors"
        );
        let mut off = 0;
        while off < len {
            let n = (len - off).min(BATCH);
            let sector0 = first_sector.wrapping_add((off / SECTOR_SIZE) as u64);
            let initial = self.initial_tweaks(sector0, n / SECTOR_SIZE);
            // SAFETY: off + n <= len, within both buffers per the caller's contract; `initial`
            // has a tweak for each of the n / 512 sectors.
            unsafe {
                self.data_pass(
                    &initial[..n / SECTOR_SIZE],
                    src.add(off),
                    dst.add(off),
                    n,
                    encrypt,
                )
            };
            off += n;
        }
    }

    /// The data pass over `n` bytes (at most a batch) of whole sectors whose first tweaks
    /// (encrypted with the tweak key) are `initial`.
    ///
    /// # Safety
    /// As [`Xts::apply`] for `n` bytes; `initial` has a tweak for each of the `n / 512` sectors
    /// and `n` is at most [`BATCH_SECTORS`] sectors.
    unsafe fn data_pass(
        &self,
        initial: &[u128],
        s: *const u8,
        d: *mut u8,
        n: usize,
        encrypt: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = &self.fast {
            // SAFETY: s and d are valid for n bytes and do not partially overlap, and `initial`
            // has a tweak for each sector (this fn's contract).
            unsafe {
                match fast {
                    Fast::Vaes(keys, _) => keys.xts(s, d, n, initial, !encrypt),
                    Fast::AesNi(keys, _) => keys.xts(s, d, n, initial, !encrypt),
                }
            }
            return;
        }
        // (Only here: zeroing these 16 KiB per call showed up in profiles of the VAES path.)
        let mut all_tweaks = [0u128; BATCH_SECTORS * BLOCKS_PER_SECTOR];
        let tweaks = &mut all_tweaks[..n / BLOCK];
        expand_tweaks(&initial[..n / SECTOR_SIZE], tweaks);
        // Portable path: through a private copy, so the cipher only sees our memory.
        let mut chunk = [Block::default(); BATCH / BLOCK];
        let blocks = &mut chunk[..n / BLOCK];
        // SAFETY: s is valid for n bytes; blocks is n bytes of our stack.
        unsafe { std::ptr::copy(s, blocks.as_mut_ptr().cast::<u8>(), n) };
        for (b, t) in blocks.iter_mut().zip(tweaks.iter()) {
            xor_block(b, *t);
        }
        if encrypt {
            in_full_batches(blocks, |b| self.data.encrypt_blocks(b));
        } else {
            in_full_batches(blocks, |b| self.data.decrypt_blocks(b));
        }
        for (b, t) in blocks.iter_mut().zip(tweaks.iter()) {
            xor_block(b, *t);
        }
        // SAFETY: d is valid for n bytes.
        unsafe { std::ptr::copy(blocks.as_ptr().cast::<u8>(), d, n) };
    }

    /// The first tweak of each of `sectors` sectors from `sector0`: E_k2(0^8 || LE64(sector)).
    fn initial_tweaks(&self, sector0: u64, sectors: usize) -> [u128; BATCH_SECTORS] {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = &self.fast {
            let mut t = [0u128; BATCH_SECTORS];
            for (i, t) in t[..sectors].iter_mut().enumerate() {
                *t = u128::from(sector0.wrapping_add(i as u64)) << 64;
            }
            match fast {
                Fast::Vaes(_, tweak) => tweak.encrypt_blocks(&mut t[..sectors]),
                Fast::AesNi(_, tweak) => tweak.encrypt_blocks(&mut t[..sectors]),
            }
            return t;
        }
        let mut blocks = [Block::default(); BATCH_SECTORS];
        for (i, t) in blocks[..sectors].iter_mut().enumerate() {
            t[8..].copy_from_slice(&sector0.wrapping_add(i as u64).to_le_bytes());
        }
        in_full_batches(&mut blocks[..sectors], |b| self.tweak.encrypt_blocks(b));
        blocks.map(|b| u128::from_le_bytes(b.into()))
    }
}

/// Every block's tweak from each sector's first one. The sectors' chains are independent:
/// step them side by side so the CPU overlaps them.
fn expand_tweaks(initial: &[u128], tweaks: &mut [u128]) {
    let sectors = initial.len();
    let mut lo = [0u64; BATCH_SECTORS];
    let mut hi = [0u64; BATCH_SECTORS];
    for (s, t) in initial.iter().enumerate() {
        (lo[s], hi[s]) = (*t as u64, (*t >> 64) as u64);
    }
    for b in 0..BLOCKS_PER_SECTOR {
        for s in 0..sectors {
            tweaks[s * BLOCKS_PER_SECTOR + b] = (u128::from(hi[s]) << 64) | u128::from(lo[s]);
            // Multiply by x in GF(2^128), IEEE 1619 bit order: shift left, reduce by 0x87.
            let carry = (hi[s] >> 63).wrapping_neg() & 0x87;
            hi[s] = (hi[s] << 1) | (lo[s] >> 63);
            lo[s] = (lo[s] << 1) ^ carry;
        }
    }
}

/// Blocks the widest `aes` backend (VAES, 2 x 15 ymm registers) processes per pipelined step.
const PAR_BLOCKS: usize = 30;

/// Runs `f` over `blocks` so that the cipher never falls back to its one-block-at-a-time path,
/// which is latency-bound and several times slower: a short tail is padded to a full step.
fn in_full_batches(blocks: &mut [Block], f: impl Fn(&mut [Block])) {
    let full = blocks.len() / PAR_BLOCKS * PAR_BLOCKS;
    let (head, tail) = blocks.split_at_mut(full);
    if !head.is_empty() {
        f(head);
    }
    if !tail.is_empty() {
        let mut scratch = [Block::default(); PAR_BLOCKS];
        scratch[..tail.len()].copy_from_slice(tail);
        f(&mut scratch);
        tail.copy_from_slice(&scratch[..tail.len()]);
    }
}

#[inline(always)]
fn xor_block(b: &mut Block, t: u128) {
    let v = u128::from_le_bytes((*b).into()) ^ t;
    *b = Array::from(v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(s: &str) -> [u8; 32] {
        hex(s).try_into().unwrap()
    }

    /// Every kernel this CPU runs, each with its own key schedule.
    fn each_kernel(k1: &[u8; 32], k2: &[u8; 32]) -> Vec<Xts> {
        let all: Vec<Xts> = Kernel::usable()
            .into_iter()
            .map(|k| Xts::with_kernel(k, k1, k2).unwrap())
            .collect();
        assert!(all.iter().any(|x| x.kernel() == Kernel::Portable));
        all
    }

    /// IEEE 1619-2007 Annex B, XTS-AES-256 vector 10: data unit sequence number 0xff, 512-byte
    /// unit. Its tweak (LE 0xff in the first bytes) is not our sector layout, so the vector is
    /// checked through the data pass with the raw tweak, on every kernel, and through
    /// `encrypt_unit`, the block-by-block reference the other tests compare with.
    #[test]
    fn ieee1619_vector_10() {
        let k1 = key("2718281828459045235360287471352662497757247093699959574966967627");
        let k2 = key("3141592653589793238462643383279502884197169399375105820974944592");
        let expect_prefix = hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b");
        let expect_suffix = hex("773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151");
        let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
        for xts in each_kernel(&k1, &k2) {
            let mut tweak = Block::default();
            tweak[0] = 0xff;
            xts.tweak.encrypt_block(&mut tweak);
            let initial = [u128::from_le_bytes(tweak.into())];
            let mut data = plain.clone();
            // SAFETY: one 512-byte sector, in place, with its tweak.
            unsafe { xts.data_pass(&initial, data.as_ptr(), data.as_mut_ptr(), 512, true) };
            assert_eq!(&data[..32], &expect_prefix[..], "{}", xts.kernel());
            assert_eq!(&data[480..], &expect_suffix[..], "{}", xts.kernel());
            // SAFETY: as above.
            unsafe { xts.data_pass(&initial, data.as_ptr(), data.as_mut_ptr(), 512, false) };
            assert_eq!(data, plain, "{}", xts.kernel());

            let mut unit = plain.clone();
            let mut raw = [0u8; 16];
            raw[0] = 0xff;
            encrypt_unit(&xts, raw, &mut unit);
            assert_eq!(&unit[..32], &expect_prefix[..]);
        }
    }

    /// Reference single-unit XTS with an arbitrary tweak, block by block (the slow, obvious
    /// way), to cross-check the batched path.
    fn encrypt_unit(xts: &Xts, tweak: [u8; 16], data: &mut [u8]) {
        let mut t = Block::from(tweak);
        xts.tweak.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.into());
        for chunk in data.chunks_exact_mut(16) {
            let mut b = Block::default();
            for i in 0..16 {
                b[i] = chunk[i] ^ t.to_le_bytes()[i];
            }
            xts.data.encrypt_block(&mut b);
            for i in 0..16 {
                chunk[i] = b[i] ^ t.to_le_bytes()[i];
            }
            t = (t << 1) ^ ((t >> 127) * 0x87);
        }
    }

    /// Every kernel agrees with the portable one, in place and from one buffer into another
    /// (the bounce path), across batch boundaries and the wrap of the sector number.
    #[test]
    fn every_kernel_agrees_with_portable() {
        let slow = Xts::with_kernel(Kernel::Portable, &[3; 32], &[4; 32]).unwrap();
        for fast in each_kernel(&[3; 32], &[4; 32]) {
            for sectors in [1usize, 7, 8, 32, 33, 128] {
                let plain: Vec<u8> = (0..512 * sectors).map(|i| (i * 7 % 253) as u8).collect();
                let (mut a, mut b) = (plain.clone(), plain.clone());
                fast.encrypt(u64::MAX - 3, &mut a);
                slow.encrypt(u64::MAX - 3, &mut b);
                assert_eq!(a, b, "{} {sectors} sectors", fast.kernel());
                let mut out = vec![0u8; plain.len()];
                // SAFETY: two distinct buffers of plain.len() bytes each.
                unsafe { fast.apply(u64::MAX - 3, a.as_ptr(), out.as_mut_ptr(), a.len(), false) };
                assert_eq!(out, plain, "{} {sectors} sectors", fast.kernel());
                fast.decrypt(u64::MAX - 3, &mut a);
                assert_eq!(a, plain);
            }
        }
    }

    #[test]
    fn batched_path_matches_block_by_block_reference() {
        let plain: Vec<u8> = (0..512 * 21).map(|i| (i * 13 % 251) as u8).collect();
        for xts in each_kernel(&[7; 32], &[9; 32]) {
            let mut batched = plain.clone();
            xts.encrypt(1000, &mut batched);
            for (i, sector) in plain.chunks(512).enumerate() {
                let mut t = [0u8; 16];
                t[8..].copy_from_slice(&(1000 + i as u64).to_le_bytes());
                let mut one = sector.to_vec();
                encrypt_unit(&xts, t, &mut one);
                assert_eq!(
                    &batched[i * 512..(i + 1) * 512],
                    &one[..],
                    "{} sector {i}",
                    xts.kernel()
                );
            }
            xts.decrypt(1000, &mut batched);
            assert_eq!(batched, plain);
        }
    }

    #[test]
    fn kernels_are_chosen_by_name_and_refused_when_missing() {
        assert_eq!(Kernel::named(None), Ok(Kernel::best()));
        assert_eq!(Kernel::named(Some("auto")), Ok(Kernel::best()));
        assert_eq!(Kernel::named(Some("portable")), Ok(Kernel::Portable));
        for k in Kernel::usable() {
            assert_eq!(Kernel::named(Some(&k.to_string())), Ok(k));
            assert_eq!(Xts::with_kernel(k, &[1; 32], &[2; 32]).unwrap().kernel(), k);
        }
        let e = Kernel::named(Some("aes-ni-fast")).unwrap_err();
        assert!(e.to_string().contains("unknown kernel"), "{e}");
        let e = KernelError::Unavailable(Kernel::Vaes).to_string();
        assert!(
            e.contains("UBIBLK_XTS_KERNEL=vaes") && e.contains("VAES"),
            "{e}"
        );
        assert!(e.contains("it can run: ") && e.contains("portable"), "{e}");
        assert_eq!(Xts::new(&[1; 32], &[2; 32]).kernel(), Kernel::best());
    }

    /// Vectors for the sector convention made with an independent implementation (OpenSSL via
    /// Python's `cryptography`):
    /// ```text
    /// python3 -c "from cryptography.hazmat.primitives.ciphers import Cipher,algorithms,modes
    /// k=bytes(range(64)); t=bytes(8)+(0x123456789).to_bytes(8,'little')
    /// e=Cipher(algorithms.AES(k),modes.XTS(t)).encryptor()
    /// print(e.update(bytes(i%256 for i in range(512))).hex())"
    /// ```
    #[test]
    fn sector_convention_matches_openssl() {
        let k: Vec<u8> = (0..64).collect();
        let expect = hex(OPENSSL_SECTOR_0X123456789);
        for xts in each_kernel(&k[..32].try_into().unwrap(), &k[32..].try_into().unwrap()) {
            let mut data: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
            xts.encrypt(0x1_2345_6789, &mut data);
            assert_eq!(data, expect, "{}", xts.kernel());
        }
    }

    const OPENSSL_SECTOR_0X123456789: &str = concat!(
        "386809c6c3a4b52d72ede714a70e1a618200274bd0a7d0078d97d31aaba0fd3c",
        "912c49386418063bf35ca45a403e32d542a2f6b77511633638b6c52a7b7bfc5a",
        "cb1ae564731acbd689722b23a0ef5e0f8e5dd4b8674f1c2f1751990af9694f51",
        "ea8511999d4eb02e8eca6dd62f7e772f7d6c97906de20a622698c26de6c8dc15",
        "390289354af440035f7750f725c47ad687434ef49d5f1c78ecbd2696a6dec3aa",
        "1b80166513f039473145efb2d906735bee7f404d6d3d26e1d669a0296f2b7c6e",
        "696c27e7e20177db0ba5fd38787fe7d1bd54787b955f624ddffb6cd5195713cb",
        "2e7ac91e7b9c8ff720bcdd6286ab3f6399b6e3fc4211ab9d0b2605d0b6146641",
        "30d818f016767f90c6fc60ec973ee32633e18e40982b0b8ad0f7036e970aa5a7",
        "951822f8479e066012d88021e1dfb7b20fb4ef7562f242ce6ed1225fa9ea2f91",
        "e59cd564cca62e6369c9f98b3a3a39c976b1e7d6587b0f72899f2ec85ae6a5d9",
        "383e48833e7d8896ab69a87f072ed4f7d8880d42687cc8f4e01a0bb7bafb5a17",
        "1a69c42c31b28e3a402e95b296bf5df3d4a36329d07dc84eed2028d5d3ea5515",
        "eb57bbb74a6a9e7d6fdd1d09d24e941e991d140e01b4e4e5c12875c10f3320c3",
        "b9586fa256d8071784a5e2c5f1225bd05c2f3d52673715425c6f28f1d4b7f2a5",
        "d83144eb8c9a5bd98fd92d14f5992457f2786f3209c8fbece078129e0db81b51",
    );
}
