//! The control socket (`control_socket`): a unix stream socket taking one command per line.
//!
//! `status` answers one line of JSON with the lazy-fetch progress ([`LazyStatus`]); anything
//! else answers `{"error":"unknown command",...}`. Connections are served one thread each; a client may send several
//! commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use serde::Serialize;

use super::{Error, LazyDevice, LazyStatus};
use crate::sockpath::{self, Perms, SocketFile};

/// Longest command line accepted; longer input closes the connection.
const MAX_LINE: u64 = 256;

/// Claims `path` with the rules of [`crate::sockpath`] (a stale socket is replaced, anything
/// else refused), mode 0600, and serves it on a background thread. The returned
/// [`SocketFile`] removes the socket file when dropped.
pub fn serve(path: &Path, device: Arc<LazyDevice>) -> Result<SocketFile, Error> {
    // Status is not secret, but only the operator should talk to the backend.
    let (listener, file) = sockpath::listen("control_socket", path, &Perms::private())?;
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
        .map_err(|source| Error::Thread {
            what: "the control socket thread",
            source,
        })?;
    Ok(file)
}

/// The answers, one JSON object each.
#[derive(Serialize)]
#[serde(untagged)]
enum Reply<'a> {
    Status(LazyStatus),
    Unknown {
        error: &'static str,
        command: &'a str,
        commands: [&'static str; 1],
    },
}

/// The answer to one command line.
pub fn answer(line: &str, device: &LazyDevice) -> serde_json::Result<String> {
    let reply = match line.trim() {
        "status" => Reply::Status(device.status()),
        other => Reply::Unknown {
            error: "unknown command",
            command: other,
            commands: ["status"],
        },
    };
    serde_json::to_string(&reply)
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
        // Serializing numbers, flags and strings cannot fail; if it did, hang up.
        let Ok(reply) = answer(&line, device) else {
            return;
        };
        if out.write_all((reply + "\n").as_bytes()).is_err() {
            return;
        }
    }
}
