//! How the CLI's clients open a WebSocket to a gateway (`tail`, `doctor`),
//! and what each way of failing means: whether a retry can help, and if not,
//! what to change. Connections (TCP, TLS, whom to trust) come from the
//! worker SDK's [`Dialer`], the same one `publish` uses.

use std::{path::Path, time::Duration};

use anyhow::Context;
use hyper::header::HeaderValue;
use runcast_worker::{
    GatewayUrl,
    tls::{ClientStream, ConnectError, Dialer},
};
use tokio_tungstenite::tungstenite::{
    Error as WsError, client::IntoClientRequest, error::ProtocolError,
};

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<ClientStream>;

/// The `--url` and `--ca-file` of a client command, read once: a bad URL or
/// CA file is an error before anything is sent.
pub(crate) fn dialer(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Dialer> {
    let url = GatewayUrl::parse(url).context("--url")?;
    Dialer::new(url, ca_file).context("--ca-file")
}

/// `Authorization: Bearer <token>`, checked once.
pub(crate) fn bearer(token: Option<&str>) -> anyhow::Result<Option<HeaderValue>> {
    token
        .map(|t| {
            HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| anyhow::anyhow!("--token has characters a header cannot carry"))
        })
        .transpose()
}

/// Why a WebSocket could not be opened.
#[derive(Debug)]
pub(crate) enum UpgradeError {
    /// No connection: TCP or TLS failed.
    Connect(ConnectError),
    /// An HTTP answer instead of `101 Switching Protocols`.
    Answered {
        status: u16,
        location: Option<String>,
    },
    /// The handshake broke off.
    Broken(WsError),
    /// Nothing came back in time.
    TimedOut(Duration),
}

impl UpgradeError {
    /// Whether the same attempt later may succeed: a gateway that is down,
    /// restarting, overloaded or draining. A page, a missing route, a refused
    /// token or an untrusted certificate stay as they are.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Connect(e) => e.kind.is_transient(),
            Self::Answered { status, .. } => matches!(status, 408 | 429 | 500..=599),
            // An answer that is not HTTP: a TLS port spoken to in plain
            // text answers with a TLS alert, every time.
            Self::Broken(WsError::Url(_) | WsError::Protocol(ProtocolError::HttparseError(_))) => {
                false
            }
            Self::Broken(_) | Self::TimedOut(_) => true,
        }
    }

    /// What happened at `url`, and for a permanent failure what to do.
    pub(crate) fn explain(&self, url: &GatewayUrl) -> String {
        let ws = url.ws_url();
        match self {
            Self::Connect(e) => e.message.clone(),
            Self::Answered { status, .. } if matches!(status, 401 | 403) => format!(
                "{ws} refused the connection ({status}): give a valid token with --token or RUNCAST_TOKEN"
            ),
            Self::Answered { status: 404, .. } => format!(
                "{ws} answered 404 Not Found: no runcast WebSocket endpoint at this path; check --url and its path prefix (a gateway a proxy serves under /runcast is https://host/runcast)"
            ),
            Self::Answered {
                status,
                location: Some(to),
            } if (300..400).contains(status) => {
                format!("{ws} answered {status}, a redirect to {to}: give that URL with --url")
            }
            Self::Answered { status, .. } if (200..300).contains(status) => format!(
                "{ws} answered {status} instead of 101 Switching Protocols: a page, not a WebSocket. Check --url and its path prefix; if they are right, a proxy in between drops the Upgrade and Connection headers (`runcast doctor --url {}` checks every hop)",
                url.http_base()
            ),
            Self::Answered { status, .. } if self.is_transient() => {
                format!(
                    "{ws} answered {status} (the gateway or a proxy in front of it cannot serve yet)"
                )
            }
            Self::Answered { status, .. } => format!(
                "{ws} answered {status} to the WebSocket upgrade; check --url and any proxy in between"
            ),
            Self::Broken(WsError::Url(e)) => format!("{ws} is not a usable WebSocket URL: {e}"),
            Self::Broken(WsError::Protocol(ProtocolError::HttparseError(e))) => format!(
                "{ws} did not answer in HTTP ({e}); if the gateway serves TLS (--tls-cert, or a TLS proxy in front), use a wss:// or https:// URL"
            ),
            Self::Broken(e) => format!("WebSocket handshake with {ws} broke off: {e}"),
            Self::TimedOut(d) => format!("no answer from {ws} within {d:?}"),
        }
    }
}

/// Connects (TLS included) and upgrades to a WebSocket at the gateway's
/// `/v1/ws`, all within `within`.
pub(crate) async fn websocket(
    dialer: &Dialer,
    authorization: Option<&HeaderValue>,
    within: Duration,
) -> Result<Ws, UpgradeError> {
    let open = async {
        let mut req = dialer
            .url()
            .ws_url()
            .into_client_request()
            .map_err(UpgradeError::Broken)?;
        if let Some(v) = authorization {
            req.headers_mut().insert("authorization", v.clone());
        }
        let stream = dialer.connect().await.map_err(UpgradeError::Connect)?;
        match tokio_tungstenite::client_async(req, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => Err(UpgradeError::Answered {
                status: resp.status().as_u16(),
                location: resp
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_owned),
            }),
            Err(e) => Err(UpgradeError::Broken(e)),
        }
    };
    tokio::time::timeout(within, open)
        .await
        .unwrap_or(Err(UpgradeError::TimedOut(within)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_can_change_are_retried() {
        let answered = |status| UpgradeError::Answered {
            status,
            location: None,
        };
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(answered(status).is_transient(), "{status}");
        }
        for status in [200, 204, 301, 400, 401, 403, 404, 426] {
            assert!(!answered(status).is_transient(), "{status}");
        }
        assert!(UpgradeError::TimedOut(Duration::from_secs(1)).is_transient());
    }

    #[test]
    fn permanent_answers_say_what_to_change() {
        let url = GatewayUrl::parse("https://h/runcast").unwrap();
        let page = UpgradeError::Answered {
            status: 200,
            location: None,
        }
        .explain(&url);
        assert!(
            page.contains("path prefix") && page.contains("Upgrade"),
            "{page}"
        );
        let moved = UpgradeError::Answered {
            status: 308,
            location: Some("https://elsewhere/".into()),
        }
        .explain(&url);
        assert!(moved.contains("https://elsewhere/"), "{moved}");
        let token = UpgradeError::Answered {
            status: 401,
            location: None,
        }
        .explain(&url);
        assert!(token.contains("--token"), "{token}");
    }
}
