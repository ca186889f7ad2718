//! Cryptography: the XTS data cipher and KEK unwrapping of data keys.

#[cfg(target_arch = "x86_64")]
mod aesni;
pub mod keys;
#[cfg(target_arch = "x86_64")]
mod vaes;
pub mod xts;

pub use xts::{Kernel, KernelError, Xts, KERNEL_ENV};
