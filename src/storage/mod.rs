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
pub mod dir_lock;
pub mod high_water;
pub mod interface;
pub mod maintenance;
pub mod reader;
pub mod retention;
pub mod schema;
pub mod writer;

use std::collections::HashMap;

use prost::Message as _;

pub use interface::{
    Appended, LoadedState, NewMessage, OpenedStore, Page, PageRequest, StorageError, StoreLinks,
    StoreThreads, Wake, WakeOnExit, WriteOutcome, WriteRequest,
};

impl StorageError {
    fn from_sqlite(e: &rusqlite::Error) -> Self {
        let code = match e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        StorageError {
            disk_full: code == Some(rusqlite::ErrorCode::DiskFull),
            corrupt: matches!(
                code,
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
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
