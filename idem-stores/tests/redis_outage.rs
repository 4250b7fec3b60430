//! A `RedisStore` against a private `redis-server` that the tests kill, pause and flush:
//! outages fail closed and heal without rebuilding the store, commands time out, and scripts
//! reload after the server forgets them.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{Call, Claim, ClaimRequest, Error, FencingToken, Store, StoreError};
use idem_stores::RedisStore;
use idem_testkit::fresh_key;
use redis_server::{available, RedisServer};

async fn store_for(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

fn claim_req(lease: Duration) -> ClaimRequest {
    ClaimRequest {
        key: fresh_key(),
        fingerprint: None,
        token: FencingToken::random(),
        lease,
    }
}

/// Calls fail with `Error::Store` and do not run the body while the server is down; once it
/// is back on the same port the same store object works again, notifications included.
async fn outage_fails_closed_and_heals() {
    if !available() {
        return;
    }
    let mut server = RedisServer::start();
    let store = store_for(&server).await;
    assert!(store.notifications_live());
    let ran = Arc::new(AtomicUsize::new(0));
    let call = |key: &'static str| {
        let ran = ran.clone();
        Call::new("outage").key(key).run(&store, async move {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(key.to_string())
        })
    };
    assert_eq!(call("before").await.unwrap(), "before");
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    server.kill();
    for key in ["during-1", "during-2", "before"] {
        let t = Instant::now();
        let r = call(key).await;
        assert!(
            matches!(r, Err(Error::Store(_))),
            "expected Error::Store, got {r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a failing call took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "no body runs while the store is down"
    );
    // Direct trait calls fail the same way.
    assert!(store
        .claim(&claim_req(Duration::from_secs(1)))
        .await
        .is_err());

    server.restart();
    // The same store object reconnects on its own (the restarted server is empty and has no
    // scripts cached: NOSCRIPT is answered by loading them again).
    let deadline = Instant::now() + Duration::from_secs(15);
    let value = loop {
        match call("after").await {
            Ok(v) => break v,
            Err(Error::Store(e)) => {
                assert!(
                    Instant::now() < deadline,
                    "the store did not recover: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("unexpected error after the restart: {e:?}"),
        }
    };
    assert_eq!(value, "after");
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    assert_eq!(call("after").await.unwrap(), "after", "replayed");
    assert_eq!(ran.load(Ordering::SeqCst), 2);

    // The subscriber reconnects too, and waiters are woken by notifications again.
    while !store.notifications_live() {
        assert!(
            Instant::now() < deadline,
            "the subscriber did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let req = claim_req(Duration::from_secs(30));
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let waiter = {
        let store = store.clone();
        let key = req.key;
        tokio::spawn(async move {
            store.wait(&key, Duration::from_secs(20)).await.unwrap();
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let completed_at = Instant::now();
    store
        .complete(&req.key, req.token, b"v", Duration::from_secs(60))
        .await
        .unwrap();
    let woke = waiter.await.unwrap();
    assert!(
        woke.duration_since(completed_at) < Duration::from_secs(1),
        "the waiter was not woken promptly after the restart"
    );
}

/// Without notifications (here: a server on which SUBSCRIBE is disabled) waiters fall back to
/// bounded polling: they still see a completion promptly, and still respect their timeout.
async fn waiting_falls_back_to_polling_without_notifications() {
    if !available() {
        return;
    }
    let server = RedisServer::start_with(
        redis_server::spare_port(false),
        &["--rename-command", "SUBSCRIBE", ""],
    );
    let store = store_for(&server).await;
    assert!(
        !store.notifications_live(),
        "SUBSCRIBE is disabled on this server"
    );
    let req = claim_req(Duration::from_secs(30));
    store.claim(&req).await.unwrap();
    let waiter = {
        let store = store.clone();
        let key = req.key;
        tokio::spawn(async move {
            store.wait(&key, Duration::from_secs(10)).await.unwrap();
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let completed_at = Instant::now();
    store
        .complete(&req.key, req.token, b"v", Duration::from_secs(60))
        .await
        .unwrap();
    let woke = waiter.await.unwrap();
    let latency = woke.duration_since(completed_at);
    assert!(
        latency < Duration::from_secs(2),
        "polling saw the completion after {latency:?}"
    );
    // Bounded: a wait on a claim nobody completes ends at its timeout.
    let other = claim_req(Duration::from_secs(30));
    store.claim(&other).await.unwrap();
    let t = Instant::now();
    store
        .wait(&other.key, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(2));
}

/// A command that does not finish within the command timeout is `StoreError::Timeout`.
async fn slow_commands_time_out() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .command_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let req = claim_req(Duration::from_secs(5));
    store.claim(&req).await.unwrap();
    // Pause every client's commands for 1.5 s.
    assert!(server
        .command("CLIENT PAUSE 1500 ALL")
        .unwrap()
        .starts_with("+OK"));
    let t = Instant::now();
    let r = store.claim(&claim_req(Duration::from_secs(5))).await;
    assert!(
        matches!(r, Err(StoreError::Timeout(d)) if d == Duration::from_millis(200)),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    let r: Result<(), Error> = Call::new("timeout")
        .key("k")
        .run(&store, async { Ok(()) })
        .await;
    assert!(
        matches!(r, Err(Error::Store(StoreError::Timeout(_)))),
        "{r:?}"
    );
    // After the pause the store works again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    store
        .complete(&req.key, req.token, b"v", Duration::from_secs(60))
        .await
        .unwrap();
}

/// After `SCRIPT FLUSH` the scripts are loaded again transparently (EVALSHA → NOSCRIPT →
/// SCRIPT LOAD → EVALSHA).
async fn scripts_reload_after_flush() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let store = store_for(&server).await;
    let req = claim_req(Duration::from_secs(5));
    store.claim(&req).await.unwrap();
    assert!(server.command("SCRIPT FLUSH").unwrap().starts_with("+OK"));
    store
        .renew(&req.key, req.token, Duration::from_secs(5))
        .await
        .unwrap();
    store
        .complete(&req.key, req.token, b"v", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Completed(_)
    ));
}

/// Stores with different prefixes on one server never see each other's records, and records
/// expire through Redis's own PEXPIRE (nothing is left behind).
async fn prefixes_isolate_and_keys_expire() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let a = RedisStore::builder(server.url())
        .prefix("a:")
        .build()
        .await
        .unwrap();
    let b = RedisStore::builder(server.url())
        .prefix("b:")
        .build()
        .await
        .unwrap();
    let req = claim_req(Duration::from_millis(200));
    assert_eq!(
        a.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    assert_eq!(
        b.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let ttl: i64 = server
        .command(&format!("PTTL {}", a.redis_key(&req.key)))
        .unwrap()
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(
        ttl > 0,
        "an in-progress record carries a PX expiry (lease + grace)"
    );
    a.complete(&req.key, req.token, b"v", Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exists = server
        .command(&format!("EXISTS {}", a.redis_key(&req.key)))
        .unwrap();
    assert_eq!(
        exists.trim(),
        ":0",
        "Redis expired the completed record itself"
    );
    assert!(RedisStore::builder(server.url())
        .prefix("bad{")
        .build()
        .await
        .is_err());
}

/// However many callers wait, a store holds one subscriber connection (plus its command
/// connection), and each waiter is woken by its own key's completion.
async fn one_subscriber_connection_per_store() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let store = store_for(&server).await;
    let reqs: Vec<ClaimRequest> = (0..200)
        .map(|_| claim_req(Duration::from_secs(30)))
        .collect();
    for r in &reqs {
        store.claim(r).await.unwrap();
    }
    let waiters: Vec<_> = reqs
        .iter()
        .map(|r| {
            let store = store.clone();
            let key = r.key;
            tokio::spawn(async move {
                store.wait(&key, Duration::from_secs(20)).await.unwrap();
                Instant::now()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = |kind: &str| {
        server
            .command(&format!("CLIENT LIST TYPE {kind}"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("addr="))
            .count()
    };
    assert_eq!(count("pubsub"), 1, "one subscriber for 200 waiters");
    assert!(
        count("normal") <= 2,
        "the command connection (+ this probe)"
    );
    // Complete every other key: exactly those waiters wake now.
    for r in reqs.iter().step_by(2) {
        store
            .complete(&r.key, r.token, b"v", Duration::from_secs(60))
            .await
            .unwrap();
    }
    let done_at = Instant::now();
    let mut still = Vec::new();
    for (i, w) in waiters.into_iter().enumerate() {
        if i % 2 == 0 {
            let woke = w.await.unwrap();
            assert!(woke.duration_since(done_at) < Duration::from_secs(2));
        } else {
            still.push(w);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        still.iter().all(|w| !w.is_finished()),
        "waiters of other keys sleep on"
    );
    for r in reqs.iter().skip(1).step_by(2) {
        store.release(&r.key, r.token).await.unwrap();
    }
    for w in still {
        w.await.unwrap();
    }
}

/// Every way of connecting works, and a bad URL or an unreachable server is an error, not a
/// panic or a hang.
async fn constructors_and_connect_errors() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let from_client = RedisStore::from_client(redis::Client::open(server.url()).unwrap())
        .await
        .unwrap();
    let by_url = RedisStore::connect(&server.url()).await.unwrap();
    let req = claim_req(Duration::from_secs(5));
    assert_eq!(
        from_client.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    let other = ClaimRequest {
        token: FencingToken::random(),
        ..req.clone()
    };
    assert!(matches!(
        by_url.claim(&other).await.unwrap(),
        Claim::InProgress { .. }
    ));
    assert!(from_client.notifications_live() && by_url.notifications_live());

    assert!(RedisStore::connect("not a url").await.is_err());
    let nobody = redis_server::spare_port(false);
    let t = Instant::now();
    let r = RedisStore::builder(format!("redis://127.0.0.1:{nobody}/"))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await;
    assert!(r.is_err(), "connecting to a closed port must fail");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}

/// A claim whose lease passed reads as absent and does not hold waiters; until someone takes
/// it over, its holder may still complete it; a later claim reports the takeover.
async fn lapsed_claims() {
    if !available() {
        return;
    }
    let server = RedisServer::start();
    let store = store_for(&server).await;

    let late = claim_req(Duration::from_millis(150));
    store.claim(&late).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(store.get(&late.key).await.unwrap(), None);
    let t = Instant::now();
    store.wait(&late.key, Duration::from_secs(5)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a lapsed claim holds no waiter"
    );
    store
        .complete(&late.key, late.token, b"late", Duration::from_secs(60))
        .await
        .expect("nobody took over: the holder's completion stands");
    assert!(matches!(
        store.claim(&late).await.unwrap(),
        Claim::Completed(_)
    ));

    let dead = claim_req(Duration::from_millis(150));
    store.claim(&dead).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let next = ClaimRequest {
        token: FencingToken::random(),
        ..dead.clone()
    };
    assert_eq!(
        store.claim(&next).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
    assert!(matches!(
        store
            .complete(&dead.key, dead.token, b"stale", Duration::from_secs(60))
            .await,
        Err(StoreError::Fenced)
    ));
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::REDIS_SERVER], multi_thread(2);
        outage_fails_closed_and_heals,
        waiting_falls_back_to_polling_without_notifications,
        slow_commands_time_out,
        scripts_reload_after_flush,
        prefixes_isolate_and_keys_expire,
        one_subscriber_connection_per_store,
        constructors_and_connect_errors,
        lapsed_claims),
    ])
}
