//! archive: writes a disk (decrypted; a lazy disk read through its source) to a disk archive
//! (docs/formats.md, "Disk archive") in `file:///dir` or `s3://bucket/prefix`.

use anyhow::Context;
use clap::Parser;
use std::process::ExitCode;

use ubiblk::archive::{kek_key, write_archive, DiskReader, Previous, WriteOptions};
use ubiblk::remote::open_store;
use ubiblk::remote::{RemoteOptions, S3Overrides};
use ubiblk::service::cli::{self, ConfigArgs};
use ubiblk::tools::archive_disk::ConfiguredDisk;

/// Archive a disk: a manifest plus one compressed, encrypted object per distinct non-zero
/// chunk, under a key wrapped by the KEK (required, method aes256-gcm). Archiving again to
/// the same place uploads only chunks whose content is new. Stop the backend (or archive a
/// snapshot) first: a disk written while it is read is archived in an undefined state.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where to write the archive: file:///dir or s3://bucket/prefix.
    #[arg(long = "to", value_name = "URL")]
    to: String,
    /// Threads reading, compressing, encrypting and uploading chunks.
    #[arg(short = 'j', long, default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
    /// zstd compression level.
    #[arg(short = 'l', long, default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    /// If the destination holds an archive this KEK cannot open, start a new one there (new
    /// key, no chunk shared with it) instead of refusing.
    #[arg(long)]
    new_key: bool,
    /// S3 endpoint URL, overriding the AWS environment and files.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 region, overriding the AWS environment and files.
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// AWS profile to take S3 credentials and settings from.
    #[arg(long, value_name = "NAME")]
    s3_profile: Option<String>,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit(env!("CARGO_BIN_NAME"), run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (opts, keys) = args.config.load_keys(true)?;
    let kek = kek_key(keys.kek.as_deref())?;
    let disk = ConfiguredDisk::open(&opts, keys.cipher.clone(), keys.kek.clone())?;
    let remote = RemoteOptions {
        s3: S3Overrides {
            endpoint: args.s3_endpoint,
            region: args.s3_region,
            profile: args.s3_profile,
        },
        ..RemoteOptions::default()
    };
    let store = open_store("--to", &args.to, &remote)?;
    let write = WriteOptions {
        chunk_bytes: disk.chunk_bytes(),
        level: args.level,
        jobs: args.jobs.into(),
        new_key: args.new_key,
    };
    let r = write_archive(&disk, &*store, kek, &write)
        .with_context(|| format!("archiving {} to {store}", opts.path.display()))?;
    let secs = r.elapsed.as_secs_f64();
    println!(
        "archived {disk}, {} bytes, to {store} ({}): {} chunks of {} bytes\n\
         uploaded: {}\nreused: {}\nzero: {}\nbytes_in: {}\nbytes_out: {}\nseconds: {secs:.3}\n\
         mb_per_sec: {:.1}",
        disk.bytes(),
        match r.previous {
            Previous::Nothing => "a new archive",
            Previous::Archive => "updating the archive there",
            Previous::Interrupted => "resuming an unfinished first archive",
        },
        r.chunks,
        r.chunk_bytes,
        r.uploaded,
        r.reused,
        r.zero,
        r.bytes_in,
        r.bytes_out,
        r.bytes_in as f64 / 1e6 / secs.max(1e-9),
    );
    Ok(())
}
