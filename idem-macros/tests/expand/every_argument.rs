// Every argument at once (`on_conflict = wait` so that `wait_timeout` is allowed).
#[idempotent(
    key = order.id,
    ttl = "7d",
    store = STORE.clone(),
    skip(client),
    scope = tenant,
    namespace = "billing::charge",
    lease = "500ms",
    on_conflict = wait,
    wait_timeout = Duration::from_secs(3),
    errors = store,
    version = 2,
    missing_key = run,
    fail_open,
    crate = my_app::idem
)]
pub(crate) async fn charge(client: &Client, tenant: &str, order: Order) -> Result<Receipt, Declined> {
    client.charge(&order).await
}
