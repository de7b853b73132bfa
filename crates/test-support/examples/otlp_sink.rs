//! A stand-in OpenTelemetry Collector for benchmarks: receives OTLP/gRPC
//! trace exports on the given address and prints how many spans arrived
//! each second, until stopped (by PID, as scripts/bench.sh does).
//!
//! `cargo run --release -p runcast-test-support --example otlp_sink -- 127.0.0.1:4317`

use std::time::Duration;

use runcast_test_support::otlp::OtlpReceiver;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()
        .expect("an address like 127.0.0.1:4317");
    let rx = OtlpReceiver::start_on(addr).await;
    eprintln!("otlp_sink: listening on {}", rx.endpoint());
    let mut total = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Bounded: a forgotten sink stops by itself after an hour.
    for _ in 0..3600 {
        tick.tick().await;
        let n = rx.drain_count();
        total += n;
        if n > 0 {
            eprintln!("otlp_sink: {n} spans/s, {total} in all");
        }
    }
}
