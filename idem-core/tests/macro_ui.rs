//! Compile errors of `#[idempotent]`: one case per error, each `.stderr` committed beside
//! it in `idem-macros/tests/ui/` (regenerate with `TRYBUILD=overwrite cargo test -p idem-core
//! --all-features --test macro_ui`, as CI runs it: rustc's lists of implementations depend on
//! the features; then read the carets).

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("../idem-macros/tests/ui/*.rs");
}
