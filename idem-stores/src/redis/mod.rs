//! `RedisStore`: records in Redis (or Valkey), a single server or a Redis Cluster.
//!
//! - **One key per record**, `{prefix}{<key hex>}`: a hash whose fields are described in
//!   `scripts.rs`. The hex sits in a hash tag, so everything about one record lives in one
//!   Cluster slot.
//! - **Every operation is one Lua script** on that key, loaded once and invoked by hash
//!   (`EVALSHA`, reloaded on `NOSCRIPT`). The claim script decides absent / expired /
//!   completed / in progress / lease passed in one atomic step, on the server's clock.
//!   Complete, release and renew compare the fencing token inside their script.
//! - **Expiry is Redis's own** (`PEXPIRE`): a completed record lives for its ttl, an
//!   in-progress one for its lease plus a grace period (to report takeovers). The scripts also
//!   check the stored deadline, so a record Redis has not dropped yet is never replayed late.
//! - **Waiting**: completing, releasing or removing a record publishes its key hex on one
//!   store-wide channel; one subscriber connection per store wakes the local waiters
//!   (`notify.rs`). While that connection is down, waiters poll with a bounded backoff.
//! - **Connections**: a `ConnectionManager` (single server) or an async cluster connection,
//!   both reconnecting on their own: the store survives a server restart without being
//!   rebuilt. Every command is bounded by the command timeout ([`StoreError::Timeout`]).
//!
//! What Redis must promise for the guarantees to hold (persistence, `noeviction`, failover)
//! is in `docs/stores/redis.md`.

mod builder;
mod notify;
mod reply;
mod scripts;

pub use self::builder::RedisStoreBuilder;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::ConnectionManager;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, RedisError, ScriptInvocation, Value};
use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError,
};

use self::builder::Target;
use self::notify::Waiters;
use self::reply::Looked;
use self::scripts::Scripts;

/// The longest ttl or lease honoured (100 years); longer ones are clamped.
const MAX_DURATION_MS: u64 = 100 * 365 * 86_400 * 1000;
/// Polling backoff while notifications are unavailable.
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(250);

/// A store on Redis or Valkey: one server, or a Redis Cluster. Cheap to clone (clones share
/// the connection and the subscriber).
///
/// ```no_run
/// use std::sync::Arc;
/// use idem_stores::RedisStore;
///
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
/// let store: Arc<dyn idem_core::Store> = Arc::new(store);
/// # let _ = store;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    scripts: Scripts,
    prefix: String,
    channel: String,
    command_timeout: Duration,
    max_value_size: usize,
    lease_grace: Duration,
    waiters: Arc<Waiters>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match i.conn {
                    Conn::Single(_) => "single",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &i.prefix)
            .field("command_timeout", &i.command_timeout)
            .field("max_value_size", &i.max_value_size)
            .field("notifications_live", &i.waiters.live())
            .finish()
    }
}

fn backend(what: &str, e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout(timeout)
    } else {
        StoreError::backend(what.to_string(), e)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DURATION_MS)
}

impl RedisStore {
    /// Connects to one server by URL (`redis://[user:password@]host:port[/db]`), with the
    /// default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).build().await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each).
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::cluster_builder(nodes).build().await
    }

    /// Uses a `redis::Client` the application already has.
    pub async fn from_client(client: Client) -> Result<Self, StoreError> {
        Self::builder_from_client(client).build().await
    }

    /// A builder for one server by URL.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Url(url.into()))
    }

    /// A builder for one server from an existing `redis::Client`.
    pub fn builder_from_client(client: Client) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Client(client))
    }

    /// A builder for a Redis Cluster, given any of its nodes.
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder::new(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// The Redis key of a record: `{prefix}{<key hex>}`.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_stores::RedisStore) {
    /// let name = store.redis_key(&idem_core::Key([0xab; 32]));
    /// assert!(name.ends_with("{abababababababababababababababababababababababababababababababab}"));
    /// # }
    /// ```
    pub fn redis_key(&self, key: &Key) -> String {
        format!("{}{{{}}}", self.inner.prefix, key.to_hex())
    }

    /// The channel on which completions and releases are published.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// True while the store's subscriber connection is subscribed (waiters are woken by
    /// notifications); false while they fall back to polling.
    pub fn notifications_live(&self) -> bool {
        self.inner.waiters.live()
    }

    /// Runs one script invocation, bounded by the command timeout.
    async fn eval(
        &self,
        what: &'static str,
        inv: &ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        let timeout = self.inner.command_timeout;
        let run = async {
            match &self.inner.conn {
                Conn::Single(c) => inv.invoke_async::<Value>(&mut c.clone()).await,
                Conn::Cluster(c) => inv.invoke_async::<Value>(&mut c.clone()).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(backend(what, e, timeout)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    async fn look(&self, key: &Key) -> Result<Looked, StoreError> {
        let mut inv = self.inner.scripts.get.prepare_invoke();
        inv.key(self.redis_key(key));
        reply::look(&self.eval("redis get", &inv).await?)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        inv.key(self.redis_key(&req.key))
            .arg(req.token.0.to_string())
            .arg(req.fingerprint.map(|f| f.0.to_vec()).unwrap_or_default())
            .arg(millis(req.lease))
            .arg(millis(self.inner.lease_grace).max(1));
        reply::claim(&self.eval("redis claim", &inv).await?)
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if value.len() > self.inner.max_value_size {
            return Err(StoreError::TooLarge {
                size: value.len(),
                limit: self.inner.max_value_size,
            });
        }
        let mut inv = self.inner.scripts.complete.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(token.0.to_string())
            .arg(value)
            .arg(millis(ttl))
            .arg(&self.inner.channel)
            .arg(key.to_hex());
        reply::fenced(&self.eval("redis complete", &inv).await?)
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(token.0.to_string())
            .arg(&self.inner.channel)
            .arg(key.to_hex());
        reply::fenced(&self.eval("redis release", &inv).await?)
    }

    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.renew.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(token.0.to_string())
            .arg(millis(lease))
            .arg(millis(self.inner.lease_grace).max(1));
        reply::fenced(&self.eval("redis renew", &inv).await?)
    }

    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        Ok(self.look(key).await?.into_state())
    }

    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        // Register before looking: a completion published after the look wakes us.
        let registration = self.inner.waiters.register(key.to_hex());
        let mut backoff = POLL_MIN;
        loop {
            let notified = registration.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let live = self.inner.waiters.live();
            let remaining = match self.look(key).await {
                Ok(Looked::InProgress { remaining, .. }) => remaining,
                Ok(Looked::None | Looked::Completed(_)) => return Ok(()),
                // Foreign data is not a blip: say so at once.
                Err(e @ StoreError::Corrupt(_)) => return Err(e),
                // A connection blip or a slow server: look again until the wait is over, and
                // then let the caller claim again (which reports the error if it persists).
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(());
                    }
                    tracing::debug!(error = %e, %key, "idem redis: waiter's look failed; retrying");
                    let nap = backoff.min(deadline - now);
                    backoff = (backoff * 2).min(POLL_MAX);
                    tokio::time::sleep(nap).await;
                    continue;
                }
            };
            let now = Instant::now();
            // The holder's lease ends (by the server's clock) `remaining` from now: a crashed
            // holder publishes nothing, so stop then and let the caller take over.
            let until = deadline.min(now + remaining + Duration::from_millis(1));
            if now >= until {
                return Ok(());
            }
            let sleep = if live {
                until - now
            } else {
                let s = backoff.min(until - now);
                backoff = (backoff * 2).min(POLL_MAX);
                s
            };
            tokio::select! {
                // The record changed (completed, released, removed), or the subscription
                // did: either way the caller claims again, which is the next look.
                _ = notified => return Ok(()),
                _ = tokio::time::sleep(sleep) => {
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.remove.prepare_invoke();
        inv.key(self.redis_key(key))
            .arg(&self.inner.channel)
            .arg(key.to_hex());
        self.eval("redis remove", &inv).await.map(drop)
    }

    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }

    fn max_value_size(&self) -> usize {
        self.inner.max_value_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped_to_what_redis_accepts() {
        assert_eq!(millis(Duration::from_millis(250)), 250);
        assert_eq!(millis(Duration::MAX), MAX_DURATION_MS);
    }
}
