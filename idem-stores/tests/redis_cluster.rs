//! `RedisStore` on a three-master Redis Cluster that the test starts and partly kills: a dead
//! master fails its keys closed, the subscriber moves to a live node, and once the master is
//! back the same store object serves its keys again.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Error};
use idem_stores::RedisStore;
use redis_server::{available, RedisCluster, RedisServer};

/// The slot ranges a node serves, from its own line of `CLUSTER NODES`.
fn own_slots(node: &RedisServer) -> Vec<(u16, u16)> {
    let nodes = node.command("CLUSTER NODES").unwrap();
    let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
    me.split_whitespace()
        .skip(8)
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => r.parse().ok().map(|s| (s, s)),
        })
        .collect()
}

fn slot_of(node: &RedisServer, redis_key: &str) -> u16 {
    node.command(&format!("CLUSTER KEYSLOT {redis_key}"))
        .unwrap()
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

async fn a_dead_master_fails_closed_and_heals() {
    if !available() {
        return;
    }
    let mut cluster = RedisCluster::start();
    let store = RedisStore::cluster_builder(cluster.urls())
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    assert!(store.notifications_live());

    // Pick keys served by node 0 (which also holds the subscriber) and by the others.
    let victim_slots = own_slots(&cluster.nodes[0]);
    let on_victim = |k: &str| {
        let key = Call::new("cluster-outage")
            .key(k)
            .identity()
            .unwrap()
            .unwrap()
            .key;
        let slot = slot_of(&cluster.nodes[1], &store.redis_key(&key));
        victim_slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    };
    let names: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    let dead_key = names.iter().find(|k| on_victim(k)).unwrap().clone();
    let live_key = names.iter().find(|k| !on_victim(k)).unwrap().clone();

    let ran = Arc::new(AtomicUsize::new(0));
    let call = |key: String| {
        let ran = ran.clone();
        let store = store.clone();
        async move {
            Call::new("cluster-outage")
                .key(&key)
                .run(&store, async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(key.clone())
                })
                .await
        }
    };
    assert_eq!(call(live_key.clone()).await.unwrap(), live_key);
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    cluster.nodes[0].kill();
    let t = Instant::now();
    let r = call(dead_key.clone()).await;
    assert!(
        matches!(r, Err(Error::Store(_))),
        "expected Error::Store, got {r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "no body runs on a dead master's key"
    );

    // The subscriber moves to a live node.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.notifications_live() {
        assert!(
            Instant::now() < deadline,
            "the subscriber did not move to a live node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Back on the same port (with its cluster config), the master rejoins; the same store
    // object serves its keys again.
    cluster.nodes[0].restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        match call(dead_key.clone()).await {
            Ok(v) => break v,
            Err(Error::Store(e)) => {
                assert!(
                    Instant::now() < deadline,
                    "the cluster store did not recover: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected error after the restart: {e:?}"),
        }
    };
    assert_eq!(value, dead_key);
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    assert_eq!(call(dead_key.clone()).await.unwrap(), dead_key, "replayed");
    assert_eq!(call(live_key.clone()).await.unwrap(), live_key, "replayed");
    assert_eq!(ran.load(Ordering::SeqCst), 2);
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::REDIS_SERVER], multi_thread(2);
        a_dead_master_fails_closed_and_heals),
    ])
}
