//! replay-log: applies an I/O debug log (`io_debug_path`) to a disk image, checking its reads.

use anyhow::Context;
use clap::Parser;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use ubiblk::service::cli;
use ubiblk::tools::replay::{replay, Event, LogError};

/// Replay the READ and WRITE records of an I/O debug log onto a disk image: every WRITE is
/// applied at sector*512, every READ is compared with the disk's current content.
///
/// Exit status: 0 if every READ matched, 1 if some did not, 2 if the log is malformed or an
/// I/O error occurred.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The I/O debug log written by vhost-backend (`io_debug_path`).
    #[arg(short = 'l', long = "log", value_name = "LOG")]
    log: PathBuf,
    /// The disk image (or block device) to replay onto; it is modified in place.
    #[arg(short = 'd', long = "disk", value_name = "DISK")]
    disk: PathBuf,
}

fn main() -> ExitCode {
    cli::finish(env!("CARGO_BIN_NAME"), run(Args::parse()), 2)
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let log =
        File::open(&args.log).with_context(|| format!("cannot open log {}", args.log.display()))?;
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.disk)
        .with_context(|| format!("cannot open disk {}", args.disk.display()))?;
    let on_event = |event: Event| match event {
        Event::Mismatch(m) => println!("{m}"),
        Event::Truncated { line, what } => eprintln!(
            "replay-log: warning: {}: the last record (line {line}) is truncated, skipped: {what}",
            args.log.display()
        ),
    };
    let sum = replay(BufReader::with_capacity(1 << 20, log), &disk, on_event).map_err(|e| {
        // Disk errors name the disk; the others are the log's.
        let file = if matches!(e, LogError::Disk(_)) {
            &args.disk
        } else {
            &args.log
        };
        anyhow::Error::new(e).context(file.display().to_string())
    })?;
    println!(
        "{} writes ({} bytes) applied, {} reads ({} bytes) checked, {} mismatches",
        sum.writes, sum.bytes_written, sum.reads, sum.bytes_read, sum.mismatches
    );
    Ok(if sum.mismatches > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
