//! Self-test of the server fixtures of tests/common/servers/, with independent clients only
//! (curl, boto3): nginx serves files with Range and TLS and survives stop/restart; Garage
//! round-trips objects on one node and on a three-node cluster with a node down.

use crate::common::servers::{free_ports, Garage, Nginx};
use crate::common::{pattern_bytes, require, scratch_dir, BOTO3, CURL, GARAGE, NGINX, OPENSSL};
use std::path::Path;
use std::process::{Command, Output};

/// `curl -sS ARGS`, with the HTTP status appended to stdout by `-w`.
fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("cannot run curl")
}

/// Body and status of a successful curl run (`-w` status on the last 3 bytes).
fn curl_body(args: &[&str]) -> (Vec<u8>, u16) {
    let mut a = vec!["-w", "%{http_code}"];
    a.extend_from_slice(args);
    let out = curl(&a);
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let code = String::from_utf8(body.split_off(body.len() - 3)).unwrap();
    (body, code.parse().unwrap())
}

fn write_image(dir: &Path, name: &str, len: usize) -> Vec<u8> {
    let data = pattern_bytes(0, len);
    std::fs::write(dir.join(name), &data).unwrap();
    data
}

#[test]
fn nginx_serves_files_and_ranges() {
    if !require(&[NGINX, CURL]) {
        return;
    }
    let root = scratch_dir("ubiblk-servers-root");
    let data = write_image(root.path(), "img.raw", 3 << 20);
    let n = Nginx::start(root.path());
    assert!(n.ca_cert().is_none());
    assert!(n.url("img.raw").starts_with("http://127.0.0.1:"));

    let (body, code) = curl_body(&[&n.url("img.raw")]);
    assert_eq!(code, 200);
    assert!(body == data, "whole file differs");

    let (a, b) = (1_000_000usize, 1_070_000usize);
    let (body, code) = curl_body(&["-r", &format!("{a}-{b}"), &n.url("img.raw")]);
    assert_eq!(code, 206, "Range request");
    assert!(body == data[a..=b], "range {a}-{b} differs");

    let (_, code) = curl_body(&[&n.url("missing.raw")]);
    assert_eq!(code, 404);

    // Two requests on one curl command line share one keep-alive connection. (Found by their
    // range: nginx logs a request after sending its response, so the 404's line may still
    // be on its way.)
    let out = curl(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-r",
        "0-4095",
        &n.url("img.raw"),
        &n.url("img.raw"),
    ]);
    assert!(out.status.success());
    let ours = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("range=\"bytes=0-4095\""))
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let log = loop {
        let log = n.access_log();
        if ours(&log).len() >= 2 || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let conns = ours(&log);
    assert!(
        conns.len() == 2 && conns[0] == conns[1],
        "expected two requests on one connection; access log:\n{log}"
    );
}

#[test]
fn nginx_tls() {
    if !require(&[NGINX, OPENSSL, CURL]) {
        return;
    }
    let root = scratch_dir("ubiblk-servers-root");
    let data = write_image(root.path(), "img.raw", 1 << 20);
    let n = Nginx::start_tls(root.path());
    let ca = n.ca_cert().expect("a TLS server has a CA");
    let ca = ca.to_str().unwrap();
    assert!(n.url("img.raw").starts_with("https://127.0.0.1:"));

    let (body, code) = curl_body(&["--cacert", ca, "-r", "4096-8191", &n.url("img.raw")]);
    assert_eq!(code, 206);
    assert!(body == data[4096..8192], "TLS range differs");

    // localhost is in the certificate too.
    let local = n.url("img.raw").replace("127.0.0.1", "localhost");
    let (body, code) = curl_body(&["--cacert", ca, &local]);
    assert_eq!(code, 200);
    assert!(body == data);

    // Without the CA the certificate is rejected (exit 60: peer certificate not trusted).
    let out = curl(&["-o", "/dev/null", &n.url("img.raw")]);
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl without --cacert: {out:?}"
    );
}

#[test]
fn nginx_stop_restart() {
    if !require(&[NGINX, CURL]) {
        return;
    }
    let root = scratch_dir("ubiblk-servers-root");
    let data = write_image(root.path(), "img.raw", 64 << 10);
    let mut n = Nginx::start(root.path());
    let url = n.url("img.raw");
    assert_eq!(curl_body(&[&url]).1, 200);

    n.stop();
    let out = curl(&["-o", "/dev/null", &url]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to a stopped nginx should fail to connect: {out:?}"
    );

    n.restart();
    assert_eq!(n.url("img.raw"), url, "restart keeps the port");
    let (body, code) = curl_body(&[&url]);
    assert_eq!(code, 200);
    assert!(body == data);

    // restart() of a running server works too.
    n.restart();
    assert_eq!(curl_body(&["-r", "0-9", &url]), (data[..10].to_vec(), 206));
}

/// Ports picked together are distinct (each held while the next is picked): a Garage node
/// once got one port for both its RPC and its admin API and never became ready.
#[test]
fn ports_picked_together_are_distinct() {
    let mut ports = free_ports(64);
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 64);
}

#[test]
fn garage_single_node() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let g = Garage::start();
    assert_eq!(g.url("a/b"), format!("s3://{}/a/b", g.bucket()));
    let env = g.env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"
        ]
    );

    let small = pattern_bytes(12345, 100_000);
    g.put_bytes("dir/small", &small);
    assert!(g.get("dir/small").as_deref() == Some(&small[..]));
    assert_eq!(g.get("dir/missing"), None);

    let dir = scratch_dir("ubiblk-servers-obj");
    let big = write_image(dir.path(), "big.raw", 5 << 20);
    g.put_file("dir/big.raw", &dir.path().join("big.raw"));
    assert!(g.get("dir/big.raw").as_deref() == Some(&big[..]));

    let mut listed = g.list("dir/");
    listed.sort();
    assert_eq!(
        listed,
        [
            ("dir/big.raw".to_string(), big.len() as u64),
            ("dir/small".to_string(), small.len() as u64)
        ]
    );

    // A presigned URL works with a plain HTTP client, Range included.
    let url = g.presign("dir/big.raw", 600);
    assert!(url.starts_with(&g.endpoint()), "{url}");
    let (body, code) = curl_body(&["-r", "1048576-1052671", &url]);
    assert_eq!(code, 206);
    assert!(body == big[1048576..1052672], "presigned range differs");
    // Unsigned requests are refused.
    let plain = format!("{}/{}/dir/big.raw", g.endpoint(), g.bucket());
    assert_eq!(curl_body(&["-o", "/dev/null", &plain]).1, 403);

    g.delete("dir/small");
    assert_eq!(g.get("dir/small"), None);
}

#[test]
fn garage_single_node_restart() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let mut g = Garage::start();
    g.put_bytes("k", b"kept across a restart");
    g.kill_node(0);
    g.restart_node(0);
    assert_eq!(g.get("k").as_deref(), Some(&b"kept across a restart"[..]));
}

#[test]
fn garage_cluster_survives_a_node_down() {
    if !require(&[GARAGE, BOTO3]) {
        return;
    }
    let mut g = Garage::cluster(3);
    assert_eq!(g.nodes(), 3);
    let data = pattern_bytes(777, 3 << 20);
    g.put_bytes("img", &data);

    g.kill_node(1);
    // Before the others notice (their next ping, up to ~10 s), requests may stall, not fail.
    assert!(
        g.get("img").as_deref() == Some(&data[..]),
        "get with node 1 down"
    );
    g.wait_node_down(1);
    // Writes still reach a quorum (2 of 3).
    g.put_bytes("while-down", b"x");

    g.restart_node(1);
    assert!(g.get("img").as_deref() == Some(&data[..]));
    assert_eq!(g.get("while-down").as_deref(), Some(&b"x"[..]));

    // Node 1 answers S3 itself once it is back.
    // (The signature covers the host, so the URL is signed for node 1's endpoint.)
    let out = g
        .boto3(&["presign", &g.bucket(), "img", "600"])
        .env("UBIBLK_S3_ENDPOINT", g.node_endpoint(1))
        .output()
        .unwrap();
    assert!(out.status.success(), "presign: {out:?}");
    let url1 = String::from_utf8(out.stdout).unwrap();
    assert!(url1.starts_with(&g.node_endpoint(1)), "{url1}");
    let (body, code) = curl_body(&["-r", "0-999", url1.trim()]);
    assert_eq!(code, 206, "presigned GET on node 1");
    assert!(body == data[..1000]);
}
