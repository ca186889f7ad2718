//! The source a lazy disk is filling from, pinned: its [`SourceIdentity`] in a small file next
//! to the metadata, `<metadata_path>.source` (JSON). The metadata file keeps the reference
//! v0.2's format (which has no room for it); this file is ours alone.
//!
//! At every start the identity of the source as it is now is compared with the pinned one
//! ([`decide`]): the same, nothing to do; none pinned yet, it is pinned (with a warning when
//! the metadata already says stripes are fetched: a disk begun by v0.2 or an older build);
//! different, the start is refused when stripes of the old version are on the base disk and
//! others would come from the new one, and the new identity is pinned when nothing mixes
//! (nothing fetched yet, or everything). The pin is written before any fetch can start, by a
//! temporary file, fsync, rename and fsync of the directory, so a crash leaves the old pin or
//! the new one, whole. init-metadata removes it ([`remove`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::source::SourceIdentity;
use super::{first_stripe_past_image, Error, Metadata};

const FORMAT: &str = "ubiblk-lazy-source";
const VERSION: u32 = 1;
/// A pin is a few hundred bytes; more is not one.
const MAX_PIN_BYTES: u64 = 64 << 10;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinFile {
    format: String,
    version: u32,
    source: SourceIdentity,
}

/// Where the pin of the metadata at `metadata_path` lives: `<metadata_path>.source`.
pub fn pin_path(metadata_path: &Path) -> PathBuf {
    with_suffix(metadata_path, ".source")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What a start does about the source's identity.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The pinned identity is the current one.
    Same,
    /// Pin the current identity; `warning`: why that deserves one.
    Pin { warning: Option<String> },
    /// The source changed while `fetched` stripes of the old version are on the base disk
    /// and others are not: refused.
    Changed { fetched: usize },
}

/// Fetched stripes that hold bytes of a source of `bytes` bytes (stripes wholly past its end
/// hold zeros, whatever version of it they were fetched from).
fn fetched_below(md: &Metadata, bytes: u64) -> usize {
    (0..first_stripe_past_image(md, bytes))
        .filter(|&i| md.is_fetched(i))
        .count()
}

/// The decision at start, from the identity pinned (if any), the current one and the
/// metadata.
pub fn decide(pinned: Option<&SourceIdentity>, current: &SourceIdentity, md: &Metadata) -> Verdict {
    let Some(old) = pinned else {
        let fetched = fetched_below(md, current.bytes);
        let warning = (fetched > 0).then(|| {
            format!(
                "{}: the metadata says {fetched} stripes holding source data are fetched, but \
                 no source identity is pinned (metadata made by the reference v0.2 or an older \
                 ubiblk, or the pin was deleted): which version of the source they came from \
                 cannot be checked; pinning {current} from now on",
                current.kind.field()
            )
        });
        return Verdict::Pin { warning };
    };
    if old == current {
        return Verdict::Same;
    }
    let changes = old.changes(current);
    if md.fetched_count() == md.stripe_count() {
        return Verdict::Pin {
            warning: Some(format!(
                "{}: the source changed ({changes}), but every stripe is fetched, so it is no \
                 longer read; pinning {current}",
                current.kind.field()
            )),
        };
    }
    match fetched_below(md, old.bytes.max(current.bytes)) {
        0 => Verdict::Pin {
            warning: Some(format!(
                "{}: the source changed ({changes}) before anything was fetched from it; \
                 pinning {current}",
                current.kind.field()
            )),
        },
        fetched => Verdict::Changed { fetched },
    }
}

/// The identity pinned for the disk whose metadata is `metadata_path`, if any.
pub fn pinned(metadata_path: &Path) -> Result<Option<SourceIdentity>, Error> {
    read(&pin_path(metadata_path))
}

/// Reads the pin at `path`; `None` when there is none.
fn read(path: &Path) -> Result<Option<SourceIdentity>, Error> {
    let io_err = |source| Error::Pin {
        path: path.to_owned(),
        what: "cannot read",
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut text = Vec::new();
    file.take(MAX_PIN_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io_err)?;
    let bad = |why: String| Error::BadPin {
        path: path.to_owned(),
        why,
    };
    if text.len() as u64 > MAX_PIN_BYTES {
        return Err(bad(format!("more than {MAX_PIN_BYTES} bytes")));
    }
    let pin: PinFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if pin.format != FORMAT || pin.version != VERSION {
        return Err(bad(format!(
            "format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
            pin.format, pin.version
        )));
    }
    Ok(Some(pin.source))
}

/// Writes the pin at `path` crash-safely: a temporary file beside it (mode 0600), fsync,
/// rename over `path`, fsync of the directory.
pub fn write(path: &Path, identity: &SourceIdentity) -> io::Result<()> {
    let pin = PinFile {
        format: FORMAT.to_string(),
        version: VERSION,
        source: identity.clone(),
    };
    let mut text = serde_json::to_vec(&pin).map_err(io::Error::other)?;
    text.push(b'\n');
    let tmp = with_suffix(path, ".tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Removes the pin of the metadata at `metadata_path` (and a temporary one a crash left),
/// durably: init-metadata starts the disk over, from whatever the source is at the next start.
/// Nothing to do for a metadata on a block device (see [`pinnable`]).
pub fn remove(metadata_path: &Path) -> io::Result<()> {
    if fs::metadata(metadata_path).is_ok_and(|m| !m.is_file()) {
        return Ok(());
    }
    let path = pin_path(metadata_path);
    let mut removed = false;
    for p in [with_suffix(&path, ".tmp"), path] {
        match fs::remove_file(&p) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if removed {
        sync_dir(metadata_path)?;
    }
    Ok(())
}

/// fsync of the directory holding `path`.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// True when the metadata at `metadata_path` is a regular file, which the pin can sit next to.
/// A metadata on a block device gets no pin (its directory is /dev, rebuilt at every boot).
pub fn pinnable(metadata_path: &Path) -> bool {
    fs::metadata(metadata_path).is_ok_and(|m| m.is_file())
}

/// At the backend's start, before any fetch: checks `current` against the pin of the metadata
/// at `metadata_path` (read as `md`) and pins it when [`decide`] says so; a changed source
/// with stripes of the old one on the base disk is [`Error::SourceChanged`].
pub fn check_and_pin(
    metadata_path: &Path,
    md: &Metadata,
    current: &SourceIdentity,
) -> Result<(), Error> {
    if !pinnable(metadata_path) {
        warn!(
            "metadata_path: {} is not a regular file: the source's identity is not pinned, so \
             a source replaced between runs is not detected",
            metadata_path.display()
        );
        return Ok(());
    }
    let path = pin_path(metadata_path);
    let pinned = read(&path)?;
    match decide(pinned.as_ref(), current, md) {
        Verdict::Same => {
            info!("source {current}: the one pinned in {}", path.display());
            Ok(())
        }
        Verdict::Pin { warning } => {
            if let Some(w) = warning {
                warn!("{w}");
            }
            write(&path, current).map_err(|source| Error::Pin {
                path: path.clone(),
                what: "cannot write",
                source,
            })?;
            info!("source {current}: pinned in {}", path.display());
            Ok(())
        }
        Verdict::Changed { fetched } => Err(changed(path, pinned, current, md, fetched)),
    }
}

/// For a reader that must not write (the `archive` tool): refuses what [`check_and_pin`]
/// refuses, pins nothing.
pub fn check(metadata_path: &Path, md: &Metadata, current: &SourceIdentity) -> Result<(), Error> {
    if !pinnable(metadata_path) {
        return Ok(());
    }
    let path = pin_path(metadata_path);
    let pinned = read(&path)?;
    match decide(pinned.as_ref(), current, md) {
        Verdict::Changed { fetched } => Err(changed(path, pinned, current, md, fetched)),
        _ => Ok(()),
    }
}

fn changed(
    pin: PathBuf,
    pinned: Option<SourceIdentity>,
    current: &SourceIdentity,
    md: &Metadata,
    fetched: usize,
) -> Error {
    let pinned = pinned.unwrap_or_else(|| current.clone());
    Error::SourceChanged {
        field: current.kind.field(),
        changes: pinned.changes(current),
        pinned: pinned.to_string(),
        fetched,
        stripes: md.stripe_count(),
        pin,
    }
}

#[cfg(test)]
mod tests {
    use super::super::source::SourceKind;
    use super::*;

    fn md(fetched: &[usize]) -> Metadata {
        // 8 stripes of 32 KiB.
        let mut md = Metadata::new(8 << 6, 6).unwrap();
        for &i in fetched {
            md.set_fetched(i);
        }
        md
    }

    fn id(etag: &str, bytes: u64) -> SourceIdentity {
        SourceIdentity::new(SourceKind::Http, "http://h/img", bytes).with("etag", etag)
    }

    const STRIPE: u64 = 32 << 10;

    #[test]
    fn unchanged_is_same_whatever_is_fetched() {
        let a = id("1", 8 * STRIPE);
        assert_eq!(decide(Some(&a), &a, &md(&[0, 3])), Verdict::Same);
    }

    #[test]
    fn a_first_start_pins_quietly_a_legacy_disk_with_warning() {
        let a = id("1", 4 * STRIPE);
        assert_eq!(decide(None, &a, &md(&[])), Verdict::Pin { warning: None });
        // Stripes past the source's end (zeroed by init-metadata) hold no source data.
        assert_eq!(
            decide(None, &a, &md(&[4, 7])),
            Verdict::Pin { warning: None }
        );
        let Verdict::Pin { warning: Some(w) } = decide(None, &a, &md(&[1, 7])) else {
            panic!("no warning");
        };
        assert!(
            w.contains("1 stripes") && w.contains("no source identity is pinned"),
            "{w}"
        );
    }

    #[test]
    fn a_change_is_refused_when_old_stripes_are_on_the_disk() {
        let (a, b) = (id("1", 4 * STRIPE), id("2", 4 * STRIPE));
        assert_eq!(
            decide(Some(&a), &b, &md(&[0, 2])),
            Verdict::Changed { fetched: 2 }
        );
        // A shorter new source: the old one's stripes past its end count too.
        let short = id("2", STRIPE);
        assert_eq!(
            decide(Some(&a), &short, &md(&[3])),
            Verdict::Changed { fetched: 1 }
        );
        // Nothing fetched from either: re-pinned.
        assert!(matches!(
            decide(Some(&a), &b, &md(&[5, 6])),
            Verdict::Pin { warning: Some(_) }
        ));
        // Everything fetched: the source is no longer read.
        assert!(matches!(
            decide(Some(&a), &b, &md(&[0, 1, 2, 3, 4, 5, 6, 7])),
            Verdict::Pin { warning: Some(_) }
        ));
    }

    #[test]
    fn pins_round_trip_and_init_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("meta");
        fs::write(&meta, b"").unwrap();
        let path = pin_path(&meta);
        assert_eq!(path, dir.path().join("meta.source"));
        assert_eq!(read(&path).unwrap(), None);
        let a = id("\"x\"", 5);
        write(&path, &a).unwrap();
        assert_eq!(read(&path).unwrap(), Some(a.clone()));
        assert!(!with_suffix(&path, ".tmp").exists());
        check_and_pin(&meta, &md(&[0]), &a).unwrap();
        let e = check_and_pin(&meta, &md(&[0]), &id("\"y\"", 5)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("etag \"x\" -> \"y\"") && text.contains("init-metadata"),
            "{text}"
        );
        assert!(check(&meta, &md(&[0]), &id("\"y\"", 5)).is_err());
        remove(&meta).unwrap();
        assert!(!path.exists());
        remove(&meta).unwrap();
        fs::write(&path, b"{\"format\":\"other\"}").unwrap();
        assert!(matches!(read(&path), Err(Error::BadPin { .. })));
    }
}
