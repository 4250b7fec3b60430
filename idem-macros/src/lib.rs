//! The `#[idempotent]` attribute. Use it through `idem_core::idempotent`, which documents
//! every argument with an example.
//!
//! A pipeline, one concern a file: `attr` parses the arguments into the `model`, `valid`
//! reads the function and checks both (collecting every error; `traps` holds the checks for
//! mistakes that would compile and fail at run time, `tx` those of transactional mode,
//! `suggest` the "did you mean"), `expand`
//! writes the wrapper — a `Call` built from the arguments, running the body as its future.

mod attr;
mod duration;
mod expand;
mod model;
mod suggest;
mod traps;
mod tx;
mod valid;

use proc_macro::TokenStream;

/// Makes an async function idempotent. See `idem_core::idempotent` for the arguments.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(attr.into(), item.into()).into()
}

/// `#[idempotent]` as the `idempo` facade re-exports it: the same attribute, whose runtime path
/// defaults to `::idempo` instead of `::idem_core` (a `crate = ..` argument still wins).
/// Not for direct use.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn __idempotent_in_facade(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr: proc_macro2::TokenStream = attr.into();
    expand::idempotent(
        with_default_crate(attr, quote::quote!(::idempo)),
        item.into(),
    )
    .into()
}

/// `attr` with `crate = <path>` put in front, unless it already names a `crate`.
fn with_default_crate(
    attr: proc_macro2::TokenStream,
    path: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    use proc_macro2::TokenTree;
    let tokens: Vec<TokenTree> = attr.clone().into_iter().collect();
    let names_crate = tokens.windows(2).any(|w| {
        matches!((&w[0], &w[1]), (TokenTree::Ident(i), TokenTree::Punct(p)) if i == "crate" && p.as_char() == '=')
    });
    if names_crate {
        return attr;
    }
    if tokens.is_empty() {
        quote::quote!(crate = #path)
    } else {
        quote::quote!(crate = #path, #attr)
    }
}

#[cfg(test)]
mod snapshots;
