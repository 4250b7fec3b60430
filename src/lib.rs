//! Examples and cross-crate integration tests of idem. Not published; see `idem-core`.
