//! replay-log: applies an I/O debug log (`io_debug_path`) to a disk image, checking its reads.

use clap::Parser;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use ubiblk::replay::{replay, Event, LogError};

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
    let args = Args::parse();
    let log = match File::open(&args.log) {
        Ok(f) => BufReader::with_capacity(1 << 20, f),
        Err(e) => return fail(format!("cannot open log {}: {e}", args.log.display())),
    };
    let disk = match OpenOptions::new().read(true).write(true).open(&args.disk) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open disk {}: {e}", args.disk.display())),
    };
    let result = replay(log, &disk, |event| match event {
        Event::Mismatch(m) => println!("{m}"),
        Event::Truncated { line, what } => eprintln!(
            "replay-log: warning: {}: the last record (line {line}) is truncated, skipped: {what}",
            args.log.display()
        ),
    });
    match result {
        Ok(sum) => {
            println!(
                "{} writes ({} bytes) applied, {} reads ({} bytes) checked, {} mismatches",
                sum.writes, sum.bytes_written, sum.reads, sum.bytes_read, sum.mismatches
            );
            if sum.mismatches > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(LogError::Disk(e)) => fail(format!("{}: {e}", args.disk.display())),
        Err(e) => fail(format!("{}: {e}", args.log.display())),
    }
}

fn fail(msg: String) -> ExitCode {
    eprintln!("replay-log: {msg}");
    ExitCode::from(2)
}
