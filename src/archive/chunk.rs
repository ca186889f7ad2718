//! Chunks: their names (keyed hashes of their plaintext) and their objects (compressed, then
//! encrypted).
//!
//! Object `chunks/<hex name>` = nonce (12 random bytes) || AES-256-GCM(data key, nonce,
//! zstd(plaintext), AAD = label || object key) || tag (16). The AAD binds each object to its
//! name, so objects swapped in the store fail authentication; opening also checks the length
//! and recomputes the name from the plaintext.

use std::fmt;
use std::io;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::secret::{random, Keys, NONCE_LEN, TAG_LEN};

/// The AAD of a chunk object, before its key.
const CHUNK_AAD: &[u8] = b"ubiblk disk archive v1: chunk ";
/// Where chunk objects live in the store.
pub const CHUNK_PREFIX: &str = "chunks/";

/// HMAC-SHA256 of a chunk's plaintext under the archive's name key: equal chunks of one
/// archive share a name (and an object), and without the key a name says nothing about the
/// content (unlike a plain hash, which anyone can compare with a guess).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkName(pub [u8; 32]);

impl ChunkName {
    pub fn of(keys: &Keys, plaintext: &[u8]) -> ChunkName {
        let mut mac = hmac(&keys.name[..]);
        mac.update(plaintext);
        ChunkName(mac.finalize().into_bytes().into())
    }

    /// The object's key in the store.
    pub fn key(&self) -> String {
        format!("{CHUNK_PREFIX}{self}")
    }

    /// From 64 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<ChunkName> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(ChunkName(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex, as in object keys and the manifest.
impl fmt::Display for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ChunkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkName({self})")
    }
}

/// HMAC-SHA256 with `key` (32 bytes: HMAC takes keys of any length, so this cannot fail).
pub(super) fn hmac(key: &[u8]) -> Hmac<Sha256> {
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Why a chunk object could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("object is {len} bytes, too short for a sealed chunk (truncated?)")]
    TooShort { len: usize },
    #[error("object is {len} bytes, more than a chunk of {chunk} bytes can take")]
    TooLong { len: usize, chunk: usize },
    #[error("authentication failed (a damaged object, or another chunk's object under this name)")]
    Authentication,
    #[error("cannot decompress: {0}")]
    Decompress(io::Error),
    #[error("holds {got} bytes, the chunk is {want}")]
    Length { got: usize, want: usize },
    #[error("content does not match its name")]
    Name,
    #[error("cannot compress: {0}")]
    Compress(io::Error),
    #[error("cannot encrypt")]
    Encrypt,
    #[error("no random nonce: {0}")]
    Random(String),
}

/// The largest object a chunk of `chunk` bytes can have (what zstd may produce for
/// incompressible data, plus nonce and tag): anything longer is refused unread.
pub fn max_object_len(chunk: usize) -> usize {
    zstd::zstd_safe::compress_bound(chunk) + NONCE_LEN + TAG_LEN
}

fn gcm(keys: &Keys) -> Aes256Gcm {
    Aes256Gcm::new((&*keys.data).into())
}

fn aad(name: &ChunkName) -> Vec<u8> {
    [CHUNK_AAD, name.key().as_bytes()].concat()
}

/// The object for `plaintext`, named `name`, compressed at zstd `level`.
pub fn seal(
    keys: &Keys,
    name: &ChunkName,
    plaintext: &[u8],
    level: i32,
) -> Result<Vec<u8>, ChunkError> {
    let compressed = zstd::bulk::compress(plaintext, level).map_err(ChunkError::Compress)?;
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce).map_err(|e| ChunkError::Random(e.to_string()))?;
    let mut object = Vec::with_capacity(NONCE_LEN + compressed.len() + TAG_LEN);
    object.extend_from_slice(&nonce);
    object.extend_from_slice(&compressed);
    let tag = gcm(keys)
        .encrypt_inout_detached(
            &Nonce::from(nonce),
            &aad(name),
            object[NONCE_LEN..].as_mut().into(),
        )
        .map_err(|_| ChunkError::Encrypt)?;
    object.extend_from_slice(&tag);
    Ok(object)
}

/// The plaintext of `object`, which must be the chunk `name` of `len` bytes. Nothing is
/// returned unless the object is authentic, decompresses to exactly `len` bytes and those
/// bytes have that name.
pub fn open(
    keys: &Keys,
    name: &ChunkName,
    mut object: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>, ChunkError> {
    let olen = object.len();
    if olen < NONCE_LEN + TAG_LEN {
        return Err(ChunkError::TooShort { len: olen });
    }
    if olen > max_object_len(len) {
        return Err(ChunkError::TooLong {
            len: olen,
            chunk: len,
        });
    }
    let tag = Tag::try_from(&object[olen - TAG_LEN..]).map_err(|_| ChunkError::Authentication)?;
    let nonce = Nonce::try_from(&object[..NONCE_LEN]).map_err(|_| ChunkError::Authentication)?;
    let body = &mut object[NONCE_LEN..olen - TAG_LEN];
    gcm(keys)
        .decrypt_inout_detached(&nonce, &aad(name), body.into(), &tag)
        .map_err(|_| ChunkError::Authentication)?;
    // Bounded by `len`: a frame claiming more fails rather than allocating it.
    let plain = zstd::bulk::decompress(body, len).map_err(ChunkError::Decompress)?;
    if plain.len() != len {
        return Err(ChunkError::Length {
            got: plain.len(),
            want: len,
        });
    }
    // Defense in depth: authentic objects are only made by holders of the key, but a name
    // that does not match would mean wrong data under a valid-looking name.
    let mut mac = hmac(&keys.name[..]);
    mac.update(&plain);
    mac.verify_slice(&name.0).map_err(|_| ChunkError::Name)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::secret::Secret;

    fn keys() -> Keys {
        Secret::generate().unwrap().keys()
    }

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 7) as u8 ^ seed).collect()
    }

    #[test]
    fn round_trip_compresses_and_names_by_keyed_hash() {
        let k = keys();
        let plain = data(1, 65536);
        let name = ChunkName::of(&k, &plain);
        assert_eq!(ChunkName::from_hex(&name.to_string()), Some(name));
        assert_eq!(name.key(), format!("chunks/{name}"));
        let object = seal(&k, &name, &plain, 3).unwrap();
        assert!(object.len() < plain.len() / 4, "{}", object.len());
        assert_eq!(open(&k, &name, object.clone(), plain.len()).unwrap(), plain);
        // Sealing again: a fresh nonce, another object, the same plaintext.
        let again = seal(&k, &name, &plain, 3).unwrap();
        assert_ne!(again, object);
        assert_eq!(open(&k, &name, again, plain.len()).unwrap(), plain);
        // Another archive's key names the same content differently.
        assert_ne!(ChunkName::of(&keys(), &plain), name);
    }

    #[test]
    fn damaged_swapped_truncated_or_mislengthed_objects_are_errors() {
        let k = keys();
        let (a, b) = (data(1, 8192), data(2, 8192));
        let (na, nb) = (ChunkName::of(&k, &a), ChunkName::of(&k, &b));
        let (oa, ob) = (seal(&k, &na, &a, 3).unwrap(), seal(&k, &nb, &b, 3).unwrap());
        for i in [0, 5, NONCE_LEN, oa.len() / 2, oa.len() - 1] {
            let mut bad = oa.clone();
            bad[i] ^= 0x40;
            let e = open(&k, &na, bad, a.len()).unwrap_err();
            assert!(matches!(e, ChunkError::Authentication), "byte {i}: {e}");
        }
        // b's object under a's name.
        let e = open(&k, &na, ob, a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::Authentication), "{e}");
        let e = open(&k, &na, oa[..oa.len() - 1].to_vec(), a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::Authentication), "{e}");
        let e = open(&k, &na, oa[..20].to_vec(), a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::TooShort { .. }), "{e}");
        let e = open(&k, &na, vec![0; 1 << 20], a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::TooLong { .. }), "{e}");
        // The right object, expected at another length (a short last chunk, a wrong manifest).
        let e = open(&k, &na, oa.clone(), a.len() - 512).unwrap_err();
        assert!(matches!(e, ChunkError::Decompress(_)), "{e}");
        let e = open(&k, &na, oa.clone(), a.len() + 512).unwrap_err();
        assert!(matches!(e, ChunkError::Length { .. }), "{e}");
        // Wrong keys.
        let e = open(&keys(), &na, oa, a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::Authentication), "{e}");
    }

    #[test]
    fn an_authentic_object_whose_content_is_not_its_name_is_refused() {
        let k = keys();
        let (a, b) = (data(1, 4096), data(2, 4096));
        let nb = ChunkName::of(&k, &b);
        // a sealed under b's name: only a key holder can make this, still never served as b.
        let forged = seal(&k, &nb, &a, 3).unwrap();
        let e = open(&k, &nb, forged, a.len()).unwrap_err();
        assert!(matches!(e, ChunkError::Name), "{e}");
    }

    #[test]
    fn hex_names_are_strict() {
        let n = ChunkName([0xab; 32]);
        assert_eq!(n.to_string(), "ab".repeat(32));
        for bad in [
            "",
            "ab",
            &"AB".repeat(32),
            &"g0".repeat(32),
            &"ab".repeat(33),
        ] {
            assert_eq!(ChunkName::from_hex(bad), None, "{bad}");
        }
    }
}
