// No `key`: the key is every argument not skipped; nothing else is fingerprinted.
#[idempotent(store = store, skip(store, db))]
async fn send_email(store: &MemoryStore, db: &Pool, to: String, template: u32) -> Result<(), Error> {
    db.log(&to, template).await?;
    Ok(())
}
