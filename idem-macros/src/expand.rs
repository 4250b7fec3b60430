//! Writes the wrapper: the body becomes the future that one runtime call (`Call::run`)
//! drives. No algorithm is generated here; it all lives in `idem_core`.
//!
//! ```text
//! Input:
//!     #[idempotent(key = req.id.clone(), ttl = "24h", store = self.store)]
//!     async fn charge(&self, req: Req) -> Result<Receipt, PayError> { BODY }
//! Output:
//!     async fn charge(&self, req: Req) -> Result<Receipt, PayError> {
//!         let __idem_ok = ::idem_core::__private::ok_type::<Receipt>().storable();
//!         let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
//!             .key(&(req.id.clone()))
//!             .fingerprint((::idem_core::__private::arg(&req).checked(),))
//!             .ttl(::idem_core::__private::Duration::from_secs(86400));
//!         __idem_ok.run::<PayError, _>(
//!             __idem_call,
//!             ::idem_core::__private::store_arg(&(self.store)).checked(),
//!             ::idem_core::__private::from_error::<PayError>,
//!             async { BODY },
//!         )
//!         .await
//!     }
//! ```
//!
//! Transactional mode (`transaction = tx` / `in_transaction = tx`): the store is
//! `tx_store(&(store)).checked()` (a store with transactions, or one error saying so), the
//! body becomes `async |tx| BODY`, run by `__idem_ok.run_in_transaction(call, store,
//! from_error, ..)` or `__idem_ok.run_within(call, store, from_error, tx_arg(store, tx), ..)`
//! (see `transaction.expanded.rs` in `tests/expand/`).
//!
//! `ok_type` (`ok_param` for a type parameter), `arg`, `store_arg` (and `err_type` with
//! `errors = store`) check types: a `Receipt` that cannot be stored, an argument that is not
//! `Serialize` or a store that is not one is a single error under the user's token that names
//! the fix (`idem_core/src/private.rs`). The run is a method of the `Ok` check's value (and
//! takes the `Err` check's), so that a type failing its check meets no second bound: one
//! error per mistake, in incremental builds too.

use proc_macro2::{Literal, Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Block, Expr, ItemFn};

use crate::attr;
use crate::model::{Args, Dur, Func, Shape, Tx};
use crate::valid;

/// The whole attribute: the wrapper, or the errors followed by the function unchanged (so
/// that one mistake does not cascade into errors about a missing function).
pub(crate) fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            let e = match syn::parse2::<syn::TraitItemFn>(item.clone()) {
                Ok(f) if f.default.is_none() => syn::Error::new_spanned(
                    f.semi_token,
                    "a trait method without a body cannot be idempotent: put \
                     #[idempotent] on the method in each impl, or give it a default body",
                ),
                _ => syn::Error::new(
                    e.span(),
                    format!("#[idempotent] goes on an `async fn` with a body: {e}"),
                ),
            };
            return with_errors(vec![e], item);
        }
    };
    let (mut args, mut errors) = match attr::parse(attr) {
        Ok(parsed) => parsed,
        Err(e) => return with_errors(vec![e], item),
    };
    // `store = store`: the store argument is skipped without `skip(store)`.
    let names = valid::argument_names(&func);
    let store_arg = args
        .store
        .as_ref()
        .and_then(|s| valid::argument_of(s, &names.iter().collect::<Vec<_>>()).cloned());
    if let Some(name) = store_arg {
        if !args.skip.contains(&name) {
            args.skip.push(name);
        }
    }
    // `in_transaction = tx`: the caller's transaction is never part of the key or fingerprint.
    if let Some((_, tx)) = &args.in_transaction {
        if names.contains(tx) && !args.skip.contains(tx) {
            args.skip.push(tx.clone());
        }
    }
    let (model, more) = valid::check(&func, &args);
    errors.extend(more);
    match model {
        Some(model) if errors.is_empty() => wrap(func, &args, &model),
        _ => with_errors(errors, item),
    }
}

fn with_errors(errors: Vec<syn::Error>, item: TokenStream) -> TokenStream {
    let mut errors = errors.into_iter();
    let Some(mut all) = errors.next() else {
        return item;
    };
    for e in errors {
        all.combine(e);
    }
    let mut out = all.to_compile_error();
    out.extend(item);
    out
}

/// A span that points at the user's tokens but belongs to the expansion, so that type errors
/// land under those tokens while lints still see generated code.
fn at(tokens: &impl Spanned) -> Span {
    Span::call_site().located_at(tokens.span())
}

/// `site!()`, `site!("ns")` or `site!("ns", shared)`: a `static` of this function, whose
/// marker type's name is the function's path (see `idem_core::__private::site`).
fn site(p: &TokenStream, args: &Args) -> TokenStream {
    match (&args.namespace, &args.shared) {
        (None, _) => quote!(#p::site!()),
        (Some(ns), None) => quote!(#p::site!(#ns)),
        (Some(ns), Some(_)) => quote!(#p::site!(#ns, shared)),
    }
}

fn wrap(mut func: ItemFn, args: &Args, model: &Func) -> TokenStream {
    let krate = args
        .krate
        .as_ref()
        .map_or_else(|| quote!(::idem_core), ToTokens::to_token_stream);
    let p = quote!(#krate::__private);
    let call = call(&p, &func, args, model);
    match model.shape {
        Shape::Async => {
            let mut body = (*func.block).clone();
            if args.tx().is_none() {
                let moves = move_arguments(&mut func.sig, args, model);
                body.stmts.splice(0..0, moves);
            }
            let run = run(&p, call, args, model, &func.sig.generics, &body);
            let braces = func.block.brace_token;
            *func.block = syn::parse_quote!({ #run });
            // The user's braces keep the item's span theirs: `dead_code` and other lints
            // still see the function as user code.
            func.block.brace_token = braces;
        }
        Shape::AsyncTrait => {
            if let Some(body) = async_trait_body_mut(&mut func.block) {
                allow_unused_moves(&mut body.block, args, model);
                let run = run(&p, call, args, model, &func.sig.generics, &body.block);
                let braces = body.block.brace_token;
                body.block = syn::parse_quote!({ #run });
                body.block.brace_token = braces;
            }
        }
    }
    func.into_token_stream()
}

/// `let x = x;` for each argument, at the top of the body's async block, so that the block
/// owns its arguments as the plain `async fn`'s future does. Without the move the block would
/// capture `&x`, and a `Send`-but-not-`Sync` argument (a `Cell`, a `Box<dyn Trait + Send>`, an
/// `impl Trait + Send`) would make the call's future not `Send`.
///
/// Not moved: the arguments the `store = ..` expression borrows (the store outlives the body),
/// and `self`, which the body keeps naming. A `mut x` argument becomes `x` in the signature and
/// `let mut x = x;` in the body.
fn move_arguments(sig: &mut syn::Signature, args: &Args, model: &Func) -> Vec<syn::Stmt> {
    // Used outside the body too (fingerprinted, or named by an attribute expression): the
    // body's copy may go unused without a warning, as the plain function's would.
    let durations = [
        args.ttl.as_ref(),
        args.lease.as_ref(),
        args.wait_timeout.as_ref().map(|(_, d)| d),
    ];
    let used = |n: &syn::Ident| {
        !args.skip.contains(n)
            || [&args.key, &args.scope]
                .into_iter()
                .flatten()
                .any(|e| valid::mentions(e, n))
            || durations
                .iter()
                .any(|d| matches!(d, Some(Dur::Expr(e)) if valid::mentions(e, n)))
    };
    let mut moves = Vec::new();
    for input in &mut sig.inputs {
        if let syn::FnArg::Typed(t) = input {
            move_bindings(&mut t.pat, &mut |ident, mutable| {
                let in_store = args
                    .store
                    .as_ref()
                    .is_some_and(|s| valid::mentions(s, ident));
                if in_store || !model.inputs.iter().any(|i| i.bindings.contains(ident)) {
                    return false;
                }
                let allow = used(ident).then(|| quote!(#[allow(unused_variables)]));
                let mutability = mutable.then(|| quote!(mut));
                moves.push(syn::parse_quote!(#allow let #mutability #ident = #ident;));
                true
            });
        }
    }
    moves
}

/// Calls `moved(ident, mutable)` for each plain binding of the pattern; where it returns
/// true, a `mut` on the binding is removed (the body's own binding carries it).
fn move_bindings(pat: &mut syn::Pat, moved: &mut impl FnMut(&syn::Ident, bool) -> bool) {
    use syn::Pat;
    match pat {
        Pat::Ident(p) => {
            if let Some((_, sub)) = &mut p.subpat {
                move_bindings(sub, moved);
            }
            if p.by_ref.is_none() && moved(&p.ident, p.mutability.is_some()) {
                p.mutability = None;
            }
        }
        Pat::Reference(r) => move_bindings(&mut r.pat, moved),
        Pat::Paren(p) => move_bindings(&mut p.pat, moved),
        Pat::Tuple(t) => t.elems.iter_mut().for_each(|p| move_bindings(p, moved)),
        Pat::TupleStruct(t) => t.elems.iter_mut().for_each(|p| move_bindings(p, moved)),
        Pat::Slice(s) => s.elems.iter_mut().for_each(|p| move_bindings(p, moved)),
        Pat::Struct(s) => s
            .fields
            .iter_mut()
            .for_each(|f| move_bindings(&mut f.pat, moved)),
        Pat::Type(t) => move_bindings(&mut t.pat, moved),
        _ => {}
    }
}

/// `#[async_trait]` moves each argument into its body (`let order = order;`). An argument
/// that only the key or fingerprint uses would make that move an unused variable, where the
/// plain `async fn` has no warning: allow it on those moves alone.
fn allow_unused_moves(block: &mut Block, args: &Args, model: &Func) {
    let argument = |n: &syn::Ident| model.inputs.iter().any(|i| i.bindings.contains(n));
    let used = |n: &syn::Ident| {
        argument(n)
            && (!args.skip.contains(n)
                || [&args.key, &args.scope, &args.store]
                    .into_iter()
                    .flatten()
                    .any(|e| valid::mentions(e, n)))
    };
    for stmt in &mut block.stmts {
        let local = match stmt {
            // `if let Some(__ret) = None::<R> { return __ret; }`, for type inference.
            syn::Stmt::Expr(Expr::If(_), None) => continue,
            syn::Stmt::Local(local) => local,
            _ => break,
        };
        let mut bound = Vec::new();
        valid::pattern_bindings(&local.pat, &mut bound);
        if bound.iter().any(|b| b == "__ret") {
            break;
        }
        if bound.iter().any(used) {
            local
                .attrs
                .push(syn::parse_quote!(#[allow(unused_variables)]));
        }
    }
}

fn async_trait_body_mut(block: &mut Block) -> Option<&mut syn::ExprAsync> {
    match block.stmts.as_mut_slice() {
        [syn::Stmt::Expr(Expr::Call(call), None)] => match call.args.first_mut() {
            Some(Expr::Async(body)) => Some(body),
            _ => None,
        },
        _ => None,
    }
}

/// `impl Trait` anywhere in the type: it cannot be named in a turbofish.
fn contains_impl(ty: &syn::Type) -> bool {
    fn walk(tokens: TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => i == "impl",
            proc_macro2::TokenTree::Group(g) => walk(g.stream()),
            _ => false,
        })
    }
    walk(ty.to_token_stream())
}

/// `Call::new(..)` and its builder calls, up to (not including) the `run`.
fn call(p: &TokenStream, func: &ItemFn, args: &Args, model: &Func) -> TokenStream {
    let site = site(p, args);
    let mut out = quote!(#p::call(#site));
    let skipped = |n: &syn::Ident| args.skip.iter().any(|s| s == n);
    // The argument tuple carries the span of the parameter list, so that rustc points a
    // missing `Serialize` at the one argument that lacks it.
    let params = func.sig.paren_token.span.join();
    match &args.key {
        Some(key) => {
            let key = &borrow_parts(key);
            let k = quote_spanned!(at(key)=> &(#key));
            out.extend(quote!(.key(#k)));
            // Fingerprint what the key does not say: every argument not skipped, except an
            // `impl Trait` one the key covers.
            let fp: Vec<TokenStream> = model
                .inputs
                .iter()
                .filter(|i| !i.opaque)
                .flat_map(|i| &i.bindings)
                .filter(|b| !skipped(b))
                .map(|b| checked_arg(p, b, func, model))
                .collect();
            if !fp.is_empty() {
                let fp = quote_spanned!(params=> (#(#fp,)*));
                out.extend(quote!(.fingerprint(#fp)));
            }
        }
        None => {
            let parts: Vec<TokenStream> = model
                .inputs
                .iter()
                .flat_map(|i| &i.bindings)
                .filter(|b| !skipped(b))
                .map(|b| checked_arg(p, b, func, model))
                .collect();
            let parts = quote_spanned!(params=> (#(#parts,)*));
            out.extend(quote!(.key(#parts)));
        }
    }
    if let Some(scope) = &args.scope {
        let s = quote_spanned!(at(scope)=> &(#scope));
        out.extend(quote!(.scope(#s)));
    }
    for (name, dur) in [
        ("ttl", args.ttl.as_ref()),
        ("lease", args.lease.as_ref()),
        ("wait_timeout", args.wait_timeout.as_ref().map(|(_, d)| d)),
    ] {
        if let Some(dur) = dur {
            let method = syn::Ident::new(name, Span::call_site());
            let value = duration(p, dur);
            out.extend(quote!(.#method(#value)));
        }
    }
    if let Some(c) = &args.on_conflict {
        let v = if c == "reject" {
            quote!(Reject)
        } else {
            quote!(Wait)
        };
        out.extend(quote!(.on_conflict(#p::OnConflict::#v)));
    }
    if let Some(v) = &args.version {
        let n = Literal::u32_unsuffixed(v.base10_parse::<u32>().unwrap_or_default());
        out.extend(quote!(.version(#n)));
    }
    if let Some(v) = &args.max_steps {
        let n = Literal::u32_unsuffixed(v.base10_parse::<u32>().unwrap_or_default());
        out.extend(quote!(.max_steps(#n)));
    }
    if let Some(m) = &args.missing_key {
        let v = if m == "run" {
            quote!(Run)
        } else {
            quote!(Error)
        };
        out.extend(quote!(.missing_key(#p::MissingKey::#v)));
    }
    if let Some(f) = args.fail_open {
        out.extend(quote!(.fail_open(#f)));
    }
    out
}

/// `(req.a, req.b)` as `(&req.a, &req.b)` (a tuple or array of places): the key is hashed as
/// the same value, without moving the places out of the arguments the body still uses.
fn borrow_parts(key: &Expr) -> Expr {
    let place = |e: &Expr| matches!(e, Expr::Path(_) | Expr::Field(_) | Expr::Index(_));
    let borrow = |e: &mut Expr| {
        if place(e) {
            *e = syn::parse_quote_spanned!(e.span()=> &#e);
        }
    };
    let mut key = key.clone();
    match &mut key {
        Expr::Tuple(t) => t.elems.iter_mut().for_each(borrow),
        Expr::Array(a) => a.elems.iter_mut().for_each(borrow),
        _ => {}
    }
    key
}

/// `arg(&x).checked()`: `&x` when `x` is `Serialize`, else one error under `x` that says to
/// skip it (see `idem_core::__private::arg`).
///
/// An argument whose type is one of the function's type parameters is checked with `param`,
/// whose error asks for the bound `T: serde::Serialize` instead of a derive.
fn checked_arg(p: &TokenStream, b: &syn::Ident, func: &ItemFn, model: &Func) -> TokenStream {
    let checked = syn::Ident::new("checked", at(b));
    let is_param = model
        .inputs
        .iter()
        .find(|i| i.bindings.contains(b))
        .is_some_and(|i| type_param(&i.ty, &func.sig.generics));
    if is_param {
        quote_spanned!(at(b)=> #p::param(&#b).#checked())
    } else {
        quote_spanned!(at(b)=> #p::arg(&#b).#checked())
    }
}

/// `T` (or `&T`), a type parameter of the function.
fn type_param(ty: &syn::Type, generics: &syn::Generics) -> bool {
    match ty {
        syn::Type::Reference(r) => type_param(&r.elem, generics),
        syn::Type::Path(tp) if tp.qself.is_none() => tp
            .path
            .get_ident()
            .is_some_and(|id| generics.type_params().any(|t| &t.ident == id)),
        _ => false,
    }
}

fn duration(p: &TokenStream, dur: &Dur) -> TokenStream {
    match dur {
        Dur::Millis(ms) if ms % 1000 == 0 => {
            let secs = Literal::u64_unsuffixed(ms / 1000);
            quote!(#p::Duration::from_secs(#secs))
        }
        Dur::Millis(ms) => {
            let ms = Literal::u64_unsuffixed(*ms);
            quote!(#p::Duration::from_millis(#ms))
        }
        Dur::Expr(e) => e.to_token_stream(),
    }
}

/// `__idem_ok.run::<E, _>(call, &(store), from_error::<E>, async BODY).await`, or the
/// default-store / stored-errors / transactional variants, where `__idem_ok` is the check of
/// `T` (`ok_type::<T>().storable()`).
///
/// The runtime's entry points are methods of the check's value: when `T` cannot be stored,
/// the check is the one error and its value's methods ask nothing more of `T`. Were the
/// entry point to repeat the bound, rustc would report it again wherever the span differs
/// from the check's, which in an incremental build is everywhere. The same holds for `E`
/// under `errors = store` (`err_type::<E>().storable()`, passed to the run).
fn run(
    p: &TokenStream,
    call: TokenStream,
    args: &Args,
    model: &Func,
    generics: &syn::Generics,
    body: &Block,
) -> TokenStream {
    let tx = args.tx();
    // The method, and how many inferred type parameters follow `E` in its turbofish.
    let (method, rest, storing) = match (tx, args.store.is_some(), args.stores_errors()) {
        (Some(Tx::Own(_)), _, _) => (quote!(run_in_transaction), 2, false),
        (Some(Tx::Caller(_)), _, _) => (quote!(run_within), 2, false),
        (None, true, false) => (quote!(run), 1, false),
        (None, true, true) => (quote!(run_storing_errors), 2, true),
        (None, false, false) => (quote!(run_on_default), 1, false),
        (None, false, true) => (quote!(run_storing_errors_on_default), 2, true),
    };
    // `T` and `E` are re-spanned to one mixed-site span at their first token: their checks
    // report there, under the user's return type.
    let ok_at = Span::mixed_site().located_at(first_span(&model.ok));
    let ok = respan(model.ok.to_token_stream(), ok_at);
    let err = model.err.as_ref().filter(|e| !contains_impl(e));
    let err_at = err.map(|e| Span::mixed_site().located_at(first_span(e)));
    let err_tokens = err
        .zip(err_at)
        .map(|(e, at)| respan(e.to_token_stream(), at));
    let e = err_tokens.clone().unwrap_or_else(|| quote!(_));
    let rest = (0..rest).map(|_| quote!(_));
    let types = quote!(::<#e, #(#rest),*>);
    // Without `errors = store`, `E: From<idem_core::Error>` is asked of this argument alone.
    let from_error = (!storing).then(|| quote!(#p::from_error::<#e>,));
    // The checks: one error, naming the fix, for a `T` (or with `errors = store`, an `E`)
    // that cannot be stored. A `T` that is a type parameter of the function is asked for
    // the serde bounds rather than derives.
    let ok_var = syn::Ident::new("__idem_ok", Span::mixed_site());
    let err_var = syn::Ident::new("__idem_err", Span::mixed_site());
    let mut checks = if contains_impl(&model.ok) {
        quote!(let #ok_var = #p::storing();)
    } else {
        let check = if type_param(&model.ok, generics) {
            quote!(ok_param)
        } else {
            quote!(ok_type)
        };
        let value = respan(quote!(#p::#check::<#ok>().storable()), ok_at);
        quote!(let #ok_var = #value;)
    };
    let err_arg = storing.then(|| {
        let value = match (&err_tokens, err_at) {
            (Some(err), Some(at)) => respan(quote!(#p::err_type::<#err>().storable()), at),
            _ => quote!(#p::storing_errors()),
        };
        checks.extend(quote!(let #err_var = #value;));
        quote!(#err_var,)
    });
    let store_var = syn::Ident::new("__idem_store", Span::mixed_site());
    let tx_var = syn::Ident::new("__idem_tx", Span::mixed_site());
    let mut prelude = TokenStream::new();
    let store = args.store.as_ref().map(|s| {
        let checked = syn::Ident::new("checked", at(s));
        if tx.is_none() {
            return quote_spanned!(at(s)=> #p::store_arg(&(#s)).#checked(),);
        }
        // Transactional mode: the store itself (its `Tx` type is the body's), checked.
        prelude.extend(quote_spanned!(at(s)=> let #store_var = #p::tx_store(&(#s)).#checked();));
        if let Some(Tx::Caller(arg)) = tx {
            // The caller's transaction, checked against the store's `Tx` under its type.
            let ty = model
                .inputs
                .iter()
                .find(|i| i.bindings.contains(arg))
                .map_or_else(|| at(arg), |i| at(&i.ty));
            prelude.extend(quote_spanned!(ty=> let #tx_var = #p::tx_arg(#store_var, #arg);));
        }
        quote!(#store_var,)
    });
    // The run itself is placed under `E` with `errors = store`, else under `T`.
    let run_at = match (storing, err_at) {
        (true, Some(at)) => at,
        _ => ok_at,
    };
    // Mixed-site: a user variable of the same name neither shadows nor is shadowed by these.
    let call_var = syn::Ident::new("__idem_call", Span::mixed_site());
    let ok_var_at = syn::Ident::new("__idem_ok", run_at);
    let call_var_at = syn::Ident::new("__idem_call", run_at);
    // Transactional mode: the body becomes an async closure of the transaction, bound to the
    // user's name (`transaction = tx`), or shadowing the caller's argument (`in_transaction`).
    let (tx_arg, closure) = match tx {
        None => (None, TokenStream::new()),
        Some(Tx::Own(name)) => (None, quote!(|#name|)),
        Some(Tx::Caller(name)) => (Some(quote!(#tx_var,)), quote!(|#name|)),
    };
    let run_call = quote_spanned!(run_at=>
        #ok_var_at.#method #types(#err_arg #call_var_at, #store #from_error #tx_arg
            async #closure #body).await);
    quote! {
        #checks
        #prelude
        let #call_var = #call;
        #run_call
    }
}

fn first_span(ty: &syn::Type) -> Span {
    ty.to_token_stream()
        .into_iter()
        .next()
        .map_or_else(Span::call_site, |t| t.span())
}

/// The tokens with every span replaced (names keep resolving: mixed-site spans resolve
/// types and paths at the call site).
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let proc_macro2::TokenTree::Group(g) = &t {
                let mut ng = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                ng.set_span(span);
                t = proc_macro2::TokenTree::Group(ng);
            } else {
                t.set_span(span);
            }
            t
        })
        .collect()
}
