//! Cryptography: the XTS data cipher and KEK unwrapping of data keys.

#[cfg(target_arch = "x86_64")]
mod aesni;
pub mod keys;
#[cfg(target_arch = "x86_64")]
mod vaes;
pub mod xts;

pub use xts::{Kernel, KernelError, Xts, KERNEL_ENV};

/// The features of each `#[target_feature(enable = ...)]` in `source` (a kernel file's text),
/// one list per function: each kernel file's tests check them against its detected features.
#[cfg(all(test, target_arch = "x86_64"))]
fn target_feature_lists(source: &str) -> Vec<Vec<String>> {
    let attr = concat!("#[target_feature(enable = ", "\"");
    source
        .lines()
        .filter_map(|line| line.trim().strip_prefix(attr))
        .map(|list| {
            let list = list.split('"').next().unwrap_or_default();
            list.split(',').map(|f| f.trim().to_string()).collect()
        })
        .collect()
}
