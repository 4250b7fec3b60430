//! The future of an annotated function is `Send` whenever the plain function's is: each case
//! in `idem-macros/tests/pass/` takes a `Send`-but-not-`Sync` value (an argument, a skipped
//! `Box<dyn Trait + Send>` handle, an `impl Trait + Send` argument) and `tokio::spawn`s the
//! call on a multi-thread runtime. trybuild builds and runs each as its own program; the
//! same files are compiled here under `clippy::future_not_send` (`cargo clippy --tests`), and
//! run as tests.

#![deny(clippy::future_not_send)]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../idem-macros/tests/pass/send_not_sync_argument.rs"]
mod send_not_sync_argument;

#[path = "../../idem-macros/tests/pass/skipped_send_handle.rs"]
mod skipped_send_handle;

#[path = "../../idem-macros/tests/pass/impl_trait_send_argument.rs"]
mod impl_trait_send_argument;

#[path = "../../idem-macros/tests/pass/key_borrows_parts.rs"]
mod key_borrows_parts;

#[path = "../../idem-macros/tests/pass/errors_store_spawned.rs"]
mod errors_store_spawned;

#[test]
fn spawn_a_call_storing_errors_and_a_generic_one() {
    errors_store_spawned::main();
}

#[test]
fn a_tuple_key_borrows_its_parts() {
    key_borrows_parts::main();
}

#[test]
fn spawn_a_send_not_sync_argument() {
    send_not_sync_argument::main();
}

#[test]
fn spawn_a_skipped_send_handle() {
    skipped_send_handle::main();
}

#[test]
fn spawn_an_impl_trait_send_argument() {
    impl_trait_send_argument::main();
}

#[test]
fn spawned_cases_build_and_run_as_programs() {
    let t = trybuild::TestCases::new();
    t.pass("../idem-macros/tests/pass/*.rs");
}
