//! The `runcast` command line: `up` (gateway on the embedded bus, optionally
//! with demo jobs), `tail` (a resilient client), `publish` (one event over
//! HTTP) and `bench` (load generator and measurements).

/// `eprintln!` that never panics: a user who pipes stderr into a
/// program that exits (`runcast tail r 2>&1 | head`) must not turn a
/// message into a crash (exit 101).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
pub mod bench;
mod connect;
pub mod demo;
mod doctor;
mod metrics_server;
pub mod tail;

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
pub use args::{Cli, Command};
use runcast_bus::EmbeddedBus;
use runcast_core::EventKind;
use runcast_gateway::Gateway;

/// Logging to stderr and, when configured, trace export. The service name
/// defaults to `runcast-<role>` (`up` and `gateway` are both gateways).
pub fn init_telemetry(cli: &Cli) -> Result<runcast_telemetry::otlp::Telemetry, String> {
    let role = match cli.cmd {
        Command::Up(_) | Command::Gateway(_) => "gateway",
        Command::Worker(_) => "worker",
        Command::Tail(_) => "tail",
        Command::Publish(_) => "publish",
        Command::Bench(_) => "bench",
        Command::Doctor(_) => "doctor",
        Command::Operator(_) => "operator",
        Command::Bridge(_) => "bridge",
        Command::Crdgen => "crdgen",
        Command::PublishKey(_) => "publish-key",
    };
    let trace = runcast_telemetry::otlp::TraceConfig {
        endpoint: cli.trace.otlp_endpoint.clone(),
        sample_ratio: cli.trace.trace_sample_ratio,
        service_name: format!("runcast-{role}"),
    };
    runcast_telemetry::otlp::init(&cli.log, &trace)
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Command::Up(a) => up(a).await.map(|()| ExitCode::SUCCESS),
        Command::Gateway(a) => gateway(a).await.map(|()| ExitCode::SUCCESS),
        Command::Worker(a) => worker(a).await.map(|()| ExitCode::SUCCESS),
        Command::Tail(a) => tail::run(a).await,
        Command::Publish(a) => publish(a).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(a) => bench::run(a).await.map(|()| ExitCode::SUCCESS),
        Command::Doctor(a) => doctor::run(a).await,
        Command::Operator(a) => operator(a).await.map(|()| ExitCode::SUCCESS),
        Command::Bridge(args::BridgeCommand::Redis(a)) => {
            bridge_redis(a).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Crdgen => {
            print!("{}", runcast_operator::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::PublishKey(a) => {
            let (key, entry) = runcast_gateway::publish_keys::generate(&a.name, &a.prefixes)
                .map_err(anyhow::Error::msg)?;
            println!("key:   {key}");
            println!("entry: {entry}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Binds with a deep accept backlog: reconnect storms arrive all at once.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The gateway's configuration; anonymous watching and open publishing are
/// said out loud in the log.
fn gateway_config(
    g: &args::GatewayArgs,
    anonymous_by_default: bool,
) -> anyhow::Result<runcast_gateway::Config> {
    let config = g
        .to_config(anonymous_by_default)
        .map_err(anyhow::Error::msg)?;
    if config.auth.allow_anonymous {
        tracing::warn!(
            "anonymous access: anyone who can reach this gateway can watch every run (configure \
             --auth-hs256-secret, --auth-key or --auth-jwks to require tokens)"
        );
    }
    if config.publish_keys.is_open() {
        tracing::warn!(
            "open publishing: anyone who can reach this gateway's HTTP API can publish to any run \
             (configure --publish-key to require API keys)"
        );
    } else if g.publish_key.iter().all(|k| k.is_empty()) {
        tracing::info!(
            "the HTTP publish API is off: no --publish-key configured (workers publish over NATS)"
        );
    }
    Ok(config)
}

async fn up(a: args::UpArgs) -> anyhow::Result<()> {
    let config = gateway_config(&a.gateway, true)?;
    let (bus, source, helper): (Arc<dyn runcast_bus::Bus>, _, _) = match &a.nats.url {
        Some(url) => {
            let (bus, setup) = start_nats(&a.nats, url, &a.retention, "runcast-up").await?;
            (Arc::new(bus), "nats", setup)
        }
        None => {
            let bus = EmbeddedBus::new(a.retention.to_retention());
            let sweeper = bus.spawn_sweeper(Duration::from_secs(5));
            (Arc::new(bus), "embedded", sweeper)
        }
    };
    let demo = a.demo.then_some(a.demo_jobs);
    serve(a.listen, config, bus, source, demo, vec![helper]).await
}

async fn gateway(a: args::GatewayRoleArgs) -> anyhow::Result<()> {
    let Some(url) = &a.nats.url else {
        anyhow::bail!(
            "runcast gateway needs --nats (or RUNCAST_NATS_URL); for a single process without NATS use `runcast up`"
        );
    };
    let config = gateway_config(&a.gateway, false)?;
    let (bus, setup) = start_nats(&a.nats, url, &a.retention, "runcast-gateway").await?;
    let bus: Arc<dyn runcast_bus::Bus> = Arc::new(bus);
    serve(a.listen, config, bus, "nats", None, vec![setup]).await
}

async fn operator(a: args::OperatorArgs) -> anyhow::Result<()> {
    // The leader renews every third of it: a zero renews in a busy loop,
    // and the Lease counts whole seconds.
    anyhow::ensure!(
        a.lease_duration >= std::time::Duration::from_secs(1),
        "--lease-duration (RUNCAST_LEASE_DURATION) must be at least 1s, not {:?}",
        a.lease_duration
    );
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API: run in a pod with a service account, or with a kubeconfig")?;
    let metrics = Arc::new(runcast_operator::metrics::OperatorMetrics::new());
    let listener = bind(a.metrics_listen)
        .with_context(|| format!("cannot serve metrics on {}", a.metrics_listen))?;
    let served = {
        let metrics = metrics.clone();
        tokio::spawn(metrics_server::serve(
            listener,
            Arc::new(move || metrics.render()),
        ))
    };
    let identity = a.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| format!("runcast-operator-{}", std::process::id()))
    });
    let settings = runcast_operator::controller::Settings {
        namespace: a.namespace,
        lease_namespace: a.lease_namespace,
        lease_name: a.lease_name,
        lease_create: a.lease_create,
        identity,
        lease_duration: a.lease_duration,
        gateway_port: a.gateway_port,
    };
    let result =
        runcast_operator::controller::run(client, settings, metrics, shutdown_signal()).await;
    served.abort();
    result.map_err(anyhow::Error::msg)
}

async fn worker(a: args::WorkerArgs) -> anyhow::Result<()> {
    let Some(url) = &a.nats.url else {
        anyhow::bail!("runcast worker needs --nats (or RUNCAST_NATS_URL)");
    };
    // Publish only: a worker pod creates or checks the events stream (its
    // events need it) and nothing else. Run state is folded by the gateways;
    // jobs start once NATS and the stream answer, and until then the log
    // says why.
    let (cfg, stream) = (
        a.nats.config(url, "runcast-worker"),
        a.nats.stream(&a.retention),
    );
    let connecting = runcast_nats::NatsTarget::connect(&cfg, &stream);
    let target = tokio::select! {
        target = connecting => target?,
        () = shutdown_signal() => return Ok(()),
    };
    // Several workers share one NATS: each names its runs after itself.
    let prefix = format!("w{}-", std::process::id());
    let metrics = Arc::new(runcast_worker::PublishMetrics::new());
    let listener = bind(a.metrics_listen)
        .with_context(|| format!("cannot serve metrics on {}", a.metrics_listen))?;
    let metrics_addr = listener.local_addr()?;
    let served = {
        let metrics = metrics.clone();
        tokio::spawn(metrics_server::serve(
            listener,
            Arc::new(move || metrics.render()),
        ))
    };
    let target = runcast_worker::Metered::new(target, metrics);
    let jobs = demo::spawn(Arc::new(target), a.jobs, prefix);
    tracing::info!(jobs = a.jobs, metrics = %format!("http://{metrics_addr}/metrics"), "worker publishing demo jobs to NATS");
    shutdown_signal().await;
    jobs.abort();
    served.abort();
    Ok(())
}

async fn bridge_redis(a: args::RedisBridgeArgs) -> anyhow::Result<()> {
    use runcast_bridge::mapping::{KindFrom, Mapping, RunFrom};
    let redis: runcast_bridge::resp::RedisUrl = a
        .redis
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--redis: {e}"))?;
    let run = match (&a.run, a.run_from_channel) {
        (Some(r), _) => RunFrom::Fixed(runcast_core::RunId::parse(r).context("--run")?),
        (None, Some(sep)) => RunFrom::ChannelSuffix(sep),
        (None, None) => RunFrom::Pointer(pointer(&a.run_pointer, "--run-pointer")?),
    };
    let kind = match &a.kind_pointer {
        Some(p) => KindFrom::Pointer(pointer(p, "--kind-pointer")?),
        None => KindFrom::Fixed(EventKind::parse(&a.kind).context("--kind")?),
    };
    let mapping = Mapping {
        run,
        kind,
        data: a
            .data_pointer
            .as_deref()
            .map(|p| pointer(p, "--data-pointer"))
            .transpose()?,
        id: a
            .id_pointer
            .as_deref()
            .map(|p| pointer(p, "--id-pointer"))
            .transpose()?,
    };
    anyhow::ensure!(
        a.start == "$" || a.start == "0",
        "--start must be $ (new entries) or 0 (the whole stream), not {:?}",
        a.start
    );
    let consumer = a.consumer.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| format!("runcast-bridge-{}", std::process::id()))
    });
    let config = runcast_bridge::Config {
        redis,
        sources: runcast_bridge::Sources {
            channels: a.channels.clone(),
            patterns: a.patterns.clone(),
            streams: a.streams.clone(),
        },
        mapping,
        stream: runcast_bridge::StreamSettings {
            group: a.group.clone(),
            consumer,
            start: a.start.clone(),
            field: a.field.clone(),
            claim_idle: a.claim_idle,
            batch: 100,
        },
        max_message_bytes: a.max_message_bytes,
    };
    let target: Arc<dyn runcast_worker::PublishTarget> = match (&a.gateway, &a.nats.url) {
        (Some(url), _) => {
            let mut t = runcast_worker::HttpTarget::new(url)?;
            if let Some(ca) = &a.tls.ca_file {
                t = t.with_ca_file(ca).context("--ca-file")?;
            }
            if let Some(k) = &a.publisher.key {
                t = t.with_key(k);
            }
            Arc::new(t)
        }
        (None, Some(url)) => {
            let (cfg, stream) = (
                a.nats.config(url, "runcast-bridge"),
                a.nats.stream(&a.retention),
            );
            let connecting = runcast_nats::NatsTarget::connect(&cfg, &stream);
            tokio::select! {
                target = connecting => Arc::new(target?),
                () = shutdown_signal() => return Ok(()),
            }
        }
        (None, None) => anyhow::bail!(
            "runcast bridge redis publishes to NATS (--nats, RUNCAST_NATS_URL) or through a gateway (--gateway, RUNCAST_HTTP_URL): give one"
        ),
    };
    let bridge = Arc::new(runcast_bridge::Bridge::new(config, target).map_err(anyhow::Error::msg)?);
    let listener = bind(a.metrics_listen)
        .with_context(|| format!("cannot serve metrics on {}", a.metrics_listen))?;
    let metrics_addr = listener.local_addr()?;
    let served = {
        let (metrics, health) = (bridge.metrics.clone(), bridge.health.clone());
        tokio::spawn(metrics_server::serve_with(
            listener,
            Arc::new(move || metrics.render()),
            Arc::new(move || health.readiness()),
        ))
    };
    tracing::info!(redis = %a.redis.split('@').next_back().unwrap_or(""), metrics = %format!("http://{metrics_addr}/metrics"), "bridging Redis into runcast");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(bridge.run(stopped));
    shutdown_signal().await;
    let _ = stop.send(true);
    let _ = running.await;
    served.abort();
    Ok(())
}

/// A JSON pointer (RFC 6901): empty (the whole document) or starting with `/`.
fn pointer(p: &str, flag: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        p.is_empty() || p.starts_with('/'),
        "{flag} is a JSON pointer such as /runId or /job/id, not {p:?}"
    );
    Ok(p.to_owned())
}

async fn start_nats(
    n: &args::NatsArgs,
    url: &str,
    r: &args::RetentionArgs,
    name: &str,
) -> anyhow::Result<(runcast_nats::NatsBus, tokio::task::JoinHandle<()>)> {
    Ok(runcast_nats::NatsBus::start(&n.config(url, name), n.stream(r)).await?)
}

/// Serves a gateway on `bus` until SIGTERM/Ctrl-C, with optional demo jobs;
/// `helpers` are background tasks (sweeper, NATS setup) stopped at the end.
async fn serve(
    listen: SocketAddr,
    config: runcast_gateway::Config,
    bus: Arc<dyn runcast_bus::Bus>,
    source: &str,
    demo_jobs: Option<usize>,
    helpers: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let gw = Gateway::new(bus.clone(), config, source);
    let listener = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let scheme = if gw.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, bus = source, demo = demo_jobs.is_some(), "runcast is up: open {scheme}://{addr}/");
    let demo =
        demo_jobs.map(|n| demo::spawn(Arc::new(runcast_worker::BusTarget(bus)), n, String::new()));
    let result = tokio::spawn(runcast_gateway::run(gw, listener, shutdown_signal()))
        .await
        .context("gateway task failed")?;
    for h in demo.into_iter().chain(helpers) {
        h.abort();
    }
    result.context("gateway failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C: the one place shutdown starts.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

async fn publish(a: args::PublishArgs) -> anyhow::Result<()> {
    let kind = EventKind::parse(&a.kind)?;
    let data: Box<serde_json::value::RawValue> = serde_json::from_str(&a.data)
        .with_context(|| format!("--data is not valid JSON: {}", a.data))?;
    let mut target = runcast_worker::HttpTarget::new(&a.url)?;
    if let Some(ca) = &a.tls.ca_file {
        target = target.with_ca_file(ca).context("--ca-file")?;
    }
    if let Some(k) = &a.publisher.key {
        target = target.with_key(k);
    }
    let p = runcast_worker::Publisher::new(Arc::new(target), &a.run)?;
    let seq = p
        .batch(vec![runcast_core::NewEvent::new(kind, data)])
        .await?;
    println!("{}", seq[0]);
    Ok(())
}
