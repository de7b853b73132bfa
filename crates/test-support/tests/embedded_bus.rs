//! The bus behaviour tests against the embedded bus.

use std::sync::Arc;

use runcast_bus::{Bus, EmbeddedBus, Retention};
use runcast_test_support::bus_conformance as c;

fn make() -> Arc<dyn Bus> {
    Arc::new(EmbeddedBus::new(Retention::default()))
}

#[tokio::test]
async fn seqs_increase_per_run() {
    c::seqs_increase_per_run(make()).await;
}

/// The embedded bus's own promise: each run is numbered 1, 2, 3, … without holes.
#[tokio::test]
async fn embedded_seqs_are_contiguous_per_run() {
    use runcast_core::{EventKind, NewEvent, RunId};
    let bus = make();
    let ev = || NewEvent::json(EventKind::Log, &1).unwrap();
    let (a, b) = (RunId::parse("a").unwrap(), RunId::parse("b").unwrap());
    assert_eq!(bus.publish(&a, vec![ev()]).await.unwrap(), vec![1]);
    assert_eq!(bus.publish(&b, vec![ev()]).await.unwrap(), vec![1]);
    assert_eq!(bus.publish(&a, vec![ev(), ev()]).await.unwrap(), vec![2, 3]);
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
async fn concurrent_publishers_get_distinct_ordered_seqs() {
    c::concurrent_publishers_get_distinct_ordered_seqs(make()).await;
}

#[tokio::test]
async fn retried_ids_are_stored_once() {
    c::retried_ids_are_stored_once(make()).await;
}
