//! The documentation cannot drift: every page of README.md and `docs/` is included as a doc
//! test (src/lib.rs), and neither the pages nor the API docs
//! of the published crates point at internal issue numbers or spec sections instead of
//! describing the behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.md` file under `dir`, recursively, sorted.
fn pages(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(pages(&path));
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

#[test]
fn every_page_is_a_doc_test() {
    let harness = fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let mut missing = Vec::new();
    let mut all = pages(&root().join("docs"));
    all.push(root().join("README.md"));
    for page in all {
        let rel = relative(&page);
        let here = format!("include_str!(\"../{rel}\")");
        if !harness.contains(&here) {
            missing.push(rel);
        }
    }
    assert!(
        missing.is_empty(),
        "pages whose samples no doc test runs (include them in src/lib.rs): {missing:?}"
    );
}

/// `issue 13`, `issue-12`, `SPEC §4`, a bare `§`: references a reader cannot follow.
fn internal_references(line: &str) -> bool {
    let lower = line.to_lowercase();
    let issue_number = ["issue ", "issue-", "issue #", "issues "].iter().any(|p| {
        lower.match_indices(p).any(|(i, m)| {
            lower[i + m.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
    });
    // RFCs number their sections with `§`; that reference a reader can follow.
    let section = line.contains('§') && !line.contains("RFC");
    issue_number || line.contains("SPEC") || section
}

#[test]
fn pages_describe_behaviour_not_internal_references() {
    let mut found = Vec::new();
    let mut all = pages(&root().join("docs"));
    all.push(root().join("README.md"));
    all.push(root().join("idem-core/src/idempotent.md"));
    for page in all {
        let text = fs::read_to_string(&page).unwrap();
        for (n, line) in text.lines().enumerate() {
            if internal_references(line) {
                found.push(format!("{}:{}: {line}", relative(&page), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "internal references:\n{}",
        found.join("\n")
    );
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn api_docs_describe_behaviour_not_internal_references() {
    let mut found = Vec::new();
    for krate in [
        "idempo",
        "idem-core",
        "idem-macros",
        "idem-stores",
        "idem-http",
        "idem-testkit",
    ] {
        for file in sources(&root().join(krate).join("src")) {
            let text = fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let trimmed = line.trim_start();
                let doc = trimmed.starts_with("///") || trimmed.starts_with("//!");
                if doc && internal_references(trimmed) {
                    found.push(format!("{}:{}: {trimmed}", relative(&file), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "internal references:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_reference_check_catches_what_it_should() {
    assert!(internal_references("transactional mode (issue 13)"));
    assert!(internal_references("the issue-12 targets"));
    assert!(internal_references("The promise (SPEC §3, §6):"));
    assert!(!internal_references("idem does not issue it."));
    assert!(!internal_references("RFC 8941 §4.2.5: a string"));
}
