use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use runcast_core::{CloseCode, ErrorCode, LATENCY_BUCKETS};
use runcast_telemetry::metrics::Registrar;

/// The `transport` label values of `runcast_connections`.
pub const TRANSPORTS: [&str; 2] = ["websocket", "sse"];

/// The gateway's Prometheus metrics, one registry per process. Labels are
/// bounded (transport, error code, close code); never a run ID or address.
pub struct Metrics {
    registry: Registry,
    pub events_published: IntCounter,
    pub events_received: IntCounter,
    pub events_delivered: IntCounter,
    pub replayed_events: IntCounter,
    pub gap_notices: IntCounter,
    pub connections: IntGaugeVec,
    pub subscriptions: IntGauge,
    pub watched_runs: IntGauge,
    pub slow_consumer_disconnects: IntCounter,
    pub protocol_errors: IntCounterVec,
    pub closes: IntCounterVec,
    pub refused_connections: IntCounter,
    /// TCP connections open: over HTTP/2 one carries many sessions, so
    /// this is not `connections` summed.
    pub tcp_connections: prometheus::IntGauge,
    pub timeouts: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    /// Clients asked to reconnect elsewhere, by reason (shutdown, drain,
    /// rebalance).
    pub reconnect_hints: IntCounterVec,
    /// WebSocket/SSE sessions refused by the per-address limits.
    pub refused_sessions: IntCounterVec,
    /// Subscriber tokens refused, by reason (missing, expired, ...).
    pub auth_failures: IntCounterVec,
    /// Hop latencies (`runcast_event_latency_seconds{hop}`): from the bus
    /// storing an event to the gateway receiving it live; from that to the
    /// frame being written to a client socket; and the two together.
    pub publish_to_receive: Histogram,
    pub receive_to_write: Histogram,
    pub publish_to_write: Histogram,
    /// 1 while `/readyz` would answer 200 (set at each scrape).
    pub ready: IntGauge,
    /// 1 while the bus answers (NATS connected and the stream reachable).
    pub bus_up: IntGauge,
    /// From [`runcast_bus::Bus::stats`], brought up to date at each scrape.
    pub bus_reconnects: IntCounter,
    pub bus_live_checks: IntCounter,
    pub bus_live_resyncs: IntCounter,
    pub bus_live_missed: IntCounter,
    pub bus_history_reads: IntCounterVec,
    /// Live feeds that fell behind and were repaired from history.
    pub feed_repairs: IntCounter,
    /// Repairs whose history read failed: the run's subscribers were closed
    /// (1011) to resume from their cursors.
    pub feed_repair_failures: IntCounter,
    /// Frames waiting in a connection's queue when it starts writing a batch.
    pub queue_depth: Histogram,
}

impl Metrics {
    /// Creates and registers every metric. `source` labels where received
    /// events come from (`embedded`, `nats`).
    pub fn new(source: &str) -> Self {
        let m = Registrar::new();
        // Labelled counters export every label value known in advance (at 0)
        // from the start, so rate() and alerts see the series before the
        // first event.
        let received = m.counter_vec(
            "runcast_events_received_total",
            "Events the gateway received from the bus, by source.",
            "source",
            &[source],
        );
        // An idle pod shows 0, not "no data", on dashboards and alerts.
        let connections = m.gauge_vec(
            "runcast_connections",
            "Open client connections, by transport.",
            "transport",
            &TRANSPORTS,
        );
        let close_codes = CloseCode::ALL.map(|c| c.code().to_string());
        let latency = m.histogram_vec(
            "runcast_event_latency_seconds",
            "Event latency by hop: publish_to_receive (bus stored it -> gateway got it live), \
             receive_to_write (-> frame written to a client socket), publish_to_write (both).",
            "hop",
            LATENCY_BUCKETS,
        );
        let queue_depth = m.histogram(
            "runcast_queue_depth",
            "Frames waiting in a connection's queue when it starts writing a batch.",
            &[
                0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ],
        );
        Self {
            queue_depth,
            bus_reconnects: m.counter(
                "runcast_bus_reconnects_total",
                "Reconnections to the bus (NATS) after the first connection.",
            ),
            bus_live_checks: m.counter(
                "runcast_bus_live_checks_total",
                "Live feeds checked against stored history (NATS: one direct get per run that went quiet, per watch opened, and per watched run after a reconnect).",
            ),
            bus_live_resyncs: m.counter(
                "runcast_bus_live_resyncs_total",
                "Live feeds that found they had missed a message (NATS: a broken chain of republished copies, or a check that found the stream ahead) and resynced from history.",
            ),
            bus_live_missed: m.counter(
                "runcast_bus_live_missed_total",
                "Events whose live copy was lost and found missing only after later events of their run had been sent, so subscribers did not get them live (they are in history). Should stay 0; see docs/kubernetes.md.",
            ),
            bus_history_reads: m.counter_vec(
                "runcast_bus_history_reads_total",
                "History reads by outcome: sent to the bus's storage (NATS: JetStream), or joined to the same read already in flight.",
                "outcome",
                &["sent", "joined"],
            ),
            feed_repairs: m.counter(
                "runcast_feed_repairs_total",
                "Times a run's live feed fell behind and was repaired from history.",
            ),
            feed_repair_failures: m.counter(
                "runcast_feed_repair_failures_total",
                "Repairs of a live feed whose history read failed: the run's subscribers were closed (1011) to resume from their cursors.",
            ),
            publish_to_receive: latency.with_label_values(&["publish_to_receive"]),
            receive_to_write: latency.with_label_values(&["receive_to_write"]),
            publish_to_write: latency.with_label_values(&["publish_to_write"]),
            ready: m.gauge(
                "runcast_ready",
                "1 while the gateway is ready (bus up and not draining), as /readyz reports it.",
            ),
            bus_up: m.gauge(
                "runcast_bus_up",
                "1 while the bus answers (for NATS: connected and the stream reachable).",
            ),
            events_published: m.counter(
                "runcast_events_published_total",
                "Events accepted through the HTTP publish API.",
            ),
            events_received: received.with_label_values(&[source]),
            events_delivered: m.counter(
                "runcast_events_delivered_total",
                "Live event frames written to client connections.",
            ),
            replayed_events: m.counter(
                "runcast_replayed_events_total",
                "Event frames replayed from history to resuming or catching-up clients.",
            ),
            gap_notices: m.counter(
                "runcast_gap_notices_total",
                "Gap notices sent because retention had dropped events.",
            ),
            connections,
            subscriptions: m.gauge(
                "runcast_subscriptions",
                "Run subscriptions across all connections.",
            ),
            watched_runs: m.gauge(
                "runcast_watched_runs",
                "Distinct runs this gateway watches on the bus.",
            ),
            slow_consumer_disconnects: m.counter(
                "runcast_slow_consumer_disconnects_total",
                "Connections closed because their outgoing queue overflowed.",
            ),
            protocol_errors: m.counter_vec(
                "runcast_protocol_errors_total",
                "Error frames and error responses, by code.",
                "code",
                &ErrorCode::ALL.map(ErrorCode::as_str),
            ),
            closes: m.counter_vec(
                "runcast_closes_total",
                "WebSocket closes sent by the server, by close code.",
                "code",
                &close_codes.each_ref().map(String::as_str),
            ),
            tcp_connections: m.gauge(
                "runcast_tcp_connections",
                "Open TCP connections (over HTTP/2 one carries many WebSocket and SSE sessions).",
            ),
            refused_connections: m.counter(
                "runcast_refused_connections_total",
                "Connections refused because max_connections was reached.",
            ),
            tls_reloads: m.counter_vec(
                "runcast_tls_reloads_total",
                "Certificate file changes seen, by result: ok (now served) or error (refused; the previous certificate stays).",
                "result",
                &["ok", "error"],
            ),
            tls_handshake_failures: m.counter(
                "runcast_tls_handshake_failures_total",
                "TLS handshakes that failed (not TLS, no shared protocol or cipher, client refused the certificate).",
            ),
            timeouts: m.counter_vec(
                "runcast_timeouts_total",
                "Connections or requests cut off for being too slow, by stage (handshake, upgrade, request_body).",
                "stage",
                &["handshake", "upgrade", "request_body"],
            ),
            reconnect_hints: m.counter_vec(
                "runcast_reconnect_hints_total",
                "Clients asked to reconnect elsewhere (close 1001), by reason: shutdown, drain, rebalance.",
                "reason",
                &["shutdown", "drain", "rebalance"],
            ),
            refused_sessions: m.counter_vec(
                "runcast_refused_sessions_total",
                "WebSocket and SSE sessions refused by per-address limits, by reason (per_ip, rate).",
                "reason",
                &["per_ip", "rate"],
            ),
            auth_failures: m.counter_vec(
                "runcast_auth_failures_total",
                "Subscriber tokens refused, by reason (missing, malformed, unknown_key, bad_signature, algorithm, expired, not_yet_valid, audience, issuer).",
                "reason",
                &crate::auth::AuthErrorKind::ALL.map(|k| k.as_str()),
            ),
            registry: m.into_registry(),
        }
    }

    /// Brings the counters kept by the bus up to date.
    pub fn record_bus(&self, stats: runcast_bus::BusStats) {
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.bus_reconnects, stats.reconnects);
        catch_up(&self.bus_live_checks, stats.live_checks);
        catch_up(&self.bus_live_resyncs, stats.live_resyncs);
        catch_up(&self.bus_live_missed, stats.live_missed);
        catch_up(
            &self.bus_history_reads.with_label_values(&["sent"]),
            stats.history_reads,
        );
        catch_up(
            &self.bus_history_reads.with_label_values(&["joined"]),
            stats.history_reads_joined,
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        runcast_telemetry::metrics::render(&self.registry)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
