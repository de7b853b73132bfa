//! `runcast tail`: a client that never loses an event. It remembers the last
//! seq it printed and, after any resumable disconnect, reconnects with
//! backoff and subscribes with `since` so the stream continues exactly where
//! it left off.

use std::{io::Write, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use runcast_core::{CloseCode, RunId};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::args::TailArgs;

enum Outcome {
    /// The run finished; exit with this code.
    Finished(ExitCode),
    /// Reconnect and resume.
    Resume(String),
}

pub async fn run(a: TailArgs) -> anyhow::Result<ExitCode> {
    RunId::parse(&a.run).with_context(|| format!("invalid run ID {:?}", a.run))?;
    let mut since = a.since;
    let mut failures = 0u32;
    loop {
        let before = since;
        match session(&a, &mut since).await? {
            Outcome::Finished(code) => return Ok(code),
            Outcome::Resume(why) => {
                failures = if since != before { 1 } else { failures + 1 };
                if failures > a.max_retries {
                    bail!(
                        "giving up after {} reconnects without progress: {why}",
                        a.max_retries
                    );
                }
                // 100 ms doubling to 5 s, with jitter so a fleet of clients
                // does not reconnect in lockstep.
                let base = 100u64.saturating_mul(1 << failures.min(6)).min(5000);
                let jitter = u64::from(std::process::id()).wrapping_mul(u64::from(failures))
                    % (base / 2 + 1);
                let wait = Duration::from_millis(base / 2 + jitter);
                eprintln!(
                    "runcast tail: {why}; resuming after seq {} in {wait:?}",
                    since.unwrap_or(0)
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// `http(s)://host[/]` means that gateway's `/v1/ws`; `ws(s)://` URLs are
/// used as given.
fn ws_url(url: &str) -> String {
    for (http, ws) in [("http://", "ws://"), ("https://", "wss://")] {
        if let Some(rest) = url.strip_prefix(http) {
            let rest = rest.trim_end_matches('/');
            return if rest.ends_with("/v1/ws") {
                format!("{ws}{rest}")
            } else {
                format!("{ws}{rest}/v1/ws")
            };
        }
    }
    url.to_owned()
}

async fn session(a: &TailArgs, since: &mut Option<u64>) -> anyhow::Result<Outcome> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = ws_url(&a.url);
    let mut req = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => anyhow::bail!("bad --url {}: {e}", a.url),
    };
    if let Some(t) = &a.token {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| anyhow::anyhow!("--token has characters a header cannot carry"))?;
        req.headers_mut().insert("authorization", v);
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        // A refused token will not get better by retrying.
        Err(tokio_tungstenite::tungstenite::Error::Http(r))
            if matches!(r.status().as_u16(), 401 | 403) =>
        {
            anyhow::bail!(
                "{url} refused the connection ({}): give a valid token with --token or RUNCAST_TOKEN",
                r.status()
            )
        }
        Err(e) => return Ok(Outcome::Resume(format!("cannot connect to {url}: {e}"))),
    };
    let mut sub = json!({ "type": "subscribe", "run": a.run });
    if let Some(s) = *since {
        sub["since"] = s.into();
    }
    if let Err(e) = ws.send(Message::Text(sub.to_string().into())).await {
        return Ok(Outcome::Resume(format!("send failed: {e}")));
    }
    while let Some(msg) = ws.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                if CloseCode::should_resume(code) {
                    return Ok(Outcome::Resume(format!(
                        "server closed with {code} ({reason})"
                    )));
                }
                bail!("server closed with {code} ({reason}); not retrying");
            }
            Ok(_) => continue,
            Err(e) => return Ok(Outcome::Resume(format!("connection lost: {e}"))),
        };
        let f: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if a.json && out(&text).is_err() {
            // stdout closed (e.g. piped into `head`): stop quietly.
            return Ok(Outcome::Finished(ExitCode::SUCCESS));
        }
        match f["type"].as_str() {
            Some("state") => {
                if !a.json && out(&state_line(&f)).is_err() {
                    return Ok(Outcome::Finished(ExitCode::SUCCESS));
                }
                // A fresh subscription starts after the state it was shown;
                // if that state is already final there is nothing to wait for.
                if since.is_none() {
                    *since = f["seq"].as_u64();
                    match f["state"]["status"].as_str() {
                        Some("completed") if !a.follow => {
                            return Ok(Outcome::Finished(ExitCode::SUCCESS));
                        }
                        Some("failed") if !a.follow => {
                            return Ok(Outcome::Finished(ExitCode::from(2)));
                        }
                        _ => {}
                    }
                }
            }
            Some("event") => {
                let seq = f["seq"].as_u64().unwrap_or(0);
                *since = Some(seq);
                // --verbose: the W3C trace ID the publisher sent, to find
                // the event's trace in Jaeger or Tempo.
                let trace = match (a.verbose, trace_id(&f)) {
                    (true, Some(id)) => format!("  trace={id}"),
                    _ => String::new(),
                };
                if !a.json
                    && out(&format!(
                        "{seq:>6} {:<10} {}{trace}",
                        f["kind"].as_str().unwrap_or("?"),
                        f["data"]
                    ))
                    .is_err()
                {
                    return Ok(Outcome::Finished(ExitCode::SUCCESS));
                }
                match f["kind"].as_str() {
                    Some("complete") if !a.follow => {
                        return Ok(Outcome::Finished(ExitCode::SUCCESS));
                    }
                    Some("error") if !a.follow => return Ok(Outcome::Finished(ExitCode::from(2))),
                    _ => {}
                }
            }
            Some("gap") => {
                *since = f["to"].as_u64().or(*since);
                eprintln!(
                    "runcast tail: {}",
                    f["message"]
                        .as_str()
                        .unwrap_or("events were lost to retention")
                );
            }
            Some("error") => {
                let code = f["code"].as_str().unwrap_or("error");
                let message = f["message"].as_str().unwrap_or("");
                // The server or its bus is briefly unable to serve: come back.
                if matches!(code, "unavailable" | "draining" | "capacity") {
                    return Ok(Outcome::Resume(format!("{code}: {message}")));
                }
                bail!("{code}: {message}");
            }
            _ => {}
        }
    }
    Ok(Outcome::Resume("connection ended".into()))
}

fn out(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn state_line(f: &Value) -> String {
    let s = &f["state"];
    if s.is_null() {
        return "(run has no events yet; waiting)".into();
    }
    let status = s["status"].as_str().unwrap_or("?");
    let percent = s["percent"]
        .as_f64()
        .map(|p| format!(" {p:.0}%"))
        .unwrap_or_default();
    let mut line = format!(
        "state  seq {} {status}{percent} ({} events)",
        f["seq"], s["events"]
    );
    if !s["result"].is_null() {
        line.push_str(&format!("\nresult {}", s["result"]));
    }
    line
}

/// The trace ID of an event frame's `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(frame: &Value) -> Option<&str> {
    runcast_telemetry::trace_id(frame["traceparent"].as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_mean_the_gateways_websocket() {
        assert_eq!(ws_url("http://127.0.0.1:8080"), "ws://127.0.0.1:8080/v1/ws");
        assert_eq!(ws_url("https://h.example/"), "wss://h.example/v1/ws");
        assert_eq!(ws_url("http://h/v1/ws"), "ws://h/v1/ws");
        assert_eq!(ws_url("ws://h:1/v1/ws"), "ws://h:1/v1/ws");
    }

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let f = |tp: &str| serde_json::json!({"type": "event", "traceparent": tp});
        assert_eq!(
            trace_id(&f(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            )),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(&f("00-short-00f067aa0ba902b7-01")), None);
        assert_eq!(trace_id(&f("garbage")), None);
        assert_eq!(trace_id(&serde_json::json!({"type": "event"})), None);
    }
}
