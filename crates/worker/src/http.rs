//! Publishing through a gateway's HTTP API (`POST /v1/runs/<run>/events`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use runcast_core::{NewEvent, RunId};

use crate::{PublishError, PublishErrorKind, PublishTarget};

/// A pooled HTTP/1.1 client for one gateway. Requests time out after 10 s.
#[derive(Clone)]
pub struct HttpTarget {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Sent as `X-Runcast-Key` when the gateway requires an API key.
    key: Option<String>,
}

impl HttpTarget {
    pub fn new(base_url: &str) -> Result<Self, PublishError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base.parse().map_err(|e| {
            PublishError::new(
                PublishErrorKind::InvalidInput,
                format!("bad gateway URL {base_url:?}: {e}"),
            )
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(PublishError::new(
                PublishErrorKind::InvalidInput,
                format!("gateway URL {base_url:?} must start with http://"),
            ));
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        Ok(Self {
            base,
            client: Client::builder(TokioExecutor::new()).build(conn),
            key: None,
        })
    }

    /// Publishes with this API key (`runcast publish-key` makes one).
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }
}

#[derive(serde::Serialize)]
struct Wire<'a> {
    kind: &'a str,
    data: &'a serde_json::value::RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
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
            })
            .collect();
        let body = serde_json::to_vec(&wire)?;
        let mut req = Request::post(format!("{}/v1/runs/{run}/events", self.base))
            .header("content-type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("x-runcast-key", k.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PublishError::new(PublishErrorKind::InvalidInput, e.to_string()))?;
        let unavailable = |e: String| PublishError::new(PublishErrorKind::Unavailable, e);
        let resp =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.client.request(req))
                .await
                .map_err(|_| {
                    unavailable(format!("gateway {} did not answer within 10s", self.base))
                })?
                .map_err(|e| unavailable(format!("gateway {} unreachable: {e}", self.base)))?;
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
                unavailable(format!(
                    "unexpected answer from gateway: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            });
        }
        let kind = if status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE {
            PublishErrorKind::Unavailable
        } else {
            PublishErrorKind::Rejected
        };
        Err(PublishError::new(
            kind,
            format!(
                "gateway answered {status}: {} ({})",
                v["error"]["message"].as_str().unwrap_or("no message"),
                v["error"]["code"].as_str().unwrap_or("no code")
            ),
        ))
    }
}
