//! Every call ends in exactly one outcome: one `tracing` event with an `outcome` field, and
//! one count — and the raw key never reaches a log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{Call, Error, OnConflict};
use idem_stores::MemoryStore;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// One event's (or span's) fields, as text.
type Recorded = Vec<(String, String)>;

/// Records every event's fields.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Recorded>>>,
}

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut f = Fields(Vec::new());
        span.record(&mut f);
        self.events.lock().unwrap().push(
            std::iter::once(("span".to_string(), span.metadata().name().to_string()))
                .chain(f.0)
                .collect(),
        );
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut f = Fields(Vec::new());
        event.record(&mut f);
        self.events.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Capture {
    fn outcomes(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .flat_map(|e| {
                e.iter()
                    .filter(|(k, _)| k == "outcome")
                    .map(|(_, v)| v.clone())
            })
            .collect()
    }
    fn all_text(&self) -> String {
        format!("{:?}", self.events.lock().unwrap())
    }
}

#[test]
fn each_call_emits_exactly_one_outcome_event() {
    let capture = Capture::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(capture.clone(), || {
        rt.block_on(async {
            let store = MemoryStore::new();
            let raw_key = "customer-secret-key-4242";
            let call = || Call::new("tests::observe").key(raw_key).fingerprint(1u8);
            let a: Result<u8, Error> = call().run(&store, async { Ok(1) }).await;
            let b: Result<u8, Error> = call().run(&store, async { Ok(1) }).await;
            let c: Result<u8, Error> = Call::new("tests::observe")
                .key(raw_key)
                .fingerprint(2u8)
                .run(&store, async { Ok(2) })
                .await;
            let d: Result<u8, Error> = Call::new("tests::observe")
                .key("other")
                .run(&store, async { Err(Error::MissingKey) })
                .await;
            assert!(a.is_ok() && b.is_ok() && c.is_err() && d.is_err());
            let e: Result<u8, Error> = Call::new("tests::observe")
                .key(None::<&str>)
                .on_conflict(OnConflict::Reject)
                .wait_timeout(Duration::from_millis(1))
                .run(&store, async { Ok(1) })
                .await;
            assert!(matches!(e, Err(Error::MissingKey)));
            assert!(
                !capture.all_text().contains(raw_key),
                "the raw key reached a log"
            );
        })
    });
    assert_eq!(
        capture.outcomes(),
        [
            "executed",
            "replayed",
            "key_reused",
            "failed",
            "missing_key"
        ]
    );
}
