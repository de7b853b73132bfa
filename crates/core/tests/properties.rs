//! Property tests for everything that parses network input: run IDs,
//! client frames, cursors and event kinds. Whatever bytes arrive, parsing
//! returns a value or a clear error and never panics, and what it accepts
//! is exactly what the rules say.

use proptest::prelude::*;
use runcast_core::{
    ErrorCode, EventKind, RunId,
    frame::{ClientFrame, parse_client_frame, parse_since},
};

fn valid_run_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn run_ids_are_accepted_exactly_by_the_rules(s in "\\PC{0,140}") {
        let ok = !s.is_empty() && s.len() <= 128 && s.chars().all(valid_run_char);
        let parsed = RunId::parse(&s);
        prop_assert_eq!(parsed.is_ok(), ok, "{:?}", s);
        if let Ok(r) = parsed {
            prop_assert_eq!(r.as_str(), s.as_str());
        }
    }

    #[test]
    fn valid_run_ids_always_parse(s in "[A-Za-z0-9_-]{1,128}") {
        prop_assert!(RunId::parse(&s).is_ok());
    }

    #[test]
    fn any_text_frame_parses_or_gets_an_error_code(s in "\\PC{0,300}") {
        // Never panics; an error always has a code and a message.
        if let Err(e) = parse_client_frame(&s) {
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn json_frames_with_arbitrary_fields_never_panic(
        ty in prop_oneof![
            Just("subscribe".to_string()),
            Just("unsubscribe".to_string()),
            Just("ping".to_string()),
            Just("auth".to_string()),
            "\\PC{0,20}",
        ],
        run in prop_oneof![Just(serde_json::json!("r-1")), any::<i64>().prop_map(|n| serde_json::json!(n)), "\\PC{0,200}".prop_map(|s| serde_json::json!(s)), Just(serde_json::Value::Null)],
        since in prop_oneof![any::<u64>().prop_map(|n| serde_json::json!(n)), any::<i64>().prop_map(|n| serde_json::json!(n)), any::<f64>().prop_map(|n| serde_json::json!(n)), "\\PC{0,30}".prop_map(|s| serde_json::json!(s)), Just(serde_json::Value::Null)],
        token in prop_oneof![Just(serde_json::json!("t")), Just(serde_json::json!("")), any::<bool>().prop_map(|b| serde_json::json!(b))],
    ) {
        let frame = serde_json::json!({"type": ty, "run": run, "since": since, "token": token});
        match parse_client_frame(&frame.to_string()) {
            Ok(ClientFrame::Subscribe { run: r, since: s }) => {
                prop_assert_eq!(ty.as_str(), "subscribe");
                prop_assert_eq!(serde_json::json!(r.as_str()), run);
                // A cursor is a non-negative integer or absent.
                prop_assert!(s.is_none() || since.as_u64() == s);
            }
            Ok(ClientFrame::Unsubscribe { .. }) => prop_assert_eq!(ty.as_str(), "unsubscribe"),
            Ok(ClientFrame::Ping) => prop_assert_eq!(ty.as_str(), "ping"),
            Ok(ClientFrame::Auth { token: t }) => {
                prop_assert_eq!(ty.as_str(), "auth");
                prop_assert!(!t.is_empty());
            }
            Err(e) => prop_assert!(e.code != ErrorCode::Internal),
        }
    }

    #[test]
    fn cursors_are_non_negative_integers_only(s in "\\PC{0,30}") {
        // A header's optional whitespace (spaces, tabs) around it is allowed.
        let t = s.trim_matches([' ', '\t']);
        let ok = t.parse::<u64>().is_ok_and(|_| t.chars().all(|c| c.is_ascii_digit()));
        prop_assert_eq!(parse_since(&s).is_ok(), ok, "{:?}", s);
    }

    #[test]
    fn event_kinds_follow_the_rules(s in "\\PC{0,70}") {
        let builtin = ["progress", "log", "status", "complete", "error"].contains(&s.as_str());
        let custom = !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        prop_assert_eq!(EventKind::parse(&s).is_ok(), builtin || custom, "{:?}", s);
    }
}
