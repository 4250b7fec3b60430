//! The `idem` tool's errors and output contract, against the real binary: a refused
//! PostgreSQL/MySQL/Redis connection is reported at once as "connection refused"; a missing
//! table says so and names the fix; `--json` prints every error (usage errors included) as
//! JSON on stdout, with 64-bit numbers as strings; `purge-expired` purges everything, batch
//! after batch; `--timeout 0` is refused; `--help` describes the tool.
//!
//! Backend tests need `IDEM_TEST_POSTGRES_URL`, `IDEM_TEST_MYSQL_URL`, `IDEM_TEST_REDIS_URL`
//! (skipped without them). SQLite needs nothing.
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

use idem_core::{Call, ClaimRequest, Error, FencingToken, Store, StoreAdmin};
use serde_json::Value;

const NS: &str = "cli_errors::charge";

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `idem` with `args`; killed (and the test failed) after 30 s.
fn idem<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env_remove("IDEM_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idem");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("idem did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    let (mut stdout, mut stderr) = (String::new(), String::new());
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
        code: status.code().expect("exited"),
        stdout,
        stderr,
        took,
    }
}

/// The one JSON object a `--json` run printed on stdout.
fn json_of(run: &Run) -> Value {
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {run:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {run:?}"))
}

fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// What every error message must not show: the store's internal operation names.
fn no_internal_prefix(run: &Run) {
    for bad in ["get:", "store backend error", "pool timed out"] {
        assert!(!run.stderr.contains(bad), "{bad:?} in {run:?}");
    }
}

fn a_refused_sql_or_redis_connection_is_reported_at_once() {
    let port = dead_port();
    for url in [
        format!("postgres://postgres@127.0.0.1:{port}/test"),
        format!("mysql://root@127.0.0.1:{port}/test"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        let out = idem(&["--url", &url, "stats"]);
        assert_eq!(out.code, 4, "{url}: {out:?}");
        assert!(out.stderr.contains("connection refused"), "{url}: {out:?}");
        assert!(
            out.took < Duration::from_millis(1500),
            "{url}: took {:?}",
            out.took
        );
        no_internal_prefix(&out);
        // The same error as JSON on stdout.
        let out = idem(&["--url", &url, "--json", "stats"]);
        let v = json_of(&out);
        assert_eq!(v["exit_code"], 4, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("connection refused"),
            "{v}"
        );
    }
}

fn missing_table(url: &str) {
    let out = idem(&["--url", url, "--table", "idem_no_such_table", "stats"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr
            .contains("table not found, pass --table or run migrate()"),
        "{out:?}"
    );
    no_internal_prefix(&out);
    let out = idem(&[
        "--url",
        url,
        "--table",
        "idem_no_such_table",
        "--json",
        "inspect",
        "--namespace",
        NS,
        "--key",
        "k",
    ]);
    let v = json_of(&out);
    assert_eq!(v["exit_code"], 4, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("table not found"),
        "{v}"
    );
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("idem-cli-errors-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn a_missing_table_names_the_fix_sqlite() {
    let dir = tempdir("table");
    let db = dir.join("empty.db");
    std::fs::write(&db, b"").unwrap();
    missing_table(&format!("sqlite:{}", db.display()));
    let _ = std::fs::remove_dir_all(&dir);
}

fn a_missing_table_names_the_fix_postgres() {
    if let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") {
        missing_table(&url);
    }
}

fn a_missing_table_names_the_fix_mysql() {
    if let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") {
        missing_table(&url);
    }
}

fn json_mode_prints_usage_errors_as_json() {
    for args in [
        &["--json", "stats"][..],                 // no URL
        &["--json", "inspect", "--key", "k"][..], // no namespace
        &["--json", "--url", "sqlite:x.db", "--timeout", "0", "stats"][..],
        &[
            "--json",
            "--url",
            "sqlite:x.db",
            "--table",
            "t",
            "--prefix",
            "p",
            "stats",
        ][..],
        &["--json", "--url", "sqlite:x.db", "no-such-command"][..],
        &[
            "--json",
            "--url",
            "sqlite:x.db",
            "purge-expired",
            "--batch",
            "0",
        ][..],
    ] {
        let out = idem(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        let v = json_of(&out);
        assert_eq!(v["exit_code"], 2, "{args:?}: {v}");
        let message = v["error"].as_str().unwrap();
        assert!(!message.is_empty() && !message.starts_with("error:"), "{v}");
        // And the message for a person on stderr.
        assert!(!out.stderr.is_empty(), "{out:?}");
    }
}

fn a_zero_timeout_is_refused() {
    let out = idem(&["--url", "sqlite:x.db", "--timeout", "0", "stats"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--timeout"), "{out:?}");
}

fn help_describes_the_tool_with_exit_codes_and_examples_per_store() {
    let out = idem(&["--help"]);
    assert_eq!(out.code, 0, "{out:?}");
    let help = out.stdout;
    assert!(help.contains("idempotency records"), "{help}");
    assert!(
        !help.contains("Stores for idem"),
        "the crate's description: {help}"
    );
    assert!(help.contains("Exit codes"), "{help}");
    for code in ["0 ", "1 ", "2 ", "3 ", "4 "] {
        assert!(
            help.contains(&format!("  {code}")),
            "exit code {code}: {help}"
        );
    }
    for store in ["redis://", "postgres://", "mysql://", "sqlite:"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with("idem --url") && l.contains(store)),
            "no example for {store}: {help}"
        );
    }
    // No usage line offers flags that conflict.
    for args in [
        &["--help"][..],
        &["inspect", "--help"][..],
        &["forget", "--help"][..],
    ] {
        let out = idem(args);
        // The usage block: from "Usage:" to the first blank line.
        let usage = out
            .stdout
            .lines()
            .skip_while(|l| !l.starts_with("Usage:"))
            .take_while(|l| !l.trim().is_empty());
        for line in usage {
            let line = line.trim();
            let conflicting = [
                ("--namespace", "--hashed-key"),
                ("--scope", "--hashed-key"),
                ("--key ", "--hashed-key"),
            ];
            for (a, b) in conflicting {
                assert!(!(line.contains(a) && line.contains(b)), "{line}");
            }
            assert!(
                !line.contains("--table") || line.contains("--table TABLE | --prefix"),
                "{line}"
            );
        }
    }
}

/// A claim in progress shows its token as a string, exactly.
async fn token_is_a_string(store: &dyn Store, base: &[String]) {
    let ident = Call::new(NS)
        .key("held")
        .identity_for(store)
        .unwrap()
        .unwrap();
    // A token above 2^53: a JSON number would be rounded.
    let token = FencingToken((1u64 << 62) + 12345);
    store
        .claim(&ClaimRequest {
            key: ident.key,
            fingerprint: None,
            token,
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap();
    let mut args = base.to_vec();
    args.extend(["--json", "inspect", "--namespace", NS, "--key", "held"].map(String::from));
    let out = idem(&args);
    assert_eq!(out.code, 0, "{out:?}");
    let v = json_of(&out);
    assert_eq!(v["status"], "in_progress", "{v}");
    assert_eq!(v["token"], Value::String(token.0.to_string()), "{v}");
    store.remove(&ident.key).await.unwrap();
}

/// 25 expired records and `--batch 10`: one run removes all 25.
async fn purge_removes_everything(store: &dyn StoreAdmin, base: &[String]) {
    for i in 0..25 {
        Call::new(NS)
            .key(format!("expired-{i}").as_str())
            .ttl(Duration::from_millis(50))
            .run(store, async { Ok::<_, Error>(i) })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut args = base.to_vec();
    args.extend(["--json", "purge-expired", "--batch", "10"].map(String::from));
    let out = idem(&args);
    assert_eq!(out.code, 0, "{out:?}");
    let v = json_of(&out);
    assert_eq!(v["purged"], "25", "{v}");
    assert_eq!(v["batches"], "3", "{v}");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.completed, 0, "{stats:?}");
    assert_eq!(stats.expired, Some(0), "{stats:?}");
    // Human output says how many.
    let mut args = base.to_vec();
    args.extend(["purge-expired"].map(String::from));
    let out = idem(&args);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("purged 0 expired record(s)"), "{out:?}");
}

async fn sqlite_tokens_are_strings_and_purge_removes_everything() {
    let dir = tempdir("sqlite");
    let path = dir.join("idem.db");
    let store = idem_stores::SqliteStore::builder()
        .url(format!("sqlite://{}", path.display()))
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec!["--url".to_string(), format!("sqlite:{}", path.display())];
    token_is_a_string(&store, &base).await;
    purge_removes_everything(&store, &base).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn postgres_tokens_are_strings_and_purge_removes_everything() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let table = sql_common::unique_table("clierr");
    let store = idem_stores::PostgresStore::builder()
        .url(url.clone())
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec!["--url".to_string(), url, "--table".into(), table.clone()];
    token_is_a_string(&store, &base).await;
    purge_removes_everything(&store, &base).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{table}\", \"{table}_steps\""
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

async fn mysql_tokens_are_strings_and_purge_removes_everything() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_MYSQL_URL") else {
        return;
    };
    let table = sql_common::unique_table("clierr");
    let store = idem_stores::MySqlStore::builder()
        .url(url.clone())
        .table(&table)
        .connect()
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let base = vec!["--url".to_string(), url, "--table".into(), table.clone()];
    token_is_a_string(&store, &base).await;
    purge_removes_everything(&store, &base).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS `{table}`, `{table}_steps`"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

async fn redis_tokens_are_strings() {
    let Some(url) = idem_testkit::env_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("idem-cli-errors-{}:", std::process::id());
    let store = idem_stores::RedisStore::builder(url.clone())
        .prefix(prefix.clone())
        .build()
        .await
        .unwrap();
    let base = vec!["--url".to_string(), url, "--prefix".into(), prefix];
    token_is_a_string(&store, &base).await;
    // Redis expires records itself: purge-expired has nothing to do, and says so.
    let mut args = base.clone();
    args.extend(["--json", "purge-expired"].map(String::from));
    let out = idem(&args);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json_of(&out)["purged"], "0");
}

fn main() -> std::process::ExitCode {
    use backends::{MYSQL, POSTGRES, REDIS};
    use idem_testkit::test_cases;
    idem_testkit::harness::run([
        test_cases!([], sync;
            a_refused_sql_or_redis_connection_is_reported_at_once,
            a_missing_table_names_the_fix_sqlite,
            json_mode_prints_usage_errors_as_json,
            a_zero_timeout_is_refused,
            help_describes_the_tool_with_exit_codes_and_examples_per_store),
        test_cases!([POSTGRES], sync; a_missing_table_names_the_fix_postgres),
        test_cases!([MYSQL], sync; a_missing_table_names_the_fix_mysql),
        test_cases!([], current_thread; sqlite_tokens_are_strings_and_purge_removes_everything),
        test_cases!([POSTGRES], current_thread; postgres_tokens_are_strings_and_purge_removes_everything),
        test_cases!([MYSQL], current_thread; mysql_tokens_are_strings_and_purge_removes_everything),
        test_cases!([REDIS], current_thread; redis_tokens_are_strings),
    ])
}
