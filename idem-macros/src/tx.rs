//! Transactional mode (`transaction = tx`, `in_transaction = tx`): the checks of its
//! arguments against the function. What the types alone decide (a store without transactions,
//! an argument that is not the store's `Tx`) is checked by the expansion instead
//! (`idem_core::__private::{tx_store, tx_arg}`).

use syn::{Ident, Type};

use crate::model::{Args, Input};
use crate::suggest::did_you_mean;

/// The message of every transaction argument of the wrong type.
pub(crate) const WRONG_TYPE: &str =
    "`in_transaction` needs `&mut` the store's transaction type, e.g. `tx: &mut idem_stores::PgTx`";

/// The errors of the transactional arguments.
pub(crate) fn check(args: &Args, inputs: &[Input], names: &[&Ident]) -> Vec<syn::Error> {
    let mut errors = Vec::new();
    let Some((mode, _)) = args.transaction.as_ref().or(args.in_transaction.as_ref()) else {
        return errors;
    };
    if let (Some(_), Some((name, _))) = (&args.transaction, &args.in_transaction) {
        errors.push(syn::Error::new(
            name.span(),
            "`transaction` and `in_transaction` together: write `transaction = tx` for a \
             transaction that idem opens and commits, or `in_transaction = tx` for the \
             caller's, not both",
        ));
    }
    if args.store.is_none() {
        errors.push(syn::Error::new(
            mode.span(),
            format!(
                "`{mode}` needs `store = ..`, the SQL store whose database runs the \
                 transaction (e.g. `store = self.db`): the default store has no transaction type"
            ),
        ));
    }
    if let Some(e) = args.errors.as_ref().filter(|e| *e == "store") {
        errors.push(syn::Error::new(
            e.span(),
            "`errors = store` is not supported in transactional mode: an `Err` rolls the \
             transaction back and releases the key, so a retry runs again; remove \
             `errors = store`",
        ));
    }
    if let Some((_, tx)) = &args.transaction {
        if names.contains(&tx) {
            errors.push(syn::Error::new(
                tx.span(),
                format!(
                    "`transaction = {tx}` binds the body's transaction to `{tx}`, which would \
                     hide the argument `{tx}`: pick another name, or write \
                     `in_transaction = {tx}` if `{tx}` is the caller's transaction"
                ),
            ));
        }
    }
    if let Some((_, tx)) = &args.in_transaction {
        match inputs.iter().find(|i| i.bindings.contains(tx)) {
            None => {
                let hint = did_you_mean(tx, names);
                errors.push(syn::Error::new(
                    tx.span(),
                    format!(
                        "`in_transaction = {tx}` names no argument{hint} (it names the argument \
                         that is the caller's transaction, e.g. `{tx}: &mut idem_stores::PgTx`)"
                    ),
                ));
            }
            Some(input) => match &input.ty {
                Type::Reference(r) if r.mutability.is_some() => {}
                ty => errors.push(syn::Error::new_spanned(ty, WRONG_TYPE)),
            },
        }
    }
    errors
}
