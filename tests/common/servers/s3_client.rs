//! The reference S3 client of the [`Garage`] fixture: boto3, run as `python3 -c`
//! [`BOTO3_SCRIPT`], to put, read, list, presign and delete objects.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{python_hint, run_checked, Garage, GARAGE_BUCKET};

/// The reference S3 client: boto3 with path-style addressing, credentials from
/// UBIBLK_S3_{ENDPOINT,REGION,ACCESS_KEY,SECRET_KEY} (never from ~/.aws). Operations (argv):
///
/// * `ready BUCKET SECS`: puts, reads back and deletes a probe object until that works (exit 1
///   with the last error after SECS)
/// * `put BUCKET KEY PATH` (PATH `-` = stdin)
/// * `get BUCKET KEY`: the object on stdout; exit 3 when there is no such key
/// * `presign BUCKET KEY SECS`: a presigned GET URL
/// * `list BUCKET PREFIX`: `SIZE KEY` lines
/// * `delete BUCKET KEY`
/// * benchmark references, each printing the seconds it measured (after start-up):
///   `download BUCKET KEY PATH THREADS CHUNK` (TransferManager, ranged GETs of CHUNK bytes,
///   then fsync), `getranges BUCKET KEY CHUNK INDEX...` (one keep-alive client, one GET of
///   chunk INDEX per line), `upload-zstd BUCKET KEY PATH` (`zstd -T0 -c PATH` piped into a
///   multipart upload; prints seconds and the object's size)
pub const BOTO3_SCRIPT: &str = r#"
import os, subprocess, sys, time
import boto3
import botocore.exceptions
from botocore.config import Config
from boto3.s3.transfer import TransferConfig

def client():
    e = os.environ
    kw = dict(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=120,
        max_pool_connections=32,
    )
    try:
        # botocore >= 1.36 checksums every upload and download by default: only when required.
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", **kw)
    except TypeError:  # older botocore (Debian 12's python3-boto3): no such options
        config = Config(**kw)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=e["UBIBLK_S3_ENDPOINT"],
        region_name=e["UBIBLK_S3_REGION"],
        aws_access_key_id=e["UBIBLK_S3_ACCESS_KEY"],
        aws_secret_access_key=e["UBIBLK_S3_SECRET_KEY"],
        config=config,
    )

def main():
    op, args = sys.argv[1], sys.argv[2:]
    s3 = client()
    if op == "ready":
        bucket, secs = args[0], float(args[1])
        deadline = time.monotonic() + secs
        while True:
            try:
                s3.put_object(Bucket=bucket, Key=".ubiblk-probe", Body=b"probe")
                got = s3.get_object(Bucket=bucket, Key=".ubiblk-probe")["Body"].read()
                assert got == b"probe", got
                s3.delete_object(Bucket=bucket, Key=".ubiblk-probe")
                return 0
            except Exception as ex:
                if time.monotonic() > deadline:
                    print("not ready after %ss: %r" % (secs, ex), file=sys.stderr)
                    return 1
                time.sleep(0.05)
    if op == "put":
        bucket, key, path = args
        if path == "-":
            s3.put_object(Bucket=bucket, Key=key, Body=sys.stdin.buffer.read())
        else:
            s3.upload_file(path, bucket, key, Config=TransferConfig(
                multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=8))
        return 0
    if op == "get":
        bucket, key = args
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as ex:
            if ex.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return 3
            raise
        sys.stdout.buffer.write(body)
        return 0
    if op == "presign":
        bucket, key, secs = args
        print(s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(secs)))
        return 0
    if op == "list":
        bucket, prefix = args
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                print(o["Size"], o["Key"])
        return 0
    # Benchmark references (benches/remote.rs); times are measured here, after start-up.
    if op == "download":
        bucket, key, path, threads, chunk = args
        cfg = TransferConfig(max_concurrency=int(threads), multipart_chunksize=int(chunk),
                             multipart_threshold=int(chunk))
        t0 = time.monotonic()
        s3.download_file(bucket, key, path, Config=cfg)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        print("%.6f" % (time.monotonic() - t0))
        return 0
    if op == "getranges":
        bucket, key, chunk = args[0], args[1], int(args[2])
        for i in args[3:]:
            a = int(i) * chunk
            t0 = time.monotonic()
            body = s3.get_object(Bucket=bucket, Key=key,
                                 Range="bytes=%d-%d" % (a, a + chunk - 1))["Body"].read()
            dt = time.monotonic() - t0
            assert len(body) == chunk, (i, len(body))
            print("%.6f" % dt)
        return 0
    if op == "upload-zstd":
        bucket, key, path = args
        t0 = time.monotonic()
        p = subprocess.Popen(["zstd", "-T0", "-q", "-c", path], stdout=subprocess.PIPE)
        s3.upload_fileobj(p.stdout, bucket, key, Config=TransferConfig(
            multipart_chunksize=16 << 20, max_concurrency=8))
        if p.wait() != 0:
            raise RuntimeError("zstd failed: %d" % p.returncode)
        dt = time.monotonic() - t0
        print("%.6f %d" % (dt, s3.head_object(Bucket=bucket, Key=key)["ContentLength"]))
        return 0
    if op == "delete":
        bucket, key = args
        s3.delete_object(Bucket=bucket, Key=key)
        return 0
    print("unknown op " + op, file=sys.stderr)
    return 2

sys.exit(main())
"#;

impl Garage {
    /// A `python3` command running the reference client ([`BOTO3_SCRIPT`]) with `args`,
    /// against node 0.
    pub fn boto3(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(BOTO3_SCRIPT)
            .args(args)
            .envs(self.boto3_env())
            .stdin(Stdio::null());
        cmd
    }

    /// Environment of the reference scripts: UBIBLK_S3_* for node 0, and no ~/.aws files.
    pub fn boto3_env(&self) -> Vec<(String, String)> {
        vec![
            ("UBIBLK_S3_ENDPOINT".into(), self.endpoint()),
            ("UBIBLK_S3_REGION".into(), self.region()),
            ("UBIBLK_S3_ACCESS_KEY".into(), self.access_key()),
            ("UBIBLK_S3_SECRET_KEY".into(), self.secret_key()),
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    fn boto3_checked(&self, args: &[&str]) -> Vec<u8> {
        run_checked(&mut self.boto3(args), &format!("boto3 {}", args[0]))
    }

    /// Uploads a file as `key` (boto3 `upload_file`: multipart above 64 MiB).
    pub fn put_file(&self, key: &str, path: &Path) {
        let p = path.to_str().expect("non-UTF-8 path");
        self.boto3_checked(&["put", GARAGE_BUCKET, key, p]);
    }

    /// Uploads `data` as `key` (one PUT).
    pub fn put_bytes(&self, key: &str, data: &[u8]) {
        let mut cmd = self.boto3(&["put", GARAGE_BUCKET, key, "-"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot run python3");
        let mut stdin = child.stdin.take().unwrap();
        let out = std::thread::scope(|s| {
            s.spawn(move || {
                // An error shows as the script's failure below.
                let _ = stdin.write_all(data);
            });
            child.wait_with_output().expect("waiting for python3")
        });
        assert!(
            out.status.success(),
            "boto3 put of {key} ({} bytes) failed ({}):\n{}{}",
            data.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            python_hint(&String::from_utf8_lossy(&out.stderr))
        );
    }

    /// The object `key`, or None when there is none.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = self
            .boto3(&["get", GARAGE_BUCKET, key])
            .output()
            .expect("cannot run python3");
        match out.status.code() {
            Some(0) => Some(out.stdout),
            Some(3) => None,
            _ => panic!(
                "boto3 get of {key} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                python_hint(&String::from_utf8_lossy(&out.stderr))
            ),
        }
    }

    /// A presigned GET URL of `key`, valid for `secs` seconds (boto3).
    pub fn presign(&self, key: &str, secs: u64) -> String {
        let out = self.boto3_checked(&["presign", GARAGE_BUCKET, key, &secs.to_string()]);
        String::from_utf8(out).unwrap().trim().to_string()
    }

    /// (key, size) of every object whose key starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let out = self.boto3_checked(&["list", GARAGE_BUCKET, prefix]);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                let (size, key) = l.split_once(' ').expect("list line");
                (key.to_string(), size.parse().expect("list size"))
            })
            .collect()
    }

    pub fn delete(&self, key: &str) {
        self.boto3_checked(&["delete", GARAGE_BUCKET, key]);
    }
}
