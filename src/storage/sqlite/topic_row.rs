//! `TopicRow`: what the SQLite writer keeps in memory of each topic (its
//! row id, ordinals and stored bytes), shared with retention, which trims
//! topics by it. Plain data; calls nothing.

/// What the writer remembers of a topic.
#[derive(Debug, Clone, Copy)]
pub struct TopicRow {
    pub id: i64,
    pub created_at_ms: i64,
    /// Ordinal of the newest message ever stored (0: none).
    pub last_ordinal: u64,
    /// Ordinal of the oldest message still stored (last + 1: none).
    pub first_ordinal: u64,
    /// Payload bytes stored (kept only when a byte limit is set).
    pub bytes: u64,
}
