//! vhost-frontend: a small vhost-user-blk frontend (test client) that brings a backend up
//! stage by stage and can copy the whole disk out of it.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ubiblk::frontend::{self, IoOptions, Stage};
use ubiblk::service::cli;

/// Connect to a vhost-user-blk backend as a VMM would, run the stages up to --stage and print
/// what each one negotiated. Stages: 0 setup, 1 config, 2 memory, 3 virtqueue, 4 copy (read the
/// whole disk into --output).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(short = 's', long = "socket", value_name = "SOCK")]
    socket: PathBuf,
    /// File to write the disk's content to (copy stage).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Last stage to run, by number (0-4) or name (setup, config, memory, virtqueue, copy).
    #[arg(long = "stage", value_name = "N|NAME", default_value = "copy")]
    stage: Stage,
    /// Virtqueue size (power of two, at most the backend's queue size).
    #[arg(long = "queue-size", value_name = "N", default_value_t = 128)]
    queue_size: u16,
    /// Most requests in flight during the copy.
    #[arg(long = "depth", value_name = "N", default_value_t = 16)]
    depth: usize,
    /// Largest request, in bytes (multiple of 512; also capped by the device's seg_max and
    /// size_max).
    #[arg(long = "request-size", value_name = "BYTES", default_value_t = 65536)]
    request_size: u32,
    /// Seconds to wait for the socket and for each completion.
    #[arg(long = "timeout", value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// Refuse a used length of 0 for a read (the reference v0.2 backend reports 0 for every
    /// request, which Linux guests tolerate; by default it is accepted with one warning).
    #[arg(long = "strict")]
    strict: bool,
}

fn main() -> ExitCode {
    cli::init_logging("warn");
    let args = Args::parse();
    if args.stage == Stage::Copy && args.output.is_none() {
        eprintln!(
            "vhost-frontend: the copy stage needs --output FILE (or pick an earlier --stage)"
        );
        return ExitCode::from(2);
    }
    let opts = IoOptions {
        queue_size: args.queue_size,
        depth: args.depth,
        request_size: args.request_size,
        timeout: Duration::from_secs(args.timeout),
        strict: args.strict,
    };
    let res = frontend::run(
        &args.socket,
        args.stage,
        args.output.as_deref(),
        &opts,
        |text| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        },
    );
    let res = res.map(|_| println!("stage {} ({}) done", args.stage.number(), args.stage));
    cli::exit(env!("CARGO_BIN_NAME"), res)
}
