//! Client frames and the identifiers inside them: any text either parses or
//! gets a coded protocol error, never a panic; a run ID or kind that parses
//! survives the trip through a NATS subject; a traceparent that parses keeps
//! its trace ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runcast_core::{
    EventKind, RunId,
    frame::{parse_client_frame, parse_since},
    subject::{event_subject, parse_event_subject},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_frame(text) {
        Ok(_) => {}
        Err(e) => assert!(!e.code.as_str().is_empty()),
    }
    let _ = parse_since(text);
    // Split the input into a run ID and a kind, as a subject carries them.
    let (a, b) = text.split_once(' ').unwrap_or((text, "progress"));
    if let (Ok(run), Ok(kind)) = (RunId::parse(a), EventKind::parse(b)) {
        let subject = event_subject("runcast.runs", &run, &kind);
        let back = parse_event_subject("runcast.runs", &subject);
        assert_eq!(back, Some((run, kind)), "{subject}");
    }
    let _ = parse_event_subject("runcast.runs", text);
    if let Some(id) = runcast_telemetry::trace_id(text) {
        assert_eq!(id.len(), 32);
        let _ = runcast_telemetry::sampled(text);
        assert!(runcast_telemetry::parent(text).is_some(), "{text}");
    }
});
