//! vhost-backend: serves a disk to a VMM over vhost-user-blk.

use clap::Parser;
use log::{info, warn};
use std::process::ExitCode;

use ubiblk::service::cli::{self, ConfigArgs};

/// Serve a file or block device to a VM as a vhost-user-blk disk.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit(env!("CARGO_BIN_NAME"), run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<()> {
    let (opts, keys) = args.config.load_keys(false)?;
    for (field, why) in opts.ignored_fields() {
        warn!("config field `{field}` has no effect: {why}");
    }
    if opts.write_through {
        info!("write-through: every write is durable when it completes");
    }
    ubiblk::service::run(&opts, keys)?;
    Ok(())
}
