//! Hardening against hostile or unlucky surroundings, through the real binaries (issue #22):
//! what the unit tests next to the code cannot show from outside the process.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-backend");
const INIT: &str = env!("CARGO_BIN_EXE_init-metadata");

/// 64 KiB stripes, 4 of them.
const SHIFT: u8 = 7;
const IMAGE: usize = 4 * (512 << SHIFT);

/// A minimal HTTP image server (one request per connection): HEAD and Range GETs of `IMAGE`
/// bytes. Returns its address and the number of requests answered.
fn serve_image() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let range = text
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes="))
                .and_then(|r| r.trim().split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            let common = "connection: close\r\netag: \"v1\"\r\n";
            let reply = match range {
                _ if text.starts_with("head ") => {
                    format!("HTTP/1.1 200 OK\r\n{common}content-length: {IMAGE}\r\n\r\n")
                        .into_bytes()
                }
                Some((a, b)) if a <= b && b < IMAGE => {
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\n{common}content-range: bytes \
                         {a}-{b}/{IMAGE}\r\ncontent-length: {}\r\n\r\n",
                        b - a + 1
                    )
                    .into_bytes();
                    r.extend((a..=b).map(|i| (i % 251) as u8));
                    r
                }
                _ => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
            };
            seen.fetch_add(1, SeqCst);
            let _ = conn.write_all(&reply);
        }
    });
    (addr, count)
}

/// `RUST_LOG=trace` does not put a presigned URL's session token or signature in the log:
/// the HTTP and TLS crates' own trace records (the bytes on the wire) are never emitted, and
/// with trace off for it ureq's debug records hide the request's path and query.
#[test]
fn trace_logging_never_shows_the_token_or_the_signature() {
    let (addr, count) = serve_image();
    let dir = scratch_dir("ubiblk-hardening-log");
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![0u8; IMAGE]).unwrap();
    let token = "SessionTokenMarker7c1e";
    let signature = "SignatureMarker93ab";
    let url =
        format!("http://{addr}/img.raw?X-Amz-Security-Token={token}&X-Amz-Signature={signature}");
    let config = BackendConfig::new(d.join("base.raw"), d.join("vhost.sock"))
        .extra(format!("image_url: {}", yaml_str(&url)))
        .extra_path("metadata_path", &d.join("meta"))
        .extra("autofetch: true");
    let config_path = d.join("config.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();
    let out = Command::new(INIT)
        .arg("-f")
        .arg(&config_path)
        .args(["-s", &SHIFT.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "init-metadata: {out:?}");

    let env = [("RUST_LOG".to_string(), "trace".to_string())];
    let mut be = Backend::start_with_env(BIN, &config, &[], &env).unwrap();
    // HEAD, the probe and the 4 stripes autofetch reads.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(SeqCst) < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    be.guard.kill();
    let log = be.log();
    assert!(count.load(SeqCst) >= 6, "the image was not read: {log}");
    assert!(!log.contains(token), "the session token is in the log");
    assert!(!log.contains(signature), "the signature is in the log");
    for line in log.lines() {
        let quiet = ["ureq", "rustls"]
            .iter()
            .any(|c| line.contains(&format!(" {c}")));
        assert!(!(quiet && line.contains("TRACE")), "{line}");
    }
    assert!(
        log.contains(&format!("image http://{addr}/img.raw")),
        "{log}"
    );
}
