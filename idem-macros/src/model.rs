//! What the attribute and the function say, parsed once and kept with their tokens (for
//! spans): [`Args`] from `#[idempotent(..)]`, [`Func`] from the annotated function.

use syn::{Expr, Ident, LitInt, LitStr, Path, Type};

/// The attribute's arguments, each as written.
#[derive(Default)]
pub(crate) struct Args {
    pub key: Option<Expr>,
    pub ttl: Option<Dur>,
    pub store: Option<Expr>,
    pub skip: Vec<Ident>,
    pub scope: Option<Expr>,
    pub namespace: Option<LitStr>,
    /// `shared`: other functions may use the same pinned namespace if they say so too.
    pub shared: Option<Ident>,
    pub lease: Option<Dur>,
    /// `wait` or `reject`, checked by the parser.
    pub on_conflict: Option<Ident>,
    /// The `wait_timeout` name and value (the name carries the span of a conflict error).
    pub wait_timeout: Option<(Ident, Dur)>,
    /// `release` or `store`.
    pub errors: Option<Ident>,
    pub version: Option<LitInt>,
    pub max_steps: Option<LitInt>,
    /// `error` or `run`.
    pub missing_key: Option<Ident>,
    pub fail_open: Option<bool>,
    pub krate: Option<Path>,
    /// `transaction = tx`: the argument's name (for spans) and the variable the body's
    /// transaction is bound to.
    pub transaction: Option<(Ident, Ident)>,
    /// `in_transaction = tx`: the argument's name and the function argument that is the
    /// caller's transaction.
    pub in_transaction: Option<(Ident, Ident)>,
}

impl Args {
    pub fn stores_errors(&self) -> bool {
        self.errors.as_ref().is_some_and(|e| e == "store")
    }

    /// Transactional mode: idem's own transaction or the caller's.
    pub fn tx(&self) -> Option<Tx<'_>> {
        match (&self.transaction, &self.in_transaction) {
            (Some((_, v)), None) => Some(Tx::Own(v)),
            (_, Some((_, v))) => Some(Tx::Caller(v)),
            (None, None) => None,
        }
    }
}

/// Transactional mode: the variable the body sees its transaction as.
#[derive(Clone, Copy)]
pub(crate) enum Tx<'a> {
    /// `transaction = tx`: idem opens and commits; `tx` is bound inside the body.
    Own(&'a Ident),
    /// `in_transaction = tx`: the function argument `tx: &mut <store's Tx>`, the caller's.
    Caller(&'a Ident),
}

/// A duration: a literal checked at compile time, or a `Duration` expression.
pub(crate) enum Dur {
    Millis(u64),
    Expr(Expr),
}

/// The annotated function, as far as the expansion needs it.
pub(crate) struct Func {
    pub inputs: Vec<Input>,
    /// `Result<T, E>`: `T` and, when written out, `E`.
    pub ok: Type,
    pub err: Option<Type>,
    pub shape: Shape,
}

/// How the function takes `self`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receiver {
    None,
    Ref,
    RefMut,
    /// `self`, `mut self`, `self: Arc<Self>`, `self: Box<Self>`.
    Value,
}

/// One typed argument: the variables its pattern binds (all of them fingerprinted unless
/// skipped) and whether its type is an `impl Trait` that serde cannot see through.
pub(crate) struct Input {
    pub bindings: Vec<Ident>,
    pub ty: Type,
    pub opaque: bool,
}

/// `async fn`, or what `#[async_trait]` made of one: `fn .. -> Pin<Box<dyn Future<..>>>`
/// whose body is `Box::pin(async move { .. })`.
pub(crate) enum Shape {
    Async,
    AsyncTrait,
}
