//! A test runner for backend tests: a test whose server is missing is reported as *ignored,
//! with the reason*, never as passed.
//!
//! The standard test harness has no run-time skip: a `#[tokio::test]` that finds no server and
//! returns early counts as passed. A backend test binary therefore declares `harness = false`
//! in its `[[test]]` entry, writes its tests as plain `async fn`s (no attribute), and lists them
//! in its `main` with the [`Need`]s they have. [`run`] checks each need once, then runs the
//! tests through [libtest-mimic](https://docs.rs/libtest-mimic), which accepts the usual
//! arguments (a name filter, `--exact`, `--skip`, `--ignored`, `--include-ignored`, `--list`,
//! `--nocapture`, `--test-threads`):
//!
//! - need met: the test runs, on a fresh Tokio runtime of the flavor given;
//! - need unmet, `CI` unset: the test is reported `ignored (<reason>)`, and a `note:` line
//!   after the binary's summary says how many were ignored and why;
//! - need unmet, `CI` set: the test fails with the reason (CI never skips);
//! - need unmet, `--ignored` or `--include-ignored`: the test runs anyway (and fails).
//!
//! ```no_run
//! // idem-stores/tests/my_redis.rs, with `[[test]] name = "my_redis" harness = false`
//! use idem_testkit::harness::{self, Need};
//!
//! const REDIS: Need = Need::server("Redis", "IDEM_TEST_REDIS_URL", |url| {
//!     Box::pin(async move {
//!         // connect to `url` here; Err(reason) when it does not answer or refuses the login
//!         # let _ = url;
//!         Ok(())
//!     })
//! });
//!
//! async fn replays_after_restart() {
//!     let url = idem_testkit::env_url("IDEM_TEST_REDIS_URL");
//!     // ...
//!     # let _ = url;
//! }
//!
//! fn no_server_needed() {}
//!
//! fn main() -> std::process::ExitCode {
//!     harness::run([
//!         idem_testkit::test_cases!([REDIS], multi_thread(2); replays_after_restart),
//!         idem_testkit::test_cases!([], sync; no_server_needed),
//!     ])
//! }
//! ```
//!
//! The output of a test is not captured (libtest-mimic cannot): what a test prints shows, as
//! with `--nocapture`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The address each `IDEM_TEST_*_URL` variable defaults to: the servers `.ci/run` starts.
pub const DEFAULT_URLS: [(&str, &str); 3] = [
    ("IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
    (
        "IDEM_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ),
    ("IDEM_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
];

/// The variables of [`DEFAULT_URLS`] that [`run`] found unset and set to their default.
static DEFAULTED: OnceLock<Vec<&'static str>> = OnceLock::new();

/// How long a server may take to answer a [`Need`]'s probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The future a server probe returns: `Err(reason)` when the server does not answer or
/// refuses the login.
pub type Probe = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Something a test needs to run: a server reachable at a URL, or programs on the `PATH`.
#[derive(Clone, Copy)]
pub struct Need {
    name: &'static str,
    what: What,
}

#[derive(Clone, Copy)]
enum What {
    Server {
        var: &'static str,
        probe: fn(String) -> Probe,
    },
    Programs(&'static [&'static str]),
    Disabled(&'static str),
}

impl fmt::Debug for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Need").field("name", &self.name).finish()
    }
}

impl Need {
    /// A server at the URL in `var` (or, unset, its entry in [`DEFAULT_URLS`]), met when
    /// `probe(url)` returns `Ok` within a few seconds.
    pub const fn server(name: &'static str, var: &'static str, probe: fn(String) -> Probe) -> Self {
        Need {
            name,
            what: What::Server { var, probe },
        }
    }

    /// Programs that must run with `--version` (e.g. `redis-server`, for tests that start
    /// their own server).
    pub const fn programs(name: &'static str, programs: &'static [&'static str]) -> Self {
        Need {
            name,
            what: What::Programs(programs),
        }
    }

    /// A need this build cannot meet (e.g. the store's cargo feature is off): its tests are
    /// reported as ignored with `reason`, in CI too.
    pub const fn disabled(name: &'static str, reason: &'static str) -> Self {
        Need {
            name,
            what: What::Disabled(reason),
        }
    }

    /// `Err(reason)` when the need is not met.
    fn check(&self, rt: &tokio::runtime::Runtime) -> Result<(), String> {
        match self.what {
            What::Server { var, probe } => {
                let Some(url) = url_of(var) else {
                    return Err(format!("{} not configured: {var} is not set", self.name));
                };
                let defaulted = DEFAULTED.get().is_some_and(|d| d.contains(&var));
                let source = if defaulted {
                    format!("{var} unset: the default")
                } else {
                    format!("from {var}")
                };
                match rt.block_on(async {
                    tokio::time::timeout(PROBE_TIMEOUT, probe(url.clone())).await
                }) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!(
                        "{} unavailable at {} ({source}): {e}",
                        self.name,
                        redact(&url)
                    )),
                    Err(_) => Err(format!(
                        "{} unavailable at {} ({source}): no answer in {} s",
                        self.name,
                        redact(&url),
                        PROBE_TIMEOUT.as_secs()
                    )),
                }
            }
            What::Disabled(reason) => Err(format!("{}: {reason}", self.name)),
            What::Programs(programs) => {
                for program in programs {
                    let runs = Command::new(program)
                        .arg("--version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if !runs {
                        return Err(format!("{}: `{program}` is not installed", self.name));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_info = &url[scheme + 3..at];
            match user_info.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The URL in `var`, else its default in [`DEFAULT_URLS`].
pub(crate) fn url_of(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => DEFAULT_URLS
            .iter()
            .find(|(v, _)| *v == var)
            .map(|(_, url)| (*url).to_string()),
    }
}

/// True when the `CI` variable is set (to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The runtime a test's future runs on, as `#[tokio::test]` would build it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `#[tokio::test]`.
    CurrentThread,
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = N)]`.
    MultiThread(usize),
}

type AsyncBody = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

enum Body {
    Async(Flavor, AsyncBody),
    Sync(Box<dyn FnOnce() + Send>),
}

/// One test: a name, what it needs, and its body.
pub struct Case {
    name: String,
    needs: Vec<Need>,
    body: Body,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("needs", &self.needs)
            .finish()
    }
}

impl Case {
    /// An async test, run on a fresh runtime of `flavor`.
    pub fn new_async<F, Fut>(name: impl Into<String>, needs: &[Need], flavor: Flavor, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        Case {
            name: name.into(),
            needs: needs.to_vec(),
            body: Body::Async(flavor, Box::new(move || Box::pin(f()))),
        }
    }

    /// A plain (blocking) test.
    pub fn new_sync(
        name: impl Into<String>,
        needs: &[Need],
        f: impl FnOnce() + Send + 'static,
    ) -> Self {
        Case {
            name: name.into(),
            needs: needs.to_vec(),
            body: Body::Sync(Box::new(f)),
        }
    }

    /// The test's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn into_runner(self) -> impl FnOnce() -> Result<(), Failed> + Send + 'static {
        move || {
            match self.body {
                Body::Sync(f) => f(),
                Body::Async(flavor, f) => {
                    let mut builder = match flavor {
                        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
                        Flavor::MultiThread(n) => {
                            let mut b = tokio::runtime::Builder::new_multi_thread();
                            b.worker_threads(n.max(1));
                            b
                        }
                    };
                    let rt = builder
                        .enable_all()
                        .build()
                        .map_err(|e| Failed::from(format!("cannot build a Tokio runtime: {e}")))?;
                    rt.block_on(f());
                }
            }
            Ok(())
        }
    }
}

/// The test name `case` gets in a module whose `module_path!()` is `module_path` (the path
/// without the crate's name, as the standard harness names tests).
pub fn case_name(module_path: &str, case: &str) -> String {
    match module_path.split_once("::") {
        Some((_, inner)) => format!("{inner}::{case}"),
        None => case.to_string(),
    }
}

/// Stamps one [`Case`] per test function.
///
/// `test_cases!([NEEDS...], FLAVOR; fn_a, fn_b, module::fn_c)` where `FLAVOR` is
/// `current_thread` or `multi_thread(N)` (for `async fn`s, as `#[tokio::test]`'s) or `sync`
/// (for plain `fn`s). Each test is named as the standard harness would name it (its path in the
/// test crate). See [`testkit::harness`](crate::harness).
#[macro_export]
macro_rules! test_cases {
    ($needs:expr, current_thread; $($case:path),* $(,)?) => {
        $crate::test_cases!(@async $needs, $crate::harness::Flavor::CurrentThread; $($case),*)
    };
    ($needs:expr, multi_thread($n:expr); $($case:path),* $(,)?) => {
        $crate::test_cases!(@async $needs, $crate::harness::Flavor::MultiThread($n); $($case),*)
    };
    ($needs:expr, sync; $($case:path),* $(,)?) => {
        ::std::vec![$(
            $crate::harness::Case::new_sync(
                $crate::harness::case_name(
                    ::std::module_path!(),
                    &::std::stringify!($case).replace(' ', ""),
                ),
                &$needs,
                $case,
            )
        ),*]
    };
    (@async $needs:expr, $flavor:expr; $($case:path),*) => {
        ::std::vec![$(
            $crate::harness::Case::new_async(
                $crate::harness::case_name(
                    ::std::module_path!(),
                    &::std::stringify!($case).replace(' ', ""),
                ),
                &$needs,
                $flavor,
                $case,
            )
        ),*]
    };
}

/// The entry points of child processes (a test that re-runs its own binary with
/// `--exact NAME` and `role_var` set): listed only in such a child, so that the parent run
/// neither counts them as tests nor runs them.
pub fn child_cases(role_var: &str, cases: Vec<Case>) -> Vec<Case> {
    if std::env::var_os(role_var).is_some() {
        cases
    } else {
        Vec::new()
    }
}

/// Runs the tests: parses the command line as the standard harness does, checks each distinct
/// [`Need`] once, and reports every test whose need is unmet as ignored with the reason (or,
/// with `CI` set, as failed). Returns the process's exit code.
///
/// First, each unset `IDEM_TEST_*_URL` of [`DEFAULT_URLS`] is set to its default, so that a test
/// (and a child process it starts) reads the URL its server was checked at.
pub fn run(groups: impl IntoIterator<Item = Vec<Case>>) -> ExitCode {
    let mut defaulted = Vec::new();
    for (var, url) in DEFAULT_URLS {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            // Still one thread: no test has started.
            std::env::set_var(var, url);
            defaulted.push(var);
        }
    }
    let _ = DEFAULTED.set(defaulted);
    let args = Arguments::from_args();
    let cases: Vec<Case> = groups.into_iter().flatten().collect();

    // Check each need once, only for needs of tests that the filter keeps.
    let mut verdicts: BTreeMap<&'static str, Result<(), String>> = BTreeMap::new();
    let wanted = |c: &Case| !filtered_out(&args, &c.name);
    let needs: Vec<Need> = cases
        .iter()
        .filter(|c| wanted(c))
        .flat_map(|c| c.needs.iter().copied())
        .collect();
    if !needs.is_empty() {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot build a Tokio runtime to check the test servers: {e}");
                return ExitCode::FAILURE;
            }
        };
        for need in needs {
            verdicts.entry(need.name).or_insert_with(|| need.check(&rt));
        }
    }

    let ci = in_ci();
    let force = args.ignored || args.include_ignored;
    let mut ignored: BTreeMap<String, usize> = BTreeMap::new();
    let trials: Vec<Trial> = cases
        .into_iter()
        .map(|case| {
            let reasons: Vec<String> = case
                .needs
                .iter()
                .filter_map(|n| verdicts.get(n.name).and_then(|v| v.clone().err()))
                .collect();
            let disabled = case
                .needs
                .iter()
                .any(|n| matches!(n.what, What::Disabled(_)));
            let name = case.name.clone();
            if reasons.is_empty() {
                return Trial::test(name, case.into_runner());
            }
            let reason = reasons.join("; ");
            if ci && !disabled {
                let msg = format!("{reason} (CI is set: backend tests must not skip)");
                return Trial::test(name, move || Err(msg.into()));
            }
            if force || args.list {
                // Listed as ignored (so `--list --ignored` and nextest see it), and run by
                // `--ignored`/`--include-ignored`, where it fails against the missing server.
                return Trial::test(name, case.into_runner()).with_ignored_flag(true);
            }
            if !filtered_out(&args, &name) {
                *ignored.entry(reason.clone()).or_default() += 1;
            }
            Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
        })
        .collect();

    let conclusion = libtest_mimic::run(&args, trials);
    for (reason, n) in &ignored {
        let s = if *n == 1 { "" } else { "s" };
        println!("note: {n} test{s} ignored: {reason}");
    }
    if !ignored.is_empty() {
        println!("note: README.md (Tests) says how to get the servers these tests need");
    }
    conclusion.exit_code()
}

/// Whether the command line's filters leave `name` out (as libtest-mimic decides, for counting
/// the ignored tests that are shown).
fn filtered_out(args: &Arguments, name: &str) -> bool {
    if let Some(filter) = &args.filter {
        let hit = if args.exact {
            name == filter
        } else {
            name.contains(filter.as_str())
        };
        if !hit {
            return true;
        }
    }
    args.skip.iter().any(|s| {
        if args.exact {
            name == s
        } else {
            name.contains(s.as_str())
        }
    })
}
