//! End to end: the `payments` example on a loopback port, driven by a real HTTP client, on
//! the memory store always and on Redis / PostgreSQL when `IDEM_TEST_REDIS_URL` /
//! `IDEM_TEST_POSTGRES_URL` are set and the `redis` / `postgres` features are on:
//!
//! ```text
//! cargo test --features http --test http_payments
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379 IDEM_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo test --features http,redis,postgres --test http_payments
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod http_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{OnConflict, Store};
use serde_json::json;

use http_support::{fresh_key, is_replayed, options, problem, Server};

per_store!(
    client_times_out_and_retries_payment_happens_once,
    concurrent_duplicates_wait_one_execution_nineteen_replays,
    concurrent_duplicates_reject_one_execution_nineteen_conflicts,
    reused_key_with_another_body_is_422,
    missing_or_malformed_key_is_400,
    two_tenants_same_key_get_their_own_results,
    replay_carries_stored_status_headers_and_body,
    server_errors_release_the_key_client_errors_are_stored,
    bare_token_and_quoted_string_are_the_same_key,
    oversized_request_is_413,
);

/// The client gives up after 200 ms while the handler works for 800 ms; it retries with the
/// same key: 409 while the first request still runs (its connection is gone, the handler is
/// not cancelled), then the stored 201. One execution, one capture.
async fn client_times_out_and_retries_payment_happens_once(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("timeout");
    let body = json!({"amount": 1999, "currency": "EUR", "delay_ms": 800});

    let first = server
        .pay("acme", Some(&key), body.clone())
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(first.as_ref().is_err_and(|e| e.is_timeout()), "{first:?}");

    let retry = server
        .pay("acme", Some(&key), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 409);
    let after: u64 = retry.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        after, 1,
        "a short hint, not the 500 ms lease rounded up or the full lease"
    );
    let doc = problem(retry).await;
    assert_eq!(doc["type"], "urn:idem:problem:in-progress");

    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let resp = server
            .pay("acme", Some(&key), body.clone())
            .send()
            .await
            .unwrap();
        if resp.status() != 409 {
            break resp;
        }
        assert!(Instant::now() < deadline, "still in progress after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status(), 201);
    assert!(is_replayed(&done), "the retry must get the stored response");
    let payment: serde_json::Value = serde_json::from_slice(&done.bytes().await.unwrap()).unwrap();
    assert_eq!(payment["amount"], 1999);

    let stats = server.stats().await;
    assert_eq!((stats.executions, stats.captures), (1, 1), "paid once");
}

async fn fire_twenty(
    server: &Server,
    key: &str,
    delay_ms: u64,
) -> Vec<(u16, bool, Vec<u8>, Option<String>)> {
    let body = json!({"amount": 500, "currency": "USD", "delay_ms": delay_ms});
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let req = server.pay("acme", Some(key), body.clone());
        tasks.push(tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let replayed = is_replayed(&resp);
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let ct = resp.headers().get("content-type").cloned();
            let bytes = resp.bytes().await.unwrap().to_vec();
            if status == 409 {
                assert_eq!(ct.unwrap(), "application/problem+json");
            }
            (status, replayed, bytes, retry_after)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// 20 duplicates at once, duplicates waiting: one execution, 19 replays of the same body.
async fn concurrent_duplicates_wait_one_execution_nineteen_replays(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Wait)).await;
    let key = fresh_key("wait");
    let results = fire_twenty(&server, &key, 400).await;

    assert!(
        results.iter().all(|r| r.0 == 201),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let fresh = results.iter().filter(|r| !r.1).count();
    assert_eq!((fresh, 20 - fresh), (1, 19), "one execution, 19 replays");
    let first = &results[0].2;
    assert!(
        results.iter().all(|r| &r.2 == first),
        "every replay has the same body"
    );
    let stats = server.stats().await;
    assert_eq!((stats.executions, stats.captures), (1, 1));
}

/// 20 duplicates at once, duplicates rejected: one 201, 19 problem 409s with `Retry-After`.
async fn concurrent_duplicates_reject_one_execution_nineteen_conflicts(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("reject");
    let results = fire_twenty(&server, &key, 1500).await;

    let created = results.iter().filter(|r| r.0 == 201).count();
    let conflicts: Vec<_> = results.iter().filter(|r| r.0 == 409).collect();
    assert_eq!(
        (created, conflicts.len()),
        (1, 19),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(conflicts.iter().all(|r| r
        .3
        .as_deref()
        .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1))));
    let stats = server.stats().await;
    assert_eq!((stats.executions, stats.captures), (1, 1));
}

/// The key reused with another amount: 422, nothing executed again, and the first request
/// still replays.
async fn reused_key_with_another_body_is_422(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("reuse");
    let first = server
        .pay(
            "acme",
            Some(&key),
            json!({"amount": 100, "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);

    let other = server
        .pay(
            "acme",
            Some(&key),
            json!({"amount": 200, "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    let doc = problem(other).await;
    assert_eq!(doc["type"], "urn:idem:problem:key-reused");
    assert_eq!(doc["status"], 422);

    // Another content type for the same bytes is another request too (fingerprinted header);
    // the same media type with `charset=utf-8` is the same request.
    for (content_type, status) in [
        ("text/plain", 422),
        ("application/json; charset=utf-8", 201),
    ] {
        let ct = server
            .client
            .post(format!("{}/payments", server.base))
            .header("authorization", "Bearer acme")
            .header("idempotency-key", &key)
            .header("content-type", content_type)
            .body(json!({"amount": 100, "currency": "EUR"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(ct.status(), status, "{content_type}");
    }

    let again = server
        .pay(
            "acme",
            Some(&key),
            json!({"amount": 100, "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert!(is_replayed(&again));
    assert_eq!(server.stats().await.executions, 1);
}

/// No key, or a key that is not an sf-string / token, or too long: 400, handler not run.
async fn missing_or_malformed_key_is_400(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let body = json!({"amount": 100, "currency": "EUR"});
    let counted = idem_core::count(idem_core::Outcome::MissingKey);

    let missing = server.pay("acme", None, body.clone()).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    let doc = problem(missing).await;
    assert_eq!(doc["type"], "urn:idem:problem:missing-key");
    assert_eq!(doc["title"], "Idempotency-Key is missing");

    let long = format!("\"{}\"", "k".repeat(256));
    for bad in [
        "\"unclosed",
        "\"\"",
        "two words",
        "\"a\";param=1",
        long.as_str(),
    ] {
        let resp = server
            .pay("acme", Some(bad), body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "key {bad:?}");
        let doc = problem(resp).await;
        assert_eq!(doc["type"], "urn:idem:problem:malformed-key", "key {bad:?}");
    }
    assert!(
        idem_core::count(idem_core::Outcome::MissingKey) >= counted + 6,
        "each refusal is counted as missing_key"
    );
    let max = format!(
        "\"{}-{}\"",
        "k".repeat(200),
        idem_core::FencingToken::random().0
    );
    let resp = server
        .pay("acme", Some(&max), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "a key of up to 255 characters is fine");
    assert_eq!(server.stats().await.executions, 1);
}

/// Two tenants pick the same key and body: each gets its own payment, and each one's replay
/// is its own.
async fn two_tenants_same_key_get_their_own_results(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("tenant");
    let body = json!({"amount": 700, "currency": "EUR"});
    let mut seen = Vec::new();
    for tenant in ["acme", "globex"] {
        let resp = server
            .pay(tenant, Some(&key), body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert!(
            !is_replayed(&resp),
            "{tenant} must not get another tenant's response"
        );
        let p: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(p["tenant"], tenant);
        seen.push(p);
    }
    assert_ne!(seen[0]["id"], seen[1]["id"]);
    for (tenant, first) in ["acme", "globex"].iter().zip(&seen) {
        let resp = server
            .pay(tenant, Some(&key), body.clone())
            .send()
            .await
            .unwrap();
        assert!(is_replayed(&resp));
        let p: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(&p, first, "{tenant} gets its own stored payment");
    }
    assert_eq!(server.stats().await.executions, 2);
}

/// The replay has the stored status, the end-to-end headers, the body, and
/// `Idempotent-Replayed: true`; the first response has no such header. The first response's
/// `set-cookie`s (both, in order) are its own: they are not replayed.
async fn replay_carries_stored_status_headers_and_body(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("headers");
    let body = json!({"amount": 4200, "currency": "GBP"});

    let first = server
        .pay("acme", Some(&key), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    let replay = server
        .pay("acme", Some(&key), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    for name in ["location", "content-type", "x-execution"] {
        assert_eq!(
            replay.headers().get(name),
            first_headers.get(name),
            "header {name}"
        );
    }
    let cookies = |h: &reqwest::header::HeaderMap| -> Vec<String> {
        h.get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let first_cookies = cookies(&first_headers);
    assert_eq!(first_cookies.len(), 2);
    assert!(first_cookies[0].starts_with("last_payment=pay_"));
    assert!(first_cookies[1].starts_with("tenant=acme"));
    assert!(
        cookies(replay.headers()).is_empty(),
        "set-cookie is not replayed by default"
    );
    assert_eq!(replay.headers()["x-execution"], "1");
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(server.stats().await.executions, 1);
}

/// A 503 from the handler releases the key (the retry runs again); a 400 is stored and
/// replayed (the default policy).
async fn server_errors_release_the_key_client_errors_are_stored(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("policy");
    let unavailable = json!({"amount": 1, "currency": "EUR", "fail_with": 503});
    for attempt in 1..=2 {
        let resp = server
            .pay("acme", Some(&key), unavailable.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert!(!is_replayed(&resp));
        assert_eq!(server.stats().await.executions, attempt);
    }
    let key = fresh_key("policy-400");
    let refused = json!({"amount": 1, "currency": "EUR", "fail_with": 400});
    let resp = server
        .pay("acme", Some(&key), refused.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = server
        .pay("acme", Some(&key), refused.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(is_replayed(&resp));
    assert_eq!(server.stats().await.executions, 3);
}

/// `Idempotency-Key: abc` and `Idempotency-Key: "abc"` name the same record.
async fn bare_token_and_quoted_string_are_the_same_key(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let bare = format!("order-{:x}", idem_core::FencingToken::random().0);
    let body = json!({"amount": 5, "currency": "EUR"});
    let first = server
        .pay("acme", Some(&bare), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let quoted = server
        .pay("acme", Some(&format!("\"{bare}\"")), body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(quoted.status(), 201);
    assert!(is_replayed(&quoted));
    assert_eq!(server.stats().await.executions, 1);
}

/// A request body over the layer's 1 MiB limit: 413, the handler not run, the key not used.
async fn oversized_request_is_413(store: Arc<dyn Store>) {
    let server = Server::start(store, options(OnConflict::Reject)).await;
    let key = fresh_key("big");
    let padding = "x".repeat((1 << 20) + 1);
    // The server may answer 413 and close while the client is still writing the body; the
    // client then sees a broken pipe instead of the answer. Such an attempt is sent again
    // (the handler ran for none of them: the stats below say so).
    let mut attempts = 0;
    let resp = loop {
        attempts += 1;
        match server
            .pay(
                "acme",
                Some(&key),
                json!({"amount": 5, "currency": "EUR", "memo": padding}),
            )
            .send()
            .await
        {
            Ok(resp) => break resp,
            Err(e) if attempts < 20 && cut_while_sending(&e) => continue,
            Err(e) => panic!("the oversized request failed {attempts} times: {e:?}"),
        }
    };
    assert_eq!(resp.status(), 413);
    let doc = problem(resp).await;
    assert_eq!(doc["type"], "urn:idem:problem:request-too-large");
    let ok = server
        .pay("acme", Some(&key), json!({"amount": 5, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    assert!(!is_replayed(&ok));
    assert_eq!(server.stats().await.executions, 1);
}

/// A request cut by the server while its body was being sent (broken pipe, reset).
fn cut_while_sending(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            );
        }
        source = err.source();
    }
    false
}

/// Two instances of the service (two "pods") on one store: 20 duplicates spread over both
/// run the handler once; the waiters on the other instance are woken through the store.
async fn duplicates_across_two_instances_run_once(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let one = Server::start(a, options(OnConflict::Wait)).await;
    let two = Server::start(b, options(OnConflict::Wait)).await;
    let key = fresh_key("pods");
    let body = json!({"amount": 900, "currency": "EUR", "delay_ms": 300});
    let mut tasks = Vec::new();
    for i in 0..20 {
        let req = if i % 2 == 0 { &one } else { &two }.pay("acme", Some(&key), body.clone());
        tasks.push(tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            let replayed = is_replayed(&resp);
            (
                resp.status().as_u16(),
                replayed,
                resp.bytes().await.unwrap(),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(
        results.iter().all(|r| r.0 == 201),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(results.iter().filter(|r| !r.1).count(), 1, "one execution");
    assert!(
        results.iter().all(|r| r.2 == results[0].2),
        "one body for all"
    );
    let (s1, s2) = (one.stats().await, two.stats().await);
    assert_eq!(s1.executions + s2.executions, 1);
    assert_eq!(s1.captures + s2.captures, 1);
}

mod two_instances {
    use super::*;

    pub(super) async fn memory() {
        let store = http_support::memory_store().unwrap();
        duplicates_across_two_instances_run_once(store.clone(), store).await;
    }

    pub(super) async fn redis() {
        // Two connections, as two processes would have.
        let Some(a) = http_support::redis_store().await else {
            return;
        };
        let Some(b) = http_support::redis_store().await else {
            return;
        };
        duplicates_across_two_instances_run_once(a, b).await;
    }

    pub(super) async fn postgres() {
        let Some(a) = http_support::postgres_store().await else {
            return;
        };
        let Some(b) = http_support::postgres_store().await else {
            return;
        };
        duplicates_across_two_instances_run_once(a, b).await;
    }
}

fn main() -> std::process::ExitCode {
    use http_support::{POSTGRES, REDIS};
    let code = idem_testkit::harness::run([
        memory::cases(),
        redis::cases(),
        postgres::cases(),
        idem_testkit::test_cases!([], multi_thread(2); two_instances::memory),
        idem_testkit::test_cases!([REDIS], multi_thread(2); two_instances::redis),
        idem_testkit::test_cases!([POSTGRES], multi_thread(2); two_instances::postgres),
    ]);
    http_support::forget_run_data();
    code
}
