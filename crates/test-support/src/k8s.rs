//! A real Kubernetes control plane for a test: etcd, kube-apiserver (TLS,
//! token auth, RBAC), kube-controller-manager and kube-scheduler on
//! 127.0.0.1, started by `scripts/k8s-control-plane.sh` in a directory of
//! its own and stopped (by PID) when dropped. Each test gets its own, so no
//! test sees another's objects.
//!
//! The binaries are built once per machine and cached (the script's
//! `build`, which the test command runs first). No kubelet or container
//! runtime can run here: the scheduler binds pods to a fake Node and
//! nothing starts them, so a test that needs running pods sets their status
//! itself ([`ControlPlane::set_pod_running`]) and starts real processes in
//! their place.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::nats::TempDir;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// A tool the test command put on PATH, or where `scripts/k8s-tools.sh`
/// installs it.
fn tool(name: &str) -> PathBuf {
    let local = repo_root().join("target/tools/bin").join(name);
    if local.exists() {
        return local;
    }
    PathBuf::from(name)
}

pub struct ControlPlane {
    dir: TempDir,
    pub kubeconfig: PathBuf,
    pub server: String,
}

impl ControlPlane {
    /// Starts a fresh control plane (about 3-5 s once the binaries are
    /// built). Panics with the components' logs if it does not come up.
    pub fn start() -> Self {
        let dir = TempDir::new("runcast-k8s");
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/k8s-control-plane.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/k8s-control-plane.sh");
        let mut cp = Self {
            kubeconfig: dir.path().join("kubeconfig"),
            server: String::new(),
            dir,
        };
        assert!(
            out.status.success(),
            "the control plane did not start:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cp.logs()
        );
        let port = std::fs::read_to_string(cp.dir.path().join("api.port")).expect("api.port");
        cp.server = format!("https://127.0.0.1:{}", port.trim());
        cp
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tail of every component's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for c in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{c}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            s.push_str(&format!("--- {c}.log (last lines)\n"));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// `kubectl` as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// `kubectl` with another kubeconfig, optionally feeding `stdin`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        run(
            Command::new(tool("kubectl"))
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(args),
            stdin,
        )
    }

    /// `kubectl`, which must succeed; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get ... -o json`, or `None` if it is not there.
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&a);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("NotFound") || err.contains("not found"),
                "kubectl {}: {err}",
                a.join(" ")
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("kubectl json"))
    }

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_as(
            &self.kubeconfig,
            &["apply", "--server-side", "-f", "-"],
            Some(yaml),
        );
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `helm` against this cluster.
    pub fn helm(&self, args: &[&str]) -> Output {
        run(
            Command::new(tool("helm"))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                .env("HELM_CACHE_HOME", self.dir.path().join("helm/cache"))
                .env("HELM_CONFIG_HOME", self.dir.path().join("helm/config"))
                .env("HELM_DATA_HOME", self.dir.path().join("helm/data")),
            None,
        )
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/name` with
    /// the token the controller-manager made for it: what a pod running
    /// as that account would present, so its RBAC is what a test exercises.
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str) -> PathBuf {
        let secret = wait_for(Duration::from_secs(30), || {
            let sa = self.get(&["serviceaccount", name, "-n", ns])?;
            sa["secrets"][0]["name"].as_str().map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no token Secret for ServiceAccount {ns}/{name}"));
        let token = wait_for(Duration::from_secs(30), || {
            let s = self.get(&["secret", &secret, "-n", ns])?;
            let b64 = s["data"]["token"].as_str()?.to_owned();
            let out = run(Command::new("base64").arg("-d"), Some(&b64));
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .unwrap_or_else(|| panic!("Secret {ns}/{secret} has no token"));
        let path = self.dir.path().join(format!("kubeconfig-{ns}-{name}"));
        let ca = self.dir.path().join("ca.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: sa, namespace: {ns}}}\ncurrent-context: test\n",
                self.server,
                ca.display()
            ),
        )
        .expect("write kubeconfig");
        path
    }

    /// Plays the kubelet for one pod: Running and Ready, with `ip` as its
    /// podIP (a 127.0.0.0/8 address where the test runs the real process).
    pub fn set_pod_running(&self, ns: &str, pod: &str, ip: &str) {
        self.set_pod_status(ns, pod, ip, true);
    }

    /// Running with `ip`, and Ready as its readiness probe says.
    pub fn set_pod_status(&self, ns: &str, pod: &str, ip: &str, ready: bool) {
        let now = "2026-01-01T00:00:00Z";
        let ready = if ready { "True" } else { "False" };
        let patch = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
        }});
        let patch = patch.to_string();
        self.kubectl_ok(&[
            "patch",
            "pod",
            pod,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/k8s-control-plane.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    })
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

/// Polls `f` every 100 ms until it returns `Some`, for up to `within`.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
