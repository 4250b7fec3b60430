//! The checks that `#[idempotent]` writes into each expansion, so that a type that cannot be
//! fingerprinted, stored or converted gets ONE error that names the fix, under the user's
//! token (`#[diagnostic::on_unimplemented]` on idem-owned traits).
//!
//! Two patterns:
//!
//! - A bound on an idem trait with a blanket impl ([`FromIdemError`]): rustc reports the
//!   failing leaf bound with the idem trait's message.
//! - Inherent-method dispatch through `Deref` ([`arg`], [`ok_type`], [`err_type`]): the
//!   method of the first type applies when the bounds hold; otherwise method lookup derefs
//!   to a fallback type whose method asks for a trait that nothing implements, which is the
//!   one error. The trait takes the checked type as a parameter of `()` (`(): Storable<T>`),
//!   so that rustc never suggests it as a bound on the user's type parameter.
//!
//! The runtime's entry points are methods of what the `Ok` check returns ([`Storing`] when
//! `T` can be stored, [`NotStoring`] otherwise) and, under `errors = store`, take what the
//! `Err` check returns: a type that fails its check meets no second bound, so each mistake is
//! one error in every build (rustc drops a repeated error only at an identical span, and
//! incremental builds give each span an owner, so repeats would not match).

use core::future::Future;
use core::marker::PhantomData;
use core::ops::Deref;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// An argument on its way into the derived key or the fingerprint: `arg(&x).checked()` is
/// `&x` when `x` is `Serialize`, and an error that says to skip it otherwise.
pub fn arg<T: ?Sized>(value: &T) -> Arg<'_, T> {
    Arg(Unchecked(value))
}

/// See [`arg`].
pub struct Arg<'a, T: ?Sized>(Unchecked<'a, T>);

/// See [`arg`]: reached only when the argument is not `Serialize`.
pub struct Unchecked<'a, T: ?Sized>(&'a T);

impl<'a, T: Serialize + ?Sized> Arg<'a, T> {
    /// The argument, by reference (serde hashes `&x` as `x`).
    pub fn checked(&self) -> &'a T {
        self.0 .0
    }
}

impl<'a, T: ?Sized> Deref for Arg<'a, T> {
    type Target = Unchecked<'a, T>;
    fn deref(&self) -> &Unchecked<'a, T> {
        &self.0
    }
}

impl<T: ?Sized> Unchecked<'_, T> {
    /// Never compiles: `T` is not `Serialize`.
    pub fn checked(&self) -> Unserializable
    where
        (): Fingerprinted<T>,
    {
        Unserializable
    }
}

/// [`arg`] for an argument whose type is a type parameter of the function: the fix is a
/// bound, not a derive.
pub fn param<T: ?Sized>(value: &T) -> Param<'_, T> {
    Param(UncheckedParam(value))
}

/// See [`param`].
pub struct Param<'a, T: ?Sized>(UncheckedParam<'a, T>);

/// See [`param`]: reached only when the type parameter is not bound by `Serialize`.
pub struct UncheckedParam<'a, T: ?Sized>(&'a T);

impl<'a, T: Serialize + ?Sized> Param<'a, T> {
    /// The argument, by reference.
    pub fn checked(&self) -> &'a T {
        self.0 .0
    }
}

impl<'a, T: ?Sized> Deref for Param<'a, T> {
    type Target = UncheckedParam<'a, T>;
    fn deref(&self) -> &UncheckedParam<'a, T> {
        &self.0
    }
}

impl<T: ?Sized> UncheckedParam<'_, T> {
    /// Never compiles: the type parameter `T` is not bound by `Serialize`.
    pub fn checked(&self) -> Unserializable
    where
        (): BoundedParam<T>,
    {
        Unserializable
    }
}

/// Asked of `()` for an argument whose type parameter has no `Serialize` bound; implemented
/// by no type that the expansion uses.
#[diagnostic::on_unimplemented(
    message = "the type parameter `{T}` is not bound by `Serialize`: add the bound `{T}: serde::Serialize`, or add this argument to `skip(..)`",
    label = "`{T}` is not `Serialize`",
    note = "every argument not skipped is part of the idempotency key or fingerprint"
)]
pub trait BoundedParam<T: ?Sized> {}

impl<T: ?Sized> BoundedParam<T> for Unserializable {}

/// What a non-`Serialize` argument turns into (after its compile error), so that the tuple
/// around it raises no second error.
#[derive(Serialize)]
pub struct Unserializable;

/// Asked of `()` for an argument that is not `Serialize`; implemented by no type that the
/// expansion uses (the parameter, rather than `Self`, keeps rustc from suggesting this trait
/// as a bound on a type parameter).
#[diagnostic::on_unimplemented(
    message = "`{T}` is not `Serialize`: add this argument to `skip(..)`, or derive `serde::Serialize` for its type",
    label = "not `Serialize`",
    note = "every argument not skipped is part of the idempotency key or fingerprint; skip handles, clients and connections"
)]
pub trait Fingerprinted<T: ?Sized> {}

impl<T: ?Sized> Fingerprinted<T> for Unserializable {}

/// The `Ok` type, checked: `ok_type::<T>().storable()` is [`Storing<T>`], through which the
/// expansion runs the call, when `T` can be stored, and one error that names the derives
/// otherwise.
pub fn ok_type<T>() -> OkType<T> {
    OkType(UncheckedOk(PhantomData))
}

/// See [`ok_type`].
pub struct OkType<T>(UncheckedOk<T>);

/// See [`ok_type`]: reached only when `T` cannot be stored.
pub struct UncheckedOk<T>(PhantomData<T>);

impl<T: Serialize + DeserializeOwned> OkType<T> {
    /// `T` can be stored and replayed.
    pub fn storable(&self) -> Storing<T> {
        Storing(PhantomData)
    }
}

impl<T> Deref for OkType<T> {
    type Target = UncheckedOk<T>;
    fn deref(&self) -> &UncheckedOk<T> {
        &self.0
    }
}

impl<T> UncheckedOk<T> {
    /// Never compiles: `T` is not `Serialize + DeserializeOwned`.
    pub fn storable(&self) -> NotStoring<T>
    where
        (): Storable<T>,
    {
        unreachable!("`(): Storable<T>` has no impl")
    }
}

/// Asked of `()` for an `Ok` type that is not `Serialize + DeserializeOwned`; implemented by
/// no type that the expansion uses (the parameter, rather than `Self`, keeps rustc from
/// suggesting this trait as a bound on a type parameter of an impl).
#[diagnostic::on_unimplemented(
    message = "`{T}` is stored and replayed: add `#[derive(serde::Serialize, serde::Deserialize)]` to it",
    label = "the `Ok` type of an idempotent function",
    note = "for a `Vec`, `Option` or other container, derive them on the type inside it; for a type parameter `T`, add the bound `T: serde::Serialize + serde::de::DeserializeOwned`"
)]
pub trait Storable<T> {}

impl<T> Storable<T> for Unserializable {}

/// [`ok_type`] for an `Ok` type that is a type parameter of the function: the fix is a
/// bound, not a derive.
pub fn ok_param<T>() -> OkParam<T> {
    OkParam(UncheckedOkParam(PhantomData))
}

/// See [`ok_param`].
pub struct OkParam<T>(UncheckedOkParam<T>);

/// See [`ok_param`]: reached only when the type parameter is not bound by serde's traits.
pub struct UncheckedOkParam<T>(PhantomData<T>);

impl<T: Serialize + DeserializeOwned> OkParam<T> {
    /// `T` can be stored and replayed.
    pub fn storable(&self) -> Storing<T> {
        Storing(PhantomData)
    }
}

impl<T> Deref for OkParam<T> {
    type Target = UncheckedOkParam<T>;
    fn deref(&self) -> &UncheckedOkParam<T> {
        &self.0
    }
}

impl<T> UncheckedOkParam<T> {
    /// Never compiles: the type parameter `T` is not bound by `Serialize + DeserializeOwned`.
    pub fn storable(&self) -> NotStoring<T>
    where
        (): BoundedOk<T>,
    {
        unreachable!("`(): BoundedOk<T>` has no impl")
    }
}

/// Asked of `()` for an `Ok` type that is a type parameter without serde's bounds;
/// implemented by no type that the expansion uses (the parameter, rather than `Self`, keeps
/// rustc from suggesting this trait as the bound to add).
#[diagnostic::on_unimplemented(
    message = "the type parameter `{T}` is stored and replayed: add the bound `{T}: serde::Serialize + serde::de::DeserializeOwned`",
    label = "`{T}` is not `Serialize + DeserializeOwned`",
    note = "the `Ok` value of an idempotent function is stored, and a retry replays it"
)]
pub trait BoundedOk<T> {}

impl<T> BoundedOk<T> for Unserializable {}

/// An `Ok` type without `impl Trait` in it cannot be named in a turbofish: `storing()` is
/// [`Storing<T>`] with `T` inferred, and rustc's own error when it cannot be stored.
pub fn storing<T: Serialize + DeserializeOwned>() -> Storing<T> {
    Storing(PhantomData)
}

/// What `ok_type::<T>().storable()` is when `T` can be stored: the runtime's entry points
/// are its methods, so that the expansion names the bound `T: Serialize + DeserializeOwned`
/// in one place only (the check). A `T` that fails it gets [`NotStoring`] instead, whose
/// methods ask nothing of `T`: one error per mistake, in incremental builds too (rustc drops
/// a repeated error only at an identical span, which incremental builds do not keep).
///
/// Each method returns the free function's future itself (`run`, `run_on_default`, ..): the
/// call's future is the same type as without this value, which has no size.
pub struct Storing<T>(PhantomData<fn() -> T>);

impl<T: Serialize + DeserializeOwned> Storing<T> {
    /// [`run`](crate::__private::run).
    #[inline(always)]
    pub fn run<'s, E, Fut>(
        self,
        call: crate::Call,
        store: &'s dyn crate::Store,
        from_error: fn(crate::Error) -> E,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, Fut>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        crate::__private::run(call, store, from_error, body)
    }

    /// [`run_on_default`](crate::__private::run_on_default).
    #[inline(always)]
    pub fn run_on_default<E, Fut>(
        self,
        call: crate::Call,
        from_error: fn(crate::Error) -> E,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<T, E, Fut>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        crate::__private::run_on_default(call, from_error, body)
    }

    /// [`run_in_transaction`](crate::__private::run_in_transaction).
    #[inline(always)]
    pub fn run_in_transaction<'s, E, S, F>(
        self,
        call: crate::Call,
        store: &'s S,
        from_error: fn(crate::Error) -> E,
        body: F,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, S, F>
    where
        S: crate::TransactionalStore,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        crate::__private::run_in_transaction(call, store, from_error, body)
    }

    /// [`run_within`](crate::__private::run_within).
    #[inline(always)]
    pub fn run_within<'s, 't, E, S, F>(
        self,
        call: crate::Call,
        store: &'s S,
        from_error: fn(crate::Error) -> E,
        tx: &'t mut S::Tx,
        body: F,
    ) -> impl Future<Output = Result<T, E>> + use<'s, 't, T, E, S, F>
    where
        S: crate::TransactionalStore,
        F: AsyncFnOnce(&mut S::Tx) -> Result<T, E>,
    {
        crate::__private::run_within(call, store, from_error, tx, body)
    }

    /// [`run_storing_errors`](crate::__private::run_storing_errors): `errors` is what
    /// `err_type::<E>().storable()` is.
    #[inline(always)]
    pub fn run_storing_errors<'s, E, P, Fut>(
        self,
        errors: P,
        call: crate::Call,
        store: &'s dyn crate::Store,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, P, Fut>
    where
        P: StoresErrors<E>,
        Fut: Future<Output = Result<T, E>>,
    {
        errors.run(call, store, body)
    }

    /// [`run_storing_errors_on_default`](crate::__private::run_storing_errors_on_default):
    /// `errors` is what `err_type::<E>().storable()` is.
    #[inline(always)]
    pub fn run_storing_errors_on_default<E, P, Fut>(
        self,
        errors: P,
        call: crate::Call,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<T, E, P, Fut>
    where
        P: StoresErrors<E>,
        Fut: Future<Output = Result<T, E>>,
    {
        errors.run_on_default(call, body)
    }
}

/// What `ok_type::<T>().storable()` is after its compile error: the methods of [`Storing`],
/// asking nothing of `T`, so that no second error follows. No value of it exists.
pub struct NotStoring<T>(Never, PhantomData<fn() -> T>);

impl<T> NotStoring<T> {
    /// Never runs.
    pub fn run<'s, E, Fut>(
        self,
        _: crate::Call,
        _: &'s dyn crate::Store,
        _: fn(crate::Error) -> E,
        _: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, Fut> {
        never(self.0)
    }

    /// Never runs.
    pub fn run_on_default<E, Fut>(
        self,
        _: crate::Call,
        _: fn(crate::Error) -> E,
        _: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<T, E, Fut> {
        never(self.0)
    }

    /// Never runs.
    pub fn run_in_transaction<'s, E, S, F>(
        self,
        _: crate::Call,
        _: &'s S,
        _: fn(crate::Error) -> E,
        _: F,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, S, F> {
        never(self.0)
    }

    /// Never runs.
    pub fn run_within<'s, 't, E, S: crate::TransactionalStore, F>(
        self,
        _: crate::Call,
        _: &'s S,
        _: fn(crate::Error) -> E,
        _: &'t mut S::Tx,
        _: F,
    ) -> impl Future<Output = Result<T, E>> + use<'s, 't, T, E, S, F> {
        never(self.0)
    }

    /// Never runs.
    pub fn run_storing_errors<'s, E, P, Fut>(
        self,
        _: P,
        _: crate::Call,
        _: &'s dyn crate::Store,
        _: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<'s, T, E, P, Fut> {
        never(self.0)
    }

    /// Never runs.
    pub fn run_storing_errors_on_default<E, P, Fut>(
        self,
        _: P,
        _: crate::Call,
        _: Fut,
    ) -> impl Future<Output = Result<T, E>> + use<T, E, P, Fut> {
        never(self.0)
    }
}

/// The future of a call that cannot exist.
async fn never<R>(never: Never) -> R {
    match never {}
}

/// The `Err` type under `errors = store`, checked: `err_type::<E>().storable()` is
/// [`StoringErrors<E>`] when `E` can be stored, and one error that says what it lacks
/// otherwise.
pub fn err_type<E>() -> ErrType<E> {
    ErrType(IdemErrType(UncheckedErr(PhantomData)))
}

/// See [`err_type`].
pub struct ErrType<E>(IdemErrType<E>);

/// See [`err_type`]: reached when `E` cannot be stored; `idem_core::Error` gets its own
/// message.
pub struct IdemErrType<E>(UncheckedErr<E>);

/// See [`err_type`]: reached when `E` cannot be stored.
pub struct UncheckedErr<E>(PhantomData<E>);

impl<E: Serialize + DeserializeOwned + From<crate::Error>> ErrType<E> {
    /// `E` can be stored and replayed.
    pub fn storable(&self) -> StoringErrors<E> {
        StoringErrors(PhantomData)
    }
}

impl<E> Deref for ErrType<E> {
    type Target = IdemErrType<E>;
    fn deref(&self) -> &IdemErrType<E> {
        &self.0
    }
}

impl<E: IsIdemError> IdemErrType<E> {
    /// Never compiles: `idem_core::Error` is not stored.
    pub fn storable(&self) -> NotStoringErrors<E>
    where
        E: IdemErrorNotStored,
    {
        unreachable!("`E: IdemErrorNotStored` has no impl")
    }
}

impl<E> Deref for IdemErrType<E> {
    type Target = UncheckedErr<E>;
    fn deref(&self) -> &UncheckedErr<E> {
        &self.0
    }
}

impl<E> UncheckedErr<E> {
    /// Never compiles: `E` is not `Serialize + DeserializeOwned + From<idem_core::Error>`.
    pub fn storable(&self) -> NotStoringErrors<E>
    where
        (): StorableError<E>,
    {
        unreachable!("`(): StorableError<E>` has no impl")
    }
}

/// An `Err` type with `impl Trait` in it: [`StoringErrors<E>`] with `E` inferred.
pub fn storing_errors<E>() -> StoringErrors<E>
where
    E: Serialize + DeserializeOwned + From<crate::Error>,
{
    StoringErrors(PhantomData)
}

/// What `err_type::<E>().storable()` is when `E` can be stored (see [`Storing`]).
pub struct StoringErrors<E>(PhantomData<fn() -> E>);

/// What `err_type::<E>().storable()` is after its compile error. No value of it exists.
pub struct NotStoringErrors<E>(Never, PhantomData<fn() -> E>);

/// The runs with errors stored, of [`StoringErrors`] (which asks `E`'s bounds) and of
/// [`NotStoringErrors`] (which asks none, so that a failing `E` gets no second error).
pub trait StoresErrors<E> {
    /// [`run_storing_errors`](crate::__private::run_storing_errors).
    fn run<T, Fut>(
        self,
        call: crate::Call,
        store: &dyn crate::Store,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>;

    /// [`run_storing_errors_on_default`](crate::__private::run_storing_errors_on_default).
    fn run_on_default<T, Fut>(
        self,
        call: crate::Call,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>;
}

impl<E: Serialize + DeserializeOwned + From<crate::Error>> StoresErrors<E> for StoringErrors<E> {
    #[inline(always)]
    fn run<T, Fut>(
        self,
        call: crate::Call,
        store: &dyn crate::Store,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        crate::__private::run_storing_errors(call, store, body)
    }

    #[inline(always)]
    fn run_on_default<T, Fut>(
        self,
        call: crate::Call,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        crate::__private::run_storing_errors_on_default(call, body)
    }
}

impl<E> StoresErrors<E> for NotStoringErrors<E> {
    fn run<T, Fut>(
        self,
        _: crate::Call,
        _: &dyn crate::Store,
        _: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        never(self.0)
    }

    fn run_on_default<T, Fut>(self, _: crate::Call, _: Fut) -> impl Future<Output = Result<T, E>>
    where
        T: Serialize + DeserializeOwned,
        Fut: Future<Output = Result<T, E>>,
    {
        never(self.0)
    }
}

/// `idem_core::Error` alone.
pub trait IsIdemError {}

impl IsIdemError for crate::Error {}

/// Asked of `idem_core::Error` under `errors = store`; implemented by none.
#[diagnostic::on_unimplemented(
    message = "`idem_core::Error` cannot be stored with `errors = store`: use an error type of your own, or remove `errors = store`",
    label = "`idem_core::Error` reports idem's own failures, which are never replayed",
    note = "an error type of your own derives `serde::Serialize` and `serde::Deserialize` and implements `From<idem_core::Error>`; the default `errors = release` stores no error, so a retry runs again"
)]
pub trait IdemErrorNotStored: Serialize + DeserializeOwned {}

/// Asked of `()` for an `Err` type under `errors = store` that cannot be stored; implemented
/// by no type that the expansion uses (see [`Storable`]).
#[diagnostic::on_unimplemented(
    message = "with `errors = store`, `{E}` is stored and replayed: derive `serde::Serialize` and `serde::Deserialize` on it and implement `From<idem_core::Error>`, or remove `errors = store`",
    label = "the `Err` type of a function with `errors = store`",
    note = "the default `errors = release` stores no error, so a retry runs again",
    note = "for a type parameter `E`, add the bound `E: serde::Serialize + serde::de::DeserializeOwned + From<idem_core::Error>`"
)]
pub trait StorableError<E> {}

impl<E> StorableError<E> for Unserializable {}

/// `E: From<idem_core::Error>`, asked of the `Err` type so that idem can report a duplicate
/// in progress, a reused key or a store outage through it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` needs `From<idem_core::Error>`: for an error type of your own, add `impl From<idem_core::Error> for {Self}` (with thiserror, a variant `#[error(transparent)] Idem(#[from] idem_core::Error)`); for one of another crate, wrap it in an error enum of your own",
    label = "the `Err` type of an idempotent function",
    note = "idem returns its own errors (a duplicate in progress, a reused key, a store outage) as `{Self}`",
    note = "a type of another crate (`std::io::Error`, `anyhow::Error`, ..) cannot get that impl in your crate (the orphan rule): return e.g. `enum PayError {{ Io(std::io::Error), Idem(idem_core::Error) }}` with a `From` impl for each, or `idem_core::Error` itself"
)]
pub trait FromIdemError: From<crate::Error> {}

impl<E: From<crate::Error>> FromIdemError for E {}

/// The `store = ..` value, checked: `store_arg(&(s)).checked()` is `&s` as a `&dyn Store`, or
/// one error that says what a store is (rather than rustc's list of every `Store` impl).
pub fn store_arg<S: ?Sized>(store: &S) -> StoreArg<'_, S> {
    StoreArg(UncheckedStore(store))
}

/// See [`store_arg`].
pub struct StoreArg<'a, S: ?Sized>(UncheckedStore<'a, S>);

/// See [`store_arg`]: reached only when the value is not a store.
pub struct UncheckedStore<'a, S: ?Sized>(&'a S);

impl<'a, S: crate::Store> StoreArg<'a, S> {
    /// The store.
    pub fn checked(&self) -> &'a dyn crate::Store {
        self.0 .0
    }
}

impl<'a, S: ?Sized> Deref for StoreArg<'a, S> {
    type Target = UncheckedStore<'a, S>;
    fn deref(&self) -> &UncheckedStore<'a, S> {
        &self.0
    }
}

impl<'a, S: ?Sized> UncheckedStore<'a, S> {
    /// Never compiles: `S` is not a store.
    pub fn checked(&self) -> &'a dyn crate::Store
    where
        (): IsStore<S>,
    {
        unreachable!("`(): IsStore<S>` has no impl")
    }
}

/// Asked of `()` for a `store = ..` value that is not a store; implemented by no type that
/// the expansion uses.
#[diagnostic::on_unimplemented(
    message = "`{S}` is not a store: pass a value implementing `idem_core::Store`, or a reference, `Arc` or `Box` of one",
    label = "not an `idem_core::Store`",
    note = "build the store once at start-up (e.g. `MemoryStore::new()`, `RedisStore::connect(..)`) and pass it, e.g. `store = self.store`; without `store`, the default store given to `idem_core::set_default_store` is used"
)]
pub trait IsStore<S: ?Sized> {}

impl<S: ?Sized> IsStore<S> for Unserializable {}

/// The `store = ..` value in transactional mode, checked: `tx_store(&(s)).checked()` is the
/// store with transactions (`s` itself, or what an `Arc`, `Box` or `&` of one points to), or
/// one error that says transactional mode needs a SQL store.
pub fn tx_store<S: ?Sized>(store: &S) -> TxStoreArg<'_, S> {
    TxStoreArg(TxStoreDeref(UncheckedTxStore(store)))
}

/// See [`tx_store`].
pub struct TxStoreArg<'a, S: ?Sized>(TxStoreDeref<'a, S>);

/// See [`tx_store`]: reached when the value is not itself a store with transactions.
pub struct TxStoreDeref<'a, S: ?Sized>(UncheckedTxStore<'a, S>);

/// See [`tx_store`]: reached only when the value is no store with transactions.
pub struct UncheckedTxStore<'a, S: ?Sized>(&'a S);

impl<'a, S: crate::TransactionalStore> TxStoreArg<'a, S> {
    /// The store.
    pub fn checked(&self) -> &'a S {
        self.0 .0 .0
    }
}

impl<'a, S: ?Sized> Deref for TxStoreArg<'a, S> {
    type Target = TxStoreDeref<'a, S>;
    fn deref(&self) -> &TxStoreDeref<'a, S> {
        &self.0
    }
}

impl<'a, S: Deref + ?Sized> TxStoreDeref<'a, S>
where
    S::Target: crate::TransactionalStore,
{
    /// The store an `Arc`, `Box` or `&` points to.
    pub fn checked(&self) -> &'a S::Target {
        self.0 .0
    }
}

impl<'a, S: ?Sized> Deref for TxStoreDeref<'a, S> {
    type Target = UncheckedTxStore<'a, S>;
    fn deref(&self) -> &UncheckedTxStore<'a, S> {
        &self.0
    }
}

impl<'a, S: ?Sized> UncheckedTxStore<'a, S> {
    /// Never compiles: `S` has no transactions.
    pub fn checked<Tx: Send>(&self) -> &'a NoTransactions<Tx>
    where
        (): HasTransactions<S>,
    {
        unreachable!("`(): HasTransactions<S>` has no impl")
    }
}

/// What a store without transactions turns into (after its compile error): a store that
/// cannot exist, whose transaction type is whatever the function's `in_transaction` argument
/// is, so that the run raises no second error.
pub struct NoTransactions<Tx>(Never, PhantomData<fn() -> Tx>);

/// No value.
#[derive(Debug)]
pub enum Never {}

impl<Tx> core::fmt::Debug for NoTransactions<Tx> {
    fn fmt(&self, _: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {}
    }
}

#[async_trait::async_trait]
impl<Tx: Send> crate::Store for NoTransactions<Tx> {
    async fn claim(&self, _: &crate::ClaimRequest) -> Result<crate::Claim, crate::StoreError> {
        match self.0 {}
    }
    async fn complete(
        &self,
        _: &crate::Key,
        _: crate::FencingToken,
        _: &[u8],
        _: core::time::Duration,
    ) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
    async fn release(
        &self,
        _: &crate::Key,
        _: crate::FencingToken,
    ) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
    async fn renew(
        &self,
        _: &crate::Key,
        _: crate::FencingToken,
        _: core::time::Duration,
    ) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
    async fn get(&self, _: &crate::Key) -> Result<Option<crate::RecordState>, crate::StoreError> {
        match self.0 {}
    }
    async fn wait(&self, _: &crate::Key, _: core::time::Duration) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
    async fn remove(&self, _: &crate::Key) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
}

#[async_trait::async_trait]
impl<Tx: Send> crate::TransactionalStore for NoTransactions<Tx> {
    type Tx = Tx;
    async fn begin(&self) -> Result<Tx, crate::StoreError> {
        match self.0 {}
    }
    async fn complete_in(
        &self,
        _: &mut Tx,
        _: &crate::Key,
        _: crate::FencingToken,
        _: &[u8],
        _: core::time::Duration,
    ) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
    async fn commit(&self, _: Tx) -> Result<(), crate::StoreError> {
        match self.0 {}
    }
}

/// Asked of `()` for a `store = ..` value without transactions in transactional mode;
/// implemented by no type that the expansion uses. The message is `TransactionalStore`'s.
#[diagnostic::on_unimplemented(
    message = "`{S}` has no transactions: transactional mode needs a SQL store (`PostgresStore`, `MySqlStore`, `SqliteStore`)",
    label = "not a store with transactions",
    note = "remove `transaction`/`in_transaction` to run without one, or use a SQL store whose database also holds the body's writes"
)]
pub trait HasTransactions<S: ?Sized> {}

impl<S: ?Sized> HasTransactions<S> for Unserializable {}

/// The caller's transaction under `in_transaction = tx`, checked: `tx_arg(store, tx)` is `tx`
/// when its type is `&mut` the store's `Tx`, and one error that says so otherwise.
pub fn tx_arg<'t, S, X>(_store: &S, tx: &'t mut X) -> &'t mut S::Tx
where
    S: crate::TransactionalStore,
    X: ?Sized + TxOf<S::Tx>,
{
    tx.as_tx()
}

/// The store's transaction type `Tx`, and only it.
#[diagnostic::on_unimplemented(
    message = "`in_transaction` needs `&mut` the store's transaction type, e.g. `tx: &mut idem_stores::PgTx`",
    label = "`{Self}` is not this store's transaction type `{Tx}`",
    note = "the transaction types are `idem_stores::PgTx` (PostgresStore), `idem_stores::MySqlTx` (MySqlStore) and `idem_stores::SqliteTx` (SqliteStore), e.g. `PgTx::from(pool.begin().await?)`, passed as `&mut tx`"
)]
pub trait TxOf<Tx> {
    /// The transaction, as the store's type.
    fn as_tx(&mut self) -> &mut Tx;
}

impl<Tx> TxOf<Tx> for Tx {
    fn as_tx(&mut self) -> &mut Tx {
        self
    }
}

/// The call of the annotated function whose `static` site is `site`: in the site's
/// namespace, or failing with `Error::NamespaceCollision` when another function of this
/// process holds that namespace.
#[inline]
pub fn call(site: &'static crate::namespace::Site) -> crate::Call {
    crate::Call::at(site)
}
