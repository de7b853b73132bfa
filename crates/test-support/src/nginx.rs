//! A real nginx for tests: it terminates TLS with a test certificate and
//! proxies a path prefix to a plain-HTTP gateway, configured the way the
//! docs tell people to (`proxy_http_version 1.1`, the `Upgrade` and
//! `Connection` headers for WebSockets, `proxy_buffering off` for SSE).
//!
//! Each instance runs in the foreground as a single process (`daemon off`,
//! `master_process off`) from its own temporary directory, so it can be
//! killed by PID on drop without leaving workers behind. The binary is
//! `$RUNCAST_NGINX`, else `nginx` on `PATH` or in `/usr/sbin` (Debian's
//! package, which `scripts/test.sh` installs).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::nats::{TempDir, free_port};

/// Finds nginx, or fails the test saying how to install it.
pub fn binary() -> PathBuf {
    const INSTALL: &str = "install it with `sudo apt-get install -y nginx` (scripts/test.sh does)";
    if let Some(p) = std::env::var_os("RUNCAST_NGINX") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "RUNCAST_NGINX={} is not a file: point it at nginx, or unset it and {INSTALL}",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("nginx not found on PATH or in /usr/sbin: {INSTALL}, or set RUNCAST_NGINX to its path"))
}

/// How often a start is retried when the chosen port was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// One nginx process, proxying `https://127.0.0.1:<port><prefix>/` to a
/// gateway's plain HTTP.
pub struct Nginx {
    pub port: u16,
    prefix: String,
    tls: bool,
    child: Option<Child>,
    dir: TempDir,
}

impl Nginx {
    /// Terminates TLS with `cert`/`key` on a free loopback port and proxies
    /// `<prefix>/...` to `http://<upstream>/...` (`prefix` like `/runcast`,
    /// or `""` for the whole site).
    pub async fn tls_proxy(upstream: SocketAddr, cert: &Path, key: &Path, prefix: &str) -> Self {
        Self::start(upstream, Some((cert, key)), prefix).await
    }

    /// The same proxy in plain HTTP.
    pub async fn proxy(upstream: SocketAddr, prefix: &str) -> Self {
        Self::start(upstream, None, prefix).await
    }

    async fn start(upstream: SocketAddr, tls: Option<(&Path, &Path)>, prefix: &str) -> Self {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut n = Self {
                port: free_port(),
                prefix: prefix.trim_end_matches('/').to_owned(),
                tls: tls.is_some(),
                child: None,
                dir: TempDir::new("runcast-nginx"),
            };
            n.write_config(upstream, tls);
            n.spawn();
            match n.wait_listening().await {
                Ok(()) => return n,
                Err(why) if why.contains("Address already in use") => last = why,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("nginx found no free port after {PORT_ATTEMPTS} attempts: {last}");
    }

    fn write_config(&self, upstream: SocketAddr, tls: Option<(&Path, &Path)>) {
        let d = self.dir.path().display();
        let location = format!("{}/", self.prefix);
        let listen = match tls {
            Some((cert, key)) => format!(
                "listen 127.0.0.1:{} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};",
                self.port,
                cert.display(),
                key.display()
            ),
            None => format!("listen 127.0.0.1:{};", self.port),
        };
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        {listen}
        location {location} {{
            proxy_pass http://{upstream}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"#,
        );
        std::fs::write(self.dir.path().join("nginx.conf"), conf).expect("write nginx.conf");
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let child = Command::new(binary())
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            // Before the configuration is read nginx logs to its built-in
            // path (/var/log/nginx), which an ordinary user cannot write.
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary().display()));
        self.child = Some(child);
    }

    async fn wait_listening(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..200 {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited {
                return Err(format!("nginx exited; error log:\n{}", self.log()));
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "nginx not listening on {addr} within 10 s; error log:\n{}",
            self.log()
        ))
    }

    /// `https://127.0.0.1:<port><prefix>` (`http` without TLS): the gateway
    /// as clients see it.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{}", self.port, self.prefix)
    }

    /// The error log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The access log so far: which requests went through, with statuses.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
