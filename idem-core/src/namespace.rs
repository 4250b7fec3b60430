//! The namespace of each `#[idempotent]` function, and the check that no two of them share
//! one in a process unless both say `shared`.
//!
//! Each expansion holds one [`Site`] in a `static`. The first call through it registers its
//! namespace in a process-wide table (a lock, once per site); every later call is one atomic
//! load of the cached answer.

/// The `static` [`Site`] of the function whose body this is written in (see [`Site`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_site {
    () => {
        $crate::__idem_site!(@ $crate::__private::Option::None, false)
    };
    ($namespace:literal) => {
        $crate::__idem_site!(@ $crate::__private::Option::Some($namespace), false)
    };
    ($namespace:literal, shared) => {
        $crate::__idem_site!(@ $crate::__private::Option::Some($namespace), true)
    };
    (@ $namespace:expr, $shared:expr) => {{
        #[allow(dead_code)]
        struct __IdemFn;
        static __IDEM_SITE: $crate::__private::Site =
            $crate::__private::Site::new::<__IdemFn>($namespace, $shared);
        &__IDEM_SITE
    }};
}

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock, PoisonError};

/// One annotated function: its namespace (pinned, or derived from where the function is)
/// and whether it may share that namespace with other functions that say so too.
///
/// The expansion writes `site!()` (or `site!("ns")`, `site!("ns", shared)`) in the
/// function's body: a block that defines a marker type `__IdemFn` and a `static` [`Site`] of
/// it. The marker's [`type_name`](core::any::type_name) spells the function's full path —
/// module, `Self` type and trait for a method — so that the derived namespace tells apart
/// every function that can be annotated.
pub struct Site {
    pinned: Option<&'static str>,
    shared: bool,
    marker: fn() -> &'static str,
    checked: OnceLock<Result<&'static str, Collision>>,
}

/// The marker type's name ends with this (`::{{closure}}` inside an `async fn`).
const MARKER: &str = "::__IdemFn";
const MARKER_IN_ASYNC: &str = "::{{closure}}::__IdemFn";

impl Site {
    /// A site whose function body defines the marker type `M` (`__IdemFn`), with the
    /// `namespace = ".."` written on it, if any, and its `shared` flag.
    pub const fn new<M>(pinned: Option<&'static str>, shared: bool) -> Site {
        Site {
            pinned,
            shared,
            marker: core::any::type_name::<M>,
            checked: OnceLock::new(),
        }
    }

    /// The annotated function's path, e.g. `shop::Charges::run` or
    /// `<shop::Stripe as shop::Gateway>::pay`.
    pub fn function(&self) -> &'static str {
        let name = (self.marker)();
        name.strip_suffix(MARKER_IN_ASYNC)
            .or_else(|| name.strip_suffix(MARKER))
            .unwrap_or(name)
    }

    /// The namespace this function's records live in: the pinned one, or its path.
    pub fn declared(&self) -> &'static str {
        self.pinned.unwrap_or_else(|| self.function())
    }

    /// The namespace, once it is known that no other function of this process uses it (or
    /// that all that do are `shared`). One atomic load after the first call.
    #[inline]
    pub(crate) fn namespace(&'static self) -> Result<&'static str, Collision> {
        match self.checked.get() {
            Some(checked) => *checked,
            None => self.register(),
        }
    }

    #[cold]
    fn register(&'static self) -> Result<&'static str, Collision> {
        *self.checked.get_or_init(|| {
            let namespace = self.declared();
            let mut owners = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
            match owners.get(namespace) {
                None => {
                    owners.insert(
                        namespace,
                        Owner {
                            function: self.function(),
                            shared: self.shared,
                        },
                    );
                    Ok(namespace)
                }
                Some(owner) if owner.shared && self.shared => Ok(namespace),
                Some(owner) => Err(Collision {
                    namespace,
                    first: owner.function,
                    second: self.function(),
                }),
            }
        })
    }
}

impl core::fmt::Debug for Site {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Site")
            .field("function", &self.function())
            .field("namespace", &self.declared())
            .field("shared", &self.shared)
            .finish()
    }
}

/// The first function registered under a namespace.
struct Owner {
    function: &'static str,
    shared: bool,
}

static REGISTRY: Mutex<BTreeMap<&'static str, Owner>> = Mutex::new(BTreeMap::new());

/// A second function with a namespace that another function of this process already uses
/// (reported as [`Error::NamespaceCollision`](crate::Error::NamespaceCollision)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Collision {
    pub namespace: &'static str,
    pub first: &'static str,
    pub second: &'static str,
}

impl From<Collision> for crate::Error {
    fn from(c: Collision) -> Self {
        crate::Error::NamespaceCollision {
            namespace: c.namespace,
            first: c.first,
            second: c.second,
        }
    }
}
