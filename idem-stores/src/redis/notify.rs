//! One shared subscriber connection per store, and the local waiters it wakes.
//!
//! The complete, release and remove scripts `PUBLISH` the record's key hex on one store-wide
//! channel. A single background task per store holds a pub/sub connection subscribed to it
//! and wakes the local waiters registered for that key (a map of [`Notify`]). Waiters
//! register *before* they read the record, so a completion between the two is not missed.
//!
//! When the subscriber is down (server restart, network), [`Waiters::live`] is false and
//! waiters fall back to polling with a bounded backoff. Every change of the connection's state
//! wakes every waiter, so none sleeps through a gap in which notifications were lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::{Client, ConnectionInfo};
use futures_util::StreamExt;
use tokio::sync::Notify;

/// The local waiters of one store, by key hex.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<String, Slot>>,
    /// True while the subscriber is subscribed: a notification will reach us.
    live: AtomicBool,
}

#[derive(Debug)]
struct Slot {
    notify: Arc<Notify>,
    count: usize,
}

/// A registration of interest in one key; unregisters on drop.
pub(crate) struct Registration {
    waiters: Arc<Waiters>,
    hex: String,
    pub(crate) notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self
            .waiters
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get_mut(&self.hex) {
            slot.count -= 1;
            if slot.count == 0 {
                map.remove(&self.hex);
            }
        }
    }
}

impl Waiters {
    /// Registers interest in `hex`. Create a `notified()` future from the registration (and
    /// `enable` it) before reading the record.
    pub(crate) fn register(self: &Arc<Self>, hex: String) -> Registration {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = map.entry(hex.clone()).or_insert_with(|| Slot {
            notify: Arc::new(Notify::new()),
            count: 0,
        });
        slot.count += 1;
        let notify = slot.notify.clone();
        drop(map);
        Registration {
            waiters: self.clone(),
            hex,
            notify,
        }
    }

    /// True while notifications are being received.
    /// Whether a local waiter is registered for the key `hex` (cheap when none is).
    pub(crate) fn waiting(&self, key: &idem_core::Key) -> bool {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        !map.is_empty() && map.contains_key(&key.to_hex())
    }

    pub(crate) fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn wake(&self, hex: &[u8]) {
        let Ok(hex) = std::str::from_utf8(hex) else {
            return;
        };
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(hex) {
            slot.notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in map.values() {
            slot.notify.notify_waiters();
        }
    }

    fn set_live(&self, live: bool) {
        if self.live.swap(live, Ordering::SeqCst) != live {
            self.wake_all();
        }
    }
}

/// Runs the subscriber until the store is dropped (the task is aborted then). `nodes` are
/// tried in turn: with Redis Cluster a `PUBLISH` reaches subscribers on every node.
pub(crate) async fn subscriber(
    waiters: Arc<Waiters>,
    nodes: Vec<ConnectionInfo>,
    channel: String,
    connect_timeout: Duration,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(20);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    const HEALTH_CHECK: Duration = Duration::from_secs(5);
    let mut backoff = MIN_BACKOFF;
    let mut next = 0usize;
    loop {
        let Some(info) = nodes.get(next % nodes.len().max(1)).cloned() else {
            return;
        };
        next = next.wrapping_add(1);
        let connected = async {
            let client = Client::open(info)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(connect_timeout, connected).await {
            Ok(Ok(pubsub)) => {
                backoff = MIN_BACKOFF;
                tracing::debug!(channel = %channel, "idem redis: subscriber connected");
                waiters.set_live(true);
                let (mut sink, mut messages) = pubsub.split();
                // A silent network partition does not end the stream: ping now and then.
                let mut health = tokio::time::interval(HEALTH_CHECK);
                health.tick().await;
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => waiters.wake(msg.get_payload_bytes()),
                            None => break,
                        },
                        _ = health.tick() => {
                            let ping = sink.ping::<::redis::Value>();
                            if !matches!(tokio::time::timeout(connect_timeout, ping).await, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                waiters.set_live(false);
                tracing::warn!(
                    channel = %channel,
                    "idem redis: subscriber connection lost; waiters poll until it is back"
                );
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "idem redis: subscriber could not connect");
            }
            Err(_) => {
                tracing::debug!("idem redis: subscriber connect timed out");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
