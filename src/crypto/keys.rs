//! Data keys: `encryption_key` from the config, optionally unwrapped with a KEK file.
//!
//! KEK file (docs/formats.md): YAML with `method` (`aes256-gcm` or `none`), `key` (32 bytes),
//! `init_vector` (12 bytes) and `auth_data`, all base64. With aes256-gcm every
//! `encryption_key` entry is base64 of 32 bytes of ciphertext followed by the 16-byte tag.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

use super::Xts;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("--kek {}: {problem}", path.display())]
    Kek { path: PathBuf, problem: String },
    #[error("encryption_key[{index}]: {problem}")]
    Entry { index: usize, problem: String },
    #[error("encryption_key: {0}")]
    Config(String),
}

/// The KEK file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KekFile {
    method: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    init_vector: Option<String>,
    #[serde(default)]
    auth_data: Option<String>,
}

impl Drop for KekFile {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// How the `encryption_key` entries are protected.
pub enum Kek {
    /// The entries are the raw keys.
    None,
    Aes256Gcm {
        key: Zeroizing<[u8; 32]>,
        iv: [u8; 12],
        aad: Vec<u8>,
    },
}

fn b64(s: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|e| format!("not valid base64 ({e})"))
}

impl Kek {
    /// Reads and parses a KEK file (a regular file or a FIFO); with `unlink`, deletes it once
    /// read, whether or not it parses, so key material does not linger.
    pub fn load(path: &Path, unlink: bool) -> Result<Kek, KeyError> {
        let err = |problem: String| KeyError::Kek {
            path: path.to_owned(),
            problem,
        };
        let text = std::fs::read(path).map(Zeroizing::new);
        if unlink {
            std::fs::remove_file(path).map_err(|e| err(format!("cannot unlink: {e}")))?;
        }
        let text = text.map_err(|e| err(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses the KEK YAML.
    pub fn parse(text: &[u8]) -> Result<Kek, String> {
        let file: KekFile = serde_yaml_ng::from_slice(text).map_err(|e| e.to_string())?;
        match file.method.as_str() {
            "none" => Ok(Kek::None),
            "aes256-gcm" => {
                let field =
                    |name: &str, v: &Option<String>| -> Result<Zeroizing<Vec<u8>>, String> {
                        let v = v.as_deref().ok_or(format!("`{name}` is missing"))?;
                        b64(v).map_err(|e| format!("`{name}`: {e}"))
                    };
                let key = field("key", &file.key)?;
                let iv = field("init_vector", &file.init_vector)?;
                let aad = field("auth_data", &file.auth_data)?;
                let key: [u8; 32] = key[..]
                    .try_into()
                    .map_err(|_| format!("`key` is {} bytes, expected 32", key.len()))?;
                let iv: [u8; 12] = iv[..]
                    .try_into()
                    .map_err(|_| format!("`init_vector` is {} bytes, expected 12", iv.len()))?;
                Ok(Kek::Aes256Gcm {
                    key: Zeroizing::new(key),
                    iv,
                    aad: aad.to_vec(),
                })
            }
            other => Err(format!(
                "`method` is {other:?}, expected \"aes256-gcm\" or \"none\""
            )),
        }
    }

    /// Decodes (and, with a KEK, unwraps) one `encryption_key` entry into a 32-byte key.
    fn unwrap_entry(&self, index: usize, entry: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let err = |problem: String| KeyError::Entry { index, problem };
        let mut raw = b64(entry).map_err(err)?;
        let mut key = Zeroizing::new([0u8; 32]);
        match self {
            Kek::None => {
                if raw.len() != 32 {
                    let hint = if raw.len() == 48 {
                        " (48 bytes looks KEK-wrapped: pass --kek)"
                    } else {
                        ""
                    };
                    return Err(err(format!("is {} bytes, expected 32{hint}", raw.len())));
                }
                key.copy_from_slice(&raw);
            }
            Kek::Aes256Gcm { key: kek, iv, aad } => {
                if raw.len() != 48 {
                    return Err(err(format!(
                        "is {} bytes, expected 48 (32-byte wrapped key + 16-byte tag)",
                        raw.len()
                    )));
                }
                let gcm = Aes256Gcm::new_from_slice(&kek[..])
                    .map_err(|_| err("bad KEK length".into()))?;
                let (ct, tag) = raw.split_at_mut(32);
                let tag = Tag::try_from(&tag[..]).map_err(|_| err("bad tag length".into()))?;
                let nonce = Nonce::try_from(&iv[..]).map_err(|_| err("bad IV length".into()))?;
                gcm.decrypt_inout_detached(&nonce, aad, ct.into(), &tag)
                    .map_err(|_| {
                        err(
                            "cannot unwrap: authentication failed (wrong KEK, IV or auth_data, \
                             or a corrupted key)"
                                .into(),
                        )
                    })?;
                key.copy_from_slice(ct);
            }
        }
        Ok(key)
    }

    /// The XTS cipher for the config's `encryption_key` (data key first, tweak key second).
    pub fn cipher(&self, entries: &[String]) -> Result<Xts, KeyError> {
        if entries.len() != 2 {
            return Err(KeyError::Config(format!(
                "must hold exactly two keys, found {}",
                entries.len()
            )));
        }
        let data = self.unwrap_entry(0, &entries[0])?;
        let tweak = self.unwrap_entry(1, &entries[1])?;
        Ok(Xts::new(&data, &tweak))
    }
}

/// The `--kek` / `--unlink-kek` flags every tool that reads `encryption_key` takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KekArgs {
    /// Path to the key encryption key (KEK) file that unwraps `encryption_key`.
    #[arg(short = 'k', long = "kek", value_name = "KEK_FILE")]
    pub kek: Option<PathBuf>,
    /// Delete the KEK file once it has been read.
    #[arg(short = 'u', long = "unlink-kek", requires = "kek")]
    pub unlink_kek: bool,
}

impl KekArgs {
    /// The data cipher for `encryption_key` (None without keys). The KEK file is read (and
    /// unlinked) first, whatever else fails, so key material does not linger; a KEK without
    /// keys to unwrap is refused rather than silently storing plaintext.
    pub fn cipher_for(&self, encryption_key: Option<&[String]>) -> Result<Option<Xts>, KeyError> {
        let kek = match &self.kek {
            Some(path) => Kek::load(path, self.unlink_kek)?,
            None => Kek::None,
        };
        match encryption_key {
            Some(entries) => kek.cipher(entries).map(Some),
            None if self.kek.is_some() => Err(KeyError::Config(
                "--kek given but the config has no encryption_key: refusing to store plaintext"
                    .into(),
            )),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seals `key` the way a KEK-wrapped entry is made (independently of unwrap_entry).
    fn wrap(kek: &[u8; 32], iv: &[u8; 12], aad: &[u8], key: &[u8]) -> String {
        let gcm = Aes256Gcm::new_from_slice(kek).unwrap();
        let mut buf = key.to_vec();
        let nonce = Nonce::try_from(&iv[..]).unwrap();
        let tag = gcm
            .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
            .unwrap();
        buf.extend_from_slice(&tag);
        base64::engine::general_purpose::STANDARD.encode(buf)
    }

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn kek_yaml(key: &[u8], iv: &[u8], aad: &[u8]) -> String {
        format!(
            "method: aes256-gcm\nkey: {}\ninit_vector: {}\nauth_data: {}\n",
            enc(key),
            enc(iv),
            enc(aad)
        )
    }

    #[test]
    fn unwraps_gcm_wrapped_keys() {
        let (k, iv, aad) = ([5u8; 32], [6u8; 12], b"vm3jgez8_0".as_slice());
        let kek = Kek::parse(kek_yaml(&k, &iv, aad).as_bytes()).unwrap();
        let entries = [wrap(&k, &iv, aad, &[1; 32]), wrap(&k, &iv, aad, &[2; 32])];
        let xts = kek.cipher(&entries).unwrap();
        let mut a = vec![9u8; 512];
        xts.encrypt(3, &mut a);
        let mut b = vec![9u8; 512];
        Xts::new(&[1; 32], &[2; 32]).encrypt(3, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_kek_is_refused() {
        let (k, iv, aad) = ([5u8; 32], [6u8; 12], b"ad".as_slice());
        let entries = [wrap(&k, &iv, aad, &[1; 32]), wrap(&k, &iv, aad, &[2; 32])];
        for yaml in [
            kek_yaml(&[4u8; 32], &iv, aad),
            kek_yaml(&k, &[7u8; 12], aad),
            kek_yaml(&k, &iv, b"other"),
        ] {
            let e = Kek::parse(yaml.as_bytes())
                .unwrap()
                .cipher(&entries)
                .err()
                .unwrap();
            assert!(e.to_string().contains("authentication failed"), "{e}");
            assert!(e.to_string().contains("encryption_key[0]"), "{e}");
        }
    }

    #[test]
    fn raw_keys_without_kek() {
        let xts = Kek::None.cipher(&[enc(&[1; 32]), enc(&[2; 32])]);
        assert!(xts.is_ok());
        let e = Kek::None
            .cipher(&[enc(&[1; 32]), enc(&[2; 48])])
            .err()
            .unwrap();
        assert!(e.to_string().contains("encryption_key[1]") && e.to_string().contains("--kek"));
        let e = Kek::None
            .cipher(&[enc(&[1; 32]), "!!!".into()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("base64"), "{e}");
        let e = Kek::None.cipher(&[enc(&[1; 32])]).err().unwrap();
        assert!(e.to_string().contains("two"), "{e}");
    }

    #[test]
    fn malformed_kek_files_name_the_problem() {
        for (yaml, want) in [
            ("method: rot13\n", "method"),
            ("method: aes256-gcm\n", "key"),
            (
                "method: aes256-gcm\nkey: AAAA\ninit_vector: AAAAAAAAAAAAAAAA\nauth_data: \"\"\n",
                "32",
            ),
            ("method: none\nbogus: 1\n", "bogus"),
            ("key: [1]\n", "key"),
        ] {
            let e = Kek::parse(yaml.as_bytes()).err().unwrap();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    /// The seed's sample KEK and keys (seeds/000_*.txt) are not a matching pair: Python's
    /// `cryptography` AESGCM also rejects them (InvalidTag). They must fail cleanly, naming why.
    #[test]
    fn seed_sample_is_refused_cleanly() {
        let kek = Kek::parse(
            b"method: \"aes256-gcm\"\nkey: \"wHKSFBsRXW/VPLsJKl/mnsMs7X3Pt8NWjzZkch8Ku60=\"\n\
              init_vector: \"UEt+wI+Ldq1UgQ/P\"\nauth_data: \"dm0zamdlejhfMA==\"\n",
        )
        .unwrap();
        let entries = [
            "x74Yhe/ovgxY4BrBaM6Wm/9firf9k/N+ayvGsskBo+hjQtrL+nslCDC5oR/HpSDL".to_string(),
            "TJn65Jb//AYqu/a8zlpb0IlXC4vwFQ5DtbQkMTeliEAwafr0DEH+5hNro8FuVzQ+".to_string(),
        ];
        let e = kek.cipher(&entries).err().unwrap();
        assert!(e.to_string().contains("authentication failed"), "{e}");
    }
}
