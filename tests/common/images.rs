//! Disk images and scratch space: the deterministic [`pattern_block`] content, pattern files,
//! the files of a lazy-fetch disk ([`LazyFiles`]), loop devices ([`LoopDev`]), and
//! [`scratch_dir`].

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::BackendConfig;

/// Deterministic content of the 4 KiB block `block` (for images made by [`create_pattern_file`]).
pub fn pattern_block(block: u64, out: &mut [u8]) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out.chunks_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Expected content of `len` bytes at `offset` of a pattern file.
pub fn pattern_bytes(offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut block_buf = vec![0u8; 4096];
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let block = abs / 4096;
        let in_block = (abs % 4096) as usize;
        pattern_block(block, &mut block_buf);
        let n = (4096 - in_block).min(len - pos);
        out[pos..pos + n].copy_from_slice(&block_buf[in_block..in_block + n]);
        pos += n;
    }
    out
}

/// The files of a lazy-fetch disk in a scratch directory: a base disk of `disk_len` bytes of
/// `base_fill`, an image, the metadata path and a control socket, and a backend config naming
/// them (plus `extra` lines). [`LazyFiles::init_metadata`] makes the metadata.
pub struct LazyFiles {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub image: PathBuf,
    pub meta: PathBuf,
    pub ctl: PathBuf,
    pub config: BackendConfig,
}

impl LazyFiles {
    pub fn new(prefix: &str, disk_len: u64, base_fill: u8, image: &[u8], extra: &[&str]) -> Self {
        let dir = scratch_dir(prefix);
        let d = dir.path();
        let (base, image_path, meta, ctl) = (
            d.join("base.raw"),
            d.join("image.raw"),
            d.join("meta"),
            d.join("ctl.sock"),
        );
        fs::write(&base, vec![base_fill; disk_len as usize]).unwrap();
        fs::write(&image_path, image).unwrap();
        let mut config = BackendConfig::new(&base, d.join("vhost.sock"))
            .extra_path("image_path", &image_path)
            .extra_path("metadata_path", &meta)
            .extra_path("control_socket", &ctl);
        for line in extra {
            config = config.extra(*line);
        }
        LazyFiles {
            dir,
            base,
            image: image_path,
            meta,
            ctl,
            config,
        }
    }

    /// Writes the config to `config.yaml` in the directory and returns its path.
    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("config.yaml");
        fs::write(&path, self.config.to_yaml()).unwrap();
        path
    }

    /// Runs `init_bin` (init-metadata) on the config with stripes of 2^`shift` sectors.
    pub fn init_metadata(&self, init_bin: &str, shift: u8) {
        let out = Command::new(init_bin)
            .arg("-f")
            .arg(self.config_file())
            .args(["-s", &shift.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "init-metadata: {out:?}");
    }
}

/// A fresh temporary directory for one test's disk, socket and logs: in /dev/shm (tmpfs, fast,
/// O_DIRECT-capable here) when possible, else the default temp dir.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::Builder::new().prefix(prefix).tempdir())
        .expect("cannot create a temporary directory")
}

/// Creates (or truncates) a fully-allocated file of `size` bytes (multiple of 4096) filled with
/// [`pattern_block`] data.
pub fn create_pattern_file(path: &Path, size: u64) -> anyhow::Result<()> {
    assert!(size.is_multiple_of(4096));
    let mut f = File::create(path)?;
    let chunk_blocks = 256u64; // 1 MiB
    let mut buf = vec![0u8; (chunk_blocks * 4096) as usize];
    let mut block = 0u64;
    let total_blocks = size / 4096;
    while block < total_blocks {
        let n = chunk_blocks.min(total_blocks - block);
        for i in 0..n {
            let s = (i * 4096) as usize;
            pattern_block(block + i, &mut buf[s..s + 4096]);
        }
        f.write_all(&buf[..(n * 4096) as usize])?;
        block += n;
    }
    f.sync_all()?;
    Ok(())
}

/// Reads `len` bytes at `offset` directly from a file (to check what the backend wrote).
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

/// Writes `data` to `path` through a new file renamed over it (another inode), with an mtime
/// a minute later (nginx's ETag and Last-Modified have a one-second resolution): an image
/// replaced as an operator would.
pub fn replace_file(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, data).unwrap();
    let f = File::options().write(true).open(&tmp).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A loop device over a file (`losetup`, util-linux, as root), detached on drop.
pub struct LoopDev(pub PathBuf);

impl LoopDev {
    /// Attaches a free loop device to `file`; panics with losetup's error if it cannot.
    pub fn attach(file: &Path) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) is needed");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    /// `losetup -c`: the device takes its file's new size (as `lvextend` grows a volume).
    pub fn refresh(&self) {
        let st = Command::new("losetup").arg("-c").arg(&self.0).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "losetup -c {}",
            self.0.display()
        );
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A pattern-filled disk file in a scratch directory, with the paths of its vhost and control
/// sockets there (removed with the directory).
pub struct PatternDisk {
    _dir: tempfile::TempDir,
    pub img: PathBuf,
    pub sock: PathBuf,
    pub ctl: PathBuf,
}

/// A [`PatternDisk`] of `size` bytes in a scratch directory named from `prefix`.
pub fn pattern_disk(prefix: &str, size: u64) -> PatternDisk {
    let dir = scratch_dir(prefix);
    let img = dir.path().join("disk.raw");
    create_pattern_file(&img, size).unwrap();
    PatternDisk {
        img,
        sock: dir.path().join("vhost.sock"),
        ctl: dir.path().join("control.sock"),
        _dir: dir,
    }
}
