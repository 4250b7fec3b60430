//! Foreign or corrupted data under a record's key (`IDEM_TEST_REDIS_URL`): the caller gets
//! `Error::Codec` (the store reports `StoreError::Corrupt`), never a panic, a replay of
//! garbage, or a silent re-execution over someone else's data.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/backends.rs"]
mod backends;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Call, ClaimRequest, Error, FencingToken, Store, StoreError};
use idem_stores::RedisStore;
use idem_testkit::fresh_key;
use redis::AsyncCommands;

async fn setup() -> Option<(RedisStore, redis::aio::ConnectionManager)> {
    let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL")?;
    let store = RedisStore::builder(url.as_str())
        .prefix("idem-test:")
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

/// What another client writes over a record (a completed v2 record, one string: `i2c`,
/// token, expiry, fingerprint length, fingerprint, value), or over a v1 hash record.
#[derive(Debug, Clone, Copy)]
enum Vandalism {
    StringValue,
    ListValue,
    GarbageValueField,
    UnknownState,
    TruncatedHeader,
    ShortFingerprint,
    NanExpiry,
    V1UnknownState,
    V1NoDeadline,
    V1ShortFingerprint,
    V1TokenlessClaim,
}

async fn vandalize(raw: &mut redis::aio::ConnectionManager, key: &str, how: Vandalism) {
    let far = "99999999999999";
    let rec: Vec<u8> = raw.get(key).await.unwrap();
    assert_eq!(&rec[..3], b"i2c", "a completed v2 record");
    let set = |bytes: Vec<u8>| {
        let mut raw = raw.clone();
        async move {
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(bytes)
                .arg("KEEPTTL")
                .query_async(&mut raw)
                .await
                .unwrap();
        }
    };
    let v1 = |fields: Vec<(&'static str, &'static str)>| {
        let mut raw = raw.clone();
        async move {
            let _: () = raw.del(key).await.unwrap();
            let _: () = raw.hset_multiple(key, &fields).await.unwrap();
        }
    };
    match how {
        Vandalism::StringValue => {
            let _: () = raw.set(key, "garbage \u{0} \u{ff}").await.unwrap();
        }
        Vandalism::ListValue => {
            let _: () = raw.del(key).await.unwrap();
            let _: () = raw.rpush(key, "x").await.unwrap();
        }
        Vandalism::GarbageValueField => {
            let fp = usize::from(rec[19]);
            let mut bad = rec[..20 + fp].to_vec();
            bad.extend_from_slice(b"\xde\xad\xbe\xef not an envelope");
            set(bad).await;
        }
        Vandalism::UnknownState => {
            let mut bad = rec.clone();
            bad[2] = b'z';
            set(bad).await;
        }
        Vandalism::TruncatedHeader => set(rec[..12].to_vec()).await,
        Vandalism::ShortFingerprint => {
            let mut bad = rec.clone();
            bad[19] = 3;
            set(bad).await;
        }
        Vandalism::NanExpiry => {
            let mut bad = rec.clone();
            bad[11..19].copy_from_slice(&f64::NAN.to_be_bytes());
            set(bad).await;
        }
        Vandalism::V1UnknownState => v1(vec![("s", "zz"), ("d", far), ("v", "x")]).await,
        Vandalism::V1NoDeadline => v1(vec![("s", "c"), ("v", "x")]).await,
        Vandalism::V1ShortFingerprint => {
            v1(vec![("s", "c"), ("f", "abc"), ("d", far), ("v", "x")]).await
        }
        Vandalism::V1TokenlessClaim => v1(vec![("s", "p"), ("d", far)]).await,
    }
}

/// A completed record overwritten in each way: the next call is `Error::Codec`, the body does
/// not run, and the foreign data is left as it was.
async fn garbage_records_are_codec_errors() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let ns: &'static str = Box::leak(format!("foreign::{}", fresh_key()).into_boxed_str());
    for how in [
        Vandalism::StringValue,
        Vandalism::ListValue,
        Vandalism::GarbageValueField,
        Vandalism::UnknownState,
        Vandalism::TruncatedHeader,
        Vandalism::ShortFingerprint,
        Vandalism::NanExpiry,
        Vandalism::V1UnknownState,
        Vandalism::V1NoDeadline,
        Vandalism::V1ShortFingerprint,
        Vandalism::V1TokenlessClaim,
    ] {
        let name = format!("{how:?}");
        let call = || Call::new(ns).key(&name);
        let ran = Arc::new(AtomicUsize::new(0));
        let body = |ran: Arc<AtomicUsize>| async move {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(42u64)
        };
        assert_eq!(call().run(&store, body(ran.clone())).await.unwrap(), 42);
        let key = call().identity().unwrap().unwrap().key;
        let redis_key = store.redis_key(&key);
        vandalize(&mut raw, &redis_key, how).await;
        let before: Vec<u8> = redis::cmd("DUMP")
            .arg(&redis_key)
            .query_async(&mut raw)
            .await
            .unwrap();

        let r = call().run(&store, body(ran.clone())).await;
        assert!(
            matches!(r, Err(Error::Codec(_))),
            "{how:?}: expected Error::Codec, got {r:?}"
        );
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "{how:?}: the body ran over foreign data"
        );
        let after: Vec<u8> = redis::cmd("DUMP")
            .arg(&redis_key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(before, after, "{how:?}: the foreign data was changed");

        // The trait methods: reads are Corrupt (or, for a well-formed record with a garbage
        // value, the bytes as stored); completion and renewal are refused, and a release
        // (of a claim that is not ours) is Ok and changes nothing.
        let got = store.get(&key).await;
        match how {
            Vandalism::GarbageValueField => assert!(got.is_ok(), "{how:?}: {got:?}"),
            _ => assert!(
                matches!(got, Err(StoreError::Corrupt(_))),
                "{how:?}: {got:?}"
            ),
        }
        let token = FencingToken::random();
        assert!(matches!(
            store
                .complete(&key, token, b"x", Duration::from_secs(1))
                .await,
            Err(StoreError::Fenced)
        ));
        store.release(&key, token).await.unwrap();
        let after: Vec<u8> = redis::cmd("DUMP")
            .arg(&redis_key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(before, after, "{how:?}: a foreign release changed the data");
        assert!(matches!(
            store.renew(&key, token, Duration::from_secs(1)).await,
            Err(StoreError::Fenced)
        ));
        // An administrator can clear it, and the key works again.
        store.remove(&key).await.unwrap();
        assert_eq!(call().run(&store, body(ran.clone())).await.unwrap(), 42);
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        // Nothing left behind on the shared server.
        store.remove(&key).await.unwrap();
    }
}

/// A claim over a wrong-type key is `StoreError::Corrupt` at the trait level.
async fn claim_over_foreign_key_is_corrupt() {
    let Some((store, mut raw)) = setup().await else {
        return;
    };
    let key = fresh_key();
    let _: () = raw.sadd(store.redis_key(&key), "member").await.unwrap();
    let req = ClaimRequest {
        key,
        fingerprint: None,
        token: FencingToken::random(),
        lease: Duration::from_secs(1),
    };
    match store.claim(&req).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("set"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    store.remove(&key).await.unwrap();
}

fn main() -> std::process::ExitCode {
    idem_testkit::harness::run([
        idem_testkit::test_cases!([backends::REDIS], multi_thread(2);
        garbage_records_are_codec_errors, claim_over_foreign_key_is_corrupt),
    ])
}
