use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Event, EventKind, RunId};

/// Where a run is in its life, derived from its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Has events, none of them `complete` or `error`.
    Running,
    /// Ended with a `complete` event.
    Completed,
    /// Ended with an `error` event.
    Failed,
}

/// The current state of a run, folded from its events. This is what a late
/// joiner receives first, so it never starts from a blank progress bar.
/// It is also what the NATS bus stores per run in its KV bucket, so the JSON
/// form must read back as the same state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub run: RunId,
    /// The last sequence number assigned in this run.
    pub seq: u64,
    pub status: RunStatus,
    /// Number of events ever published to the run.
    pub events: u64,
    /// Time of the first event (ms since the Unix epoch).
    pub started_ts: u64,
    /// Time of the latest event.
    pub updated_ts: u64,
    /// Time of the `complete` or `error` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ts: Option<u64>,
    /// Percent done, when the latest progress says `percent` or `done`/`total`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// The latest `progress` data, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Box<RawValue>>,
    /// The latest `status` data, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<Box<RawValue>>,
    /// The `complete` or `error` data, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
}

impl RunStatus {
    /// Parses `running`, `completed` or `failed`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "completed" => Some(Self::Completed),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

impl RunState {
    /// The state of a run whose first event is `first`.
    pub fn new(first: &Event) -> Self {
        let mut s = Self {
            run: first.run.clone(),
            seq: 0,
            status: RunStatus::Running,
            events: 0,
            started_ts: first.ts,
            updated_ts: first.ts,
            finished_ts: None,
            percent: None,
            progress: None,
            last_status: None,
            result: None,
        };
        s.apply(first);
        s
    }

    /// Folds one more event into the state. Events after a terminal event
    /// still count and move `seq`, but do not reopen the run.
    pub fn apply(&mut self, ev: &Event) {
        self.seq = ev.seq;
        self.events += 1;
        self.updated_ts = ev.ts;
        match ev.kind {
            EventKind::Progress => {
                // A finished run's percent stays where it ended (100 after
                // `complete`): a late progress event does not move it back.
                if let Some(p) = percent_of(&ev.data)
                    && !self.is_finished()
                {
                    self.percent = Some(p);
                }
                self.progress = Some(ev.data.clone());
            }
            EventKind::Status => self.last_status = Some(ev.data.clone()),
            EventKind::Complete | EventKind::Error if self.finished_ts.is_none() => {
                self.status = if ev.kind == EventKind::Complete {
                    self.percent = Some(100.0);
                    RunStatus::Completed
                } else {
                    RunStatus::Failed
                };
                self.finished_ts = Some(ev.ts);
                self.result = Some(ev.data.clone());
            }
            _ => {}
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished_ts.is_some()
    }
}

/// Reads `{"percent": p}` or `{"done": d, "total": t}` from progress data.
fn percent_of(data: &RawValue) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct P {
        percent: Option<f64>,
        done: Option<f64>,
        total: Option<f64>,
    }
    let p: P = serde_json::from_str(data.get()).ok()?;
    let v = match (p.percent, p.done, p.total) {
        (Some(pc), _, _) => pc,
        (None, Some(d), Some(t)) if t > 0.0 => d / t * 100.0,
        _ => return None,
    };
    v.is_finite().then_some(v.clamp(0.0, 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: EventKind, data: &str) -> Event {
        Event {
            run: RunId::parse("r").unwrap(),
            seq,
            kind,
            data: RawValue::from_string(data.to_owned()).unwrap(),
            ts: seq * 10,
            stored_us: seq * 10_000,
            traceparent: None,
        }
    }

    #[test]
    fn folds_progress_status_and_completion() {
        let mut s = RunState::new(&ev(1, EventKind::Status, r#"{"state":"starting"}"#));
        s.apply(&ev(2, EventKind::Progress, r#"{"done":3,"total":12}"#));
        assert_eq!(s.percent, Some(25.0));
        assert_eq!(s.status, RunStatus::Running);
        s.apply(&ev(3, EventKind::Progress, r#"{"note":"no numbers"}"#));
        assert_eq!(
            s.percent,
            Some(25.0),
            "progress without numbers keeps the last percent"
        );
        s.apply(&ev(4, EventKind::Complete, r#"{"ok":true}"#));
        assert_eq!(
            (s.status, s.seq, s.events, s.finished_ts),
            (RunStatus::Completed, 4, 4, Some(40))
        );
        s.apply(&ev(5, EventKind::Error, r#"{}"#));
        assert_eq!(
            s.status,
            RunStatus::Completed,
            "a finished run stays finished"
        );
        assert_eq!(s.seq, 5);
        // Found by an outside tester: a progress event after `complete`
        // took the percent back from 100 to 5, against the docs.
        s.apply(&ev(6, EventKind::Progress, r#"{"done":1,"total":20}"#));
        assert_eq!((s.percent, s.seq, s.events), (Some(100.0), 6, 6));
    }

    #[test]
    fn percent_is_clamped_and_checked() {
        assert_eq!(
            percent_of(&RawValue::from_string(r#"{"percent":140}"#.into()).unwrap()),
            Some(100.0)
        );
        assert_eq!(
            percent_of(&RawValue::from_string(r#"{"done":1,"total":0}"#.into()).unwrap()),
            None
        );
        assert_eq!(
            percent_of(&RawValue::from_string(r#"[1,2]"#.into()).unwrap()),
            None
        );
    }
}
