//! `StoredMessage`: one durable message as the broker hands it around
//! (shared by `Arc` between the in-memory tail, pages and deliveries).

use std::collections::HashMap;

use bytes::Bytes;

use super::message_id::MessageId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Global sequence, across all topics.
    pub sequence: u64,
    /// Position within its topic: 1 for the topic's first message, never reused.
    pub ordinal: u64,
    pub id: MessageId,
    /// Unix milliseconds, assigned by the writer.
    pub timestamp_ms: i64,
    pub payload: Bytes,
    pub attributes: HashMap<String, String>,
}

impl StoredMessage {
    /// Bytes this message costs in memory, roughly (for cache budgets).
    pub fn footprint(&self) -> usize {
        let attrs: usize = self
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum();
        std::mem::size_of::<Self>() + self.payload.len() + attrs + 16
    }
}
