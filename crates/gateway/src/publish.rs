//! The publish API: `POST /v1/runs/{run}/events`, one event or a batch,
//! with an API key (`X-Runcast-Key` or `Authorization: Bearer`).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    response::Response,
};
use runcast_core::{ErrorCode, EventKind, NewEvent, ProtocolError};
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::{
    error::{ApiError, bus_error, json},
    extract::{Run, bearer_credentials, read_body},
    gateway::Gateway,
};

/// `POST /v1/runs/{run}/events`
pub async fn publish(
    State(gw): State<Arc<Gateway>>,
    Run(run): Run,
    req: Request,
) -> Result<Response, ApiError> {
    if gw.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Draining,
            "gateway is draining; publish to another",
        ));
    }
    // The key is checked before the body is read: an unauthorized client
    // cannot make the gateway buffer anything.
    let key = req
        .headers()
        .get("x-runcast-key")
        .or_else(|| req.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(|v| bearer_credentials(v).unwrap_or(v).trim().to_owned());
    if let Some(name) = gw.config.publish_keys.check(key.as_deref(), &run)?
        && !gw.key_rates.take(&name)
    {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!("API key {name:?} publishes faster than --publish-rate-per-key; slow down"),
        ));
    }
    let idempotency_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            // Room for the `/<i>` a batch adds.
            Ok(k)
                if runcast_core::valid_event_id(k) && k.len() <= runcast_core::MAX_EVENT_ID - 8 =>
            {
                Some(k.to_owned())
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidEvent,
                    format!(
                        "Idempotency-Key must be 1 to {} visible ASCII characters",
                        runcast_core::MAX_EVENT_ID - 8
                    ),
                ));
            }
        },
    };
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 256)
        .map(str::to_owned);
    let body = read_body(&gw, req, gw.config.max_publish_bytes).await?;
    let mut events = parse_publish(&body, gw.config.max_batch, tp.as_deref())?;
    if let Some(key) = idempotency_key {
        // One key for the request: event i of a batch is `<key>/<i>`, so a
        // retried batch is recognised event by event. An event's own `id`
        // wins.
        let batch = events.len() > 1;
        for (i, e) in events.iter_mut().enumerate() {
            if e.id.is_none() {
                e.id = Some(if batch {
                    format!("{key}/{i}")
                } else {
                    key.clone()
                });
            }
        }
    }
    let n = events.len() as u64;
    // Continues the publisher's trace (the body's or the header's
    // traceparent) when this gateway exports traces; otherwise events keep
    // the traceparent they came with.
    let span = tracing::info_span!(
        target: runcast_telemetry::TARGET,
        "runcast.publish",
        otel.kind = "server",
        runcast.run = %run,
        runcast.events = n,
    );
    let parent = events.first().and_then(|e| e.traceparent.as_deref());
    if let Some(tp) = runcast_telemetry::continue_trace(&span, parent) {
        for e in &mut events {
            e.traceparent = Some(tp.clone());
        }
    }
    let seqs = gw
        .bus
        .publish(&run, events)
        .instrument(span)
        .await
        .map_err(|e| bus_error(e, &run))?;
    gw.metrics.events_published.inc_by(n);
    Ok(json(
        StatusCode::OK,
        serde_json::json!({ "run": run, "seqs": seqs }).to_string(),
    ))
}

#[derive(serde::Deserialize)]
struct PublishItem {
    kind: Option<serde_json::Value>,
    /// `None` only when the field is absent: `"data": null` is valid data.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    traceparent: Option<String>,
    id: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    <Box<RawValue> as serde::Deserialize>::deserialize(d).map(Some)
}

pub fn parse_publish(
    body: &[u8],
    max_batch: usize,
    header_tp: Option<&str>,
) -> Result<Vec<NewEvent>, ProtocolError> {
    let raw: &RawValue = serde_json::from_slice(body).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let text = raw.get().trim_start();
    let items: Vec<PublishItem> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidEvent,
                format!("each event must be {{\"kind\":..,\"data\":..}}: {e}"),
            )
        })?
    } else if text.starts_with('{') {
        vec![serde_json::from_str(text).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidEvent,
                format!("an event is {{\"kind\":..,\"data\":..}}: {e}"),
            )
        })?]
    } else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            "body must be an event object or an array of them",
        ));
    };
    if items.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::InvalidEvent,
            "the array of events is empty",
        ));
    }
    if items.len() > max_batch {
        return Err(ProtocolError::new(
            ErrorCode::TooManyEvents,
            format!(
                "{} events in one request; the limit is {max_batch}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let kind = match it.kind {
                Some(serde_json::Value::String(k)) => EventKind::parse(&k).map_err(|e| {
                    ProtocolError::new(ErrorCode::InvalidKind, format!("event {i}: {e}"))
                })?,
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidKind,
                        format!("event {i}: \"kind\" must be a string"),
                    ));
                }
                None => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidKind,
                        format!("event {i} has no \"kind\""),
                    ));
                }
            };
            let data = it.data.ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::InvalidEvent,
                    format!("event {i} has no \"data\""),
                )
            })?;
            runcast_core::check_depth(&data).map_err(|e| {
                ProtocolError::new(ErrorCode::DataTooDeep, format!("event {i}: {e}"))
            })?;
            // A malformed traceparent is dropped, as W3C Trace Context says
            // to: it would only put a publisher's junk into every client's
            // frames and logs as a trace ID no trace has.
            let traceparent = it
                .traceparent
                .or_else(|| header_tp.map(str::to_owned))
                .filter(|tp| runcast_telemetry::trace_id(tp).is_some());
            let id = match it.id {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(id)) if runcast_core::valid_event_id(&id) => Some(id),
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidEvent,
                        format!(
                            "event {i}: \"id\" must be a string of 1 to {} visible ASCII characters",
                            runcast_core::MAX_EVENT_ID
                        ),
                    ));
                }
            };
            Ok(NewEvent {
                kind,
                data,
                traceparent,
                id,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies() {
        let ok = parse_publish(br#"{"kind":"progress","data":{"done": 1}}"#, 10, None).unwrap();
        assert_eq!(ok[0].data.get(), r#"{"done": 1}"#);
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let batch = parse_publish(
            br#"[{"kind":"log","data":"a"},{"kind":"x-y","data":null,"traceparent":"00-junk"}]"#,
            10,
            Some(tp),
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].traceparent.as_deref(), Some(tp));
        assert_eq!(
            batch[1].traceparent, None,
            "a malformed traceparent is dropped"
        );
        let code = |b: &[u8]| parse_publish(b, 2, None).unwrap_err().code;
        assert_eq!(code(b"nope"), ErrorCode::InvalidJson);
        assert_eq!(code(b"42"), ErrorCode::InvalidEvent);
        assert_eq!(code(b"[]"), ErrorCode::InvalidEvent);
        assert_eq!(code(br#"{"kind":"log"}"#), ErrorCode::InvalidEvent);
        assert_eq!(code(br#"{"data":1}"#), ErrorCode::InvalidKind);
        assert_eq!(
            code(br#"{"kind":"Bad.Kind","data":1}"#),
            ErrorCode::InvalidKind
        );
        assert_eq!(code(br#"{"kind":7,"data":1}"#), ErrorCode::InvalidKind);
        assert_eq!(
            code(br#"[{"kind":"log","data":1},{"kind":"log","data":1},{"kind":"log","data":1}]"#),
            ErrorCode::TooManyEvents
        );
    }
}
