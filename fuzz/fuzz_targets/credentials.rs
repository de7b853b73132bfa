//! What clients present and configuration the gateway reads: bearer tokens
//! against HS256 and ES256 keys, publish API keys and key entries, and
//! X-Forwarded-For chains. None of it may panic; a token without a valid
//! signature is never accepted.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use runcast_gateway::{auth::Auth, limits::IpLimits, publish_keys::PublishKeys};

static AUTH: LazyLock<Auth> = LazyLock::new(|| {
    let mut a = Auth::anonymous();
    a.allow_anonymous = false;
    a.add_hs256_secret(Some("hs".into()), b"fuzzing-secret-fuzzing-secret-32b!")
        .expect("secret");
    a
});

static KEYS: LazyLock<PublishKeys> = LazyLock::new(|| {
    let mut k = PublishKeys::default();
    k.add(&format!(
        "ci:{}:build-",
        runcast_gateway::publish_keys::digest_hex("k")
    ))
    .expect("entry");
    k
});

static IPS: LazyLock<IpLimits> =
    LazyLock::new(|| IpLimits::new(0, 0.0, vec!["127.0.0.0/8".parse().expect("cidr")]));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Random bytes cannot carry a valid HS256 signature over our secret.
    assert!(AUTH.authenticate(Some(text)).is_err());
    let run = runcast_core::RunId::parse("build-1").expect("run");
    if text != "k" {
        assert!(KEYS.check(Some(text), &run).is_err());
    }
    let _ = PublishKeys::default().add(text);
    let _ = IPS.client_ip("127.0.0.1".parse().expect("ip"), Some(text));
});
