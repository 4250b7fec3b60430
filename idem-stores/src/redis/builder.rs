//! Configuring and connecting a [`RedisStore`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::{Client, ConnectionInfo, IntoConnectionInfo, RedisError};
use idem_core::{StoreError, DEFAULT_MAX_VALUE_SIZE};

use super::native::{Detected, Held, NativeCas, Recent};
use super::notify::{self, Waiters};
use super::scripts::Scripts;
use super::{backend, Conn, Inner, RedisStore, ServerClock, CLOCK_REFRESH};

/// Keys remembered as completed by default ([`RedisStoreBuilder::replay_hints`]).
const DEFAULT_REPLAY_HINTS: usize = 16_384;

/// Where a [`RedisStoreBuilder`] connects.
pub(super) enum Target {
    Url(String),
    Client(Box<Client>),
    Cluster(Vec<String>),
}

/// Configures a [`RedisStore`].
///
/// ```no_run
/// use std::time::Duration;
/// use idem_stores::RedisStore;
///
/// # async fn demo() -> Result<(), idem_core::StoreError> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .prefix("billing:idem:")
///     .connect_timeout(Duration::from_secs(2))
///     .command_timeout(Duration::from_millis(500))
///     .max_value_size(256 << 10)
///     .build()
///     .await?;
/// # let _ = store;
/// # Ok(()) }
/// ```
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_value_size: usize,
    lease_grace: Duration,
    replay_hints: usize,
    native_cas: NativeCas,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("max_value_size", &self.max_value_size)
            .field("lease_grace", &self.lease_grace)
            .field("replay_hints", &self.replay_hints)
            .field("native_cas", &self.native_cas)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    pub(super) fn new(target: Target) -> Self {
        RedisStoreBuilder {
            target,
            prefix: "idem:".into(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(3),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            lease_grace: Duration::from_secs(60),
            replay_hints: DEFAULT_REPLAY_HINTS,
            native_cas: NativeCas::Auto,
        }
    }

    /// The prefix of every key and of the notification channel (`{prefix}notify`). Stores
    /// with different prefixes on one server never see each other's records. It must not
    /// contain `{` or `}` (the key hex is the hash tag). Default `idem:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long connecting may take (initially and on each reconnect). Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one command may take before it fails with [`StoreError::Timeout`].
    /// Default 3 s.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The largest encoded value accepted. Default 1 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// How long an in-progress record outlives its lease in Redis, so that a later claim can
    /// report a takeover (`taken_over: true`) rather than a fresh claim. Default 60 s.
    pub fn lease_grace(mut self, grace: Duration) -> Self {
        self.lease_grace = grace.max(Duration::from_millis(1));
        self
    }

    /// How many keys this store remembers as completed (by its own completions and replays,
    /// until their ttl), so that the next claim of such a key, most likely a replay, is a
    /// native `GET` instead of the claim's `SET … NX PX … GET` (cheaper for the server). A
    /// remembered key whose record is gone costs that claim one extra round trip, never a
    /// wrong answer. Default 16,384 (a remembered key is 48 bytes of key and deadline in a hash
    /// table: under 2 MB at the default); `0` turns the hints off.
    pub fn replay_hints(mut self, keys: usize) -> Self {
        self.replay_hints = keys;
        self
    }

    /// Which commands completions, renewals and releases use: [`NativeCas::Auto`] (the
    /// default) detects the server at connect and after every reconnect and uses `SET …
    /// IFEQ` on Valkey ≥ 8.1 and Redis ≥ 8.4 (and `DELIFEQ` on Valkey ≥ 9.0, `DELEX … IFEQ`
    /// on Redis ≥ 8.4), the Lua scripts elsewhere; [`NativeCas::Never`] keeps the scripts;
    /// [`NativeCas::Always`] uses `SET … IFEQ` without asking. The record format is the same
    /// on both paths, so instances with different settings can share a server.
    ///
    /// ```no_run
    /// use idem_stores::redis::NativeCas;
    ///
    /// # async fn demo() -> Result<(), idem_core::StoreError> {
    /// let store = idem_stores::RedisStore::builder("redis://127.0.0.1:6379/")
    ///     .native_cas(NativeCas::Never)
    ///     .build()
    ///     .await?;
    /// # let _ = store;
    /// # Ok(()) }
    /// ```
    pub fn native_cas(mut self, native: NativeCas) -> Self {
        self.native_cas = native;
        self
    }

    /// Connects, starts the subscriber, and waits (up to the connect timeout) for it to be
    /// subscribed. A subscriber that cannot connect is not an error: waiters poll until it
    /// can.
    pub async fn build(mut self) -> Result<RedisStore, StoreError> {
        if self.prefix.contains(['{', '}']) {
            return Err(StoreError::backend(
                "redis store configuration",
                format!("the key prefix {:?} must not contain braces", self.prefix),
            ));
        }
        let connect_timeout = self.connect_timeout;
        let bounded = |what: &'static str, e: Result<Result<_, RedisError>, _>| match e {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(backend(what, e, connect_timeout)),
            Err(_) => Err(StoreError::Timeout(connect_timeout)),
        };
        let target = std::mem::replace(&mut self.target, Target::Cluster(Vec::new()));
        let (conn, nodes) = match target {
            Target::Url(url) => {
                let client = Client::open(url.as_str())
                    .map_err(|e| backend("redis: invalid url", e, connect_timeout))?;
                self.single(client).await?
            }
            Target::Client(client) => self.single(*client).await?,
            Target::Cluster(urls) => {
                let nodes = urls
                    .iter()
                    .map(|u| u.as_str().into_connection_info())
                    .collect::<Result<Vec<ConnectionInfo>, _>>()
                    .map_err(|e| backend("redis: invalid cluster node url", e, connect_timeout))?;
                let client = ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.command_timeout)
                    .build()
                    .map_err(|e| backend("redis: cluster client", e, connect_timeout))?;
                let conn = bounded(
                    "redis: connect to cluster",
                    tokio::time::timeout(connect_timeout, client.get_async_connection()).await,
                )?;
                (Conn::Cluster(conn), nodes)
            }
        };
        let waiters = Arc::new(Waiters::default());
        let channel = format!("{}notify", self.prefix);
        let subscriber = tokio::spawn(notify::subscriber(
            waiters.clone(),
            nodes,
            channel.clone(),
            connect_timeout,
        ));
        let deadline = Instant::now() + connect_timeout;
        while !waiters.live() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                scripts: Scripts::new(),
                prefix: self.prefix,
                channel,
                command_timeout: self.command_timeout,
                max_value_size: self.max_value_size,
                lease_grace: self.lease_grace,
                seen: super::seen::Seen::new(self.replay_hints),
                native: self.native_cas,
                detected: Detected::stale(),
                detecting: std::sync::atomic::AtomicBool::new(false),
                logged: std::sync::atomic::AtomicBool::new(false),
                held: Held::new(),
                recent: Recent::new(),
                clock: ServerClock::new(),
                waiters,
                subscriber,
                clock_reader: std::sync::OnceLock::new(),
            }),
        };
        // Completions stamp their expiry, and replays report their ttl, against these
        // readings; without one, replays report no ttl left, which only keeps a cache in
        // front of the store from keeping them.
        if let Err(e) = store.read_clock().await {
            tracing::debug!(error = %e, "idem redis: could not read the server's clock");
        }
        // Which commands completions use (logged once); a failure leaves it to the first
        // completion.
        store.detect().await;
        let weak = Arc::downgrade(&store.inner);
        let reader = tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLOCK_REFRESH).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = RedisStore { inner };
                if let Err(e) = store.read_clock().await {
                    tracing::debug!(error = %e, "idem redis: could not read the server's clock");
                }
                // A reconnect to an upgraded or downgraded server changes the path here.
                if store.inner.native == NativeCas::Auto {
                    store.detect().await;
                }
            }
        });
        let _ = store.inner.clock_reader.set(reader);
        Ok(store)
    }

    async fn single(&self, client: Client) -> Result<(Conn, Vec<ConnectionInfo>), StoreError> {
        let info = client.get_connection_info().clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let manager = tokio::time::timeout(
            self.connect_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.connect_timeout))?
        .map_err(|e| backend("redis: connect", e, self.connect_timeout))?;
        Ok((Conn::Single(manager), vec![info]))
    }
}
