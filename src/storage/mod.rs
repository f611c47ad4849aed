//! Storage behind one store-neutral boundary.
//!
//! `interface` defines it: the reactor sends `WriteRequest`s and
//! `PageRequest`s over channels and gets `WriteOutcome`s and `Page`s back,
//! each followed by a wake-up; at start-up a store hands the broker its
//! `LoadedState`. Each implementation has one entry point, `open`, which
//! returns an `OpenedStore` (links, start-up state, threads to join).
//! There are two: `sqlite` (WAL, `synchronous=FULL`, group commit; the
//! default) and `jetstream` (a NATS JetStream cluster; the daemon becomes a
//! gateway). The reactor and the broker use only the re-exported neutral
//! types and never learn which store is behind them.

pub mod interface;
pub mod jetstream;
pub mod sqlite;

pub use interface::{
    send_waking, Appended, ClaimError, Duplicate, LoadedState, NewMessage, OpenedStore, Page,
    PageRequest, RemoteChange, StorageError, StoreLinks, StoreThreads, Wake, WakeOnExit,
    WriteOutcome, WriteRequest,
};

/// Unix milliseconds now: the timestamp a store's writer gives a batch.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
