//! The token matrix: which bearer tokens the gateway accepts, and why it
//! refuses the others. Keys are made by openssl (installed by the test
//! command) in a temporary directory; tokens are signed with jsonwebtoken.

use std::{path::Path, process::Command};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use runcast_core::RunId;
use runcast_gateway::auth::{Auth, AuthErrorKind};
use runcast_test_support::{nats::TempDir, openssl};
use serde_json::{Value, json};

const SECRET: &[u8] = b"a-32-byte-or-longer-shared-secret!!";

fn now() -> u64 {
    runcast_core::now_millis() / 1000
}

/// RSA and EC key pairs: (private PEM, public PEM path).
fn keys(dir: &Path) -> (Vec<u8>, std::path::PathBuf, Vec<u8>, std::path::PathBuf) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &p("rsa.key"),
        ],
    );
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            &p("rsa.key"),
            "-pubout",
            "-out",
            &p("rsa-1.pem"),
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &p("ec.key"),
        ],
    );
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            &p("ec.key"),
            "-pubout",
            "-out",
            &p("ec-1.pem"),
        ],
    );
    (
        std::fs::read(dir.join("rsa.key")).unwrap(),
        dir.join("rsa-1.pem"),
        std::fs::read(dir.join("ec.key")).unwrap(),
        dir.join("ec-1.pem"),
    )
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "user-7", "exp": now() + 300, "runs": ["nightly-42"], "run_prefixes": ["team-a-"]});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs(kid: Option<&str>, secret: &[u8], c: &Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_owned);
    encode(&h, c, &EncodingKey::from_secret(secret)).unwrap()
}

fn run(s: &str) -> RunId {
    RunId::parse(s).unwrap()
}

fn kind(auth: &Auth, token: &str) -> AuthErrorKind {
    auth.authenticate(Some(token)).unwrap_err().kind
}

#[test]
fn hs256_tokens_scope_runs_and_are_checked_claim_by_claim() {
    let mut auth = Auth::default()
        .with_audience(Some("runcast".into()))
        .with_issuer(Some("https://app.example".into()));
    auth.add_hs256_secret(Some("app-2026".into()), SECRET)
        .unwrap();
    let ok = json!({"aud": "runcast", "iss": "https://app.example"});

    let g = auth
        .authenticate(Some(&hs(Some("app-2026"), SECRET, &claims(ok.clone()))))
        .unwrap();
    assert_eq!(g.subject.as_deref(), Some("user-7"));
    assert!(g.allows(&run("nightly-42")) && g.allows(&run("team-a-build-9")));
    assert!(
        !g.allows(&run("nightly-43")) && !g.allows(&run("team-b-1")),
        "run outside the scope"
    );
    assert!(g.expires.unwrap() > now());

    let with = |extra: Value| {
        let mut c = claims(ok.clone());
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    for (token, want) in [
        (
            hs(Some("app-2026"), SECRET, &with(json!({"exp": now() - 60}))),
            AuthErrorKind::Expired,
        ),
        (
            hs(Some("app-2026"), SECRET, &with(json!({"nbf": now() + 600}))),
            AuthErrorKind::NotYetValid,
        ),
        (
            hs(
                Some("app-2026"),
                b"another-secret-of-32-bytes-or-more!!",
                &claims(ok.clone()),
            ),
            AuthErrorKind::BadSignature,
        ),
        (
            hs(Some("app-2025"), SECRET, &claims(ok.clone())),
            AuthErrorKind::UnknownKey,
        ),
        (
            hs(Some("app-2026"), SECRET, &with(json!({"aud": "other"}))),
            AuthErrorKind::Audience,
        ),
        (
            hs(
                Some("app-2026"),
                SECRET,
                &with(json!({"iss": "https://evil.example"})),
            ),
            AuthErrorKind::Issuer,
        ),
        (
            hs(
                Some("app-2026"),
                SECRET,
                &with(json!({"aud": ["other", "also-other"]})),
            ),
            AuthErrorKind::Audience,
        ),
        ("not.a.jwt".to_string(), AuthErrorKind::Malformed),
    ] {
        assert_eq!(kind(&auth, &token), want, "{token}");
    }
    // A configured audience and issuer must be present, not only match when
    // present: a token without them is refused (an outside client found `aud`
    // was optional).
    for (claim, want) in [
        ("aud", AuthErrorKind::Audience),
        ("iss", AuthErrorKind::Issuer),
    ] {
        let mut c = claims(ok.clone());
        c.as_object_mut().unwrap().remove(claim);
        assert_eq!(
            kind(&auth, &hs(Some("app-2026"), SECRET, &c)),
            want,
            "{claim} missing"
        );
    }
    // `iss` is one string (RFC 7519): an array naming ours is refused, and
    // so is a header with critical extensions this gateway cannot know
    // (RFC 7515), both found by an outside tester.
    assert_eq!(
        kind(
            &auth,
            &hs(
                Some("app-2026"),
                SECRET,
                &with(json!({"iss": ["https://app.example"]}))
            )
        ),
        AuthErrorKind::Issuer
    );
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("app-2026".into());
    h.crit = Some(vec!["x-unknown".into()]);
    let crit = encode(&h, &claims(ok.clone()), &EncodingKey::from_secret(SECRET)).unwrap();
    assert_eq!(kind(&auth, &crit), AuthErrorKind::Malformed);
    // `aud` as an array that names us is accepted.
    let g = auth.authenticate(Some(&hs(
        Some("app-2026"),
        SECRET,
        &with(json!({"aud": ["other", "runcast"]})),
    )));
    assert!(g.is_ok(), "aud array with ours: {g:?}");
    // Without a configured audience, `aud` is not needed.
    let mut open = Auth::default();
    open.add_hs256_secret(None, SECRET).unwrap();
    assert!(
        open.authenticate(Some(&hs(None, SECRET, &claims(json!({})))))
            .is_ok()
    );
    // No exp at all.
    let mut no_exp = claims(ok.clone());
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        kind(&auth, &hs(Some("app-2026"), SECRET, &no_exp)),
        AuthErrorKind::Malformed
    );
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused() {
    let dir = TempDir::new("auth-keys");
    let (_, rsa_pub, _, _) = keys(dir.path());
    let mut auth = Auth::default();
    auth.add_pem_file(None, &rsa_pub).unwrap();

    // alg: none, no signature.
    let none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims(json!({})).to_string())
    );
    let k = kind(&auth, &none);
    assert!(
        matches!(k, AuthErrorKind::Algorithm | AuthErrorKind::Malformed),
        "{k:?}"
    );

    // HS256 "signed" with the RSA public key's bytes, naming the RSA key.
    let pem = std::fs::read(&rsa_pub).unwrap();
    let confused = hs(Some("rsa-1"), &pem, &claims(json!({})));
    assert_eq!(kind(&auth, &confused), AuthErrorKind::Algorithm);
    // ... and without a kid: no key accepts HS256 at all.
    let confused = hs(None, &pem, &claims(json!({})));
    assert_eq!(kind(&auth, &confused), AuthErrorKind::Algorithm);
}

#[test]
fn rs256_es256_and_jwks_keys_rotate_by_kid() {
    let dir = TempDir::new("auth-keys");
    let (rsa_key, rsa_pub, ec_key, ec_pub) = keys(dir.path());
    let mut auth = Auth::default();
    auth.add_pem_file(None, &rsa_pub).unwrap();
    auth.add_pem_file(Some("ec-2026".into()), &ec_pub).unwrap();
    auth.add_hs256_secret(Some("hs-old".into()), SECRET)
        .unwrap();

    let sign = |alg, kid: &str, key: EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &claims(json!({})), &key).unwrap()
    };
    let rs = sign(
        Algorithm::RS256,
        "rsa-1",
        EncodingKey::from_rsa_pem(&rsa_key).unwrap(),
    );
    let es = sign(
        Algorithm::ES256,
        "ec-2026",
        EncodingKey::from_ec_pem(&ec_key).unwrap(),
    );
    let old = sign(Algorithm::HS256, "hs-old", EncodingKey::from_secret(SECRET));
    for t in [&rs, &es, &old] {
        assert!(
            auth.authenticate(Some(t))
                .unwrap()
                .allows(&run("nightly-42"))
        );
    }
    // An RS256 token presented under the EC key's kid fails.
    let wrong = sign(
        Algorithm::RS256,
        "ec-2026",
        EncodingKey::from_rsa_pem(&rsa_key).unwrap(),
    );
    assert_eq!(kind(&auth, &wrong), AuthErrorKind::Algorithm);

    // The same RSA key from a JWKS file, next to a second key.
    let modulus = Command::new("openssl")
        .args(["rsa", "-pubin", "-in"])
        .arg(&rsa_pub)
        .args(["-noout", "-modulus"])
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout).unwrap();
    let hex = hex.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "jwks-rsa", "alg": "RS256", "use": "sig", "n": B64.encode(&n), "e": "AQAB"},
        {"kty": "oct", "kid": "jwks-hs", "alg": "HS256", "k": B64.encode(SECRET)},
    ]});
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let mut from_jwks = Auth::default();
    assert_eq!(from_jwks.add_jwks_file(&path).unwrap(), 2);
    let rs = sign(
        Algorithm::RS256,
        "jwks-rsa",
        EncodingKey::from_rsa_pem(&rsa_key).unwrap(),
    );
    assert!(from_jwks.authenticate(Some(&rs)).is_ok());
    let hs = sign(
        Algorithm::HS256,
        "jwks-hs",
        EncodingKey::from_secret(SECRET),
    );
    assert!(from_jwks.authenticate(Some(&hs)).is_ok());
    assert_eq!(
        kind(
            &from_jwks,
            &sign(Algorithm::HS256, "rsa-1", EncodingKey::from_secret(SECRET))
        ),
        AuthErrorKind::UnknownKey
    );
}

#[test]
fn anonymous_access_is_only_an_explicit_choice() {
    let mut auth = Auth::default();
    auth.add_hs256_secret(None, SECRET).unwrap();
    assert_eq!(
        auth.authenticate(None).unwrap_err().kind,
        AuthErrorKind::Missing
    );
    assert_eq!(
        auth.authenticate(Some("")).unwrap_err().kind,
        AuthErrorKind::Missing
    );
    auth.allow_anonymous = true;
    assert!(auth.authenticate(None).unwrap().allows(&run("anything")));
    // A bad token is still refused: no fall-back to anonymous.
    assert_eq!(kind(&auth, "garbage"), AuthErrorKind::Malformed);
    assert!(Auth::default().add_hs256_secret(None, b"short").is_err());
    assert!(!Auth::default().is_configured());
}
