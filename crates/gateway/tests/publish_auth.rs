//! The publish API with API keys: missing, wrong and out-of-scope keys are
//! refused before the body is read, and nothing is stored; the body limit
//! still applies to an authorized publisher.

use runcast_bus::Retention;
use runcast_gateway::{
    Config,
    publish_keys::{PublishKeys, digest_hex},
};
use runcast_test_support::{TestGateway, http, json};

#[tokio::test]
async fn publishing_needs_a_key_that_covers_the_run() {
    let mut keys = PublishKeys::default();
    keys.add(&format!("ci:{}:build-", digest_hex("ci-secret-key")))
        .unwrap();
    let gw = TestGateway::with(
        Config {
            publish_keys: keys,
            max_publish_bytes: 1024,
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let body = r#"{"kind":"log","data":{"line":"x"}}"#;
    let post = |run: &'static str, headers: Vec<(&'static str, &'static str)>, body: String| {
        let addr = gw.addr;
        async move {
            http(
                addr,
                "POST",
                &format!("/v1/runs/{run}/events"),
                &headers,
                body,
            )
            .await
        }
    };
    for (run, headers, status, code) in [
        ("build-1", vec![], 401, "unauthorized"),
        (
            "build-1",
            vec![("x-runcast-key", "wrong")],
            401,
            "unauthorized",
        ),
        (
            "deploy-1",
            vec![("x-runcast-key", "ci-secret-key")],
            403,
            "forbidden",
        ),
    ] {
        let (got, _, b) = post(run, headers.clone(), body.into()).await;
        assert_eq!(
            (got, json(&b)["error"]["code"].as_str().map(str::to_owned)),
            (status, Some(code.into())),
            "{run} {headers:?}"
        );
    }
    // The key works as X-Runcast-Key and as a bearer token.
    for h in [
        ("x-runcast-key", "ci-secret-key"),
        ("authorization", "Bearer ci-secret-key"),
    ] {
        let (got, _, b) = post("build-1", vec![h], body.into()).await;
        assert_eq!(got, 200, "{b}");
    }
    // Over the body limit, with a valid key.
    let big = format!(
        r#"{{"kind":"log","data":{{"line":"{}"}}}}"#,
        "x".repeat(2000)
    );
    let (got, _, b) = post("build-1", vec![("x-runcast-key", "ci-secret-key")], big).await;
    assert_eq!(
        (got, json(&b)["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    // Only the two authorized events were stored.
    let (_, _, state) = http(gw.addr, "GET", "/v1/runs/build-1", &[], "").await;
    assert_eq!(json(&state)["events"], 2);
    assert_eq!(
        http(gw.addr, "GET", "/v1/runs/deploy-1", &[], "").await.0,
        404
    );
}

#[tokio::test]
async fn a_key_over_its_publish_rate_gets_429_and_other_keys_go_on() {
    let mut keys = PublishKeys::default();
    keys.add(&format!("noisy:{}", digest_hex("noisy-key")))
        .unwrap();
    keys.add(&format!("calm:{}", digest_hex("calm-key")))
        .unwrap();
    let gw = TestGateway::with(
        Config {
            publish_keys: keys,
            publish_rate_per_key: 2.0,
            ..Config::default()
        },
        Retention::default(),
    )
    .await;
    let body = r#"{"kind":"log","data":{"line":"x"}}"#;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let (status, h, _) = http(
            gw.addr,
            "POST",
            "/v1/runs/r/events",
            &[("x-runcast-key", "noisy-key")],
            body,
        )
        .await;
        if status == 429 {
            assert_eq!(h["retry-after"], "1");
        }
        codes.push(status);
    }
    assert_eq!(
        codes,
        [200, 200, 200, 200, 429, 429],
        "a burst of twice the rate"
    );
    let (status, _, _) = http(
        gw.addr,
        "POST",
        "/v1/runs/r/events",
        &[("x-runcast-key", "calm-key")],
        body,
    )
    .await;
    assert_eq!(status, 200, "another key is not slowed down");
    let (_, _, state) = http(gw.addr, "GET", "/v1/runs/r", &[], "").await;
    assert_eq!(
        json(&state)["events"],
        5,
        "refused publishes stored nothing"
    );
}
