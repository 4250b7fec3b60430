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

#[cfg(test)]
mod snapshots;
