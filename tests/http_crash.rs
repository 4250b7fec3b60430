//! A service process killed (SIGKILL) while its handler runs: the key is not stuck. Once the
//! dead process's lease passes, a retry to another instance on the same store takes the
//! claim over and runs the handler; later retries replay that response.
//!
//! The "other process" is this test binary run again as a child (`IDEM_HTTP_CRASH_CHILD` set,
//! only `child_process_entry_point` selected), serving the payments example on a loopback
//! port. Needs a store shared between processes: Redis (`IDEM_TEST_REDIS_URL`, feature
//! `redis`) or PostgreSQL (`IDEM_TEST_POSTGRES_URL`, feature `postgres`); skipped otherwise.
//!
//! ```text
//! IDEM_TEST_REDIS_URL=redis://127.0.0.1:6379 IDEM_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo test --features http,redis,postgres --test http_crash
//! ```

#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::{OnConflict, Store};
use serde_json::json;

use http_support::{fresh_key, is_replayed, options, Server};

const CHILD_VAR: &str = "IDEM_HTTP_CRASH_CHILD";

async fn store_for(kind: &str) -> Option<Arc<dyn Store>> {
    match kind {
        "redis" => http_support::redis_store().await,
        "postgres" => http_support::postgres_store().await,
        other => panic!("unknown store kind {other}"),
    }
}

/// In a normal run: nothing. In the child: serve the example until killed.
async fn child_process_entry_point() {
    let Ok(kind) = std::env::var(CHILD_VAR) else {
        return;
    };
    let store = store_for(&kind)
        .await
        .expect("the parent checked the store");
    let server = Server::start(store, options(OnConflict::Reject)).await;
    println!("LISTENING {}", server.base);
    // Killed by the parent long before this ends.
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// The child process, killed if the test fails before it does.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the child on `kind` and returns it with its base URL.
fn spawn_child(kind: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, kind)
        .envs(http_support::child_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("the child exited before it listened")
            .unwrap();
        // The harness prints `test child_process_entry_point ... ` on the same line.
        if let Some((_, base)) = line.split_once("LISTENING ") {
            break base.trim().to_owned();
        }
    };
    (Child(child), base)
}

async fn killed_mid_handler_then_taken_over(kind: &str) {
    let Some(store) = store_for(kind).await else {
        return;
    };
    let (mut child, child_base) = tokio::task::spawn_blocking({
        let kind = kind.to_owned();
        move || spawn_child(&kind)
    })
    .await
    .unwrap();

    let key = fresh_key("crash");
    let body = json!({"amount": 300, "currency": "EUR", "delay_ms": 1500});
    let client = reqwest::Client::new();
    let first = client
        .post(format!("{child_base}/payments"))
        .header("authorization", "Bearer acme")
        .header("content-type", "application/json")
        .header("idempotency-key", &key)
        .body(body.to_string())
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        first.is_err_and(|e| e.is_timeout()),
        "the handler is still running"
    );

    // SIGKILL: no release, no completion; the claim stays until its 500 ms lease passes.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed_at = Instant::now();

    let survivor = Server::start(store, options(OnConflict::Reject)).await;
    let mut conflicts = 0;
    let resp = loop {
        let resp = survivor
            .pay("acme", Some(&key), body.clone())
            .send()
            .await
            .unwrap();
        if resp.status() != 409 {
            break resp;
        }
        conflicts += 1;
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "the dead process's claim was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(resp.status(), 201);
    assert!(!is_replayed(&resp), "taken over and run, not replayed");
    let paid: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    println!(
        "{kind}: {conflicts} conflicts, taken over {:?} after the kill",
        killed_at.elapsed()
    );

    let again = survivor
        .pay("acme", Some(&key), body.clone())
        .send()
        .await
        .unwrap();
    assert!(is_replayed(&again));
    let replayed: serde_json::Value =
        serde_json::from_slice(&again.bytes().await.unwrap()).unwrap();
    assert_eq!(replayed, paid);
    assert_eq!(survivor.stats().await.executions, 1);
}

async fn redis_killed_mid_handler_then_taken_over() {
    if std::env::var(CHILD_VAR).is_ok() {
        return;
    }
    killed_mid_handler_then_taken_over("redis").await;
}

async fn postgres_killed_mid_handler_then_taken_over() {
    if std::env::var(CHILD_VAR).is_ok() {
        return;
    }
    killed_mid_handler_then_taken_over("postgres").await;
}

fn main() -> std::process::ExitCode {
    use http_support::{POSTGRES, REDIS};
    let code = idem_testkit::harness::run([
        idem_testkit::harness::child_cases(
            CHILD_VAR,
            idem_testkit::test_cases!([], multi_thread(2); child_process_entry_point),
        ),
        idem_testkit::test_cases!([REDIS], multi_thread(2); redis_killed_mid_handler_then_taken_over),
        idem_testkit::test_cases!([POSTGRES], multi_thread(2);
            postgres_killed_mid_handler_then_taken_over),
    ]);
    http_support::forget_run_data();
    code
}
