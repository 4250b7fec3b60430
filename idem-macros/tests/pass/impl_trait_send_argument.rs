//! An `impl Display + Send` argument (not `Sync`) covered by the key, and one skipped, used
//! by the body across an await: the annotated call spawns on a multi-thread runtime.

use std::fmt::Display;
use std::sync::Arc;

use idem_core::{idempotent, Error};
use idem_stores::MemoryStore;

#[idempotent(key = label.to_string(), store = store)]
pub async fn note(store: Arc<MemoryStore>, label: impl Display + Send) -> Result<String, Error> {
    tokio::task::yield_now().await;
    Ok(format!("noted {label}"))
}

#[idempotent(key = id, store = store, skip(extra))]
pub async fn note_with(
    store: Arc<MemoryStore>,
    id: u64,
    extra: impl Display + Send + 'static,
) -> Result<String, Error> {
    tokio::task::yield_now().await;
    Ok(format!("{id}: {extra}"))
}

/// `Display` and `Send`, not `Sync`.
pub struct Label(std::cell::Cell<u8>);

impl Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "label-{}", self.0.get())
    }
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let first = tokio::spawn(note(store.clone(), Label(std::cell::Cell::new(7))));
        assert_eq!(first.await.unwrap().unwrap(), "noted label-7");
        let other = tokio::spawn(note_with(store, 1, Label(std::cell::Cell::new(8))));
        assert_eq!(other.await.unwrap().unwrap(), "1: label-8");
    });
}
