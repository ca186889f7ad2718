//! [`Garage`]: an S3 server on loopback, one node or a replicated cluster, and [`garage_bin`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    free_ports, http_status, listening, python_hint, random_hex, scratch_dir, try_wait_ready,
    ChildGuard, START_TIMEOUT,
};

/// The Garage binary: `$UBIBLK_GARAGE_BIN`, else `shared/bin/garage` in the parent directory of
/// the crate (`../shared/bin/garage`; further ancestors are tried too, for git worktrees), else
/// `garage` on PATH or in ~/.cargo/bin (`cargo install garage --locked --version 2.5.0`).
pub fn garage_bin() -> PathBuf {
    find_garage().unwrap_or_else(|| {
        panic!(
            "no garage binary: set UBIBLK_GARAGE_BIN, or put it at ../shared/bin/garage relative \
             to {} (or an ancestor's shared/bin/garage), or install `garage` on PATH \
             (`cargo install garage --locked --version 2.5.0` puts it in ~/.cargo/bin; .ci/run \
             does this)",
            env!("CARGO_MANIFEST_DIR")
        )
    })
}

/// [`garage_bin`], or None when there is none (a `UBIBLK_GARAGE_BIN` that is not a file still
/// panics: a wrong setting is not a missing tool).
pub fn find_garage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UBIBLK_GARAGE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "UBIBLK_GARAGE_BIN={} is not a file",
            p.display()
        );
        return Some(p);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in manifest.ancestors().skip(1) {
        let p = dir.join("shared/bin/garage");
        if p.is_file() {
            return Some(p);
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
            return Some(p);
        }
    }
    None
}

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
        Self::launch(scratch_dir("ubiblk-garage"), 1)
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
        Self::launch(scratch_dir("ubiblk-garage"), n)
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
            // Every node's three ports, distinct.
            let mut ports = free_ports(3 * n).into_iter();
            for i in 0..n {
                let node_dir = g.dir.path().join(format!("a{attempt}-node{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                let mut port = || ports.next().expect("3 ports per node");
                let (rpc_port, s3_port, admin_port) = (port(), port(), port());
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
