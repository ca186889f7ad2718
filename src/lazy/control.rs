//! The control socket (`control_socket`): a unix stream socket taking one command per line.
//!
//! `status` answers one line of JSON with the lazy-fetch progress (see
//! [`LazyStatus::to_json`](super::LazyStatus::to_json)); anything else answers
//! `{"error":"..."}`. Connections are served one thread each; a client may send several
//! commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use log::warn;

use super::LazyDevice;

/// Longest command line accepted; longer input closes the connection.
const MAX_LINE: u64 = 256;

/// Binds `path` (replacing a stale socket there, never another kind of file) and serves it on
/// a background thread.
pub fn serve(path: &Path, device: Arc<LazyDevice>) -> anyhow::Result<()> {
    let err = || format!("control_socket: cannot listen on {}", path.display());
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "control_socket: {} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(err)?;
    }
    let listener = UnixListener::bind(path).with_context(err)?;
    // Status is not secret, but only the operator should talk to the backend.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(err)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let device = device.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || handle(stream, &device));
                    }
                    Err(e) => warn!("control socket: accept failed: {e}"),
                }
            }
        })
        .context("cannot start the control socket thread")?;
    Ok(())
}

/// The answer to one command line.
pub fn answer(line: &str, device: &LazyDevice) -> String {
    match line.trim() {
        "status" => device.status().to_json(),
        other => format!(
            "{{\"error\":\"unknown command\",\"command\":{},\"commands\":[\"status\"]}}",
            json_string(other)
        ),
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn handle(stream: UnixStream, device: &LazyDevice) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = answer(&line, device) + "\n";
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
