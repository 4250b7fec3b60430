//! Durable steps on `RedisStore`, through the store's own operations (`put_step`,
//! `load_steps`, `clear_step`, `remove`): against the server named by `IDEM_TEST_REDIS_URL`
//! (also run on Valkey 8.0 and 8.1 by `.ci/run`), and against a three-master Redis Cluster
//! started for the test.
//!
//! - records round-trip, a `Started` step becomes `Done`, a repeat leaves one record;
//! - every step write is fenced: a wrong token, an absent record, a completed one, one taken
//!   over, one released; a waiter's mark on the claim does not fence its holder;
//! - releasing or completing keeps the steps, removing deletes them with the record;
//! - the steps hash expires with the longest ttl written, never shortened;
//! - too large a value is refused before anything is sent; foreign data is `Corrupt`;
//! - 64 tasks writing with an old token while the claim is taken over: nothing they write
//!   lands after the takeover, and nothing acknowledged is lost;
//! - on a cluster, a call's steps and its record share a slot.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{
    Claim, FencingToken, Key, RecordState, StepId, StepRecord, StepStatus, Store, StoreError,
};
use idem_stores::RedisStore;
use idem_testkit::{claim_request, fresh_key};
use redis::AsyncCommands;
use redis_server::{available, RedisCluster};

const LONG: Duration = Duration::from_secs(60);
const PREFIX: &str = "idem-test-steps:";

async fn setup() -> Option<(RedisStore, redis::aio::ConnectionManager)> {
    let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
    let store = RedisStore::builder(url.as_str())
        .prefix(PREFIX)
        .build()
        .await
        .unwrap();
    let raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    Some((store, raw))
}

/// The steps hash's name: the record's, then `:steps`.
fn steps_key(store: &RedisStore, key: &Key) -> String {
    format!("{}:steps", store.redis_key(key))
}

async fn acquire(store: &dyn Store, key: Key, lease: Duration) -> FencingToken {
    let (req, token) = claim_request(key, lease);
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: false }
    );
    token
}

fn step(name: &str, occurrence: u32, status: StepStatus, value: &[u8]) -> StepRecord {
    StepRecord::new(StepId::new(name, occurrence), status, value.to_vec())
}

async fn loaded(store: &dyn Store, key: &Key) -> Vec<StepRecord> {
    let mut steps = store.load_steps(key).await.unwrap();
    steps.sort_by(|a, b| a.id.cmp(&b.id));
    steps
}

/// Every kind of step, and names that look like fields, read back as written.
async fn steps_round_trip() {
    let Some((store, _raw)) = setup().await else {
        return;
    };
    assert!(store.supports_steps());
    let key = fresh_key();
    assert_eq!(loaded(&store, &key).await, vec![], "no steps yet");
    let token = acquire(&store, key, LONG).await;
    let big = vec![0xa5u8; 100_000];
    let mut written = vec![
        step("charge", 0, StepStatus::Done, b"\x00receipt\xff"),
        step("line", 0, StepStatus::Done, b"first"),
        step("line", 1, StepStatus::Done, b"second"),
        step("line#1", 0, StepStatus::Done, b"not line 1"),
        step("mail", 0, StepStatus::Started, b""),
        step("gateway", 0, StepStatus::Failed, b"declined"),
        step("", 0, StepStatus::Done, b"the empty name"),
        step("#", u32::MAX, StepStatus::Done, b"#"),
        step("ünï cödé {tag} *?[]", 3, StepStatus::Done, &big),
    ];
    for s in &written {
        store.put_step(&key, token, s, LONG).await.unwrap();
    }
    written.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(loaded(&store, &key).await, written);
    store.remove(&key).await.unwrap();
}

/// A step written again replaces itself: `Started` becomes `Done`; a repeated write (a
/// retry whose reply was lost) leaves one record.
async fn a_step_is_replaced_not_duplicated() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    let started = step("mail", 0, StepStatus::Started, b"");
    store.put_step(&key, token, &started, LONG).await.unwrap();
    store.put_step(&key, token, &started, LONG).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![started]);
    let done = step("mail", 0, StepStatus::Done, b"sent");
    store.put_step(&key, token, &done, LONG).await.unwrap();
    store.put_step(&key, token, &done, LONG).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![done]);
    let fields: i64 = raw.hlen(steps_key(&store, &key)).await.unwrap();
    assert_eq!(fields, 1);
    store.remove(&key).await.unwrap();
}

/// `clear_step` removes one step, is `Ok` for an absent one, and is fenced like a write.
async fn clear_step_removes_one_step() {
    let Some((store, _raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    let a = step("a", 0, StepStatus::Started, b"");
    let b = step("b", 0, StepStatus::Done, b"b");
    store.put_step(&key, token, &a, LONG).await.unwrap();
    store.put_step(&key, token, &b, LONG).await.unwrap();
    assert!(matches!(
        store
            .clear_step(&key, FencingToken(token.0 ^ 1), &a.id)
            .await,
        Err(StoreError::Fenced)
    ));
    store.clear_step(&key, token, &a.id).await.unwrap();
    store.clear_step(&key, token, &a.id).await.unwrap();
    store
        .clear_step(&key, token, &StepId::new("never", 0))
        .await
        .unwrap();
    assert_eq!(loaded(&store, &key).await, vec![b.clone()]);
    store.complete(&key, token, b"v", LONG).await.unwrap();
    assert!(matches!(
        store.clear_step(&key, token, &b.id).await,
        Err(StoreError::Fenced)
    ));
    assert_eq!(loaded(&store, &key).await, vec![b]);
    store.remove(&key).await.unwrap();
}

/// Only the holder of a live claim writes steps: a wrong token, an absent record, a
/// completed one, one released, and one taken over all answer `Fenced` and write nothing.
async fn step_writes_are_fenced() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let fenced = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Fenced));
    let s = step("s", 0, StepStatus::Done, b"x");

    // No record at all.
    let key = fresh_key();
    assert!(fenced(
        store.put_step(&key, FencingToken(7), &s, LONG).await
    ));
    let exists: bool = raw.exists(steps_key(&store, &key)).await.unwrap();
    assert!(!exists, "a fenced write creates no hash");

    // Another token.
    let token = acquire(&store, key, LONG).await;
    assert!(fenced(
        store
            .put_step(&key, FencingToken(token.0.wrapping_add(1)), &s, LONG)
            .await
    ));
    assert_eq!(loaded(&store, &key).await, vec![]);

    // Completed, under the very token that held it.
    store.complete(&key, token, b"v", LONG).await.unwrap();
    assert!(fenced(store.put_step(&key, token, &s, LONG).await));
    assert_eq!(loaded(&store, &key).await, vec![]);
    store.remove(&key).await.unwrap();

    // Released.
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    store.release(&key, token).await.unwrap();
    assert!(fenced(store.put_step(&key, token, &s, LONG).await));
    assert_eq!(loaded(&store, &key).await, vec![]);

    // Taken over after the lease passed: the old holder is fenced, the new one writes.
    let key = fresh_key();
    let old = acquire(&store, key, Duration::from_millis(100)).await;
    store.put_step(&key, old, &s, LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (req, new) = claim_request(key, LONG);
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
    let stale = step("s", 1, StepStatus::Done, b"old");
    assert!(fenced(store.put_step(&key, old, &stale, LONG).await));
    assert_eq!(
        loaded(&store, &key).await,
        vec![s.clone()],
        "kept, not added"
    );
    let fresh = step("s", 1, StepStatus::Done, b"new");
    store.put_step(&key, new, &fresh, LONG).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![s, fresh]);
    store.remove(&key).await.unwrap();
}

/// Releasing (the body returned `Err`) and completing leave the steps for the next
/// execution; the next holder reads them and writes over them.
async fn release_and_complete_keep_the_steps() {
    let Some((store, _raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let first = acquire(&store, key, LONG).await;
    let a = step("a", 0, StepStatus::Done, b"a");
    store.put_step(&key, first, &a, LONG).await.unwrap();
    store.release(&key, first).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(
        loaded(&store, &key).await,
        vec![a.clone()],
        "kept by release"
    );

    let second = acquire(&store, key, LONG).await;
    assert_eq!(
        loaded(&store, &key).await,
        vec![a.clone()],
        "the retry resumes"
    );
    let b = step("b", 0, StepStatus::Done, b"b");
    store.put_step(&key, second, &b, LONG).await.unwrap();
    store.complete(&key, second, b"v", LONG).await.unwrap();
    assert!(matches!(
        store.get(&key).await.unwrap(),
        Some(RecordState::Completed(_))
    ));
    assert_eq!(loaded(&store, &key).await, vec![a, b], "kept by complete");
    store.remove(&key).await.unwrap();
}

/// `remove` deletes the record and its steps (one `DEL` of both keys); a record without
/// steps is removed as before.
async fn remove_deletes_the_steps() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    store
        .put_step(&key, token, &step("a", 0, StepStatus::Done, b"a"), LONG)
        .await
        .unwrap();
    let both = [store.redis_key(&key), steps_key(&store, &key)];
    let n: i64 = raw.exists(&both).await.unwrap();
    assert_eq!(n, 2);
    store.remove(&key).await.unwrap();
    let n: i64 = raw.exists(&both).await.unwrap();
    assert_eq!(n, 0, "record and steps are gone");
    assert_eq!(loaded(&store, &key).await, vec![]);
    assert_eq!(store.get(&key).await.unwrap(), None);

    // Completed, with no steps.
    let key = fresh_key();
    idem_testkit::completed(&store, key, LONG).await;
    store.remove(&key).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
}

/// A step expires `ttl` after its write; the hash's expiry is the longest ttl written and a
/// shorter one never cuts it.
async fn steps_expire_with_the_longest_ttl() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    let name = steps_key(&store, &key);
    store
        .put_step(
            &key,
            token,
            &step("short", 0, StepStatus::Done, b"s"),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    let pttl: i64 = raw.pttl(&name).await.unwrap();
    assert!(pttl > 0 && pttl <= 200, "{pttl}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(loaded(&store, &key).await, vec![], "expired");

    let long = step("long", 0, StepStatus::Done, b"l");
    store.put_step(&key, token, &long, LONG).await.unwrap();
    let short = step("short", 1, StepStatus::Done, b"s");
    store
        .put_step(&key, token, &short, Duration::from_millis(100))
        .await
        .unwrap();
    let pttl: i64 = raw.pttl(&name).await.unwrap();
    assert!(
        pttl > 30_000,
        "a shorter ttl does not cut the hash's: {pttl}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(loaded(&store, &key).await, vec![long, short]);

    // A longer ttl extends it.
    store
        .put_step(
            &key,
            token,
            &step("longer", 0, StepStatus::Done, b""),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let pttl: i64 = raw.pttl(&name).await.unwrap();
    assert!(pttl > 120_000, "{pttl}");
    store.remove(&key).await.unwrap();
}

/// A value over `max_value_size` is `TooLarge` and nothing is written; one at the limit is
/// stored.
async fn too_large_is_refused() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let store = RedisStore::builder(url.as_str())
        .prefix(PREFIX)
        .max_value_size(64)
        .build()
        .await
        .unwrap();
    assert_eq!(store.max_value_size(), 64);
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    match store
        .put_step(
            &key,
            token,
            &step("big", 0, StepStatus::Done, &[1; 65]),
            LONG,
        )
        .await
    {
        Err(StoreError::TooLarge {
            size: 65,
            limit: 64,
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(loaded(&store, &key).await, vec![]);
    let fits = step("fits", 0, StepStatus::Done, &[2; 64]);
    store.put_step(&key, token, &fits, LONG).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![fits]);
    store.remove(&key).await.unwrap();
}

/// A waiter's look marks the claim (`i2w`): it is still the holder's, whose step writes and
/// clears go through; its completion then wakes the waiter.
async fn a_waiter_marked_claim_accepts_the_holders_steps() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(&key, Duration::from_secs(20)).await })
    };
    let name = store.redis_key(&key);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let head: Vec<u8> = raw.getrange(&name, 0, 2).await.unwrap();
        if head == b"i2w" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiter never marked the claim"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = step("a", 0, StepStatus::Started, b"");
    let b = step("b", 0, StepStatus::Done, b"b");
    store.put_step(&key, token, &a, LONG).await.unwrap();
    store.put_step(&key, token, &b, LONG).await.unwrap();
    store.clear_step(&key, token, &a.id).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![b.clone()]);
    // Still fenced for anyone else.
    assert!(matches!(
        store
            .put_step(&key, FencingToken(token.0 ^ 1), &a, LONG)
            .await,
        Err(StoreError::Fenced)
    ));
    store.complete(&key, token, b"v", LONG).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter wakes on the completion")
        .unwrap()
        .unwrap();
    assert_eq!(loaded(&store, &key).await, vec![b]);
    store.remove(&key).await.unwrap();
}

/// Foreign data under the steps key is `Corrupt` for every step operation, never a panic, and
/// is left as it is.
async fn foreign_data_under_the_steps_key_is_corrupt() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let token = acquire(&store, key, LONG).await;
    let name = steps_key(&store, &key);
    let _: () = raw.set_ex(&name, "not a hash", 60).await.unwrap();
    let s = step("a", 0, StepStatus::Done, b"a");
    for r in [
        store.put_step(&key, token, &s, LONG).await,
        store.clear_step(&key, token, &s.id).await,
        store.load_steps(&key).await.map(drop),
    ] {
        assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    }
    let _: () = raw.del(&name).await.unwrap();
    // A field that is not `name#occurrence`, or a value with no known status.
    for (field, value) in [("no-occurrence", &b"\x02v"[..]), ("a#0", b"\x07v")] {
        let _: () = raw.hset(&name, field, value).await.unwrap();
        assert!(
            matches!(store.load_steps(&key).await, Err(StoreError::Corrupt(_))),
            "{field}"
        );
        let _: () = raw.del(&name).await.unwrap();
    }
    store.put_step(&key, token, &s, LONG).await.unwrap();
    assert_eq!(loaded(&store, &key).await, vec![s]);
    store.remove(&key).await.unwrap();
}

/// 64 tasks keep writing steps under a claim whose lease passes, while another caller takes
/// it over. Every write they had acknowledged is there; none of theirs lands after the
/// takeover (the steps the old token wrote, read right after the takeover, are all there
/// ever are); each task ends on `Fenced`.
async fn an_old_token_writes_nothing_after_a_takeover() {
    let Some((store, _raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let lease = Duration::from_millis(200);
    let old = acquire(&store, key, lease).await;
    let tasks: Vec<_> = (0..64u32)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let until = Instant::now() + Duration::from_secs(10);
                for i in 0.. {
                    if Instant::now() > until {
                        return (acknowledged, false);
                    }
                    let s = step(&format!("t{t}"), i, StepStatus::Done, b"old");
                    match store.put_step(&key, old, &s, LONG).await {
                        Ok(()) => acknowledged.push(s.id),
                        Err(StoreError::Fenced) => return (acknowledged, true),
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                (acknowledged, false)
            })
        })
        .collect();
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let (req, new) = claim_request(key, LONG);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.claim(&req).await.unwrap() {
            Claim::Acquired { taken_over } => {
                assert!(taken_over);
                break;
            }
            Claim::InProgress { .. } => {
                assert!(Instant::now() < deadline, "never taken over");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let at_takeover: BTreeSet<StepId> = store
        .load_steps(&key)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut acknowledged = BTreeSet::new();
    for t in tasks {
        let (ids, fenced) = t.await.unwrap();
        assert!(fenced, "a task kept writing with the old token");
        acknowledged.extend(ids);
    }
    let after: BTreeSet<StepId> = store
        .load_steps(&key)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert!(
        !at_takeover.is_empty(),
        "the old holder wrote before the takeover"
    );
    assert_eq!(after, at_takeover, "a step landed after the takeover");
    assert!(
        acknowledged.is_subset(&after),
        "an acknowledged write is missing"
    );
    let s = step("new", 0, StepStatus::Done, b"new");
    store.put_step(&key, new, &s, LONG).await.unwrap();
    assert!(loaded(&store, &key).await.contains(&s));
    store.remove(&key).await.unwrap();
}

/// On a three-master cluster: every call's steps hash is in its record's slot, and steps are
/// written, read, kept by completion and removed with the record, on every master.
async fn steps_on_a_cluster() {
    if !available() {
        return;
    }
    let cluster = RedisCluster::start();
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix(PREFIX)
        .build()
        .await
        .unwrap();
    assert!(store.supports_steps());
    let slot = |name: &str| -> u16 {
        cluster.nodes[0]
            .command(&format!("CLUSTER KEYSLOT {name}"))
            .unwrap()
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap()
    };
    let mut slots = BTreeSet::new();
    let a = step("a", 0, StepStatus::Done, b"a");
    let b = step("b#0", 1, StepStatus::Started, b"");
    for _ in 0..24 {
        let key = fresh_key();
        let record = store.redis_key(&key);
        let s = slot(&record);
        assert_eq!(slot(&steps_key(&store, &key)), s, "one slot");
        slots.insert(s);
        let token = acquire(&store, key, LONG).await;
        store.put_step(&key, token, &a, LONG).await.unwrap();
        store.put_step(&key, token, &b, LONG).await.unwrap();
        assert!(matches!(
            store
                .put_step(&key, FencingToken(token.0 ^ 1), &a, LONG)
                .await,
            Err(StoreError::Fenced)
        ));
        store.clear_step(&key, token, &b.id).await.unwrap();
        store.put_step(&key, token, &b, LONG).await.unwrap();
        store.complete(&key, token, b"v", LONG).await.unwrap();
        assert_eq!(loaded(&store, &key).await, vec![a.clone(), b.clone()]);
        store.remove(&key).await.unwrap();
        assert_eq!(loaded(&store, &key).await, vec![]);
        assert_eq!(store.get(&key).await.unwrap(), None);
    }
    // 24 random keys on three masters: more than one slot range is exercised.
    assert!(slots.len() > 1);
    let owners: BTreeSet<usize> = slots
        .iter()
        .map(|&s| cluster.nodes.iter().position(|n| own_slot(n, s)).unwrap())
        .collect();
    assert!(owners.len() > 1, "keys on more than one master: {owners:?}");
}

/// Whether `node` serves `slot`, from its own line of `CLUSTER NODES`.
fn own_slot(node: &redis_server::RedisServer, slot: u16) -> bool {
    let nodes = node.command("CLUSTER NODES").unwrap();
    let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
    me.split_whitespace().skip(8).any(|r| {
        let (a, b) = match r.split_once('-') {
            Some((a, b)) => (a.parse().ok(), b.parse().ok()),
            None => (r.parse().ok(), r.parse().ok()),
        };
        matches!((a, b), (Some(a), Some(b)) if (a..=b).contains(&slot))
    })
}

/// The store's steps through `Arc<dyn Store>` (what the runtime holds), so the forwarding
/// of the trait's step methods is what is tested.
async fn steps_through_a_dyn_store() {
    let Some((store, _raw)) = setup().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(store);
    assert!(store.supports_steps());
    let key = fresh_key();
    let token = acquire(&*store, key, LONG).await;
    let s = step("dyn", 0, StepStatus::Done, b"d");
    store.put_step(&key, token, &s, LONG).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![s]);
    store.remove(&key).await.unwrap();
    assert_eq!(loaded(&*store, &key).await, vec![]);
}

fn main() -> std::process::ExitCode {
    use backends::{REDIS, REDIS_SERVER};
    idem_testkit::harness::run([
        idem_testkit::test_cases!([REDIS], multi_thread(2);
            steps_round_trip,
            a_step_is_replaced_not_duplicated,
            clear_step_removes_one_step,
            step_writes_are_fenced,
            release_and_complete_keep_the_steps,
            remove_deletes_the_steps,
            steps_expire_with_the_longest_ttl,
            too_large_is_refused,
            a_waiter_marked_claim_accepts_the_holders_steps,
            foreign_data_under_the_steps_key_is_corrupt,
            an_old_token_writes_nothing_after_a_takeover,
            steps_through_a_dyn_store),
        idem_testkit::test_cases!([REDIS_SERVER], multi_thread(2); steps_on_a_cluster),
    ])
}
