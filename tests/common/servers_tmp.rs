//! TEMPORARY: a private minimal copy of the shared `tests/common/servers.rs` fixtures (same
//! API, only what tests/remote.rs uses), until that module is merged. Real nginx and Garage
//! servers on free loopback ports, in temporary directories, killed on drop.

#![allow(dead_code)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ubiblk::lazy::source::RemoteOptions;
use ubiblk::remote::aws::{AwsConfig, Credentials, Secret};
use ubiblk::remote::{ObjectStore, S3Store};

const NGINX: &str = "/usr/sbin/nginx";
const GARAGE: &str = "/work/shared/bin/garage";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn wait_port(port: u16, child: &mut Child, log: &Path) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "server exited with {st}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// nginx serving `root` as static files (ETag, Range, If-Match: what images need).
pub struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Option<Child>,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Self::launch(root, false)
    }

    /// HTTPS with a certificate for 127.0.0.1 signed by a fresh CA ([`Nginx::ca_cert`]).
    pub fn start_tls(root: &Path) -> Nginx {
        Self::launch(root, true)
    }

    fn launch(root: &Path, tls: bool) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let port = free_port();
        let ssl = if tls {
            make_certs(d);
            format!(
                "listen 127.0.0.1:{port} ssl; ssl_certificate {0}/server.crt; \
                 ssl_certificate_key {0}/server.key;",
                d.display()
            )
        } else {
            format!("listen 127.0.0.1:{port};")
        };
        fs::create_dir(d.join("tmp")).expect("tmp");
        let t = d.join("tmp");
        let t = t.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {t};\n\
             proxy_temp_path {t};\n fastcgi_temp_path {t};\n uwsgi_temp_path {t};\n\
             scgi_temp_path {t};\n server {{\n  {ssl}\n  root {root};\n }}\n}}\n",
            d = d.display(),
            root = root.display(),
        );
        fs::write(d.join("nginx.conf"), conf).expect("nginx.conf");
        let mut n = Nginx {
            dir,
            port,
            tls,
            child: None,
        };
        n.restart();
        n
    }

    pub fn url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{name}", self.port)
    }

    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.crt"))
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again (stopping it first if it runs), on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let d = self.dir.path();
        let log = d.join("stderr.log");
        let mut child = Command::new(NGINX)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("nginx");
        wait_port(self.port, &mut child, &log);
        self.child = Some(child);
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA and a server certificate for 127.0.0.1/localhost it signed, in `d`.
fn make_certs(d: &Path) {
    let ossl = |args: &[&str]| {
        run(Command::new("openssl").current_dir(d).args(args));
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=ubiblk test CA",
        "-days",
        "2",
    ]);
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    fs::write(
        d.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// A single-node Garage with one bucket and one key allowed on it.
pub struct Garage {
    dir: tempfile::TempDir,
    conf: PathBuf,
    s3_port: u16,
    key_id: String,
    secret: String,
    child: Option<Child>,
}

const REGION: &str = "garage";
const BUCKET: &str = "images";

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let conf = d.join("garage.toml");
        fs::write(
            &conf,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = d.display()
            ),
        )
        .expect("garage.toml");
        let log = d.join("garage.log");
        let mut child = Command::new(GARAGE)
            .arg("-c")
            .arg(&conf)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).expect("log"))
            .stderr(fs::File::create(d.join("garage.err")).expect("log"))
            .spawn()
            .expect("garage");
        wait_port(rpc, &mut child, &d.join("garage.err"));
        let g = |args: &[&str]| run(Command::new(GARAGE).arg("-c").arg(&conf).args(args));
        let node = g(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap_or("").to_string();
        g(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g(&["layout", "apply", "--version", "1"]);
        let info = g(&["key", "create", "ubiblk-test"]);
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {info}"))
        };
        let (key_id, secret) = (field("Key ID:"), field("Secret key:"));
        // The bucket commands may race the layout becoming active: retry briefly.
        let t0 = Instant::now();
        loop {
            let out = Command::new(GARAGE)
                .arg("-c")
                .arg(&conf)
                .args(["bucket", "create", BUCKET])
                .output()
                .expect("garage");
            if out.status.success() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        g(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "ubiblk-test",
        ]);
        wait_port(s3, &mut child, &d.join("garage.err"));
        Garage {
            dir,
            conf,
            s3_port: s3,
            key_id,
            secret,
            child: Some(child),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn region(&self) -> String {
        REGION.to_string()
    }

    pub fn bucket(&self) -> String {
        BUCKET.to_string()
    }

    pub fn access_key(&self) -> String {
        self.key_id.clone()
    }

    pub fn secret_key(&self) -> String {
        self.secret.clone()
    }

    /// What a process needs to reach the bucket: AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), self.region()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key()),
        ]
    }

    fn store(&self) -> S3Store {
        let cfg = AwsConfig {
            region: self.region(),
            endpoint: Some(self.endpoint()),
            credentials: Some(Credentials {
                key_id: self.access_key(),
                secret: Secret::new(self.secret_key()),
                token: None,
                origin: "test fixture".into(),
            }),
        };
        S3Store::open(&format!("s3://{BUCKET}"), &cfg, &RemoteOptions::default()).expect("S3 store")
    }

    pub fn put_file(&self, key: &str, path: &Path) {
        self.put_bytes(key, &fs::read(path).expect("read"));
    }

    pub fn put_bytes(&self, key: &str, data: &[u8]) {
        self.store().put(key, data).expect("put");
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.store().get(key).ok()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
