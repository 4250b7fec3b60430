//! The `#[idempotent]` attribute. Use it through `idem_core::idempotent`.

use proc_macro::TokenStream;

/// Makes an async function idempotent. (Under construction.)
#[proc_macro_attribute]
pub fn idempotent(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
