//! Mistakes that would compile and then fail at run time, and typos: each becomes an error
//! that names the fix. A `HashSet` argument (serde writes a set in iteration order, so equal
//! sets can hash apart), a `&mut` argument (a replay skips the body that would update it),
//! and a variable in `key` that is a near miss of an argument's name.

use syn::{Expr, GenericArgument, Ident, PathArguments, Type};

use crate::model::Input;
use crate::suggest::closest;

/// The `HashSet` and `&mut` errors of the arguments that are not skipped.
pub(crate) fn arguments(inputs: &[Input], skipped: &dyn Fn(&Ident) -> bool) -> Vec<syn::Error> {
    let mut errors = Vec::new();
    for input in inputs {
        let Some(name) = input.bindings.iter().find(|b| !skipped(b)) else {
            continue;
        };
        if let Type::Reference(r) = &input.ty {
            if let Some(m) = &r.mutability {
                let and = r.and_token;
                errors.push(syn::Error::new_spanned(
                    quote::quote!(#and #m),
                    format!(
                        "a replay skips the body, so the `&mut` argument `{name}` is not \
                         updated on a replay: return the value instead, or add `skip({name})` \
                         to accept that"
                    ),
                ));
                continue;
            }
        }
        if !input.opaque {
            if let Some(set) = hash_set(&input.ty) {
                errors.push(syn::Error::new(
                    set.span(),
                    format!(
                        "a `HashSet` is serialized in iteration order, which differs between \
                         equal sets, so a retry would not match the first call (`KeyReused`, \
                         or a new key): use a `BTreeSet`, or `skip({name})` with an explicit \
                         `key = ...`"
                    ),
                ));
            }
        }
    }
    errors
}

/// `key = tags` (or `&tags`, `tags.clone()`) where `tags` is a `HashSet`, skipped or not.
pub(crate) fn key_is_a_set(key: &Expr, inputs: &[Input], names: &[&Ident]) -> Option<syn::Error> {
    let name = crate::valid::argument_of(key, names)?;
    let input = inputs.iter().find(|i| i.bindings.contains(name))?;
    hash_set(&input.ty)?;
    Some(syn::Error::new_spanned(
        key,
        format!(
            "a `HashSet` is serialized in iteration order, which differs between equal sets, \
             so a retry would not find the first call's record: key on a `BTreeSet` (or a \
             sorted `Vec`) of `{name}`, or on a field that identifies the request"
        ),
    ))
}

/// The `HashSet` in an argument's type (`HashSet<T>`, `&HashSet<T>`, `Option<HashSet<T>>`..):
/// serde writes a set in iteration order, which is not the same for two equal sets.
fn hash_set(ty: &Type) -> Option<&Ident> {
    match ty {
        Type::Reference(r) => hash_set(&r.elem),
        Type::Paren(p) => hash_set(&p.elem),
        Type::Group(g) => hash_set(&g.elem),
        Type::Slice(s) => hash_set(&s.elem),
        Type::Array(a) => hash_set(&a.elem),
        Type::Tuple(t) => t.elems.iter().find_map(hash_set),
        Type::Path(p) if p.qself.is_none() => p.path.segments.iter().find_map(|s| {
            if s.ident == "HashSet" {
                return Some(&s.ident);
            }
            match &s.arguments {
                PathArguments::AngleBracketed(a) => a.args.iter().find_map(|g| match g {
                    GenericArgument::Type(t) => hash_set(t),
                    _ => None,
                }),
                _ => None,
            }
        }),
        _ => None,
    }
}

/// A variable in `key` (or `scope`) that is no argument but two edits from one (`order_idd` for
/// `order_id`): conservative, so only lowercase one-word paths outside call position that
/// no closure or `let` in the key binds.
pub(crate) fn typos(key: &Expr, names: &[&Ident]) -> Vec<syn::Error> {
    use syn::visit::Visit;

    #[derive(Default)]
    struct Walk<'a> {
        used: Vec<&'a Ident>,
        bound: Vec<String>,
    }
    impl<'a> Visit<'a> for Walk<'a> {
        fn visit_expr_call(&mut self, call: &'a syn::ExprCall) {
            if !matches!(&*call.func, Expr::Path(_)) {
                self.visit_expr(&call.func);
            }
            for a in &call.args {
                self.visit_expr(a);
            }
        }
        fn visit_expr_path(&mut self, p: &'a syn::ExprPath) {
            if p.qself.is_none() && p.path.segments.len() == 1 && p.path.leading_colon.is_none() {
                let seg = &p.path.segments[0];
                if seg.arguments.is_none() {
                    self.used.push(&seg.ident);
                }
            }
        }
        fn visit_pat_ident(&mut self, p: &'a syn::PatIdent) {
            self.bound.push(p.ident.to_string());
            syn::visit::visit_pat_ident(self, p);
        }
    }

    let mut walk = Walk::default();
    walk.visit_expr(key);
    let args: Vec<String> = names.iter().map(ToString::to_string).collect();
    walk.used
        .into_iter()
        .filter_map(|ident| {
            let word = ident.to_string();
            let lowercase = word.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
            if !lowercase || word == "self" || args.contains(&word) || walk.bound.contains(&word) {
                return None;
            }
            let close = closest(&word, args.iter().map(String::as_str))?;
            Some(syn::Error::new(
                ident.span(),
                format!("`{word}` is not an argument of the function; did you mean `{close}`?"),
            ))
        })
        .collect()
}
