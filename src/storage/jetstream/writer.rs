//! The JetStream store's writer thread: takes `WriteRequest`s in order and
//! answers `WriteOutcome`s in the same order, like the SQLite writer. What
//! is queued when it wakes is one batch: its publishes and cursor puts are
//! all sent before any ack is awaited (one round trip per batch, not per
//! message), so many concurrent callers share the cluster's latency the way
//! they share an fsync on SQLite. Deletes wait for what was sent before
//! them. A publish whose ack does not come (leader election, a lost
//! connection) is sent again with the same `Nats-Msg-Id` for up to
//! `retry_for`, so it is stored at most once; while `monitor` says the
//! cluster is unreachable, publishes fail at once with `unavailable`.
//!
//! Owns the topics' ordinal counters (this gateway numbers each topic's
//! messages) and the topic registry's cache. Calls `nats` (JetStream, KV)
//! and `layout`; hands its outcomes, in order, to the `announcer` (which
//! announces messages to the broker in stream order and answers the
//! calls) and forwards group claims and releases to `leases`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::announcer::Announcer;
use super::layout::{self, AdminChange, AdminEvent, CursorValue, Layout, TopicValue};
use super::status::StoreStatus;
use super::storage_error;
use crate::broker::{MessageId, StoredMessage};
use crate::nats::jetstream::{JetStream, JetStreamError, PubAck, MSG_ID_HEADER};
use crate::nats::kv_bucket::{KvBucket, ERR_WRONG_LAST_SEQUENCE};
use crate::nats::publish_window::{OutgoingMessage, PubAckTicket};
use crate::nats::stored_message::MessageSelector;
use crate::storage::{
    Appended, Duplicate, StorageError, Wake, WakeOnExit, WriteOutcome, WriteRequest,
};

/// Recent (sequence, ordinal) pairs kept per topic, so a cursor near the
/// tail learns its ordinal without a lookup.
const RECENT_PER_TOPIC: usize = 128;
/// Most requests taken into one batch.
const MAX_BATCH_REQUESTS: usize = 4096;
/// Delivery counts and settings per (topic, group), as the deliveries
/// bucket holds them.
pub type GroupDeliveriesMap = HashMap<(Arc<str>, Arc<str>), layout::DeliveriesValue>;

/// How long a stored idempotency key is remembered in the writer's memory
/// (its KV entry is read after that).
const RECENT_KEYS_FOR: Duration = Duration::from_secs(2);
/// Most publishes and cursor puts in flight at once (one BatchPublish may
/// go past it: it is sent whole).
const WINDOW: usize = 2048;

#[derive(Clone)]
pub struct WriterConfig {
    /// How long a publish is retried (same msg id) before its call fails.
    pub retry_for: Duration,
    /// Retention limits are set on the stream: `monitor` sends the stream's
    /// per-subject counts once a second, and messages JetStream removed are
    /// reported as `Trimmed`.
    pub retention_counts: Option<Receiver<super::monitor::SubjectCounts>>,
    /// This gateway's id in the admin events it publishes.
    pub gateway: String,
    /// Deletes made through other gateways, to forget here.
    pub forgotten: super::announcer::Forgotten,
    /// Where group claims and releases go (after the cursor writes before them).
    pub leases: Sender<super::leases::LeaseRequest>,
    /// The idempotency keys bucket (None in tests that use no keys).
    pub keys: Option<KvBucket>,
    /// The delivery counts bucket and what it held at start-up (None in
    /// tests).
    pub deliveries: Option<(KvBucket, GroupDeliveriesMap)>,
    /// How long a key is remembered (`--dedup-window`).
    pub dedup_window: Duration,
}

/// What the writer knows of a topic.
#[derive(Debug, Clone, Default)]
pub struct TopicCounters {
    pub created_at_ms: i64,
    pub first_seq: u64,
    pub first_ordinal: u64,
    pub last_seq: u64,
    /// The highest ordinal acknowledged by the stream.
    pub last_ordinal: u64,
    /// The highest ordinal handed out (acked or in flight).
    next_ordinal: u64,
    recent: VecDeque<(u64, u64)>,
}

impl TopicCounters {
    pub fn new(created_at_ms: i64, first: (u64, u64), last: (u64, u64)) -> Self {
        TopicCounters {
            created_at_ms,
            first_seq: first.0,
            first_ordinal: first.1,
            last_seq: last.0,
            last_ordinal: last.1,
            next_ordinal: last.1,
            recent: VecDeque::new(),
        }
    }
}

/// One message of an append, as sent.
struct Outgoing {
    subject: String,
    /// Carries `Nats-Msg-Id`.
    headers: crate::nats::Headers,
    payload: Bytes,
    ordinal: u64,
    attributes: HashMap<String, String>,
    /// Its position in the call.
    index: usize,
    /// Its idempotency key's KV key, when it has one.
    key: Option<String>,
}

struct PendingAppend {
    token: u64,
    topic: Arc<str>,
    ts: i64,
    messages: Vec<Outgoing>,
    tickets: Vec<Result<PubAckTicket, JetStreamError>>,
    /// Set when the append failed before anything was sent.
    failed: Option<StorageError>,
    sent: Instant,
    /// Messages not sent: their keys were stored within the window.
    duplicates: Vec<Duplicate>,
    /// (index, index of the earlier message of the call with its key).
    repeats: Vec<(usize, usize)>,
    /// (index, key) of messages whose key an earlier call of this writer
    /// is storing: answered from `recent_keys` once that call is done.
    waits: Vec<(usize, String)>,
    /// This append moves a message to a dead-letter topic.
    dead_letter: Option<DeadLetterOf>,
}

/// The message a dead-letter append moves (see `WriteRequest::DeadLetter`).
struct DeadLetterOf {
    topic: Arc<str>,
    group: Arc<str>,
    sequence: u64,
}

struct PendingCursor {
    topic: Arc<str>,
    group: Arc<str>,
    sequence: u64,
    acked_at_ms: i64,
    token: Option<u64>,
    ticket: Result<PubAckTicket, JetStreamError>,
}

enum Pending {
    Append(PendingAppend),
    Cursor(PendingCursor),
}

impl Pending {
    /// Messages (or puts) it has in flight.
    fn size(&self) -> usize {
        match self {
            Pending::Append(a) => a.tickets.len(),
            Pending::Cursor(_) => 1,
        }
    }

    /// The first ticket whose ack has not come (None: all answered).
    fn first_unready(&self) -> Option<&PubAckTicket> {
        match self {
            Pending::Append(a) if a.failed.is_none() => a
                .tickets
                .iter()
                .filter_map(|t| t.as_ref().ok())
                .find(|t| !t.is_ready()),
            Pending::Append(_) => None,
            Pending::Cursor(c) => c.ticket.as_ref().ok().filter(|t| !t.is_ready()),
        }
    }
}

pub struct JetStreamWriter {
    js: JetStream,
    layout: Layout,
    topics_kv: KvBucket,
    cursors_kv: KvBucket,
    topics: HashMap<Arc<str>, TopicCounters>,
    /// Caller-less cursor writes that failed: tried again with the next batch.
    carry: HashMap<(Arc<str>, Arc<str>), (u64, i64)>,
    status: Arc<StoreStatus>,
    last_ts: i64,
    cfg: WriterConfig,
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// Sent and not yet answered, in request order.
    inflight: VecDeque<Pending>,
    inflight_size: usize,
    /// Topics whose numbering is read back from the stream once nothing is
    /// in flight (a publish of theirs failed or was resent).
    resync: HashSet<Arc<str>>,
    /// `Nats-Msg-Id` = this prefix (random per process) + a counter.
    msg_id_prefix: String,
    next_msg_id: u64,
    /// Idempotency keys this writer sent lately: None while in flight,
    /// then the message stored under it, until its KV entry surely shows
    /// (`RECENT_KEYS_FOR`); so one gateway's concurrent publishes of a key
    /// are answered here, without JetStream storing or numbering it twice.
    recent_keys: HashMap<String, Option<(u64, i64)>>,
    recent_order: VecDeque<(Instant, String)>,
    /// Delivery counts and settings of groups with `max_deliveries`, as
    /// last put in the deliveries bucket.
    deliveries: GroupDeliveriesMap,
}

impl JetStreamWriter {
    pub fn new(
        js: JetStream,
        layout: Layout,
        (topics_kv, cursors_kv): (KvBucket, KvBucket),
        topics: HashMap<Arc<str>, TopicCounters>,
        status: Arc<StoreStatus>,
        cfg: WriterConfig,
        telemetry: Arc<crate::telemetry::Telemetry>,
    ) -> Self {
        let mut cfg = cfg;
        let deliveries = cfg
            .deliveries
            .as_mut()
            .map(|(_, loaded)| std::mem::take(loaded))
            .unwrap_or_default();
        JetStreamWriter {
            js,
            layout,
            topics_kv,
            cursors_kv,
            topics,
            carry: HashMap::new(),
            status,
            last_ts: 0,
            cfg,
            telemetry,
            inflight: VecDeque::new(),
            inflight_size: 0,
            resync: HashSet::new(),
            msg_id_prefix: format!("{}-", uuid::Uuid::new_v4().simple()),
            next_msg_id: 0,
            recent_keys: HashMap::new(),
            recent_order: VecDeque::new(),
            deliveries,
        }
    }

    /// Runs until every request sender is gone and the queue is drained.
    /// A sliding window: new requests are sent while earlier ones wait for
    /// their acks (at most `WINDOW` messages in flight), and outcomes leave
    /// in request order as the acks arrive.
    pub fn run(mut self, requests: Receiver<WriteRequest>, announcer: Announcer, wake: Wake) {
        let _exit = WakeOnExit(wake);
        self.run_loop(&requests, &announcer);
        // Everything answered goes out now, held or not.
        let _ = announcer.writer_done();
    }

    fn run_loop(&mut self, requests: &Receiver<WriteRequest>, announcer: &Announcer) {
        let mut reported: Option<String> = None;
        let mut open = true;
        // The reactor stopped listening (shutdown): keep storing what it
        // queued, without answers.
        let mut orphaned = false;
        let mut carry_tried_at_exit = false;
        loop {
            self.forget_deleted();
            let mut out = Vec::new();
            let now = self.status.unavailable_reason();
            if now.is_some() != reported.is_some() {
                reported = now.clone();
                out.push(WriteOutcome::Availability { unavailable: now });
            }
            // Take what is queued, as far as the window allows.
            let mut batch = Vec::new();
            if open && self.inflight.is_empty() && out.is_empty() {
                match requests.recv_timeout(Duration::from_millis(250)) {
                    Ok(r) => batch.push(r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            let mut room = WINDOW.saturating_sub(self.inflight_size);
            while open && room > 0 && batch.len() < MAX_BATCH_REQUESTS {
                match requests.try_recv() {
                    Ok(r) => {
                        room = room.saturating_sub(match &r {
                            WriteRequest::Append { messages, .. } => messages.len(),
                            _ => 1,
                        });
                        batch.push(r);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => open = false,
                }
            }
            // Failed cursor writes go again when nothing is in flight (once
            // more at exit).
            let retry_carry = !self.carry.is_empty()
                && self.inflight.is_empty()
                && (open || !carry_tried_at_exit);
            if !open && retry_carry {
                carry_tried_at_exit = true;
            }
            if !batch.is_empty() || retry_carry {
                if crate::failpoint::hit("writer-panic") {
                    panic!("fail point writer-panic");
                }
                // The batch's publishes leave in one write.
                self.js.client().cork();
                self.admit(batch, &mut out);
                if let Err(e) = self.js.client().uncork() {
                    crate::log_limited!(log::Level::Warn, "cannot send to NATS: {e}");
                }
            }
            self.complete(!open, &mut out);
            let counts = self
                .cfg
                .retention_counts
                .as_ref()
                .and_then(|r| r.try_recv().ok());
            if let Some(counts) = counts {
                out.extend(self.check_trims(&counts));
            }
            if !out.is_empty() {
                if !orphaned && announcer.from_writer(out).is_err() {
                    orphaned = true;
                }
                continue;
            }
            if !open && self.inflight.is_empty() && (self.carry.is_empty() || carry_tried_at_exit) {
                if !self.carry.is_empty() {
                    log::error!(
                        "writer: {} cursor writes could not be stored before exit",
                        self.carry.len()
                    );
                }
                return;
            }
            self.wait_for_progress(open.then_some(requests));
        }
    }

    /// Sleeps until the oldest request's next ack arrives, a new request
    /// comes (when the window has room) or a quarter second passes.
    fn wait_for_progress(&self, requests: Option<&Receiver<WriteRequest>>) {
        let Some(head) = self.inflight.front() else {
            return;
        };
        let Some(ticket) = head.first_unready() else {
            return;
        };
        let mut select = crossbeam_channel::Select::new();
        select.recv(ticket.receiver());
        if let Some(r) = requests.filter(|_| self.inflight_size < WINDOW) {
            select.recv(r);
        }
        let wait = ticket
            .deadline()
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        let _ = select.ready_timeout(wait);
    }

    /// Answers the oldest requests whose acks have all come (`all`: every
    /// request in flight, waiting as needed). After a failed or retried
    /// publish everything in flight is answered at once, so commits can be
    /// announced in sequence order.
    fn complete(&mut self, all: bool, out: &mut Vec<WriteOutcome>) {
        while let Some(head) = self.inflight.front() {
            if !all && head.first_unready().is_some() {
                break;
            }
            let Some(head) = self.inflight.pop_front() else {
                break;
            };
            self.inflight_size -= head.size();
            let mut local = Vec::new();
            if self.finish_one(head, &mut local) {
                self.drain_into(&mut local);
                out.extend(announce_in_sequence_order(local));
            } else {
                out.extend(local);
            }
        }
    }

    /// Answers everything in flight (waiting for it), in order.
    fn drain(&mut self, out: &mut Vec<WriteOutcome>) {
        let mut local = Vec::new();
        self.drain_into(&mut local);
        out.extend(announce_in_sequence_order(local));
    }

    fn drain_into(&mut self, local: &mut Vec<WriteOutcome>) {
        while let Some(p) = self.inflight.pop_front() {
            self.finish_one(p, local);
        }
        self.inflight_size = 0;
        // Nothing is in flight now. Where a publish failed or was resent,
        // what the stream holds decides the topic's numbering (a failed
        // publish may have been stored; a failed one leaves no message), so
        // pending counts stay exact from here on.
        for topic in std::mem::take(&mut self.resync) {
            let Some(subject) = self.layout.subject(&topic) else {
                continue;
            };
            let held = self
                .js
                .subject_message_count(self.layout.stream(), &subject);
            if let (Some(t), Ok(n)) = (self.topics.get_mut(&topic), held) {
                if t.first_seq != 0 && n > 0 {
                    t.last_ordinal = t.first_ordinal + n - 1;
                }
            }
        }
        for t in self.topics.values_mut() {
            t.next_ordinal = t.last_ordinal;
        }
    }

    /// Forgets topics and groups deleted through other gateways.
    fn forget_deleted(&mut self) {
        let forgotten = std::mem::take(
            &mut *self
                .cfg
                .forgotten
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (topic, group) in forgotten {
            match group {
                None => {
                    self.topics.remove(&topic);
                    self.carry.retain(|(t, _), _| *t != topic);
                }
                Some(g) => {
                    self.carry.remove(&(topic, g));
                }
            }
        }
    }

    /// Sends a batch of requests (publishes and cursor puts go out without
    /// waiting; deletes first wait for everything before them).
    fn admit(&mut self, batch: Vec<WriteRequest>, out: &mut Vec<WriteOutcome>) {
        self.forget_recent_keys();
        let mut batch = batch;
        self.forget_deleted();
        if !self.carry.is_empty() {
            let carried: Vec<WriteRequest> = self
                .carry
                .drain()
                .map(
                    |((topic, group), (sequence, acked_at_ms))| WriteRequest::SetCursor {
                        topic,
                        group,
                        sequence,
                        acked_at_ms,
                        token: None,
                    },
                )
                .collect();
            batch.splice(0..0, carried);
        }
        let superseded = superseded_cursor_writes(&batch);
        let ts = crate::storage::wall_ms().max(self.last_ts);
        self.last_ts = ts;
        for (i, req) in batch.into_iter().enumerate() {
            match req {
                WriteRequest::Append {
                    token,
                    topic,
                    messages,
                } => {
                    let p = Pending::Append(self.start_append(token, topic, ts, messages));
                    self.inflight_size += p.size();
                    self.inflight.push_back(p);
                }
                WriteRequest::CreateTopic {
                    topic,
                    created_at_ms,
                } => {
                    if let Err(e) = self.ensure_topic(&topic, created_at_ms) {
                        log::warn!("cannot register topic {topic}: {}", e.message);
                    }
                }
                WriteRequest::SetCursor {
                    topic,
                    group,
                    sequence,
                    acked_at_ms,
                    token,
                } => {
                    if superseded.contains(&i) {
                        continue;
                    }
                    self.cursor_moved(&topic, &group, sequence, token.is_some());
                    if !self.knows_topic(&topic) {
                        // A cursor never re-creates a topic deleted meanwhile.
                        if let Some(token) = token {
                            self.drain(out);
                            out.push(WriteOutcome::CursorSaved {
                                token: Some(token),
                                topic,
                                group,
                                sequence,
                                ordinal: 0,
                            });
                        }
                        continue;
                    }
                    let ticket = match layout::cursor_key(&topic, &group) {
                        Some(key) => {
                            let value = serde_json::to_vec(&CursorValue {
                                seq: sequence,
                                acked_at_ms,
                                gateway: self.cfg.gateway.clone(),
                            })
                            .unwrap_or_default();
                            self.cursors_kv.put_start(&key, &value)
                        }
                        None => Err(JetStreamError::Invalid(format!(
                            "cannot name the cursor of {topic}/{group}"
                        ))),
                    };
                    self.inflight_size += 1;
                    self.inflight.push_back(Pending::Cursor(PendingCursor {
                        topic,
                        group,
                        sequence,
                        acked_at_ms,
                        token,
                        ticket,
                    }));
                }
                WriteRequest::ClaimGroup {
                    token,
                    topic,
                    group,
                } => {
                    let claim = super::leases::LeaseRequest::Claim {
                        token,
                        topic: topic.clone(),
                        group: group.clone(),
                    };
                    // Never wait here (publishes queue behind); a claim the
                    // leases thread cannot take fails, and the client retries.
                    if self.cfg.leases.try_send(claim).is_err() {
                        out.push(WriteOutcome::GroupClaimed {
                            token,
                            topic,
                            group,
                            result: Err(crate::storage::ClaimError::Store(StorageError {
                                unavailable: true,
                                ..StorageError::new(
                                    "too many consumer groups are being claimed; try again",
                                )
                            })),
                            deliveries: None,
                        });
                    }
                }
                WriteRequest::ReleaseGroup { topic, group } => {
                    // Another gateway may count its deliveries next: read
                    // them back from the bucket if it comes here again.
                    self.deliveries.remove(&(topic.clone(), group.clone()));
                    // The group's cursor writes before it are stored first,
                    // a failed one included: the next gateway starts there.
                    self.drain(out);
                    // Tried once more now, then never again: after the
                    // release it would overwrite the next gateway's cursor.
                    let key = (topic.clone(), group.clone());
                    if let Some((sequence, acked_at_ms)) = self.carry.remove(&key) {
                        self.store_cursor_now(&topic, &group, sequence, acked_at_ms);
                    }
                    let release = super::leases::LeaseRequest::Release { topic, group };
                    if self.cfg.leases.send(release).is_err() {
                        log::warn!("writer: the group leases thread is gone");
                    }
                }
                WriteRequest::DeadLetter {
                    topic,
                    group,
                    sequence,
                    ordinal: _,
                    advance_cursor: _,
                    dead_letter_topic,
                    mut message,
                } => {
                    // A key of its own: the same message of the same group is
                    // dead-lettered once within the dedup window, even
                    // after a restart.
                    message.idempotency_key = Some(format!("dl:{group}:{sequence}"));
                    let mut p = self.start_append(0, dead_letter_topic, ts, vec![message]);
                    p.dead_letter = Some(DeadLetterOf {
                        topic,
                        group,
                        sequence,
                    });
                    let p = Pending::Append(p);
                    self.inflight_size += p.size();
                    self.inflight.push_back(p);
                }
                WriteRequest::SetDeliveries {
                    topic,
                    group,
                    delivered_max,
                    counts,
                } => {
                    self.update_deliveries(&topic, &group, |d| {
                        d.delivered_max = d.delivered_max.max(delivered_max);
                        let mut merged: std::collections::BTreeMap<u64, u32> =
                            d.counts.iter().copied().collect();
                        for (seq, count) in counts {
                            let c = merged.entry(seq).or_insert(0);
                            *c = (*c).max(count);
                        }
                        d.counts = merged.into_iter().collect();
                    });
                }
                WriteRequest::SetPolicy {
                    topic,
                    group,
                    max_deliveries,
                    dead_letter_topic,
                } => {
                    self.update_deliveries(&topic, &group, |d| {
                        d.max_deliveries = max_deliveries;
                        d.dead_letter_topic = dead_letter_topic.map(|t| t.to_string());
                    });
                }
                WriteRequest::DeleteTopic { token, topic } => {
                    self.drain(out);
                    let result = self.delete_topic(&topic);
                    let gone: Vec<_> = self
                        .deliveries
                        .keys()
                        .filter(|(t, _)| *t == topic)
                        .cloned()
                        .collect();
                    for (t, g) in gone {
                        self.forget_deliveries(&t, &g);
                    }
                    if result.is_ok() {
                        self.publish_admin(AdminChange::TopicDeleted {
                            topic: topic.to_string(),
                        });
                    }
                    out.push(WriteOutcome::TopicDeleted {
                        token,
                        topic,
                        result,
                    });
                }
                WriteRequest::DeleteGroup {
                    token,
                    topic,
                    group,
                } => {
                    self.drain(out);
                    let result = self.delete_group(&topic, &group);
                    self.forget_deliveries(&topic, &group);
                    if result.is_ok() {
                        self.publish_admin(AdminChange::GroupDeleted {
                            topic: topic.to_string(),
                            group: group.to_string(),
                        });
                    }
                    out.push(WriteOutcome::GroupDeleted {
                        token,
                        topic,
                        group,
                        result,
                    });
                }
            }
        }
    }

    /// Whether the topic exists: known here, or registered (through
    /// another gateway) in the KV bucket.
    fn knows_topic(&mut self, topic: &Arc<str>) -> bool {
        if self.topics.contains_key(topic) {
            return true;
        }
        let Some(key) = layout::topic_key(topic) else {
            return false;
        };
        match self.topics_kv.get(&key) {
            Ok(Some(entry)) => {
                let created_at_ms = serde_json::from_slice::<TopicValue>(&entry.value)
                    .map(|v| v.created_at_ms)
                    .unwrap_or(0);
                self.topics.insert(
                    topic.clone(),
                    TopicCounters::new(created_at_ms, (0, 0), (0, 0)),
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                crate::log_limited!(log::Level::Warn, "cannot read the topic registry: {e}");
                // Unknown for now: keep the write (a topic deleted meanwhile
                // gets a cursor it will never use).
                true
            }
        }
    }

    /// Registers a topic in the KV bucket unless it is known; keeps the
    /// creation time already stored there.
    fn ensure_topic(&mut self, topic: &Arc<str>, created_at_ms: i64) -> Result<(), StorageError> {
        if self.topics.contains_key(topic) {
            return Ok(());
        }
        let key = layout::topic_key(topic)
            .ok_or_else(|| StorageError::new(format!("invalid topic name {topic:?}")))?;
        let value = serde_json::to_vec(&TopicValue { created_at_ms }).unwrap_or_default();
        let created_at_ms = match self.topics_kv.put_if_revision(&key, &value, 0) {
            Ok(_) => created_at_ms,
            Err(JetStreamError::Api(e)) if e.err_code == ERR_WRONG_LAST_SEQUENCE => {
                // Registered already (by an earlier run): keep its time.
                match self.topics_kv.get(&key) {
                    Ok(Some(entry)) => serde_json::from_slice::<TopicValue>(&entry.value)
                        .map(|v| v.created_at_ms)
                        .unwrap_or(created_at_ms),
                    // Deleted before (a tombstone holds the key): register anew.
                    Ok(None) => {
                        self.topics_kv
                            .put(&key, &value)
                            .map_err(|e| storage_error("cannot register the topic", &e))?;
                        created_at_ms
                    }
                    Err(e) => return Err(storage_error("cannot read the topic registry", &e)),
                }
            }
            Err(e) => return Err(storage_error("cannot register the topic", &e)),
        };
        self.topics.insert(
            topic.clone(),
            TopicCounters::new(created_at_ms, (0, 0), (0, 0)),
        );
        Ok(())
    }

    /// Drops the keys stored more than `RECENT_KEYS_FOR` ago (their KV
    /// entries answer from now on); keys still in flight stay.
    fn forget_recent_keys(&mut self) {
        while let Some((at, _)) = self.recent_order.front() {
            if at.elapsed() < RECENT_KEYS_FOR {
                break;
            }
            let Some((_, key)) = self.recent_order.pop_front() else {
                break;
            };
            match self.recent_keys.get(&key) {
                Some(None) => self.recent_order.push_back((Instant::now(), key)),
                Some(Some(_)) => {
                    self.recent_keys.remove(&key);
                }
                None => {}
            }
        }
    }

    /// Puts a group's delivery counts and settings in the deliveries bucket
    /// (without waiting: a later put of the group lands after it).
    fn put_deliveries(&self, topic: &str, group: &str) {
        let (Some((kv, _)), Some(key), Some(value)) = (
            &self.cfg.deliveries,
            layout::cursor_key(topic, group),
            self.deliveries.get(&(Arc::from(topic), Arc::from(group))),
        ) else {
            return;
        };
        let value = serde_json::to_vec(value).unwrap_or_default();
        if let Err(e) = kv.put_start(&key, &value) {
            crate::log_limited!(
                log::Level::Warn,
                "cannot store the delivery counts of {topic}/{group}: {e}"
            );
        }
    }

    /// Changes a group's counts or settings (read back from the bucket the
    /// first time) and puts them; nothing for a topic that is gone.
    fn update_deliveries(
        &mut self,
        topic: &Arc<str>,
        group: &Arc<str>,
        change: impl FnOnce(&mut layout::DeliveriesValue),
    ) {
        if !self.knows_topic(topic) {
            return;
        }
        self.seed_deliveries(topic, group);
        change(
            self.deliveries
                .entry((topic.clone(), group.clone()))
                .or_default(),
        );
        self.put_deliveries(topic, group);
    }

    /// Reads a group's counts from the bucket the first time this writer
    /// writes them (another gateway may have counted before), so a put
    /// never drops what it stored.
    fn seed_deliveries(&mut self, topic: &Arc<str>, group: &Arc<str>) {
        let k = (topic.clone(), group.clone());
        if self.deliveries.contains_key(&k) {
            return;
        }
        let (Some((kv, _)), Some(key)) = (&self.cfg.deliveries, layout::cursor_key(topic, group))
        else {
            return;
        };
        let stored = kv
            .get(&key)
            .ok()
            .flatten()
            .and_then(|e| serde_json::from_slice::<layout::DeliveriesValue>(&e.value).ok());
        self.deliveries.insert(k, stored.unwrap_or_default());
    }

    /// A group's cursor moved: its counts at or below it are forgotten (a
    /// reset forgets them all).
    fn cursor_moved(&mut self, topic: &Arc<str>, group: &Arc<str>, seq: u64, reset: bool) {
        let Some(d) = self.deliveries.get_mut(&(topic.clone(), group.clone())) else {
            return;
        };
        let before = d.counts.len();
        if reset {
            d.counts.clear();
            d.delivered_max = 0;
        } else {
            d.counts.retain(|&(s, _)| s > seq);
            if d.counts.len() == before {
                return;
            }
        }
        self.put_deliveries(topic, group);
    }

    /// A deleted group's (or topic's) counts go from memory and the bucket.
    fn forget_deliveries(&mut self, topic: &Arc<str>, group: &Arc<str>) {
        if self
            .deliveries
            .remove(&(topic.clone(), group.clone()))
            .is_none()
        {
            return;
        }
        if let (Some((kv, _)), Some(key)) = (&self.cfg.deliveries, layout::cursor_key(topic, group))
        {
            if let Err(e) = kv.delete(&key) {
                log::warn!("cannot delete the delivery counts of {topic}/{group}: {e}");
            }
        }
    }

    /// The message stored under an idempotency key within the window:
    /// (sequence, timestamp).
    fn stored_key(
        &self,
        topic: &str,
        kv_key: &str,
        now_ms: i64,
    ) -> Result<Option<(u64, i64)>, StorageError> {
        let Some(kv) = &self.cfg.keys else {
            return Ok(None);
        };
        let entry = kv.get(kv_key).map_err(|e| {
            storage_error(&format!("cannot read the idempotency keys of {topic}"), &e)
        })?;
        let cutoff = now_ms.saturating_sub(self.cfg.dedup_window.as_millis() as i64);
        Ok(entry
            .and_then(|e| serde_json::from_slice::<layout::KeyValue>(&e.value).ok())
            .filter(|v| v.ts >= cutoff)
            .map(|v| (v.seq, v.ts)))
    }

    fn start_append(
        &mut self,
        token: u64,
        topic: Arc<str>,
        ts: i64,
        messages: Vec<crate::storage::NewMessage>,
    ) -> PendingAppend {
        let mut p = PendingAppend {
            token,
            topic: topic.clone(),
            ts,
            messages: Vec::new(),
            tickets: Vec::new(),
            failed: None,
            sent: Instant::now(),
            duplicates: Vec::new(),
            repeats: Vec::new(),
            waits: Vec::new(),
            dead_letter: None,
        };
        if let Some(why) = self.status.unavailable_reason() {
            p.failed = Some(StorageError {
                unavailable: true,
                ..StorageError::new(why)
            });
            return p;
        }
        if let Err(e) = self.ensure_topic(&topic, ts) {
            p.failed = Some(e);
            return p;
        }
        let Some(subject) = self.layout.subject(&topic) else {
            p.failed = Some(StorageError::new(format!("invalid topic name {topic:?}")));
            return p;
        };
        // Keys first: a message whose key is stored (or repeats an earlier
        // one of the call) is not sent and takes no ordinal.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(messages.len());
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let created_at_ms = self.topics.get(&topic).map_or(0, |t| t.created_at_ms);
        for (index, m) in messages.iter().enumerate() {
            let Some(key) = m.idempotency_key.as_deref() else {
                keys.push(None);
                continue;
            };
            let Some(kv_key) = layout::idempotency_key(&topic, created_at_ms, key) else {
                p.failed = Some(StorageError::new(format!("invalid topic name {topic:?}")));
                return p;
            };
            if let Some(&first) = first_of.get(&kv_key) {
                p.repeats.push((index, first));
                keys.push(None);
                continue;
            }
            match self.recent_keys.get(&kv_key) {
                Some(None) => {
                    p.waits.push((index, kv_key));
                    keys.push(None);
                    continue;
                }
                Some(Some((sequence, timestamp_ms))) => {
                    p.duplicates.push(Duplicate {
                        index,
                        sequence: *sequence,
                        id: MessageId::new(*timestamp_ms, *sequence, &topic),
                        timestamp_ms: *timestamp_ms,
                    });
                    keys.push(None);
                    continue;
                }
                None => {}
            }
            match self.stored_key(&topic, &kv_key, ts) {
                Ok(Some((sequence, timestamp_ms))) => {
                    p.duplicates.push(Duplicate {
                        index,
                        sequence,
                        id: MessageId::new(timestamp_ms, sequence, &topic),
                        timestamp_ms,
                    });
                    keys.push(None);
                }
                Ok(None) => {
                    first_of.insert(kv_key.clone(), index);
                    self.recent_keys.insert(kv_key.clone(), None);
                    self.recent_order
                        .push_back((Instant::now(), kv_key.clone()));
                    keys.push(Some(kv_key));
                }
                Err(e) => {
                    p.failed = Some(e);
                    return p;
                }
            }
        }
        let skipped: HashSet<usize> = p
            .duplicates
            .iter()
            .map(|d| d.index)
            .chain(p.repeats.iter().map(|r| r.0))
            .chain(p.waits.iter().map(|w| w.0))
            .collect();
        let Some(counters) = self.topics.get_mut(&topic) else {
            p.failed = Some(StorageError::new("topic vanished"));
            return p;
        };
        for ((index, m), key) in messages.into_iter().enumerate().zip(keys) {
            if skipped.contains(&index) {
                continue;
            }
            counters.next_ordinal += 1;
            let ordinal = counters.next_ordinal;
            let mut headers = layout::message_headers(ts, ordinal, &m.attributes);
            let msg_id = match &key {
                // JetStream itself deduplicates a key within its duplicate
                // window (a concurrent publish on another gateway).
                Some(k) => format!("k:{k}"),
                // Unique per publish: this process's random prefix and a counter.
                None => {
                    self.next_msg_id += 1;
                    format!("{}{}", self.msg_id_prefix, self.next_msg_id)
                }
            };
            headers.insert(MSG_ID_HEADER, msg_id);
            p.messages.push(Outgoing {
                subject: subject.clone(),
                headers,
                payload: m.payload,
                ordinal,
                attributes: m.attributes,
                index,
                key,
            });
        }
        for m in &p.messages {
            p.tickets.push(self.js.publish_start(&outgoing(m)));
        }
        p
    }

    /// Collects one request's acks (retrying what may be retried) and pushes
    /// its outcome; true when a publish failed or had to be sent again.
    fn finish_one(&mut self, p: Pending, out: &mut Vec<WriteOutcome>) -> bool {
        match p {
            Pending::Append(mut a) => {
                let sent = a.sent;
                let topic = a.topic.clone();
                let dead_letter = a.dead_letter.take();
                let (outcome, disturbed, orphans) = self.finish_append(a);
                if disturbed {
                    self.resync.insert(topic);
                }
                if let WriteOutcome::Appended { result: Ok(a), .. } = &outcome {
                    // JetStream's "group commit": this call's messages on a quorum.
                    self.telemetry
                        .metrics()
                        .committed(a.messages.len() as u64, sent.elapsed());
                }
                // A failed call's stored messages are real: the broker hears
                // of them (subscribers must not skip them).
                if let (false, WriteOutcome::Appended { topic, .. }) =
                    (orphans.is_empty(), &outcome)
                {
                    let created_at_ms = self.topics.get(topic).map_or(0, |t| t.created_at_ms);
                    out.push(WriteOutcome::Committed {
                        topic: topic.clone(),
                        created_at_ms,
                        messages: orphans,
                    });
                }
                match dead_letter {
                    Some(dl) => self.dead_lettered(dl, outcome, out),
                    None => out.push(outcome),
                }
                disturbed
            }
            Pending::Cursor(c) => {
                let result = c.ticket.and_then(|t| t.wait());
                match result {
                    Ok(_) => {
                        // An older failed write of the group must not go again.
                        self.carry.remove(&(c.topic.clone(), c.group.clone()));
                        let ordinal = self.ordinal_at(&c.topic, c.sequence, c.token.is_some());
                        if c.token.is_some() {
                            // A ResetCursor: the group's consumer may be on another gateway.
                            self.publish_admin(AdminChange::CursorReset {
                                topic: c.topic.to_string(),
                                group: c.group.to_string(),
                                sequence: c.sequence,
                            });
                        }
                        out.push(WriteOutcome::CursorSaved {
                            token: c.token,
                            topic: c.topic,
                            group: c.group,
                            sequence: c.sequence,
                            ordinal,
                        });
                    }
                    Err(e) => {
                        let error = storage_error("cannot store the cursor", &e);
                        match c.token {
                            Some(token) => out.push(WriteOutcome::CursorFailed {
                                token,
                                topic: c.topic,
                                group: c.group,
                                error,
                            }),
                            None => {
                                // Only when no later write of the group is
                                // in flight: that one is newer.
                                let newer = self.inflight.iter().any(|p| {
                                    matches!(p, Pending::Cursor(n) if n.topic == c.topic && n.group == c.group)
                                });
                                if !newer {
                                    crate::log_limited!(
                                        log::Level::Warn,
                                        "{}; trying again soon",
                                        error.message
                                    );
                                    self.carry
                                        .insert((c.topic, c.group), (c.sequence, c.acked_at_ms));
                                }
                            }
                        }
                    }
                }
                false
            }
        }
    }

    /// The call's outcome, whether anything failed (even if a resend then
    /// worked), and, when the call failed, the messages stored anyway.
    fn finish_append(&mut self, a: PendingAppend) -> (WriteOutcome, bool, Vec<Arc<StoredMessage>>) {
        let PendingAppend {
            token,
            topic,
            ts,
            messages,
            tickets,
            failed,
            sent: started,
            mut duplicates,
            repeats,
            waits,
            dead_letter: _,
        } = a;
        if let Some(e) = failed {
            let outcome = WriteOutcome::Appended {
                token,
                topic,
                result: Err(e),
            };
            return (outcome, false, Vec::new());
        }
        // An earlier call stored these keys (or failed to: then so does this).
        let mut error = None;
        for (index, key) in waits {
            match self.recent_keys.get(&key) {
                Some(Some((sequence, timestamp_ms))) => duplicates.push(Duplicate {
                    index,
                    sequence: *sequence,
                    id: MessageId::new(*timestamp_ms, *sequence, &topic),
                    timestamp_ms: *timestamp_ms,
                }),
                _ => {
                    error.get_or_insert_with(|| {
                        JetStreamError::Decode(
                            "a concurrent publish of the same idempotency key failed".into(),
                        )
                    });
                }
            }
        }
        let mut acks: Vec<Result<PubAck, JetStreamError>> = tickets
            .into_iter()
            .map(|t| t.and_then(|t| t.wait()))
            .collect();
        let mut disturbed = acks.iter().any(Result::is_err);
        // Retry, in order and with the same msg ids, what may have failed
        // only for now.
        for (i, ack) in acks.iter_mut().enumerate() {
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = ack {
                let left = self.cfg.retry_for.saturating_sub(started.elapsed());
                if !e.is_transient() || self.status.is_unavailable() || left.is_zero() {
                    break;
                }
                // A lost connection is replaced by one to another server.
                if !self.js.client().is_connected()
                    && !self
                        .js
                        .client()
                        .wait_connected(left.min(Duration::from_secs(1)))
                {
                    continue;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
                *ack = self
                    .js
                    .publish_start(&outgoing(&messages[i]))
                    .and_then(|t| t.wait());
            }
        }
        let mut stored = Vec::with_capacity(messages.len());
        // index in the call -> (sequence, timestamp), for repeated keys.
        let mut placed: HashMap<usize, (u64, i64)> = HashMap::new();
        for (m, ack) in messages.into_iter().zip(acks) {
            let ack = match ack {
                Ok(ack) if ack.duplicate && m.key.is_some() => {
                    // JetStream had the key: another gateway stored it just
                    // before, or this is our own resend of the message.
                    match self.original(&topic, &m, ack.seq, ts) {
                        Ok(None) => Ok(ack),
                        Ok(Some(original_ts)) => {
                            // Its ordinal was taken but nothing stored under
                            // it: the topic's numbering is read back before
                            // the next message takes one (else a gap counts).
                            disturbed = true;
                            if let Some(key) = &m.key {
                                self.recent_keys
                                    .insert(key.clone(), Some((ack.seq, original_ts)));
                            }
                            placed.insert(m.index, (ack.seq, original_ts));
                            duplicates.push(Duplicate {
                                index: m.index,
                                sequence: ack.seq,
                                id: MessageId::new(original_ts, ack.seq, &topic),
                                timestamp_ms: original_ts,
                            });
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            match ack {
                Ok(ack) => {
                    self.status.acked(ack.seq);
                    placed.insert(m.index, (ack.seq, ts));
                    if let Some(key) = &m.key {
                        self.recent_keys.insert(key.clone(), Some((ack.seq, ts)));
                        if let Some(kv) = &self.cfg.keys {
                            let value = serde_json::to_vec(&layout::KeyValue { seq: ack.seq, ts })
                                .unwrap_or_default();
                            if let Err(e) = kv.put_start(key, &value) {
                                crate::log_limited!(
                                    log::Level::Warn,
                                    "cannot store an idempotency key of {topic}: {e}"
                                );
                            }
                        }
                    }
                    stored.push(Arc::new(StoredMessage {
                        sequence: ack.seq,
                        ordinal: m.ordinal,
                        id: MessageId::new(ts, ack.seq, &topic),
                        timestamp_ms: ts,
                        payload: m.payload,
                        attributes: m.attributes,
                    }));
                }
                Err(e) => {
                    if let Some(key) = &m.key {
                        self.recent_keys.remove(key);
                    }
                    if error.is_none() {
                        error = Some(e);
                    }
                }
            }
        }
        for (index, first) in repeats {
            if let Some(&(sequence, timestamp_ms)) = placed.get(&first) {
                duplicates.push(Duplicate {
                    index,
                    sequence,
                    id: MessageId::new(timestamp_ms, sequence, &topic),
                    timestamp_ms,
                });
            }
        }
        duplicates.sort_by_key(|d| d.index);
        let Some(counters) = self.topics.get_mut(&topic) else {
            let outcome = WriteOutcome::Appended {
                token,
                topic,
                result: Err(StorageError::new("topic vanished")),
            };
            return (outcome, true, stored);
        };
        for m in &stored {
            if counters.first_seq == 0 || m.sequence < counters.first_seq {
                counters.first_seq = m.sequence;
                counters.first_ordinal = m.ordinal;
            }
            counters.last_seq = counters.last_seq.max(m.sequence);
            counters.last_ordinal = counters.last_ordinal.max(m.ordinal);
            // Kept sorted by sequence (a resent message can come later).
            if counters.recent.back().is_none_or(|&(q, _)| q < m.sequence) {
                counters.recent.push_back((m.sequence, m.ordinal));
                if counters.recent.len() > RECENT_PER_TOPIC {
                    counters.recent.pop_front();
                }
            }
        }
        if let Some(e) = error {
            let stored_n = stored.len();
            let mut err = storage_error("publish to JetStream failed", &e);
            if stored_n > 0 {
                err.message.push_str(&format!(
                    " ({stored_n} of the call's messages were stored before it failed)"
                ));
            }
            let outcome = WriteOutcome::Appended {
                token,
                topic,
                result: Err(err),
            };
            return (outcome, true, stored);
        }
        let outcome = WriteOutcome::Appended {
            token,
            topic: topic.clone(),
            result: Ok(Appended {
                topic,
                created_at_ms: counters.created_at_ms,
                timestamp_ms: ts,
                messages: stored,
                announced: false,
                duplicates,
            }),
        };
        (outcome, disturbed, Vec::new())
    }

    /// Turns a dead-letter append's outcome into `DeadLettered`: its
    /// message is announced first (`Committed`). The cursor is not moved
    /// here (a KV put now could land after, and below, a newer one already
    /// sent): `advanced` is false, so the broker moves it past the message
    /// and persists it as any ack, in order.
    fn dead_lettered(
        &mut self,
        dl: DeadLetterOf,
        outcome: WriteOutcome,
        out: &mut Vec<WriteOutcome>,
    ) {
        let WriteOutcome::Appended { result, .. } = outcome else {
            return;
        };
        let result = result.map(|mut a| {
            if !a.messages.is_empty() {
                out.push(WriteOutcome::Committed {
                    topic: a.topic.clone(),
                    created_at_ms: a.created_at_ms,
                    messages: a.messages.clone(),
                });
            }
            a.announced = true;
            a
        });
        out.push(WriteOutcome::DeadLettered {
            topic: dl.topic,
            group: dl.group,
            sequence: dl.sequence,
            advanced: false,
            result,
        });
    }

    /// The timestamp of the message JetStream reported as already stored
    /// under `m`'s key, or None when that message is `m` itself (a resend).
    fn original(
        &self,
        topic: &str,
        m: &Outgoing,
        seq: u64,
        ts: i64,
    ) -> Result<Option<i64>, JetStreamError> {
        let stored = self
            .js
            .get_message(self.layout.stream(), MessageSelector::Seq(seq))?
            .ok_or_else(|| {
                JetStreamError::Decode(format!(
                    "the message {seq} stored under an idempotency key of {topic} is gone"
                ))
            })?;
        let meta = layout::message_meta(stored.headers.as_ref()).map_err(JetStreamError::Decode)?;
        if meta.timestamp_ms == ts && meta.ordinal == m.ordinal {
            return Ok(None);
        }
        Ok(Some(meta.timestamp_ms))
    }

    /// Finds topics whose oldest messages JetStream removed (retention
    /// limits) and reports their new first message. One request for the
    /// stream's per-subject counts, then one per topic that shrank.
    fn check_trims(&mut self, counts: &super::monitor::SubjectCounts) -> Vec<WriteOutcome> {
        let mut out = Vec::new();
        for (topic, t) in self.topics.iter_mut() {
            if t.first_seq == 0 {
                continue;
            }
            // What the topic held when the counts were taken: messages
            // stored since then are not in them.
            let last_then = if t.last_seq <= counts.last_seq {
                Some(t.last_ordinal)
            } else {
                let i = t.recent.partition_point(|(q, _)| *q <= counts.last_seq);
                match (i, t.recent.front()) {
                    // Every message this process stored is still in `recent`
                    // (none dropped yet): the one before its first.
                    (0, Some(&(_, o))) if t.recent.len() < RECENT_PER_TOPIC => {
                        Some(o.saturating_sub(1))
                    }
                    (0, _) => None,
                    (i, _) => t.recent.get(i - 1).map(|&(_, o)| o),
                }
            };
            let Some(last_then) = last_then else {
                continue; // unknown for now: next time
            };
            let held = (last_then + 1).saturating_sub(t.first_ordinal);
            let Some(subject) = self.layout.subject(topic) else {
                continue;
            };
            let now = counts.subjects.get(&subject).copied().unwrap_or(0);
            if now >= held {
                continue;
            }
            let first = if now == 0 {
                None
            } else {
                match self.js.get_message(
                    self.layout.stream(),
                    MessageSelector::NextBySubject {
                        seq: t.first_seq,
                        subject: &subject,
                    },
                ) {
                    Ok(Some(m)) => match layout::message_meta(m.headers.as_ref()) {
                        Ok(meta) => Some((m.seq, meta.ordinal, meta.timestamp_ms)),
                        Err(_) => continue,
                    },
                    Ok(None) => None,
                    Err(_) => continue,
                }
            };
            let removed = match first {
                Some((seq, ordinal, _)) => {
                    let removed = ordinal.saturating_sub(t.first_ordinal);
                    t.first_seq = seq;
                    t.first_ordinal = ordinal;
                    removed
                }
                None => {
                    let removed = held;
                    t.first_seq = 0;
                    t.first_ordinal = t.last_ordinal + 1;
                    removed
                }
            };
            t.recent
                .retain(|&(q, _)| first.is_some_and(|(s, _, _)| q >= s));
            out.push(WriteOutcome::Trimmed {
                topic: topic.clone(),
                first,
                removed,
            });
        }
        out
    }

    /// The ordinal of the topic's newest message at or before `seq` (0 when
    /// none): from memory near the tail, else (when `exact` or the answer
    /// matters) from the stream.
    fn ordinal_at(&self, topic: &str, seq: u64, exact: bool) -> u64 {
        let Some(t) = self.topics.get(topic) else {
            return 0;
        };
        if t.first_seq == 0 || seq < t.first_seq {
            return t.first_ordinal.saturating_sub(1);
        }
        if seq >= t.last_seq {
            return t.last_ordinal;
        }
        let i = t.recent.partition_point(|(q, _)| *q <= seq);
        if i > 0 && (i < t.recent.len() || !exact) {
            if let Some(&(_, o)) = t.recent.get(i - 1) {
                return o;
            }
        }
        // The first message after `seq` names the position.
        let Some(subject) = self.layout.subject(topic) else {
            return 0;
        };
        match self.js.get_message(
            self.layout.stream(),
            MessageSelector::NextBySubject {
                seq: seq + 1,
                subject: &subject,
            },
        ) {
            Ok(Some(m)) => layout::message_meta(m.headers.as_ref())
                .map(|meta| meta.ordinal.saturating_sub(1))
                .unwrap_or(0),
            Ok(None) => t.last_ordinal,
            Err(e) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "cannot look up the position of {topic} sequence {seq}: {e}"
                );
                0
            }
        }
    }

    /// Stores a group's cursor now (true when it was stored).
    fn store_cursor_now(&self, topic: &str, group: &str, seq: u64, acked_at_ms: i64) -> bool {
        let Some(key) = layout::cursor_key(topic, group) else {
            return false;
        };
        let value = serde_json::to_vec(&CursorValue {
            seq,
            acked_at_ms,
            gateway: self.cfg.gateway.clone(),
        })
        .unwrap_or_default();
        match self.cursors_kv.put(&key, &value) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("cannot store the cursor of {topic}/{group} before releasing it: {e}");
                false
            }
        }
    }

    /// Tells the other gateways (through the stream, in order with the
    /// messages) about a change made here.
    fn publish_admin(&self, change: AdminChange) {
        let event = AdminEvent {
            origin: self.cfg.gateway.clone(),
            change,
        };
        let Ok(body) = serde_json::to_vec(&event) else {
            return;
        };
        if let Err(e) = self.js.publish(&self.layout.admin_subject(), None, &body) {
            log::warn!(
                "cannot tell the other gateways about {:?}: {e}; streams on them are not told (new ones see the change)",
                event.change
            );
        }
    }

    fn delete_topic(&mut self, topic: &Arc<str>) -> Result<bool, StorageError> {
        let (Some(subject), Some(key)) = (self.layout.subject(topic), layout::topic_key(topic))
        else {
            return Ok(false);
        };
        // The cursors and the registry entry first, the messages last: a
        // failure part-way leaves the messages (and says so).
        let registered = self
            .topics_kv
            .get(&key)
            .map_err(|e| storage_error("cannot read the topic registry", &e))?
            .is_some();
        let cursors = self
            .cursors_kv
            .keys(&key, usize::MAX)
            .map_err(|e| storage_error("cannot list the topic's cursors", &e))?;
        for k in cursors {
            self.cursors_kv
                .purge(&k)
                .map_err(|e| storage_error("cannot delete a cursor", &e))?;
        }
        if registered {
            self.topics_kv
                .purge(&key)
                .map_err(|e| storage_error("cannot unregister the topic", &e))?;
        }
        let purged = self
            .js
            .purge_subject(self.layout.stream(), &subject)
            .map_err(|e| storage_error("cannot purge the topic", &e))?;
        self.carry.retain(|(t, _), _| t != topic);
        let known = self.topics.remove(topic).is_some();
        Ok(known || registered || purged > 0)
    }

    fn delete_group(&mut self, topic: &Arc<str>, group: &Arc<str>) -> Result<bool, StorageError> {
        self.carry.remove(&(topic.clone(), group.clone()));
        let Some(key) = layout::cursor_key(topic, group) else {
            return Ok(false);
        };
        let existed = self
            .cursors_kv
            .get(&key)
            .map_err(|e| storage_error("cannot read the cursor", &e))?
            .is_some();
        if existed {
            self.cursors_kv
                .purge(&key)
                .map_err(|e| storage_error("cannot delete the cursor", &e))?;
        }
        Ok(existed)
    }
}

/// A retried publish is stored after messages sent later, so the calls of a
/// batch can hold a topic's sequences out of order; the broker must learn of
/// each topic's messages in ascending order (live subscribers move forward
/// only). For each topic where that is not already so, one `Committed` with
/// the topic's messages sorted goes before its first `Appended`, and its
/// `Appended` outcomes only answer their calls. (The announcer orders every
/// message by sequence itself since several gateways share a store, so this
/// is now belt and braces; removing it is left for a change of its own.)
fn announce_in_sequence_order(outcomes: Vec<WriteOutcome>) -> Vec<WriteOutcome> {
    let mut last: HashMap<Arc<str>, u64> = HashMap::new();
    let mut disordered: HashSet<Arc<str>> = HashSet::new();
    for o in &outcomes {
        match o {
            WriteOutcome::Appended { result: Ok(a), .. } => {
                let prev = last.entry(a.topic.clone()).or_insert(0);
                for m in &a.messages {
                    if m.sequence <= *prev {
                        disordered.insert(a.topic.clone());
                    }
                    *prev = (*prev).max(m.sequence);
                }
            }
            // Stored messages of failed calls: merged with the rest.
            WriteOutcome::Committed { topic, .. } => {
                disordered.insert(topic.clone());
            }
            _ => {}
        }
    }
    if disordered.is_empty() {
        return outcomes;
    }
    let mut sorted: HashMap<Arc<str>, (i64, Vec<Arc<StoredMessage>>)> = HashMap::new();
    for o in &outcomes {
        let (topic, created_at_ms, messages) = match o {
            WriteOutcome::Appended { result: Ok(a), .. } => {
                (&a.topic, a.created_at_ms, &a.messages)
            }
            WriteOutcome::Committed {
                topic,
                created_at_ms,
                messages,
            } => (topic, *created_at_ms, messages),
            _ => continue,
        };
        if disordered.contains(topic) {
            let e = sorted
                .entry(topic.clone())
                .or_insert((created_at_ms, Vec::new()));
            e.1.extend(messages.iter().cloned());
        }
    }
    let mut out = Vec::with_capacity(outcomes.len() + sorted.len());
    for mut o in outcomes {
        let topic = match &o {
            WriteOutcome::Appended { result: Ok(a), .. } => a.topic.clone(),
            WriteOutcome::Committed { topic, .. } => topic.clone(),
            _ => {
                out.push(o);
                continue;
            }
        };
        if !disordered.contains(&topic) {
            out.push(o);
            continue;
        }
        // The topic's one sorted announcement goes where its first
        // message was.
        if let Some((created_at_ms, mut messages)) = sorted.remove(&topic) {
            messages.sort_by_key(|m| m.sequence);
            messages.dedup_by_key(|m| m.sequence);
            out.push(WriteOutcome::Committed {
                topic: topic.clone(),
                created_at_ms,
                messages,
            });
        }
        if let WriteOutcome::Appended { result: Ok(a), .. } = &mut o {
            a.announced = true;
            out.push(o);
        }
    }
    out
}

fn outgoing(m: &Outgoing) -> OutgoingMessage<'_> {
    OutgoingMessage {
        subject: &m.subject,
        msg_id: None,
        headers: Some(&m.headers),
        payload: &m.payload,
    }
}

/// Indexes of caller-less cursor writes that a later one for the same group
/// replaces before any delete in between: only the last is sent.
fn superseded_cursor_writes(batch: &[WriteRequest]) -> HashSet<usize> {
    let mut later: HashSet<(&str, &str)> = HashSet::new();
    let mut out = HashSet::new();
    for (i, req) in batch.iter().enumerate().rev() {
        if let WriteRequest::SetCursor {
            topic,
            group,
            token,
            ..
        } = req
        {
            // A later write for the group (any) replaces a caller-less one.
            let replaced = !later.insert((topic, group));
            if replaced && token.is_none() {
                out.insert(i);
            }
        } else if matches!(
            req,
            WriteRequest::DeleteTopic { .. } | WriteRequest::DeleteGroup { .. }
        ) {
            later.clear();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(topic: &str, group: &str, seq: u64, token: Option<u64>) -> WriteRequest {
        WriteRequest::SetCursor {
            topic: topic.into(),
            group: group.into(),
            sequence: seq,
            acked_at_ms: 0,
            token,
        }
    }

    fn appended(token: u64, topic: &str, seqs: &[u64]) -> WriteOutcome {
        WriteOutcome::Appended {
            token,
            topic: topic.into(),
            result: Ok(Appended {
                topic: topic.into(),
                created_at_ms: 1,
                timestamp_ms: 1,
                messages: seqs
                    .iter()
                    .map(|&s| {
                        Arc::new(StoredMessage {
                            sequence: s,
                            ordinal: s,
                            id: MessageId::new(1, s, topic),
                            timestamp_ms: 1,
                            payload: Bytes::new(),
                            attributes: HashMap::new(),
                        })
                    })
                    .collect(),
                announced: false,
                duplicates: Vec::new(),
            }),
        }
    }

    /// The sequences of each `Committed` outcome.
    fn committed_seqs(out: &[WriteOutcome]) -> Vec<Vec<u64>> {
        out.iter()
            .filter_map(|o| match o {
                WriteOutcome::Committed { messages, .. } => {
                    Some(messages.iter().map(|m| m.sequence).collect())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn calls_stored_out_of_order_are_announced_sorted_first() {
        // In order: passed through untouched.
        let out =
            announce_in_sequence_order(vec![appended(1, "t", &[1, 2]), appended(2, "t", &[3])]);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|o| matches!(o, WriteOutcome::Appended { result: Ok(a), .. } if !a.announced)));
        // Call 1's second message was retried and stored after call 2's.
        let out = announce_in_sequence_order(vec![
            appended(1, "t", &[10, 13]),
            appended(2, "u", &[11]),
            appended(3, "t", &[12]),
        ]);
        let seqs = committed_seqs(&out);
        assert_eq!(seqs, vec![vec![10, 12, 13]]);
        assert!(matches!(&out[0], WriteOutcome::Committed { topic, .. } if &**topic == "t"));
        let announced: Vec<(u64, bool)> = out
            .iter()
            .filter_map(|o| match o {
                WriteOutcome::Appended {
                    token,
                    result: Ok(a),
                    ..
                } => Some((*token, a.announced)),
                _ => None,
            })
            .collect();
        // The calls are answered in their order; only topic t's were announced.
        assert_eq!(announced, vec![(1, true), (2, false), (3, true)]);

        // A failed call stored 21 before failing: announced with the rest.
        let Some(WriteOutcome::Appended {
            result: Ok(orphans),
            ..
        }) = [appended(0, "t", &[21])].into_iter().next()
        else {
            unreachable!()
        };
        let out = announce_in_sequence_order(vec![
            appended(1, "t", &[20]),
            WriteOutcome::Committed {
                topic: "t".into(),
                created_at_ms: 1,
                messages: orphans.messages,
            },
            WriteOutcome::Appended {
                token: 2,
                topic: "t".into(),
                result: Err(StorageError::new("failed after one")),
            },
            appended(3, "t", &[22]),
        ]);
        let committed = committed_seqs(&out);
        assert_eq!(committed, vec![vec![20, 21, 22]]);
        assert_eq!(out.len(), 4, "{out:?}");
    }

    #[test]
    fn only_the_last_caller_less_cursor_write_per_group_is_sent() {
        let batch = vec![
            cursor("t", "g", 1, None),
            cursor("t", "h", 1, None),
            cursor("t", "g", 2, None),
            WriteRequest::DeleteGroup {
                token: 9,
                topic: "t".into(),
                group: "h".into(),
            },
            cursor("t", "g", 3, None),
            cursor("t", "g", 4, Some(7)),
        ];
        let s = superseded_cursor_writes(&batch);
        let mut v: Vec<usize> = s.into_iter().collect();
        v.sort();
        // 0 is replaced by 2; 4 by the reset at 5 (which is always sent).
        assert_eq!(v, vec![0, 4]);
    }
}
