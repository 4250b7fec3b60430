//! A fault-injecting [`Store`] wrapper: lost replies, failures before the store applies an
//! operation, and delays, each planned for the next matching operation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError,
};

/// A store operation, as [`FaultyStore`] plans faults for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`Store::claim`].
    Claim,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::renew`].
    Renew,
    /// [`Store::get`].
    Get,
    /// [`Store::wait`].
    Wait,
}

/// One planned fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The operation applies in the store, then its reply is lost: the caller sees
    /// [`StoreError::Timeout`].
    LoseReply(Op),
    /// The operation fails before it reaches the store ([`StoreError::Timeout`]).
    FailBefore(Op),
    /// The operation waits this long before it reaches the store.
    Delay(Op, Duration),
}

impl Fault {
    fn op(&self) -> Op {
        match *self {
            Fault::LoseReply(op) | Fault::FailBefore(op) | Fault::Delay(op, _) => op,
        }
    }
}

/// Wraps a store and injects planned faults, each into the next operation of its kind.
///
/// ```
/// # async fn demo() {
/// use std::sync::Arc;
/// use idem_testkit::{Fault, FaultyStore, Op};
/// let store = FaultyStore::new(Arc::new(idem_stores::MemoryStore::new()));
/// store.plan(Fault::LoseReply(Op::Complete));
/// let v = idem_core::Call::new("docs::faulty")
///     .key("k")
///     .run(&store, async { Ok::<_, idem_core::Error>(7) })
///     .await;
/// assert_eq!(v.unwrap(), 7); // the completion applied; the retry recognised it
/// assert_eq!(store.pending(), 0);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: Arc<Mutex<VecDeque<Fault>>>,
}

impl FaultyStore {
    /// Wraps `inner` with an empty plan.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        FaultyStore {
            inner,
            plan: Arc::default(),
        }
    }

    /// Adds a fault for the next operation of its kind that has none planned yet.
    pub fn plan(&self, fault: Fault) {
        self.lock().push_back(fault);
    }

    /// How many planned faults have not struck yet.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Fault>> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, op: Op) -> Option<Fault> {
        let mut plan = self.lock();
        let i = plan.iter().position(|f| f.op() == op)?;
        plan.remove(i)
    }

    async fn run<T>(
        &self,
        op: Op,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.take(op) {
            None => f.await,
            Some(Fault::FailBefore(_)) => Err(StoreError::Timeout(Duration::from_millis(1))),
            Some(Fault::LoseReply(_)) => {
                let _applied = f.await;
                Err(StoreError::Timeout(Duration::from_millis(1)))
            }
            Some(Fault::Delay(_, d)) => {
                tokio::time::sleep(d).await;
                f.await
            }
        }
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.run(Op::Claim, self.inner.claim(req)).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.run(Op::Complete, self.inner.complete(key, token, value, ttl))
            .await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<(), StoreError> {
        self.run(Op::Release, self.inner.release(key, token)).await
    }
    async fn renew(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.run(Op::Renew, self.inner.renew(key, token, lease))
            .await
    }
    async fn get(&self, key: &Key) -> Result<Option<RecordState>, StoreError> {
        self.run(Op::Get, self.inner.get(key)).await
    }
    async fn wait(&self, key: &Key, timeout: Duration) -> Result<(), StoreError> {
        self.run(Op::Wait, self.inner.wait(key, timeout)).await
    }
    async fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key).await
    }
    fn detached(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self.clone()))
    }
    fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }
    fn process_local(&self) -> bool {
        self.inner.process_local()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
