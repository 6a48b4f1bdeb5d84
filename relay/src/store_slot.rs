//! The store, once it is open. A ClickHouse server can be down when the relay starts:
//! the relay serves live flows meanwhile, and what needs the store waits for it (the
//! writer) or says it is not there yet (history).

use std::sync::Arc;

use flows_store::Store;
use tokio::sync::watch;

#[derive(Clone)]
pub struct StoreSlot {
    /// "embedded" or "clickhouse", known before the store opens.
    backend: &'static str,
    store: watch::Sender<Option<Arc<Store>>>,
}

impl StoreSlot {
    pub fn empty(embedded: bool) -> StoreSlot {
        StoreSlot {
            backend: if embedded { "embedded" } else { "clickhouse" },
            store: watch::Sender::new(None),
        }
    }

    /// A slot holding an open store.
    pub fn ready(store: Arc<Store>) -> StoreSlot {
        let slot = StoreSlot::empty(store.is_embedded());
        slot.set(store);
        slot
    }

    pub fn set(&self, store: Arc<Store>) {
        self.store.send_replace(Some(store));
    }

    pub fn get(&self) -> Option<Arc<Store>> {
        self.store.borrow().clone()
    }

    /// The store once it is open.
    pub async fn wait(&self) -> Arc<Store> {
        let mut rx = self.store.subscribe();
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return s;
            }
            // The sender is self's: it cannot be dropped while this waits.
            let _ = rx.changed().await;
        }
    }

    /// How ServerStatus and the History API name the store.
    pub fn backend(&self) -> &'static str {
        self.backend
    }
}
