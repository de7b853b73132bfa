//! The nats-server harness itself: a node and a 3-node cluster really run
//! JetStream, survive `kill -9` of one node, and come back on restart.

use runcast_test_support::nats::{NatsCluster, NatsServer};

#[tokio::test]
async fn single_node_runs_jetstream_and_dies_with_its_handle() {
    let mut n = NatsServer::start().await;
    let varz = n.monitor_json("/varz").await;
    assert_eq!(varz["port"].as_u64(), Some(u64::from(n.port)));
    assert!(
        varz["jetstream"]["config"]["store_dir"].as_str().is_some(),
        "JetStream enabled: {varz}"
    );
    assert!(n.is_running());
    let port = n.port;
    drop(n);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "server gone after drop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_elects_a_leader_and_survives_losing_one() {
    let mut c = NatsCluster::start(3).await;
    let jsz = c.nodes[0].monitor_json("/jsz").await;
    assert_eq!(
        jsz["meta_cluster"]["cluster_size"].as_u64(),
        Some(3),
        "{jsz}"
    );
    assert_eq!(c.urls().split(',').count(), 3);

    c.nodes[0].kill();
    assert!(!c.nodes[0].is_running());
    // The other two keep a quorum and a leader.
    c.wait_meta_leader().await;
    c.nodes[0].restart().await;
    let jsz = c.nodes[0].monitor_json("/jsz").await;
    assert_eq!(
        jsz["meta_cluster"]["cluster_size"].as_u64(),
        Some(3),
        "rejoined: {jsz}"
    );
}
