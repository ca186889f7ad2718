//! [`Nginx`]: Debian's nginx serving a directory over HTTP or HTTPS (with a test CA).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{free_port, listening, run_checked, scratch_dir, try_wait_ready, ChildGuard};

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
        let mut dir = scratch_dir("ubiblk-nginx");
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
        let log_dir = scratch_dir("ubiblk-nginx-log");
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
