//! Running the stages in order, as the binary does.

use std::path::Path;

use super::error::{io_err, Error, Result};
use super::{BlkFrontend, Geometry, IoOptions, Report, Stage};

/// Runs stages 0..=`stage` against `socket`. `output` is required for [`Stage::Copy`].
/// `print` receives each stage's report as soon as the stage completes.
pub fn run(
    socket: &Path,
    stage: Stage,
    output: Option<&Path>,
    opts: &IoOptions,
    mut print: impl FnMut(&str),
) -> Result<Report> {
    let out = if stage >= Stage::Copy {
        let path = output.ok_or(Error::NoOutput)?;
        Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|source| Error::CreateOutput {
                    path: path.to_path_buf(),
                    source,
                })?,
        )
    } else {
        None
    };
    let mut report = Report::default();
    let mut fe = BlkFrontend::connect(socket, opts.timeout)?;
    fe.set_strict(opts.strict);
    print(&format!("connected to {}\n", socket.display()));

    let s = fe.setup().map_err(in_stage(Stage::Setup))?;
    print(&s.to_string());
    report.setup = Some(s);
    if stage == Stage::Setup {
        return Ok(report);
    }

    let cfg = fe.read_config().map_err(in_stage(Stage::Config))?;
    print(&cfg.to_string());
    report.config = Some(cfg.clone());
    if stage == Stage::Config {
        return Ok(report);
    }

    let geometry = Geometry::new(opts, &cfg)?;
    let m = fe
        .setup_memory(&geometry)
        .map_err(in_stage(Stage::Memory))?;
    print(&m.to_string());
    report.memory = Some(m);
    if stage == Stage::Memory {
        return Ok(report);
    }

    let v = fe
        .setup_virtqueue(&geometry)
        .map_err(in_stage(Stage::Virtqueue))?;
    print(&v.to_string());
    report.virtqueue = Some(v);
    if stage == Stage::Virtqueue {
        return Ok(report);
    }

    let out = out.ok_or(Error::NoOutput)?;
    let c = fe
        .copy_disk(&out, opts.timeout, |_| {})
        .map_err(in_stage(Stage::Copy))?;
    out.sync_all().map_err(io_err("syncing the output file"))?;
    print(&c.to_string());
    report.copy = Some(c);
    Ok(report)
}

/// Tags an error with the stage it happened in.
fn in_stage(stage: Stage) -> impl FnOnce(Error) -> Error {
    move |e| Error::Stage {
        stage,
        source: Box::new(e),
    }
}
