//! A payments service behind the `Idempotency-Key` layer.
//!
//! ```text
//! cargo run --example payments --features http                   # in-memory store
//! IDEM_STORE=redis IDEM_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run --example payments --features http,redis
//! IDEM_STORE=postgres IDEM_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo run --example payments --features http,postgres
//! ```
//!
//! Then, in another terminal (the server listens on `IDEM_ADDR`, default 127.0.0.1:3000):
//!
//! ```text
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer acme' \
//!      -H 'Idempotency-Key: "order-42"' -H 'Content-Type: application/json' \
//!      -d '{"amount": 1999, "currency": "EUR"}'
//! ```
//!
//! Send it twice: the second answer is the first one again, with `Idempotent-Replayed: true`,
//! and `GET /stats` still counts one execution. Change the amount: 422. Drop the header: 400.
//! Set `IDEM_ON_CONFLICT=wait` to make concurrent duplicates wait for the first response
//! instead of getting 409.
//!
//! Ctrl-C or SIGTERM (a rolling deploy) shuts it down without losing a result: the server
//! stops accepting connections and answers the requests in flight, then
//! `idempo::shutdown` refuses new claims and waits for every completion this process still
//! holds — including those handed to a detached task because a client hung up — before the
//! runtime goes.

mod app;

use std::time::Duration;

use idempo::OnConflict;

/// How long the requests in flight and then idem's drain may take, each. Keep it under the
/// orchestrator's grace period (Kubernetes: `terminationGracePeriodSeconds`, 30 s by default).
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_target(false).init();

    let kind = std::env::var("IDEM_STORE").unwrap_or_else(|_| "memory".to_string());
    let url = match kind.as_str() {
        "redis" => std::env::var("IDEM_REDIS_URL").ok(),
        "postgres" => std::env::var("IDEM_POSTGRES_URL").ok(),
        _ => None,
    };
    let store = app::open_store(&kind, url.as_deref()).await?;

    let mut options = app::AppOptions::default();
    if std::env::var("IDEM_ON_CONFLICT").as_deref() == Ok("wait") {
        options.on_conflict = OnConflict::Wait;
    }
    let addr = std::env::var("IDEM_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(
        "payments on http://{} (store: {kind})",
        listener.local_addr()?
    );
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown_signal().await;
        let _ = signalled.send(());
    };
    let server = app::serve_until(listener, app::router(store, options), signal);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        _ = on_signal => {
            // A request that never ends must not hold the shutdown past the grace period.
            match tokio::time::timeout(DRAIN_DEADLINE, &mut server).await {
                Ok(served) => served?,
                Err(_) => tracing::warn!("requests still running at the deadline; draining idem anyway"),
            }
        }
    }
    // The server answers no more requests; settle what idem still holds.
    match idempo::shutdown(DRAIN_DEADLINE).await {
        Ok(()) => tracing::info!("idem drained: every claim is completed or released"),
        Err(e) => {
            for call in e.calls() {
                tracing::error!(namespace = call.namespace, key = %call.key, stage = %call.stage, "still held at exit; its claim lapses with its lease");
            }
        }
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: answering the requests in flight, then draining idem");
}
