//! Durable storage on SQLite (WAL, `synchronous=FULL`).
//!
//! `schema` opens and migrates the database and loads the broker's start-up
//! state; `writer` is the one thread that writes (group commit: one
//! transaction and one fsync per batch); `reader` threads serve backlog pages
//! on read-only connections; `checkpointer` moves WAL checkpoints off the
//! commit path. The interface is narrow (append a batch, read a
//! range, set a cursor, delete) and knows nothing of gRPC or sockets: results
//! go back over channels plus a wake-up callback.

pub mod checkpointer;
pub mod reader;
pub mod retention;
pub mod schema;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;

/// Wakes the thread that consumes a storage thread's replies.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageError {
    /// The disk (or the database's size limit) is full.
    pub disk_full: bool,
    pub message: String,
}

impl StorageError {
    fn from_sqlite(e: &rusqlite::Error) -> Self {
        let disk_full = matches!(
            e,
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull
        );
        StorageError {
            disk_full,
            message: e.to_string(),
        }
    }
}

/// Attributes as stored in a message row (a small protobuf of their own, not
/// tied to the wire API).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredAttributes {
    #[prost(map = "string, string", tag = "1")]
    attributes: HashMap<String, String>,
}

fn encode_attributes(attributes: &HashMap<String, String>) -> Option<Vec<u8>> {
    if attributes.is_empty() {
        return None;
    }
    Some(
        StoredAttributes {
            attributes: attributes.clone(),
        }
        .encode_to_vec(),
    )
}

fn decode_attributes(blob: Option<&[u8]>) -> HashMap<String, String> {
    blob.and_then(|b| StoredAttributes::decode(b).ok())
        .map(|a| a.attributes)
        .unwrap_or_default()
}
