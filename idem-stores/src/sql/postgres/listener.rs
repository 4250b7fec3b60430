//! Waiting: the store's one `LISTEN` connection, which wakes the local waiters.

use std::sync::Arc;
use std::time::Duration;

use idem_core::Key;
use sqlx::postgres::{PgListener, PgPool};

use super::super::base::Waiters;

/// The store's one `LISTEN` connection: dispatches notifications to local waiters, and
/// reconnects with backoff when the connection is lost.
pub(super) async fn run_listener(pool: PgPool, channel: String, waiters: Arc<Waiters>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut listener) => {
                backoff = Duration::from_millis(50);
                waiters.set_listening(true);
                tracing::debug!(target: "idem", channel, "postgres store: listening");
                let error = loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            if let Some(key) = parse_key(n.payload()) {
                                waiters.wake(&key);
                            }
                        }
                        // The connection was lost and re-established: notifications sent in
                        // between are gone, so every waiter looks again.
                        Ok(None) => waiters.wake_all(),
                        Err(e) => break e,
                    }
                };
                waiters.set_listening(false);
                tracing::warn!(target: "idem", channel, error = %error, "postgres store: listener lost; waiters poll until it is back");
            }
            Err(e) => {
                tracing::debug!(target: "idem", channel, error = %e, "postgres store: listener cannot connect");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn parse_key(hex: &str) -> Option<Key> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        key[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(Key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_payloads_parse_back_to_keys() {
        let key = Key([0xa5; 32]);
        assert_eq!(parse_key(&key.to_hex()), Some(key));
        assert_eq!(parse_key("zz"), None);
        assert_eq!(parse_key(&"g".repeat(64)), None);
    }
}
