//! Two annotated functions never answer with each other's stored result: the default
//! namespace tells apart inherent methods of different types, trait impls (with
//! `#[async_trait]` and native async fn in traits) and generic impls; a pasted explicit
//! `namespace` is refused at its second function with `Error::NamespaceCollision`; `shared`
//! lets functions share one on purpose.
//!
//! Every case runs on the memory store, and with `--features sqlite` on an in-memory SQLite
//! store (a shared store: its records carry the portable key). The namespaces are
//! process-wide, so each store's cases live in a module of their own (`cases!`), with their
//! own functions and explicit namespace strings.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

macro_rules! cases {
    ($module:ident, $store:expr, $pasted:literal, $shared:literal, $half:literal) => {
        mod $module {
            use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
            use std::sync::Arc;

            use idem_core::{async_trait, idempotent, Call, Error, Store};

            async fn store() -> Arc<dyn Store> {
                $store
            }

            /// The record this (namespace, key) has in `store`, if any.
            async fn recorded(store: &dyn Store, namespace: &'static str, key: &str) -> bool {
                Call::new(namespace)
                    .key(&key.to_owned())
                    .inspect(store)
                    .await
                    .unwrap()
                    .is_some()
            }

            // ---- inherent methods with one name on two types ---------------------------

            pub struct Refunds {
                pub store: Arc<dyn Store>,
                pub runs: AtomicU32,
            }
            pub struct Charges {
                pub store: Arc<dyn Store>,
                pub runs: AtomicU32,
            }

            impl Refunds {
                #[idempotent(key = key.clone(), store = self.store)]
                pub async fn run(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("refund {key} #{n}"))
                }
            }

            impl Charges {
                #[idempotent(key = key.clone(), store = self.store)]
                pub async fn run(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("charge {key} #{n}"))
                }
            }

            #[tokio::test]
            async fn inherent_methods_of_two_types_keep_their_own_records() {
                let store = store().await;
                let refunds = Refunds {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let charges = Charges {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let key = "inherent-1".to_owned();
                assert_eq!(
                    refunds.run(key.clone()).await.unwrap(),
                    "refund inherent-1 #1"
                );
                assert_eq!(
                    charges.run(key.clone()).await.unwrap(),
                    "charge inherent-1 #1"
                );
                assert_eq!(
                    refunds.run(key.clone()).await.unwrap(),
                    "refund inherent-1 #1"
                );
                assert_eq!(
                    charges.run(key.clone()).await.unwrap(),
                    "charge inherent-1 #1"
                );
                assert_eq!(refunds.runs.load(SeqCst), 1);
                assert_eq!(charges.runs.load(SeqCst), 1);
                let here = concat!(module_path!(), "::Refunds::run");
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
                let here = concat!(module_path!(), "::Charges::run");
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
            }

            // ---- one trait, two impls, with #[async_trait] -----------------------------

            #[async_trait]
            pub trait Gateway {
                async fn pay(&self, key: String) -> Result<String, Error>;
            }

            pub struct Stripe {
                pub store: Arc<dyn Store>,
                pub runs: AtomicU32,
            }
            pub struct Adyen {
                pub store: Arc<dyn Store>,
                pub runs: AtomicU32,
            }

            #[async_trait]
            impl Gateway for Stripe {
                #[idempotent(key = key.clone(), store = self.store)]
                async fn pay(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("stripe receipt {key} #{n}"))
                }
            }

            #[async_trait]
            impl Gateway for Adyen {
                #[idempotent(key = key.clone(), store = self.store)]
                async fn pay(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("adyen receipt {key} #{n}"))
                }
            }

            #[tokio::test]
            async fn async_trait_impls_of_two_types_keep_their_own_records() {
                let store = store().await;
                let stripe = Stripe {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let adyen = Adyen {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                // Through trait objects, as a gateway registry would hold them.
                let gateways: [&(dyn Gateway + Sync); 2] = [&stripe, &adyen];
                let key = "async-trait-1".to_owned();
                assert_eq!(
                    gateways[0].pay(key.clone()).await.unwrap(),
                    "stripe receipt async-trait-1 #1"
                );
                assert_eq!(
                    gateways[1].pay(key.clone()).await.unwrap(),
                    "adyen receipt async-trait-1 #1"
                );
                assert_eq!(
                    gateways[1].pay(key.clone()).await.unwrap(),
                    "adyen receipt async-trait-1 #1"
                );
                assert_eq!(
                    gateways[0].pay(key.clone()).await.unwrap(),
                    "stripe receipt async-trait-1 #1"
                );
                assert_eq!((stripe.runs.load(SeqCst), adyen.runs.load(SeqCst)), (1, 1));
                let here = concat!(
                    "<",
                    module_path!(),
                    "::Stripe as ",
                    module_path!(),
                    "::Gateway>::pay"
                );
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
                let here = concat!(
                    "<",
                    module_path!(),
                    "::Adyen as ",
                    module_path!(),
                    "::Gateway>::pay"
                );
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
            }

            // ---- one trait, two impls, native async fn in traits -----------------------

            pub trait Payouts {
                async fn pay(&self, key: String) -> Result<String, Error>;
            }

            impl Payouts for Stripe {
                #[idempotent(key = key.clone(), store = self.store)]
                async fn pay(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("stripe payout {key} #{n}"))
                }
            }

            impl Payouts for Adyen {
                #[idempotent(key = key.clone(), store = self.store)]
                async fn pay(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("adyen payout {key} #{n}"))
                }
            }

            #[tokio::test]
            async fn native_async_trait_impls_keep_their_own_records() {
                let store = store().await;
                let stripe = Stripe {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let adyen = Adyen {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let key = "afit-1".to_owned();
                assert_eq!(
                    Payouts::pay(&stripe, key.clone()).await.unwrap(),
                    "stripe payout afit-1 #1"
                );
                assert_eq!(
                    Payouts::pay(&adyen, key.clone()).await.unwrap(),
                    "adyen payout afit-1 #1"
                );
                assert_eq!(
                    Payouts::pay(&stripe, key.clone()).await.unwrap(),
                    "stripe payout afit-1 #1"
                );
                assert_eq!(
                    Payouts::pay(&adyen, key.clone()).await.unwrap(),
                    "adyen payout afit-1 #1"
                );
                assert_eq!((stripe.runs.load(SeqCst), adyen.runs.load(SeqCst)), (1, 1));
                // The same method name under another trait is another namespace again.
                let here = concat!(
                    "<",
                    module_path!(),
                    "::Stripe as ",
                    module_path!(),
                    "::Payouts>::pay"
                );
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
                let here = concat!(
                    "<",
                    module_path!(),
                    "::Adyen as ",
                    module_path!(),
                    "::Payouts>::pay"
                );
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
            }

            // ---- a generic impl beside a concrete one ----------------------------------

            pub struct Wrapped<T> {
                pub inner: T,
                pub store: Arc<dyn Store>,
                pub runs: AtomicU32,
            }

            impl<T: Send + Sync> Payouts for Wrapped<T> {
                #[idempotent(key = key.clone(), store = self.store)]
                async fn pay(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("wrapped payout {key} #{n}"))
                }
            }

            impl<T> Wrapped<T> {
                #[idempotent(key = key.clone(), store = self.store)]
                pub async fn run(&self, key: String) -> Result<String, Error> {
                    let n = self.runs.fetch_add(1, SeqCst) + 1;
                    Ok(format!("wrapped run {key} #{n}"))
                }
            }

            #[tokio::test]
            async fn generic_impls_keep_their_own_records() {
                let store = store().await;
                let stripe = Stripe {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let wrapped = Wrapped {
                    inner: 1u8,
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let refunds = Refunds {
                    store: store.clone(),
                    runs: AtomicU32::new(0),
                };
                let _ = wrapped.inner;
                let key = "generic-1".to_owned();
                assert_eq!(
                    Payouts::pay(&stripe, key.clone()).await.unwrap(),
                    "stripe payout generic-1 #1"
                );
                assert_eq!(
                    Payouts::pay(&wrapped, key.clone()).await.unwrap(),
                    "wrapped payout generic-1 #1"
                );
                assert_eq!(
                    wrapped.run(key.clone()).await.unwrap(),
                    "wrapped run generic-1 #2"
                );
                assert_eq!(
                    refunds.run(key.clone()).await.unwrap(),
                    "refund generic-1 #1"
                );
                assert_eq!(
                    Payouts::pay(&wrapped, key.clone()).await.unwrap(),
                    "wrapped payout generic-1 #1"
                );
                assert_eq!(
                    wrapped.run(key.clone()).await.unwrap(),
                    "wrapped run generic-1 #2"
                );
                assert_eq!(wrapped.runs.load(SeqCst), 2);
                let here = concat!(
                    "<",
                    module_path!(),
                    "::Wrapped<_> as ",
                    module_path!(),
                    "::Payouts>::pay"
                );
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
                let here = concat!(module_path!(), "::Wrapped<_>::run");
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
            }

            // ---- free functions keep `module_path!()::name` ----------------------------

            #[idempotent(key = key.clone(), store = store, skip(runs))]
            async fn free(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("free {key} #{n}"))
            }

            #[tokio::test]
            async fn a_free_function_keeps_its_module_path_and_name() {
                let store = store().await;
                let runs = AtomicU32::new(0);
                let key = "free-1".to_owned();
                assert_eq!(
                    free(&*store, &runs, key.clone()).await.unwrap(),
                    "free free-1 #1"
                );
                assert_eq!(
                    free(&*store, &runs, key.clone()).await.unwrap(),
                    "free free-1 #1"
                );
                let here = concat!(module_path!(), "::free");
                assert!(recorded(&*store, here, &key).await, "namespace `{here}`");
            }

            // ---- one explicit namespace pasted onto two functions ----------------------

            #[idempotent(key = key.clone(), namespace = $pasted, store = store, skip(runs))]
            async fn create_order(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("order {key} #{n}"))
            }

            #[idempotent(key = key.clone(), namespace = $pasted, store = store, skip(runs))]
            async fn create_invoice(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("invoice {key} #{n}"))
            }

            #[tokio::test]
            async fn a_pasted_namespace_is_refused_at_the_second_function() {
                let store = store().await;
                let (orders, invoices) = (AtomicU32::new(0), AtomicU32::new(0));
                let key = "pasted-1".to_owned();
                assert_eq!(
                    create_order(&*store, &orders, key.clone()).await.unwrap(),
                    "order pasted-1 #1"
                );
                // Same key, same argument values: never the order's record.
                for _ in 0..2 {
                    match create_invoice(&*store, &invoices, key.clone()).await {
                        Err(Error::NamespaceCollision {
                            namespace,
                            first,
                            second,
                        }) => {
                            assert_eq!(namespace, $pasted);
                            assert_eq!(first, concat!(module_path!(), "::create_order"));
                            assert_eq!(second, concat!(module_path!(), "::create_invoice"));
                        }
                        other => panic!("expected NamespaceCollision, got {other:?}"),
                    }
                }
                assert_eq!(
                    invoices.load(SeqCst),
                    0,
                    "the refused function's body never runs"
                );
                let e = create_invoice(&*store, &invoices, "another".into())
                    .await
                    .unwrap_err();
                assert_eq!(e.http_status(), 500);
                let message = e.to_string();
                assert!(message.contains($pasted), "{message}");
                assert!(
                    message.contains("create_order") && message.contains("create_invoice"),
                    "{message}"
                );
                // The first function keeps working, on its own record.
                assert_eq!(
                    create_order(&*store, &orders, key.clone()).await.unwrap(),
                    "order pasted-1 #1"
                );
                assert_eq!(orders.load(SeqCst), 1);
            }

            // ---- a namespace shared on purpose -----------------------------------------

            #[idempotent(key = key.clone(), namespace = $shared, shared, store = store, skip(runs))]
            async fn checkout_web(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("checkout {key} #{n}"))
            }

            #[idempotent(key = key.clone(), namespace = $shared, shared, store = store, skip(runs))]
            async fn checkout_api(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("checkout {key} #{n}"))
            }

            #[tokio::test]
            async fn a_shared_namespace_is_one_operation() {
                let store = store().await;
                let runs = AtomicU32::new(0);
                let key = "shared-1".to_owned();
                assert_eq!(
                    checkout_web(&*store, &runs, key.clone()).await.unwrap(),
                    "checkout shared-1 #1"
                );
                assert_eq!(
                    checkout_api(&*store, &runs, key.clone()).await.unwrap(),
                    "checkout shared-1 #1"
                );
                assert_eq!(
                    checkout_web(&*store, &runs, key.clone()).await.unwrap(),
                    "checkout shared-1 #1"
                );
                assert_eq!(
                    runs.load(SeqCst),
                    1,
                    "two call sites of one operation run it once"
                );
                assert!(recorded(&*store, $shared, &key).await);
            }

            // ---- `shared` on one function only does not open the namespace -------------

            #[idempotent(key = key.clone(), namespace = $half, shared, store = store, skip(runs))]
            async fn half_shared(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("half {key} #{n}"))
            }

            #[idempotent(key = key.clone(), namespace = $half, store = store, skip(runs))]
            async fn not_shared(
                store: &dyn Store,
                runs: &AtomicU32,
                key: String,
            ) -> Result<String, Error> {
                let n = runs.fetch_add(1, SeqCst) + 1;
                Ok(format!("not shared {key} #{n}"))
            }

            #[tokio::test]
            async fn shared_must_be_said_by_every_function() {
                let store = store().await;
                let runs = AtomicU32::new(0);
                let key = "half-1".to_owned();
                assert_eq!(
                    half_shared(&*store, &runs, key.clone()).await.unwrap(),
                    "half half-1 #1"
                );
                assert!(matches!(
                    not_shared(&*store, &runs, key.clone()).await,
                    Err(Error::NamespaceCollision { .. })
                ));
                assert_eq!(runs.load(SeqCst), 1);
            }
        }
    };
}

cases!(
    memory,
    std::sync::Arc::new(idem_stores::MemoryStore::new()),
    "orders.create (memory)",
    "checkout (memory)",
    "half (memory)"
);

#[cfg(feature = "sqlite")]
cases!(
    sqlite,
    {
        let store = idem_stores::SqliteStore::connect("sqlite::memory:")
            .await
            .unwrap();
        store.migrate().await.unwrap();
        std::sync::Arc::new(store)
    },
    "orders.create (sqlite)",
    "checkout (sqlite)",
    "half (sqlite)"
);

/// Concurrent first calls of two functions with one namespace: exactly one of them owns it.
mod race {
    use std::sync::Arc;

    use idem_core::{idempotent, Error, Store};
    use idem_stores::MemoryStore;

    #[idempotent(key = key.clone(), namespace = "race", store = store)]
    async fn left(store: &dyn Store, key: String) -> Result<String, Error> {
        Ok("left".into())
    }

    #[idempotent(key = key.clone(), namespace = "race", store = store)]
    async fn right(store: &dyn Store, key: String) -> Result<String, Error> {
        Ok("right".into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_of_two_racing_functions_owns_the_namespace() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = format!("k{}", i % 4);
                    if i % 2 == 0 {
                        left(&*store, key).await
                    } else {
                        right(&*store, key).await
                    }
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let owners: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
        let refused = answers
            .iter()
            .filter(|a| matches!(a, Err(Error::NamespaceCollision { .. })))
            .count();
        assert_eq!(owners.len(), 8, "{answers:?}");
        assert_eq!(refused, 8, "{answers:?}");
        assert!(
            owners.iter().all(|o| *o == owners[0]),
            "one owner: {owners:?}"
        );
    }
}
