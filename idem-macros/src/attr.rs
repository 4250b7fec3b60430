//! Parses `#[idempotent(..)]` into [`Args`]. Syntax errors stop the parse; everything else
//! (an unknown or repeated argument, a bad duration or choice) is collected so that all of
//! them are reported at once, each under its own token.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Expr, ExprLit, Ident, Lit, LitBool, LitInt, LitStr, Path, Token};

use crate::duration::parse_millis;
use crate::model::{Args, Dur};
use crate::suggest::closest;

/// Every argument, in the order of the reference table (listed by the "unknown argument" error).
const ARGUMENTS: &[&str] = &[
    "key",
    "ttl",
    "store",
    "skip",
    "scope",
    "namespace",
    "shared",
    "lease",
    "on_conflict",
    "wait_timeout",
    "errors",
    "version",
    "missing_key",
    "fail_open",
    "max_steps",
    "crate",
    "transaction",
    "in_transaction",
];

/// The arguments, and the errors found in them.
pub(crate) fn parse(attr: TokenStream) -> syn::Result<(Args, Vec<syn::Error>)> {
    let mut args = Args::default();
    let mut errors = Vec::new();
    let parser = |input: ParseStream<'_>| {
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            let name = input.call(Ident::parse_any)?;
            let n = name.to_string();
            if seen.contains(&n) {
                errors.push(syn::Error::new(
                    name.span(),
                    format!("`{n}` set multiple times"),
                ));
                skip_value(input)?;
            } else {
                seen.push(n);
                argument(input, &name, &mut args, &mut errors)?;
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(())
    };
    parser.parse2(attr)?;
    Ok((args, errors))
}

fn argument(
    input: ParseStream<'_>,
    name: &Ident,
    args: &mut Args,
    errors: &mut Vec<syn::Error>,
) -> syn::Result<()> {
    match name.to_string().as_str() {
        "key" => args.key = Some(value(input, name, "an expression, e.g. `key = req.id`")?),
        "store" => {
            args.store = Some(value(input, name, "an expression, e.g. `store = self.store`")?);
        }
        "scope" => {
            args.scope = Some(value(input, name, "an expression, e.g. `scope = tenant_id`")?);
        }
        "ttl" => args.ttl = Some(duration(input, name, errors)?),
        "lease" => args.lease = Some(duration(input, name, errors)?),
        "wait_timeout" => args.wait_timeout = Some((name.clone(), duration(input, name, errors)?)),
        "namespace" => match ungrouped(value(input, name, "a string literal, e.g. `namespace = \"billing::charge\"`")?) {
            Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) if !s.value().is_empty() => {
                args.namespace = Some(s);
            }
            other => errors.push(syn::Error::new_spanned(
                other,
                "`namespace` takes a non-empty string literal, e.g. `namespace = \"billing::charge\"`",
            )),
        },
        "on_conflict" => args.on_conflict = choice(input, name, &["wait", "reject"], errors)?,
        "errors" => args.errors = choice(input, name, &["release", "store"], errors)?,
        "missing_key" => args.missing_key = choice(input, name, &["error", "run"], errors)?,
        "version" => {
            eq(input, name, "a whole number, e.g. `version = 2`")?;
            if input.peek(LitStr) {
                let s: LitStr = input.parse()?;
                errors.push(syn::Error::new(
                    s.span(),
                    match s.value().trim().parse::<u32>() {
                        Ok(n) => format!("write `version = {n}` (a number, without quotes)"),
                        Err(_) => "`version` takes a whole number without quotes, e.g. `version = 2`"
                            .to_owned(),
                    },
                ));
                return Ok(());
            }
            let lit: LitInt = input.parse()?;
            match lit.base10_parse::<u32>() {
                Ok(_) if lit.suffix().is_empty() || lit.suffix() == "u32" => args.version = Some(lit),
                _ => errors.push(syn::Error::new(
                    lit.span(),
                    "`version` takes a whole number that fits a u32, e.g. `version = 2`",
                )),
            }
        }
        "max_steps" => {
            eq(input, name, "a whole number, e.g. `max_steps = 50`")?;
            let lit: LitInt = input.parse()?;
            match lit.base10_parse::<u32>() {
                Ok(_) if lit.suffix().is_empty() || lit.suffix() == "u32" => {
                    args.max_steps = Some(lit)
                }
                _ => errors.push(syn::Error::new(
                    lit.span(),
                    "`max_steps` takes a whole number that fits a u32, e.g. `max_steps = 50`",
                )),
            }
        }
        "shared" => {
            if input.peek(Token![=]) {
                return Err(syn::Error::new(
                    name.span(),
                    "`shared` takes no value: write `namespace = \"..\", shared`",
                ));
            }
            args.shared = Some(name.clone());
        }
        "fail_open" => {
            if input.peek(Token![=]) {
                input.parse::<Token![=]>()?;
                let b: LitBool = input.parse()?;
                args.fail_open = Some(b.value);
            } else {
                args.fail_open = Some(true);
            }
        }
        "skip" => {
            if !input.peek(syn::token::Paren) {
                return Err(syn::Error::new(
                    name.span(),
                    "`skip` lists arguments in parentheses, e.g. `skip(db, client)`",
                ));
            }
            let content;
            syn::parenthesized!(content in input);
            let names = content.parse_terminated(Ident::parse_any, Token![,])?;
            args.skip.extend(names);
        }
        "transaction" => {
            args.transaction = Some((
                name.clone(),
                variable(input, name, "the name the body's transaction is bound to, e.g. `transaction = tx`")?,
            ));
        }
        "in_transaction" => {
            args.in_transaction = Some((
                name.clone(),
                variable(
                    input,
                    name,
                    "the argument that is the caller's transaction, e.g. `in_transaction = tx` with `tx: &mut idem_stores::PgTx`",
                )?,
            ));
        }
        "crate" => {
            eq(input, name, "a path, e.g. `crate = my_crate::idem`")?;
            args.krate = Some(input.call(Path::parse_mod_style)?);
        }
        other => {
            let hint = closest(other, ARGUMENTS.iter().copied())
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            errors.push(syn::Error::new(
                name.span(),
                format!(
                    "unknown argument `{other}`{hint} (the arguments are: {})",
                    ARGUMENTS.join(", ")
                ),
            ));
            skip_value(input)?;
        }
    }
    Ok(())
}

/// `= name`: a variable.
fn variable(input: ParseStream<'_>, name: &Ident, what: &str) -> syn::Result<Ident> {
    eq(input, name, what)?;
    let value: Expr = input.parse()?;
    match &value {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => match p.path.get_ident() {
            Some(ident) => Ok(ident.clone()),
            None => Err(syn::Error::new_spanned(
                &value,
                format!("`{name}` takes {what}"),
            )),
        },
        _ => Err(syn::Error::new_spanned(
            &value,
            format!("`{name}` takes {what}"),
        )),
    }
}

/// `= <expr>`.
/// The expression inside the invisible group a `macro_rules!` fragment (`$ns:literal`)
/// arrives in.
fn ungrouped(e: Expr) -> Expr {
    match e {
        Expr::Group(g) => ungrouped(*g.expr),
        other => other,
    }
}

fn value(input: ParseStream<'_>, name: &Ident, what: &str) -> syn::Result<Expr> {
    eq(input, name, what)?;
    input.parse()
}

fn eq(input: ParseStream<'_>, name: &Ident, what: &str) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>().map(drop)
    } else {
        Err(syn::Error::new(
            name.span(),
            format!("`{name}` needs a value: {what}"),
        ))
    }
}

/// `= "30s"` (checked here) or `= <Duration expression>`.
fn duration(
    input: ParseStream<'_>,
    name: &Ident,
    errors: &mut Vec<syn::Error>,
) -> syn::Result<Dur> {
    let expr = value(
        input,
        name,
        "a duration, e.g. `\"30s\"`, or a `Duration` expression",
    )?;
    Ok(match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => match parse_millis(&s.value()) {
            Ok(ms) => Dur::Millis(ms),
            Err(msg) => {
                errors.push(syn::Error::new(s.span(), msg));
                Dur::Millis(1)
            }
        },
        Expr::Lit(ExprLit {
            lit: lit @ (Lit::Int(_) | Lit::Float(_)),
            ..
        }) => {
            errors.push(syn::Error::new_spanned(
                &lit,
                format!(
                    "a bare number has no unit: write `{name} = \"{}s\"` (or \"ms\", \"m\", \"h\", \"d\"), \
                     or a `Duration` expression",
                    lit.to_token_stream()
                ),
            ));
            Dur::Millis(1)
        }
        other if zero_duration(&other) => {
            errors.push(syn::Error::new_spanned(
                &other,
                format!(
                    "`{name}` is zero: a ttl, lease or wait_timeout must be positive, e.g. \
                     `{name} = \"30s\"` or `Duration::from_secs(30)`"
                ),
            ));
            Dur::Millis(1)
        }
        other => Dur::Expr(other),
    })
}

/// A `Duration` expression that is zero where the attribute can see it: `Duration::ZERO`,
/// `Duration::from_secs(0)` (or `from_millis`, `from_micros`, `from_nanos`, `from_secs_f64`,
/// `from_secs_f32`, `new(0, 0)`), with any path before `Duration`. Anything else is checked
/// when the call runs (`Error::InvalidOption`).
fn zero_duration(e: &Expr) -> bool {
    let is_zero = |e: &Expr| match ungrouped(e.clone()) {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.base10_parse::<u128>().is_ok_and(|n| n == 0),
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => f.base10_parse::<f64>().is_ok_and(|n| n == 0.0),
        _ => false,
    };
    let on_duration = |path: &syn::Path, names: &[&str]| {
        let segs: Vec<_> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        matches!(segs.as_slice(), [.., ty, f] if ty == "Duration" && names.contains(&f.as_str()))
    };
    match ungrouped(e.clone()) {
        Expr::Path(p) => on_duration(&p.path, &["ZERO"]),
        Expr::Paren(p) => zero_duration(&p.expr),
        Expr::Call(c) => match ungrouped((*c.func).clone()) {
            Expr::Path(p)
                if on_duration(
                    &p.path,
                    &[
                        "from_secs",
                        "from_millis",
                        "from_micros",
                        "from_nanos",
                        "from_secs_f64",
                        "from_secs_f32",
                        "from_mins",
                        "from_hours",
                        "new",
                    ],
                ) =>
            {
                !c.args.is_empty() && c.args.iter().all(is_zero)
            }
            _ => false,
        },
        _ => false,
    }
}

/// `= one_of_the_words`.
fn choice(
    input: ParseStream<'_>,
    name: &Ident,
    words: &[&str],
    errors: &mut Vec<syn::Error>,
) -> syn::Result<Option<Ident>> {
    let expected = format!("`{name} = {}`", words.join("` or `"));
    eq(input, name, &expected)?;
    if input.peek(LitStr) {
        let s: LitStr = input.parse()?;
        let value = s.value();
        let msg = if words.contains(&value.as_str()) {
            format!("write `{name} = {value}` (without quotes)")
        } else {
            format!("unknown value {value:?}: write {expected} (without quotes)")
        };
        errors.push(syn::Error::new(s.span(), msg));
        return Ok(None);
    }
    let word = input.call(Ident::parse_any)?;
    if words.iter().any(|w| word == w) {
        Ok(Some(word))
    } else {
        let hint = closest(&word.to_string(), words.iter().copied())
            .map(|c| format!("did you mean `{c}`? "))
            .unwrap_or_default();
        errors.push(syn::Error::new(
            word.span(),
            format!("unknown value `{word}`: {hint}write {expected}"),
        ));
        Ok(None)
    }
}

/// Consumes the value of an argument that is not used (unknown or repeated).
fn skip_value(input: ParseStream<'_>) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        input.parse::<Expr>()?;
    } else if input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in input);
        let _: TokenStream = content.parse()?;
    }
    Ok(())
}
