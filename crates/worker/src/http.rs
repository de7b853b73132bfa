//! Publishing through a gateway's HTTP API (`POST /v1/runs/<run>/events`),
//! over plain HTTP or HTTPS.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use runcast_core::{NewEvent, RunId};

use crate::{
    GatewayUrl, PublishError, PublishErrorKind, PublishTarget,
    tls::{CertificateDer, ClientTls, TlsSetupError},
};

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTP/1.1 client for one gateway. Requests time out after 10 s.
///
/// `https://` URLs trust the system's root certificates; for a gateway with
/// a certificate from a private CA, trust that CA instead:
///
/// ```no_run
/// # fn main() -> Result<(), runcast_worker::PublishError> {
/// use std::{path::Path, sync::Arc};
/// use runcast_worker::{HttpTarget, Publisher};
///
/// let target = HttpTarget::new("https://progress.internal:8443")?
///     .with_ca_file(Path::new("/etc/runcast/ca.pem"))?
///     .with_key("rk_...");
/// let run = Publisher::new(Arc::new(target), "nightly-scan-42")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpTarget {
    url: GatewayUrl,
    client: HttpsClient,
    /// Whom HTTPS trusts; also explains a refused certificate.
    tls: Option<ClientTls>,
    /// Sent as `X-Runcast-Key` when the gateway requires an API key.
    key: Option<String>,
    /// Attempts per publish: a lost answer or a gateway that is briefly away
    /// is retried with the same `Idempotency-Key`, so nothing is stored twice.
    attempts: u32,
    /// Makes each publish's idempotency key unique: this target's prefix
    /// and a counter.
    keys: std::sync::Arc<(String, std::sync::atomic::AtomicU64)>,
}

/// This process's prefix for idempotency keys: unique enough that two
/// publishers of one run do not share a key within the gateway's duplicate
/// window (2 minutes).
fn key_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // RandomState is seeded from the OS's randomness once per process.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

impl HttpTarget {
    /// A target for a gateway's base URL (`http(s)://host[:port][/prefix]`;
    /// `ws(s)://` URLs and ones ending in `/v1/ws` name the same gateway).
    pub fn new(base_url: &str) -> Result<Self, PublishError> {
        let url = GatewayUrl::parse(base_url)
            .map_err(|e| PublishError::new(PublishErrorKind::InvalidInput, e.to_string()))?;
        let tls = ClientTls::for_url(&url, None).map_err(setup_error)?;
        // A plain http:// gateway never uses TLS, but the connector type
        // wants a configuration: one that trusts nothing.
        let client = match &tls {
            Some(tls) => client(tls),
            None => client(&ClientTls::trusting_nothing().map_err(setup_error)?),
        };
        Ok(Self {
            client,
            url,
            tls,
            key: None,
            attempts: 3,
            keys: std::sync::Arc::new((key_prefix(), std::sync::atomic::AtomicU64::new(0))),
        })
    }

    /// How many times one publish is tried (at least 1; default 3) when the
    /// gateway is unreachable, answers 5xx, or the answer is lost. Retries
    /// carry the same `Idempotency-Key`, so a retried batch is stored once.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Publishes with this API key (`runcast publish-key` makes one).
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }

    /// Trusts exactly the CA certificates in this PEM file for HTTPS,
    /// instead of the system's roots (a gateway with a private CA).
    pub fn with_ca_file(self, path: &Path) -> Result<Self, PublishError> {
        Ok(self.with_tls(ClientTls::from_ca_file(path).map_err(setup_error)?))
    }

    /// Trusts exactly these root certificates for HTTPS.
    pub fn with_root_certs(
        self,
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, PublishError> {
        Ok(self.with_tls(ClientTls::from_root_certs(certs).map_err(setup_error)?))
    }

    /// Uses this TLS configuration for HTTPS.
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.client = client(&tls);
        self.tls = Some(tls);
        self
    }
}

impl HttpTarget {
    /// A failed request: a TLS problem retrying cannot fix, or a gateway
    /// that may come back.
    fn request_error(&self, e: &hyper_util::client::legacy::Error) -> PublishError {
        let base = self.url.http_base();
        let tls = self
            .tls
            .as_ref()
            .and_then(|tls| tls.explain(e, self.url.host(), self.url.port()));
        match tls {
            Some(c) if !c.kind.is_transient() => {
                PublishError::new(PublishErrorKind::Tls, c.message)
            }
            _ => {
                // hyper's own message is only "client error (Connect)"; the
                // reason is further down the chain.
                let mut why = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                PublishError::new(
                    PublishErrorKind::Unavailable,
                    format!("gateway {base} unreachable: {why}"),
                )
            }
        }
    }
}

fn setup_error(e: TlsSetupError) -> PublishError {
    PublishError::new(PublishErrorKind::InvalidInput, e.to_string())
}

/// One pooled client for plain and TLS URLs alike.
fn client(tls: &ClientTls) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    // The TLS layer on top needs https:// URIs let through.
    http.enforce_http(false);
    // hyper-rustls sets ALPN itself from the enabled HTTP versions and
    // refuses a configuration that already has it (ours offers http/1.1
    // for the WebSocket clients, which connect without hyper-rustls).
    let mut config = (*tls.config()).clone();
    config.alpn_protocols.clear();
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

#[derive(serde::Serialize)]
struct Wire<'a> {
    kind: &'a str,
    data: &'a serde_json::value::RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

#[async_trait::async_trait]
impl PublishTarget for HttpTarget {
    async fn publish(&self, run: &RunId, events: Vec<NewEvent>) -> Result<Vec<u64>, PublishError> {
        let wire: Vec<Wire> = events
            .iter()
            .map(|e| Wire {
                kind: e.kind.as_str(),
                data: &e.data,
                traceparent: e.traceparent.as_deref(),
                id: e.id.as_deref(),
            })
            .collect();
        let body = Bytes::from(serde_json::to_vec(&wire)?);
        let key = format!(
            "{}-{}",
            self.keys.0,
            self.keys
                .1
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut attempt = 1;
        loop {
            match self.attempt(run, body.clone(), &key).await {
                Err(e) if e.kind == PublishErrorKind::Unavailable && attempt < self.attempts => {
                    tracing::debug!(attempt, error = %e, "publish failed; retrying with the same idempotency key");
                    tokio::time::sleep(std::time::Duration::from_millis(
                        200 << (2 * (attempt - 1)).min(6),
                    ))
                    .await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

impl HttpTarget {
    /// One request of a publish.
    async fn attempt(&self, run: &RunId, body: Bytes, key: &str) -> Result<Vec<u64>, PublishError> {
        let base = self.url.http_base();
        let mut req = Request::post(format!("{base}/v1/runs/{run}/events"))
            .header("content-type", "application/json")
            .header("idempotency-key", key);
        if let Some(k) = &self.key {
            req = req.header("x-runcast-key", k.as_str());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| PublishError::new(PublishErrorKind::InvalidInput, e.to_string()))?;
        let unavailable = |e: String| PublishError::new(PublishErrorKind::Unavailable, e);
        let resp =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.client.request(req))
                .await
                .map_err(|_| unavailable(format!("gateway {base} did not answer within 10s")))?
                .map_err(|e| self.request_error(&e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("reading the gateway's answer: {e}")))?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status == StatusCode::OK {
            return serde_json::from_value::<Vec<u64>>(v["seqs"].clone()).map_err(|_| {
                // Something answered 200 that is not the publish API: a
                // page at a wrong path prefix. Retrying cannot change that.
                PublishError::new(
                    PublishErrorKind::Rejected,
                    format!(
                        "{base} answered 200 without seqs, so it is not a runcast gateway's publish API; check the URL and its path prefix: {}",
                        String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>()
                    ),
                )
            });
        }
        let kind = if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE {
            PublishErrorKind::Unavailable
        } else {
            PublishErrorKind::Rejected
        };
        let message = match (v["error"]["message"].as_str(), v["error"]["code"].as_str()) {
            (Some(m), Some(c)) => format!("gateway answered {status}: {m} ({c})"),
            _ if status == StatusCode::NOT_FOUND => format!(
                "{base} answered 404 Not Found without a runcast error: no gateway publish API at this URL; check its path prefix"
            ),
            _ => format!("{base} answered {status} without a runcast error (a proxy in between?)"),
        };
        Err(PublishError::new(kind, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_form_and_trust_setting_builds_a_target() {
        for url in [
            "http://127.0.0.1:8080",
            "https://h.example/runcast",
            "wss://h.example/v1/ws",
        ] {
            let t = HttpTarget::new(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let roots = t.clone().with_root_certs(Vec::new());
            assert_eq!(
                roots.err().map(|e| e.kind),
                Some(PublishErrorKind::InvalidInput),
                "an empty root set trusts nothing and is refused"
            );
            let missing = t.with_ca_file(Path::new("/nonexistent/ca.pem"));
            assert!(
                missing.is_err_and(|e| e.message.contains("/nonexistent/ca.pem")),
                "{url}"
            );
        }
        let bad = HttpTarget::new("ftp://h").err().map(|e| e.kind);
        assert_eq!(bad, Some(PublishErrorKind::InvalidInput));
    }
}
