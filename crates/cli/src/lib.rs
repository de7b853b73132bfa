//! The `runcast` command line: `up` (gateway on the embedded bus, optionally
//! with demo jobs), `tail` (a resilient client), `publish` (one event over
//! HTTP) and `bench` (load generator and measurements).

mod args;
pub mod bench;
pub mod demo;
pub mod tail;

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
pub use args::{Cli, Command};
use runcast_bus::EmbeddedBus;
use runcast_core::EventKind;
use runcast_gateway::Gateway;

pub fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Command::Up(a) => up(a).await.map(|()| ExitCode::SUCCESS),
        Command::Tail(a) => tail::run(a).await,
        Command::Publish(a) => publish(a).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(a) => bench::run(a).await.map(|()| ExitCode::SUCCESS),
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

async fn up(a: args::UpArgs) -> anyhow::Result<()> {
    let retention = a.retention.to_retention();
    let bus = EmbeddedBus::new(retention);
    let sweeper = bus.spawn_sweeper(Duration::from_secs(5));
    let gw = Gateway::new(Arc::new(bus.clone()), a.gateway.to_config(), "embedded");
    let listener = bind(a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, demo = a.demo, "runcast is up: open http://{addr}/");
    let demo = a
        .demo
        .then(|| demo::spawn(Arc::new(bus.clone()), a.demo_jobs));
    let server = tokio::spawn(runcast_gateway::run(gw, listener, shutdown_signal()));
    let result = server.await.context("gateway task failed")?;
    if let Some(d) = demo {
        d.abort();
    }
    sweeper.abort();
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
    let p = runcast_worker::Publisher::http(&a.url, &a.run)?;
    let seq = p
        .batch(vec![runcast_core::NewEvent::new(kind, data)])
        .await?;
    println!("{}", seq[0]);
    Ok(())
}
