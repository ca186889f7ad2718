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

use super::ChildGuard;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start before the fixture panics.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound, then released: another process could take it before
/// the server binds it; the constructors retry with fresh ports when a server fails to start).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("cannot bind a TCP port on 127.0.0.1")
        .port()
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

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// Debian's nginx.
pub const NGINX_BIN: &str = "/usr/sbin/nginx";

/// nginx serving a directory on a free 127.0.0.1 port: `url("img.raw")` is `root/img.raw`.
/// One process (`master_process off`), `sendfile on`, keep-alive on; its logs (and the access
/// log, one line per request with the connection number, see [`Nginx::access_log`]) and temp
/// paths are in its temp dir. Killed on drop.
pub struct Nginx {
    // Fields drop in order: the process dies before its directory is removed.
    child: Option<ChildGuard>,
    dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    tls: bool,
}

impl Nginx {
    /// Plain HTTP.
    pub fn start(root: &Path) -> Nginx {
        Self::start_with(root, false)
    }

    /// HTTPS with a server certificate for 127.0.0.1 and localhost signed by a CA made for this
    /// server ([`Nginx::ca_cert`]); the URLs use `https://127.0.0.1:PORT/`.
    pub fn start_tls(root: &Path) -> Nginx {
        Self::start_with(root, true)
    }

    fn start_with(root: &Path, tls: bool) -> Nginx {
        assert!(
            Path::new(NGINX_BIN).exists(),
            "{NGINX_BIN} is missing: install Debian's nginx-light or nginx (.ci/run does)"
        );
        let root = root
            .canonicalize()
            .unwrap_or_else(|e| panic!("nginx root {}: {e}", root.display()));
        let mut dir = super::scratch_dir("ubiblk-nginx");
        if tls {
            make_certs(dir.path());
        }
        let mut last = String::new();
        // A port taken between free_port() and nginx's bind: retry with another one.
        for _ in 0..5 {
            let mut n = Nginx {
                dir,
                root: root.clone(),
                port: free_port(),
                tls,
                child: None,
            };
            match n.spawn() {
                Ok(()) => return n,
                Err(e) => {
                    last = e;
                    dir = n.dir;
                }
            }
        }
        panic!("nginx did not start:\n{last}");
    }

    fn conf(&self) -> String {
        let d = self.dir.path().display();
        let (listen, ssl) = if self.tls {
            (
                format!("127.0.0.1:{} ssl", self.port),
                format!(
                    "ssl_certificate {d}/server.pem;\n    ssl_certificate_key {d}/server.key;\n    \
                     ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:ubiblk:1m;"
                ),
            )
        } else {
            (format!("127.0.0.1:{}", self.port), String::new())
        };
        format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
worker_rlimit_nofile 4096;
events {{
  worker_connections 2048;
}}
http {{
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  log_format ubiblk '$connection $connection_requests $status "$request" range="$http_range" $body_bytes_sent';
  access_log {d}/access.log ubiblk;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  server {{
    listen {listen};
    server_name localhost;
    {ssl}
    root "{root}";
    location / {{ }}
  }}
}}
"#,
            root = self.root.display(),
        )
    }

    fn spawn(&mut self) -> Result<(), String> {
        let conf = self.dir.path().join("nginx.conf");
        std::fs::write(&conf, self.conf()).unwrap();
        let mut cmd = Command::new(NGINX_BIN);
        cmd.arg("-p")
            .arg(self.dir.path())
            .arg("-e")
            .arg(self.dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf);
        let log_dir = super::scratch_dir("ubiblk-nginx-log");
        let mut child = ChildGuard::spawn("nginx", cmd, log_dir).map_err(|e| format!("{e:#}"))?;
        let port = self.port;
        let r = try_wait_ready(
            &mut child,
            &format!("nginx on 127.0.0.1:{port} serving {}", self.root.display()),
            &mut || listening(port),
        );
        match r {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => Err(format!(
                "{e}\nerror.log:\n{}",
                std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            )),
        }
    }

    /// The URL of `name` (a path relative to the root, without a leading `/`).
    pub fn url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{name}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) that signed the server certificate; None without TLS.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.pem"))
    }

    /// Kills nginx (SIGKILL): an outage, connections reset, the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts nginx again on the same port (after [`Nginx::stop`], or kills it first).
    pub fn restart(&mut self) {
        self.stop();
        // Another process may bind the port while nginx is down; rare, and then this panics.
        if let Err(e) = self.spawn() {
            panic!("nginx did not restart on port {}:\n{e}", self.port);
        }
    }

    /// The access log so far: one line per request,
    /// `CONNECTION REQUEST_ON_CONNECTION STATUS "REQUEST" range="RANGE" BODY_BYTES`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// nginx's error log (info level) so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// A CA (`ca.pem`, `ca.key`) and a server certificate for IP 127.0.0.1 and DNS localhost
/// signed by it (`server.pem`, `server.key`) in `dir`, made with the openssl CLI (P-256 keys).
fn make_certs(dir: &Path) {
    let ossl = |args: &[&str], what: &str| {
        run_checked(Command::new("openssl").current_dir(dir).args(args), what);
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .unwrap();
    ossl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=ubiblk test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        "making the test CA",
    );
    ossl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        "making the server key",
    );
    ossl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
        "signing the server certificate",
    );
}

// ---------------------------------------------------------------------------------------------
// Garage
// ---------------------------------------------------------------------------------------------

/// The Garage binary: `$UBIBLK_GARAGE_BIN`, else `shared/bin/garage` in the parent directory of
/// the crate (`../shared/bin/garage`; further ancestors are tried too, for git worktrees), else
/// `garage` on PATH or in ~/.cargo/bin (`cargo install garage --locked --version 2.5.0`).
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("UBIBLK_GARAGE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "UBIBLK_GARAGE_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in manifest.ancestors().skip(1) {
        let p = dir.join("shared/bin/garage");
        if p.is_file() {
            return p;
        }
    }
    let mut path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        path.push(PathBuf::from(home).join(".cargo/bin"));
    }
    for dir in path {
        let p = dir.join("garage");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "no garage binary: set UBIBLK_GARAGE_BIN, or put it at ../shared/bin/garage relative to {} \
         (or an ancestor's shared/bin/garage), or install `garage` on PATH \
         (`cargo install garage --locked --version 2.5.0` puts it in ~/.cargo/bin; .ci/run does this)",
        manifest.display()
    );
}

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

/// The S3 region every [`Garage`] uses.
pub const GARAGE_REGION: &str = "garage";
/// The bucket every [`Garage`] has.
pub const GARAGE_BUCKET: &str = "ubiblk";

struct GarageNode {
    config: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    child: Option<ChildGuard>,
    /// `ID@127.0.0.1:RPC_PORT` (cluster nodes only).
    id: String,
}

/// A Garage S3 server on loopback (one node, or a cluster replicating every object on all
/// nodes), with the bucket [`GARAGE_BUCKET`] and one access key with read, write and owner
/// rights on it. Metadata (sqlite) and data live in a temp dir (tmpfs when possible); no
/// compression. Killed on drop.
pub struct Garage {
    // Fields drop in order: the nodes die before their directory is removed.
    nodes: Vec<GarageNode>,
    dir: tempfile::TempDir,
    access_key: String,
    secret_key: String,
    /// The single-node layout comes from `server --single-node`; restarts run plain `server`.
    single: bool,
}

impl Garage {
    /// One node, `replication_factor = 1`, configured by `garage server --single-node
    /// --default-bucket` (layout, key and bucket made by the server itself at start-up).
    pub fn start() -> Garage {
        Self::launch(super::scratch_dir("ubiblk-garage"), 1)
    }

    /// [`Garage::start`] with its files in a fresh directory inside `parent` (e.g. a disk
    /// instead of tmpfs, for large benchmark objects). The directory is removed on drop.
    pub fn start_in(parent: &Path) -> Garage {
        let dir = tempfile::Builder::new()
            .prefix("ubiblk-garage")
            .tempdir_in(parent)
            .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", parent.display()));
        Self::launch(dir, 1)
    }

    /// `n` nodes on loopback with `replication_factor = n` (every node stores every object;
    /// `n = 3` tolerates one node down), all in the layout of zone dc1, connected with
    /// `garage node connect`. [`Garage::endpoint`] is node 0's S3 API.
    pub fn cluster(n: usize) -> Garage {
        Self::launch(super::scratch_dir("ubiblk-garage"), n)
    }

    fn launch(dir: tempfile::TempDir, n: usize) -> Garage {
        assert!(n >= 1, "a Garage cluster needs at least one node");
        let bin = garage_bin();
        let mut g = Garage {
            nodes: Vec::new(),
            dir,
            access_key: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
            single: n == 1,
        };
        let rpc_secret = random_hex(32);
        let mut last = String::new();
        for attempt in 0..5 {
            g.nodes.clear();
            for i in 0..n {
                let node_dir = g.dir.path().join(format!("a{attempt}-node{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
                let config = node_dir.join("garage.toml");
                std::fs::write(
                    &config,
                    format!(
                        r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {n}
consistency_mode = "consistent"
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                        d = node_dir.display()
                    ),
                )
                .unwrap();
                g.nodes.push(GarageNode {
                    config,
                    rpc_port,
                    s3_port,
                    admin_port,
                    child: None,
                    id: String::new(),
                });
            }
            match g.try_launch(&bin) {
                Ok(()) => return g,
                Err(e) => {
                    for node in &mut g.nodes {
                        node.child.take();
                    }
                    last = e;
                    // Only a port taken by someone else is worth another try.
                    if !last.contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!(
            "Garage ({n} node(s), {}) did not start:\n{last}",
            bin.display()
        );
    }

    fn try_launch(&mut self, bin: &Path) -> Result<(), String> {
        if self.single {
            let child = self.spawn_node(bin, 0, true)?;
            self.nodes[0].child = Some(child);
            // The server made its layout, key and bucket before it opened its S3 port; a
            // healthy node with an open S3 port is ready.
            return self.wait_node(0);
        }
        for i in 0..self.nodes.len() {
            let child = self.spawn_node(bin, i, false)?;
            self.nodes[i].child = Some(child);
        }
        let mut ids = Vec::new();
        for i in 0..self.nodes.len() {
            let port = self.nodes[i].rpc_port;
            let child = self.nodes[i].child.as_mut().unwrap();
            try_wait_ready(
                child,
                &format!("garage node {i} RPC on 127.0.0.1:{port}"),
                &mut || listening(port),
            )?;
            // `node id -q`: full id @ rpc_public_addr, from the running node.
            let id = self.cli_retry(i, &["node", "id", "-q"])?;
            ids.push(id.trim().to_string());
            self.nodes[i].id = id.trim().to_string();
        }
        for id in &ids[1..] {
            self.cli_retry(0, &["node", "connect", id])?;
        }
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        let short: Vec<&str> = ids.iter().map(|id| id.split('@').next().unwrap()).collect();
        assign.extend(short.iter().copied());
        self.cli(0, &assign)?;
        self.cli(0, &["layout", "apply", "--version", "1"])?;
        let (ak, sk) = (self.access_key.clone(), self.secret_key.clone());
        // Retried while the new layout reaches the other nodes; an attempt that failed late
        // may have imported the key already.
        let import = ["key", "import", "--yes", "-n", "ubiblk", &ak, &sk];
        if let Err(e) = self.cli_retry(0, &import) {
            if !self
                .cli(0, &["key", "info", "ubiblk"])
                .is_ok_and(|o| o.contains(&ak))
            {
                return Err(e);
            }
        }
        self.cli_retry(0, &["bucket", "create", GARAGE_BUCKET])?;
        self.cli_retry(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                GARAGE_BUCKET,
                "--key",
                "ubiblk",
            ],
        )?;
        for i in 0..self.nodes.len() {
            self.wait_node(i)?;
        }
        // The bucket and key tables reach every node asynchronously: wait until node 0 serves
        // a put/get/delete round trip.
        let out = self
            .boto3(&["ready", GARAGE_BUCKET, &START_TIMEOUT.as_secs().to_string()])
            .output()
            .map_err(|e| format!("running python3: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the S3 API of node 0 does not serve the bucket: {}{}\nnode 0 log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                python_hint(&String::from_utf8_lossy(&out.stderr)),
                self.nodes[0].child.as_ref().unwrap().log()
            ));
        }
        Ok(())
    }

    fn spawn_node(&self, bin: &Path, i: usize, single: bool) -> Result<ChildGuard, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&self.nodes[i].config).arg("server");
        if single {
            cmd.args(["--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
                .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
                .env("GARAGE_DEFAULT_BUCKET", GARAGE_BUCKET);
        }
        cmd.env("RUST_LOG", "garage=info,netapp=warn");
        let log_dir = tempfile::Builder::new()
            .prefix("log")
            .tempdir_in(self.dir.path())
            .map_err(|e| e.to_string())?;
        ChildGuard::spawn(&format!("garage-node{i}"), cmd, log_dir).map_err(|e| format!("{e:#}"))
    }

    /// Waits until node `i` reports itself healthy on its admin API (`GET /health`: all
    /// partitions have a quorum) and its S3 port accepts connections.
    fn wait_node(&mut self, i: usize) -> Result<(), String> {
        let (admin, s3) = (self.nodes[i].admin_port, self.nodes[i].s3_port);
        let child = self.nodes[i].child.as_mut().unwrap();
        try_wait_ready(
            child,
            &format!("garage node {i} (S3 on 127.0.0.1:{s3}, admin /health on 127.0.0.1:{admin})"),
            &mut || http_status(admin, "/health") == Some(200) && listening(s3),
        )
    }

    /// `garage -c CONFIG(i) ARGS`: its stdout, or an error with its output and node i's log.
    fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .output()
            .map_err(|e| format!("running garage {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "garage -c {} {} failed ({}):\n{}{}\nnode {i} log:\n{}",
                self.nodes[i].config.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.nodes[i]
                    .child
                    .as_ref()
                    .map(|c| c.log())
                    .unwrap_or_default()
            ))
        }
    }

    /// [`Garage::cli`] until it succeeds (the cluster may still be settling), for at most
    /// [`START_TIMEOUT`].
    fn cli_retry(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.cli(i, args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// S3 endpoint of node 0, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.node_endpoint(0)
    }

    /// S3 endpoint of node `i`.
    pub fn node_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    pub fn region(&self) -> String {
        GARAGE_REGION.to_string()
    }

    pub fn bucket(&self) -> String {
        GARAGE_BUCKET.to_string()
    }

    pub fn access_key(&self) -> String {
        self.access_key.clone()
    }

    pub fn secret_key(&self) -> String {
        self.secret_key.clone()
    }

    /// `s3://BUCKET/KEY`.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{GARAGE_BUCKET}/{key}")
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The environment an S3 client needs: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), self.region()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key()),
        ]
    }

    /// The settings of this crate's S3 client for node 0 (as [`Garage::env`] gives them).
    pub fn aws_config(&self) -> ubiblk::remote::aws::AwsConfig {
        use ubiblk::remote::aws::{AwsConfig, Credentials, Secret};
        AwsConfig {
            region: self.region(),
            endpoint: Some(self.endpoint()),
            credentials: Some(Credentials {
                key_id: self.access_key(),
                secret: Secret::new(self.secret_key()),
                token: None,
                origin: "test".into(),
            }),
        }
    }

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

    /// SIGKILLs node `i`. The other nodes notice at their next ping (up to ~10 s later); until
    /// then requests touching node `i` may stall rather than fail ([`Garage::wait_node_down`]
    /// waits for that).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill();
        }
    }

    /// Waits until a live node lists node `i` among the failed nodes of `garage status`.
    pub fn wait_node_down(&self, i: usize) {
        let live = (0..self.nodes.len())
            .find(|&j| j != i && self.nodes[j].child.is_some())
            .expect("no live node to ask");
        let short = self.nodes[i].id.get(..16).unwrap_or("").to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = self.cli(live, &["status"]).unwrap_or_default();
            if let Some((_, failed)) = out.split_once("FAILED NODES") {
                if failed.contains(&short) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {i} ({short}) not seen down by node {live} after {START_TIMEOUT:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node `i` again with its data and ports (killing it first if it runs), and waits
    /// until it is healthy.
    pub fn restart_node(&mut self, i: usize) {
        self.kill_node(i);
        let bin = garage_bin();
        let child = self
            .spawn_node(&bin, i, false)
            .unwrap_or_else(|e| panic!("garage node {i} did not restart: {e}"));
        self.nodes[i].child = Some(child);
        let r = (|| {
            if !self.single {
                // The peer list a node saves may be older than its peers: connect it to the
                // others explicitly instead of waiting for their reconnection back-off.
                let port = self.nodes[i].rpc_port;
                try_wait_ready(
                    self.nodes[i].child.as_mut().unwrap(),
                    &format!("garage node {i} RPC on 127.0.0.1:{port}"),
                    &mut || listening(port),
                )?;
                for j in 0..self.nodes.len() {
                    if j != i && self.nodes[j].child.is_some() {
                        let peer = self.nodes[j].id.clone();
                        self.cli_retry(i, &["node", "connect", &peer])?;
                    }
                }
            }
            self.wait_node(i)
        })();
        if let Err(e) = r {
            panic!("garage node {i} did not restart: {e}");
        }
    }

    /// Process id of node `i`, None while it is killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.pid())
    }

    /// Log of node `i` (its current run).
    pub fn log(&self, i: usize) -> String {
        self.nodes[i]
            .child
            .as_ref()
            .map(|c| c.log())
            .unwrap_or_default()
    }
}
