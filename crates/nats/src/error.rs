/// What went wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The servers could not be reached or the connection options are unusable.
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    /// An existing stream cannot be used as it is configured.
    #[error("stream {stream} is incompatible: {reason}")]
    IncompatibleStream { stream: String, reason: String },
    /// A JetStream API call failed.
    #[error("JetStream {op} failed: {reason}")]
    JetStream { op: &'static str, reason: String },
}
