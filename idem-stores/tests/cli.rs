//! The `idem` command-line tool end to end: records made through `Call` on Redis, PostgreSQL,
//! MySQL/MariaDB and SQLite, found, counted and forgotten by the real binary; and the exit
//! codes and messages for a bad URL, an unknown namespace and an unreachable server.
//!
//! Backend tests need `IDEM_TEST_REDIS_URL`, `IDEM_TEST_POSTGRES_URL`, `IDEM_TEST_MYSQL_URL`
//! (skipped without them, failing without them when `CI` is set). SQLite needs nothing.
#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/sql_common.rs"]
#[allow(unused)]
mod sql_common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idem_core::{Call, Claim, Error, Store};
use idem_testkit::{claim_request, fresh_key};
use serde_json::Value;

const NS: &str = "cli_tests::charge";

/// What one run of the binary gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `idem` with `args`, bounded: a run that takes more than 30 s is killed and fails the
/// test (the tool's own timeouts are a few seconds).
fn idem(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env_remove("IDEM_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idem");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("idem {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Run {
        code: status.code().expect("exited, not killed"),
        stdout,
        stderr,
    }
}

fn with(base: &[String], rest: &[&str]) -> Vec<String> {
    base.iter()
        .cloned()
        .chain(rest.iter().map(|s| s.to_string()))
        .collect()
}

fn run_args(args: &[String]) -> Run {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    idem(&refs)
}

/// A call by string key and scope, as `#[idempotent]` would make it.
fn by_order(order: &str) -> Call {
    Call::new(NS)
        .key(order)
        .scope("tenant-1")
        .fingerprint((1999u32,))
        .ttl(Duration::from_secs(3600))
}

/// A call by numeric key (found with `--key-json 42`).
fn by_number(n: u64) -> Call {
    Call::new(NS).key(n).ttl(Duration::from_secs(3600))
}

/// The whole operator story on one store: `base` is `--url … [--prefix|--table …]`.
async fn story(store: &dyn Store, base: &[String]) {
    by_order("order-7")
        .run(store, async { Ok::<_, Error>("receipt".to_string()) })
        .await
        .unwrap();
    by_number(42)
        .run(store, async { Ok::<_, Error>(7u32) })
        .await
        .unwrap();
    let id = by_order("order-7").identity().unwrap().unwrap();
    let target = ["--namespace", NS, "--key", "order-7", "--scope", "tenant-1"];

    // Human table.
    let out = run_args(&with(base, &[&["inspect"][..], &target[..]].concat()));
    assert_eq!(out.code, 0, "{out:?}");
    for needle in [
        "completed",
        "msgpack;v0",
        &id.key.to_hex(),
        "expires in",
        "bytes",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in {out:?}");
    }
    // JSON.
    let out = run_args(&with(
        base,
        &[&["--json", "inspect"][..], &target[..]].concat(),
    ));
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["key"], id.key.to_hex());
    assert_eq!(v["fingerprint"], id.fingerprint.unwrap().to_hex());
    assert_eq!(v["tag"], "msgpack;v0");
    // 64-bit numbers are JSON strings.
    assert!(v["size"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    let left: u64 = v["expires_in_ms"].as_str().unwrap().parse().unwrap();
    assert!(left <= 3_600_000 && left > 3_000_000, "{left}");
    // A numeric key, as JSON; and the hashed key as logs show it.
    let out = run_args(&with(
        base,
        &["inspect", "--namespace", NS, "--key-json", "42"],
    ));
    assert_eq!(out.code, 0, "{out:?}");
    let out = run_args(&with(base, &["inspect", "--hashed-key", &id.key.to_hex()]));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("completed"), "{out:?}");
    // The string "42" is not the number 42.
    let out = run_args(&with(base, &["inspect", "--namespace", NS, "--key", "42"]));
    assert_eq!(out.code, 1, "{out:?}");

    // Stats count both records.
    let out = run_args(&with(base, &["--json", "stats"]));
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (v["completed"].as_str(), v["in_progress"].as_str()),
        (Some("2"), Some("0")),
        "{v}"
    );
    let out = run_args(&with(base, &["stats"]));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("completed"), "{out:?}");

    claims(store, base).await;

    // An unknown namespace: exit 1 and a message that says why a store cannot tell.
    let out = run_args(&with(
        base,
        &[
            "inspect",
            "--namespace",
            "cli_tests::chrage",
            "--key",
            "order-7",
            "--scope",
            "tenant-1",
        ],
    ));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("no record for namespace \"cli_tests::chrage\""),
        "{out:?}"
    );
    assert!(out.stderr.contains("cannot list namespaces"), "{out:?}");
    // The wrong scope is not found either.
    let out = run_args(&with(
        base,
        &["inspect", "--namespace", NS, "--key", "order-7"],
    ));
    assert_eq!(out.code, 1, "{out:?}");

    // Forget: gone for the tool and for the runtime (the body runs again).
    let out = run_args(&with(base, &[&["forget"][..], &target[..]].concat()));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&id.key.to_hex()), "{out:?}");
    let out = run_args(&with(base, &[&["inspect"][..], &target[..]].concat()));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(by_order("order-7").inspect(store).await.unwrap().is_none());
    let ran = by_order("order-7")
        .run(store, async { Ok::<_, Error>("again".to_string()) })
        .await
        .unwrap();
    assert_eq!(ran, "again");
    // Forgetting what is not there: exit 1, nothing changed.
    let out = run_args(&with(
        base,
        &["--json", "forget", "--namespace", NS, "--key-json", "43"],
    ));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(serde_json::from_str::<Value>(out.stdout.trim()).unwrap()["error"].is_string());

    let out = run_args(&with(base, &["purge-expired", "--batch", "10"]));
    assert_eq!(out.code, 0, "{out:?}");

    // Clean up.
    for call in [by_order("order-7"), by_number(42)] {
        call.forget(store).await.unwrap();
    }
}

/// A live holder (renewed once) and a dead one (its lease passed): what `inspect` and `stats`
/// show of them, as a table and as JSON.
async fn claims(store: &dyn Store, base: &[String]) {
    let live = by_order("order-9").identity_for(store).unwrap().unwrap();
    let (mut req, token) = claim_request(live.key, Duration::from_secs(60));
    req.fingerprint = live.fingerprint;
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    store
        .renew(&live.key, token, Duration::from_secs(60))
        .await
        .unwrap();
    let dead = fresh_key();
    let (req, _) = claim_request(dead, Duration::from_millis(200));
    assert!(matches!(
        store.claim(&req).await.unwrap(),
        Claim::Acquired { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let target = ["--namespace", NS, "--key", "order-9", "--scope", "tenant-1"];

    let out = run_args(&with(base, &[&["inspect"][..], &target[..]].concat()));
    println!(
        "$ idem {} inspect {}\n{}",
        base.join(" "),
        target.join(" "),
        out.stdout
    );
    assert_eq!(out.code, 0, "{out:?}");
    for needle in [
        "in progress",
        &token.0.to_string(),
        "age ",
        "lease left",
        "renewals     1",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in {out:?}");
    }
    let out = run_args(&with(
        base,
        &[&["--json", "inspect"][..], &target[..]].concat(),
    ));
    println!(
        "$ idem {} --json inspect {}\n{}",
        base.join(" "),
        target.join(" "),
        out.stdout
    );
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(v["status"], "in_progress");
    assert_eq!(v["token"], token.0.to_string());
    assert_eq!(v["renewals"], "1");
    let age: u64 = v["age_ms"].as_str().unwrap().parse().unwrap();
    assert!((400..60_000).contains(&age), "{v}");
    let left: u64 = v["lease_left_ms"].as_str().unwrap().parse().unwrap();
    assert!(left > 50_000 && left <= 60_000, "{v}");

    let out = run_args(&with(base, &["stats"]));
    println!("$ idem {} stats\n{}", base.join(" "), out.stdout);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("expired unclaimed  1"), "{out:?}");
    assert!(out.stdout.contains("oldest claim"), "{out:?}");
    let out = run_args(&with(base, &["--json", "stats"]));
    println!("$ idem {} --json stats\n{}", base.join(" "), out.stdout);
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["in_progress"], "1", "{v}");
    assert_eq!(v["expired_unclaimed"], "1", "{v}");
    let oldest: u64 = v["oldest_in_progress_ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((400..60_000).contains(&oldest), "{v}");

    by_order("order-9").forget(store).await.unwrap();
    store.remove(&dead).await.unwrap();
}

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

fn bad_urls_exit_3() {
    for url in [
        "foo://localhost/x",
        "localhost:6379",
        "redis://127.0.0.1:notaport",
        "postgres://u@127.0.0.1:notaport/db",
        "sqlite:/nonexistent/dir/idem.db",
    ] {
        let out = idem(&["--url", url, "stats"]);
        assert_eq!(out.code, 3, "{url}: {out:?}");
        assert!(out.stderr.starts_with("idem: "), "{out:?}");
    }
    let out = idem(&["--url", "foo://x", "stats"]);
    assert!(
        out.stderr.contains("unsupported store URL scheme"),
        "{out:?}"
    );
}

fn usage_errors_exit_2() {
    // No URL; no key; a malformed --key-json; a bad hashed key.
    let out = idem(&["stats"]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = idem(&["--url", "sqlite:x.db", "inspect", "--namespace", NS]);
    assert_eq!(out.code, 2, "{out:?}");
    let dir = tempdir("usage");
    let db = dir.join("u.db");
    std::fs::write(&db, b"").unwrap();
    let url = format!("sqlite:{}", db.display());
    let out = idem(&[
        "--url",
        &url,
        "inspect",
        "--namespace",
        NS,
        "--key-json",
        "{nope",
    ]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--key-json"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn unreachable_servers_exit_4() {
    let port = dead_port();
    for url in [
        format!("redis://127.0.0.1:{port}"),
        format!("postgres://postgres@127.0.0.1:{port}/test"),
        format!("mysql://root@127.0.0.1:{port}/test"),
    ] {
        let out = idem(&["--url", &url, "--timeout", "2", "stats"]);
        assert_eq!(out.code, 4, "{url}: {out:?}");
        assert!(out.stderr.contains(&format!("127.0.0.1:{port}")), "{out:?}");
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("idem-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sqlite_end_to_end() {
    let dir = tempdir("sqlite");
    let path = dir.join("idem.db");
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", path.display()))
        .table("cli_records")
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec![
        "--url".to_string(),
        format!("sqlite:{}", path.display()),
        "--table".into(),
        "cli_records".into(),
    ];
    story(&store, &base).await;
    // The default table does not exist in this file: a clear error, exit 4.
    let out = idem(&["--url", &base[1], "stats"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("table not found"), "{out:?}");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn redis_end_to_end() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("idem-cli-{}:", std::process::id());
    let store = idem_stores::RedisStore::builder(url.clone())
        .prefix(prefix.clone())
        .build()
        .await
        .unwrap();
    let base = vec!["--url".to_string(), url, "--prefix".into(), prefix];
    story(&store, &base).await;
}

async fn postgres_end_to_end() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let table = sql_common::unique_table("cli");
    let store = idem_stores::PostgresStore::builder()
        .url(url.clone())
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec!["--url".to_string(), url, "--table".into(), table.clone()];
    story(&store, &base).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

async fn mysql_end_to_end() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = sql_common::unique_table("cli");
    let store = idem_stores::MySqlStore::builder()
        .url(url.clone())
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec!["--url".to_string(), url, "--table".into(), table.clone()];
    story(&store, &base).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS `{table}`, `{table}_steps`"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

/// What docs/operations.md promises of `--key-json`: which Rust keys a JSON value finds.
fn json_keys_hash_like_their_rust_values() {
    use std::collections::{BTreeSet, HashMap};

    #[derive(serde::Serialize)]
    struct OrderId(u64);
    #[derive(serde::Serialize)]
    struct Composite {
        order: u64,
        tenant: String,
    }

    fn key_of<K: serde::Serialize>(k: K) -> idem_core::Key {
        Call::new(NS).key(k).identity().unwrap().unwrap().key
    }
    fn json(text: &str) -> idem_core::Key {
        key_of(serde_json::from_str::<Value>(text).unwrap())
    }

    assert_eq!(json("42"), key_of(42u32));
    assert_eq!(json("42"), key_of(42i64));
    assert_eq!(json("42"), key_of(OrderId(42)));
    assert_eq!(json("42"), key_of(Some(42u8)));
    assert_eq!(json("-7"), key_of(-7i16));
    assert_eq!(json("1.5"), key_of(1.5f64));
    assert_eq!(json("true"), key_of(true));
    assert_eq!(json("\"order-7\""), key_of("order-7"));
    assert_eq!(json("[1, \"a\"]"), key_of((1u8, "a")));
    assert_eq!(json("[3, 1, 2]"), key_of(vec![3u64, 1, 2]));
    assert_eq!(json("[1, 2, 3]"), key_of(BTreeSet::from([3u64, 1, 2])));
    let map = HashMap::from([("b".to_string(), 2u32), ("a".to_string(), 1)]);
    assert_eq!(json("{\"a\": 1, \"b\": 2}"), key_of(map));
    // Not reproducible as JSON: a struct (a JSON object is a map), a char.
    let s = Composite {
        order: 1,
        tenant: "t".into(),
    };
    assert_ne!(json("{\"order\": 1, \"tenant\": \"t\"}"), key_of(s));
    assert_ne!(json("\"x\""), key_of('x'));
    // The string "42" is not the number 42.
    assert_ne!(json("\"42\""), key_of(42u32));
}

fn main() -> std::process::ExitCode {
    use backends::{MYSQL, POSTGRES, REDIS};
    idem_testkit::harness::run([
        idem_testkit::test_cases!([], sync;
            bad_urls_exit_3, usage_errors_exit_2, unreachable_servers_exit_4,
            json_keys_hash_like_their_rust_values),
        idem_testkit::test_cases!([], current_thread; sqlite_end_to_end),
        idem_testkit::test_cases!([REDIS], current_thread; redis_end_to_end),
        idem_testkit::test_cases!([POSTGRES], current_thread; postgres_end_to_end),
        idem_testkit::test_cases!([MYSQL], current_thread; mysql_end_to_end),
    ])
}
