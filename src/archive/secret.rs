//! The per-archive secret, its wrapping with the KEK, and the keys derived from it.
//!
//! One random 32-byte secret per archive (kept when the same disk is archived again to the
//! same place, so chunk names stay the same and unchanged chunks are not uploaded again).
//! HKDF-SHA256 turns it into three independent keys: the AES-256-GCM data key, the HMAC key
//! that names chunks, and the HMAC key that authenticates the manifest. The secret is stored
//! in the manifest sealed with the KEK's AES-256-GCM key under a fresh random nonce (never
//! the KEK file's fixed `init_vector`: two messages under one GCM nonce leak their xor and
//! allow forgeries).

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::ArchiveError;
use crate::crypto::keys::Kek;

/// Bytes of the secret and of every derived key.
pub const KEY_LEN: usize = 32;
/// A GCM nonce.
pub const NONCE_LEN: usize = 12;
/// A GCM tag.
pub const TAG_LEN: usize = 16;
/// The sealed secret: ciphertext then tag.
pub const SEALED_LEN: usize = KEY_LEN + TAG_LEN;

/// Binds a sealed secret to its use: a KEK-sealed blob of another kind (an `encryption_key`
/// entry) does not open as an archive secret.
const WRAP_AAD: &[u8] = b"ubiblk disk archive v1: archive secret";
/// HKDF salt and per-key labels.
const HKDF_SALT: &[u8] = b"ubiblk disk archive v1";
const DATA_INFO: &[u8] = b"chunk data key (AES-256-GCM)";
const NAME_INFO: &[u8] = b"chunk name key (HMAC-SHA256)";
const MAC_INFO: &[u8] = b"manifest key (HMAC-SHA256)";

/// The KEK's AES-256-GCM key: archives need one (their secret is never stored in the clear).
pub fn kek_key(kek: Option<&Kek>) -> Result<&[u8; KEY_LEN], ArchiveError> {
    match kek {
        Some(Kek::Aes256Gcm { key, .. }) => Ok(key),
        Some(Kek::None) | None => Err(ArchiveError::KekRequired),
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<(), ArchiveError> {
    getrandom::fill(buf).map_err(|e| ArchiveError::Random(e.to_string()))
}

/// The archive's secret; zeroed on drop.
pub struct Secret(Zeroizing<[u8; KEY_LEN]>);

/// Redacted: the secret never appears in a log or an error.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The secret as the manifest stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedSecret {
    pub nonce: [u8; NONCE_LEN],
    pub sealed: [u8; SEALED_LEN],
}

impl Secret {
    /// A new random secret.
    pub fn generate() -> Result<Secret, ArchiveError> {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut secret[..])?;
        Ok(Secret(secret))
    }

    /// Sealed with `kek` under a fresh random nonce.
    pub fn wrap(&self, kek: &[u8; KEY_LEN]) -> Result<WrappedSecret, ArchiveError> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let gcm = Aes256Gcm::new(kek.into());
        let mut sealed = [0u8; SEALED_LEN];
        let (ct, tag_out) = sealed.split_at_mut(KEY_LEN);
        ct.copy_from_slice(&self.0[..]);
        let tag = gcm
            .encrypt_inout_detached(&Nonce::from(nonce), WRAP_AAD, ct.into())
            .map_err(|_| ArchiveError::Seal)?;
        tag_out.copy_from_slice(&tag);
        Ok(WrappedSecret { nonce, sealed })
    }

    /// Opens `wrapped` with `kek`; a wrong KEK or a modified blob fails authentication.
    pub fn unwrap(wrapped: &WrappedSecret, kek: &[u8; KEY_LEN]) -> Result<Secret, ArchiveError> {
        let gcm = Aes256Gcm::new(kek.into());
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        secret.copy_from_slice(&wrapped.sealed[..KEY_LEN]);
        let tag = Tag::try_from(&wrapped.sealed[KEY_LEN..]).map_err(|_| ArchiveError::WrongKek)?;
        gcm.decrypt_inout_detached(
            &Nonce::from(wrapped.nonce),
            WRAP_AAD,
            secret[..].as_mut().into(),
            &tag,
        )
        .map_err(|_| ArchiveError::WrongKek)?;
        Ok(Secret(secret))
    }

    /// The keys derived from the secret.
    pub fn keys(&self) -> Keys {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0[..]);
        let derive = |info: &[u8]| {
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            // 32 bytes is far below HKDF-SHA256's limit (255 * 32): this cannot fail.
            let _ = hkdf.expand(info, &mut key[..]);
            key
        };
        Keys {
            data: derive(DATA_INFO),
            name: derive(NAME_INFO),
            mac: derive(MAC_INFO),
        }
    }
}

/// The keys an archive is read and written with; zeroed on drop.
pub struct Keys {
    /// AES-256-GCM key of the chunk objects.
    pub(super) data: Zeroizing<[u8; KEY_LEN]>,
    /// HMAC-SHA256 key of chunk names.
    pub(super) name: Zeroizing<[u8; KEY_LEN]>,
    /// HMAC-SHA256 key of the manifest.
    pub(super) mac: Zeroizing<[u8; KEY_LEN]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_under_fresh_nonces_and_refuses_a_wrong_kek() {
        let secret = Secret::generate().unwrap();
        let kek = [7u8; 32];
        let (a, b) = (secret.wrap(&kek).unwrap(), secret.wrap(&kek).unwrap());
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.sealed, b.sealed);
        for w in [&a, &b] {
            let back = Secret::unwrap(w, &kek).unwrap();
            assert_eq!(back.0[..], secret.0[..]);
        }
        assert!(matches!(
            Secret::unwrap(&a, &[8u8; 32]),
            Err(ArchiveError::WrongKek)
        ));
        let mut bad = a.clone();
        bad.sealed[40] ^= 1;
        assert!(matches!(
            Secret::unwrap(&bad, &kek),
            Err(ArchiveError::WrongKek)
        ));
    }

    #[test]
    fn derived_keys_differ_from_each_other_and_between_secrets() {
        let (s1, s2) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        let (k1, k2) = (s1.keys(), s2.keys());
        assert_ne!(k1.data[..], k1.name[..]);
        assert_ne!(k1.name[..], k1.mac[..]);
        assert_ne!(k1.data[..], k2.data[..]);
        assert_eq!(s1.keys().name[..], k1.name[..]);
    }

    #[test]
    fn archives_need_an_aes_gcm_kek() {
        assert!(matches!(kek_key(None), Err(ArchiveError::KekRequired)));
        assert!(matches!(
            kek_key(Some(&Kek::None)),
            Err(ArchiveError::KekRequired)
        ));
        let kek = Kek::Aes256Gcm {
            key: Zeroizing::new([1; 32]),
            iv: [0; 12],
            aad: Vec::new(),
        };
        assert_eq!(kek_key(Some(&kek)).unwrap(), &[1; 32]);
    }
}
