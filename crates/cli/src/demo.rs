//! Simulated jobs for `runcast up --demo`: a load test, a batch of items and
//! a code generation pipeline, each publishing the progress, logs, custom
//! metrics and completion a real job would. Finished jobs are replaced so the
//! page always has something moving.

use std::{sync::Arc, time::Duration};

use runcast_worker::{PublishError, PublishTarget, Publisher};
use serde_json::json;
use tokio::task::{JoinHandle, JoinSet};

/// A small deterministic generator: demo output varies per job without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Keeps `jobs` demo jobs running until aborted.
/// Run IDs are `<prefix><kind>-<n>`: several workers on one NATS each
/// pass their own prefix so their runs never collide.
pub fn spawn(target: Arc<dyn PublishTarget>, jobs: usize, prefix: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut set = JoinSet::new();
        let mut n: u64 = 0;
        loop {
            while set.len() < jobs.max(1) {
                n += 1;
                let (target, prefix) = (target.clone(), prefix.clone());
                set.spawn(async move {
                    let r = job(target, &prefix, n).await;
                    (n, r)
                });
                // Stagger starts so jobs are at different stages.
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            match set.join_next().await {
                Some(Ok((n, Err(e)))) => tracing::warn!(job = n, error = %e, "demo job stopped"),
                Some(Err(e)) => tracing::warn!(error = %e, "demo job panicked"),
                _ => {}
            }
        }
    })
}

async fn job(target: Arc<dyn PublishTarget>, prefix: &str, n: u64) -> Result<(), PublishError> {
    let seed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    match n % 3 {
        1 => {
            load_test(
                Publisher::new(target, &format!("{prefix}loadtest-{n}"))?,
                Rng(seed),
            )
            .await
        }
        2 => {
            batch(
                Publisher::new(target, &format!("{prefix}batch-{n}"))?,
                Rng(seed),
            )
            .await
        }
        _ => {
            codegen(
                Publisher::new(target, &format!("{prefix}codegen-{n}"))?,
                Rng(seed),
            )
            .await
        }
    }
}

async fn tick(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn load_test(p: Publisher, mut rng: Rng) -> Result<(), PublishError> {
    let seconds = 40 + rng.below(30);
    p.status("warming up").await?;
    p.log(&format!(
        "load test: {seconds}s ramp to 500 virtual users against checkout-api"
    ))
    .await?;
    let (mut requests, mut errors) = (0u64, 0u64);
    for s in 1..=seconds {
        tick(1000).await;
        let users = (500 * s / seconds).max(10);
        let rps = users * 4 + rng.below(100);
        let err = if rng.below(20) == 0 { rng.below(30) } else { 0 };
        requests += rps;
        errors += err;
        let p99 = 80 + users / 5 + rng.below(40);
        p.custom(
            "metric",
            &json!({ "users": users, "rps": rps, "p99_ms": p99, "errors": err }),
        )
        .await?;
        p.event(
            runcast_core::EventKind::Progress,
            &json!({ "done": s, "total": seconds, "users": users }),
        )
        .await?;
        if err > 0 {
            p.log(&format!("WARN {err} requests failed: 503 from upstream"))
                .await?;
        }
        if s == seconds / 2 {
            p.status("at peak").await?;
        }
    }
    p.complete(&json!({ "requests": requests, "errors": errors, "error_rate": errors as f64 / requests.max(1) as f64 }))
        .await?;
    Ok(())
}

async fn batch(p: Publisher, mut rng: Rng) -> Result<(), PublishError> {
    let total = 60 + rng.below(90);
    let fail_at = (rng.below(4) == 0).then(|| 10 + rng.below(total - 10));
    p.status("processing").await?;
    p.log(&format!("batch of {total} documents to re-index"))
        .await?;
    for i in 1..=total {
        tick(250 + rng.below(250)).await;
        if Some(i) == fail_at {
            p.log(&format!("ERROR document doc-{i:04}: schema mismatch"))
                .await?;
            p.error(&format!(
                "aborted at document {i} of {total}: schema mismatch"
            ))
            .await?;
            return Ok(());
        }
        p.progress(i, total).await?;
        if i % 5 == 0 || rng.below(8) == 0 {
            p.log(&format!("indexed doc-{i:04} ({} KiB)", 4 + rng.below(400)))
                .await?;
        }
    }
    p.complete(&json!({ "documents": total })).await?;
    Ok(())
}

async fn codegen(p: Publisher, mut rng: Rng) -> Result<(), PublishError> {
    let steps = [
        ("planning", 6),
        ("generating", 30),
        ("compiling", 12),
        ("testing", 20),
    ];
    let total: u64 = steps.iter().map(|(_, n)| n).sum();
    let mut done = 0;
    for (phase, n) in steps {
        p.status(phase).await?;
        for i in 1..=n {
            tick(300 + rng.below(500)).await;
            done += 1;
            p.event(
                runcast_core::EventKind::Progress,
                &json!({ "percent": done as f64 * 100.0 / total as f64, "phase": phase }),
            )
            .await?;
            let line = match phase {
                "planning" => format!("planned module {i}"),
                "generating" => format!(
                    "wrote src/gen/file_{i:02}.rs ({} lines)",
                    40 + rng.below(300)
                ),
                "compiling" => format!("compiled crate {i}/{n}"),
                _ => format!("test suite {i}: {} passed", 5 + rng.below(40)),
            };
            p.log(&line).await?;
        }
    }
    p.complete(&json!({ "files": 30, "tests_passed": true }))
        .await?;
    Ok(())
}
