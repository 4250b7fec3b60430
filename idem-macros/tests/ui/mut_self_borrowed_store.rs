use idem_core::{idempotent, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt;

struct Svc {
    store: idem_stores::MemoryStore,
    count: u32,
}

impl Svc {
    #[idempotent(key = id, store = self.store)]
    async fn charge(&mut self, id: u64) -> Result<Receipt, Error> {
        self.count += u32::from(id > 0);
        Ok(Receipt)
    }
}

fn main() {}
