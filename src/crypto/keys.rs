//! Data keys: `encryption_key` from the config, optionally unwrapped with a KEK file.
//!
//! KEK file (docs/formats.md): YAML with `method` (`aes256-gcm` or `none`), `key` (32 bytes),
//! `init_vector` (12 bytes) and `auth_data`, all base64. With aes256-gcm every
//! `encryption_key` entry is base64 of 32 bytes of ciphertext followed by the 16-byte tag.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine;
use serde::Deserialize;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

use super::{Kernel, KernelError, Xts};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("--kek {}: {problem}", path.display())]
    Kek { path: PathBuf, problem: String },
    #[error("encryption_key[{index}]: {problem}")]
    Entry { index: usize, problem: String },
    #[error("encryption_key: {0}")]
    Config(String),
    /// `UBIBLK_XTS_KERNEL` names a kernel that cannot be used.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// The KEK file's fields, as serde names them (for error messages).
const KEK_FIELDS: &[&str] = &["method", "key", "init_vector", "auth_data"];

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

/// How the `encryption_key` entries (and a disk archive's key, src/archive) are protected.
pub enum Kek {
    /// The entries are the raw keys.
    None,
    Aes256Gcm {
        key: Zeroizing<[u8; 32]>,
        iv: [u8; 12],
        aad: Vec<u8>,
    },
}

/// Names the method only: the key never appears in a log or an error.
impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kek::None => f.write_str("Kek::None"),
            Kek::Aes256Gcm { .. } => f.write_str("Kek::Aes256Gcm(..)"),
        }
    }
}

fn b64(s: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|e| format!("not valid base64 ({e})"))
}

impl Kek {
    /// Parses the KEK YAML. Errors never repeat what the file holds (it is key material),
    /// only the field, the kind of problem and where.
    pub fn parse(text: &[u8]) -> Result<Kek, String> {
        let file: KekFile = serde_yaml_ng::from_slice(text).map_err(|e| {
            format!(
                "not a KEK file: {}",
                crate::sys::yaml::describe(&e, KEK_FIELDS)
            )
        })?;
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
            _ => Err("`method` must be \"aes256-gcm\" or \"none\"".to_string()),
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
        if data[..] == tweak[..] {
            return Err(KeyError::Config(
                "the data key and the tweak key are the same; AES-XTS needs two different keys \
                 (IEEE 1619)"
                    .into(),
            ));
        }
        Ok(Xts::with_kernel(Kernel::from_env()?, &data, &tweak)?)
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
    /// Reads the KEK file, if one was given; with `--unlink-kek` it is deleted whether or not
    /// the read works. Tools call this before anything else can fail (the config is read
    /// after it), so a failing start never leaves the KEK behind.
    pub fn read(&self) -> Result<KekText, KeyError> {
        let text = match &self.kek {
            Some(path) => Some((path.clone(), read_kek(path, self.unlink_kek)?)),
            None => None,
        };
        Ok(KekText(text))
    }
}

/// What [`KekArgs::read`] read: the KEK file's path and bytes (zeroed on drop), or nothing
/// without `--kek`.
pub struct KekText(Option<(PathBuf, Zeroizing<Vec<u8>>)>);

impl KekText {
    /// The data cipher for `encryption_key` (None without keys); a KEK without keys to unwrap
    /// is refused rather than silently storing plaintext.
    pub fn cipher_for(&self, encryption_key: Option<&[String]>) -> Result<Option<Xts>, KeyError> {
        self.keys_for(encryption_key, false)
            .map(|(cipher, _)| cipher)
    }

    /// The data cipher and the parsed KEK (`None` without `--kek`). With `for_archive` the KEK
    /// also protects a disk archive's key (`archive_url`, the `archive` tool), so a KEK without
    /// `encryption_key` is used rather than refused.
    pub fn keys_for(
        &self,
        encryption_key: Option<&[String]>,
        for_archive: bool,
    ) -> Result<(Option<Xts>, Option<Kek>), KeyError> {
        let kek = match &self.0 {
            Some((path, text)) => Some(Kek::parse(text).map_err(|problem| kek_err(path, problem))?),
            None => None,
        };
        let cipher = match encryption_key {
            Some(entries) => Some(kek.as_ref().unwrap_or(&Kek::None).cipher(entries)?),
            None if kek.is_some() && !for_archive => {
                return Err(KeyError::Config(
                    "--kek given but the config has no encryption_key: refusing to store \
                     plaintext"
                        .into(),
                ))
            }
            None => None,
        };
        Ok((cipher, kek))
    }
}

fn kek_err(path: &Path, problem: String) -> KeyError {
    KeyError::Kek {
        path: path.to_owned(),
        problem,
    }
}

/// Reads the KEK file (a regular file or a FIFO, which blocks until a writer comes, said in
/// one log line); with `unlink`, deletes it whether or not the read worked.
fn read_kek(path: &Path, unlink: bool) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        log::info!("waiting for a writer on the KEK FIFO {}", path.display());
    }
    let text = std::fs::read(path).map(Zeroizing::new);
    let unlinked = if unlink {
        std::fs::remove_file(path)
    } else {
        Ok(())
    };
    let text = text.map_err(|e| kek_err(path, format!("cannot read: {e}")))?;
    unlinked.map_err(|e| kek_err(path, format!("cannot unlink: {e}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::yaml::{assert_no_key, TEST_KEYS};

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

    const KEY32: &str = TEST_KEYS[0];
    const KEY48: &str = TEST_KEYS[1];

    #[test]
    fn malformed_kek_files_never_repeat_their_contents() {
        for (text, want) in [
            (
                KEY32.to_string(),
                "expected a mapping of fields, found a string",
            ),
            (format!("{KEY48}\n"), "found a string"),
            (format!("\"{KEY32}\"\n"), "found a string"),
            (format!("- {KEY32}\n"), "found a sequence"),
            (format!("{KEY32}: x\n"), "unknown field"),
            (
                format!("method: aes256-gcm\nkey: [{KEY32}]\n"),
                "`key`: expected a string",
            ),
            (
                format!("method: aes256-gcm\nkey: {{{KEY32}: 1}}\n"),
                "`key`",
            ),
            (format!("method: {KEY32}\n"), "`method` must be"),
            (
                format!("method: aes256-gcm\nkey: \"{KEY32}\n"),
                "not valid YAML",
            ),
            (
                format!("method: aes256-gcm\nkey: {KEY32}\nkey: {KEY48}\n"),
                "duplicate field `key`",
            ),
        ] {
            let e = Kek::parse(text.as_bytes()).err().unwrap();
            assert_no_key(&e);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn identical_data_and_tweak_keys_are_refused_after_unwrapping() {
        // Two spellings of one key (base64 is trimmed): different entries, the same key.
        let one = enc(&[1; 32]);
        let e = Kek::None
            .cipher(&[one.clone(), format!(" {one}\n")])
            .err()
            .unwrap();
        assert!(e.to_string().contains("the same"), "{e}");
        assert!(!e.to_string().contains(&one[..12]), "{e}");
        let (k, iv, aad) = ([5u8; 32], [6u8; 12], b"ad".as_slice());
        let kek = Kek::parse(kek_yaml(&k, &iv, aad).as_bytes()).unwrap();
        let entry = wrap(&k, &iv, aad, &[3; 32]);
        let e = kek.cipher(&[entry.clone(), entry]).err().unwrap();
        assert!(e.to_string().contains("IEEE 1619"), "{e}");
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
