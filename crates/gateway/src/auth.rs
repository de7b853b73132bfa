//! Who may watch which runs: JWT bearer tokens whose claims list the run
//! IDs (exactly) and run ID prefixes a subscriber may see.
//!
//! Keys: an HS256 secret, RS256/ES256 public keys in PEM files, or a JWKS
//! file; several keys can be active at once (rotation), chosen by the
//! token's `kid`. Each key accepts only its own algorithm, so a token signed
//! with HS256 using an RSA public key as the secret (algorithm confusion)
//! and `alg: none` are refused. `exp` is required; `aud` and `iss` are
//! checked when configured.

use std::{collections::HashSet, path::Path, time::Duration};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header, errors::ErrorKind, jwk::JwkSet,
};
use runcast_core::RunId;
use serde::Deserialize;

/// Why a token was refused (the `reason` label of
/// `runcast_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthErrorKind {
    Missing,
    Malformed,
    UnknownKey,
    BadSignature,
    Algorithm,
    Expired,
    NotYetValid,
    Audience,
    Issuer,
}

impl AuthErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Algorithm => "algorithm",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Issuer => "issuer",
        }
    }

    pub const ALL: [AuthErrorKind; 9] = [
        Self::Missing,
        Self::Malformed,
        Self::UnknownKey,
        Self::BadSignature,
        Self::Algorithm,
        Self::Expired,
        Self::NotYetValid,
        Self::Audience,
        Self::Issuer,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub kind: AuthErrorKind,
    pub message: String,
}

fn err(kind: AuthErrorKind, message: impl Into<String>) -> AuthError {
    AuthError {
        kind,
        message: message.into(),
    }
}

/// One verification key.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// What a gateway accepts.
#[derive(Clone, Default)]
pub struct Auth {
    keys: Vec<Key>,
    audience: Option<String>,
    issuer: Option<String>,
    /// Without a token, a client may watch every run. Off unless asked for.
    pub allow_anonymous: bool,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
}

impl std::fmt::Debug for Auth {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| (&k.kid, k.alg))
                    .collect::<Vec<_>>(),
            )
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

/// The runs a client may watch, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: Option<String>,
    runs: HashSet<String>,
    prefixes: Vec<String>,
    /// Any run (anonymous access).
    all: bool,
    /// Seconds since the epoch; `None` for anonymous access.
    pub expires: Option<u64>,
}

impl Grant {
    pub fn anonymous() -> Self {
        Self {
            subject: None,
            runs: HashSet::new(),
            prefixes: Vec::new(),
            all: true,
            expires: None,
        }
    }

    /// Every run (anonymous access).
    pub fn allows_all(&self) -> bool {
        self.all
    }

    pub fn allows(&self, run: &RunId) -> bool {
        self.all
            || self.runs.contains(run.as_str())
            || self
                .prefixes
                .iter()
                .any(|p| run.as_str().starts_with(p.as_str()))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    /// Checked by jsonwebtoken, which also takes an array; RFC 7519 makes it
    /// one string, so that is all a configured issuer accepts.
    #[serde(default)]
    iss: Option<serde_json::Value>,
    #[serde(default)]
    runs: Vec<String>,
    #[serde(default)]
    run_prefixes: Vec<String>,
}

impl Auth {
    /// Every client may watch every run without a token: the library's
    /// default and `runcast up`'s; `runcast gateway` needs it said.
    pub fn anonymous() -> Self {
        Self {
            allow_anonymous: true,
            leeway: Duration::from_secs(5),
            ..Self::default()
        }
    }

    /// Nothing configured: no key, no anonymous access.
    pub fn is_configured(&self) -> bool {
        !self.keys.is_empty() || self.allow_anonymous
    }

    pub fn with_audience(mut self, aud: Option<String>) -> Self {
        self.audience = aud;
        self
    }

    pub fn with_issuer(mut self, iss: Option<String>) -> Self {
        self.issuer = iss;
        self
    }

    /// An HS256 shared secret (at least 32 bytes: shorter ones are
    /// guessable offline from any token).
    pub fn add_hs256_secret(&mut self, kid: Option<String>, secret: &[u8]) -> Result<(), String> {
        if secret.len() < 32 {
            return Err("an HS256 secret must be at least 32 bytes".into());
        }
        self.keys.push(Key {
            kid,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// An RS256 or ES256 public key in PEM; `kid` defaults to the file's
    /// name without extension.
    pub fn add_pem_file(&mut self, kid: Option<String>, path: &Path) -> Result<(), String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let kid = kid.or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()));
        let (alg, key) = match DecodingKey::from_rsa_pem(&pem) {
            Ok(k) => (Algorithm::RS256, k),
            Err(_) => match DecodingKey::from_ec_pem(&pem) {
                Ok(k) => (Algorithm::ES256, k),
                Err(e) => {
                    return Err(format!(
                        "{}: not an RSA or EC public key in PEM: {e}",
                        path.display()
                    ));
                }
            },
        };
        self.keys.push(Key { kid, alg, key });
        Ok(())
    }

    /// Every key of a JWKS file (RS256, ES256 or HS256 by the key's type
    /// and `alg`). Keys without a `kid` are refused: rotation needs them.
    pub fn add_jwks_file(&mut self, path: &Path) -> Result<usize, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| format!("{}: a key without \"kid\"", path.display()))?;
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("{}: key {kid}: {e}", path.display()))?;
            let alg = match jwk.common.key_algorithm.map(|a| a.to_string()).as_deref() {
                Some("RS256") => Algorithm::RS256,
                Some("ES256") => Algorithm::ES256,
                Some("HS256") => Algorithm::HS256,
                Some(other) => {
                    return Err(format!(
                        "{}: key {kid}: algorithm {other} is not supported (RS256, ES256, HS256)",
                        path.display()
                    ));
                }
                None => match key.family() {
                    jsonwebtoken::AlgorithmFamily::Rsa => Algorithm::RS256,
                    jsonwebtoken::AlgorithmFamily::Ec => Algorithm::ES256,
                    jsonwebtoken::AlgorithmFamily::Hmac => Algorithm::HS256,
                    _ => {
                        return Err(format!(
                            "{}: key {kid}: unsupported key type",
                            path.display()
                        ));
                    }
                },
            };
            self.keys.push(Key {
                kid: Some(kid),
                alg,
                key,
            });
        }
        Ok(set.keys.len())
    }

    /// Checks a bearer token; `None` is anonymous access if allowed.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return if self.allow_anonymous {
                Ok(Grant::anonymous())
            } else {
                Err(err(AuthErrorKind::Missing, "a bearer token is required"))
            };
        };
        let header = decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => err(
                AuthErrorKind::Algorithm,
                "the token's algorithm is not accepted",
            ),
            _ => err(AuthErrorKind::Malformed, format!("not a JWT: {e}")),
        })?;
        // RFC 7515 §4.1.11: a token that says an extension is critical must
        // be refused by a recipient that does not understand it, and this
        // one understands none.
        if header.crit.is_some() {
            return Err(err(
                AuthErrorKind::Malformed,
                "the token's header lists critical extensions (crit), which this gateway does not support",
            ));
        }
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => self.keys.iter().filter(|k| k.alg == header.alg).collect(),
        };
        if candidates.is_empty() {
            return Err(match &header.kid {
                Some(kid) => err(
                    AuthErrorKind::UnknownKey,
                    format!("no key with kid {kid:?}"),
                ),
                None => err(
                    AuthErrorKind::Algorithm,
                    format!("no key accepts {:?} tokens", header.alg),
                ),
            });
        }
        let mut last = None;
        for key in &candidates {
            // Only the key's own algorithm: an HS256 token can never be
            // checked against an RSA key's bytes.
            let mut v = Validation::new(key.alg);
            v.leeway = self.leeway.as_secs();
            v.validate_nbf = true;
            // A configured audience or issuer must be present in the token,
            // not only match when present: jsonwebtoken checks `aud` and
            // `iss` only when the claim is there unless it is required.
            let mut required = vec!["exp"];
            match &self.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            match decode::<Claims>(token, &key.key, &v) {
                Ok(data) => {
                    let c = data.claims;
                    if self.issuer.is_some() && !matches!(c.iss, Some(serde_json::Value::String(_)))
                    {
                        return Err(err(
                            AuthErrorKind::Issuer,
                            "the token's \"iss\" must be a single string",
                        ));
                    }
                    return Ok(Grant {
                        subject: c.sub,
                        runs: c.runs.into_iter().collect(),
                        prefixes: c.run_prefixes,
                        all: false,
                        expires: Some(c.exp),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        // `candidates` is not empty, so some key refused the token.
        let Some(e) = last else {
            return Err(err(AuthErrorKind::UnknownKey, "no key accepts this token"));
        };
        Err(match e.kind() {
            ErrorKind::ExpiredSignature => err(AuthErrorKind::Expired, "the token has expired"),
            ErrorKind::ImmatureSignature => err(
                AuthErrorKind::NotYetValid,
                "the token is not valid yet (nbf)",
            ),
            ErrorKind::InvalidAudience => {
                err(AuthErrorKind::Audience, "the token is for another audience")
            }
            ErrorKind::InvalidIssuer => {
                err(AuthErrorKind::Issuer, "the token is from another issuer")
            }
            ErrorKind::InvalidAlgorithm => err(
                AuthErrorKind::Algorithm,
                "the token's algorithm does not match its key",
            ),
            ErrorKind::InvalidSignature => err(
                AuthErrorKind::BadSignature,
                "the token's signature is invalid",
            ),
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => err(
                AuthErrorKind::Audience,
                "the token has no \"aud\" claim; this gateway requires one (--auth-audience)",
            ),
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => err(
                AuthErrorKind::Issuer,
                "the token has no \"iss\" claim; this gateway requires one (--auth-issuer)",
            ),
            ErrorKind::MissingRequiredClaim(c) => err(
                AuthErrorKind::Malformed,
                format!("the token has no {c:?} claim"),
            ),
            _ => err(
                AuthErrorKind::Malformed,
                format!("the token is not acceptable: {e}"),
            ),
        })
    }
}
