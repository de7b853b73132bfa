use std::{path::PathBuf, time::Duration};

use crate::error::NatsError;

/// How to reach NATS. Every role (gateway, worker, CLI) builds one from its
/// `--nats*` flags.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Comma-separated server URLs, e.g. `nats://n1:4222,nats://n2:4222`.
    pub urls: String,
    /// Subject prefix: events go to `<prefix>.runs.<run>.<kind>`.
    pub prefix: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// An NKey seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// CA certificate to verify the servers with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Name shown in the servers' connection list.
    pub client_name: String,
    pub connect_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: "nats://127.0.0.1:4222".into(),
            prefix: runcast_core::subject::DEFAULT_PREFIX.into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls_ca: None,
            client_name: "runcast".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl NatsConfig {
    pub fn with_urls(urls: impl Into<String>) -> Self {
        Self {
            urls: urls.into(),
            ..Self::default()
        }
    }

    fn server_list(&self) -> Vec<String> {
        self.urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Connects to NATS. With `wait = false` the first connection must succeed
/// within `connect_timeout` (workers, CLI: fail fast with a clear error);
/// with `wait = true` the client keeps retrying in the background and this
/// returns at once (gateways: start, report not-ready, recover).
pub async fn connect(cfg: &NatsConfig, wait: bool) -> Result<async_nats::Client, NatsError> {
    connect_observed(cfg, wait, |_| {}).await
}

/// [`connect`], calling `on_event` with every connection event the client
/// reports (connects, disconnects, slow consumers, errors).
pub(crate) async fn connect_observed(
    cfg: &NatsConfig,
    wait: bool,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, NatsError> {
    let err = |reason: String| NatsError::Connect {
        urls: cfg.urls.clone(),
        reason,
    };
    let servers = cfg.server_list();
    if servers.is_empty() {
        return Err(err("no server URL given".into()));
    }
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.client_name)
        .connection_timeout(cfg.connect_timeout);
    let on_event = std::sync::Arc::new(on_event);
    opts = opts.event_callback(move |event| {
        let on_event = on_event.clone();
        async move { on_event(event) }
    });
    if wait {
        opts = opts.retry_on_initial_connect();
    }
    match (&cfg.user, &cfg.password) {
        (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
        (Some(_), None) | (None, Some(_)) => {
            return Err(err("user and password must be given together".into()));
        }
        (None, None) => {}
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.clone());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            err(format!(
                "cannot read credentials file {}: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(ca) = &cfg.tls_ca {
        if !ca.is_file() {
            return Err(err(format!("TLS CA file {} does not exist", ca.display())));
        }
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| err(format!("bad server URL {s:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let connecting = async_nats::connect_with_options(addrs, opts);
    let client = if wait {
        connecting.await
    } else {
        tokio::time::timeout(cfg.connect_timeout + Duration::from_secs(1), connecting)
            .await
            .map_err(|_| err(format!("no answer within {:?}", cfg.connect_timeout)))?
    };
    client.map_err(|e| err(e.to_string()))
}
