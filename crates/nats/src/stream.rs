use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, Republish, RetentionPolicy, StorageType},
};

use crate::error::NatsError;

/// How the events stream keeps history.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub name: String,
    /// Events older than this are dropped.
    pub max_age: Duration,
    /// Events kept per run and kind (JetStream limits per subject).
    pub max_per_subject: i64,
    /// Bytes kept in the whole stream; the oldest events go first.
    pub max_bytes: i64,
    /// Copies of each event in a clustered NATS (1, 3 or 5).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is recognised as a duplicate.
    pub duplicate_window: Duration,
    /// Largest event payload accepted.
    pub max_message_size: i32,
    /// Consumers the stream allows (each gateway needs one or two).
    pub max_consumers: i32,
    /// The KV bucket holding each run's state (same age limit and replicas
    /// as the stream).
    pub state_bucket: String,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "RUNCAST_EVENTS".into(),
            max_age: Duration::from_secs(3600),
            max_per_subject: 10_000,
            max_bytes: 1 << 30,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1 << 20,
            max_consumers: 100_000,
            state_bucket: "RUNCAST_RUNS".into(),
        }
    }
}

impl StreamSettings {
    fn config(&self, prefix: &str) -> Config {
        Config {
            name: self.name.clone(),
            subjects: vec![format!("{prefix}.runs.>")],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            max_age: self.max_age,
            max_messages_per_subject: self.max_per_subject,
            max_bytes: self.max_bytes,
            num_replicas: self.replicas,
            // JetStream refuses a window longer than the age limit.
            duplicate_window: self.duplicate_window.min(self.max_age),
            max_message_size: self.max_message_size,
            // runcast itself holds one consumer (the shared state folder;
            // gateways follow runs through republished copies, not
            // consumers); other tools may add their own. Since nats-server
            // 2.15 a stream without a positive limit gets a default of 1,000
            // consumers (0 and -1 both mean "default"), so the limit is
            // explicit.
            max_consumers: self.max_consumers,
            // Gateways read history with direct gets, served by any replica.
            allow_direct: true,
            // Every stored event is published again, with its seq and its
            // subject's previous seq in headers, on the live subject the
            // gateways subscribe to per watched run (see crate::watch).
            republish: Some(republish(prefix)),
            description: Some("runcast run events: recent history of every run".into()),
            ..Config::default()
        }
    }
}

/// The stream's republish rule: `<prefix>.runs.<run>.<kind>` to
/// `<prefix>.live.<run>.<kind>`.
fn republish(prefix: &str) -> Republish {
    Republish {
        source: format!("{prefix}.runs.>"),
        destination: runcast_core::subject::live_root(prefix),
        headers_only: false,
    }
}

/// Whether `config` republishes what live feeds need; why not, if not.
pub(crate) fn check_republish(prefix: &str, config: &Config) -> Result<(), String> {
    let want = republish(prefix);
    match &config.republish {
        Some(r) if *r == want => Ok(()),
        Some(r) => Err(format!(
            "the stream republishes {:?} to {:?}{}; live delivery needs {:?} republished in full to {:?}",
            r.source,
            r.destination,
            if r.headers_only {
                " (headers only)"
            } else {
                ""
            },
            want.source,
            want.destination
        )),
        None => Err(format!(
            "the stream no longer republishes {:?} to {:?}; live delivery needs it (restart a gateway to restore it)",
            want.source, want.destination
        )),
    }
}

/// Creates the events stream, or checks that an existing one captures
/// `<prefix>.runs.>` with limits retention on file storage and brings its
/// limits in line with `settings`. A stream that cannot serve runcast (other
/// subjects, another retention or storage) is an error that says what to
/// change; it is never silently modified.
pub async fn ensure_stream(
    js: &jetstream::Context,
    prefix: &str,
    settings: &StreamSettings,
) -> Result<jetstream::stream::Stream, NatsError> {
    let want = settings.config(prefix);
    let js_err = |op: &'static str| move |e: String| NatsError::JetStream { op, reason: e };
    let existing = match js.get_stream(&settings.name).await {
        Ok(s) => Some(s),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            // The normal first start.
            None
        }
        Err(e) => return Err(js_err("stream lookup")(e.to_string())),
    };
    let Some(mut stream) = existing else {
        return js
            .create_stream(want)
            .await
            .map_err(|e| js_err("stream create")(e.to_string()));
    };
    let have = stream
        .info()
        .await
        .map_err(|e| js_err("stream info")(e.to_string()))?
        .config
        .clone();
    let incompatible = |reason: String| NatsError::IncompatibleStream {
        stream: settings.name.clone(),
        reason,
    };
    let subject = &want.subjects[0];
    if !have.subjects.iter().any(|s| s == subject) {
        return Err(incompatible(format!(
            "it captures {:?} but runcast publishes on {subject:?}; delete it or choose another --nats-stream",
            have.subjects
        )));
    }
    if have.retention != RetentionPolicy::Limits {
        return Err(incompatible(format!(
            "its retention is {:?}; runcast needs limits retention so every gateway can replay history",
            have.retention
        )));
    }
    if have.storage != want.storage {
        return Err(incompatible(format!(
            "it uses {:?} storage; runcast needs file storage so history survives restarts",
            have.storage
        )));
    }
    // A republish rule is runcast's to add, but one that someone else set
    // up is theirs: changing it would break whoever relies on it.
    if let Some(theirs) = &have.republish
        && Some(theirs) != want.republish.as_ref()
    {
        return Err(incompatible(format!(
            "it republishes {:?} to {:?}{}; runcast needs {:?} republished in full (not headers only) to {:?} for its live feeds: remove that rule or choose another --nats-stream",
            theirs.source,
            theirs.destination,
            if theirs.headers_only {
                " (headers only)"
            } else {
                ""
            },
            format!("{prefix}.runs.>"),
            runcast_core::subject::live_root(prefix),
        )));
    }
    let limits_differ = have.republish.is_none()
        || have.max_age != want.max_age
        || have.max_messages_per_subject != want.max_messages_per_subject
        || have.max_bytes != want.max_bytes
        || have.num_replicas != want.num_replicas
        || have.duplicate_window != want.duplicate_window
        || have.max_message_size != want.max_message_size
        || have.max_consumers != want.max_consumers
        || !have.allow_direct;
    if limits_differ {
        let updated = Config {
            subjects: have.subjects.clone(),
            ..want
        };
        js.update_stream(&updated)
            .await
            .map_err(|e| js_err("stream update")(e.to_string()))?;
        tracing::info!(stream = %settings.name, "updated stream limits");
    }
    js.get_stream(&settings.name)
        .await
        .map_err(|e| js_err("stream lookup")(e.to_string()))
}
