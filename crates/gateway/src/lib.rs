//! The runcast gateway: terminates WebSocket and SSE clients, fans each run's
//! events out to the clients that watch it, and serves the HTTP API and the
//! watch page.
//!
//! It sits between the bus and the clients (worker → bus → **gateway** →
//! client) and holds no state of its own that matters: history, sequence
//! numbers and run state live in the bus, so any gateway can serve any client
//! and a client that reconnects anywhere resumes from its cursor.
//!
//! One file per hop or concern, bottom up:
//! - [`frame`]: a frame on its way out, serialized once, with its SSE bytes;
//! - [`hub`]: one bus watch per run with local interest, each frame offered
//!   to every subscriber's bounded queue; `replay` walks history for it;
//! - `session`: one client's cursors, replay and catch-up, generic over the
//!   transport;
//! - `ws` and `sse`: the transports, each with its own handshake;
//! - `runs` (read API), `publish` and [`admin`]: the other routes;
//! - [`auth`], [`limits`], `extract` (what handlers take from a request) and
//!   `error` (how a request fails, counted in one place);
//! - `router`: every route and what applies to all of them (CORS, 404/405);
//! - `accept`: the accept loop, TLS, HTTP/1.1 and HTTP/2, graceful drain;
//! - [`Gateway`] (`gateway`): the state all of the above share.

mod accept;
pub mod admin;
pub mod auth;
mod config;
mod error;
mod extract;
pub mod frame;
mod gateway;
pub mod hub;
pub mod limits;
mod metrics;
mod publish;
pub mod publish_keys;
mod replay;
mod router;
mod runs;
mod session;
mod sse;
pub mod tls;
mod ws;

pub use accept::run;
pub use config::Config;
pub use gateway::Gateway;
pub use metrics::Metrics;

/// Entry points for the fuzz targets in `fuzz/`: the parsers that network
/// input reaches and that are private to this crate. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use runcast_core::ProtocolError;

    /// A publish request body, as `POST /v1/runs/<run>/events` parses it:
    /// the number of events, or the error the client gets.
    pub fn publish_body(body: &[u8], traceparent: Option<&str>) -> Result<usize, ProtocolError> {
        crate::publish::parse_publish(body, 1000, traceparent).map(|v| v.len())
    }

    /// The whole path from stored data to every reader. `input` is cut at
    /// 0xff bytes into publishes; each piece's first byte picks its run, its
    /// kind and how it arrives: as an HTTP publish body (only what the API
    /// accepts is stored) or as a payload any NATS client stored. Everything
    /// stored must then list, fold into state, replay, and encode as frames,
    /// history pages and SSE messages that are valid JSON, without a panic.
    pub fn stored_events(input: &[u8]) {
        use runcast_bus::{Bus, EmbeddedBus, Retention, RunFilter};
        use runcast_core::{EventKind, NewEvent, RunId, data_from_payload, frame};

        thread_local! {
            static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime");
        }
        let valid = |text: &str| {
            assert!(
                serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok(),
                "not JSON: {text}"
            )
        };
        let runs = ["a", "b", "c"].map(|r| RunId::parse(r).expect("valid"));
        let kinds = ["progress", "log", "status", "complete", "error", "x-custom"];
        RT.with(|rt| {
            rt.block_on(async {
                let bus = EmbeddedBus::new(Retention::default());
                for piece in input.split(|&b| b == 0xff) {
                    let Some((&sel, body)) = piece.split_first() else {
                        continue;
                    };
                    let run = &runs[usize::from(sel % 3)];
                    let events = if sel & 0x80 == 0 {
                        match crate::publish::parse_publish(body, 1000, None) {
                            Ok(ev) => ev,
                            Err(e) => {
                                assert!(!e.message.is_empty());
                                continue;
                            }
                        }
                    } else {
                        let kind = kinds[usize::from(sel / 3) % kinds.len()];
                        let kind = EventKind::parse(kind).expect("valid kind");
                        vec![NewEvent::new(kind, data_from_payload(body))]
                    };
                    let _ = bus.publish(run, events).await;
                }
                let all = bus
                    .runs(RunFilter {
                        status: None,
                        limit: usize::MAX,
                    })
                    .await
                    .expect("embedded bus");
                valid(&crate::runs::encode_runs(&all).expect("run list encodes"));
                for run in &runs {
                    let state = bus.state(run).await.expect("embedded bus");
                    valid(&frame::encode_state(run, state.as_ref()));
                    if let Some(s) = &state {
                        valid(&serde_json::to_string(s).expect("state encodes"));
                    }
                    let page = bus.read(run, 1, 1000).await.expect("embedded bus");
                    valid(&crate::runs::encode_history(run, &page, 0));
                    let mut replay = crate::replay::Replay::new(&bus, run, 1, u64::MAX, 7);
                    let mut replayed = 0;
                    while replay.next().await.expect("embedded bus").is_some() {
                        replayed += 1;
                    }
                    assert_eq!(
                        replayed,
                        page.events.len(),
                        "replay sees what history holds"
                    );
                    for ev in &page.events {
                        let text = frame::encode_event(ev);
                        valid(&text);
                        // An SSE client joins the data lines with LF: the
                        // same JSON, with CR line breaks turned into LF.
                        let sse = crate::frame::sse_message(Some(ev.seq), &text);
                        let sse = std::str::from_utf8(&sse).expect("SSE is UTF-8");
                        let data: Vec<&str> = sse
                            .lines()
                            .filter_map(|l| l.strip_prefix("data: "))
                            .collect();
                        let joined = data.join("\n");
                        valid(&joined);
                        assert_eq!(joined, text.replace("\r\n", "\n").replace('\r', "\n"));
                        assert!(sse.starts_with(&format!("id: {}\n", ev.seq)));
                    }
                }
            })
        });
    }

    /// A request's query string, as the read and SSE routes parse `since`/`limit`.
    pub fn query(q: &str) {
        let _ = crate::extract::query_u64(q, "since");
        let _ = crate::extract::query_limit(q);
    }
}
