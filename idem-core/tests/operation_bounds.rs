//! The runtime's bound on each store operation, as docs/failures.md states it: one attempt at
//! a claim, a completion or a renewal is given the whole lease, a release half of it; a
//! renewal that has not answered after a quarter of the lease gets a second one beside it.
//! Each test makes one operation hang and reads, on tokio's paused clock, how long each
//! attempt was given before the runtime dropped it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    async_trait, Call, Claim, ClaimRequest, Error, FencingToken, Key, RecordState, Store,
    StoreError,
};
use idem_stores::MemoryStore;
use tokio::time::Instant;

const LEASE: Duration = Duration::from_millis(3000);

/// One store operation: its name, when it was sent, when it ended or was dropped.
#[derive(Clone, Debug)]
struct Attempt {
    op: &'static str,
    sent: Instant,
    ended: Instant,
}

/// A memory store whose `hang` operation never answers; every operation is logged.
#[derive(Debug, Default)]
struct Hanging {
    inner: MemoryStore,
    hang: &'static str,
    log: Arc<Mutex<Vec<Attempt>>>,
}

struct Logged {
    op: &'static str,
    sent: Instant,
    log: Arc<Mutex<Vec<Attempt>>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.log.lock().unwrap().push(Attempt {
            op: self.op,
            sent: self.sent,
            ended: Instant::now(),
        });
    }
}

impl Hanging {
    fn new(hang: &'static str) -> Self {
        Hanging {
            hang,
            ..Hanging::default()
        }
    }

    async fn op<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let _logged = Logged {
            op,
            sent: Instant::now(),
            log: self.log.clone(),
        };
        if op == self.hang {
            std::future::pending::<()>().await;
        }
        fut.await
    }

    /// How long each attempt at `op` was given.
    fn durations(&self, op: &str) -> Vec<Duration> {
        self.attempts(op).iter().map(|a| a.ended - a.sent).collect()
    }

    fn attempts(&self, op: &str) -> Vec<Attempt> {
        let mut v: Vec<Attempt> = self
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.op == op)
            .cloned()
            .collect();
        v.sort_by_key(|a| a.sent);
        v
    }
}

#[async_trait]
impl Store for Hanging {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.op("claim", self.inner.claim(req)).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.op("complete", self.inner.complete(key, token, value, ttl))
            .await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.op("release", self.inner.release(key, token)).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.op("renew", self.inner.renew(key, token, lease)).await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.op("get", self.inner.get(key)).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }
}

/// The paused clock fires a timer on the millisecond after its deadline at the latest.
fn assert_given(durations: &[Duration], bound: Duration, what: &str) {
    assert!(!durations.is_empty(), "{what}: no attempt");
    for d in durations {
        assert!(
            *d >= bound && *d <= bound + Duration::from_millis(2),
            "{what}: an attempt was given {d:?}, the bound is {bound:?} ({durations:?})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_claim_attempt_is_bounded_by_the_lease() {
    let store = Hanging::new("claim");
    let r = Call::new("bounds::claim")
        .key("k")
        .lease(LEASE)
        .run(&store, async { Ok::<_, Error>(1u32) })
        .await;
    match r {
        Err(Error::Store(StoreError::Timeout(d))) => assert_eq!(d, LEASE),
        other => panic!("{other:?}"),
    }
    let given = store.durations("claim");
    assert_eq!(given.len(), 3, "three attempts, same token");
    assert_given(&given, LEASE, "claim");
}

#[tokio::test(start_paused = true)]
async fn a_completion_attempt_is_bounded_by_the_lease() {
    let store = Hanging::new("complete");
    let r = Call::new("bounds::complete")
        .key("k")
        .lease(LEASE)
        .run(&store, async { Ok::<_, Error>(1u32) })
        .await;
    assert_eq!(r.unwrap(), 1, "the body ran: the caller gets its value");
    let given = store.durations("complete");
    assert_eq!(given.len(), 5, "five attempts, same token");
    assert_given(&given, LEASE, "complete");
    // The lease was kept meanwhile: renewals every third of it.
    assert!(store.durations("renew").len() >= 5 * 3 - 1);
}

#[tokio::test(start_paused = true)]
async fn a_release_attempt_is_bounded_by_half_the_lease() {
    let store = Hanging::new("release");
    let r = Call::new("bounds::release")
        .key("k")
        .lease(LEASE)
        .run(&store, async { Err::<u32, _>(Error::MissingKey) })
        .await;
    assert!(matches!(r, Err(Error::MissingKey)));
    let given = store.durations("release");
    assert_eq!(given.len(), 3, "three attempts");
    assert_given(&given, LEASE / 2, "release");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_attempt_is_bounded_by_the_lease_and_hedged_after_a_quarter() {
    let store = Hanging::new("renew");
    let started = Instant::now();
    let body_time = LEASE / 3 + LEASE + LEASE / 2;
    let _ = Call::new("bounds::renew")
        .key("k")
        .lease(LEASE)
        .run(&store, async move {
            tokio::time::sleep(body_time).await;
            Ok::<_, Error>(1u32)
        })
        .await;
    let renewals = store.attempts("renew");
    assert!(renewals.len() >= 3, "{renewals:?}");
    // The first renewal a third of the lease after the claim; each unanswered one gets
    // another beside it a quarter of the lease later, up to three in flight.
    let first = renewals[0].sent - started;
    assert!(
        first >= LEASE / 3 && first <= LEASE / 3 + Duration::from_millis(2),
        "{first:?}"
    );
    for pair in renewals[..3].windows(2) {
        let gap = pair[1].sent - pair[0].sent;
        assert!(
            gap >= LEASE / 4 && gap <= LEASE / 4 + Duration::from_millis(2),
            "hedged {gap:?} after the previous renewal"
        );
    }
    // Those that ended before the body did were given the whole lease.
    let timed_out: Vec<Duration> = renewals
        .iter()
        .filter(|a| a.ended - started < body_time)
        .map(|a| a.ended - a.sent)
        .collect();
    assert_given(&timed_out, LEASE, "renew");
}
