//! NATS subject naming: `<prefix>.runs.<run>.<kind>`.
//!
//! Run IDs and kinds are validated to never contain `.`, `*`, `>` or spaces,
//! so they are always single subject tokens.

use crate::{EventKind, RunId};

pub const DEFAULT_PREFIX: &str = "runcast";

/// The subject an event of `kind` for `run` is published on.
pub fn event_subject(prefix: &str, run: &RunId, kind: &EventKind) -> String {
    format!("{prefix}.runs.{run}.{kind}")
}

/// The wildcard subject matching every event of `run`.
pub fn run_wildcard(prefix: &str, run: &RunId) -> String {
    format!("{prefix}.runs.{run}.*")
}

/// Every subject the events stream republishes stored events on, for the
/// gateways' live feeds: `<prefix>.live.<run>.<kind>`, one for each
/// `<prefix>.runs.<run>.<kind>`. Only the stream publishes there.
pub fn live_root(prefix: &str) -> String {
    format!("{prefix}.live.>")
}

/// The republished copies of every event of `run` (see [`live_root`]).
pub fn live_wildcard(prefix: &str, run: &RunId) -> String {
    format!("{prefix}.live.{run}.*")
}

/// Splits a subject back into run and kind; `None` if it is not an event subject.
pub fn parse_event_subject(prefix: &str, subject: &str) -> Option<(RunId, EventKind)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".runs.")?;
    let (run, kind) = rest.split_once('.')?;
    Some((RunId::parse(run).ok()?, EventKind::parse(kind).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let run = RunId::parse("r-1").unwrap();
        let s = event_subject("runcast", &run, &EventKind::Progress);
        assert_eq!(s, "runcast.runs.r-1.progress");
        assert_eq!(run_wildcard("runcast", &run), "runcast.runs.r-1.*");
        assert_eq!(live_wildcard("runcast", &run), "runcast.live.r-1.*");
        assert_eq!(
            parse_event_subject("runcast", &s),
            Some((run, EventKind::Progress))
        );
        assert_eq!(parse_event_subject("runcast", "runcast.runs.a.b.c"), None);
        assert_eq!(parse_event_subject("other", &s), None);
    }
}
