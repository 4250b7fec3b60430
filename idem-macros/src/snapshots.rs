//! Expansion snapshots: each `tests/expand/NAME.rs` is expanded by [`crate::expand`] and
//! rendered with prettyplease (as `cargo expand` prints it), then compared with the committed
//! `tests/expand/NAME.expanded.rs`. `IDEM_BLESS=1 cargo test -p idem-macros` rewrites them.

use std::fs;
use std::path::Path;

use quote::ToTokens;
use syn::{File, ImplItem, Item};

fn expand_attr(
    attrs: &mut Vec<syn::Attribute>,
    item: proc_macro2::TokenStream,
) -> Option<proc_macro2::TokenStream> {
    let at = attrs.iter().position(|a| a.path().is_ident("idempotent"))?;
    let attr = attrs.remove(at);
    let args = match attr.meta {
        syn::Meta::List(list) => list.tokens,
        _ => proc_macro2::TokenStream::new(),
    };
    let _ = item;
    Some(args)
}

fn expand_file(src: &str) -> String {
    let mut file: File = syn::parse_str(src).expect("the case parses");
    for item in &mut file.items {
        match item {
            Item::Fn(f) => {
                let mut f2 = f.clone();
                if let Some(args) = expand_attr(&mut f2.attrs, proc_macro2::TokenStream::new()) {
                    let out = crate::expand::idempotent(args, f2.into_token_stream());
                    *item = syn::parse2(out).expect("the expansion is an item");
                }
            }
            Item::Impl(imp) => {
                for it in &mut imp.items {
                    if let ImplItem::Fn(f) = it {
                        let mut f2 = f.clone();
                        if let Some(args) =
                            expand_attr(&mut f2.attrs, proc_macro2::TokenStream::new())
                        {
                            let out = crate::expand::idempotent(args, f2.into_token_stream());
                            *it = syn::parse2(out).expect("the expansion is a method");
                        }
                    }
                }
            }
            _ => {}
        }
    }
    prettyplease::unparse(&file)
}

#[test]
fn expansions_match_the_committed_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/expand");
    let bless = std::env::var_os("IDEM_BLESS").is_some();
    let mut cases = 0;
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .expect("tests/expand exists")
        .flatten()
        .collect();
    entries.sort_by_key(std::fs::DirEntry::path);
    for entry in entries {
        let path = entry.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !name.ends_with(".rs") || name.ends_with(".expanded.rs") {
            continue;
        }
        cases += 1;
        let src = fs::read_to_string(&path).expect("case readable");
        let got = expand_file(&src);
        let snap = path.with_extension("expanded.rs");
        if bless {
            fs::write(&snap, &got).expect("snapshot writable");
            continue;
        }
        let want = fs::read_to_string(&snap).unwrap_or_default();
        assert_eq!(
            got, want,
            "{name}: the expansion changed; if intended, rerun with IDEM_BLESS=1 and review the diff"
        );
    }
    assert!(cases >= 5, "found {cases} cases");
}
