//! init-metadata: writes a fresh lazy-fetch metadata file at the config's `metadata_path`, in
//! the layout of docs/formats.md, encrypted when the config has `encryption_key`. Nothing is
//! fetched, except that with `image_path` the stripes wholly past the image's end are zeroed on
//! the base disk and marked fetched, as the reference marks them (docs/migration-v0.2.md).

use anyhow::{bail, Context};
use clap::Parser;
use log::warn;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use ubiblk::block::{BlockDevice, CryptDevice, FileDevice};
use ubiblk::config::Options;
use ubiblk::crypto::Xts;
use ubiblk::lazy::metadata::{DEFAULT_SHIFT, MAX_SHIFT, MIN_SHIFT};
use ubiblk::lazy::source::{file_identity, stripe, SourceSpec};
use ubiblk::lazy::{device_size, metadata_tool_files, pin, zero_past_image, Metadata};
use ubiblk::remote::RemoteOptions;
use ubiblk::service::cli::{self, ConfigArgs};
use ubiblk::stripe::tls::PskSpec;
use ubiblk::sys::open::{open_for_reading, Kinds};

/// Initialise the metadata file used by lazy stripe fetch: a header and one byte per stripe of
/// the base disk (`path`), all stripes unfetched except those wholly past the end of
/// `image_path`, which are zeroed on the base disk and marked fetched. Overwrites any existing
/// metadata.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Stripe size as a power of two of 512-byte sectors (6 = 32 KiB ... 16 = 32 MiB; default
    /// 11, or with `image_url: ubiblk://...` the served disk's).
    #[arg(
        short = 's',
        long = "stripe-sector-count-shift",
        value_name = "SHIFT",
        value_parser = clap::value_parser!(u8).range(MIN_SHIFT as i64..=MAX_SHIFT as i64)
    )]
    shift: Option<u8>,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit(env!("CARGO_BIN_NAME"), run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (opts, xts) = args.config.load()?;
    // Before anything is opened: metadata_path is truncated, it must not be another file.
    opts.check_distinct_files()?;
    let (meta_path, disk, disk_sectors) = metadata_tool_files(
        env!("CARGO_BIN_NAME"),
        opts.metadata_path.as_deref(),
        &opts.path,
    )?;
    if disk_sectors == 0 {
        bail!(
            "path: {} is {} bytes, smaller than one sector",
            opts.path.display(),
            device_size(&disk)?
        );
    }
    let shift = match opts.lazy_options().map(|l| l.source) {
        Some(SourceSpec::StripeServer { url, psk }) => {
            stripe_server_shift(&url, psk.as_ref(), disk_sectors, args.shift)?
        }
        _ => args.shift.unwrap_or(DEFAULT_SHIFT),
    };
    let mut md = Metadata::new(disk_sectors, shift)?;
    // First: a crash from here on leaves no pin, never an old pin beside new metadata.
    pin::remove(meta_path).with_context(|| {
        format!(
            "metadata_path: cannot remove the source pin {}",
            pin::pin_path(meta_path).display()
        )
    })?;
    let mut past_image = 0;
    // The image's identity, pinned once the metadata is written: the stripes zeroed here
    // depend on its size.
    let mut image_identity = None;
    if let Some(image) = &opts.image_path {
        // A FIFO is refused without waiting for a writer.
        let image_bytes = open_for_reading(image, Kinds::RegularOrBlock)
            .and_then(|f| Ok((device_size(&f)?, f.metadata()?)));
        match image_bytes {
            Ok((image_bytes, image_meta)) => {
                image_identity = Some(file_identity(image, &image_meta, image_bytes));
                past_image = zero_past_image_on(&opts, xts.as_ref(), &mut md, image_bytes)?
            }
            // Not fatal: the metadata is still valid for ours, which zero-fills those stripes
            // when it fetches them; the backend needs the image anyway.
            Err(e) => warn!(
                "image_path: cannot get the size of {} ({e}); stripes past the image's end are \
                 left unfetched (the reference v0.2 cannot serve them until they are fetched)",
                image.display()
            ),
        }
    }
    let file = open_target(meta_path, md.file_len())?;
    md.write_to(&file, xts.as_deref())
        .with_context(|| format!("metadata_path: {}", meta_path.display()))?;
    file.sync_all()
        .with_context(|| format!("metadata_path: cannot fsync {}", meta_path.display()))?;
    sync_parent(meta_path);
    if let Some(identity) = image_identity.filter(|_| pin::pinnable(meta_path)) {
        let pin = pin::pin_path(meta_path);
        pin::write(&pin, &identity).with_context(|| {
            format!(
                "metadata_path: cannot write the source pin {}",
                pin.display()
            )
        })?;
    }
    println!(
        "{}: {} stripes of {} bytes for {} ({disk_sectors} sectors), {} bytes{}{}",
        meta_path.display(),
        md.stripe_count(),
        md.stripe_bytes(),
        opts.path.display(),
        md.file_len(),
        if xts.is_some() { ", encrypted" } else { "" },
        match past_image {
            0 => String::new(),
            n => format!("; {n} stripes past the image's end zeroed and marked fetched"),
        }
    );
    Ok(())
}

/// With `image_url: ubiblk://...`: the served disk's stripe size, which the disk takes (a
/// stripe fetched is then one request); only its geometry is read, nothing else. Refused: a
/// size this build cannot use, another `-s`, or a disk smaller than the served one.
fn stripe_server_shift(
    url: &str,
    psk: Option<&PskSpec>,
    disk_sectors: u64,
    asked: Option<u8>,
) -> anyhow::Result<u8> {
    let remote = RemoteOptions {
        retry_budget: std::time::Duration::ZERO,
        ..RemoteOptions::default()
    };
    let src = stripe::open(url, psk, &remote).with_context(|| format!("image_url: {url}"))?;
    let g = src.geometry();
    if !(MIN_SHIFT..=MAX_SHIFT).contains(&g.shift) {
        bail!(
            "image_url: {url} serves stripes of 2^{} sectors; this build's are 2^{MIN_SHIFT} to \
             2^{MAX_SHIFT}",
            g.shift
        );
    }
    if let Some(s) = asked.filter(|&s| s != g.shift) {
        bail!(
            "-s {s}: {url} serves stripes of 2^{} sectors; leave -s out to take its size",
            g.shift
        );
    }
    let ours = disk_sectors.div_ceil(1 << g.shift);
    if ours < g.stripe_count() {
        bail!(
            "path: the disk ({disk_sectors} sectors, {ours} stripes) is smaller than the disk {url} \
             serves ({} stripes of 2^{} sectors)",
            g.stripe_count(),
            g.shift
        );
    }
    println!(
        "{url}: {} stripes of 2^{} sectors",
        g.stripe_count(),
        g.shift
    );
    Ok(g.shift)
}

/// Zeroes the stripes past the image's end on the base disk (through the encryption layer with
/// a key) and marks them fetched in `md`; how many.
fn zero_past_image_on(
    opts: &Options,
    xts: Option<&Arc<Xts>>,
    md: &mut Metadata,
    image_bytes: u64,
) -> anyhow::Result<usize> {
    let file = FileDevice::open(&opts.path, false, 64)
        .with_context(|| format!("path: cannot open {} to zero it", opts.path.display()))?;
    let mut base: Arc<dyn BlockDevice> = Arc::new(file);
    if let Some(x) = xts {
        base = Arc::new(CryptDevice::new(base, x.clone()));
    }
    zero_past_image(md, base.as_ref(), image_bytes).with_context(|| {
        format!(
            "path: cannot zero the stripes past the image's end on {}",
            opts.path.display()
        )
    })
}

/// A regular file is created or truncated; a block device is written in place and must be
/// large enough.
fn open_target(path: &Path, len: u64) -> anyhow::Result<File> {
    let ctx = || format!("metadata_path: cannot open {}", path.display());
    let is_blk = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_blk {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(ctx)?;
        let size = device_size(&f)
            .with_context(|| format!("metadata_path: cannot get the size of {}", path.display()))?;
        if size < len {
            bail!(
                "metadata_path: block device {} is {size} bytes, the metadata needs {len}",
                path.display()
            );
        }
        Ok(f)
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(ctx)
    }
}

/// Makes a newly created file's directory entry durable (best effort).
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}
