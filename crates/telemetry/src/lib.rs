//! Distributed tracing, and the Prometheus registration, for every runcast role.
//!
//! runcast's spans are ordinary `tracing` spans with the target [`TARGET`]:
//! `runcast.publish` in the worker, `runcast.receive`, `runcast.fanout` and
//! sampled `runcast.deliver` spans in the gateway. They become OpenTelemetry
//! spans only when a `tracing-opentelemetry` layer is installed for that
//! target (the `runcast` binary does so with the `otlp` feature, see
//! [`otlp::init`]); otherwise the span macros find no interested subscriber
//! and cost a relaxed atomic load.
//!
//! Traces cross processes as W3C `traceparent` strings: in NATS headers, in
//! the HTTP publish API and in the event frames clients receive. This module
//! holds the conversions between those strings and OpenTelemetry contexts.
//!
//! Metrics: every role keeps one Prometheus registry, built with
//! [`metrics::Registrar`].

pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Instant,
};

pub use opentelemetry::Context;
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TraceFlags},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
pub use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span runcast exports.
pub const TARGET: &str = "runcast_trace";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports runcast's spans (set by [`otlp::init`]).
/// Hot paths check it before building anything trace-related.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Marks this process as exporting spans; for embedders that install their
/// own `tracing-opentelemetry` layer instead of [`otlp::init`].
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// The remote parent a `traceparent` string names, or `None` if the string
/// is not a valid W3C traceparent.
pub fn parent(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` string of a context's span, if it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span `parent` names (when it is a valid
/// traceparent) and returns the span's own `traceparent`, for the next hop.
/// `None` when no OpenTelemetry layer records the span.
pub fn continue_trace(span: &tracing::Span, parent: Option<&str>) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    if let Some(cx) = parent.and_then(self::parent) {
        // Fails only if the span already started, which a new span has not.
        let _ = span.set_parent(cx);
    }
    traceparent(&span.context())
}

/// A fresh, sampled `traceparent` with random IDs: the root of a trace for
/// a probe that has no span of its own (e.g. `runcast doctor`).
pub fn new_traceparent() -> String {
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    let ids = RandomIdGenerator::default();
    format!("00-{}-{}-01", ids.new_trace_id(), ids.new_span_id())
}

/// Whether `tp` is a W3C traceparent, strictly: `vv-<32>-<16>-<2>` in
/// lowercase hex, version not `ff` (version 00 exactly 55 characters, later
/// versions possibly followed by `-…`), trace and span IDs not all zeros.
/// Stricter than the propagator in [`parent`], which also takes e.g. short or
/// signed numbers; checked in place, as the gateway asks for every live event.
pub fn well_formed(tp: &str) -> bool {
    let b = tp.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let nonzero = |r: std::ops::Range<usize>| b[r].iter().any(|&c| c != b'0');
    b.len() >= 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(0..2)
        && &b[0..2] != b"ff"
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && nonzero(3..35)
        && nonzero(36..52)
        && if &b[0..2] == b"00" {
            b.len() == 55
        } else {
            b.len() == 55 || b[55] == b'-'
        }
}

/// Whether a well-formed `traceparent` has its sampled flag set, read
/// without allocating: the gateway asks this for every live event.
pub fn sampled(traceparent: &str) -> bool {
    well_formed(traceparent)
        && u8::from_str_radix(&traceparent[53..55], 16)
            .is_ok_and(|f| f & TraceFlags::SAMPLED.to_u8() != 0)
}

/// The trace ID (32 hex digits) of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    well_formed(traceparent).then(|| &traceparent[3..35])
}

/// A per-second allowance shared by all tasks: bounds how many optional
/// spans or log lines a hot path emits, whatever its rate (e.g. delivery
/// spans at 100k deliveries/s). Lock-free: once a second's allowance is
/// used up, asking costs one atomic load until the next second.
#[derive(Debug)]
pub struct Budget {
    per_second: u32,
    epoch: Instant,
    /// The current second since `epoch` (high 32 bits) and what it used.
    window: AtomicU64,
}

impl Budget {
    pub fn per_second(per_second: u32) -> Self {
        Self {
            per_second,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
        }
    }

    /// Takes one unit if this second's allowance is not used up.
    pub fn take(&self) -> bool {
        if self.per_second == 0 {
            return false;
        }
        let second = self.epoch.elapsed().as_secs() as u32;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (w, used) = ((cur >> 32) as u32, cur as u32);
            let next = if w != second {
                (u64::from(second) << 32) | 1
            } else if used >= self.per_second {
                return false;
            } else {
                cur + 1
            };
            match self
                .window
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_round_trip_through_contexts() {
        let cx = parent(TP).unwrap();
        assert_eq!(traceparent(&cx).as_deref(), Some(TP));
        assert_eq!(trace_id(TP), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(parent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parent("garbage").is_none());
        assert_eq!(trace_id("00-short-00f067aa0ba902b7-01"), None);
        assert!(traceparent(&Context::new()).is_none());
        let fresh = new_traceparent();
        assert!(parent(&fresh).is_some() && sampled(&fresh), "{fresh}");
        assert_ne!(trace_id(&fresh), trace_id(&new_traceparent()));
    }

    #[test]
    fn the_sampled_flag_is_read_from_well_formed_traceparents_only() {
        assert!(sampled(TP));
        assert!(!sampled(&TP.replace("-01", "-00")));
        assert!(sampled(&TP.replace("-01", "-03")));
        assert!(!sampled("00-abc-01"));
        assert!(!sampled(""));
        assert!(!sampled(&TP.replace("-01", "-zz")));
    }

    /// Found by the `client_frame` fuzz target: `trace_id` used to take any
    /// string with a 32-hex-digit second field, so a client's garbage
    /// traceparent was logged as a trace ID that no trace has.
    #[test]
    fn only_strict_w3c_traceparents_have_a_trace_id() {
        let fuzzed = "26.2E00-20000000000000000001941220002E00-20000000000000000001941265333?+";
        assert_eq!(trace_id(fuzzed), None);
        assert_eq!(trace_id(TP), Some(&TP[3..35]));
        for bad in [
            TP.to_uppercase(),
            TP.replace("00-", "ff-"),
            format!("{TP}-x"),
            format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16)),
            format!("00-{}-{}-01", "1".repeat(32), "0".repeat(16)),
            TP.replacen('-', "+", 1),
        ] {
            assert_eq!(trace_id(&bad), None, "{bad}");
            assert!(!sampled(&bad), "{bad}");
        }
        // A later version may carry more fields; the propagator agrees.
        let v1 = format!("01{}-extra", &TP[2..]);
        assert!(trace_id(&v1).is_some() && parent(&v1).is_some(), "{v1}");
    }

    #[test]
    fn a_budget_allows_its_rate_per_second_across_threads() {
        let b = Budget::per_second(300);
        let taken: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..200).filter(|_| b.take()).count()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // All within one second (or, on a very slow machine, two).
        assert!(taken == 300 || (300..=600).contains(&taken), "{taken}");
        assert!(!Budget::per_second(0).take());
    }

    #[test]
    fn spans_without_a_layer_have_no_traceparent() {
        let span = tracing::info_span!(target: "runcast_trace", "runcast.test");
        assert_eq!(continue_trace(&span, Some(TP)), None);
    }
}
