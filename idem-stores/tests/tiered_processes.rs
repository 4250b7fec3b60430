//! `TieredStore` in two OS processes over one shared SQLite file: each keeps the record in its
//! local tier, and after the record's TTL neither replays the old value (issue 11).
//!
//! The parent re-executes this test binary (`current_exe() --exact child_entry`) twice with
//! `IDEM_TIERED_CHILD` set to the database file; each child reads commands on stdin (`call N`:
//! run the call with a body answering `N`; `local`: is the record in the local tier?) and
//! answers `reply ...` lines on stdout.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use idem_core::{Call, Error, Store};
use idem_stores::{SqliteStore, TieredStore};

const CHILD: &str = "IDEM_TIERED_CHILD";
const TABLE: &str = "idem_tiered_processes";
const NS: &str = "tests::tiered::processes";
const TTL: Duration = Duration::from_secs(2);

/// The child's side: a long-lived process with its own local tier.
#[test]
fn child_entry() {
    let Ok(file) = std::env::var(CHILD) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shared = SqliteStore::builder()
            .url(format!("sqlite://{file}"))
            .table(TABLE)
            .connect()
            .await
            .expect("open");
        shared.migrate().await.expect("migrate");
        let store = TieredStore::new(shared).local_ttl(Duration::from_secs(60));
        let key = Call::new(NS).key("k").identity().unwrap().unwrap().key;
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.unwrap();
            let reply = match line.split_once(' ') {
                Some(("call", n)) => {
                    let n: u32 = n.parse().unwrap();
                    let r = Call::new(NS)
                        .key("k")
                        .ttl(TTL)
                        .run(&store, async move { Ok::<_, Error>(n) })
                        .await;
                    match r {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("error {e}"),
                    }
                }
                _ if line == "local" => store.completed_now(&key).is_some().to_string(),
                _ => "unknown command".to_string(),
            };
            println!("reply {reply}");
        }
    });
}

struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Process {
    fn start(file: &std::path::Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Process {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "child exited"
            );
            // The harness may have printed "test child_entry ... " on the same line.
            if let Some((_, reply)) = line.trim_end().split_once("reply ") {
                return reply.to_string();
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn after_the_ttl_no_process_replays_the_old_value() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("idem-tiered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shared.db");
    let mut a = Process::start(&file);
    assert_eq!(a.ask("call 1"), "1", "A runs the body");
    let mut b = Process::start(&file);
    assert_eq!(b.ask("call 2"), "1", "B replays A's record");
    assert_eq!(a.ask("local"), "true", "A keeps its completion locally");
    assert_eq!(
        b.ask("local"),
        "true",
        "B keeps the replayed record locally"
    );
    assert_eq!(b.ask("call 2"), "1");

    std::thread::sleep(TTL + Duration::from_millis(300));
    assert_eq!(
        a.ask("local"),
        "false",
        "A's local copy expired with the TTL"
    );
    assert_eq!(
        b.ask("local"),
        "false",
        "B's local copy expired with the TTL"
    );
    assert_eq!(a.ask("call 3"), "3", "past the TTL, A runs the body again");
    let from_b = b.ask("call 4");
    assert_ne!(from_b, "1", "B replayed a value past its TTL");
    assert_eq!(from_b, "3", "B replays A's new record");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
