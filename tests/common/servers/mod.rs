//! Real servers for the remote-source tests and benchmarks, on loopback, each in its own
//! temporary directory and killed on drop:
//!
//! * [`Nginx`]: Debian's `/usr/sbin/nginx` serving a directory over HTTP ([`Nginx::start`]) or
//!   HTTPS with a freshly generated CA ([`Nginx::start_tls`]; clients trust [`Nginx::ca_cert`]
//!   through `SSL_CERT_FILE`). Range requests and keep-alive are nginx's own.
//! * [`Garage`]: an S3 server ([Garage](https://garagehq.deuxfleurs.fr), binary from
//!   [`garage_bin`]): one node ([`Garage::start`]) or a replicated cluster
//!   ([`Garage::cluster`]), with one bucket and one access key that can read and write it.
//!
//! Objects are put and read by a reference client independent of ours: Python's boto3
//! (path-style addressing), run as `python3 -c` with the script [`BOTO3_SCRIPT`].
//!
//! Every constructor waits until its server answers and panics with the server's log when it
//! does not.

mod garage;
mod nginx;
mod s3_client;

#[allow(unused_imports)]
pub use {garage::*, nginx::*, s3_client::BOTO3_SCRIPT};

use super::{scratch_dir, ChildGuard};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a server may take to start before the fixture panics.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound, then released: another process could take it before
/// the server binds it; the constructors retry with fresh ports when a server fails to start).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports on 127.0.0.1: all held at once while they are picked, since a
/// port let go is free again and may come back from the next pick (Garage was once given
/// the same port for its RPC and its admin API, which then never answered `/health`).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .expect("cannot bind a TCP port on 127.0.0.1")
        })
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound listener's address").port())
        .collect()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Status code of a plain-HTTP `GET path` on 127.0.0.1:`port`, or None when there is no answer.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Polls `ready` every 10 ms until it holds; panics after [`START_TIMEOUT`] or when `child`
/// exits first, with `what` and the child's log.
fn wait_ready(child: &mut ChildGuard, what: &str, mut ready: impl FnMut() -> bool) {
    if let Err(e) = try_wait_ready(child, what, &mut ready) {
        panic!("{e}");
    }
}

fn try_wait_ready(
    child: &mut ChildGuard,
    what: &str,
    ready: &mut dyn FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(st) = child.try_wait() {
            return Err(format!(
                "{what}: the server exited with {st}; its log:\n{}",
                child.log()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: not ready after {START_TIMEOUT:?}; its log:\n{}",
                child.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cmd`'s program and arguments for a message, a long inline script shown as `<script>` (and
/// the environment, which holds the S3 secret, left out).
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.len() > 200 {
                "<script>".to_string()
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A hint for a Python failure that is a missing module.
fn python_hint(stderr: &str) -> &'static str {
    if stderr.contains("No module named 'boto3'") {
        "\n(python3 lacks boto3: `python3 -m pip install boto3` or `apt-get install python3-boto3`; .ci/run installs it)"
    } else {
        ""
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", describe(cmd)));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        panic!(
            "{what}: `{}` failed ({}):\n{}{stderr}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            python_hint(&stderr)
        );
    }
    out.stdout
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
