//! Optional TLS termination, for deployments without an ingress or load
//! balancer in front: rustls (with the ring provider) over the accepted TCP
//! connection, before HTTP.
//!
//! The certificate and key are PEM files, read again whenever their
//! contents change, so a renewed certificate (cert-manager rewriting a
//! mounted Secret, certbot replacing a file) takes effect for new
//! connections without a restart. A bad pair on reload is refused and the
//! previous one kept: a half-written file must not take the gateway down.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Where the certificate chain and private key live, and how often to look
/// for new ones.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are read again to pick up a new pair.
    pub reload_interval: Duration,
}

/// The current certificate, swapped in place by the reload task.
#[derive(Debug)]
struct Current {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A TLS acceptor whose certificate follows its files.
pub struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    /// The file contents the current certificate came from.
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("TLS {what} {}: {e}", path.display()))
}

/// Parses and checks a certificate chain and key: the key must be one the
/// provider can sign with, and must match the leaf certificate.
fn certified(
    cert_pem: &[u8],
    key_pem: &[u8],
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no CERTIFICATE block in the file",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "TLS certificate {} and key {} do not make a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })
}

impl Tls {
    /// Loads the pair, refusing a missing, malformed or mismatched one.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_pem, key_pem) = (read(&files.cert, "certificate")?, read(&files.key, "key")?);
        let key = certified(&cert_pem, &key_pem, &files, &provider)?;
        let current = Arc::new(Current {
            key: RwLock::new(Arc::new(key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // HTTP/2 first: a browser's SSE streams then share one connection
        // instead of hitting its six-per-origin HTTP/1.1 limit. WebSockets
        // work on either (RFC 8441 over HTTP/2).
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            files,
            provider,
            loaded: std::sync::Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Reads the files and, if they changed, swaps in the new pair. Returns
    /// whether a new certificate is now served; a bad new pair is an error
    /// and leaves the old one in place.
    pub fn reload(&self) -> Result<bool, String> {
        let cert_pem = read(&self.files.cert, "certificate")?;
        let key_pem = read(&self.files.key, "key")?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified(&cert_pem, &key_pem, &self.files, &self.provider)?;
        *self.current.key.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Polls the files every `reload_interval` for as long as the gateway
    /// lives, counting reloads in `runcast_tls_reloads_total{result}`.
    pub(crate) fn spawn_reloader(
        self: &Arc<Self>,
        metrics: Arc<crate::Metrics>,
    ) -> tokio::task::JoinHandle<()> {
        let tls = Arc::downgrade(self);
        let every = self.files.reload_interval.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                match tls.reload() {
                    Ok(false) => {}
                    Ok(true) => {
                        metrics.tls_reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics.tls_reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %e, "TLS reload refused; still serving the previous certificate");
                    }
                }
            }
        })
    }
}
