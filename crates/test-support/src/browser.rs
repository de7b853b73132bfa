//! A real headless Chromium for tests of the watch page, driven over the
//! Chrome DevTools Protocol (CDP) on the WebSocket client the other tests
//! already use, so no browser-automation package is needed.
//!
//! One [`Browser`] is one Chromium process with its own throwaway profile
//! and one tab. Tests open a URL, run JavaScript in the page
//! ([`Browser::eval`]), wait for what the user would see
//! ([`Browser::wait_for`]), and type as a user would
//! ([`Browser::insert_text`]). Chromium is killed and its profile removed
//! on `Drop`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::Ws;

/// Debian's Chromium; scripts/test.sh installs it.
pub fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is not installed; scripts/test.sh installs it (apt-get install chromium)")
}

/// The flags every test browser runs with: headless, no first-run or
/// background traffic (it would show up in request counts), and no QUIC.
pub fn chromium_args(profile: &std::path::Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        // A headless tab may count as hidden, and Chromium throttles the
        // timers of hidden tabs; the page's reconnects run on timers.
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// A fresh, empty directory under the system temp dir.
pub fn tempdir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let p = std::env::temp_dir().join(format!("runcast-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p).expect("create temp dir");
    p
}

/// One headless Chromium with one tab, attached over CDP.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    cdp: Ws,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium and opens `url` in a new tab.
    pub async fn open(url: &str) -> Self {
        Self::open_with(url, &[]).await
    }

    /// [`open`](Self::open), with more Chromium flags (for example
    /// `--ignore-certificate-errors` for a gateway with a test certificate).
    pub async fn open_with(url: &str, extra: &[&str]) -> Self {
        let profile = tempdir("chromium");
        let child = Command::new(chromium())
            .args(chromium_args(&profile))
            .args(extra)
            // Port 0: Chromium picks a free port and writes it, with the
            // browser's WebSocket path, to DevToolsActivePort.
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let port_file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some((port, path)) = text.split_once('\n')
                && !path.trim().is_empty()
            {
                break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium did not open its DevTools port within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (cdp, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("connect to chromium's DevTools at {endpoint}: {e}"));
        let mut b = Self {
            child,
            profile,
            cdp,
            session: String::new(),
            next_id: 0,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"]
            .as_str()
            .expect("a CDP session id")
            .to_owned();
        b.call("Page.enable", json!({})).await;
        b.goto(url).await;
        b
    }

    /// Sends one CDP command (to the tab once attached) and returns its
    /// result; events in between are not needed by these tests and skipped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.cdp
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to chromium");
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match self.cdp.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).expect("CDP sends JSON");
                        if v["id"] == id {
                            return v;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("chromium's DevTools connection ended: {other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("chromium did not answer {method} within 30 s"));
        if let Some(e) = reply.get("error") {
            panic!("{method} failed: {e}");
        }
        reply["result"].clone()
    }

    /// Loads `url` in the tab and waits for its `load` event's document.
    pub async fn goto(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url})).await;
        if let Some(e) = r.get("errorText") {
            panic!("navigate to {url}: {e}");
        }
        self.wait_for(
            &format!("{url} loaded"),
            "document.readyState === 'complete'",
        )
        .await;
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its
    /// value as JSON; a thrown exception fails the test.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy and returns its value; after 20 s
    /// fails naming `what` and showing the page's text.
    pub async fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval(expr).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "the page did not show {what} within 20 s ({expr} is {v}); it shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the focused element, as a paste does.
    pub async fn insert_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text})).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helper processes exit when the browser process does.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
