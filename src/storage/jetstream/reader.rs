//! The JetStream store's reader thread: answers `PageRequest`s (a topic's
//! messages from a sequence on) with pull consumers filtered to the topic's
//! subject, `ack_policy: none`, in memory and removed by the server when
//! idle. A consumer that ended one page full is kept for the page that
//! follows it (a subscription reading its backlog asks for exactly that), so
//! a long backlog costs one consumer, not one per page; at most
//! `MAX_CACHED` are kept. Calls `nats` (JetStream) and `layout`; answers
//! over a channel plus `Wake`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::layout::{self, Layout};
use super::status::StoreStatus;
use super::storage_error;
use crate::broker::{MessageId, StoredMessage};
use crate::nats::jetstream::{JetStream, JetStreamError};
use crate::nats::pull_consumer::PullConsumerConfig;
use crate::nats::stored_message::MessageSelector;
use crate::storage::{Page, PageRequest, StorageError, Wake, WakeOnExit};

/// Page consumers kept for their next page.
const MAX_CACHED: usize = 64;
/// How long pages are read message by message once consumers failed.
const DEGRADED_FOR: Duration = Duration::from_secs(30);
/// How long a page read that failed for now is tried again.
const RETRY_FOR: Duration = Duration::from_secs(10);

struct Cached {
    topic: Arc<str>,
    /// The sequence the consumer's next message is at or after.
    next: u64,
    name: String,
    /// Messages the consumer still had to deliver after the last page.
    pending: u64,
}

pub struct JetStreamReader {
    js: JetStream,
    layout: Layout,
    status: Arc<StoreStatus>,
    cached: VecDeque<Cached>,
    /// Until then pages are read message by message (consumers failed).
    degraded_until: Option<std::time::Instant>,
}

impl JetStreamReader {
    pub fn new(js: JetStream, layout: Layout, status: Arc<StoreStatus>) -> Self {
        JetStreamReader {
            js,
            layout,
            status,
            cached: VecDeque::new(),
            degraded_until: None,
        }
    }

    pub fn run(mut self, requests: Receiver<PageRequest>, pages: Sender<Page>, wake: Wake) {
        let _exit = WakeOnExit(wake.clone());
        while let Ok(req) = requests.recv() {
            if crate::failpoint::hit("reader-panic") {
                panic!("fail point reader-panic");
            }
            let (sub, fetch) = (req.sub, req.fetch);
            log::debug!(
                "page request {sub}/{fetch}: {} from {} limit {}",
                req.topic,
                req.from,
                req.limit
            );
            // A transient failure (a leader election, a timeout) is tried
            // again for a while before the subscription is told.
            let started = std::time::Instant::now();
            let mut backoff = Duration::from_millis(50);
            let mut result = self.read(&req);
            while let Err(e) = &result {
                log::debug!("page read failed: {}", e.message);
                if !e.unavailable || self.status.is_unavailable() || started.elapsed() >= RETRY_FOR
                {
                    break;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
                result = self.read(&req);
            }
            let page = match result {
                Ok((messages, end)) => Page {
                    sub,
                    fetch,
                    messages,
                    end,
                    error: None,
                },
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "cannot read {} from {}: {}",
                        req.topic,
                        req.from,
                        e.message
                    );
                    Page {
                        sub,
                        fetch,
                        messages: Vec::new(),
                        end: None,
                        error: Some(e),
                    }
                }
            };
            if pages.send(page).is_err() {
                break;
            }
            wake();
        }
        for c in self.cached.drain(..) {
            let _ = self.js.delete_consumer(self.layout.stream(), &c.name);
        }
    }

    /// Up to `limit` messages of the topic from `from` on, and (when the
    /// page is short) the sequence up to which there is nothing more.
    fn read(
        &mut self,
        req: &PageRequest,
    ) -> Result<(Vec<Arc<StoredMessage>>, Option<u64>), StorageError> {
        let Some(subject) = self.layout.subject(&req.topic) else {
            return Ok((Vec::new(), Some(self.status.last_acked())));
        };
        // Read before the fetch: every message up to it is in the stream.
        let end_hint = self.status.last_acked();
        let limit =
            (req.limit as usize).clamp(1, self.js.client().subscription_capacity().max(2) / 2);
        if self
            .degraded_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return self.read_one_by_one(req, &subject, limit, end_hint);
        }
        let consumer = match self
            .cached
            .iter()
            .position(|c| c.topic == req.topic && c.next == req.from)
        {
            Some(i) => self.cached.remove(i).map(|c| (c.name, c.pending)),
            None => None,
        };
        let (consumer, pending) = match consumer {
            Some(cached) => cached,
            None => {
                let mut cfg = PullConsumerConfig::from_sequence(subject.clone(), req.from);
                cfg.inactive_threshold = Duration::from_secs(30);
                match self.js.create_pull_consumer(self.layout.stream(), &cfg) {
                    Ok(c) => (c.name, c.num_pending),
                    // Consumers are created through the cluster's meta
                    // leader, which can be missing for many seconds after a
                    // node died (nats-server 2.9.10); single-message reads
                    // go to the stream's leader and still work.
                    Err(e) if e.is_transient() => {
                        self.degrade(&e);
                        return self.read_one_by_one(req, &subject, limit, end_hint);
                    }
                    Err(e) => return Err(storage_error("cannot open a page consumer", &e)),
                }
            }
        };
        let pulled = match self.js.fetch(self.layout.stream(), &consumer, limit, None) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.js.delete_consumer(self.layout.stream(), &consumer);
                if !e.is_transient() {
                    return Err(storage_error("cannot read a page", &e));
                }
                self.degrade(&e);
                return self.read_one_by_one(req, &subject, limit, end_hint);
            }
        };
        if pulled.is_empty() && pending > 0 {
            // The consumer has messages to deliver but a no-wait fetch said
            // "none" (a cluster that is recovering does): not the end.
            let _ = self.js.delete_consumer(self.layout.stream(), &consumer);
            return Err(StorageError {
                unavailable: true,
                ..StorageError::new(format!(
                    "a page consumer with {pending} messages pending delivered none"
                ))
            });
        }
        let mut messages = Vec::with_capacity(pulled.len());
        let mut last_pending = 0;
        for m in pulled {
            last_pending = m.info.pending;
            messages.push(Arc::new(
                broker_message(
                    &req.topic,
                    m.info.stream_seq,
                    &m.subject,
                    m.headers.as_ref(),
                    m.payload,
                )
                .map_err(StorageError::new)?,
            ));
        }
        let last_seq = messages.last().map_or(0, |m| m.sequence);
        log::debug!(
            "page of {} from {} (limit {limit}): {} messages up to {last_seq}, {last_pending} pending",
            req.topic,
            req.from,
            messages.len()
        );
        // A fetch may answer with fewer messages than asked while more
        // wait (`pending` of the last one says so): only `pending == 0`
        // means the topic had nothing more.
        let more = !messages.is_empty() && last_pending > 0;
        if more {
            self.cached.push_back(Cached {
                topic: req.topic.clone(),
                next: last_seq + 1,
                name: consumer,
                pending: last_pending,
            });
            while self.cached.len() > MAX_CACHED {
                if let Some(old) = self.cached.pop_front() {
                    let _ = self.js.delete_consumer(self.layout.stream(), &old.name);
                }
            }
            Ok((messages, None))
        } else {
            let _ = self.js.delete_consumer(self.layout.stream(), &consumer);
            // A consumer may live on a replica that has not applied every
            // acknowledged message yet (nats-server 2.9 places R1 consumers
            // on any of the stream's peers): before claiming "nothing more
            // up to `end_hint`", ask the stream's leader.
            let seen = last_seq.max(req.from.saturating_sub(1));
            if end_hint > seen && messages.len() < limit {
                let rest = PageRequest {
                    from: seen + 1,
                    limit: (limit - messages.len()) as u32,
                    ..req.clone()
                };
                let (more, end) =
                    self.read_one_by_one(&rest, &subject, rest.limit as usize, end_hint)?;
                messages.extend(more);
                return Ok((messages, end));
            }
            Ok((messages, Some(end_hint.max(last_seq))))
        }
    }
}

impl JetStreamReader {
    /// Consumers cannot be used for now (nats-server 2.9.10 creates them
    /// through the cluster's meta leader, which can be missing for many
    /// seconds after a node died): read message by message for a while.
    fn degrade(&mut self, e: &JetStreamError) {
        crate::log_limited!(
            log::Level::Warn,
            "page consumers fail ({e}); reading message by message for {DEGRADED_FOR:?}"
        );
        self.degraded_until = Some(std::time::Instant::now() + DEGRADED_FOR);
        for c in self.cached.drain(..) {
            let _ = self.js.delete_consumer(self.layout.stream(), &c.name);
        }
    }

    /// The page read with one `STREAM.MSG.GET` (next by subject) per message.
    fn read_one_by_one(
        &self,
        req: &PageRequest,
        subject: &str,
        limit: usize,
        end_hint: u64,
    ) -> Result<(Vec<Arc<StoredMessage>>, Option<u64>), StorageError> {
        let mut messages = Vec::new();
        let mut seq = req.from.max(1);
        while messages.len() < limit {
            let got = self
                .js
                .get_message(
                    self.layout.stream(),
                    MessageSelector::NextBySubject { seq, subject },
                )
                .map_err(|e| storage_error("cannot read a message", &e))?;
            let Some(m) = got else {
                let last = messages
                    .last()
                    .map_or(0, |m: &Arc<StoredMessage>| m.sequence);
                return Ok((messages, Some(end_hint.max(last))));
            };
            seq = m.seq + 1;
            let message =
                broker_message(&req.topic, m.seq, &m.subject, m.headers.as_ref(), m.payload)
                    .map_err(StorageError::new)?;
            messages.push(Arc::new(message));
        }
        Ok((messages, None))
    }
}

/// A stored message as the broker sees it (its id derived as on SQLite);
/// `Err` names a message Sluice did not write.
fn broker_message(
    topic: &str,
    seq: u64,
    subject: &str,
    headers: Option<&crate::nats::Headers>,
    payload: Vec<u8>,
) -> Result<StoredMessage, String> {
    let meta = layout::message_meta(headers)
        .map_err(|e| format!("message {seq} on {subject} was not written by Sluice: {e}"))?;
    Ok(StoredMessage {
        sequence: seq,
        ordinal: meta.ordinal,
        id: MessageId::new(meta.timestamp_ms, seq, topic),
        timestamp_ms: meta.timestamp_ms,
        payload: Bytes::from(payload),
        attributes: meta.attributes,
    })
}
