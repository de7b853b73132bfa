//! `runcast tail`: a client that never loses an event. It remembers the last
//! seq it printed and, after any resumable disconnect, reconnects with
//! backoff and subscribes with `since` so the stream continues exactly where
//! it left off.

use std::{borrow::Cow, io::Write, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hyper::header::HeaderValue;
use runcast_core::{CloseCode, RunId};
use runcast_worker::tls::Dialer;
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use tokio_tungstenite::tungstenite::Message;

use crate::{args::TailArgs, connect};

/// How long connecting, TLS and the upgrade may take before the attempt
/// counts as failed (and is retried): a silently dropping firewall would
/// otherwise hold `tail` for the OS's two-minute connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

enum Outcome {
    /// The run finished; exit with this code.
    Finished(ExitCode),
    /// Reconnect and resume.
    Resume(String),
}

pub async fn run(a: TailArgs) -> anyhow::Result<ExitCode> {
    RunId::parse(&a.run).with_context(|| format!("invalid run ID {:?}", a.run))?;
    let dialer = connect::dialer(&a.url, a.tls.ca_file.as_deref())?;
    let authorization = connect::bearer(a.subscriber.token.as_deref())?;
    let mut since = a.since;
    let mut failures = 0u32;
    loop {
        let before = since;
        match session(&a, &dialer, authorization.as_ref(), &mut since).await? {
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
                crate::say!(
                    "runcast tail: {why}; resuming after seq {} in {wait:?}",
                    since.unwrap_or(0)
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A server frame, read leniently. Publisher data (`data`, and the
/// `result` inside `state`) stays raw JSON: a `serde_json::Value` cannot hold
/// every valid document (numbers beyond f64 such as `1e400`, nesting deeper
/// than 128), and an event must never be skipped because of what it carries.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", default)]
    ty: String,
    seq: Option<u64>,
    kind: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    traceparent: Option<String>,
    #[serde(borrow)]
    state: Option<&'a RawValue>,
    to: Option<u64>,
    code: Option<String>,
    message: Option<String>,
}

/// The fields of a run's state that the state line shows.
#[derive(Deserialize)]
struct StateView<'a> {
    status: Option<String>,
    percent: Option<f64>,
    events: Option<u64>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
}

async fn session(
    a: &TailArgs,
    dialer: &Dialer,
    authorization: Option<&HeaderValue>,
    since: &mut Option<u64>,
) -> anyhow::Result<Outcome> {
    let mut ws = match connect::websocket(dialer, authorization, CONNECT_TIMEOUT).await {
        Ok(ws) => ws,
        Err(e) if e.is_transient() => return Ok(Outcome::Resume(e.explain(dialer.url()))),
        // A page, a missing route, a refused token or an untrusted
        // certificate will not change by trying again.
        Err(e) => bail!("{}; not retrying", e.explain(dialer.url())),
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
        if a.json && out(&text).is_err() {
            // stdout closed (e.g. piped into `head`): stop quietly.
            return Ok(Outcome::Finished(ExitCode::SUCCESS));
        }
        let f: Frame = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                // Not a frame this client understands: show it rather than
                // lose it, and say so.
                crate::say!("runcast tail: a frame that is not valid protocol JSON ({e}) follows");
                if !a.json && out(&format!("{:>6} {:<10} {text}", "?", "frame")).is_err() {
                    return Ok(Outcome::Finished(ExitCode::SUCCESS));
                }
                continue;
            }
        };
        match f.ty.as_str() {
            "state" => {
                let view = f.state.map(|s| serde_json::from_str::<StateView>(s.get()));
                if !a.json && out(&state_line(f.seq, f.state, view.as_ref())).is_err() {
                    return Ok(Outcome::Finished(ExitCode::SUCCESS));
                }
                // A fresh subscription starts after the state it was shown;
                // if that state is already final there is nothing to wait for.
                if since.is_none() {
                    *since = f.seq;
                    let status = match &view {
                        Some(Ok(v)) => v.status.as_deref(),
                        _ => None,
                    };
                    match status {
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
            "event" => {
                let seq = f.seq.unwrap_or(0);
                *since = Some(seq);
                // --verbose: the W3C trace ID the publisher sent, to find
                // the event's trace in Jaeger or Tempo.
                let trace = match (a.verbose, f.traceparent.as_deref().and_then(trace_id)) {
                    (true, Some(id)) => format!("  trace={id}"),
                    _ => String::new(),
                };
                let kind = f.kind.as_deref().unwrap_or("?");
                let data = f.data.map_or(Cow::Borrowed("null"), |d| compact(d.get()));
                if !a.json && out(&format!("{seq:>6} {kind:<10} {data}{trace}")).is_err() {
                    return Ok(Outcome::Finished(ExitCode::SUCCESS));
                }
                match kind {
                    "complete" if !a.follow => {
                        return Ok(Outcome::Finished(ExitCode::SUCCESS));
                    }
                    "error" if !a.follow => return Ok(Outcome::Finished(ExitCode::from(2))),
                    _ => {}
                }
            }
            "gap" => {
                *since = f.to.or(*since);
                crate::say!(
                    "runcast tail: {}",
                    f.message
                        .as_deref()
                        .unwrap_or("events were lost to retention")
                );
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("error");
                let message = f.message.as_deref().unwrap_or("");
                // The server or its bus is briefly unable to serve: come back.
                if matches!(code, "unavailable" | "draining" | "capacity") {
                    return Ok(Outcome::Resume(format!("{code}: {message}")));
                }
                bail!("{code}: {message}");
            }
            // hello, pong, refresh, ...: nothing to show.
            _ => {}
        }
    }
    Ok(Outcome::Resume("connection ended".into()))
}

/// Valid JSON on one line, exactly as published otherwise: whitespace
/// outside strings is dropped (a pretty-printed publish would break the
/// line), numbers and strings are kept verbatim (no rounding of big ones).
fn compact(json: &str) -> Cow<'_, str> {
    if !json
        .bytes()
        .any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        return Cow::Borrowed(json);
    }
    let mut s = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            s.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            s.push(c);
        } else if !matches!(c, ' ' | '\n' | '\r' | '\t') {
            s.push(c);
        }
    }
    Cow::Owned(s)
}

fn out(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn state_line(
    seq: Option<u64>,
    raw: Option<&RawValue>,
    view: Option<&Result<StateView, serde_json::Error>>,
) -> String {
    let seq = seq.map_or_else(|| "?".to_owned(), |s| s.to_string());
    let s = match (raw, view) {
        (None, _) | (_, None) => return "(run has no events yet; waiting)".into(),
        (Some(raw), Some(Err(_))) => return format!("state  seq {seq} {}", compact(raw.get())),
        (Some(_), Some(Ok(s))) => s,
    };
    let status = s.status.as_deref().unwrap_or("?");
    let percent = s.percent.map(|p| format!(" {p:.0}%")).unwrap_or_default();
    let events = s.events.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let mut line = format!("state  seq {seq} {status}{percent} ({events} events)");
    if let Some(r) = s.result.filter(|r| r.get() != "null") {
        line.push_str(&format!("\nresult {}", compact(r.get())));
    }
    line
}

/// The trace ID of an event frame's `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: &str) -> Option<&str> {
    runcast_telemetry::trace_id(traceparent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-short-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn compact_json_keeps_strings_and_numbers_verbatim() {
        assert_eq!(compact(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(
            compact(
                "{\n  \"a b\": [1e400, 123456789012345678901234567890],\n\t\"c\": \"x \\\" y\"\n}"
            ),
            r#"{"a b":[1e400,123456789012345678901234567890],"c":"x \" y"}"#
        );
    }

    #[test]
    fn state_lines_show_what_a_value_cannot_hold() {
        let raw: &RawValue =
            serde_json::from_str(r#"{"status":"completed","events":3,"result":{"n":1e400}}"#)
                .unwrap();
        let view = serde_json::from_str::<StateView>(raw.get());
        let line = state_line(Some(3), Some(raw), Some(&view));
        assert_eq!(
            line,
            "state  seq 3 completed (3 events)\nresult {\"n\":1e400}"
        );
        let odd: &RawValue = serde_json::from_str(r#"{"status":7}"#).unwrap();
        let view = serde_json::from_str::<StateView>(odd.get());
        assert_eq!(
            state_line(Some(1), Some(odd), Some(&view)),
            r#"state  seq 1 {"status":7}"#
        );
    }
}
