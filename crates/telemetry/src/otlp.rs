//! The `runcast` binary's logging and OTLP trace export.
//!
//! Tracing is off unless an OTLP endpoint is given (`--otlp-endpoint` or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`/`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//! The rest follows the OpenTelemetry SDK's environment variables: sampler
//! (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, default parent-based
//! always-on), service name (`OTEL_SERVICE_NAME`, default `runcast-<role>`),
//! resource attributes, batching (`OTEL_BSP_*`), headers and timeout.
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.

use std::{sync::Arc, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How this process exports traces.
#[derive(Debug, Clone, Default)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector endpoint (`http://host:4317`); `None` falls
    /// back to the `OTEL_*` variables, and without those tracing is off.
    pub endpoint: Option<String>,
    /// Parent-based trace-ID-ratio sampling (0.0–1.0); `None` leaves the
    /// sampler to `OTEL_TRACES_SAMPLER`.
    pub sample_ratio: Option<f64>,
    /// The service name unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
}

impl TraceConfig {
    /// The endpoint to export to, or `None` when tracing is off.
    pub fn resolved_endpoint(&self) -> Option<String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        self.endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    }
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is queued.
#[must_use = "dropping the guard without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Where spans go, for the startup log line and `doctor`.
    pub endpoint: Option<String>,
}

impl Telemetry {
    /// Exports every finished span still queued and stops the exporter, for
    /// at most 5 s (a collector that is down must not hold up shutdown).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks while it flushes, and the export itself runs on
        // this runtime: flush from a blocking thread so a worker stays free.
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        });
        match tokio::time::timeout(Duration::from_secs(6), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace exporter shutdown failed"),
            _ => tracing::warn!("trace exporter did not shut down within 5 s"),
        }
    }
}

/// Installs the global `tracing` subscriber: log lines to stderr filtered by
/// `RUST_LOG` (or `log_filter`) and, when tracing is configured, runcast's
/// spans to OTLP. Must be called inside a Tokio runtime.
pub fn init(log_filter: &str, trace: &TraceConfig) -> Result<Telemetry, String> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| log_filter.to_owned());
    // The log never formats runcast's trace spans: they would cost every
    // event an allocated span even when nothing exports them.
    let logs = EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{}=off", crate::TARGET)
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(logs);

    let endpoint = trace.resolved_endpoint();
    let provider = match &endpoint {
        Some(endpoint) => Some(provider(endpoint, trace)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("runcast"))
            .with_filter(Targets::new().with_target(crate::TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("installing the tracing subscriber: {e}"))?;
    crate::set_exporting(provider.is_some());
    if let Some(e) = &endpoint {
        tracing::info!(endpoint = %e, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry { provider, endpoint })
}

fn provider(endpoint: &str, trace: &TraceConfig) -> Result<SdkTracerProvider, String> {
    if let Ok(p) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        && !p.trim().is_empty()
        && p.trim() != "grpc"
    {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported: runcast exports OTLP over gRPC \
             only; point it at the collector's gRPC port (4317) and unset the variable"
        ));
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!(
            "OTLP endpoint {endpoint:?} must be a URL such as http://otel-collector:4317"
        ));
    }
    if endpoint.starts_with("https://") {
        return Err(format!(
            "OTLP endpoint {endpoint:?}: TLS to the collector is not built in; use a \
             collector sidecar or node agent on http://, as the docs describe"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime: tokio::runtime::Handle::current(),
    };
    let resource = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(trace.service_name.clone())
            .build()
    };
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource);
    if let Some(r) = trace.sample_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(format!("trace sample ratio {r} is outside 0.0..=1.0"));
        }
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            r,
        ))));
    }
    Ok(builder.build())
}

/// Runs exports on the application's Tokio runtime. The SDK's batch
/// processor exports from its own thread with a plain executor, but the
/// gRPC client needs a Tokio reactor, so each export is spawned onto the
/// runtime and the batch thread waits for it.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("export task failed: {e}")))?
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
