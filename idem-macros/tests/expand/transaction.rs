// Transactional mode: idem opens the transaction (bound to `tx` in the body), and the
// caller's transaction (`in_transaction`, skipped from the fingerprint by itself).
impl Orders {
    #[idempotent(key = order.id, store = self.db, transaction = tx)]
    async fn place(&self, order: Order) -> Result<i64, Error> {
        let id = insert(&mut **tx, &order).await?;
        Ok(id)
    }
}

#[idempotent(key = order.id, store = store, in_transaction = tx)]
async fn debit(store: &SqliteStore, tx: &mut SqliteTx, order: Order) -> Result<i64, Error> {
    insert(&mut **tx, &order).await
}
