//! Client TLS: the one place that decides whom a runcast client trusts and
//! how it opens a connection to a gateway. [`HttpTarget`](crate::HttpTarget)
//! and the `runcast` commands (`tail`, `doctor`, `publish`) all connect
//! through here, so an `https://` or `wss://` URL behaves the same in each.
//!
//! rustls with the ring provider, as on the gateway's side: no OpenSSL. The
//! trusted roots are the system's (the OS store through `rustls-native-certs`,
//! which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`), or exactly the
//! certificates of a CA file for a private CA. A CA file *replaces* the
//! system roots rather than adding to them: it pins the gateway to the CA the
//! operator named, and works in images that ship no CA bundle at all.
//!
//! Failures come back as a [`ConnectError`] whose [`ConnectErrorKind`] says
//! whether retrying can help: an unreachable gateway may come back, an
//! untrusted certificate will not.
//!
//! ```no_run
//! # async fn connect() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use runcast_worker::{GatewayUrl, tls::Dialer};
//!
//! let url = GatewayUrl::parse("wss://progress.internal:8443/v1/ws")?;
//! let dialer = Dialer::new(url, Some(Path::new("/etc/runcast/ca.pem")))?;
//! match dialer.connect().await {
//!     // TCP and TLS are up: speak HTTP/1.1 or a WebSocket handshake on it.
//!     Ok(stream) => drop(stream),
//!     Err(e) if e.kind.is_transient() => eprintln!("try again later: {e}"),
//!     Err(e) => eprintln!("fix this first: {e}"),
//! }
//! # Ok(()) }
//! ```

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

pub use rustls::pki_types::{CertificateDer, pem::PemObject};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::GatewayUrl;

/// A client TLS configuration: the trusted roots, ring, TLS 1.2 and 1.3,
/// HTTP/1.1 (the gateway speaks nothing else, and WebSocket upgrades need it).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    trust: Trust,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("trust", &self.trust)
            .finish()
    }
}

/// Where the roots came from, to say what to change when a certificate is
/// not trusted.
#[derive(Debug, Clone)]
enum Trust {
    System { roots: usize },
    CaFile(PathBuf),
    Given,
}

/// A CA file or root set that cannot be used, with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

impl ClientTls {
    /// Trusts the system's roots. With none found every certificate is
    /// refused, and the refusal says why.
    pub fn system() -> Result<Self, TlsSetupError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        // Bundles carry the odd certificate webpki cannot use as an anchor;
        // skipping it is what every other client does too.
        let (added, _unusable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                errors = ?found.errors,
                "no trusted root certificates found on this system; TLS connections will be refused"
            );
        }
        Self::build(roots, Trust::System { roots: added })
    }

    /// Trusts exactly the certificates in a PEM file (a private CA).
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsSetupError> {
        let pem = std::fs::read(path).map_err(|e| {
            TlsSetupError(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                TlsSetupError(format!("the CA file {} is not PEM: {e}", path.display()))
            })?;
        let roots = roots(certs).map_err(|why| {
            TlsSetupError(format!(
                "the CA file {}: {why} (a PEM CA certificate, -----BEGIN CERTIFICATE-----, is expected)",
                path.display()
            ))
        })?;
        Self::build(roots, Trust::CaFile(path.to_owned()))
    }

    /// Trusts exactly these (DER) certificates.
    pub fn from_root_certs(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, TlsSetupError> {
        let roots = roots(certs.into_iter().collect()).map_err(TlsSetupError)?;
        Self::build(roots, Trust::Given)
    }

    /// What a client of `url` needs: the CA file's roots if one is given,
    /// else the system's for `https`/`wss`, else nothing. A CA file is read
    /// (and refused if unusable) even for a plain URL, so a mistake in it
    /// shows up before the day the URL changes to https.
    pub fn for_url(
        url: &GatewayUrl,
        ca_file: Option<&Path>,
    ) -> Result<Option<Self>, TlsSetupError> {
        match ca_file {
            Some(path) => Self::from_ca_file(path).map(Some),
            None if url.is_tls() => Self::system().map(Some),
            None => Ok(None),
        }
    }

    /// A configuration that refuses every certificate, for connectors that
    /// need one but only ever speak plain HTTP.
    pub(crate) fn trusting_nothing() -> Result<Self, TlsSetupError> {
        Self::build(RootCertStore::empty(), Trust::Given)
    }

    fn build(roots: RootCertStore, trust: Trust) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            trust,
        })
    }

    /// The rustls configuration, e.g. for a hyper connector.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// TLS over an open connection to `host` (a DNS name or an IP address,
    /// which the certificate must list).
    pub async fn handshake(
        &self,
        host: &str,
        port: u16,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            ConnectError::new(
                ConnectErrorKind::Handshake,
                format!("{host:?} is neither a DNS name nor an IP address a certificate can be checked against"),
            )
        })?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                self.explain(&e, host, port).unwrap_or_else(|| {
                    // The connection broke during the handshake (reset, EOF):
                    // a restarting server looks like this.
                    ConnectError::new(
                        ConnectErrorKind::Interrupted,
                        format!("TLS handshake with {host}:{port} broke off: {e}"),
                    )
                })
            })
    }

    /// If a rustls error is anywhere in `err`'s chain (as hyper and
    /// tokio-rustls wrap it), what it means for a connection to
    /// `host:port`; `None` for errors that are not about TLS.
    pub fn explain(
        &self,
        err: &(dyn std::error::Error + 'static),
        host: &str,
        port: u16,
    ) -> Option<ConnectError> {
        use rustls::{CertificateError as C, Error as E};
        let e = rustls_error(err)?;
        let at = format!("{host}:{port}");
        Some(match e {
            E::InvalidCertificate(c) => {
                let why = match c {
                    // BadSignature: the issuer's name matches a trusted CA's
                    // but its key does not, e.g. a CA made again under the
                    // same name. To the user that is the same: the wrong CA.
                    C::UnknownIssuer | C::BadSignature => self.unknown_issuer(),
                    C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                        "it is not valid for the name {host}; use a URL with a name the certificate lists (its subjectAltName), or reissue it for {host}"
                    ),
                    C::Expired | C::ExpiredContext { .. } => {
                        "it has expired; the server needs a renewed certificate".into()
                    }
                    C::NotValidYet | C::NotValidYetContext { .. } => {
                        "it is not valid yet; check this machine's clock".into()
                    }
                    other => format!("{other:?}"),
                };
                ConnectError::new(
                    ConnectErrorKind::Certificate,
                    format!("the TLS certificate of {at} is not trusted: {why}"),
                )
            }
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. } => ConnectError::new(
                ConnectErrorKind::Handshake,
                format!(
                    "{at} does not answer in TLS ({e}); if it serves plain HTTP, use an http:// or ws:// URL"
                ),
            ),
            E::AlertReceived(alert) => ConnectError::new(
                ConnectErrorKind::Handshake,
                format!("{at} refused the TLS handshake (alert {alert:?})"),
            ),
            other => ConnectError::new(
                ConnectErrorKind::Handshake,
                format!("TLS with {at} failed: {other}"),
            ),
        })
    }

    fn unknown_issuer(&self) -> String {
        match &self.trust {
            Trust::System { roots: 0 } => "this system has no trusted CA certificates (install ca-certificates or set SSL_CERT_FILE), and no CA file was given; pass the gateway's CA with --ca-file (RUNCAST_CA_FILE)".into(),
            Trust::System { .. } => "it is not signed by a CA this system trusts; for a private CA pass its certificate with --ca-file (RUNCAST_CA_FILE)".into(),
            Trust::CaFile(path) => format!(
                "it is not signed by the CA in {}; pass the CA that signed the gateway's certificate",
                path.display()
            ),
            Trust::Given => "it is not signed by any of the given root certificates".into(),
        }
    }
}

/// A root store of exactly `certs`; at least one is required.
fn roots(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, String> {
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} cannot be a trust anchor: {e}", i + 1))?;
    }
    Ok(roots)
}

/// The rustls error in a chain. `io::Error`s are looked into rather than
/// past: their `source()` skips the error they wrap, and hyper-rustls wraps
/// tokio-rustls's `io::Error` in another one.
fn rustls_error<'a>(mut err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(e) = err.downcast_ref::<rustls::Error>() {
            return Some(e);
        }
        err = match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => inner,
            None => err.source()?,
        };
    }
}

/// Whether trying again can help, as a small enum callers match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The host name did not resolve (a typo, or DNS not answering yet).
    Resolve,
    /// No connection (refused, timed out): the gateway may be restarting.
    Unreachable,
    /// Connected, but the connection broke off during the TLS handshake.
    Interrupted,
    /// The server's certificate is not trusted for this name: unknown CA,
    /// wrong name, expired. Retrying will not help; fix the CA or the URL.
    Certificate,
    /// TLS could not be agreed (plain HTTP on the port, a refused
    /// handshake). Retrying will not help.
    Handshake,
}

impl ConnectErrorKind {
    /// Whether the same attempt later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Resolve | Self::Unreachable | Self::Interrupted)
    }
}

/// A failed connection: its kind and a message that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    pub kind: ConnectErrorKind,
    pub message: String,
}

impl ConnectError {
    pub fn new(kind: ConnectErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Opens connections to one gateway: TCP, then TLS for `https`/`wss`.
#[derive(Debug, Clone)]
pub struct Dialer {
    url: GatewayUrl,
    tls: Option<ClientTls>,
}

impl Dialer {
    /// For `url`, trusting `ca_file` if given (see [`ClientTls::for_url`]).
    pub fn new(url: GatewayUrl, ca_file: Option<&Path>) -> Result<Self, TlsSetupError> {
        let tls = ClientTls::for_url(&url, ca_file)?;
        Ok(Self { url, tls })
    }

    pub fn url(&self) -> &GatewayUrl {
        &self.url
    }

    /// A new connection. No timeout of its own: callers bound the whole
    /// exchange they need it for.
    pub async fn connect(&self) -> Result<ClientStream, ConnectError> {
        let (host, port) = (self.url.host(), self.url.port());
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| {
                ConnectError::new(
                    ConnectErrorKind::Resolve,
                    format!("cannot resolve {host}: {e}"),
                )
            })?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    // Small frames (subscribe, pings) must not wait for Nagle.
                    let _ = tcp.set_nodelay(true);
                    return match (&self.tls, self.url.is_tls()) {
                        (Some(tls), true) => Ok(ClientStream::Tls(Box::new(
                            tls.handshake(host, port, tcp).await?,
                        ))),
                        _ => Ok(ClientStream::Plain(tcp)),
                    };
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => ConnectError::new(
                ConnectErrorKind::Unreachable,
                format!("cannot connect to {host}:{port} ({addr}): {e}"),
            ),
            None => ConnectError::new(
                ConnectErrorKind::Resolve,
                format!("{host} resolves to no address"),
            ),
        })
    }
}

/// A connection to a gateway, with or without TLS.
#[derive(Debug)]
pub enum ClientStream {
    Plain(TcpStream),
    // Boxed: a TLS session is a few kilobytes, a TcpStream a few words.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The negotiated TLS version (`TLSv1_3`), or `None` without TLS.
    pub fn tls_version(&self) -> Option<String> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s.get_ref().1.protocol_version().map(|v| format!("{v:?}")),
        }
    }
}

// Both variants are Unpin, so each call just forwards to the inner stream.
impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_ca_files_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("runcast-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = ClientTls::from_ca_file(&dir.join("missing.pem")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        std::fs::write(dir.join("empty.pem"), "no pem here\n").unwrap();
        let empty = ClientTls::from_ca_file(&dir.join("empty.pem")).unwrap_err();
        assert!(empty.to_string().contains("no certificate"), "{empty}");
        std::fs::write(
            dir.join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let broken = ClientTls::from_ca_file(&dir.join("broken.pem")).unwrap_err();
        assert!(broken.to_string().contains("broken.pem"), "{broken}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_unreachable_gateways_are_worth_retrying() {
        assert!(ConnectErrorKind::Unreachable.is_transient());
        assert!(ConnectErrorKind::Resolve.is_transient());
        assert!(ConnectErrorKind::Interrupted.is_transient());
        assert!(!ConnectErrorKind::Certificate.is_transient());
        assert!(!ConnectErrorKind::Handshake.is_transient());
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let tls = ClientTls::from_root_certs(Vec::new()).err();
        assert!(tls.is_some(), "an empty root set is refused");
        let system = ClientTls::system().unwrap();
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = system.explain(&wrapped, "h", 443).unwrap();
        assert_eq!(e.kind, ConnectErrorKind::Certificate);
        assert!(e.message.contains("h:443"), "{}", e.message);
        let twice = io::Error::other(wrapped);
        let e = system.explain(&twice, "h", 443).unwrap();
        assert_eq!(e.kind, ConnectErrorKind::Certificate);
        let plain = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert!(system.explain(&plain, "h", 443).is_none());
    }
}
