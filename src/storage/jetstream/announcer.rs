//! The JetStream store's announcer: the one place where this gateway's
//! broker hears of stored messages, in stream order, whoever stored them
//! (this gateway's writer, another gateway, a publish of ours whose ack
//! never came), and where the writer's outcomes are released to the
//! reactor in their order, each `Appended` only once its messages are
//! announced (a caller that got its ack sees its messages in
//! `GetTopicStats`; live subscribers never skip one).
//!
//! Two threads feed it and either may hand the result to the reactor: the
//! writer with what it acked (an acked message whose predecessors are all
//! announced goes at once, so a gateway alone costs no extra hop), and the
//! follower with what it read of the stream (filling the holes: other
//! gateways' messages, admin events, publishes whose ack never came).
//! `Sequencer` is the state behind one mutex; emitting while holding it
//! keeps the order.
//!
//! Calls `layout` and, for a topic created through another gateway, the
//! topic registry (KV); sends to the reactor's outcome channel plus `Wake`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;

use super::layout::{self, AdminChange, AdminEvent, CursorValue, Layout, TopicValue};
use super::status::StoreStatus;
use crate::broker::{MessageId, StoredMessage};
use crate::nats::kv_bucket::KvBucket;
use crate::nats::pull_consumer::PulledMessage;
use crate::storage::{send_waking, RemoteChange, Wake, WriteOutcome};

/// Longest an answer is held for a hole the read does not fill: then the
/// call is answered, and its messages are announced when the read gets to
/// them (never out of order, never skipping what was not read).
const HOLD_LIMIT: Duration = Duration::from_secs(3);

/// Topics (group None) and groups deleted through other gateways, for the
/// writer to forget (its topic cache, its failed cursor writes).
pub type Forgotten = Arc<Mutex<Vec<(Arc<str>, Option<Arc<str>>)>>>;

/// The reactor stopped listening.
#[derive(Debug)]
pub struct Closed;

/// What the sequencer starts from.
pub struct AnnouncerStart {
    /// This gateway's id (its own admin events and cursor puts are skipped).
    pub gateway: String,
    /// The stream's last sequence when the broker's state was loaded.
    pub last_seq: u64,
    /// The topics loaded, with their creation times.
    pub created: HashMap<Arc<str>, i64>,
    /// Most writer outcomes held back before the writer waits.
    pub held_cap: usize,
    /// Where deletes made through other gateways go for the writer.
    pub forgotten: Forgotten,
}

struct Sequencer {
    layout: Layout,
    /// The topic registry (None in unit tests: creation times default).
    topics_kv: Option<KvBucket>,
    status: Arc<StoreStatus>,
    gateway: String,
    /// Every sequence up to here is announced (or is not a message to
    /// announce).
    watermark: u64,
    /// The stream is read contiguously up to here.
    followed: u64,
    /// Acked by our writer, above the watermark: announced once it reaches them.
    acked: BTreeMap<u64, (Arc<str>, Arc<StoredMessage>)>,
    /// The highest sequence our writer has acked, and when it learned it.
    top: u64,
    top_at: Instant,
    /// Creation times of the topics this gateway knows.
    created: HashMap<Arc<str>, i64>,
    /// The writer's outcomes not yet released, oldest first.
    held: VecDeque<(Instant, WriteOutcome)>,
    held_cap: usize,
    writer_done: bool,
    forgotten: Forgotten,
    /// Ready for the reactor.
    out: Vec<WriteOutcome>,
}

struct Inner {
    state: Mutex<Sequencer>,
    room: Condvar,
    to_reactor: Sender<WriteOutcome>,
    wake: Wake,
}

/// A handle on the announcer; cheap to clone.
#[derive(Clone)]
pub struct Announcer {
    inner: Arc<Inner>,
}

impl Announcer {
    pub fn new(
        layout: Layout,
        topics_kv: Option<KvBucket>,
        status: Arc<StoreStatus>,
        start: AnnouncerStart,
        to_reactor: Sender<WriteOutcome>,
        wake: Wake,
    ) -> Announcer {
        let state = Sequencer {
            layout,
            topics_kv,
            status,
            gateway: start.gateway,
            watermark: start.last_seq,
            followed: start.last_seq,
            acked: BTreeMap::new(),
            top: start.last_seq,
            top_at: Instant::now(),
            created: start.created,
            held: VecDeque::new(),
            held_cap: start.held_cap.max(16),
            writer_done: false,
            forgotten: start.forgotten,
            out: Vec::new(),
        };
        Announcer {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                room: Condvar::new(),
                to_reactor,
                wake,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sequencer> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends what is ready (in order, under the lock) and wakes the reactor.
    fn emit(&self, s: &mut Sequencer) -> Result<(), Closed> {
        if s.out.is_empty() {
            return Ok(());
        }
        for o in s.out.drain(..) {
            if !send_waking(&self.inner.to_reactor, &self.inner.wake, o) {
                return Err(Closed);
            }
        }
        (self.inner.wake)();
        self.inner.room.notify_all();
        Ok(())
    }

    /// The writer's outcomes, in its order. Waits while too many answers
    /// are held for the stream read.
    pub fn from_writer(&self, outcomes: Vec<WriteOutcome>) -> Result<(), Closed> {
        let mut s = self.lock();
        while s.held.len() >= s.held_cap {
            let (guard, _) = self
                .inner
                .room
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s = guard;
            s.release(false);
            self.emit(&mut s)?;
        }
        for o in outcomes {
            s.absorb(o);
        }
        s.release(false);
        self.emit(&mut s)
    }

    /// Messages the stream read delivered, in stream order.
    pub fn from_stream(&self, messages: Vec<PulledMessage>) -> Result<(), Closed> {
        let mut s = self.lock();
        for m in messages {
            s.followed_one(m);
        }
        s.release(false);
        self.emit(&mut s)
    }

    /// A put on the topic registry or the cursors bucket.
    pub fn from_watch(
        &self,
        topic_key: Option<&str>,
        cursor_key: Option<&str>,
        payload: &[u8],
    ) -> Result<(), Closed> {
        let mut s = self.lock();
        if let Some(k) = topic_key {
            s.topic_put(k, payload);
        }
        if let Some(k) = cursor_key {
            s.cursor_put(k, payload);
        }
        self.emit(&mut s)
    }

    /// The stream read found nothing more on a request sent at
    /// `requested_at`: what our writer acked before then and the read did
    /// not see is gone (purged, trimmed), not still to come.
    pub fn read_at_end(&self, requested_at: Instant) -> Result<(), Closed> {
        let mut s = self.lock();
        if s.watermark < s.top && requested_at > s.top_at {
            while let Some((_, (topic, m))) = s.acked.pop_first() {
                s.watermark = m.sequence;
                s.announce(topic, m);
            }
            s.watermark = s.watermark.max(s.top);
            s.followed = s.followed.max(s.top);
        }
        s.release(false);
        self.emit(&mut s)
    }

    /// Releases answers held past `HOLD_LIMIT`.
    pub fn tick(&self) -> Result<(), Closed> {
        let mut s = self.lock();
        let all = s.writer_done;
        s.release(all);
        self.emit(&mut s)
    }

    /// The writer has stopped: everything it sent goes out now.
    pub fn writer_done(&self) -> Result<(), Closed> {
        let mut s = self.lock();
        s.writer_done = true;
        s.release(true);
        self.emit(&mut s)
    }

    pub fn is_writer_done(&self) -> bool {
        self.lock().writer_done
    }

    /// Whether the stream must be read for this gateway's own sake: an
    /// acked message or an answer waits for a sequence before it.
    pub fn has_holes(&self) -> bool {
        let s = self.lock();
        !s.acked.is_empty() || s.waiting_for_read() || s.watermark < s.top
    }

    /// Where a new stream read starts (everything before is announced or read).
    pub fn read_from(&self) -> u64 {
        let mut s = self.lock();
        s.followed = s.followed.max(s.watermark);
        s.followed + 1
    }
}

impl Sequencer {
    fn waiting_for_read(&self) -> bool {
        matches!(
            self.held.front(),
            Some((_, WriteOutcome::Appended { result: Ok(a), .. }))
                if a.messages.iter().any(|m| m.sequence > self.watermark)
        )
    }

    /// Takes one outcome of the writer: what it acked is known from now on.
    fn absorb(&mut self, o: WriteOutcome) {
        match o {
            // Messages stored out of call order (or by failed calls): known.
            WriteOutcome::Committed {
                topic,
                created_at_ms,
                messages,
            } => {
                self.created.entry(topic.clone()).or_insert(created_at_ms);
                for m in messages {
                    self.learn(&topic, m);
                }
                self.advance();
            }
            WriteOutcome::Appended {
                token,
                topic,
                result,
            } => {
                if let Ok(a) = &result {
                    self.created.entry(topic.clone()).or_insert(a.created_at_ms);
                    for m in &a.messages {
                        self.learn(&topic, m.clone());
                    }
                    self.advance();
                }
                self.held.push_back((
                    Instant::now(),
                    WriteOutcome::Appended {
                        token,
                        topic,
                        result,
                    },
                ));
            }
            WriteOutcome::TopicDeleted {
                token,
                topic,
                result,
            } => {
                if result.is_ok() {
                    self.created.remove(&topic);
                    self.acked.retain(|_, (t, _)| *t != topic);
                }
                self.held.push_back((
                    Instant::now(),
                    WriteOutcome::TopicDeleted {
                        token,
                        topic,
                        result,
                    },
                ));
            }
            other => self.held.push_back((Instant::now(), other)),
        }
    }

    fn learn(&mut self, topic: &Arc<str>, m: Arc<StoredMessage>) {
        if m.sequence > self.top {
            self.top = m.sequence;
            self.top_at = Instant::now();
        }
        if m.sequence > self.watermark {
            self.acked.insert(m.sequence, (topic.clone(), m));
        }
    }

    /// Announces acked messages that directly follow the watermark.
    fn advance(&mut self) {
        while let Some(entry) = self.acked.first_entry() {
            if *entry.key() != self.watermark + 1 {
                break;
            }
            let (topic, m) = entry.remove();
            self.watermark = m.sequence;
            self.announce(topic, m);
        }
    }

    fn announce(&mut self, topic: Arc<str>, m: Arc<StoredMessage>) {
        self.status.acked(m.sequence);
        // Runs of one topic go as one outcome.
        if let Some(WriteOutcome::Committed {
            topic: last,
            messages,
            ..
        }) = self.out.last_mut()
        {
            if *last == topic {
                messages.push(m);
                return;
            }
        }
        let created_at_ms = self.created_at(&topic, m.timestamp_ms);
        self.out.push(WriteOutcome::Committed {
            topic,
            created_at_ms,
            messages: vec![m],
        });
    }

    /// The creation time of a topic (looked up once for one created
    /// through another gateway).
    fn created_at(&mut self, topic: &Arc<str>, fallback: i64) -> i64 {
        if let Some(&c) = self.created.get(topic) {
            return c;
        }
        let stored = layout::topic_key(topic)
            .and_then(|key| self.topics_kv.as_ref()?.get(&key).ok().flatten())
            .and_then(|e| serde_json::from_slice::<TopicValue>(&e.value).ok())
            .map(|v| v.created_at_ms);
        let c = stored.unwrap_or(fallback);
        self.created.insert(topic.clone(), c);
        c
    }

    fn followed_one(&mut self, m: PulledMessage) {
        let seq = m.info.stream_seq;
        if seq <= self.followed {
            return;
        }
        self.followed = seq;
        if seq <= self.watermark {
            return; // announced from the writer's ack
        }
        // Acked messages the read passed without seeing were deleted since:
        // they were stored, so they are announced in their place.
        while let Some(entry) = self.acked.first_entry() {
            if *entry.key() >= seq {
                break;
            }
            let (topic, msg) = entry.remove();
            self.watermark = msg.sequence;
            self.announce(topic, msg);
        }
        self.watermark = seq;
        if let Some((topic, msg)) = self.acked.remove(&seq) {
            self.announce(topic, msg);
        } else if let Some(topic) = self.layout.topic_of(&m.subject) {
            let topic: Arc<str> = Arc::from(topic.as_str());
            match layout::message_meta(m.headers.as_ref()) {
                Ok(meta) => {
                    let msg = StoredMessage {
                        sequence: seq,
                        ordinal: meta.ordinal,
                        id: MessageId::new(meta.timestamp_ms, seq, &topic),
                        timestamp_ms: meta.timestamp_ms,
                        payload: Bytes::from(m.payload),
                        attributes: meta.attributes,
                    };
                    self.announce(topic, Arc::new(msg));
                }
                Err(e) => crate::log_limited!(
                    log::Level::Warn,
                    "follower: skipping message {seq} on {}: {e}",
                    m.subject
                ),
            }
        } else if m.subject == self.layout.admin_subject() {
            self.status.acked(seq);
            self.admin_event(seq, &m.payload);
        } else {
            self.status.acked(seq);
        }
        self.advance();
    }

    /// A put on the topic registry: a topic created through another gateway.
    fn topic_put(&mut self, key: &str, payload: &[u8]) {
        let Ok(topic) = crate::nats::subject_token::decode_topic(key) else {
            return;
        };
        let topic: Arc<str> = topic.into();
        if self.created.contains_key(&topic) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<TopicValue>(payload) else {
            return;
        };
        self.created.insert(topic.clone(), v.created_at_ms);
        self.out
            .push(WriteOutcome::Remote(RemoteChange::TopicCreated {
                topic,
                created_at_ms: v.created_at_ms,
            }));
    }

    /// A put on the cursors bucket: where a group's consumer (maybe on
    /// another gateway) has got to.
    fn cursor_put(&mut self, key: &str, payload: &[u8]) {
        let Some((topic, group)) = layout::parse_cursor_key(key) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<CursorValue>(payload) else {
            return;
        };
        if v.gateway == self.gateway {
            return; // our own write
        }
        self.out
            .push(WriteOutcome::Remote(RemoteChange::CursorMoved {
                topic: topic.into(),
                group: group.into(),
                sequence: v.seq,
                acked_at_ms: v.acked_at_ms,
            }));
    }

    fn forget(&self, topic: Arc<str>, group: Option<Arc<str>>) {
        let mut f = self
            .forgotten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: the writer drains it every batch; past this it is stale.
        if f.len() < 10_000 {
            f.push((topic, group));
        }
    }

    fn admin_event(&mut self, seq: u64, payload: &[u8]) {
        let event: AdminEvent = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("follower: skipping admin event {seq}: {e}");
                return;
            }
        };
        if event.origin == self.gateway {
            return;
        }
        let change = match event.change {
            AdminChange::TopicDeleted { topic } => {
                let topic: Arc<str> = topic.into();
                self.created.remove(&topic);
                self.forget(topic.clone(), None);
                RemoteChange::TopicDeleted { topic }
            }
            AdminChange::GroupDeleted { topic, group } => {
                let (topic, group): (Arc<str>, Arc<str>) = (topic.into(), group.into());
                self.forget(topic.clone(), Some(group.clone()));
                RemoteChange::GroupDeleted { topic, group }
            }
            AdminChange::CursorReset {
                topic,
                group,
                sequence,
            } => RemoteChange::CursorReset {
                topic: topic.into(),
                group: group.into(),
                sequence,
            },
        };
        log::info!(
            "applying a change made through gateway {}: {change:?}",
            event.origin
        );
        self.out.push(WriteOutcome::Remote(change));
    }

    /// Releases the writer's outcomes in order: an `Appended` once all its
    /// messages are announced (it then only answers its call). `all`: the
    /// writer is gone, release everything.
    fn release(&mut self, all: bool) {
        while let Some((since, head)) = self.held.front() {
            let waiting_for = match head {
                WriteOutcome::Appended { result: Ok(a), .. } => a
                    .messages
                    .iter()
                    .map(|m| m.sequence)
                    .max()
                    .filter(|&s| s > self.watermark),
                _ => None,
            };
            if let Some(upto) = waiting_for {
                if !all && since.elapsed() < HOLD_LIMIT {
                    break;
                }
                // The read has not filled the hole in time: the call is
                // answered now (its messages are stored), and its messages
                // are announced when the read reaches them, in order —
                // never skipping what the read has not seen. What we hold
                // of them is dropped: the read brings them back.
                crate::log_limited!(
                    log::Level::Warn,
                    "sequences up to {upto} not read back after {:?}: answering the call; its messages reach subscribers once the stream read catches up",
                    since.elapsed()
                );
                let keep = self.acked.split_off(&(upto + 1));
                self.acked = keep;
            }
            let Some((_, mut head)) = self.held.pop_front() else {
                break;
            };
            if let WriteOutcome::Appended { result: Ok(a), .. } = &mut head {
                a.announced = true;
            }
            self.out.push(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats::headers::Headers;
    use crate::nats::pull_consumer::DeliveryInfo;
    use crate::storage::Appended;
    use crossbeam_channel::Receiver;

    fn announcer() -> (Announcer, Receiver<WriteOutcome>) {
        let (tx, rx) = crossbeam_channel::bounded(1000);
        let a = Announcer::new(
            Layout::new("sluice"),
            None,
            Arc::new(StoreStatus::new(10)),
            AnnouncerStart {
                gateway: "me".into(),
                last_seq: 10,
                created: HashMap::new(),
                held_cap: 64,
                forgotten: Forgotten::default(),
            },
            tx,
            Arc::new(|| {}),
        );
        (a, rx)
    }

    fn stored(seq: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            sequence: seq,
            ordinal: seq,
            id: MessageId::new(1, seq, "t"),
            timestamp_ms: 1,
            payload: Bytes::from(format!("m{seq}")),
            attributes: HashMap::new(),
        })
    }

    fn appended(token: u64, seqs: &[u64]) -> WriteOutcome {
        WriteOutcome::Appended {
            token,
            topic: "t".into(),
            result: Ok(Appended {
                topic: "t".into(),
                created_at_ms: 1,
                timestamp_ms: 1,
                messages: seqs.iter().map(|&s| stored(s)).collect(),
                announced: false,
                duplicates: Vec::new(),
            }),
        }
    }

    fn pulled(seq: u64, subject: &str, payload: &[u8]) -> PulledMessage {
        let headers = if subject.starts_with("sluice.t.") {
            Some(layout::message_headers(1, seq, &HashMap::new()))
        } else {
            None::<Headers>
        };
        PulledMessage {
            subject: subject.into(),
            headers,
            payload: payload.to_vec(),
            info: DeliveryInfo {
                stream: "SLUICE".into(),
                consumer: "c".into(),
                delivered: 1,
                stream_seq: seq,
                consumer_seq: seq,
                timestamp_nanos: 0,
                pending: 0,
            },
        }
    }

    /// What the reactor got: "c:<seqs>" for announcements, "a<token>" for
    /// answers (all answers must be marked announced), "r" for remote changes.
    fn drain(rx: &Receiver<WriteOutcome>) -> Vec<String> {
        rx.try_iter()
            .map(|o| match o {
                WriteOutcome::Committed { messages, .. } => format!(
                    "c:{}",
                    messages
                        .iter()
                        .map(|m| m.sequence.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                WriteOutcome::Appended {
                    token,
                    result: Ok(a),
                    ..
                } => {
                    assert!(a.announced, "answer {token} not marked announced");
                    format!("a{token}")
                }
                WriteOutcome::Remote(_) => "r".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn own_acks_that_follow_the_watermark_go_at_once_announcement_first() {
        let (a, rx) = announcer();
        a.from_writer(vec![appended(1, &[11, 12]), appended(2, &[13])])
            .unwrap();
        assert_eq!(drain(&rx), ["c:11,12,13", "a1", "a2"]);
        assert!(!a.has_holes());
    }

    #[test]
    fn an_ack_behind_a_hole_waits_for_the_stream_read_which_fills_it_in_order() {
        let (a, rx) = announcer();
        // 11 was stored by another gateway; ours is 12.
        a.from_writer(vec![appended(1, &[12])]).unwrap();
        assert!(drain(&rx).is_empty(), "nothing before 11 is known");
        assert!(a.has_holes());
        assert_eq!(a.read_from(), 11);
        a.from_stream(vec![pulled(11, "sluice.t.t", b"theirs")])
            .unwrap();
        assert_eq!(drain(&rx), ["c:11,12", "a1"]);
        // The read goes on past what was acked: nothing twice.
        a.from_stream(vec![
            pulled(12, "sluice.t.t", b"m12"),
            pulled(13, "sluice.t.t", b"new"),
        ])
        .unwrap();
        assert_eq!(drain(&rx), ["c:13"]);
        assert!(!a.has_holes());
    }

    #[test]
    fn gaps_in_the_read_are_deleted_messages_and_acked_ones_are_still_announced() {
        let (a, rx) = announcer();
        a.from_writer(vec![appended(1, &[12]), appended(2, &[14])])
            .unwrap();
        // 11 deleted, 12 ours (then purged before the read reached it), 13
        // not a topic message (the gap subject), 14 ours.
        a.from_stream(vec![
            pulled(13, "sluice.gap", b""),
            pulled(15, "sluice.t.t", b"x"),
        ])
        .unwrap();
        assert_eq!(drain(&rx), ["c:12,14,15", "a1", "a2"]);
    }

    #[test]
    fn a_read_that_finds_nothing_more_closes_holes_left_by_purged_messages() {
        let (a, rx) = announcer();
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        // 11 is unknown; ours 12 waits for it.
        a.from_writer(vec![appended(1, &[12])]).unwrap();
        // An empty read sent before we learned of 12 proves nothing.
        a.read_at_end(before).unwrap();
        assert!(drain(&rx).is_empty());
        // One sent after it: 11 is not in the stream (purged); 12 goes.
        a.read_at_end(Instant::now()).unwrap();
        assert_eq!(drain(&rx), ["c:12", "a1"]);
        assert!(!a.has_holes());
        a.from_writer(vec![appended(2, &[13])]).unwrap();
        assert_eq!(drain(&rx), ["c:13", "a2"]);
    }

    #[test]
    fn admin_events_and_cursor_puts_of_other_gateways_become_remote_changes() {
        let (a, rx) = announcer();
        let event = |origin: &str| {
            serde_json::to_vec(&AdminEvent {
                origin: origin.into(),
                change: AdminChange::TopicDeleted { topic: "t".into() },
            })
            .unwrap()
        };
        a.from_stream(vec![
            pulled(11, "sluice.admin", &event("me")),
            pulled(12, "sluice.admin", &event("other")),
        ])
        .unwrap();
        assert_eq!(drain(&rx), ["r"], "our own event is not applied twice");
        let cursor = |gw: &str| {
            serde_json::to_vec(&CursorValue {
                seq: 5,
                acked_at_ms: 1,
                gateway: gw.into(),
            })
            .unwrap()
        };
        a.from_watch(None, Some("t.g"), &cursor("me")).unwrap();
        a.from_watch(None, Some("t.g"), &cursor("other")).unwrap();
        assert_eq!(drain(&rx), ["r"], "our own cursor put is skipped");
    }

    #[test]
    fn answers_keep_the_writers_order_behind_a_held_append() {
        let (a, rx) = announcer();
        a.from_writer(vec![
            appended(1, &[12]),
            WriteOutcome::Availability { unavailable: None },
        ])
        .unwrap();
        assert!(
            drain(&rx).is_empty(),
            "the availability change waits behind the held answer"
        );
        a.from_stream(vec![pulled(11, "sluice.t.t", b"x")]).unwrap();
        let got = drain(&rx);
        assert_eq!(got[..2], ["c:11,12", "a1"]);
        assert!(got[2].starts_with("Availability"), "{got:?}");
        // The writer stopping answers everything held; what the read has
        // not reached is announced when it does (13..19: deleted).
        a.from_writer(vec![appended(3, &[20])]).unwrap();
        assert!(drain(&rx).is_empty());
        a.writer_done().unwrap();
        assert_eq!(drain(&rx), ["a3"]);
        assert!(a.has_holes(), "the read must still reach 20");
        a.from_stream(vec![pulled(20, "sluice.t.t", b"m20")])
            .unwrap();
        assert_eq!(drain(&rx), ["c:20"]);
        assert!(!a.has_holes());
    }
}
