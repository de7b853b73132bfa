//! The bus behaviour tests against the embedded bus.

use std::sync::Arc;

use runcast_bus::{Bus, EmbeddedBus, Retention};
use runcast_test_support::bus_conformance as c;

fn make() -> Arc<dyn Bus> {
    Arc::new(EmbeddedBus::new(Retention::default()))
}

#[tokio::test]
async fn seqs_start_at_one_per_run() {
    c::seqs_start_at_one_per_run(make()).await;
}

#[tokio::test]
async fn history_is_verbatim_and_pages() {
    c::history_is_verbatim_and_pages(make()).await;
}

#[tokio::test]
async fn watch_is_seamless() {
    c::watch_is_seamless(make()).await;
}

#[tokio::test]
async fn state_and_runs() {
    c::state_and_runs(make()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_contiguous_seqs() {
    c::concurrent_publishers_get_contiguous_seqs(make()).await;
}
