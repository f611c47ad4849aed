//! The store-neutral storage boundary: what the reactor sends a store and
//! what it gets back. Writes go in as `WriteRequest`s and come back, in
//! commit order, as `WriteOutcome`s; backlog reads go in as `PageRequest`s
//! and come back as `Page`s; every reply is followed by a `Wake`. At start-up
//! a store hands the broker its `LoadedState`. `StoreLinks` are the four
//! channel ends, `StoreThreads` what the server joins at shutdown, and
//! `OpenedStore` what each implementation's `open` returns.
//!
//! Owns only types and channels: it may use `broker` types, nothing of any
//! implementation (SQLite, JetStream) and nothing of gRPC or sockets.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use crate::broker::{GroupDeliveries, GroupView, MessageId, StoredMessage, TopicView};

/// Wakes the thread that consumes a storage thread's replies.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Sends to the reactor's channel; when it is full, wakes the reactor
/// before waiting for room (so it drains what is there instead of sleeping
/// while we wait). False when the reactor is gone.
pub fn send_waking<T>(tx: &Sender<T>, wake: &Wake, value: T) -> bool {
    match tx.try_send(value) {
        Ok(()) => true,
        Err(crossbeam_channel::TrySendError::Full(value)) => {
            wake();
            tx.send(value).is_ok()
        }
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
    }
}

/// Held by a storage thread for its whole life: when the thread ends, by
/// returning or by a panic, its consumer is woken to notice the closed
/// channel instead of sleeping on it.
pub struct WakeOnExit(pub Wake);

impl Drop for WakeOnExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!(
                "storage thread {:?} panicked",
                std::thread::current().name().unwrap_or("?")
            );
        }
        (self.0)();
    }
}

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageError {
    /// The disk (or the database's size limit) is full.
    pub disk_full: bool,
    /// The database file is damaged (SQLite reports corruption).
    pub corrupt: bool,
    /// The store cannot be reached for now (a JetStream cluster without a
    /// connection or quorum): the call may succeed if tried again later.
    pub unavailable: bool,
    /// The message is larger than the store can hold in one piece (NATS
    /// max_payload).
    pub too_large: bool,
    pub message: String,
}

impl StorageError {
    pub fn new(message: impl Into<String>) -> Self {
        StorageError {
            disk_full: false,
            corrupt: false,
            unavailable: false,
            too_large: false,
            message: message.into(),
        }
    }
}

/// A message as published, before it has a sequence.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub payload: Bytes,
    pub attributes: HashMap<String, String>,
    /// Stored at most once per topic within the dedup window (checked
    /// 1..=128 printable ASCII bytes before it gets here).
    pub idempotency_key: Option<String>,
}

/// Work for the writer.
#[derive(Debug)]
pub enum WriteRequest {
    /// Append messages to a topic (creating it), atomically.
    Append {
        token: u64,
        topic: Arc<str>,
        messages: Vec<NewMessage>,
    },
    /// Make sure a topic exists.
    CreateTopic { topic: Arc<str>, created_at_ms: i64 },
    /// Store a group's cursor (its last acknowledged sequence); `token` asks
    /// for the outcome to be routed back to a call.
    SetCursor {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        acked_at_ms: i64,
        token: Option<u64>,
    },
    /// Delete a topic, its groups and (in chunks, later) its messages.
    DeleteTopic { token: u64, topic: Arc<str> },
    /// Delete a consumer group's cursor.
    DeleteGroup {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
    },
    /// Make this gateway the one serving a group's consumer (stores shared
    /// by several gateways, see `StoreLinks::claims_groups`): answered by
    /// `GroupClaimed` once any other gateway serving it has let go.
    ClaimGroup {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
    },
    /// This gateway no longer serves the group's consumer; its cursor
    /// writes queued before this are stored first.
    ReleaseGroup { topic: Arc<str>, group: Arc<str> },
    /// Append `message` to `dead_letter_topic` and record that `group` of
    /// `topic` is done with `sequence`, in one commit; with
    /// `advance_cursor`, the group's cursor moves to `sequence` in it too.
    /// Answered by `DeadLettered`.
    DeadLetter {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        ordinal: u64,
        advance_cursor: bool,
        dead_letter_topic: Arc<str>,
        message: NewMessage,
    },
    /// Delivery counts of a group with `max_deliveries`: the highest
    /// sequence delivered and (sequence, count) of repeated deliveries.
    SetDeliveries {
        topic: Arc<str>,
        group: Arc<str>,
        delivered_max: u64,
        counts: Vec<(u64, u32)>,
    },
    /// A group's dead-letter settings (its latest Init's).
    SetPolicy {
        topic: Arc<str>,
        group: Arc<str>,
        max_deliveries: u32,
        dead_letter_topic: Option<Arc<str>>,
    },
}

/// A message of an append that was not stored because its idempotency key
/// was: the original's sequence, id and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// Its position in the call.
    pub index: usize,
    pub sequence: u64,
    pub id: MessageId,
    pub timestamp_ms: i64,
}

/// A committed append.
#[derive(Debug, Clone)]
pub struct Appended {
    pub topic: Arc<str>,
    pub created_at_ms: i64,
    pub timestamp_ms: i64,
    /// The messages stored, in the caller's order (their sequences ascend
    /// unless `announced`); duplicates are not among them.
    pub messages: Vec<Arc<StoredMessage>>,
    /// The call's messages that were not stored (their keys were), by
    /// ascending `index`.
    pub duplicates: Vec<Duplicate>,
    /// A `Committed` outcome already told the broker about these messages
    /// (the store stored them out of call order): only answer the call.
    pub announced: bool,
}

/// What the writer reports back, in commit order.
#[derive(Debug)]
pub enum WriteOutcome {
    Appended {
        token: u64,
        topic: Arc<str>,
        result: Result<Appended, StorageError>,
    },
    /// Messages stored, in ascending sequence, to tell the broker about
    /// before the `Appended` outcomes (marked `announced`) that answer their
    /// calls. A store sends this when retries stored a call's messages out
    /// of call order (JetStream after a leader change); SQLite never does.
    Committed {
        topic: Arc<str>,
        created_at_ms: i64,
        messages: Vec<Arc<StoredMessage>>,
    },
    CursorSaved {
        token: Option<u64>,
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        ordinal: u64,
    },
    TopicDeleted {
        token: u64,
        topic: Arc<str>,
        result: Result<bool, StorageError>,
    },
    GroupDeleted {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
        result: Result<bool, StorageError>,
    },
    /// A cursor write that carried a token (ResetCursor) failed with its batch.
    CursorFailed {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
        error: StorageError,
    },
    /// The store became unreachable (`Some(why)`) or reachable again
    /// (`None`); health follows it. Sent by stores that can lose their
    /// connection (JetStream), never by SQLite.
    Availability { unavailable: Option<String> },
    /// The answer to `ClaimGroup`: `Some(cursor, acked_at_ms)` when another
    /// gateway served the group last (start from its cursor, not ours).
    GroupClaimed {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
        result: Result<Option<(u64, i64)>, ClaimError>,
        /// The group's persisted delivery counts and settings (a group with
        /// `max_deliveries` served elsewhere before), to carry on counting.
        deliveries: Option<GroupDeliveries>,
    },
    /// Another gateway claimed a group this one serves (`taken`: end its
    /// consumer `ABORTED`, as a takeover), or this one could not renew its
    /// claim (end it `UNAVAILABLE`); then send `ReleaseGroup`.
    GroupLost {
        topic: Arc<str>,
        group: Arc<str>,
        taken: bool,
    },
    /// A change made through another gateway sharing the store (JetStream
    /// with several gateways): apply it to the broker; its write is done.
    Remote(RemoteChange),
    /// The answer to `DeadLetter`: `result` is the dead-letter append.
    DeadLettered {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        advanced: bool,
        result: Result<Appended, StorageError>,
    },
    /// Retention removed a topic's oldest messages; `first` is the oldest
    /// left (sequence, ordinal, timestamp).
    Trimmed {
        topic: Arc<str>,
        first: Option<(u64, u64, i64)>,
        removed: u64,
    },
}

/// Why a `ClaimGroup` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// A consumer on another gateway claimed the group meanwhile.
    TakenOver,
    Store(StorageError),
}

/// What another gateway changed (see `WriteOutcome::Remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteChange {
    TopicCreated {
        topic: Arc<str>,
        created_at_ms: i64,
    },
    TopicDeleted {
        topic: Arc<str>,
    },
    GroupDeleted {
        topic: Arc<str>,
        group: Arc<str>,
    },
    /// A group's cursor as the gateway serving it stored it.
    CursorMoved {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        acked_at_ms: i64,
    },
    CursorReset {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
    },
}

/// A request for up to `limit` messages of `topic` from sequence `from` on.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub sub: u64,
    pub fetch: u64,
    pub topic: Arc<str>,
    pub from: u64,
    pub limit: u32,
}

/// The answer. `end` is set when the page is short: the store held nothing
/// more of the topic up to that (global) sequence when it was read.
/// `error` is set when the read failed (then nothing else is).
#[derive(Debug)]
pub struct Page {
    pub sub: u64,
    pub fetch: u64,
    pub messages: Vec<Arc<StoredMessage>>,
    pub end: Option<u64>,
    pub error: Option<StorageError>,
}

/// What the broker needs to know at start-up.
#[derive(Debug, Default)]
pub struct LoadedState {
    pub last_seq: u64,
    pub topics: Vec<TopicView>,
    pub groups: Vec<(String, GroupView)>,
    /// Groups' dead-letter settings, delivery counts and dead-lettered
    /// messages: (topic, group, state).
    pub deliveries: Vec<(String, Arc<str>, GroupDeliveries)>,
}

/// The reactor's ends of a store's channels.
pub struct StoreLinks {
    /// Writes, applied in order (the sender is the back-pressure point).
    pub requests: Sender<WriteRequest>,
    /// Their outcomes, in commit order.
    pub outcomes: Receiver<WriteOutcome>,
    /// Backlog reads.
    pub pages_in: Sender<PageRequest>,
    /// Their answers.
    pub pages_out: Receiver<Page>,
    /// Several gateways may serve this store: a group's consumer is claimed
    /// (`WriteRequest::ClaimGroup`) before it starts and released when it
    /// ends. False for a store only this process uses.
    pub claims_groups: bool,
}

/// A store's threads and whatever it holds for its whole life (such as a
/// lock on its data). Once the reactor has dropped its `StoreLinks`, `join`
/// waits for the threads to finish what was queued; dropping this value
/// releases what the store held.
pub struct StoreThreads {
    join: Option<Box<dyn FnOnce() -> Result<(), String>>>,
    _held: Box<dyn std::any::Any>,
}

impl StoreThreads {
    pub fn new(
        join: impl FnOnce() -> Result<(), String> + 'static,
        held: impl std::any::Any,
    ) -> Self {
        StoreThreads {
            join: Some(Box::new(join)),
            _held: Box::new(held),
        }
    }

    /// Waits for the store's threads to end; `Err` names one that panicked.
    /// A second call does nothing.
    pub fn join(&mut self) -> Result<(), String> {
        match self.join.take() {
            Some(join) => join(),
            None => Ok(()),
        }
    }
}

/// What a store's `open` returns: the channels for the reactor, the state
/// the broker starts from and the threads to join at shutdown.
pub struct OpenedStore {
    pub links: StoreLinks,
    pub state: LoadedState,
    pub threads: StoreThreads,
}
