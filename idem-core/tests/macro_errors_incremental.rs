//! Compile errors of `#[idempotent]` as a user's ordinary `cargo build` prints them.
//!
//! The trybuild cases (`macro_ui.rs`) build with `CARGO_INCREMENTAL=0`; an ordinary debug
//! build is incremental, which gives each span an owner, and rustc then no longer drops a
//! repeated error as a duplicate of the first. This test writes one small crate, whose
//! examples are the mistakes, depending on this idem-core by path, builds it with incremental
//! compilation on and counts the errors of each example: one per mistake, each naming its fix.
//!
//! The crate's target directory stays in this package's `CARGO_TARGET_TMPDIR`, so its
//! dependencies are built once; the workspace's `Cargo.lock` is copied in and the build is
//! `--offline`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

/// A mistake: its example's source, how many errors it must print, and what they must say.
struct Case {
    name: &'static str,
    errors: usize,
    says: &'static [&'static str],
    source: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "ok_not_storable",
        errors: 1,
        says: &["add `#[derive(serde::Serialize, serde::Deserialize)]` to it"],
        source: r#"
#[derive(Debug)]
struct Receipt;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, Error> {
    let _ = id;
    Ok(Receipt)
}
"#,
    },
    Case {
        name: "ok_not_storable_inner",
        errors: 1,
        says: &["derive them on the type inside it"],
        source: r#"
#[derive(Debug, serde::Serialize)]
struct Line;

#[idempotent(key = id)]
async fn lines(id: u64) -> Result<Vec<Line>, Error> {
    let _ = id;
    Ok(vec![Line])
}
"#,
    },
    Case {
        name: "ok_generic_unbounded",
        errors: 1,
        says: &["add the bound `T: serde::Serialize + serde::de::DeserializeOwned`"],
        source: r#"
#[idempotent(key = id)]
async fn fetch<T: Default>(id: u64) -> Result<T, Error> {
    let _ = id;
    Ok(T::default())
}
"#,
    },
    Case {
        name: "ok_generic_of_impl",
        errors: 1,
        says: &["add the bound `T: serde::Serialize + serde::de::DeserializeOwned`"],
        source: r#"
pub struct Repo<T>(T);

impl<T: Clone> Repo<T> {
    #[idempotent(key = id)]
    pub async fn get(&self, id: u64) -> Result<T, Error> {
        let _ = id;
        Ok(self.0.clone())
    }
}
"#,
    },
    Case {
        name: "generic_payload_unbounded",
        errors: 1,
        says: &["add the bound `P: serde::Serialize`, or add this argument to `skip(..)`"],
        source: r#"
#[idempotent]
async fn send<P>(user_id: u64, payload: P) -> Result<u64, Error> {
    drop(payload);
    Ok(user_id)
}
"#,
    },
    Case {
        name: "errors_store_unserializable",
        errors: 1,
        says: &["derive `serde::Serialize` and `serde::Deserialize` on it and implement `From<idem_core::Error>`"],
        source: r#"
#[derive(Debug)]
struct PayError;

impl From<Error> for PayError {
    fn from(_: Error) -> Self {
        PayError
    }
}

#[idempotent(key = id, errors = store)]
async fn charge(id: u64) -> Result<u64, PayError> {
    Ok(id)
}
"#,
    },
    Case {
        name: "errors_store_with_a_store",
        errors: 1,
        says: &["derive `serde::Serialize` and `serde::Deserialize` on it and implement `From<idem_core::Error>`"],
        source: r#"
#[derive(Debug)]
struct PayError;

impl From<Error> for PayError {
    fn from(_: Error) -> Self {
        PayError
    }
}

#[idempotent(key = id, errors = store, store = store)]
async fn charge(store: &dyn idem_core::Store, id: u64) -> Result<u64, PayError> {
    Ok(id)
}
"#,
    },
    Case {
        name: "foreign_error_without_from",
        errors: 1,
        says: &["wrap it in an error enum of your own", "the orphan rule"],
        source: r#"
#[idempotent(key = id)]
async fn read(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}
"#,
    },
    Case {
        name: "trait_method_not_async",
        errors: 1,
        says: &["the trait must declare the method `async fn` too, or the trait and the impl both use `#[async_trait]`"],
        source: r#"
trait Gateway {
    fn pay(&self, id: u64) -> Result<u64, Error>;
}

struct Stripe;

impl Gateway for Stripe {
    #[idempotent(key = id)]
    fn pay(&self, id: u64) -> Result<u64, Error> {
        Ok(id)
    }
}
"#,
    },
    Case {
        // Two mistakes, two errors.
        name: "zero_durations",
        errors: 2,
        says: &["`ttl` is zero", "`lease` is zero", "must be positive"],
        source: r#"
#[idempotent(key = id, ttl = std::time::Duration::ZERO, lease = std::time::Duration::from_secs(0))]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}
"#,
    },
    Case {
        // Not a mistake any more: the key borrows the places it names.
        name: "key_names_fields",
        errors: 0,
        says: &[],
        source: r#"
#[derive(serde::Serialize)]
pub struct Req {
    pub tenant: String,
    pub order: String,
}

#[idempotent(key = req.order)]
pub async fn one(req: Req) -> Result<String, Error> {
    Ok(req.order)
}

#[idempotent(key = (req.tenant, req.order))]
pub async fn both(req: Req) -> Result<String, Error> {
    Ok(req.tenant + &req.order)
}
"#,
    },
];

#[test]
fn one_error_per_mistake_in_an_incremental_build() {
    let core = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-incremental-errors");
    write_crate(core, &dir);

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&dir)
        .args([
            "build",
            "--offline",
            "--examples",
            "--keep-going",
            "--message-format=json",
            // As `cargo build` with no configuration: the dev profile is incremental.
            "--config",
            "profile.dev.incremental=true",
            "--target-dir",
        ])
        .arg(dir.join("target"))
        .env_remove("CARGO_INCREMENTAL")
        .env_remove("CARGO_BUILD_INCREMENTAL")
        .env_remove("CARGO_PROFILE_DEV_INCREMENTAL")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .expect("cargo runs");

    // The errors of each example, as rendered (`aborting due to ..` excluded).
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-message" || msg["message"]["level"] != "error" {
            continue;
        }
        let text = msg["message"]["message"].as_str().unwrap_or_default();
        if text.starts_with("aborting due to") {
            continue;
        }
        let target = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let rendered = msg["message"]["rendered"].as_str().unwrap_or(text);
        errors.entry(target).or_default().push(rendered.to_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        errors.keys().all(|t| CASES.iter().any(|c| c.name == *t)),
        "errors outside the cases (the crate itself does not build?): {errors:#?}\n{stderr}"
    );

    let mut wrong = Vec::new();
    for case in CASES {
        let got = errors.get(case.name).map_or(&[][..], Vec::as_slice);
        let all = got.concat();
        let missing: Vec<_> = case.says.iter().filter(|s| !all.contains(*s)).collect();
        // rustc's "consider restricting type parameter" must not offer idem's private traits.
        let private =
            all.contains("+ idem_core::__private") || all.contains(": idem_core::__private");
        if got.len() != case.errors || !missing.is_empty() || private {
            wrong.push(format!(
                "{}: {} error(s), expected {}; missing {missing:?}; private path suggested: {private}\n{}",
                case.name,
                got.len(),
                case.errors,
                got.join("\n")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "in an incremental build:\n{}\n(cargo's stderr:\n{stderr})",
        wrong.join("\n")
    );
}

/// The crate: `Cargo.toml` (idem-core by path), the workspace's `Cargo.lock`, and one example
/// per case. Files are rewritten only when they change, so that a warm run rebuilds only
/// the failing examples.
fn write_crate(core: &Path, dir: &Path) {
    let examples = dir.join("examples");
    fs::create_dir_all(&examples).expect("temp dir writable");
    fs::create_dir_all(dir.join("src")).expect("temp dir writable");
    let manifest = format!(
        r#"[package]
name = "idem-incremental-errors"
version = "0.0.0"
edition = "2021"
publish = false

# Not a member of any workspace above the target dir.
[workspace]

[dependencies]
idem-core = {{ path = {core:?} }}
serde = {{ version = "1", features = ["derive"] }}
"#,
        core = core.display().to_string()
    );
    write_if_changed(&dir.join("Cargo.toml"), &manifest);
    // The workspace's versions, which its own build has downloaded (cargo then drops the
    // entries this crate does not use).
    let lock = fs::read_to_string(core.join("../Cargo.lock")).expect("the workspace's Cargo.lock");
    fs::write(dir.join("Cargo.lock"), lock).expect("temp dir writable");
    write_if_changed(&dir.join("src/lib.rs"), "");
    // Examples of an earlier version of this test would be built too.
    for entry in fs::read_dir(&examples)
        .expect("examples readable")
        .flatten()
    {
        let path = entry.path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if !CASES.iter().any(|c| c.name == stem) {
            fs::remove_file(&path).expect("old example removable");
        }
    }
    for case in CASES {
        let source = format!(
            "#![allow(dead_code)]\nuse idem_core::{{idempotent, Error}};\n{}\nfn main() {{}}\n",
            case.source
        );
        write_if_changed(&examples.join(format!("{}.rs", case.name)), &source);
    }
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(contents) {
        fs::write(path, contents).expect("temp dir writable");
    }
}
