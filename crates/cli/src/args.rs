use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};
use runcast_bus::Retention;
use runcast_gateway::Config;

/// runcast: live progress events from long jobs to browsers.
#[derive(Debug, Parser)]
#[command(name = "runcast", version, about)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax; RUST_LOG itself wins when set).
    #[arg(long, env = "RUNCAST_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(subcommand)]
    pub cmd: Command,
}

/// OpenTelemetry trace export, off unless an endpoint is given. The
/// standard OTEL_* variables apply too (OTEL_EXPORTER_OTLP_ENDPOINT,
/// OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*, ...).
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317).
    #[arg(long, env = "RUNCAST_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Sample this share of new traces (0.0-1.0); spans continuing a trace follow
    /// its sampling decision. Default: OTEL_TRACES_SAMPLER, else every trace.
    #[arg(long, env = "RUNCAST_TRACE_SAMPLE_RATIO", global = true)]
    pub trace_sample_ratio: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: a gateway with the watch page at /, on
    /// the embedded bus (default) or on NATS with --nats.
    Up(UpArgs),
    /// Run a gateway pod on NATS: stateless, any number of them side by side.
    Gateway(GatewayRoleArgs),
    /// Run simulated jobs that publish to NATS (the demo workload, for worker
    /// pods). Publish only: it creates or checks the events stream, never run state.
    Worker(WorkerArgs),
    /// Follow a run's events, reconnecting and resuming without loss.
    Tail(TailArgs),
    /// Publish one event to a run through a gateway's HTTP API.
    Publish(PublishArgs),
    /// Load-test a gateway and report throughput, latency, loss and memory.
    Bench(BenchArgs),
    /// Check every hop to a gateway (HTTP, readiness, WebSocket through
    /// proxies, SSE, NATS, a published probe) and say what to fix.
    Doctor(DoctorArgs),
    /// Run the Kubernetes operator: reconcile RuncastClusters, scale gateway
    /// fleets on connections and message rate, drain and rebalance.
    Operator(OperatorArgs),
    /// Bridge existing publishers into runcast: `bridge redis` reads Redis
    /// pub/sub channels or Redis Streams and publishes each message as an event.
    #[command(subcommand)]
    Bridge(BridgeCommand),
    /// Print the RuncastCluster CustomResourceDefinition (YAML).
    Crdgen,
    /// Make a new API key for the HTTP publish API: prints the key (give it to the
    /// publisher) and the entry for --publish-key (give it to the gateways).
    PublishKey(PublishKeyArgs),
}

#[derive(Debug, Args)]
pub struct PublishKeyArgs {
    /// A name for the key (shown in errors and logs, never the key).
    pub name: String,
    /// Run ID prefixes the key may publish to (default: any run).
    pub prefixes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Watch RuncastClusters in this namespace only (default: all namespaces).
    #[arg(long, env = "RUNCAST_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "RUNCAST_LEASE_NAME", default_value = "runcast-operator")]
    pub lease_name: String,
    /// Create the Lease when it is missing. The chart makes the Lease
    /// itself and turns this off, so that `helm uninstall` removes it for
    /// good: an operator still running in its grace period cannot make it
    /// again (it waits, or stops leading, until the Lease exists).
    #[arg(long, env = "RUNCAST_LEASE_CREATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub lease_create: bool,
    /// This replica's identity in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a leader's lease lasts without renewal.
    #[arg(long, env = "RUNCAST_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// The gateways' container port, where their admin API answers.
    #[arg(long, env = "RUNCAST_GATEWAY_PORT", default_value_t = 8080)]
    pub gateway_port: u16,
    /// Where to serve the operator's /metrics and /healthz.
    #[arg(long, env = "RUNCAST_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
}

/// Whom a client command trusts for `https://` and `wss://` URLs.
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// Trust only the CA certificate(s) in this PEM file for https/wss, instead of the
    /// system's roots (a gateway whose certificate comes from a private CA).
    #[arg(long, env = "RUNCAST_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// The subscriber token a client command shows a gateway that requires one
/// (`tail`, `doctor`). Commands word its help for what they do with it.
#[derive(Debug, Args)]
pub struct SubscriberArgs {
    /// Bearer token for gateways that require one (sent as Authorization: Bearer).
    #[arg(long, env = "RUNCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The publish API key a client command shows a gateway that requires one
/// (`publish`, `doctor`).
#[derive(Debug, Args)]
pub struct PublisherArgs {
    /// API key, for gateways that require one.
    #[arg(long, env = "RUNCAST_PUBLISH_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    mut_arg("token", |a| a.help("Subscriber token, for gateways that require one")),
    mut_arg("key", |a| a.help(
        "Publish API key, for gateways that require one (the probe is published with it)"
    )),
)]
pub struct DoctorArgs {
    /// The gateway's URL as clients reach it (through any proxy or ingress):
    /// http(s)://host[:port][/prefix]; ws(s):// and .../v1/ws name the same gateway.
    #[arg(long, env = "RUNCAST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Also check NATS directly at this URL.
    #[arg(long = "nats", env = "RUNCAST_NATS_URL")]
    pub nats: Option<String>,
    /// JetStream stream to look for.
    #[arg(long, env = "RUNCAST_NATS_STREAM", default_value = "RUNCAST_EVENTS")]
    pub nats_stream: String,
    /// KV bucket to look for.
    #[arg(long, env = "RUNCAST_NATS_KV", default_value = "RUNCAST_RUNS")]
    pub nats_kv: String,
    /// How long each check may take.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub subscriber: SubscriberArgs,
    #[command(flatten)]
    pub publisher: PublisherArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, env = "RUNCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Also run simulated jobs (load tests, batches, builds) that publish realistic events.
    #[arg(long, env = "RUNCAST_DEMO")]
    pub demo: bool,
    /// How many demo jobs run at once.
    #[arg(long, env = "RUNCAST_DEMO_JOBS", default_value_t = 4)]
    pub demo_jobs: usize,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct GatewayRoleArgs {
    /// Address to listen on.
    #[arg(long, env = "RUNCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// How many simulated jobs run at once.
    #[arg(long, env = "RUNCAST_WORKER_JOBS", default_value_t = 4)]
    pub jobs: usize,
    /// Where to serve the worker's /metrics (Prometheus) and /healthz.
    #[arg(long, env = "RUNCAST_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// Where NATS is and how to log in. Without --nats, `up` uses the embedded bus.
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated (e.g. nats://n1:4222,nats://n2:4222).
    #[arg(long = "nats", env = "RUNCAST_NATS_URL")]
    pub url: Option<String>,
    /// Subject prefix: events are published on <prefix>.runs.<run>.<kind>.
    #[arg(long, env = "RUNCAST_NATS_PREFIX", default_value = "runcast")]
    pub nats_prefix: String,
    /// JetStream stream that keeps the events.
    #[arg(long, env = "RUNCAST_NATS_STREAM", default_value = "RUNCAST_EVENTS")]
    pub nats_stream: String,
    /// JetStream KV bucket that keeps each run's state.
    #[arg(long, env = "RUNCAST_NATS_KV", default_value = "RUNCAST_RUNS")]
    pub nats_kv: String,
    /// Stream and bucket replicas in a clustered NATS (1, 3 or 5).
    #[arg(long, env = "RUNCAST_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
    /// NATS user (with --nats-password).
    #[arg(long, env = "RUNCAST_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long, env = "RUNCAST_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "RUNCAST_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "RUNCAST_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// NATS NKey seed.
    #[arg(long, env = "RUNCAST_NATS_NKEY", hide_env_values = true)]
    pub nats_nkey: Option<String>,
    /// CA certificate for TLS to NATS.
    #[arg(long, env = "RUNCAST_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
}

impl NatsArgs {
    pub fn config(&self, url: &str, client_name: &str) -> runcast_nats::NatsConfig {
        runcast_nats::NatsConfig {
            urls: url.to_owned(),
            prefix: self.nats_prefix.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_seed: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            client_name: client_name.to_owned(),
            ..runcast_nats::NatsConfig::default()
        }
    }

    /// Stream limits from the same retention flags the embedded bus uses.
    pub fn stream(&self, r: &RetentionArgs) -> runcast_nats::StreamSettings {
        runcast_nats::StreamSettings {
            name: self.nats_stream.clone(),
            max_age: r.history_age,
            max_per_subject: r.history_events as i64,
            max_bytes: r.history_total_bytes as i64,
            replicas: self.nats_replicas,
            state_bucket: self.nats_kv.clone(),
            ..runcast_nats::StreamSettings::default()
        }
    }
}

/// A positive, finite number per second.
pub fn rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive rate per second")),
    }
}

/// Parses `250ms`, `20s`, `5m`, `2h` or plain seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 20s, 5m or 2h"))?;
    Ok(match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?} has an unknown unit; use ms, s, m or h")),
    })
}

/// Parses `512`, `64KiB`, `4MiB`, `1GiB`.
pub fn size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512, 64KiB, 4MiB or 1GiB"))?;
    let mult = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit; use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

// The gateway's and the embedded bus's flag defaults are the libraries' own
// (`Config::default()`, `Retention::default()`), shown in `--help` in the
// units the parsers above read: one source of truth, so a library user and
// a `runcast` user get the same gateway and the help cannot drift from it.
static GATEWAY: std::sync::LazyLock<Config> = std::sync::LazyLock::new(Config::default);
static RETENTION: std::sync::LazyLock<Retention> = std::sync::LazyLock::new(Retention::default);

/// A size as `--help` shows it: in the largest unit that divides it
/// (`64KiB`, `4MiB`), so [`size`] reads it back to the same number.
pub fn show_size(n: usize) -> String {
    for (unit, mult) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    n.to_string()
}

/// A duration as `--help` shows it: in the largest unit that divides it
/// (`1h`, `20s`, `500ms`), so [`duration`] reads it back to the same value.
pub fn show_duration(d: Duration) -> String {
    let us = d.as_micros();
    for (unit, mult) in [
        ("h", 3_600_000_000),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
    ] {
        if us >= mult && us.is_multiple_of(mult) {
            return format!("{}{unit}", us / mult);
        }
    }
    if us == 0 {
        "0s".into()
    } else {
        format!("{us}us")
    }
}

/// Gateway limits and timings.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Largest client frame accepted; larger ones get a too_large error frame.
    #[arg(long, env = "RUNCAST_MAX_FRAME", default_value = show_size(GATEWAY.max_frame_bytes), value_parser = size)]
    pub max_frame: usize,
    /// Subscriptions allowed per connection.
    #[arg(long, env = "RUNCAST_MAX_SUBSCRIPTIONS", default_value_t = GATEWAY.max_subscriptions)]
    pub max_subscriptions: usize,
    /// Live frames queued per connection before it is disconnected as a slow consumer.
    #[arg(long, env = "RUNCAST_QUEUE_MESSAGES", default_value_t = GATEWAY.queue_messages)]
    pub queue_messages: usize,
    /// Live bytes queued per connection before it is disconnected as a slow consumer.
    #[arg(long, env = "RUNCAST_QUEUE_BYTES", default_value = show_size(GATEWAY.queue_bytes), value_parser = size)]
    pub queue_bytes: usize,
    /// Interval between server pings.
    #[arg(long, env = "RUNCAST_HEARTBEAT_INTERVAL", default_value = show_duration(GATEWAY.heartbeat_interval), value_parser = duration)]
    pub heartbeat_interval: Duration,
    /// Time a client has after a ping before it counts as dead.
    #[arg(long, env = "RUNCAST_HEARTBEAT_TIMEOUT", default_value = show_duration(GATEWAY.heartbeat_timeout), value_parser = duration)]
    pub heartbeat_timeout: Duration,
    /// Largest publish request body.
    #[arg(long, env = "RUNCAST_MAX_PUBLISH", default_value = show_size(GATEWAY.max_publish_bytes), value_parser = size)]
    pub max_publish: usize,
    /// Most events in one publish request.
    #[arg(long, env = "RUNCAST_MAX_BATCH", default_value_t = GATEWAY.max_batch)]
    pub max_batch: usize,
    /// On SIGTERM, how long readiness fails before clients are told to leave.
    #[arg(long, env = "RUNCAST_DRAIN_DELAY", default_value = show_duration(GATEWAY.drain_delay), value_parser = duration)]
    pub drain_delay: Duration,
    /// How long shutdown waits for connections to close.
    #[arg(long, env = "RUNCAST_DRAIN_TIMEOUT", default_value = show_duration(GATEWAY.drain_timeout), value_parser = duration)]
    pub drain_timeout: Duration,
    /// Time a client has to send each request's headers, from their first byte.
    #[arg(long, env = "RUNCAST_HEADER_READ_TIMEOUT", default_value = show_duration(GATEWAY.header_read_timeout), value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Time from connecting until the first request's headers are in (TLS handshake
    /// included), and for a WebSocket upgrade to complete; silent connections are closed.
    #[arg(long, env = "RUNCAST_HANDSHAKE_TIMEOUT", default_value = show_duration(GATEWAY.handshake_timeout), value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Time a client has to send a request body (publish, admin); slower gets 408.
    #[arg(long, env = "RUNCAST_REQUEST_TIMEOUT", default_value = show_duration(GATEWAY.request_timeout), value_parser = duration)]
    pub request_timeout: Duration,
    /// Serve HTTPS/WSS with this PEM certificate chain (with --tls-key); re-read when the
    /// file changes. Unset: plain HTTP, for use behind an ingress that terminates TLS.
    #[arg(long, env = "RUNCAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, env = "RUNCAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// How often the certificate and key files are checked for changes.
    #[arg(long, env = "RUNCAST_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = duration)]
    pub tls_reload_interval: Duration,
    /// Connections served at once; more get 503.
    #[arg(long, env = "RUNCAST_MAX_CONNECTIONS", default_value_t = GATEWAY.max_connections)]
    pub max_connections: usize,
    /// When exporting traces: at most this many per-client `runcast.deliver` spans a second.
    #[arg(long, env = "RUNCAST_TRACE_DELIVERIES", default_value_t = GATEWAY.trace_deliveries_per_sec)]
    pub trace_deliveries: u32,
    /// Subscriber tokens: an HS256 shared secret (32+ bytes).
    #[arg(long, env = "RUNCAST_AUTH_HS256_SECRET", hide_env_values = true)]
    pub auth_hs256_secret: Option<String>,
    /// The `kid` of the HS256 secret, for tokens whose header names one (rotation).
    /// Without it, the secret checks tokens that carry no `kid`.
    #[arg(long, env = "RUNCAST_AUTH_HS256_KID", requires = "auth_hs256_secret")]
    pub auth_hs256_kid: Option<String>,
    /// Subscriber tokens: RS256/ES256 public keys in PEM, as [kid=]path (kid defaults to the
    /// file name); repeat or separate with commas for rotation.
    #[arg(long, env = "RUNCAST_AUTH_KEYS", value_delimiter = ',')]
    pub auth_key: Vec<String>,
    /// Subscriber tokens: a JWKS file (keys chosen by kid).
    #[arg(long, env = "RUNCAST_AUTH_JWKS")]
    pub auth_jwks: Option<std::path::PathBuf>,
    /// Require this `aud` claim in subscriber tokens.
    #[arg(long, env = "RUNCAST_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Require this `iss` claim in subscriber tokens.
    #[arg(long, env = "RUNCAST_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// API keys for the HTTP publish API, as name:sha256hex[:prefix|prefix...] (from
    /// `runcast publish-key`); repeat or separate with commas. Without keys the HTTP
    /// publish API refuses every request unless --allow-anonymous-publish (`runcast up`:
    /// open unless keys are given).
    #[arg(
        long,
        env = "RUNCAST_PUBLISH_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub publish_key: Vec<String>,
    /// Browser origins allowed to open WebSockets and call the API cross-origin
    /// (e.g. https://app.example.com); repeat or separate with commas. Default: any origin
    /// for WebSockets, no CORS.
    #[arg(long, env = "RUNCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,
    /// WebSocket/SSE sessions one client address may hold (0: no cap). Set --trusted-proxy
    /// first if clients come through a load balancer.
    #[arg(long, env = "RUNCAST_MAX_SESSIONS_PER_IP", default_value_t = GATEWAY.max_sessions_per_ip)]
    pub max_sessions_per_ip: usize,
    /// New WebSocket/SSE sessions per second one client address may open, burst twice that
    /// (0: no limit).
    #[arg(long, env = "RUNCAST_SESSION_RATE_PER_IP", default_value_t = GATEWAY.session_rate_per_ip)]
    pub session_rate_per_ip: f64,
    /// Publish requests per second per API key, burst twice that (0: no limit).
    #[arg(long, env = "RUNCAST_PUBLISH_RATE_PER_KEY", default_value_t = GATEWAY.publish_rate_per_key)]
    pub publish_rate_per_key: f64,
    /// Proxies (CIDRs) whose X-Forwarded-For names the client, e.g. 10.0.0.0/8; repeatable.
    #[arg(long, env = "RUNCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxy: Vec<ipnet::IpNet>,
    /// Let clients without a token watch every run (`runcast up` does unless keys are given).
    #[arg(long, env = "RUNCAST_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// Let anyone who reaches the HTTP publish API publish to any run when no --publish-key
    /// is configured (`runcast up` does unless keys are given).
    #[arg(long, env = "RUNCAST_ALLOW_ANONYMOUS_PUBLISH")]
    pub allow_anonymous_publish: bool,
    /// Bearer token for the admin API (/v1/admin/stats, drain, shed) the operator uses; unset = off.
    #[arg(long, env = "RUNCAST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// On SIGTERM, ask this many clients per second to reconnect elsewhere (faster if needed
    /// to finish within half of --drain-timeout).
    #[arg(long, env = "RUNCAST_DRAIN_RATE", default_value_t = GATEWAY.drain_rate, value_parser = rate)]
    pub drain_rate: f64,
    /// Random extra delay of up to this much for each SIGTERM reconnect hint.
    #[arg(long, env = "RUNCAST_DRAIN_JITTER", default_value = show_duration(GATEWAY.drain_jitter), value_parser = duration)]
    pub drain_jitter: Duration,
    /// Log events slower than this from publish to socket write, with their trace ID (0 = off).
    #[arg(long, env = "RUNCAST_SLOW_EVENT_LOG", default_value = show_duration(GATEWAY.slow_event_log), value_parser = duration)]
    pub slow_event_log: Duration,
}

impl GatewayArgs {
    /// Who may watch: the configured keys, and anonymous access only if
    /// asked for (or, for `runcast up`, if nothing else is configured).
    pub fn auth(&self, anonymous_by_default: bool) -> Result<runcast_gateway::auth::Auth, String> {
        let mut auth = runcast_gateway::auth::Auth::anonymous()
            .with_audience(self.auth_audience.clone())
            .with_issuer(self.auth_issuer.clone());
        auth.allow_anonymous = self.allow_anonymous;
        if let Some(s) = &self.auth_hs256_secret {
            auth.add_hs256_secret(self.auth_hs256_kid.clone(), s.as_bytes())?;
        }
        for k in self.auth_key.iter().filter(|k| !k.is_empty()) {
            let (kid, path) = match k.split_once('=') {
                Some((kid, path)) => (Some(kid.to_owned()), path),
                None => (None, k.as_str()),
            };
            auth.add_pem_file(kid, std::path::Path::new(path))?;
        }
        if let Some(j) = &self.auth_jwks {
            auth.add_jwks_file(j)?;
        }
        if !auth.is_configured() {
            if !anonymous_by_default {
                return Err(
                    "runcast gateway needs subscriber auth: --auth-hs256-secret, \
                            --auth-key or --auth-jwks, or --allow-anonymous to let anyone \
                            watch every run"
                        .into(),
                );
            }
            auth.allow_anonymous = true;
        }
        Ok(auth)
    }

    /// Who may publish over HTTP: the configured keys; without any, nobody
    /// unless --allow-anonymous-publish (or, for `runcast up`, by default).
    pub fn publish_keys(
        &self,
        open_by_default: bool,
    ) -> Result<runcast_gateway::publish_keys::PublishKeys, String> {
        let mut keys = runcast_gateway::publish_keys::PublishKeys::default();
        for e in self.publish_key.iter().filter(|e| !e.is_empty()) {
            keys.add(e)?;
        }
        Ok(keys.open_without_keys(self.allow_anonymous_publish || open_by_default))
    }

    /// The certificate to serve, if --tls-cert/--tls-key are given.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<runcast_gateway::tls::Tls>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        runcast_gateway::tls::Tls::load(runcast_gateway::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            reload_interval: self.tls_reload_interval,
        })
        .map(Some)
    }

    /// The whole gateway configuration; `runcast up` passes
    /// `open_by_default` to be anonymous and open without keys.
    pub fn to_config(&self, open_by_default: bool) -> Result<Config, String> {
        Ok(Config {
            auth: std::sync::Arc::new(self.auth(open_by_default)?),
            publish_keys: self.publish_keys(open_by_default)?,
            tls: self.tls()?,
            max_frame_bytes: self.max_frame,
            // Never below the library's hard cap: a small --max-frame still
            // answers larger frames with a too_large error frame, not a close.
            hard_frame_bytes: self.max_frame.max(GATEWAY.hard_frame_bytes),
            max_subscriptions: self.max_subscriptions,
            queue_messages: self.queue_messages,
            queue_bytes: self.queue_bytes,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            max_publish_bytes: self.max_publish,
            max_batch: self.max_batch,
            drain_delay: self.drain_delay,
            drain_timeout: self.drain_timeout,
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            handshake_timeout: self.handshake_timeout,
            request_timeout: self.request_timeout,
            allowed_origins: self
                .allowed_origin
                .iter()
                .filter(|o| !o.is_empty())
                .cloned()
                .collect(),
            max_sessions_per_ip: self.max_sessions_per_ip,
            session_rate_per_ip: self.session_rate_per_ip.max(0.0),
            trusted_proxies: self.trusted_proxy.clone(),
            publish_rate_per_key: self.publish_rate_per_key.max(0.0),
            trace_deliveries_per_sec: self.trace_deliveries,
            slow_event_log: self.slow_event_log,
            admin_token: self.admin_token.clone(),
            drain_rate: self.drain_rate,
            drain_jitter: self.drain_jitter,
            ..Config::default()
        })
    }
}

/// History kept by the embedded bus.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Events kept per run.
    #[arg(long, env = "RUNCAST_HISTORY_EVENTS", default_value_t = RETENTION.max_events_per_run)]
    pub history_events: usize,
    /// Bytes of history kept per run.
    #[arg(long, env = "RUNCAST_HISTORY_RUN_BYTES", default_value = show_size(RETENTION.max_bytes_per_run), value_parser = size)]
    pub history_run_bytes: usize,
    /// Bytes of history kept in total; publishes beyond it get 507.
    #[arg(long, env = "RUNCAST_HISTORY_TOTAL_BYTES", default_value = show_size(RETENTION.max_total_bytes), value_parser = size)]
    pub history_total_bytes: usize,
    /// Age after which events are dropped from history.
    #[arg(long, env = "RUNCAST_HISTORY_AGE", default_value = show_duration(RETENTION.max_age), value_parser = duration)]
    pub history_age: Duration,
    /// Runs kept at once; new runs beyond it get 507.
    #[arg(long, env = "RUNCAST_MAX_RUNS", default_value_t = RETENTION.max_runs)]
    pub max_runs: usize,
    /// How long a finished run stays visible.
    #[arg(long, env = "RUNCAST_FINISHED_TTL", default_value = show_duration(RETENTION.finished_ttl), value_parser = duration)]
    pub finished_ttl: Duration,
    /// How long a run with no events stays visible.
    #[arg(long, env = "RUNCAST_IDLE_TTL", default_value = show_duration(RETENTION.idle_ttl), value_parser = duration)]
    pub idle_ttl: Duration,
}

impl RetentionArgs {
    pub fn to_retention(&self) -> Retention {
        Retention {
            max_events_per_run: self.history_events,
            max_bytes_per_run: self.history_run_bytes,
            max_total_bytes: self.history_total_bytes,
            max_age: self.history_age,
            max_runs: self.max_runs,
            finished_ttl: self.finished_ttl,
            idle_ttl: self.idle_ttl,
            ..Retention::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The run to follow.
    pub run: String,
    /// Resume after this seq (replays every later event); default: current state, then live.
    #[arg(long)]
    pub since: Option<u64>,
    /// Gateway URL: http(s)://host[:port][/prefix] or ws(s)://..., with or without
    /// /v1/ws (the gateway's WebSocket endpoint is used either way).
    #[arg(long, env = "RUNCAST_URL", default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub url: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub subscriber: SubscriberArgs,
    /// Print raw JSON frames instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Also print each event's trace ID (from the publisher's traceparent).
    #[arg(long, short)]
    pub verbose: bool,
    /// Keep following after the run completes or fails.
    #[arg(long)]
    pub follow: bool,
    /// Give up after this many reconnects in a row without receiving a frame.
    #[arg(long, default_value_t = 30)]
    pub max_retries: u32,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The run to publish to.
    pub run: String,
    /// Event kind: progress, log, status, complete, error or a custom [a-z0-9_-]+.
    #[arg(long, default_value = "progress")]
    pub kind: String,
    /// Event data (any JSON), delivered to clients verbatim.
    #[arg(long)]
    pub data: String,
    /// Gateway URL: http(s)://host[:port][/prefix] (ws(s):// and .../v1/ws name the
    /// same gateway).
    #[arg(
        long,
        env = "RUNCAST_HTTP_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub publisher: PublisherArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenario: `fanout` (clients receive published events), `idle` (memory per idle
    /// connection), `ingest` (events/s stored through the HTTP publish API; on NATS also
    /// straight to JetStream, for comparison) or `interest` (NATS: memory per watched run with
    /// `--clients` x `--subs` runs watched, and hot runs' latency with and without `--churn`).
    #[arg(long, default_value = "fanout")]
    pub scenario: String,
    /// `ingest`: concurrent publishers, each publishing as fast as its answers come.
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// `ingest`: events per publish request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// WebSocket clients to open.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// `interest`: distinct runs each client subscribes to.
    #[arg(long, default_value_t = 250)]
    pub subs: usize,
    /// `interest`: subscribe/unsubscribe changes per second while measuring.
    #[arg(long, default_value_t = 1000)]
    pub churn: u64,
    /// Runs the clients are spread over (client i watches run i mod runs).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Events published per second, across all runs.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Benchmark NATS-backed gateways on this NATS (publishing straight to NATS, as workers do)
    /// instead of `runcast up` on the embedded bus.
    #[arg(long)]
    pub nats: Option<String>,
    /// How many NATS-backed gateways to start; clients are spread over them.
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Benchmark a gateway that is already running at this address instead of starting one.
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// PID of the --target gateway, to report its CPU and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the result as JSON to this file too.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("1us").unwrap(), Duration::from_micros(1));
        assert_eq!(duration("20").unwrap(), Duration::from_secs(20));
        assert_eq!(duration("5m").unwrap(), Duration::from_secs(300));
        assert!(duration("5y").is_err());
        assert!(duration("-1s").is_err());
        assert_eq!(size("64KiB").unwrap(), 65536);
        assert_eq!(size("3").unwrap(), 3);
        assert!(size("1TiB").is_err());
        assert_eq!(rate("2.5").unwrap(), 2.5);
        for bad in ["0", "-1", "inf", "NaN", "x"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shown_defaults_read_back_to_themselves() {
        for n in [
            1,
            512,
            1000,
            64 << 10,
            3 << 19,
            1 << 20,
            16 << 20,
            1 << 30,
            5 << 30,
        ] {
            assert_eq!(size(&show_size(n)), Ok(n), "{n} shown as {}", show_size(n));
        }
        for d in [
            Duration::ZERO,
            Duration::from_micros(7),
            Duration::from_millis(500),
            Duration::from_millis(1500),
            Duration::from_secs(20),
            Duration::from_secs(90),
            Duration::from_secs(3600),
            Duration::from_secs(24 * 3600),
        ] {
            assert_eq!(
                duration(&show_duration(d)),
                Ok(d),
                "{d:?} shown as {}",
                show_duration(d)
            );
        }
        assert_eq!(
            [
                show_size(64 << 10),
                show_duration(Duration::from_millis(500))
            ],
            ["64KiB", "500ms"]
        );
    }

    /// Parses `argv` as if no `RUNCAST_*` (or other) variable were set,
    /// whatever this test process's environment holds.
    fn parse_without_env(argv: &[&str]) -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        fn no_env(cmd: clap::Command) -> clap::Command {
            cmd.mut_args(|a| a.env(None)).mut_subcommands(no_env)
        }
        let matches = no_env(Cli::command())
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    /// Asserts that `got` and `want` agree on each field, naming the one that does not.
    macro_rules! same {
        ($role:expr, $got:expr, $want:expr, $source:literal: $($field:ident),* $(,)?) => {$(
            assert_eq!(
                $got.$field, $want.$field,
                "runcast {} with no flags: {} differs from {}",
                $role, stringify!($field), $source
            );
        )*};
    }

    #[test]
    fn no_flags_give_the_library_defaults() {
        for role in ["up", "gateway"] {
            let (gateway, retention) = match parse_without_env(&["runcast", role]).cmd {
                Command::Up(a) => (a.gateway, a.retention),
                Command::Gateway(a) => (a.gateway, a.retention),
                other => panic!("{role} parsed as {other:?}"),
            };
            // `open_by_default` only decides auth and publish keys, which
            // have no single default to compare (see below).
            let got = gateway.to_config(true).expect("a config");
            let want = Config::default();
            // Every field by name, so a new one must be placed: compared
            // here because a flag sets it, or listed as set by none.
            let Config {
                max_frame_bytes: _,
                hard_frame_bytes: _,
                max_subscriptions: _,
                queue_messages: _,
                queue_bytes: _,
                heartbeat_interval: _,
                heartbeat_timeout: _,
                max_publish_bytes: _,
                max_batch: _,
                drain_delay: _,
                drain_timeout: _,
                max_connections: _,
                header_read_timeout: _,
                handshake_timeout: _,
                request_timeout: _,
                trace_deliveries_per_sec: _,
                slow_event_log: _,
                admin_token: _,
                drain_rate: _,
                drain_jitter: _,
                allowed_origins: _,
                max_sessions_per_ip: _,
                session_rate_per_ip: _,
                trusted_proxies: _,
                publish_rate_per_key: _,
                tls: _,
                // No flag: library-only tuning.
                close_timeout: _,
                replay_page: _,
                sse_retry: _,
                // Built from several flags and the role (`up` is open
                // without keys, `gateway` refuses to start without auth).
                auth: _,
                publish_keys: _,
            } = &want;
            same!(role, got, want, "Config::default()":
                max_frame_bytes,
                hard_frame_bytes,
                max_subscriptions,
                queue_messages,
                queue_bytes,
                heartbeat_interval,
                heartbeat_timeout,
                max_publish_bytes,
                max_batch,
                drain_delay,
                drain_timeout,
                max_connections,
                header_read_timeout,
                handshake_timeout,
                request_timeout,
                trace_deliveries_per_sec,
                slow_event_log,
                admin_token,
                drain_rate,
                drain_jitter,
                allowed_origins,
                max_sessions_per_ip,
                session_rate_per_ip,
                trusted_proxies,
                publish_rate_per_key,
            );
            assert!(
                got.tls.is_none() && want.tls.is_none(),
                "{role}: TLS is off"
            );

            let got = retention.to_retention();
            let want = Retention::default();
            // Every field of Retention with a flag (max_event_bytes has none).
            same!(role, got, want, "Retention::default()":
                max_events_per_run,
                max_bytes_per_run,
                max_total_bytes,
                max_age,
                max_runs,
                finished_ttl,
                idle_ttl,
            );
        }
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// Subscribe to Redis pub/sub channels or patterns, or read Redis Streams
    /// through a consumer group (at-least-once), and publish each message
    /// into runcast: to NATS with --nats, or through a gateway with --gateway.
    Redis(RedisBridgeArgs),
}

#[derive(Debug, Args)]
pub struct RedisBridgeArgs {
    /// Redis: redis://[[user]:password@]host[:port][/db].
    #[arg(
        long,
        env = "RUNCAST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis: String,
    /// Pub/sub channels to subscribe to (repeat, or comma-separate).
    #[arg(
        long = "channel",
        env = "RUNCAST_BRIDGE_CHANNELS",
        value_delimiter = ','
    )]
    pub channels: Vec<String>,
    /// Pub/sub patterns to subscribe to (`progress:*`).
    #[arg(
        long = "pattern",
        env = "RUNCAST_BRIDGE_PATTERNS",
        value_delimiter = ','
    )]
    pub patterns: Vec<String>,
    /// Redis Streams to read through the consumer group (at-least-once).
    #[arg(long = "stream", env = "RUNCAST_BRIDGE_STREAMS", value_delimiter = ',')]
    pub streams: Vec<String>,
    /// The consumer group on each stream (made if missing).
    #[arg(long, env = "RUNCAST_BRIDGE_GROUP", default_value = "runcast-bridge")]
    pub group: String,
    /// This bridge's consumer name in the group (default: the host name,
    /// the pod's name on Kubernetes).
    #[arg(long, env = "RUNCAST_BRIDGE_CONSUMER")]
    pub consumer: Option<String>,
    /// Where a group the bridge makes starts reading: `$` (entries added
    /// from now on) or `0` (the whole stream).
    #[arg(long, env = "RUNCAST_BRIDGE_START", default_value = "$")]
    pub start: String,
    /// The stream entry field that holds the message; an entry without it
    /// is taken as a JSON object of all its fields.
    #[arg(long, env = "RUNCAST_BRIDGE_FIELD", default_value = "data")]
    pub field: String,
    /// Entries pending this long with another consumer (one that died) are
    /// claimed and published by this one.
    #[arg(long, env = "RUNCAST_BRIDGE_CLAIM_IDLE", default_value = "60s", value_parser = duration)]
    pub claim_idle: Duration,
    /// The run ID: a JSON pointer into each message.
    #[arg(long, env = "RUNCAST_BRIDGE_RUN_POINTER", default_value = "/runId", conflicts_with_all = ["run", "run_from_channel"])]
    pub run_pointer: String,
    /// The run ID: always this run.
    #[arg(long, env = "RUNCAST_BRIDGE_RUN")]
    pub run: Option<String>,
    /// The run ID: the channel's (or stream's) last segment after this
    /// separator (`progress:r1` with `:` gives r1).
    #[arg(long, env = "RUNCAST_BRIDGE_RUN_FROM_CHANNEL", num_args = 0..=1, default_missing_value = ":")]
    pub run_from_channel: Option<char>,
    /// The event kind, for every message.
    #[arg(
        long,
        env = "RUNCAST_BRIDGE_KIND",
        default_value = "progress",
        conflicts_with = "kind_pointer"
    )]
    pub kind: String,
    /// The event kind: a JSON pointer into each message.
    #[arg(long, env = "RUNCAST_BRIDGE_KIND_POINTER")]
    pub kind_pointer: Option<String>,
    /// The event data: a JSON pointer into each message (default: the whole message).
    #[arg(long, env = "RUNCAST_BRIDGE_DATA_POINTER")]
    pub data_pointer: Option<String>,
    /// An idempotency key: a JSON pointer into each message (stream entries
    /// use their entry ID when this is not given).
    #[arg(long, env = "RUNCAST_BRIDGE_ID_POINTER")]
    pub id_pointer: Option<String>,
    /// The largest message read from Redis; a larger one drops the connection.
    #[arg(long, env = "RUNCAST_BRIDGE_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Publish through a gateway's HTTP API instead of to NATS.
    #[arg(long, env = "RUNCAST_HTTP_URL", conflicts_with = "url")]
    pub gateway: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub publisher: PublisherArgs,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "RUNCAST_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}
