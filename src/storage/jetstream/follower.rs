//! The JetStream store's follower thread: reads every new message of the
//! stream in order (one ephemeral pull consumer, no filter) and is the only
//! path by which this gateway's broker hears of stored messages, whoever
//! stored them: this gateway's writer, another gateway, or a publish of
//! ours whose ack never came. It also stands between the writer and the
//! reactor: the writer's outcomes are released in their order, each
//! `Appended` only once its messages are announced, so a caller that got
//! its ack sees its messages in `GetTopicStats` and live subscribers never
//! skip one.
//!
//! Announcements go strictly in stream order. The writer's acks name
//! messages before the stream read reaches them: an acked message whose
//! predecessors are all announced goes at once (one gateway writing costs
//! no extra latency); one behind a hole (another gateway's message, not yet
//! read) waits for the read. Admin events on the admin subject from other
//! gateways become `WriteOutcome::Remote`.
//!
//! Calls `nats` (pull consumer, KV for topics created elsewhere) and
//! `layout`; answers over the reactor's outcome channel plus `Wake`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Select, Sender};

use super::layout::{self, AdminChange, AdminEvent, CursorValue, Layout, TopicValue};
use super::status::StoreStatus;
use crate::broker::{MessageId, StoredMessage};
use crate::nats::jetstream::JetStream;
use crate::nats::kv_bucket::KvBucket;
use crate::nats::pull_consumer::{
    ContinuousPull, DeliverFrom, PullConsumerConfig, Pulled, PulledMessage,
};
use crate::storage::{RemoteChange, Wake, WakeOnExit, WriteOutcome};

/// Messages asked for per pull request.
const PULL_BATCH: usize = 256;
/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Longest an answer is held for a hole the read does not fill: then what
/// the writer acked is announced anyway (and the read starts again).
const HOLD_LIMIT: Duration = Duration::from_secs(3);

/// Where a follower starts.
pub struct FollowerStart {
    /// This gateway's id in admin events.
    pub gateway: String,
    /// The stream's last sequence when the broker's state was loaded.
    pub last_seq: u64,
    /// The topics loaded, with their creation times.
    pub created: HashMap<Arc<str>, i64>,
    /// Most writer outcomes held back.
    pub held_cap: usize,
}

fn is_tombstone(m: &crate::nats::Message) -> bool {
    m.headers
        .as_ref()
        .and_then(|h| h.get(crate::nats::kv_bucket::KV_OPERATION_HEADER))
        .is_some()
}

pub struct Follower {
    js: JetStream,
    layout: Layout,
    topics_kv: KvBucket,
    cursors_bucket: String,
    status: Arc<StoreStatus>,
    /// This gateway's id in admin events (its own are skipped).
    gateway: String,
    /// Every sequence up to here is announced (or is not a message to
    /// announce).
    watermark: u64,
    /// The stream is read contiguously up to here.
    followed: u64,
    /// Acked by our writer, above the watermark: announced once it reaches them.
    acked: BTreeMap<u64, (Arc<str>, Arc<StoredMessage>)>,
    /// Creation times of the topics this gateway knows.
    created: HashMap<Arc<str>, i64>,
    /// The writer's outcomes not yet released, oldest first.
    held: VecDeque<(Instant, WriteOutcome)>,
    /// Most outcomes held before the writer is made to wait.
    held_cap: usize,
    pull: Option<ContinuousPull>,
    retry_at: Instant,
    /// Announcements ready for the reactor.
    out: Vec<WriteOutcome>,
}

impl Follower {
    pub fn new(
        js: JetStream,
        layout: Layout,
        (topics_kv, cursors_bucket): (KvBucket, String),
        status: Arc<StoreStatus>,
        start: FollowerStart,
    ) -> Self {
        let FollowerStart {
            gateway,
            last_seq,
            created,
            held_cap,
        } = start;
        Follower {
            js,
            layout,
            topics_kv,
            cursors_bucket,
            status,
            gateway,
            watermark: last_seq,
            followed: last_seq,
            acked: BTreeMap::new(),
            created,
            held: VecDeque::new(),
            held_cap: held_cap.max(16),
            pull: None,
            retry_at: Instant::now(),
            out: Vec::new(),
        }
    }

    /// Runs until the writer's outcome channel closes (and everything it
    /// sent is released) or the reactor stops listening.
    pub fn run(
        mut self,
        from_writer: Receiver<WriteOutcome>,
        to_reactor: Sender<WriteOutcome>,
        wake: Wake,
    ) {
        let _exit = WakeOnExit(wake.clone());
        let mut writer_open = true;
        // Topics created and cursors stored through other gateways.
        let client = self.js.client().clone();
        let topics_prefix = format!("$KV.{}.", self.topics_kv.name());
        let cursors_prefix = format!("$KV.{}.", self.cursors_bucket);
        let topics_watch = client.subscribe(&format!("{topics_prefix}>"));
        let cursors_watch = client.subscribe(&format!("{cursors_prefix}>"));
        if let Err(e) = topics_watch.as_ref().and(cursors_watch.as_ref()) {
            log::warn!("follower: cannot watch topics and cursors of other gateways: {e}");
        }
        loop {
            self.maintain_pull();
            // Wait for the writer, the stream or a deadline.
            let deadline = self.next_deadline();
            let mut select = Select::new();
            let writer_idx =
                (writer_open && self.held.len() < self.held_cap).then(|| select.recv(&from_writer));
            let pull_idx = self.pull.as_ref().map(|p| select.recv(p.receiver()));
            let topics_idx = topics_watch
                .as_ref()
                .ok()
                .map(|w| select.recv(w.receiver()));
            let cursors_idx = cursors_watch
                .as_ref()
                .ok()
                .map(|w| select.recv(w.receiver()));
            let ready = select.ready_timeout(deadline.saturating_duration_since(Instant::now()));
            if let (Ok(i), Ok(w)) = (ready, topics_watch.as_ref()) {
                if Some(i) == topics_idx {
                    while let Ok(m) = w.receiver().try_recv() {
                        self.topic_put(m.subject.strip_prefix(&topics_prefix), &m);
                    }
                }
            }
            if let (Ok(i), Ok(w)) = (ready, cursors_watch.as_ref()) {
                if Some(i) == cursors_idx {
                    while let Ok(m) = w.receiver().try_recv() {
                        self.cursor_put(m.subject.strip_prefix(&cursors_prefix), &m);
                    }
                }
            }
            if let Ok(i) = ready {
                if Some(i) == writer_idx {
                    // Everything queued, not just one.
                    loop {
                        match from_writer.try_recv() {
                            Ok(o) => self.absorb(o),
                            Err(crossbeam_channel::TryRecvError::Empty) => break,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                writer_open = false;
                                break;
                            }
                        }
                        if self.held.len() >= self.held_cap {
                            break;
                        }
                    }
                } else if Some(i) == pull_idx {
                    self.read_stream();
                }
            }
            self.release(!writer_open);
            if !self.out.is_empty() {
                for o in self.out.drain(..) {
                    if to_reactor.send(o).is_err() {
                        if let Some(p) = self.pull.take() {
                            p.stop(&self.js);
                        }
                        return;
                    }
                }
                wake();
            }
            if !writer_open && self.held.is_empty() {
                if let Some(p) = self.pull.take() {
                    p.stop(&self.js);
                }
                return;
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_millis(250);
        if let Some(p) = &self.pull {
            at = at.min(p.deadline());
        } else {
            at = at.min(self.retry_at);
        }
        if let Some((since, _)) = self.held.front() {
            at = at.min(*since + HOLD_LIMIT);
        }
        at
    }

    /// Makes (or replaces) the stream read and keeps its requests going.
    fn maintain_pull(&mut self) {
        if let Some(p) = self.pull.as_mut() {
            if p.keep_going(&self.js) {
                return;
            }
            log::info!(
                "follower: reading the stream again from sequence {}",
                self.followed + 1
            );
            if let Some(p) = self.pull.take() {
                p.stop(&self.js);
            }
        }
        if Instant::now() < self.retry_at || self.status.is_unavailable() {
            return;
        }
        let config = PullConsumerConfig {
            name: None,
            filter_subject: None,
            deliver: DeliverFrom::Sequence(self.followed + 1),
            headers_only: false,
            inactive_threshold: Duration::from_secs(30),
        };
        match ContinuousPull::start(
            &self.js,
            self.layout.stream(),
            &config,
            PULL_BATCH,
            PULL_EXPIRES,
        ) {
            Ok(p) => self.pull = Some(p),
            Err(e) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "follower: cannot read the stream: {e}; trying again"
                );
                self.retry_at = Instant::now() + Duration::from_secs(1);
            }
        }
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
            .and_then(|key| self.topics_kv.get(&key).ok().flatten())
            .and_then(|e| serde_json::from_slice::<TopicValue>(&e.value).ok())
            .map(|v| v.created_at_ms);
        let c = stored.unwrap_or(fallback);
        self.created.insert(topic.clone(), c);
        c
    }

    /// Takes what the stream read delivered.
    fn read_stream(&mut self) {
        let Some(p) = self.pull.as_mut() else {
            return;
        };
        let mut messages = Vec::new();
        while let Ok(msg) = p.receiver().try_recv() {
            if let Pulled::Message(m) = p.take(msg) {
                messages.push(m);
            }
            if messages.len() >= PULL_BATCH {
                break;
            }
        }
        for m in messages {
            self.followed_one(m);
        }
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
    fn topic_put(&mut self, key: Option<&str>, m: &crate::nats::Message) {
        if is_tombstone(m) {
            return;
        }
        let Some(topic) = key.and_then(|k| crate::nats::subject_token::decode_topic(k).ok()) else {
            return;
        };
        let topic: Arc<str> = topic.into();
        if self.created.contains_key(&topic) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<TopicValue>(&m.payload) else {
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
    fn cursor_put(&mut self, key: Option<&str>, m: &crate::nats::Message) {
        if is_tombstone(m) {
            return;
        }
        let Some((topic, group)) = key.and_then(layout::parse_cursor_key) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<CursorValue>(&m.payload) else {
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
                RemoteChange::TopicDeleted { topic }
            }
            AdminChange::GroupDeleted { topic, group } => RemoteChange::GroupDeleted {
                topic: topic.into(),
                group: group.into(),
            },
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
                // The read did not fill the hole in time: announce what we
                // know up to it and read the stream again from there.
                log::warn!(
                    "follower: sequences up to {upto} not read back after {:?}; announcing what this gateway stored",
                    since.elapsed()
                );
                while let Some(entry) = self.acked.first_entry() {
                    if *entry.key() > upto {
                        break;
                    }
                    let (topic, m) = entry.remove();
                    self.announce(topic, m);
                }
                self.watermark = self.watermark.max(upto);
                self.advance();
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
