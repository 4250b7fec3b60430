//! Test keys on the shared Redis (`IDEM_TEST_REDIS_URL`): a test binary writes under a prefix
//! of its own process and deletes everything under it when it is done, so that a run leaves no
//! keys behind.
#![allow(dead_code)]

/// `idem-test:<what>:<pid>:`, this process's own prefix (no braces: a store prefix may not
/// contain them).
pub fn process_prefix(what: &str) -> String {
    format!("idem-test:{what}:{}:", std::process::id())
}

/// The variable through which a test hands its prefix to the child processes it starts.
pub const PREFIX_VAR: &str = "IDEM_TEST_REDIS_PREFIX";

/// The run's prefix: the parent's, in a child process ([`PREFIX_VAR`]); else this process's
/// own ([`process_prefix`]).
pub fn run_prefix(what: &str) -> String {
    std::env::var(PREFIX_VAR).unwrap_or_else(|_| process_prefix(what))
}

/// True in the process that owns the run's prefix (not a child given it): the one that
/// deletes it at the end.
pub fn owns_prefix() -> bool {
    std::env::var_os(PREFIX_VAR).is_none()
}

/// Deletes every key under `prefix` (`SCAN MATCH`, then `DEL` in batches). Best effort: a
/// server that cannot be reached is left as it is.
pub async fn delete_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = {
        let Ok(mut it) =
            redis::AsyncCommands::scan_match::<_, String>(&mut con, format!("{prefix}*")).await
        else {
            return;
        };
        let mut keys = Vec::new();
        while let Some(Ok(k)) = it.next_item().await {
            keys.push(k);
        }
        keys
    };
    for chunk in keys.chunks(100) {
        let _: Result<(), _> = redis::AsyncCommands::del(&mut con, chunk).await;
    }
}

/// [`delete_prefix`] from a plain `main` (a harness's, after its cases ran), on a runtime of
/// its own; nothing without a URL.
pub fn delete_prefix_blocking(url: Option<String>, prefix: &str) {
    let Some(url) = url else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(delete_prefix(&url, prefix));
}
