//! Who may publish through the HTTP API: API keys, each scoped to run ID
//! prefixes. The gateway keeps only each key's SHA-256, never the key, and
//! compares digests in constant time against every configured key.
//!
//! A key entry is `name:sha256hex[:prefix|prefix...]`; no prefix means any
//! run. `runcast publish-key NAME [PREFIX...]` makes a key and its entry.

use runcast_core::{ErrorCode, ProtocolError, RunId};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone)]
struct Entry {
    name: String,
    digest: [u8; 32],
    prefixes: Vec<String>,
}

/// The configured keys. Without any, publishing is open only if
/// `open_without_keys` (the library default, for tests and embedding;
/// `runcast gateway` turns it off unless `--allow-anonymous-publish`).
#[derive(Clone)]
pub struct PublishKeys {
    entries: Vec<Entry>,
    open_without_keys: bool,
}

impl Default for PublishKeys {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            open_without_keys: true,
        }
    }
}

impl std::fmt::Debug for PublishKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.name))
            .finish()
    }
}

/// The hex SHA-256 of a key, as a key entry stores it.
pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random key (32 bytes from the OS, hex) and its entry.
pub fn generate(name: &str, prefixes: &[String]) -> Result<(String, String), String> {
    if name.is_empty() || name.contains([':', ',']) {
        return Err("a key name must be non-empty, without ':' or ','".into());
    }
    if prefixes.iter().any(|p| p.contains(['|', ':', ','])) {
        return Err("prefixes may not contain '|', ':' or ','".into());
    }
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no OS randomness: {e}"))?;
    let key: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut entry = format!("{name}:{}", digest_hex(&key));
    if !prefixes.is_empty() {
        entry.push(':');
        entry.push_str(&prefixes.join("|"));
    }
    Ok((key, entry))
}

impl PublishKeys {
    /// No keys and none needed: anyone who reaches the API may publish.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty() && self.open_without_keys
    }

    /// Whether publishing without any configured key is allowed.
    pub fn open_without_keys(mut self, open: bool) -> Self {
        self.open_without_keys = open;
        self
    }

    /// Adds one `name:sha256hex[:prefix|prefix...]` entry.
    pub fn add(&mut self, entry: &str) -> Result<(), String> {
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(hex)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "publish key entry {:?} is not name:sha256hex[:prefixes]",
                entry.chars().take(20).collect::<String>()
            ));
        };
        // ASCII first: slicing a multi-byte character would panic.
        if name.is_empty() || hex.len() != 64 || !hex.is_ascii() {
            return Err(format!(
                "publish key {name:?}: expected a 64-digit hex SHA-256 (runcast publish-key makes one)"
            ));
        }
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("publish key {name:?}: the digest is not hex"))?;
        }
        let prefixes = parts
            .next()
            .map(|p| p.split('|').map(str::to_owned).collect())
            .unwrap_or_default();
        self.entries.push(Entry {
            name: name.to_owned(),
            digest,
            prefixes,
        });
        Ok(())
    }

    /// The name of the key that may publish to `run`, or the error to send.
    pub fn check(&self, key: Option<&str>, run: &RunId) -> Result<Option<String>, ProtocolError> {
        if self.entries.is_empty() {
            return if self.open_without_keys {
                Ok(None)
            } else {
                Err(ProtocolError::new(
                    ErrorCode::Unauthorized,
                    "this gateway has no publish API keys (--publish-key), so it takes no \
                     HTTP publishes; configure keys or --allow-anonymous-publish",
                ))
            };
        }
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(ProtocolError::new(
                ErrorCode::Unauthorized,
                "publishing needs an API key: send it as X-Runcast-Key or Authorization: Bearer",
            ));
        };
        let given = Sha256::digest(key.as_bytes());
        // Every entry is compared, so timing does not tell which one matched.
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&given[..])) {
                found = Some(e);
            }
        }
        let Some(e) = found else {
            return Err(ProtocolError::new(
                ErrorCode::Unauthorized,
                "unknown API key",
            ));
        };
        if e.prefixes.is_empty()
            || e.prefixes
                .iter()
                .any(|p| run.as_str().starts_with(p.as_str()))
        {
            Ok(Some(e.name.clone()))
        } else {
            Err(ProtocolError::for_run(
                ErrorCode::Forbidden,
                run,
                format!("API key {:?} may not publish to this run", e.name),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_digest_and_scoped_by_prefix() {
        let mut k = PublishKeys::default();
        let run = |s| RunId::parse(s).unwrap();
        assert_eq!(k.check(None, &run("a")).unwrap(), None, "no keys: open");
        k.add(&format!("ci:{}:build-|test-", digest_hex("k1")))
            .unwrap();
        k.add(&format!("ops:{}", digest_hex("k2"))).unwrap();
        assert_eq!(
            k.check(Some("k1"), &run("build-7")).unwrap().as_deref(),
            Some("ci")
        );
        assert_eq!(
            k.check(Some("k2"), &run("anything")).unwrap().as_deref(),
            Some("ops")
        );
        assert_eq!(
            k.check(Some("k1"), &run("deploy-1")).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            k.check(Some("nope"), &run("build-7")).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            k.check(None, &run("build-7")).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        let closed = PublishKeys::default().open_without_keys(false);
        assert!(!closed.is_open());
        let e = closed.check(Some("k1"), &run("a")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(
            e.message.contains("--allow-anonymous-publish"),
            "{}",
            e.message
        );
        assert!(k.add("bad").is_err());
        assert!(k.add("x:1234").is_err());
        assert!(k.add(&format!("x:{}", "zz".repeat(32))).is_err());
        assert!(
            k.add(&format!("x:{}", "é".repeat(32))).is_err(),
            "64 bytes, not ASCII: no panic"
        );
        assert!(
            !format!("{k:?}").contains(&digest_hex("k1")),
            "no digests in logs"
        );
    }
}
