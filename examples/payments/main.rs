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

mod app;

use idem_core::OnConflict;

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
    app::serve(listener, app::router(store, options)).await?;
    Ok(())
}
