//! A reference model of the [`Store`](idem_core::Store) contract, for model-based tests.
//!
//! The model is a pure state machine per key on a virtual clock: a key is absent, in progress
//! under a token with a lease deadline, or completed with a value, the token it was completed
//! under and an expiry. A test runs a history of operations against a real store, times each
//! one (the [`Window`] from its start to its end on the test's clock) and hands every answer
//! to [`Model::observe`], which says whether the contract allows it.
//!
//! Two kinds of uncertainty are modelled rather than guessed:
//!
//! - **Time.** A store applies an operation somewhere inside its window, and its clock may
//!   differ a little from the test's (a remote server). Deadlines are therefore intervals
//!   ([`Span`]), and an operation that lands within `margin` of a deadline may see the record
//!   either live or lapsed.
//! - **Unknown outcomes.** An operation that failed with a timeout or a lost reply
//!   ([`Answer::Unknown`]) may or may not have applied. The model keeps a *set* of possible
//!   states per key, which widens on an unknown outcome and narrows again when a later answer
//!   rules states out. An answer that no possible state allows is a [`Violation`].
//!
//! Besides the method-by-method rules, a violation names the invariant it breaks where one
//! applies: two live holders of one key, a completed value that changed before it expired, a
//! stale token that was accepted.
//!
//! ```
//! use std::time::Duration;
//! use idem_testkit::model::{Answer, Model, ModelOp, Window};
//! use idem_core::{Claim, FencingToken, Key};
//!
//! let mut model = Model::new(Duration::from_millis(1));
//! let key = Key([1; 32]);
//! let (a, b) = (FencingToken(1), FencingToken(2));
//! let lease = Duration::from_secs(1);
//! let at = |ms| Window::at(Duration::from_millis(ms));
//! let claim = |token| ModelOp::Claim { token, fingerprint: None, lease };
//! model
//!     .observe(key, &claim(a), at(0), &Answer::Claimed(Claim::Acquired { taken_over: false }))
//!     .unwrap();
//! // A second caller while the lease is live: acquiring would make two live holders.
//! let wrong = Answer::Claimed(Claim::Acquired { taken_over: false });
//! let err = model.observe(key, &claim(b), at(10), &wrong).unwrap_err();
//! assert!(err.to_string().contains("two live holders"));
//! // After the lease passed, the takeover is allowed.
//! let ok = Answer::Claimed(Claim::Acquired { taken_over: true });
//! model.observe(key, &claim(b), at(2000), &ok).unwrap();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use idem_core::Bytes;

use idem_core::{Claim, FencingToken, Fingerprint, Key, RecordState, StoreError};

/// When an operation ran on the test's clock: it was sent at `start` and answered at `end`,
/// so the store applied it somewhere in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// When the operation was sent (time since the test's origin).
    pub start: Duration,
    /// When its answer (or error) came back.
    pub end: Duration,
}

impl Window {
    /// A window from `start` to `end`.
    pub fn new(start: Duration, end: Duration) -> Self {
        Window {
            start,
            end: end.max(start),
        }
    }

    /// An instantaneous window (a paused clock).
    pub fn at(t: Duration) -> Self {
        Window { start: t, end: t }
    }

    fn plus(self, d: Duration) -> Span {
        Span {
            lo: self.start.saturating_add(d),
            hi: self.end.saturating_add(d),
        }
    }
}

/// A deadline known to lie between `lo` and `hi` (the window of the operation that set it,
/// plus the lease or TTL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The earliest the deadline can be.
    pub lo: Duration,
    /// The latest the deadline can be.
    pub hi: Duration,
}

/// The state of one key in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// No record.
    Absent,
    /// Claimed under `token` until `lease_until`.
    InProgress {
        /// The holder's token.
        token: FencingToken,
        /// The fingerprint stored with the claim.
        fingerprint: Option<Fingerprint>,
        /// When the lease ends.
        lease_until: Span,
    },
    /// Completed under `token` with `value`, until `expires_at`.
    Completed {
        /// The token the record was completed under.
        token: FencingToken,
        /// The fingerprint stored at claim time.
        fingerprint: Option<Fingerprint>,
        /// The stored value.
        value: Bytes,
        /// When the record expires.
        expires_at: Span,
    },
}

/// One store operation on one key, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelOp {
    /// [`Store::claim`](idem_core::Store::claim).
    Claim {
        /// The request's token.
        token: FencingToken,
        /// The request's fingerprint.
        fingerprint: Option<Fingerprint>,
        /// The request's lease.
        lease: Duration,
    },
    /// [`Store::complete`](idem_core::Store::complete).
    Complete {
        /// The caller's token.
        token: FencingToken,
        /// The value.
        value: Bytes,
        /// The record's TTL.
        ttl: Duration,
    },
    /// [`Store::release`](idem_core::Store::release).
    Release {
        /// The caller's token.
        token: FencingToken,
    },
    /// [`Store::renew`](idem_core::Store::renew).
    Renew {
        /// The caller's token.
        token: FencingToken,
        /// The new lease.
        lease: Duration,
    },
    /// [`Store::get`](idem_core::Store::get).
    Get,
    /// [`Store::remove`](idem_core::Store::remove).
    Remove,
}

/// What a store answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A claim's answer.
    Claimed(Claim),
    /// `Ok(())` from complete, release, renew or remove.
    Ok,
    /// [`StoreError::Fenced`].
    Fenced,
    /// A get's answer.
    Got(Option<RecordState>),
    /// Any other error (a timeout, a lost reply, a cut connection): the operation may or may
    /// not have applied.
    Unknown(String),
}

impl Answer {
    /// The answer of a claim.
    pub fn of_claim(r: Result<Claim, StoreError>) -> Self {
        match r {
            Ok(c) => Answer::Claimed(c),
            Err(e) => Self::of_error(e),
        }
    }

    /// The answer of complete, release, renew or remove.
    pub fn of_unit(r: Result<(), StoreError>) -> Self {
        match r {
            Ok(()) => Answer::Ok,
            Err(e) => Self::of_error(e),
        }
    }

    /// The answer of a get.
    pub fn of_get(r: Result<Option<RecordState>, StoreError>) -> Self {
        match r {
            Ok(s) => Answer::Got(s),
            Err(e) => Self::of_error(e),
        }
    }

    fn of_error(e: StoreError) -> Self {
        match e {
            StoreError::Fenced => Answer::Fenced,
            e => Answer::Unknown(e.to_string()),
        }
    }
}

/// An answer the contract does not allow, with the states the model held possible.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The invariant or rule broken, in words.
    pub rule: String,
    /// The key.
    pub key: Key,
    /// The operation.
    pub op: ModelOp,
    /// When it ran.
    pub window: Window,
    /// What the store answered.
    pub answer: Answer,
    /// The states the model held possible before the operation.
    pub possible: Vec<KeyState>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.rule)?;
        writeln!(f, "  key:    {:?}", self.key)?;
        writeln!(f, "  op:     {:?} during {:?}", self.op, self.window)?;
        writeln!(f, "  answer: {:?}", self.answer)?;
        writeln!(f, "  possible states before it:")?;
        for s in &self.possible {
            writeln!(f, "    {s:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// What an answer must look like for one transition of the model.
#[derive(Clone, Debug)]
enum Expect {
    Acquired(Option<bool>),
    Completed {
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        expires_at: Span,
    },
    InProgress {
        fingerprint: Option<Fingerprint>,
        lease_until: Span,
    },
    Ok,
    Fenced,
    GotNone,
    GotInProgress {
        token: FencingToken,
        fingerprint: Option<Fingerprint>,
    },
    GotCompleted {
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        expires_at: Span,
    },
}

/// Whether a deadline has passed at a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Passed {
    Yes,
    No,
    Maybe,
}

/// The reference model: the possible states of every key it has seen.
#[derive(Clone, Debug)]
pub struct Model {
    keys: HashMap<Key, Vec<KeyState>>,
    margin: Duration,
}

impl Model {
    /// An empty model (every key absent). `margin` is how far from a deadline an operation
    /// must land for the model to insist on which side it fell (clock skew and jitter between
    /// the test and the store; 1 ms is plenty under a paused clock).
    pub fn new(margin: Duration) -> Self {
        Model {
            keys: HashMap::new(),
            margin,
        }
    }

    /// The states `key` may be in now.
    pub fn possible(&self, key: &Key) -> Vec<KeyState> {
        self.keys
            .get(key)
            .cloned()
            .unwrap_or_else(|| vec![KeyState::Absent])
    }

    /// Checks `answer` to `op` on `key` during `window` against the contract and moves the
    /// model on. On a violation the model is left unchanged.
    pub fn observe(
        &mut self,
        key: Key,
        op: &ModelOp,
        window: Window,
        answer: &Answer,
    ) -> Result<(), Box<Violation>> {
        let before = self.possible(&key);
        let mut next: Vec<KeyState> = Vec::new();
        for state in &before {
            let outcomes = self.outcomes(state, op, window);
            if let Answer::Unknown(_) = answer {
                push(&mut next, state.clone());
                for (_, s) in outcomes {
                    push(&mut next, s);
                }
            } else {
                for (expect, s) in outcomes {
                    if self.matches(&expect, answer, window) {
                        push(&mut next, s);
                    }
                }
            }
        }
        if next.is_empty() {
            return Err(Box::new(Violation {
                rule: self.classify(op, window, answer, &before),
                key,
                op: op.clone(),
                window,
                answer: answer.clone(),
                possible: before,
            }));
        }
        self.keys.insert(key, next);
        Ok(())
    }

    fn passed(&self, deadline: Span, at: Window) -> Passed {
        if at.start > deadline.hi.saturating_add(self.margin) {
            Passed::Yes
        } else if at.end.saturating_add(self.margin) < deadline.lo {
            Passed::No
        } else {
            Passed::Maybe
        }
    }

    /// The sides of a deadline an operation may see: live (false) and/or passed (true).
    fn sides(&self, deadline: Span, at: Window) -> &'static [bool] {
        match self.passed(deadline, at) {
            Passed::Yes => &[true],
            Passed::No => &[false],
            Passed::Maybe => &[false, true],
        }
    }

    /// Every transition the contract allows from `state`: the answer it requires and the
    /// state after it.
    fn outcomes(&self, state: &KeyState, op: &ModelOp, at: Window) -> Vec<(Expect, KeyState)> {
        let mut out = Vec::new();
        match op {
            ModelOp::Claim {
                token,
                fingerprint,
                lease,
            } => {
                let new = KeyState::InProgress {
                    token: *token,
                    fingerprint: *fingerprint,
                    lease_until: at.plus(*lease),
                };
                match state {
                    KeyState::Absent => out.push((Expect::Acquired(Some(false)), new)),
                    KeyState::InProgress {
                        token: holder,
                        fingerprint: fp,
                        lease_until,
                    } => {
                        for &lapsed in self.sides(*lease_until, at) {
                            if lapsed {
                                // Taken over; a store whose records lapse natively (Redis
                                // PX) sees an absent key and answers taken_over: false.
                                out.push((Expect::Acquired(None), new.clone()));
                            } else if holder == token {
                                out.push((Expect::Acquired(Some(false)), new.clone()));
                            } else {
                                out.push((
                                    Expect::InProgress {
                                        fingerprint: *fp,
                                        lease_until: *lease_until,
                                    },
                                    state.clone(),
                                ));
                            }
                        }
                    }
                    KeyState::Completed {
                        fingerprint: fp,
                        value,
                        expires_at,
                        ..
                    } => {
                        for &expired in self.sides(*expires_at, at) {
                            if expired {
                                out.push((Expect::Acquired(Some(false)), new.clone()));
                            } else {
                                out.push((
                                    Expect::Completed {
                                        fingerprint: *fp,
                                        value: value.clone(),
                                        expires_at: *expires_at,
                                    },
                                    state.clone(),
                                ));
                            }
                        }
                    }
                }
            }
            ModelOp::Complete { token, value, ttl } => match state {
                KeyState::InProgress {
                    token: holder,
                    fingerprint,
                    lease_until,
                } if holder == token => {
                    let done = KeyState::Completed {
                        token: *token,
                        fingerprint: *fingerprint,
                        value: value.clone(),
                        expires_at: at.plus(*ttl),
                    };
                    for &lapsed in self.sides(*lease_until, at) {
                        out.push((Expect::Ok, done.clone()));
                        if lapsed {
                            // "a store may treat a claim whose lease has passed as gone"
                            out.push((Expect::Fenced, state.clone()));
                        }
                    }
                }
                KeyState::Completed {
                    token: holder,
                    expires_at,
                    ..
                } if holder == token => {
                    out.push((Expect::Ok, state.clone()));
                    if self.passed(*expires_at, at) != Passed::No {
                        // Expired: gone (Fenced), or still recognised as this caller's (Ok,
                        // nothing changes); both are harmless.
                        out.push((Expect::Fenced, state.clone()));
                    }
                }
                _ => out.push((Expect::Fenced, state.clone())),
            },
            ModelOp::Release { token } => match state {
                KeyState::InProgress { token: holder, .. } if holder == token => {
                    out.push((Expect::Ok, KeyState::Absent))
                }
                _ => out.push((Expect::Ok, state.clone())),
            },
            ModelOp::Renew { token, lease } => match state {
                KeyState::InProgress {
                    token: holder,
                    fingerprint,
                    lease_until,
                } if holder == token => {
                    let renewed = KeyState::InProgress {
                        token: *token,
                        fingerprint: *fingerprint,
                        lease_until: at.plus(*lease),
                    };
                    for &lapsed in self.sides(*lease_until, at) {
                        out.push((Expect::Ok, renewed.clone()));
                        if lapsed {
                            out.push((Expect::Fenced, state.clone()));
                        }
                    }
                }
                _ => out.push((Expect::Fenced, state.clone())),
            },
            ModelOp::Get => match state {
                KeyState::Absent => out.push((Expect::GotNone, state.clone())),
                KeyState::InProgress {
                    token,
                    fingerprint,
                    lease_until,
                } => {
                    for &lapsed in self.sides(*lease_until, at) {
                        let e = if lapsed {
                            Expect::GotNone
                        } else {
                            Expect::GotInProgress {
                                token: *token,
                                fingerprint: *fingerprint,
                            }
                        };
                        out.push((e, state.clone()));
                    }
                }
                KeyState::Completed {
                    fingerprint,
                    value,
                    expires_at,
                    ..
                } => {
                    for &expired in self.sides(*expires_at, at) {
                        let e = if expired {
                            Expect::GotNone
                        } else {
                            Expect::GotCompleted {
                                fingerprint: *fingerprint,
                                value: value.clone(),
                                expires_at: *expires_at,
                            }
                        };
                        out.push((e, state.clone()));
                    }
                }
            },
            ModelOp::Remove => out.push((Expect::Ok, KeyState::Absent)),
        }
        out
    }

    /// Whether a reported remaining time fits a deadline: the record's end, as the store
    /// reports it, lies within the deadline's span (widened by the margin on both sides).
    fn remaining_fits(&self, remaining: Duration, deadline: Span, at: Window) -> bool {
        let earliest = at.start.saturating_add(remaining);
        let latest = at.end.saturating_add(remaining);
        latest.saturating_add(self.margin) >= deadline.lo
            && earliest <= deadline.hi.saturating_add(self.margin)
    }

    fn matches(&self, expect: &Expect, answer: &Answer, at: Window) -> bool {
        match (expect, answer) {
            (Expect::Acquired(want), Answer::Claimed(Claim::Acquired { taken_over })) => {
                want.is_none_or(|w| w == *taken_over)
            }
            (
                Expect::Completed {
                    fingerprint,
                    value,
                    expires_at,
                },
                Answer::Claimed(Claim::Completed(r)),
            )
            | (
                Expect::GotCompleted {
                    fingerprint,
                    value,
                    expires_at,
                },
                Answer::Got(Some(RecordState::Completed(r))),
            ) => {
                r.fingerprint == *fingerprint
                    && r.value == *value
                    && r.expires_in
                        .is_some_and(|left| self.remaining_fits(left, *expires_at, at))
            }
            (
                Expect::InProgress {
                    fingerprint,
                    lease_until,
                },
                Answer::Claimed(Claim::InProgress {
                    fingerprint: fp,
                    lease_remaining,
                }),
            ) => {
                fp == fingerprint
                    && lease_remaining
                        .is_none_or(|left| self.remaining_fits(left, *lease_until, at))
            }
            (Expect::Ok, Answer::Ok) | (Expect::Fenced, Answer::Fenced) => true,
            (Expect::GotNone, Answer::Got(None)) => true,
            (
                Expect::GotInProgress { token, fingerprint },
                Answer::Got(Some(RecordState::InProgress {
                    token: t,
                    fingerprint: fp,
                    ..
                })),
            ) => t == token && fp == fingerprint,
            _ => false,
        }
    }

    /// Names the invariant or rule an impossible answer breaks.
    fn classify(&self, op: &ModelOp, at: Window, answer: &Answer, before: &[KeyState]) -> String {
        let live_other_holder = |token: &FencingToken| {
            before.iter().all(|s| match s {
                KeyState::InProgress {
                    token: holder,
                    lease_until,
                    ..
                } => holder != token && self.passed(*lease_until, at) == Passed::No,
                _ => false,
            })
        };
        let completed_values: Vec<&Bytes> = before
            .iter()
            .filter_map(|s| match s {
                KeyState::Completed {
                    value, expires_at, ..
                } if self.passed(*expires_at, at) != Passed::Yes => Some(value),
                _ => None,
            })
            .collect();
        let all_completed_live = before.iter().all(|s| {
            matches!(s, KeyState::Completed { expires_at, .. }
                if self.passed(*expires_at, at) == Passed::No)
        });
        let seen_value = match answer {
            Answer::Claimed(Claim::Completed(r)) | Answer::Got(Some(RecordState::Completed(r))) => {
                Some(&r.value)
            }
            _ => None,
        };
        match (op, answer) {
            (ModelOp::Claim { token, .. }, Answer::Claimed(Claim::Acquired { .. }))
                if live_other_holder(token) =>
            {
                "invariant broken: two live holders of one key (acquired while another \
                 token's lease was live)"
                    .into()
            }
            (ModelOp::Claim { .. }, Answer::Claimed(Claim::Acquired { .. }))
                if all_completed_live =>
            {
                "invariant broken: a completed value was replaced before it expired".into()
            }
            (ModelOp::Complete { .. }, Answer::Ok) if all_completed_live => {
                "invariant broken: a completion over a live completed record of another token \
                 was accepted (a completed value changed before it expired)"
                    .into()
            }
            (ModelOp::Complete { token, .. } | ModelOp::Renew { token, .. }, Answer::Ok)
                if !before.iter().any(|s| state_token(s) == Some(*token)) =>
            {
                "invariant broken: a stale token was accepted".into()
            }
            _ if seen_value.is_some_and(|v| {
                !completed_values.is_empty() && !completed_values.contains(&v)
            }) =>
            {
                "invariant broken: a completed value changed before it expired".into()
            }
            (ModelOp::Claim { .. }, _) => "claim: an answer the contract does not allow".into(),
            (ModelOp::Complete { .. }, _) => {
                "complete: an answer the contract does not allow".into()
            }
            (ModelOp::Release { .. }, _) => "release: must answer Ok (never Fenced)".into(),
            (ModelOp::Renew { .. }, _) => "renew: an answer the contract does not allow".into(),
            (ModelOp::Get, _) => "get: a state the model does not allow".into(),
            (ModelOp::Remove, _) => "remove: must answer Ok".into(),
        }
    }
}

fn state_token(s: &KeyState) -> Option<FencingToken> {
    match s {
        KeyState::Absent => None,
        KeyState::InProgress { token, .. } | KeyState::Completed { token, .. } => Some(*token),
    }
}

fn push(set: &mut Vec<KeyState>, s: KeyState) {
    if !set.contains(&s) {
        set.push(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(300);
    const TTL: Duration = Duration::from_millis(1000);

    fn at(ms: u64) -> Window {
        Window::at(Duration::from_millis(ms))
    }
    fn claim(t: u64) -> ModelOp {
        ModelOp::Claim {
            token: FencingToken(t),
            fingerprint: None,
            lease: LEASE,
        }
    }
    fn complete(t: u64, v: &'static [u8]) -> ModelOp {
        ModelOp::Complete {
            token: FencingToken(t),
            value: Bytes::from_static(v),
            ttl: TTL,
        }
    }
    fn acquired(taken_over: bool) -> Answer {
        Answer::Claimed(Claim::Acquired { taken_over })
    }
    fn lost() -> Answer {
        Answer::Unknown("lost".into())
    }
    const K: Key = Key([7; 32]);

    #[test]
    fn own_token_claim_is_acquired() {
        let mut m = Model::new(Duration::from_millis(1));
        m.observe(K, &claim(1), at(0), &acquired(false)).unwrap();
        m.observe(K, &claim(1), at(10), &acquired(false)).unwrap();
        assert!(m.observe(K, &claim(1), at(20), &acquired(true)).is_err());
    }

    #[test]
    fn completion_retry_under_own_token_is_ok_and_keeps_the_value() {
        let mut m = Model::new(Duration::from_millis(1));
        m.observe(K, &claim(1), at(0), &acquired(false)).unwrap();
        m.observe(K, &complete(1, b"a"), at(1), &Answer::Ok)
            .unwrap();
        m.observe(K, &complete(1, b"b"), at(2), &Answer::Ok)
            .unwrap();
        let e = m
            .observe(K, &complete(2, b"c"), at(3), &Answer::Ok)
            .unwrap_err();
        assert!(e.rule.contains("invariant"), "{e}");
        let got = Answer::Got(Some(RecordState::Completed(
            idem_core::CompletedRecord::new(
                None,
                Bytes::from_static(b"b"),
                Some(Duration::from_millis(997)),
            ),
        )));
        let e = m.observe(K, &ModelOp::Get, at(3), &got).unwrap_err();
        assert!(e.rule.contains("value changed"), "{e}");
    }

    #[test]
    fn release_is_never_fenced() {
        let mut m = Model::new(Duration::from_millis(1));
        let rel = ModelOp::Release {
            token: FencingToken(9),
        };
        m.observe(K, &rel, at(0), &Answer::Ok).unwrap();
        assert!(m.observe(K, &rel, at(0), &Answer::Fenced).is_err());
    }

    #[test]
    fn unknown_outcomes_widen_until_a_read_settles_them() {
        let mut m = Model::new(Duration::from_millis(1));
        m.observe(K, &claim(1), at(0), &lost()).unwrap();
        assert_eq!(m.possible(&K).len(), 2);
        // Either answer of another caller's claim is allowed now...
        let mut other = m.clone();
        other
            .observe(K, &claim(2), at(1), &acquired(false))
            .unwrap();
        m.observe(K, &ModelOp::Get, at(1), &Answer::Got(None))
            .unwrap();
        // ...and the read settled it: absent.
        assert_eq!(m.possible(&K), vec![KeyState::Absent]);
    }

    #[test]
    fn stale_tokens_are_refused() {
        let mut m = Model::new(Duration::from_millis(1));
        m.observe(K, &claim(1), at(0), &acquired(false)).unwrap();
        m.observe(K, &claim(2), at(400), &acquired(true)).unwrap();
        let e = m
            .observe(K, &complete(1, b"x"), at(401), &Answer::Ok)
            .unwrap_err();
        assert!(e.rule.contains("stale token"), "{e}");
        let renew = ModelOp::Renew {
            token: FencingToken(1),
            lease: LEASE,
        };
        m.observe(K, &renew, at(402), &Answer::Fenced).unwrap();
    }

    #[test]
    fn near_a_deadline_either_side_is_allowed() {
        let mut m = Model::new(Duration::from_millis(50));
        m.observe(K, &claim(1), at(0), &acquired(false)).unwrap();
        let mut a = m.clone();
        a.observe(K, &claim(2), at(290), &acquired(true)).unwrap();
        let inprog = Answer::Claimed(Claim::InProgress {
            fingerprint: None,
            lease_remaining: None,
        });
        m.observe(K, &claim(2), at(290), &inprog).unwrap();
        assert!(m.observe(K, &claim(2), at(100), &acquired(true)).is_err());
    }
}
