//! The one reading of a gateway URL, shared by the HTTP publisher and every
//! `runcast` client command (`tail`, `doctor`, `publish`).
//!
//! People paste whatever their browser or ingress shows: `https://host`,
//! `wss://host/v1/ws`, `http://host:8080/`, `https://host/runcast` behind a
//! proxy that serves the gateway under a path. All of them name the same
//! thing, a gateway at a base URL, so they are parsed once into a
//! [`GatewayUrl`] that knows whether to speak TLS, where to connect and which
//! path prefix to put before `/v1/...`.

use hyper::Uri;

/// What the WebSocket endpoint is called under a gateway's base URL; a URL
/// that already ends with it means its base.
const WS_PATH: &str = "/v1/ws";

/// A gateway's base URL, from `http`, `https`, `ws` or `wss` URLs with or
/// without a path prefix and with or without the `/v1/ws` endpoint.
///
/// ```
/// use runcast_worker::GatewayUrl;
///
/// let url = GatewayUrl::parse("wss://progress.example.com/runcast/v1/ws").unwrap();
/// assert!(url.is_tls());
/// assert_eq!(url.http_base(), "https://progress.example.com/runcast");
/// assert_eq!(url.ws_url(), "wss://progress.example.com/runcast/v1/ws");
/// assert_eq!(url.port(), 443);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    tls: bool,
    /// As written (`host`, `host:8443`, `[::1]:8080`): the Host header and
    /// what is shown back to the user.
    authority: String,
    /// Without IPv6 brackets: what is resolved and checked against the
    /// server's certificate.
    host: String,
    port: u16,
    /// `""` or `/prefix`, never with a trailing slash.
    prefix: String,
}

/// A URL that cannot name a gateway, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gateway URL {url:?}: {why}")]
pub struct UrlError {
    url: String,
    why: String,
}

impl GatewayUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let fail = |why: &str| UrlError {
            url: text.to_owned(),
            why: why.to_owned(),
        };
        let uri: Uri = text
            .trim()
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| {
                fail(&format!(
                    "{e}; write it like https://host, http://host:8080 or wss://host/v1/ws"
                ))
            })?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http" | "ws") => false,
            Some("https" | "wss") => true,
            Some(other) => {
                return Err(fail(&format!(
                    "scheme {other}:// is not one a gateway speaks; use http, https, ws or wss"
                )));
            }
            None => {
                return Err(fail(
                    "it has no scheme; start it with http://, https://, ws:// or wss://",
                ));
            }
        };
        let authority = uri.authority().ok_or_else(|| fail("it names no host"))?;
        if authority.as_str().contains('@') {
            return Err(fail(
                "credentials in the URL are not sent; give a token with --token or a key with --key",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(fail("it names no host"));
        }
        // Read the port from the text: the parser drops one that does not
        // fit in 16 bits instead of refusing it.
        let after_host = authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, rest)| rest);
        let port = match after_host.rsplit_once(':') {
            Some((_, p)) => match p.parse::<u16>() {
                Ok(0) => return Err(fail("port 0 cannot be connected to")),
                Ok(p) => p,
                Err(_) => return Err(fail(&format!("port {p:?} is not a number from 1 to 65535"))),
            },
            None if tls => 443,
            None => 80,
        };
        if uri.query().is_some() {
            return Err(fail(
                "a query (?...) is not part of a gateway URL; give a token with --token",
            ));
        }
        let path = uri.path().trim_end_matches('/');
        let prefix = path.strip_suffix(WS_PATH).unwrap_or(path);
        Ok(Self {
            tls,
            authority: authority.as_str().to_owned(),
            host,
            port,
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// Whether connections speak TLS (`https`/`wss`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host name or IP address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host[:port]` as written: the value of the Host header.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path prefix the gateway is served under (`""` or `/prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A gateway path (`/v1/...`) under the prefix.
    pub fn path(&self, route: &str) -> String {
        format!("{}{route}", self.prefix)
    }

    /// `http(s)://authority/prefix`, for the HTTP API.
    pub fn http_base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.prefix)
    }

    /// `ws(s)://authority/prefix/v1/ws`, the WebSocket endpoint.
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{}{WS_PATH}", self.authority, self.prefix)
    }
}

impl std::fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.http_base())
    }
}

impl std::str::FromStr for GatewayUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> (bool, String, u16, String, String) {
        let u = GatewayUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        (
            u.is_tls(),
            u.host().to_owned(),
            u.port(),
            u.http_base(),
            u.ws_url(),
        )
    }

    #[test]
    fn every_scheme_with_or_without_the_endpoint_names_the_same_base() {
        let plain = (
            false,
            "127.0.0.1".to_owned(),
            8080,
            "http://127.0.0.1:8080".to_owned(),
            "ws://127.0.0.1:8080/v1/ws".to_owned(),
        );
        for text in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "ws://127.0.0.1:8080",
            "ws://127.0.0.1:8080/",
            "ws://127.0.0.1:8080/v1/ws",
            "WS://127.0.0.1:8080/v1/ws/",
            "http://127.0.0.1:8080/v1/ws",
            " http://127.0.0.1:8080 ",
        ] {
            assert_eq!(parts(text), plain, "{text}");
        }
        let tls = (
            true,
            "h.example".to_owned(),
            443,
            "https://h.example".to_owned(),
            "wss://h.example/v1/ws".to_owned(),
        );
        for text in [
            "https://h.example",
            "wss://h.example/",
            "wss://h.example/v1/ws",
            "https://h.example/v1/ws",
        ] {
            assert_eq!(parts(text), tls, "{text}");
        }
        assert_eq!(parts("ws://h").2, 80);
    }

    #[test]
    fn a_path_prefix_is_kept_before_every_route() {
        for text in [
            "https://h:8443/runcast",
            "https://h:8443/runcast/",
            "wss://h:8443/runcast/v1/ws",
        ] {
            let u = GatewayUrl::parse(text).unwrap();
            assert_eq!(u.prefix(), "/runcast", "{text}");
            assert_eq!(u.http_base(), "https://h:8443/runcast");
            assert_eq!(u.ws_url(), "wss://h:8443/runcast/v1/ws");
            assert_eq!(u.path("/healthz"), "/runcast/healthz");
            assert_eq!(u.authority(), "h:8443");
        }
        let nested = GatewayUrl::parse("http://h/a/b/v1/ws").unwrap();
        assert_eq!(nested.prefix(), "/a/b");
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets_only_where_names_are_checked() {
        let u = GatewayUrl::parse("wss://[::1]:9443").unwrap();
        assert_eq!(u.host(), "::1");
        assert_eq!(u.authority(), "[::1]:9443");
        assert_eq!(u.ws_url(), "wss://[::1]:9443/v1/ws");
    }

    #[test]
    fn urls_that_cannot_name_a_gateway_say_what_to_write() {
        for (text, says) in [
            ("127.0.0.1:8080", "no scheme"),
            ("ftp://h", "use http, https, ws or wss"),
            ("http://", "invalid"),
            ("http://u:p@h", "credentials"),
            ("http://h:0", "port 0"),
            ("http://h:99999", "1 to 65535"),
            ("http://h:", "1 to 65535"),
            ("http://h/?access_token=x", "--token"),
            ("not a url", "https://host"),
            ("", "https://host"),
        ] {
            let e = GatewayUrl::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text:?} was accepted"))
                .to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
