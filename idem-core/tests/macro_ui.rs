//! Compile errors of `#[idempotent]`: one case per error, each `.stderr` committed beside
//! it in `idem-macros/tests/ui/` (regenerate with `TRYBUILD=overwrite`, then read the
//! carets).

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("../idem-macros/tests/ui/*.rs");
}
