//! A rolling upgrade from record format v1 (a hash per key) to v2 (a string per key), with
//! instances of both on one Redis (`IDEM_TEST_REDIS_URL`). v1 records are written by hand with
//! the commands v1 ran, and v1's own claim and complete scripts (copied from the v1 source)
//! stand in for a v1 instance. No key may be executed twice:
//!
//! - v2 replays a v1 completed record, respects a v1 claim's live lease (and wakes on the v1
//!   holder's completion notice), and takes over a v1 claim whose lease passed;
//! - v1 sees a v2 record as foreign data and fails closed (its claim is `corrupt`, its
//!   completion is fenced), so it never runs a body over a v2 claim.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Call, Claim, ClaimRequest, Error, FencingToken, OnConflict, RecordState, Store};
use idem_stores::RedisStore;
use idem_testkit::fresh_key;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

/// v1's script prologue and claim and complete scripts, as v1 shipped them.
const V1_PRELUDE: &str = r#"
local k = KEYS[1]
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local function look()
  local ty = redis.call('TYPE', k)['ok']
  if ty == 'none' then return 'none' end
  if ty ~= 'hash' then return nil, 'the key holds a ' .. tostring(ty) .. ', not a record hash' end
  local r = redis.call('HMGET', k, 's', 't', 'f', 'd', 'v')
  local d = tonumber(r[4])
  if d == nil then return nil, 'the record has no valid deadline field' end
  if r[1] == 'p' then
    if not r[2] then return nil, 'an in-progress record has no token' end
  elseif r[1] == 'c' then
    if not r[5] then return nil, 'a completed record has no value' end
  else
    return nil, 'the record has no valid state field'
  end
  return r[1], r, d
end
"#;
const V1_CLAIM: &str = r#"
local s, r, d = look()
if s == nil then return {'corrupt', r} end
local taken = 0
if s ~= 'none' then
  if now < d then
    if s == 'c' then return {'completed', r[3] or '', r[5]} end
    return {'in_progress', r[3] or '', d - now}
  end
  if s == 'p' then taken = 1 end
  redis.call('DEL', k)
end
local lease = tonumber(ARGV[3])
redis.call('HSET', k, 's', 'p', 't', ARGV[1], 'f', ARGV[2], 'd', string.format('%d', now + lease))
redis.call('PEXPIRE', k, string.format('%d', lease + tonumber(ARGV[4])))
return {'acquired', taken}
"#;
const V1_COMPLETE: &str = r#"
local s, r = look()
if s ~= 'p' or r[2] ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', k, 's', 'c', 'v', ARGV[2], 'd', string.format('%d', now + ttl))
redis.call('HDEL', k, 't')
if ttl > 0 then
  redis.call('PEXPIRE', k, string.format('%d', ttl))
else
  redis.call('DEL', k)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

async fn setup() -> Option<(RedisStore, ConnectionManager)> {
    let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
    let store = RedisStore::builder(url.as_str())
        .prefix("idem-test-upgrade:")
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

async fn server_ms(raw: &mut ConnectionManager) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(raw).await.unwrap();
    s * 1000 + us / 1000
}

/// Writes a v1 record by hand: `fields`, with the deadline `d` at `offset_ms` from the
/// server's now, and a `PEXPIRE` as v1 set it.
async fn write_v1(
    raw: &mut ConnectionManager,
    name: &str,
    fields: &[(&str, &[u8])],
    offset_ms: i64,
    pexpire_ms: u64,
) {
    let d = (server_ms(raw).await as i64 + offset_ms).to_string();
    let _: () = raw.del(name).await.unwrap();
    let mut cmd = redis::cmd("HSET");
    cmd.arg(name).arg("d").arg(d);
    for (f, v) in fields {
        cmd.arg(*f).arg(*v);
    }
    let _: () = cmd.query_async(raw).await.unwrap();
    let _: () = raw.pexpire(name, pexpire_ms as i64).await.unwrap();
}

async fn key_type(raw: &mut ConnectionManager, name: &str) -> String {
    redis::cmd("TYPE").arg(name).query_async(raw).await.unwrap()
}

fn counted(
    ran: &Arc<AtomicUsize>,
    value: u64,
) -> impl std::future::Future<Output = Result<u64, Error>> {
    let ran = ran.clone();
    async move {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok(value)
    }
}

/// A v1 completed record is replayed by v2, with its remaining ttl; the body does not run.
async fn v2_replays_a_v1_completed_record() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let ns: &'static str = Box::leak(format!("upgrade::replay::{}", fresh_key()).into_boxed_str());
    let call = || Call::new(ns).key("k").fingerprint(("args",));
    let ran = Arc::new(AtomicUsize::new(0));
    // The encoded value as idem writes it: run once on v2 and read it back.
    assert_eq!(call().run(&store, counted(&ran, 7)).await.unwrap(), 7);
    let id = call().identity().unwrap().unwrap();
    let envelope = match store.get(&id.key).await.unwrap() {
        Some(RecordState::Completed(rec)) => rec.value,
        other => panic!("{other:?}"),
    };
    let name = store.redis_key(&id.key);
    let fp = id.fingerprint.unwrap().0;
    write_v1(
        &mut raw,
        &name,
        &[("s", b"c"), ("f", &fp), ("v", &envelope)],
        60_000,
        60_000,
    )
    .await;
    assert_eq!(key_type(&mut raw, &name).await, "hash");

    assert_eq!(call().run(&store, counted(&ran, 8)).await.unwrap(), 7);
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the v1 record was replayed");
    match store.get(&id.key).await.unwrap() {
        Some(RecordState::Completed(rec)) => {
            let left = rec.expires_in.unwrap();
            assert!(left > Duration::from_secs(30) && left <= Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
    // Another fingerprint on the v1 record is a reused key, not a replay.
    let other = Call::new(ns).key("k").fingerprint(("other",));
    assert!(matches!(
        other.run(&store, counted(&ran, 9)).await,
        Err(Error::KeyReused)
    ));
    assert_eq!(key_type(&mut raw, &name).await, "hash", "left as it was");
    store.remove(&id.key).await.unwrap();
}

/// A v1 claim under a live lease holds off v2 callers; a v2 waiter wakes on the v1 holder's
/// completion notice and replays the v1 value.
async fn v2_respects_a_live_v1_claim_and_wakes_on_its_completion() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let ns: &'static str = Box::leak(format!("upgrade::live::{}", fresh_key()).into_boxed_str());
    let call = move || Call::new(ns).key("k").lease(Duration::from_secs(10));
    let id = call().identity().unwrap().unwrap();
    let name = store.redis_key(&id.key);
    // The value the v1 holder will store: idem's encoding of 5u64, made by a v2 run
    // elsewhere.
    let ran = Arc::new(AtomicUsize::new(0));
    let probe = || Call::new(ns).key("probe");
    probe().run(&store, counted(&ran, 5)).await.unwrap();
    let envelope = match store
        .get(&probe().identity().unwrap().unwrap().key)
        .await
        .unwrap()
    {
        Some(RecordState::Completed(rec)) => rec.value,
        other => panic!("{other:?}"),
    };

    let v1_token = "4242424242";
    write_v1(
        &mut raw,
        &name,
        &[("s", b"p"), ("t", v1_token.as_bytes()), ("f", b"")],
        10_000,
        70_000,
    )
    .await;
    // A rejecting v2 caller gets InProgress, and the trait reads the v1 holder's token.
    let r = call()
        .on_conflict(OnConflict::Reject)
        .run(&store, counted(&ran, 6))
        .await;
    assert!(matches!(r, Err(Error::InProgress { .. })), "{r:?}");
    match store.get(&id.key).await.unwrap() {
        Some(RecordState::InProgress { token, .. }) => {
            assert_eq!(token, FencingToken(4242424242))
        }
        other => panic!("{other:?}"),
    }
    let req = ClaimRequest {
        key: id.key,
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_secs(1),
    };
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::InProgress { .. }
    ));

    // A waiting v2 caller; then the v1 holder completes with v1's script (and notice).
    let waiter = {
        let store = store.clone();
        let ran = ran.clone();
        tokio::spawn(async move {
            call()
                .wait_timeout(Duration::from_secs(8))
                .run(&store, counted(&ran, 6))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let done: i64 = redis::Script::new(&format!("{V1_PRELUDE}{V1_COMPLETE}"))
        .key(&name)
        .arg(v1_token)
        .arg(&envelope[..])
        .arg(60_000)
        .arg(store.channel())
        .arg(id.key.to_hex())
        .invoke_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(done, 1);
    let got = tokio::time::timeout(Duration::from_secs(9), waiter)
        .await
        .expect("the waiter returned")
        .unwrap();
    assert_eq!(got.unwrap(), 5, "the waiter replayed the v1 holder's value");
    assert_eq!(ran.load(Ordering::SeqCst), 1, "only the probe ran");
    store.remove(&id.key).await.unwrap();
    store
        .remove(&probe().identity().unwrap().unwrap().key)
        .await
        .unwrap();
}

/// A v1 claim whose lease has passed is taken over by v2 (reported as a takeover), and from
/// then on the v1 holder is fenced: its completion is refused and a v1 claim fails closed.
async fn v2_takes_over_a_lapsed_v1_claim_and_v1_fails_closed_on_v2() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let name = store.redis_key(&key);
    write_v1(
        &mut raw,
        &name,
        &[("s", b"p"), ("t", b"17"), ("f", b"")],
        -1,
        60_000,
    )
    .await;
    let req = ClaimRequest {
        key,
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_secs(10),
    };
    assert_eq!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { taken_over: true }
    );
    assert_eq!(key_type(&mut raw, &name).await, "string", "now a v2 record");

    // The old v1 holder (token 17) finishes: fenced.
    let complete = redis::Script::new(&format!("{V1_PRELUDE}{V1_COMPLETE}"));
    let fenced: i64 = complete
        .key(&name)
        .arg("17")
        .arg("late value")
        .arg(60_000)
        .arg(store.channel())
        .arg(key.to_hex())
        .invoke_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(fenced, 0, "a v1 completion over a v2 claim is refused");

    // A v1 instance claiming the key, in progress under v2 and then completed by v2, gets
    // `corrupt` (its callers see Error::Codec): it never acquires, so never runs the body.
    let v1_claim = redis::Script::new(&format!("{V1_PRELUDE}{V1_CLAIM}"));
    for _ in 0..2 {
        let reply: Vec<redis::Value> = v1_claim
            .key(&name)
            .arg("99")
            .arg("")
            .arg(10_000)
            .arg(60_000)
            .invoke_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(
            reply.first(),
            Some(&redis::Value::BulkString(b"corrupt".to_vec())),
            "{reply:?}"
        );
        store
            .complete(&key, req.token, b"v2 value", Duration::from_secs(60))
            .await
            .unwrap();
    }
    // v2 still replays its own value.
    match store
        .claim(&ClaimRequest {
            token: FencingToken::random(),
            ..req.clone()
        })
        .await
        .unwrap()
    {
        Claim::Completed(rec) => assert_eq!(&rec.value[..], b"v2 value"),
        other => panic!("{other:?}"),
    }
    store.remove(&key).await.unwrap();
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::REDIS], multi_thread(2);
        v2_replays_a_v1_completed_record,
        v2_respects_a_live_v1_claim_and_wakes_on_its_completion,
        v2_takes_over_a_lapsed_v1_claim_and_v1_fails_closed_on_v2),
    ])
}
