//! The manifest (`manifest.json`): what the archive holds and the sealed secret, authenticated.
//!
//! ```json
//! {"format":"ubiblk-disk-archive","version":1,
//!  "key":{"nonce":"<base64, 12 bytes>","sealed":"<base64, 48 bytes>"},
//!  "body":{"disk_bytes":N,"chunk_bytes":M,"chunks":[null,"<64 hex digits>",...]},
//!  "mac":"<64 hex digits>"}
//! ```
//!
//! `key` is the secret sealed with the KEK (authenticated by GCM); `mac` is HMAC-SHA256 with
//! the manifest key of a label followed by the exact bytes of `body` as they are in the file
//! (kept verbatim with a raw JSON value, so no canonical form is needed). Reading checks the
//! size, the format and version, unwraps the secret, verifies the MAC, and only then parses
//! the body and checks its bounds.

use std::collections::HashSet;
use std::fmt;

use base64::Engine;
use hmac::Mac;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::chunk::{hmac, ChunkName};
use super::secret::{Keys, Secret, WrappedSecret, KEY_LEN, NONCE_LEN, SEALED_LEN};
use super::ArchiveError;

/// The manifest's object key.
pub const MANIFEST_KEY: &str = "manifest.json";
pub const FORMAT: &str = "ubiblk-disk-archive";
pub const VERSION: u32 = 1;
/// The MAC's input starts with this, then the body's bytes.
const MAC_LABEL: &[u8] = b"ubiblk disk archive v1: manifest body\0";

/// Bounds a manifest from the store must keep (a hostile store must not make a reader
/// allocate without limit): 2^24 chunks (16 TiB in 1 MiB chunks, 512 TiB in 32 MiB ones), at
/// most ~70 bytes each in the file.
pub const MAX_CHUNKS: u64 = 1 << 24;
pub const MAX_MANIFEST_BYTES: usize = 72 << 24;
/// Chunk sizes: multiples of 512 from 4 KiB to 32 MiB (the lazy-fetch stripe sizes, and the
/// 1 MiB of plain disks).
pub const MIN_CHUNK_BYTES: u64 = 4096;
pub const MAX_CHUNK_BYTES: u64 = 32 << 20;

/// What an archive holds: the disk's size, its chunk size, and each chunk's name (`None`: all
/// zeros, stored as nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub disk_bytes: u64,
    pub chunk_bytes: u64,
    #[serde(deserialize_with = "bounded_chunks")]
    pub chunks: Vec<Option<ChunkName>>,
}

impl Manifest {
    /// A manifest with every chunk zero, checking the bounds.
    pub fn new(disk_bytes: u64, chunk_bytes: u64) -> Result<Manifest, ArchiveError> {
        check_geometry(disk_bytes, chunk_bytes)?;
        let count = disk_bytes.div_ceil(chunk_bytes) as usize;
        Ok(Manifest {
            disk_bytes,
            chunk_bytes,
            chunks: vec![None; count],
        })
    }

    /// Bytes of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_bytes;
        self.chunk_bytes.min(self.disk_bytes.saturating_sub(start))
    }

    /// The names of the chunks stored.
    pub fn names(&self) -> HashSet<ChunkName> {
        self.chunks.iter().flatten().copied().collect()
    }

    /// The manifest file: `self` with `secret` sealed by `kek`, authenticated with the
    /// secret's manifest key.
    pub fn encode(&self, secret: &Secret, kek: &[u8; KEY_LEN]) -> Result<Vec<u8>, ArchiveError> {
        let bad = |e: serde_json::Error| ArchiveError::Manifest(e.to_string());
        let body = RawValue::from_string(serde_json::to_string(self).map_err(bad)?).map_err(bad)?;
        let envelope = Envelope {
            format: FORMAT.into(),
            version: VERSION,
            key: KeyField::seal(secret, kek)?,
            mac: hex(&mac(&secret.keys(), body.get())),
            body: &body,
        };
        serde_json::to_vec(&envelope).map_err(bad)
    }

    /// Reads a manifest file with `kek`: the manifest and the archive's secret. Nothing in the
    /// body is looked at before its MAC is verified.
    pub fn decode(bytes: &[u8], kek: &[u8; KEY_LEN]) -> Result<(Manifest, Secret), ArchiveError> {
        Self::decode_with_mac(bytes, kek).map(|(manifest, secret, _)| (manifest, secret))
    }

    /// [`Manifest::decode`], with the verified MAC (lowercase hex, as in the file): a value
    /// that changes with every change of the body (any chunk, the size), and with the key, so
    /// it tells one version of an archive from another. It is no secret (the store holds it).
    pub fn decode_with_mac(
        bytes: &[u8],
        kek: &[u8; KEY_LEN],
    ) -> Result<(Manifest, Secret, String), ArchiveError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ArchiveError::Manifest(format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} a manifest can be",
                bytes.len()
            )));
        }
        let envelope: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| ArchiveError::Manifest(format!("not a disk archive manifest: {e}")))?;
        if envelope.format != FORMAT || envelope.version != VERSION {
            return Err(ArchiveError::Manifest(format!(
                "format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
                envelope.format, envelope.version
            )));
        }
        let secret = envelope.key.unseal(kek)?;
        let want = ChunkName::from_hex(&envelope.mac).ok_or(ArchiveError::ManifestMac)?;
        let mut check = hmac(&secret.keys().mac[..]);
        check.update(MAC_LABEL);
        check.update(envelope.body.get().as_bytes());
        check
            .verify_slice(&want.0)
            .map_err(|_| ArchiveError::ManifestMac)?;
        let mac = want.to_string();
        let manifest: Manifest = serde_json::from_str(envelope.body.get())
            .map_err(|e| ArchiveError::Manifest(format!("body: {e}")))?;
        check_geometry(manifest.disk_bytes, manifest.chunk_bytes)?;
        let want = manifest.disk_bytes.div_ceil(manifest.chunk_bytes);
        if manifest.chunks.len() as u64 != want {
            return Err(ArchiveError::Manifest(format!(
                "{} chunks listed, a disk of {} bytes in chunks of {} has {want}",
                manifest.chunks.len(),
                manifest.disk_bytes,
                manifest.chunk_bytes
            )));
        }
        Ok((manifest, secret, mac))
    }
}

/// The pending key (`key.json`): the sealed secret of an archive whose first manifest is not
/// written yet, so that a run interrupted before it can be resumed with the same chunk names.
/// Only read when there is no manifest. The secret is authenticated by its sealing; the rest
/// says nothing a store could abuse.
pub const PENDING_KEY: &str = "key.json";
const PENDING_FORMAT: &str = "ubiblk-disk-archive-key";
/// A pending key is about 150 bytes; anything much larger is not one.
pub const MAX_PENDING_BYTES: usize = 4096;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingKey {
    format: String,
    version: u32,
    key: KeyField,
}

/// `key.json` for `secret`, sealed with `kek`.
pub fn encode_pending(secret: &Secret, kek: &[u8; KEY_LEN]) -> Result<Vec<u8>, ArchiveError> {
    let pending = PendingKey {
        format: PENDING_FORMAT.into(),
        version: VERSION,
        key: KeyField::seal(secret, kek)?,
    };
    serde_json::to_vec(&pending).map_err(|e| ArchiveError::Manifest(e.to_string()))
}

/// The secret in a `key.json`.
pub fn decode_pending(bytes: &[u8], kek: &[u8; KEY_LEN]) -> Result<Secret, ArchiveError> {
    let bad = |what: String| ArchiveError::Manifest(format!("{PENDING_KEY}: {what}"));
    if bytes.len() > MAX_PENDING_BYTES {
        return Err(bad(format!("{} bytes, too long", bytes.len())));
    }
    let pending: PendingKey =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a pending key: {e}")))?;
    if pending.format != PENDING_FORMAT || pending.version != VERSION {
        return Err(bad(format!(
            "format {:?} version {}, this build reads {PENDING_FORMAT:?} version {VERSION}",
            pending.format, pending.version
        )));
    }
    pending.key.unseal(kek)
}

fn check_geometry(disk_bytes: u64, chunk_bytes: u64) -> Result<(), ArchiveError> {
    let bad = |what: String| Err(ArchiveError::Manifest(what));
    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
        || !chunk_bytes.is_multiple_of(512)
    {
        return bad(format!(
            "chunk size {chunk_bytes} is not a multiple of 512 from {MIN_CHUNK_BYTES} to \
             {MAX_CHUNK_BYTES}"
        ));
    }
    if disk_bytes == 0 || !disk_bytes.is_multiple_of(512) {
        return bad(format!(
            "disk size {disk_bytes} is not a positive multiple of 512"
        ));
    }
    if disk_bytes.div_ceil(chunk_bytes) > MAX_CHUNKS {
        return bad(format!(
            "a disk of {disk_bytes} bytes has more than {MAX_CHUNKS} chunks of {chunk_bytes}"
        ));
    }
    Ok(())
}

fn mac(keys: &Keys, body: &str) -> [u8; 32] {
    let mut mac = hmac(&keys.mac[..]);
    mac.update(MAC_LABEL);
    mac.update(body.as_bytes());
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8; 32]) -> String {
    ChunkName(*bytes).to_string()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    format: String,
    version: u32,
    key: KeyField,
    #[serde(borrow)]
    body: &'a RawValue,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyField {
    nonce: String,
    sealed: String,
}

impl KeyField {
    /// `secret` sealed with `kek` (under a fresh nonce), in base64.
    fn seal(secret: &Secret, kek: &[u8; KEY_LEN]) -> Result<KeyField, ArchiveError> {
        let wrapped = secret.wrap(kek)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(KeyField {
            nonce: b64.encode(wrapped.nonce),
            sealed: b64.encode(wrapped.sealed),
        })
    }

    /// The secret, unsealed with `kek`.
    fn unseal(&self, kek: &[u8; KEY_LEN]) -> Result<Secret, ArchiveError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let field = |name: &str, text: &str, len: usize| {
            b64.decode(text)
                .ok()
                .filter(|v| v.len() == len)
                .ok_or_else(|| {
                    ArchiveError::Manifest(format!("key.{name} is not base64 of {len} bytes"))
                })
        };
        let mut wrapped = WrappedSecret {
            nonce: [0; NONCE_LEN],
            sealed: [0; SEALED_LEN],
        };
        wrapped
            .nonce
            .copy_from_slice(&field("nonce", &self.nonce, NONCE_LEN)?);
        wrapped
            .sealed
            .copy_from_slice(&field("sealed", &self.sealed, SEALED_LEN)?);
        Secret::unwrap(&wrapped, kek)
    }
}

impl Serialize for ChunkName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChunkName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Hex;
        impl Visitor<'_> for Hex {
            type Value = ChunkName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chunk name of 64 lowercase hex digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ChunkName, E> {
                ChunkName::from_hex(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Hex)
    }
}

/// The chunk list, refused past [`MAX_CHUNKS`] entries while it is read.
fn bounded_chunks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<ChunkName>>, D::Error> {
    struct Bounded;
    impl<'de> Visitor<'de> for Bounded {
        type Value = Vec<Option<ChunkName>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX_CHUNKS} chunk names or nulls")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(name) = seq.next_element()? {
                if out.len() as u64 >= MAX_CHUNKS {
                    return Err(de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(name);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEK: [u8; 32] = [0x11; 32];

    fn sample() -> (Manifest, Secret) {
        let secret = Secret::generate().unwrap();
        let mut m = Manifest::new(5 * 4096 + 512, 4096).unwrap();
        let keys = secret.keys();
        m.chunks[1] = Some(ChunkName::of(&keys, b"one"));
        m.chunks[4] = Some(ChunkName::of(&keys, b"four"));
        (m, secret)
    }

    #[test]
    fn round_trip_keeps_everything_and_the_secret() {
        let (m, secret) = sample();
        assert_eq!(m.chunks.len(), 6);
        assert_eq!((m.chunk_len(0), m.chunk_len(5)), (4096, 512));
        let bytes = m.encode(&secret, &KEK).unwrap();
        let (back, s2) = Manifest::decode(&bytes, &KEK).unwrap();
        assert_eq!(back, m);
        assert_eq!(s2.keys().name[..], secret.keys().name[..]);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with(r#"{"format":"ubiblk-disk-archive","version":1,"key":{"#));
        assert!(text.contains(r#""chunks":[null,""#), "{text}");
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let (m, secret) = sample();
        let bytes = m.encode(&secret, &KEK).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            match Manifest::decode(&bad, &KEK) {
                Ok((back, _)) => panic!("byte {i} changed, still read as {back:?}"),
                Err(
                    ArchiveError::Manifest(_) | ArchiveError::ManifestMac | ArchiveError::WrongKek,
                ) => {}
                Err(e) => panic!("byte {i}: unexpected {e}"),
            }
        }
    }

    #[test]
    fn wrong_kek_swapped_key_and_a_rewritten_body_are_refused() {
        let (m, secret) = sample();
        let bytes = m.encode(&secret, &KEK).unwrap();
        assert!(matches!(
            Manifest::decode(&bytes, &[0x12; 32]),
            Err(ArchiveError::WrongKek)
        ));
        // Another archive's key field (valid under the same KEK) with this body and MAC.
        let other = sample()
            .0
            .encode(&Secret::generate().unwrap(), &KEK)
            .unwrap();
        let key_of = |b: &[u8]| {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["key"].clone()
        };
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["key"] = key_of(&other);
        let spliced = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            Manifest::decode(&spliced, &KEK),
            Err(ArchiveError::ManifestMac)
        ));
        // The same body re-serialized with other whitespace: the MAC is over the bytes.
        let text = String::from_utf8(bytes).unwrap();
        let spaced = text.replace(r#""chunk_bytes":"#, r#""chunk_bytes": "#);
        assert_ne!(spaced, text);
        assert!(matches!(
            Manifest::decode(spaced.as_bytes(), &KEK),
            Err(ArchiveError::ManifestMac)
        ));
    }

    #[test]
    fn bounds_are_checked() {
        for (disk, chunk) in [
            (0, 4096),
            (4096, 1000),
            (4096, 2048),
            (4097, 4096),
            (4096, 64 << 20),
            ((MAX_CHUNKS + 1) * 4096, 4096),
        ] {
            assert!(Manifest::new(disk, chunk).is_err(), "{disk} {chunk}");
        }
        let e = Manifest::decode(&vec![b' '; MAX_MANIFEST_BYTES + 1], &KEK).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        for junk in [&b""[..], b"[]", b"{}", b"null", b"{\"format\":1}"] {
            let e = Manifest::decode(junk, &KEK).unwrap_err();
            assert!(matches!(e, ArchiveError::Manifest(_)), "{e}");
        }
    }

    #[test]
    fn pending_key_round_trip_and_refusals() {
        let secret = Secret::generate().unwrap();
        let bytes = encode_pending(&secret, &KEK).unwrap();
        let back = decode_pending(&bytes, &KEK).unwrap();
        assert_eq!(back.keys().name[..], secret.keys().name[..]);
        assert!(matches!(
            decode_pending(&bytes, &[0x12; 32]),
            Err(ArchiveError::WrongKek)
        ));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode_pending(&bad, &KEK).is_err(), "byte {i}");
        }
        assert!(decode_pending(&vec![b' '; 5000], &KEK).is_err());
    }

    /// A body that is authentic but inconsistent (only a KEK holder can write one) is still
    /// refused: the chunk list must match the geometry.
    #[test]
    fn an_authentic_but_inconsistent_body_is_refused() {
        let (mut m, secret) = sample();
        m.chunks.pop();
        let bytes = m.encode(&secret, &KEK).unwrap();
        let e = Manifest::decode(&bytes, &KEK).unwrap_err();
        assert!(e.to_string().contains("5 chunks listed"), "{e}");
    }
}
