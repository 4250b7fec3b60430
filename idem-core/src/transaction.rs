//! Transactional mode: the body's statements and the completion record commit in one database
//! transaction. A crash before the commit leaves nothing; a lease lost mid-body
//! refuses the fenced completion and rolls the stale executor's writes back.
//!
//! The steps are the runtime's own (claim, execute with the lease keeper, settle); only the
//! settle differs: the completion is written inside the body's transaction and the commit
//! publishes both.

use std::pin::pin;

use serde::{de::DeserializeOwned, Serialize};
use tracing::Instrument;

use crate::codec::{self, Codec};
use crate::error::{Error, StoreError};
use crate::key::Identity;
use crate::observe::{emit, Outcome};
use crate::runtime::{
    bounded, budget, claim, execute, fail, keep_lease, release, replay, settle, CatchUnwind,
    Claimed, Held, Op, Policy, Prepared, ReleaseErrors, Settle,
};
use crate::store::{Claim, ClaimRequest, TransactionalStore};
use crate::Call;

impl<C: Codec> Call<C> {
    /// Runs `body` at most once per key inside a transaction that idem opens on the store's
    /// database; on `Ok`, the completion record is written in the same transaction, fenced by
    /// the claim's token, and committed with the body's writes.
    ///
    /// - `Ok` → completion in the transaction → commit → the value is stored and replayed.
    /// - The lease was lost (another caller took over) → rollback → [`Error::LeaseLost`]: the
    ///   stale executor's writes are undone.
    /// - `Err` (or a panic, or the caller's future dropped) → rollback and release: a retry
    ///   runs again on a clean slate.
    /// - A crash before the commit leaves no writes; the claim lapses with its lease and the
    ///   takeover runs the body again, on a clean slate.
    /// - The commit is bounded by half the lease, with the lease kept meanwhile; a commit that
    ///   does not answer in time is given up on (the SQL stores end its session, so the
    ///   database rolls it back unless it had landed) and resolved like a lost reply: the
    ///   caller gets the stored value or [`Error::Store`] within the lease.
    ///
    /// A `None` key with `missing_key = run` runs the body in a plain transaction, committed
    /// without a record.
    ///
    /// ```no_run
    /// # async fn demo<S: idem_core::TransactionalStore>(store: &S) -> Result<u64, idem_core::Error> {
    /// idem_core::Call::new("orders::place")
    ///     .key("order-42")
    ///     .run_in_transaction(store, async |tx: &mut S::Tx| {
    ///         // run the order's INSERTs on `tx` here
    ///         # let _ = tx;
    ///         Ok::<_, idem_core::Error>(42)
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn run_in_transaction<S, T, E, F>(self, store: &S, body: F) -> Result<T, E>
    where
        S: TransactionalStore,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        let ns = self.namespace;
        let ident = match self.prepare_in::<ReleaseErrors, T, E>(store) {
            Prepared::Claim(ident) => ident,
            Prepared::Done(result) => return result,
            Prepared::Unprotected => {
                let mut tx = store.begin().await.map_err(|e| fail(e.into(), ns, None))?;
                let in_tx = crate::step::Calls::InTransaction;
                let result = crate::step::scope(in_tx, body(&mut tx)).await?;
                store
                    .commit(tx)
                    .await
                    .map_err(|e| fail(e.into(), ns, None))?;
                return Ok(result);
            }
        };
        let span = tracing::debug_span!(target: "idem", "idem.call", namespace = ns, key = %ident.key, transactional = true);
        let call = self.drive_transaction(store, ident, None, body);
        crate::observe::in_store(store.name(), call.instrument(span)).await
    }

    /// Like [`run_in_transaction`](Self::run_in_transaction), inside a transaction the caller
    /// opened and will commit itself. idem claims the key (a short statement of its own), runs
    /// the body, and writes the fenced completion into `tx` — it does not commit.
    ///
    /// The rules, since the commit is the caller's:
    /// - the record stays in progress until the caller commits; duplicates wait (or get
    ///   `InProgress`) meanwhile, and see the value once the commit lands;
    /// - the caller's rollback undoes the completion with its own writes: the claim stays in
    ///   progress under its token until its lease passes, then a retry runs again;
    /// - idem keeps the lease only while `run_within` runs. A caller that holds its
    ///   transaction past the lease has written a completion that row-locks the record: on
    ///   PostgreSQL and MariaDB a takeover blocks on that lock until the caller commits (then
    ///   it replays) or rolls back (then it runs); on SQLite the open write transaction holds
    ///   the database's write lock, so other writers wait up to their busy timeout.
    pub async fn run_within<S, T, E, F>(self, store: &S, tx: &mut S::Tx, body: F) -> Result<T, E>
    where
        S: TransactionalStore,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        let ns = self.namespace;
        let ident = match self.prepare_in::<ReleaseErrors, T, E>(store) {
            Prepared::Claim(ident) => ident,
            Prepared::Done(result) => return result,
            Prepared::Unprotected => {
                return crate::step::scope(crate::step::Calls::InTransaction, body(tx)).await
            }
        };
        let span = tracing::debug_span!(target: "idem", "idem.call", namespace = ns, key = %ident.key, transactional = true);
        let call = self.drive_transaction(store, ident, Some(tx), body);
        crate::observe::in_store(store.name(), call.instrument(span)).await
    }

    /// Claim, execute in the transaction, complete in it, and commit it unless it is the
    /// caller's (`outer`).
    async fn drive_transaction<S, T, E, F>(
        self,
        store: &S,
        ident: Identity,
        outer: Option<&mut S::Tx>,
        body: F,
    ) -> Result<T, E>
    where
        S: TransactionalStore,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        let Call {
            namespace: ns,
            options: opts,
            codec,
            ..
        } = self;
        let key = ident.key;
        let tag = <ReleaseErrors as Policy<T, E>>::tag(C::NAME, opts.version);
        let held = match claim(store, &ident, &opts, ns).await {
            Claimed::Held(held) => held,
            Claimed::Completed { record, waited } => {
                let outcome = if waited {
                    Outcome::ReplayedAfterWait
                } else {
                    Outcome::Replayed
                };
                return replay::<ReleaseErrors, T, E, C>(
                    &codec,
                    &tag,
                    &record.value,
                    outcome,
                    ns,
                    &key,
                );
            }
            Claimed::Unprotected => {
                return match outer {
                    Some(tx) => {
                        crate::step::scope(crate::step::Calls::InTransaction, body(tx)).await
                    }
                    // The body's transaction lives on the store's database, which is the
                    // one that cannot be reached: there is nothing to run unprotected on.
                    None => Err(fail(
                        Error::Store(StoreError::backend(
                            "fail_open in transactional mode",
                            std::io::Error::other(
                                "the store's database is unreachable, so the body's transaction cannot open",
                            ),
                        )),
                        ns,
                        Some(&key),
                    )),
                };
            }
            Claimed::Failed(e, outcome) => {
                emit(outcome, ns, Some(&key));
                return Err(E::from(e));
            }
        };

        // Our own transaction, or the caller's.
        let mut slot = match outer {
            Some(tx) => Slot::Outer(tx),
            None => match bounded(Op("begin", store), opts.lease, store.begin()).await {
                Ok(tx) => Slot::Own(Some(tx)),
                Err(e) => {
                    settle(store, &held, &opts, ns, Settle::Discard).await;
                    return Err(fail(e.into(), ns, Some(&key)));
                }
            },
        };

        // Execute. A dropped caller drops the transaction (rollback) and releases. A panic is
        // caught here rather than in `execute`, so that the transaction is rolled back BEFORE
        // the claim is released: on SQLite the open transaction holds the write lock that the
        // release needs (released first, it would wait for its own transaction).
        let result = execute(store, &held, &opts, ns, true, async {
            let body = pin!(body(slot.tx()));
            Ok::<_, E>(CatchUnwind(body).await)
        })
        .await;
        let value = match result {
            Ok(Ok(Ok(value))) => value,
            Ok(Ok(Err(e))) | Err(e) => {
                drop(slot);
                settle(store, &held, &opts, ns, Settle::Fail).await;
                return Err(e);
            }
            Ok(Err(panic)) => {
                drop(slot);
                settle(store, &held, &opts, ns, Settle::Release).await;
                std::panic::resume_unwind(panic);
            }
        };
        let envelope = match codec.encode(&value) {
            Ok(payload) => codec::seal(&tag, &payload),
            Err(e) => {
                drop(slot);
                settle(store, &held, &opts, ns, Settle::Discard).await;
                return Err(fail(Error::Codec(e), ns, Some(&key)));
            }
        };
        let limit = opts
            .max_value_size
            .map_or(store.max_value_size(), |l| l.min(store.max_value_size()));
        if envelope.len() > limit {
            drop(slot);
            settle(store, &held, &opts, ns, Settle::Discard).await;
            let e = Error::TooLarge {
                size: envelope.len(),
                limit,
            };
            return Err(fail(e, ns, Some(&key)));
        }

        // Settle inside the transaction, keeping the lease until the commit is acknowledged.
        // Once the fenced completion is written, the record's row is locked by this
        // transaction (the database write lock on SQLite): a takeover waits for the commit,
        // and a renewal waits on that lock too; if the commit does not land, the renewal goes
        // through after the rollback and the claim is still ours to resolve. The commit is
        // bounded by half the lease and its resolution by the other half, so the caller has
        // its value or an error within the lease even when the commit stalls; a commit given
        // up on is cancelled by the store (the SQL stores end its session, so the database
        // rolls it back unless it had already committed) and resolved like a lost reply.
        let committed = {
            let keeper = pin!(keep_lease(store, key, held.token, opts.lease, held.since));
            let work = pin!(async {
                let written = bounded(
                    Op("complete", store),
                    opts.lease,
                    store.complete_in(slot.tx(), &key, held.token, &envelope, opts.ttl),
                )
                .await;
                match written {
                    Err(StoreError::Fenced) => Committed::No(Error::LeaseLost),
                    Err(e) => Committed::No(e.into()),
                    Ok(()) => match slot.take_own() {
                        None => Committed::Yes, // the caller commits
                        Some(tx) => {
                            let commit = store.commit(tx);
                            match bounded(Op("commit", store), budget(opts.lease, 2), commit).await
                            {
                                Ok(()) => Committed::Yes,
                                Err(e) => Committed::Unknown(e),
                            }
                        }
                    },
                }
            });
            tokio::select! {
                biased;
                r = work => r,
                never = keeper => match never {},
            }
        };
        // The transaction is rolled back (if the completion failed) before any release, which
        // would otherwise wait for its row lock (PostgreSQL, MariaDB) or write lock (SQLite).
        drop(slot);
        match committed {
            Committed::Yes => {
                let outcome = if held.taken_over {
                    Outcome::TakenOver
                } else {
                    Outcome::Executed
                };
                emit(outcome, ns, Some(&key));
                Ok(value)
            }
            Committed::No(Error::LeaseLost) => Err(fail(Error::LeaseLost, ns, Some(&key))),
            Committed::No(e) => {
                release(store, &key, held.token, opts.lease).await;
                emit(Outcome::Released, ns, Some(&key));
                Err(E::from(e))
            }
            Committed::Unknown(e) => {
                resolve_commit::<S, T, E, C>(store, &ident, &held, &opts, ns, &codec, &tag, e).await
            }
        }
    }
}

/// The transaction the body runs in: idem's own (committed by idem), or the caller's.
enum Slot<'a, Tx> {
    Own(Option<Tx>),
    Outer(&'a mut Tx),
}

impl<Tx> Slot<'_, Tx> {
    fn tx(&mut self) -> &mut Tx {
        match self {
            Slot::Own(Some(tx)) => tx,
            Slot::Outer(tx) => tx,
            Slot::Own(None) => unreachable!("the transaction is used after its commit"),
        }
    }

    fn take_own(&mut self) -> Option<Tx> {
        match self {
            Slot::Own(tx) => tx.take(),
            Slot::Outer(_) => None,
        }
    }
}

enum Committed {
    Yes,
    No(Error),
    Unknown(StoreError),
}

/// The commit's reply was lost, or the commit timed out and was cancelled: claim again under
/// our own token (within the other half of the lease) to learn what happened. In progress
/// under it → the transaction rolled back (release, report the store error); completed → it
/// committed (replay the stored value, which is ours or the legitimate winner's); anything
/// else (the record still locked by a commit that the database has not finished) → the store
/// error: the outcome is unknown to this caller, and a retry replays or runs again.
#[allow(clippy::too_many_arguments)]
async fn resolve_commit<S, T, E, C>(
    store: &S,
    ident: &Identity,
    held: &Held,
    opts: &crate::Options,
    ns: &'static str,
    codec: &C,
    tag: &codec::TypeTag,
    commit_error: StoreError,
) -> Result<T, E>
where
    S: TransactionalStore,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    C: Codec,
{
    let key = held.key;
    let req = ClaimRequest {
        key,
        fingerprint: ident.fingerprint,
        token: held.token,
        lease: opts.lease,
    };
    match bounded(Op("claim", store), budget(opts.lease, 2), store.claim(&req)).await {
        Ok(Claim::Completed(record)) => {
            replay::<ReleaseErrors, T, E, C>(codec, tag, &record.value, Outcome::Executed, ns, &key)
        }
        Ok(Claim::Acquired { .. }) => {
            release(store, &key, held.token, opts.lease).await;
            Err(fail(Error::Store(commit_error), ns, Some(&key)))
        }
        Ok(Claim::InProgress { .. }) | Err(_) => {
            Err(fail(Error::Store(commit_error), ns, Some(&key)))
        }
    }
}
