//! `idem`: inspect, forget, count and purge the records of an idem store (Redis, PostgreSQL,
//! MySQL/MariaDB, SQLite), by URL. Built with `--features cli`; documented in
//! `docs/operations.md`.
//!
//! Exit codes: 0 done; 1 no record for that (namespace, scope, key); 2 usage error; 3 bad URL
//! or configuration (unknown scheme, malformed URL, bad table name or prefix, missing SQLite
//! file); 4 the store is unreachable or failed (connection refused, timeout, missing table).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use idem_core::{
    Call, Error, Key, RecordInfo, RecordStatus, StepInfo, StepStatus, Store, StoreAdmin,
    StoreError, StoreStats,
};
use idem_stores::{MySqlStore, PostgresStore, RedisStore, SqliteStore};
use serde_json::{json, Value};

const NOT_FOUND: u8 = 1;
const USAGE: u8 = 2;
const BAD_CONFIG: u8 = 3;
const UNAVAILABLE: u8 = 4;

const ABOUT: &str = "Inspect, forget, count and purge the idempotency records that idem keeps \
in a Redis, PostgreSQL, MySQL/MariaDB or SQLite store.";

const AFTER_HELP: &str = "\
Exit codes:
  0  done
  1  no record for that (namespace, scope, key)
  2  usage error (missing or conflicting arguments, malformed --key-json or --hashed-key)
  3  bad URL or configuration (unknown scheme, malformed URL, bad table or prefix, no SQLite file)
  4  the store is unreachable or failed (connection refused, timeout, table not found)

Examples:
  idem --url redis://127.0.0.1:6379 inspect --namespace shop::payments::charge --key order-7
  idem --url redis://127.0.0.1:6379 --prefix app:idem: forget --hashed-key 4f9c...e1
  idem --url postgres://ops@db/app --table payments_idempotency stats
  idem --url postgres://ops@db/app purge-expired --batch 5000
  idem --url mysql://ops@db/app --json inspect --namespace shop::orders::place --key-json 42
  idem --url sqlite:/var/lib/app/idem.db forget --namespace shop::payments::charge --key order-7

With --json every result and every error (usage errors included) is one JSON object on
stdout; 64-bit numbers (tokens, sizes, counts, milliseconds) are JSON strings.";

/// Inspect, forget, count and purge the records of an idem store.
#[derive(Parser, Debug)]
#[command(
    name = "idem",
    version,
    about = ABOUT,
    long_about = None,
    after_help = AFTER_HELP,
    override_usage = "idem --url URL [--table TABLE | --prefix PREFIX] [--json] [--timeout SECS] <COMMAND>"
)]
struct Cli {
    /// The store: redis://host:port[/db], postgres://user@host/db, mysql://user@host/db,
    /// sqlite:path (or sqlite://path).
    #[arg(long, env = "IDEM_URL", global = true)]
    url: Option<String>,
    /// The SQL table (default idem_records).
    #[arg(long, global = true, conflicts_with = "prefix")]
    table: Option<String>,
    /// The Redis key prefix (default `idem:`).
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds allowed to connect and for each store operation (at least 1).
    #[arg(long, default_value_t = 5, global = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show one record: state, fingerprint; a completed one's TTL left, compatibility tag and
    /// size; a claim's holder token, age, lease left and renewals (a live holder's renewals
    /// grow and its lease keeps moving; a dead holder's lease runs out); its durable steps.
    #[command(override_usage = TARGET_USAGE_INSPECT)]
    Inspect(Target),
    /// Remove one record, whatever its state: the next call runs the body again.
    #[command(override_usage = TARGET_USAGE_FORGET)]
    Forget(Target),
    /// Count the store's records by state, with the age of the oldest claim and the claims
    /// whose lease passed with nobody taking them over (dead holders).
    Stats,
    /// Remove every expired record, in batches (SQL stores; Redis expires its own).
    PurgeExpired {
        /// Records removed per statement (each batch is one short transaction).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
    },
}

const TARGET_USAGE_INSPECT: &str =
    "idem inspect --namespace NS (--key KEY | --key-json JSON) [--scope SCOPE | --scope-json JSON]
       idem inspect --hashed-key HEX";
const TARGET_USAGE_FORGET: &str =
    "idem forget --namespace NS (--key KEY | --key-json JSON) [--scope SCOPE | --scope-json JSON]
       idem forget --hashed-key HEX";

/// Which record: (namespace, scope, key) hashed as the runtime does, or the hashed key.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["key", "key_json", "hashed_key"])))]
struct Target {
    /// The namespace: the function's module path and name (`my_crate::payments::charge`)
    /// unless pinned with `namespace = "..."`.
    #[arg(long, required_unless_present = "hashed_key")]
    namespace: Option<String>,
    /// A string key (what `key = order_id` gives when `order_id` is a `String` or `&str`).
    #[arg(long, conflicts_with = "key_json")]
    key: Option<String>,
    /// Any key as JSON, hashed with serde's shape of the JSON value (numbers, strings,
    /// arrays, bools; a JSON object is a map, not a struct: see docs/operations.md).
    #[arg(long)]
    key_json: Option<String>,
    /// The 64-hex-digit hashed key, as logs and the store show it (skips the namespace).
    #[arg(long, conflicts_with_all = ["namespace", "scope", "scope_json"])]
    hashed_key: Option<String>,
    /// A string scope (tenant, principal).
    #[arg(long, conflicts_with = "scope_json")]
    scope: Option<String>,
    /// Any scope as JSON.
    #[arg(long)]
    scope_json: Option<String>,
}

/// An error and the exit code it ends the program with.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// A store error as an exit code 4: `what` was being done, then what happened, in the
/// server's or the system's words.
fn unavailable(what: &str, e: &StoreError) -> Failure {
    Failure::new(UNAVAILABLE, format!("{what}: {}", cause(e)))
}

/// What happened, read from the error's chain: a refused connection, a missing table, a
/// timeout, or the innermost error's own text (never the store's internal operation names).
fn cause(e: &StoreError) -> String {
    if let StoreError::Timeout(d) = e {
        return format!(
            "no answer within {d:?} (is the server running, and reachable at that address?)"
        );
    }
    let mut innermost: &(dyn std::error::Error + 'static) = e;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(text) = known_cause(err) {
            return text;
        }
        innermost = err;
        next = err.source();
    }
    if std::ptr::addr_eq(innermost, e as &dyn std::error::Error) {
        return e.to_string();
    }
    innermost.to_string()
}

const TABLE_NOT_FOUND: &str = "table not found, pass --table or run migrate()";

fn known_cause(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return io_cause(io);
    }
    if let Some(e) = err.downcast_ref::<sqlx::Error>() {
        return match e {
            sqlx::Error::Io(io) => io_cause(io),
            sqlx::Error::PoolTimedOut => Some(
                "no connection within the timeout (is the server running, and reachable at \
                 that address?)"
                    .into(),
            ),
            sqlx::Error::Database(db) => {
                let code = db.code();
                let missing = matches!(code.as_deref(), Some("42P01" | "42S02" | "1146"))
                    || db.message().contains("no such table");
                missing.then(|| format!("{TABLE_NOT_FOUND} ({})", db.message()))
            }
            _ => None,
        };
    }
    if let Some(e) = err.downcast_ref::<redis::RedisError>() {
        if e.is_connection_refusal() {
            return Some("connection refused".into());
        }
    }
    None
}

fn io_cause(io: &std::io::Error) -> Option<String> {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => Some("connection refused".into()),
        std::io::ErrorKind::TimedOut => Some(
            "connection timed out (is the server running, and reachable at that address?)".into(),
        ),
        _ => None,
    }
}

fn main() -> ExitCode {
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e, json),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idem: cannot start the runtime: {e}");
            return ExitCode::from(UNAVAILABLE);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                println!("{}", json!({ "error": f.message, "exit_code": f.code }));
            }
            eprintln!("idem: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A command line clap refused (or `--help`, `--version`): clap's text on a terminal, or with
/// `--json` also one JSON object on stdout.
fn usage_error(e: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if json {
        // clap's message without its "error: " prefix and its usage and help hints.
        let text = e.render().to_string();
        let message = text
            .split("\n\n")
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .trim()
            .to_string();
        println!("{}", json!({ "error": message, "exit_code": USAGE }));
    }
    let _ = e.print();
    ExitCode::from(USAGE)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let url = cli
        .url
        .clone()
        .ok_or_else(|| Failure::new(USAGE, "no store URL: pass --url or set IDEM_URL"))?;
    let timeout = Duration::from_secs(cli.timeout);
    // A key that cannot be hashed is a usage error, found before connecting.
    let record = match &cli.command {
        Command::Inspect(target) | Command::Forget(target) => Some(record_key(target)?),
        _ => None,
    };
    let store = open(&url, &cli, timeout).await?;
    match (&cli.command, record) {
        (Command::Inspect(target), Some(record)) => {
            inspect(&*store, target, record, cli.json).await
        }
        (Command::Forget(target), Some(record)) => forget(&*store, target, record, cli.json).await,
        (Command::Inspect(_) | Command::Forget(_), None) => {
            Err(Failure::new(USAGE, "no record named"))
        }
        (Command::Stats, _) => {
            let stats = store.stats().await.map_err(|e| unavailable("stats", &e))?;
            print_stats(&stats, cli.json);
            Ok(())
        }
        (Command::PurgeExpired { batch }, _) => purge(&*store, *batch, cli.json).await,
    }
}

/// Purges batch after batch until one comes back short: everything that was expired when
/// the run started is gone. Progress goes to stderr on a terminal.
async fn purge(store: &dyn StoreAdmin, batch: u32, json: bool) -> Result<(), Failure> {
    let progress = std::io::stderr().is_terminal();
    let mut total: u64 = 0;
    let mut batches: u64 = 0;
    loop {
        let n = store.purge_expired(batch).await.map_err(|e| {
            let f = unavailable("purge-expired", &e);
            Failure::new(
                f.code,
                format!("{} (after {total} record(s) purged)", f.message),
            )
        })?;
        total += n;
        batches += 1;
        if progress && n > 0 {
            eprint!("\rpurged {total} expired record(s) in {batches} batch(es)...");
        }
        if n < u64::from(batch) {
            break;
        }
    }
    if progress && total > 0 {
        eprintln!();
    }
    if json {
        println!(
            "{}",
            json!({ "purged": total.to_string(), "batches": batches.to_string() })
        );
    } else {
        println!("purged {total} expired record(s) in {batches} batch(es)");
    }
    Ok(())
}

/// One direct connection to a SQL server, before the pool: a refused connection or a failed
/// login is reported at once in the server's words, where a pool would retry until its
/// timeout and then say only that it timed out.
async fn probe_sql<C>(url: &str, timeout: Duration) -> Result<(), Failure>
where
    C: sqlx::Connection,
{
    let what = format!("cannot connect to {}", redact(url));
    match tokio::time::timeout(timeout, C::connect(url)).await {
        Err(_) => Err(unavailable(&what, &StoreError::Timeout(timeout))),
        Ok(Err(e)) => Err(unavailable(&what, &StoreError::backend("connect", e))),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
    }
}

/// Connects to the store the URL names; checks that it answers.
async fn open(url: &str, cli: &Cli, timeout: Duration) -> Result<Box<dyn StoreAdmin>, Failure> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    let config = |e: StoreError| Failure::new(BAD_CONFIG, format!("bad store URL or option: {e}"));
    if cli.prefix.is_some() && !matches!(scheme, "redis" | "valkey") {
        return Err(Failure::new(
            USAGE,
            "--prefix is for Redis URLs (use --table for SQL)",
        ));
    }
    if cli.table.is_some() && matches!(scheme, "redis" | "valkey") {
        return Err(Failure::new(
            USAGE,
            "--table is for SQL URLs (use --prefix for Redis)",
        ));
    }
    let store: Box<dyn StoreAdmin> = match scheme {
        "redis" | "valkey" => {
            // Parse first: a malformed URL is a configuration error, not an outage.
            let client = redis::Client::open(url)
                .map_err(|e| Failure::new(BAD_CONFIG, format!("bad Redis URL: {e}")))?;
            let mut b = RedisStore::builder_from_client(client)
                .connect_timeout(timeout)
                .command_timeout(timeout);
            if let Some(p) = &cli.prefix {
                b = b.prefix(p.clone());
            }
            let store = b.build().await.map_err(|e| {
                unavailable(&format!("cannot connect to Redis at {}", redact(url)), &e)
            })?;
            Box::new(store)
        }
        "postgres" | "postgresql" => {
            let mut b = PostgresStore::builder()
                .url(url)
                .acquire_timeout(timeout)
                .operation_timeout(timeout)
                .max_connections(2);
            if let Some(t) = &cli.table {
                b = b.table(t.clone());
            }
            // Build first: a malformed URL is a configuration error, not an outage.
            let store = b.build().map_err(config)?;
            probe_sql::<sqlx::PgConnection>(url, timeout).await?;
            Box::new(store)
        }
        "mysql" | "mariadb" => {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let mut b = MySqlStore::builder()
                .url(url.clone())
                .acquire_timeout(timeout)
                .operation_timeout(timeout)
                .max_connections(2);
            if let Some(t) = &cli.table {
                b = b.table(t.clone());
            }
            let store = b.build().map_err(config)?;
            probe_sql::<sqlx::MySqlConnection>(&url, timeout).await?;
            Box::new(store)
        }
        "sqlite" => {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or("");
            if path.is_empty() || path == ":memory:" {
                return Err(Failure::new(
                    BAD_CONFIG,
                    "a SQLite URL must name a database file (sqlite:path/to/idem.db)",
                ));
            }
            // The store would create a missing file: an operator's typo must not.
            if !std::path::Path::new(path).exists() {
                return Err(Failure::new(
                    BAD_CONFIG,
                    format!("no SQLite database file at {path:?}"),
                ));
            }
            let mut b = SqliteStore::builder()
                .url(url)
                .acquire_timeout(timeout)
                .operation_timeout(timeout)
                .max_connections(2);
            if let Some(t) = &cli.table {
                b = b.table(t.clone());
            }
            Box::new(b.build().map_err(config)?)
        }
        other => {
            return Err(Failure::new(
                BAD_CONFIG,
                format!(
                    "unsupported store URL scheme {other:?}: use redis://, postgres://, \
                     mysql:// or sqlite:"
                ),
            ))
        }
    };
    // One read proves the store answers (and that a SQL table exists).
    store
        .get(&Key([0; 32]))
        .await
        .map_err(|e| unavailable(&format!("cannot read the store at {}", redact(url)), &e))?;
    Ok(store)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A JSON argument, or a usage error naming the flag.
fn parse_json(flag: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text)
        .map_err(|e| Failure::new(USAGE, format!("{flag}: not valid JSON: {e}")))
}

/// One record: its `Call` (unless named by hashed key), its key, a description for messages.
type Record = (Option<Call>, Key, String);

/// The record's key, hashed as the runtime hashes it, and a description for messages.
fn record_key(target: &Target) -> Result<Record, Failure> {
    if let Some(hex) = &target.hashed_key {
        let key = parse_hex_key(hex)?;
        return Ok((None, key, format!("hashed key {hex}")));
    }
    let namespace = target
        .namespace
        .clone()
        .ok_or_else(|| Failure::new(USAGE, "--namespace is required"))?;
    // `Call::new` takes the `&'static str` that `#[idempotent]` passes: leak one string
    // for the lifetime of this short-lived process.
    let ns: &'static str = Box::leak(namespace.into_boxed_str());
    let mut call = Call::new(ns);
    let mut what = format!("namespace {ns:?}");
    call = match (&target.key, &target.key_json) {
        (Some(k), _) => {
            what.push_str(&format!(", key {k:?}"));
            call.key(k.as_str())
        }
        (None, Some(j)) => {
            what.push_str(&format!(", key {j}"));
            call.key(parse_json("--key-json", j)?)
        }
        (None, None) => return Err(Failure::new(USAGE, "--key or --key-json is required")),
    };
    call = match (&target.scope, &target.scope_json) {
        (Some(s), _) => {
            what.push_str(&format!(", scope {s:?}"));
            call.scope(s.as_str())
        }
        (None, Some(j)) => {
            what.push_str(&format!(", scope {j}"));
            call.scope(parse_json("--scope-json", j)?)
        }
        (None, None) => call,
    };
    match call.identity() {
        Ok(Some(id)) => Ok((Some(call), id.key, what)),
        Ok(None) => Err(Failure::new(
            USAGE,
            "the key is JSON null: a missing key, which names no record",
        )),
        Err(e) => Err(Failure::new(USAGE, format!("cannot hash the key: {e}"))),
    }
}

fn parse_hex_key(hex: &str) -> Result<Key, Failure> {
    let bad = || Failure::new(USAGE, "--hashed-key: expected 64 hexadecimal digits");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Key(key))
}

fn not_found(what: &str, target: &Target) -> Failure {
    let hint = if target.hashed_key.is_some() {
        "the record expired, was released or forgotten, or the key is not this store's \
         (check --prefix / --table)"
    } else {
        "a store cannot list namespaces (they are hashed into the key): check the namespace \
         (the function's module path and name, e.g. my_crate::payments::charge, unless pinned \
         with `namespace = \"...\"`), the scope, the key's serde shape, and --prefix / --table; \
         or the record expired, was released or forgotten"
    };
    Failure::new(NOT_FOUND, format!("no record for {what}: {hint}"))
}

async fn inspect(
    store: &dyn StoreAdmin,
    target: &Target,
    (call, key, what): Record,
    json: bool,
) -> Result<(), Failure> {
    let store: &dyn Store = store;
    let shown = match call {
        // The documented API: the same (namespace, scope, key) the runtime uses.
        Some(call) => call
            .inspect(store)
            .await
            .map_err(|e| runtime_failure("inspect", e))?,
        None => {
            let state = store
                .get(&key)
                .await
                .map_err(|e| unavailable("inspect", &e))?;
            match state {
                Some(state) => {
                    let mut info = RecordInfo::from_state(key, state);
                    if store.supports_steps() {
                        let mut steps: Vec<StepInfo> = store
                            .load_steps(&key)
                            .await
                            .map_err(|e| unavailable("inspect", &e))?
                            .iter()
                            .map(StepInfo::from_record)
                            .collect();
                        steps.sort_by(|a, b| a.id.cmp(&b.id));
                        info.steps = steps;
                    }
                    Some(info)
                }
                None => None,
            }
        }
    };
    let Some(shown) = shown else {
        return Err(not_found(&what, target));
    };
    print_info(&shown, json);
    Ok(())
}

async fn forget(
    store: &dyn StoreAdmin,
    target: &Target,
    (call, key, what): Record,
    json: bool,
) -> Result<(), Failure> {
    let store: &dyn Store = store;
    let existed = store
        .get(&key)
        .await
        .map_err(|e| unavailable("forget", &e))?
        .is_some();
    match call {
        Some(call) => call
            .forget(store)
            .await
            .map_err(|e| runtime_failure("forget", e))?,
        None => store
            .remove(&key)
            .await
            .map_err(|e| unavailable("forget", &e))?,
    }
    if !existed {
        return Err(not_found(&what, target));
    }
    if json {
        println!("{}", json!({ "forgotten": key.to_hex() }));
    } else {
        println!("forgot {}: the next call runs the body again", key.to_hex());
    }
    Ok(())
}

/// An [`Error`] of the inspect/forget API: a store failure (4) or a key that cannot be
/// hashed (2).
fn runtime_failure(what: &str, e: Error) -> Failure {
    match e {
        Error::Store(e) => unavailable(what, &e),
        other => Failure::new(USAGE, format!("{what}: {other}")),
    }
}

fn print_info(info: &RecordInfo, json: bool) {
    let fingerprint = info.fingerprint.map(|f| f.to_hex());
    if json {
        // 64-bit numbers as strings: a JSON reader such as jq rounds numbers above 2^53.
        let mut v = json!({
            "key": info.key.to_hex(),
            "fingerprint": fingerprint,
            "tag": info.tag,
            "size": info.size.map(|n| n.to_string()),
            "steps": info.steps.iter().map(|s| json!({
                "name": s.id.name,
                "occurrence": s.id.occurrence,
                "status": step_status(s.status),
                "size": s.size.to_string(),
            })).collect::<Vec<_>>(),
        });
        match &info.status {
            RecordStatus::InProgress { token, times } => {
                v["status"] = json!("in_progress");
                v["token"] = json!(token.0.to_string());
                v["age_ms"] = json!(times.age.map(|d| d.as_millis().to_string()));
                v["lease_left_ms"] = json!(times.lease_left.map(|d| d.as_millis().to_string()));
                v["renewals"] = json!(times.renewals.map(|n| n.to_string()));
            }
            RecordStatus::Completed { expires_in } => {
                v["status"] = json!("completed");
                v["expires_in_ms"] = json!(expires_in.map(|d| d.as_millis().to_string()));
            }
            _ => v["status"] = json!("unknown"),
        }
        println!("{v}");
        return;
    }
    let mut rows: Vec<(&str, String)> = vec![("key", info.key.to_hex())];
    match &info.status {
        RecordStatus::InProgress { token, times } => {
            rows.push(("status", "in progress".into()));
            rows.push(("token", token.0.to_string()));
            rows.push(("age", times.age.map_or_else(|| "unknown".into(), human)));
            rows.push((
                "lease left",
                times.lease_left.map_or_else(|| "unknown".into(), human),
            ));
            rows.push((
                "renewals",
                times
                    .renewals
                    .map_or_else(|| "unknown".into(), |n| n.to_string()),
            ));
        }
        RecordStatus::Completed { expires_in } => {
            rows.push(("status", "completed".into()));
            rows.push((
                "expires in",
                expires_in.map_or_else(|| "unknown".into(), human),
            ));
        }
        _ => rows.push(("status", "unknown".into())),
    }
    rows.push(("fingerprint", fingerprint.unwrap_or_else(|| "none".into())));
    if let Some(tag) = &info.tag {
        rows.push(("tag", tag.clone()));
    }
    if let Some(size) = info.size {
        rows.push(("size", format!("{size} bytes")));
    }
    for s in &info.steps {
        rows.push((
            "step",
            format!("{} {} ({} bytes)", s.id, step_status(s.status), s.size),
        ));
    }
    table(&rows);
}

/// A durable step's status, as `inspect` prints it.
fn step_status(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Started => "started",
        StepStatus::Done => "done",
        StepStatus::Failed => "failed",
    }
}

fn print_stats(stats: &StoreStats, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "in_progress": stats.in_progress.to_string(),
                "completed": stats.completed.to_string(),
                "expired": stats.expired.map(|n| n.to_string()),
                "oldest_in_progress_ms": stats.oldest_in_progress.map(|d| d.as_millis().to_string()),
                "expired_unclaimed": stats.expired_unclaimed.map(|n| n.to_string()),
            })
        );
        return;
    }
    let unknown = || "n/a".to_string();
    table(&[
        ("in progress", stats.in_progress.to_string()),
        ("completed", stats.completed.to_string()),
        (
            "expired",
            stats.expired.map_or_else(unknown, |n| n.to_string()),
        ),
        (
            "oldest claim",
            stats.oldest_in_progress.map_or_else(unknown, human),
        ),
        (
            "expired unclaimed",
            stats
                .expired_unclaimed
                .map_or_else(unknown, |n| n.to_string()),
        ),
    ]);
}

fn table(rows: &[(&str, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:width$}  {v}");
    }
}

/// `1h 02m 03s`, `4.250s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m {:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}
