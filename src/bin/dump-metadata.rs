//! dump-metadata: prints a lazy-fetch metadata file (the config's `metadata_path`): header,
//! stripe counts and fetched/written ranges, as text or JSON.

use anyhow::Context;
use clap::Parser;
use std::fs::File;
use std::process::ExitCode;

use ubiblk::lazy::metadata::{VERSION_MAJOR, VERSION_MINOR};
use ubiblk::lazy::{metadata_tool_files, Metadata};
use ubiblk::service::cli::{self, ConfigArgs};

/// Print the lazy-fetch metadata of a disk: the config gives `metadata_path`, the base disk
/// (`path`, whose size fixes the stripe count) and the keys when the metadata is encrypted.
/// The file is validated as the backend would; any inconsistency is an error (exit status 1).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit(env!("CARGO_BIN_NAME"), run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (opts, xts) = args.config.load()?;
    let (meta_path, _disk, disk_sectors) = metadata_tool_files(
        env!("CARGO_BIN_NAME"),
        opts.metadata_path.as_deref(),
        &opts.path,
    )?;
    let file = File::open(meta_path)
        .with_context(|| format!("metadata_path: cannot open {}", meta_path.display()))?;
    let md = Metadata::read_from(&file, disk_sectors, xts.as_deref())
        .with_context(|| format!("metadata_path: {}", meta_path.display()))?;

    if args.json {
        println!("{}", json(&md, xts.is_some())?);
    } else {
        print!("{}", text(&md, xts.is_some()));
    }
    Ok(())
}

fn text(md: &Metadata, encrypted: bool) -> String {
    let list = |r: &[(usize, usize)]| {
        if r.is_empty() {
            return "-".to_string();
        }
        r.iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "magic: BDEV_UBI (ok)\n\
         version: {VERSION_MAJOR}.{VERSION_MINOR}\n\
         encrypted: {encrypted}\n\
         stripe_sector_count_shift: {}\n\
         stripe_size_bytes: {}\n\
         stripe_count: {}\n\
         fetched_count: {}\n\
         written_count: {}\n\
         fetched: {}\n\
         written: {}\n",
        md.stripe_shift,
        md.stripe_bytes(),
        md.stripe_count(),
        md.fetched_count(),
        md.written_count(),
        list(&md.fetched_ranges()),
        list(&md.written_ranges()),
    )
}

/// The `--json` document: the header fields, counts and ranges (inclusive stripe indices).
#[derive(serde::Serialize)]
struct Dump {
    magic: &'static str,
    version: Version,
    encrypted: bool,
    stripe_sector_count_shift: u8,
    stripe_size_bytes: u64,
    stripe_count: usize,
    fetched_count: usize,
    written_count: usize,
    fetched: Vec<(usize, usize)>,
    written: Vec<(usize, usize)>,
}

#[derive(serde::Serialize)]
struct Version {
    major: u16,
    minor: u16,
}

fn json(md: &Metadata, encrypted: bool) -> serde_json::Result<String> {
    serde_json::to_string(&Dump {
        magic: "BDEV_UBI",
        version: Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
        },
        encrypted,
        stripe_sector_count_shift: md.stripe_shift,
        stripe_size_bytes: md.stripe_bytes(),
        stripe_count: md.stripe_count(),
        fetched_count: md.fetched_count(),
        written_count: md.written_count(),
        fetched: md.fetched_ranges(),
        written: md.written_ranges(),
    })
}
