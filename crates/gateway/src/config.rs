use std::time::Duration;

/// Gateway limits and timings. The CLI maps each field to a flag and a
/// `RUNCAST_*` environment variable; defaults suit a single small pod.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest client text frame the protocol accepts; larger frames get a
    /// `too_large` error frame and the connection stays open.
    pub max_frame_bytes: usize,
    /// Frames beyond this are not even buffered: the socket closes with 1009.
    pub hard_frame_bytes: usize,
    /// Subscriptions allowed on one connection.
    pub max_subscriptions: usize,
    /// Outgoing live frames queued per connection before it counts as slow.
    pub queue_messages: usize,
    /// Outgoing live bytes queued per connection before it counts as slow.
    pub queue_bytes: usize,
    /// How often the server pings each WebSocket (and comments each SSE stream).
    pub heartbeat_interval: Duration,
    /// How long after a ping the client has to show signs of life.
    pub heartbeat_timeout: Duration,
    /// Largest publish request body.
    pub max_publish_bytes: usize,
    /// Most events in one publish request.
    pub max_batch: usize,
    /// How long readiness reports "draining" before clients are told to leave.
    pub drain_delay: Duration,
    /// How long shutdown waits for connections to finish after telling them to leave.
    pub drain_timeout: Duration,
    /// How long the server waits to deliver a close frame to a client.
    pub close_timeout: Duration,
    /// Connections served at once; more are refused with 503.
    pub max_connections: usize,
    /// Events read from the bus per replay step.
    pub replay_page: usize,
    /// Reconnect delay suggested to SSE clients (`retry:`).
    pub sse_retry: Duration,
    /// Time allowed to send each request's headers, from the first byte
    /// (slow clients are cut off).
    pub header_read_timeout: Duration,
    /// Time from accepting a connection until its first request's headers
    /// are in (TLS handshake included), and again for a WebSocket upgrade to
    /// complete: a connection that sends nothing is closed after this.
    pub handshake_timeout: Duration,
    /// Time allowed to send a request body (publish, admin); slower gets 408.
    pub request_timeout: Duration,
    /// At most this many `runcast.deliver` spans per second (one per client
    /// write of a sampled event), so tracing costs a bounded amount at any
    /// delivery rate. Only matters when traces are exported.
    pub trace_deliveries_per_sec: u32,
    /// An event whose publish → socket write took longer than this is logged
    /// with its trace ID (at most 5 lines a second), so a slow latency
    /// bucket leads to a trace. Zero turns the log off.
    pub slow_event_log: Duration,
    /// Bearer token for `/v1/admin/*` (stats, drain, shed); `None` turns
    /// the admin API off.
    pub admin_token: Option<String>,
    /// On SIGTERM, clients are asked to reconnect at this many per second,
    /// faster if needed to finish within half of `drain_timeout`.
    pub drain_rate: f64,
    /// Random delay of up to this much added to each shutdown hint.
    pub drain_jitter: Duration,
    /// Who may watch which runs (bearer tokens, or anonymous access).
    pub auth: std::sync::Arc<crate::auth::Auth>,
    /// API keys for `POST /v1/runs/<run>/events`; without any, the API is
    /// open only if the keys allow it (`PublishKeys::open_without_keys`).
    pub publish_keys: crate::publish_keys::PublishKeys,
    /// Browser origins (`https://app.example.com`) allowed to open
    /// WebSockets and to call the HTTP API and SSE cross-origin. Empty:
    /// WebSockets from any origin, and no CORS headers.
    pub allowed_origins: Vec<String>,
    /// WebSocket and SSE sessions one client address may hold (0: no cap).
    pub max_sessions_per_ip: usize,
    /// New sessions per second one client address may open, with a burst
    /// of twice that (0: no limit).
    pub session_rate_per_ip: f64,
    /// Proxies whose `X-Forwarded-For` names the client (CIDRs).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Publish requests per second per API key, burst twice that (0: no limit).
    pub publish_rate_per_key: f64,
    /// Terminate TLS with this certificate (reloaded when its files
    /// change); `None`: plain HTTP, for use behind an ingress.
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 10,
            hard_frame_bytes: 1 << 20,
            max_subscriptions: 256,
            queue_messages: 1024,
            queue_bytes: 4 << 20,
            heartbeat_interval: Duration::from_secs(20),
            heartbeat_timeout: Duration::from_secs(20),
            max_publish_bytes: 1 << 20,
            max_batch: 1000,
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_connections: 100_000,
            replay_page: 256,
            sse_retry: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            trace_deliveries_per_sec: 100,
            // The hop-latency SLO in observability/ (p99 publish → write < 0.5 s).
            slow_event_log: Duration::from_millis(500),
            admin_token: None,
            drain_rate: 500.0,
            drain_jitter: Duration::ZERO,
            auth: std::sync::Arc::new(crate::auth::Auth::anonymous()),
            publish_keys: crate::publish_keys::PublishKeys::default(),
            allowed_origins: Vec::new(),
            // Off unless configured: behind a proxy without
            // `trusted_proxies`, every client has the proxy's address.
            max_sessions_per_ip: 0,
            session_rate_per_ip: 0.0,
            trusted_proxies: Vec::new(),
            publish_rate_per_key: 0.0,
            tls: None,
        }
    }
}
