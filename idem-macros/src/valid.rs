//! Reads the annotated function into a [`Func`] and checks it against the arguments: every
//! mistake becomes one error under the token that causes it, and all are reported together.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::{
    Block, Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReceiverKind,
    ReturnType, Stmt, Type, TypeParamBound,
};

use crate::model::{Args, Func, Input, Receiver, Shape};
use crate::suggest::did_you_mean;
use crate::traps;
use crate::tx;

/// The function's model, or `None` when it cannot be wrapped at all; and the errors found.
pub(crate) fn check(item: &ItemFn, args: &Args) -> (Option<Func>, Vec<syn::Error>) {
    let mut errors = Vec::new();
    let sig = &item.sig;

    let shape = if sig.asyncness.is_some() {
        Some(Shape::Async)
    } else if async_trait_body(&item.block).is_some() {
        Some(Shape::AsyncTrait)
    } else {
        errors.push(syn::Error::new(
            sig.fn_token.span,
            "#[idempotent] works on `async fn` only: write `async fn`; in a trait impl, the \
             trait must declare the method `async fn` too, or the trait and the impl both use \
             `#[async_trait]`",
        ));
        None
    };
    let ret = match (&shape, &sig.output) {
        (Some(Shape::AsyncTrait), ReturnType::Type(_, ty)) => future_output(ty),
        (_, ReturnType::Type(_, ty)) => Some((**ty).clone()),
        (_, ReturnType::Default) => {
            errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                "an idempotent function returns `Result<T, E>`: add `-> Result<T, E>` \
                 (`T` is stored and replayed; `E: From<idem_core::Error>`)",
            ));
            None
        }
    };
    let result = ret.and_then(|ty| match result_args(&ty) {
        Some(ok_err) => Some(ok_err),
        None => {
            errors.push(syn::Error::new_spanned(
                &ty,
                "an idempotent function returns `Result<T, E>` (or an alias such as \
                 `Result<T>`): only an `Ok` value is stored and replayed",
            ));
            None
        }
    });

    let mut receiver = Receiver::None;
    let mut inputs = Vec::new();
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => {
                receiver = match &r.kind {
                    ReceiverKind::Reference(_, _, Some(_)) => Receiver::RefMut,
                    ReceiverKind::Reference(_, _, None) => Receiver::Ref,
                    _ => Receiver::Value,
                };
            }
            FnArg::Typed(t) => {
                let mut bindings = Vec::new();
                pattern_bindings(&t.pat, &mut bindings);
                inputs.push(Input {
                    bindings,
                    ty: (*t.ty).clone(),
                    opaque: opaque(&t.ty),
                });
            }
        }
    }

    let names: Vec<&Ident> = inputs.iter().flat_map(|i| &i.bindings).collect();
    for s in &args.skip {
        if s == "self" {
            errors.push(syn::Error::new(
                s.span(),
                "`self` is never part of the key or fingerprint: remove it from `skip`",
            ));
        } else if !names.contains(&s) {
            let hint = did_you_mean(s, &names);
            errors.push(syn::Error::new(
                s.span(),
                format!(
                    "`skip({s})` names no argument{hint} (the arguments are: {})",
                    list(&names)
                ),
            ));
        }
    }
    let skipped = |n: &Ident| args.skip.iter().any(|s| s == n);
    let key_mentions = |n: &Ident| args.key.as_ref().is_some_and(|k| mentions(k, n));

    let typos = args
        .key
        .as_ref()
        .map_or_else(Vec::new, |k| traps::typos(k, &names));
    let key_has_typo = !typos.is_empty();
    errors.extend(typos);
    if let Some(scope) = &args.scope {
        errors.extend(traps::typos(scope, &names));
    }
    match &args.key {
        Some(key) => {
            let any = names.iter().any(|n| mentions(key, n)) || mentions_self(key);
            if !any && !key_has_typo {
                errors.push(syn::Error::new_spanned(
                    key,
                    format!(
                        "`key` uses none of the arguments, so every call would share one \
                         record: build it from the arguments ({})",
                        list(&names)
                    ),
                ));
            }
        }
        None => {
            if names.iter().all(|n| skipped(n)) {
                errors.push(syn::Error::new(
                    sig.ident.span(),
                    "no argument to derive the idempotency key from: add `key = ...`",
                ));
            }
        }
    }
    for input in &inputs {
        if input.opaque {
            for b in &input.bindings {
                if !skipped(b) && !key_mentions(b) {
                    errors.push(syn::Error::new_spanned(
                        &input.ty,
                        format!(
                            "argument `{b}` has an `impl Trait` type, which cannot be \
                             fingerprinted: add `skip({b})`, or give a `key = ...` that uses `{b}`"
                        ),
                    ));
                }
            }
        }
    }

    // A mistake in the transactional arguments makes the `&mut` trap moot (the transaction
    // argument is the one it would name): report the mistake alone.
    let tx_errors = tx::check(args, &inputs, &names);
    if tx_errors.is_empty() {
        errors.extend(traps::arguments(&inputs, &skipped));
    }
    errors.extend(tx_errors);
    if let Some(key) = &args.key {
        errors.extend(traps::key_is_a_set(key, &inputs, &names));
    }

    if let (Some(mk), None) = (&args.missing_key, &args.key) {
        errors.push(syn::Error::new(
            mk.span(),
            "`missing_key` needs an explicit `key = ...` (e.g. an `Option`): a key derived \
             from the arguments is never missing",
        ));
    }
    if let (Some(shared), None) = (&args.shared, &args.namespace) {
        errors.push(syn::Error::new(
            shared.span(),
            "`shared` lets several functions use one pinned namespace: add \
             `namespace = \"..\"` with the same string on each of them (a derived namespace \
             is never shared)",
        ));
    }
    if let (Some(reject), Some((wt, _))) = (&args.on_conflict, &args.wait_timeout) {
        if reject == "reject" {
            errors.push(syn::Error::new(
                wt.span(),
                "`wait_timeout` has no effect with `on_conflict = reject` (a duplicate never \
                 waits): remove one of them",
            ));
        }
    }

    if receiver == Receiver::RefMut {
        if let Some(store) = &args.store {
            if borrows_self(store) {
                errors.push(syn::Error::new_spanned(
                    store,
                    "this store borrows `self` for the whole call, but the body takes \
                     `&mut self`: write `store = self.store.clone()` (cloning an `Arc` is \
                     cheap), or keep the store outside `self`",
                ));
            }
        }
    }

    let func = match (shape, result) {
        (Some(shape), Some((ok, err))) => Some(Func {
            inputs,
            ok,
            err,
            shape,
        }),
        _ => None,
    };
    (func, errors)
}

fn list(names: &[&Ident]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Box::pin(async move { .. })`, the body `#[async_trait]` writes.
pub(crate) fn async_trait_body(block: &Block) -> Option<&syn::ExprAsync> {
    let [Stmt::Expr(Expr::Call(call), None)] = block.stmts.as_slice() else {
        return None;
    };
    let Expr::Path(func) = &*call.func else {
        return None;
    };
    let is_pin = func.path.segments.last().is_some_and(|s| s.ident == "pin");
    match (is_pin, call.args.len(), call.args.first()) {
        (true, 1, Some(Expr::Async(body))) if body.capture.is_some() => Some(body),
        _ => None,
    }
}

/// `R` in `Pin<Box<dyn Future<Output = R> + ..>>`.
fn future_output(ty: &Type) -> Option<Type> {
    let mut found = None;
    find_output(ty.to_token_stream(), &mut found);
    found
}

fn find_output(tokens: TokenStream, found: &mut Option<Type>) {
    let ty: Result<Type, _> = syn::parse2(tokens);
    let Ok(ty) = ty else { return };
    let Type::Path(p) = ty else {
        if let Type::TraitObject(obj) = ty {
            for b in &obj.bounds {
                if let TypeParamBound::Trait(t) = b {
                    if let Some(seg) = t.path.segments.last() {
                        if let PathArguments::AngleBracketed(a) = &seg.arguments {
                            for arg in &a.args {
                                if let GenericArgument::AssocType(at) = arg {
                                    if at.ident == "Output" && seg.ident == "Future" {
                                        *found = Some(at.ty.clone());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return;
    };
    if let Some(seg) = p.path.segments.last() {
        if let PathArguments::AngleBracketed(a) = &seg.arguments {
            for arg in &a.args {
                if let GenericArgument::Type(t) = arg {
                    find_output(t.to_token_stream(), found);
                }
            }
        }
    }
}

/// `(T, Some(E))` for `Result<T, E>`, `(T, None)` for a one-argument alias (`io::Result<T>`).
fn result_args(ty: &Type) -> Option<(Type, Option<Type>)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if !seg.ident.to_string().ends_with("Result") {
        return None;
    }
    let PathArguments::AngleBracketed(a) = &seg.arguments else {
        return None;
    };
    let mut types = a.args.iter().filter_map(|g| match g {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let ok = types.next()?;
    Some((ok, types.next()))
}

pub(crate) fn pattern_bindings(pat: &Pat, out: &mut Vec<Ident>) {
    match pat {
        Pat::Ident(p) => {
            if let Some((_, sub)) = &p.subpat {
                pattern_bindings(sub, out);
            }
            out.push(p.ident.clone());
        }
        Pat::Reference(r) => pattern_bindings(&r.pat, out),
        Pat::Paren(p) => pattern_bindings(&p.pat, out),
        Pat::Tuple(t) => t.elems.iter().for_each(|p| pattern_bindings(p, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|p| pattern_bindings(p, out)),
        Pat::Slice(s) => s.elems.iter().for_each(|p| pattern_bindings(p, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| pattern_bindings(&f.pat, out)),
        Pat::Type(t) => pattern_bindings(&t.pat, out),
        _ => {}
    }
}

/// An `impl Trait` anywhere in the type, unless it promises `Serialize`.
fn opaque(ty: &Type) -> bool {
    match ty {
        Type::ImplTrait(it) => !it.bounds.iter().any(|b| {
            matches!(b, TypeParamBound::Trait(t)
                if t.path.segments.last().is_some_and(|s| s.ident == "Serialize"))
        }),
        Type::Reference(r) => opaque(&r.elem),
        Type::Paren(p) => opaque(&p.elem),
        Type::Group(g) => opaque(&g.elem),
        Type::Slice(s) => opaque(&s.elem),
        Type::Array(a) => opaque(&a.elem),
        Type::Tuple(t) => t.elems.iter().any(opaque),
        Type::Path(p) => p.path.segments.iter().any(|s| match &s.arguments {
            PathArguments::AngleBracketed(a) => a.args.iter().any(|g| match g {
                GenericArgument::Type(t) => opaque(t),
                _ => false,
            }),
            _ => false,
        }),
        _ => false,
    }
}

/// Whether the expression uses the variable `name` (also inside macro calls and
/// `format!("{name}")` strings).
pub(crate) fn mentions(expr: &Expr, name: &Ident) -> bool {
    tokens_mention(expr.to_token_stream(), &name.to_string())
}

fn tokens_mention(tokens: TokenStream, name: &str) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == name,
        TokenTree::Group(g) => tokens_mention(g.stream(), name),
        TokenTree::Literal(l) => {
            let s = l.to_string();
            s.starts_with('"')
                && (s.contains(&format!("{{{name}}}")) || s.contains(&format!("{{{name}:")))
        }
        TokenTree::Punct(_) => false,
    })
}

fn mentions_self(expr: &Expr) -> bool {
    tokens_mention(expr.to_token_stream(), "self")
}

/// `self.store` or `&self.store` (a place under `self`), as opposed to `self.store.clone()`.
fn borrows_self(expr: &Expr) -> bool {
    match expr {
        Expr::Path(p) => p.path.is_ident("self"),
        Expr::Field(f) => borrows_self(&f.base),
        Expr::Reference(r) => borrows_self(&r.expr),
        Expr::Paren(p) => borrows_self(&p.expr),
        Expr::Unary(u) => borrows_self(&u.expr),
        _ => false,
    }
}

/// The argument that an expression is (`store`, `&store`, `store.clone()`): what `store = ..`
/// names is skipped without `skip(store)` (a store is never part of the key or fingerprint),
/// and a `key = tags` over a `HashSet` is the `HashSet` trap.
pub(crate) fn argument_of<'a>(store: &Expr, names: &[&'a Ident]) -> Option<&'a Ident> {
    match store {
        Expr::Path(p) if p.qself.is_none() => {
            let ident = p.path.get_ident()?;
            names.iter().copied().find(|n| *n == ident)
        }
        Expr::Reference(r) => argument_of(&r.expr, names),
        Expr::Paren(p) => argument_of(&p.expr, names),
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => argument_of(&u.expr, names),
        Expr::MethodCall(m)
            if m.args.is_empty() && (m.method == "clone" || m.method == "as_ref") =>
        {
            argument_of(&m.receiver, names)
        }
        _ => None,
    }
}

/// The variables the function's typed arguments bind.
pub(crate) fn argument_names(item: &ItemFn) -> Vec<Ident> {
    let mut out = Vec::new();
    for arg in &item.sig.inputs {
        if let FnArg::Typed(t) = arg {
            pattern_bindings(&t.pat, &mut out);
        }
    }
    out
}
