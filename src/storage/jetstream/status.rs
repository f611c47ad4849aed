//! What the JetStream store's threads share: the highest sequence the
//! writer has seen acknowledged (a reader's `Page.end` never claims more)
//! and whether the cluster is reachable (set by `monitor`, read by the
//! writer, which fails publishes at once instead of retrying into a dead
//! cluster and reports each change to the reactor). Atomics and one mutex;
//! calls nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct StoreStatus {
    last_acked: AtomicU64,
    unavailable: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl StoreStatus {
    pub fn new(last_seq: u64) -> StoreStatus {
        StoreStatus {
            last_acked: AtomicU64::new(last_seq),
            ..StoreStatus::default()
        }
    }

    pub fn last_acked(&self) -> u64 {
        self.last_acked.load(Ordering::Acquire)
    }

    pub fn acked(&self, seq: u64) {
        self.last_acked.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::Acquire)
    }

    /// Why the cluster is unreachable, if it is.
    pub fn unavailable_reason(&self) -> Option<String> {
        if !self.is_unavailable() {
            return None;
        }
        let reason = self.reason.lock().map(|r| r.clone()).unwrap_or_default();
        Some(reason.unwrap_or_else(|| "the NATS cluster is unreachable".into()))
    }

    pub fn set_unavailable(&self, reason: Option<String>) {
        let down = reason.is_some();
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.unavailable.store(down, Ordering::Release);
    }
}
