// A store with transactions for the UI cases (idem-core's tests see only the memory store):
// `Db`, whose transaction type is `DbTx`. Never run.
#![allow(dead_code)]

use std::time::Duration;

use idem_core::{
    async_trait, Claim, ClaimRequest, FencingToken, Key, RecordState, Store, StoreError,
    TransactionalStore,
};

#[derive(Debug)]
pub struct Db;

pub struct DbTx;

#[async_trait]
impl Store for Db {
    async fn claim(&self, _: &ClaimRequest) -> Result<Claim, StoreError> {
        unimplemented!()
    }
    async fn complete(&self, _: &Key, _: FencingToken, _: &[u8], _: Duration) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn release(&self, _: &Key, _: FencingToken) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn renew(&self, _: &Key, _: FencingToken, _: Duration) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn get(&self, _: &Key) -> Result<Option<RecordState>, StoreError> {
        unimplemented!()
    }
    async fn wait(&self, _: &Key, _: Duration) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn remove(&self, _: &Key) -> Result<(), StoreError> {
        unimplemented!()
    }
}

#[async_trait]
impl TransactionalStore for Db {
    type Tx = DbTx;
    async fn begin(&self) -> Result<DbTx, StoreError> {
        unimplemented!()
    }
    async fn complete_in(&self, _: &mut DbTx, _: &Key, _: FencingToken, _: &[u8], _: Duration) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn commit(&self, _: DbTx) -> Result<(), StoreError> {
        unimplemented!()
    }
}
