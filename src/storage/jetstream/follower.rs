//! The JetStream store's follower thread: reads the stream in order (one
//! ephemeral pull consumer, no filter) and hands what it reads to the
//! `Announcer`; watches the topic registry and cursors buckets for what
//! other gateways store; keeps this gateway's presence key in
//! `<prefix>_gateways` and watches the others'.
//!
//! The stream is read only while it has to be: while another gateway is
//! running (their messages and admin events arrive only this way), or
//! while the announcer holds an acked message or an answer behind a
//! sequence it has not seen (a publish of ours whose ack never came, an
//! admin event). A gateway alone announces its own acks from the writer
//! and reads nothing back, so it pays nothing for the others' sake.
//!
//! Calls `nats` (pull consumer, KV, subscriptions) and the announcer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Select;

use super::announcer::Announcer;
use super::layout::Layout;
use super::status::StoreStatus;
use crate::nats::jetstream::JetStream;
use crate::nats::kv_bucket::{KvBucket, KV_OPERATION_HEADER};
use crate::nats::pull_consumer::{ContinuousPull, DeliverFrom, PullConsumerConfig, Pulled};
use crate::storage::{Wake, WakeOnExit};

/// Messages asked for per pull request.
const PULL_BATCH: usize = 256;
/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// A gateway that has not renewed its presence for this long is gone.
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);
/// How often this gateway renews its presence.
const PRESENCE_EVERY: Duration = Duration::from_secs(3);
/// A read with nothing to do is stopped after this long without a message.
const IDLE_READ: Duration = Duration::from_secs(2);
/// Puts on a watched bucket held before the watch falls behind.
const WATCH_CAPACITY: usize = 1024;

fn is_tombstone(m: &crate::nats::Message) -> bool {
    m.headers
        .as_ref()
        .and_then(|h| h.get(KV_OPERATION_HEADER))
        .is_some()
}

/// Every put on a KV bucket, as plain NATS messages (at most once). When
/// the subscription falls `capacity` behind the client drops it: `drain`
/// then subscribes again (what was missed is lost; the renewals and
/// re-listings of the callers cover it) instead of spinning on a closed
/// channel.
pub struct BucketWatch {
    client: std::sync::Arc<crate::nats::NatsClient>,
    bucket: String,
    prefix: String,
    capacity: usize,
    sub: Option<crate::nats::Subscription>,
    /// Subscribed again since the caller last asked (it may re-list).
    renewed: bool,
}

impl BucketWatch {
    pub fn new(js: &JetStream, bucket: &str, capacity: usize) -> BucketWatch {
        let mut w = BucketWatch {
            client: js.client().clone(),
            bucket: bucket.to_string(),
            prefix: format!("$KV.{bucket}."),
            capacity,
            sub: None,
            renewed: false,
        };
        w.subscribe();
        w
    }

    fn subscribe(&mut self) {
        self.sub = self
            .client
            .subscribe_with_capacity(&format!("{}>", self.prefix), self.capacity)
            .map_err(|e| log::warn!("cannot watch bucket {}: {e}", self.bucket))
            .ok();
    }

    pub fn receiver(&self) -> Option<&crossbeam_channel::Receiver<crate::nats::Message>> {
        self.sub.as_ref().map(|s| s.receiver())
    }

    /// The puts received so far: (key, is a tombstone, payload).
    pub fn drain(&mut self) -> Vec<(String, bool, Vec<u8>)> {
        let mut out = Vec::new();
        let mut lost = self.sub.is_none();
        if let Some(sub) = &self.sub {
            loop {
                match sub.receiver().try_recv() {
                    Ok(m) => {
                        if let Some(key) = m.subject.strip_prefix(&self.prefix) {
                            out.push((key.to_string(), is_tombstone(&m), m.payload));
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        lost = true;
                        break;
                    }
                }
            }
        }
        if lost {
            crate::log_limited!(
                log::Level::Warn,
                "the watch on bucket {} fell behind or failed; watching it again",
                self.bucket
            );
            self.subscribe();
            self.renewed = true;
        }
        out
    }

    /// True once after the watch was subscribed again.
    pub fn take_renewed(&mut self) -> bool {
        std::mem::take(&mut self.renewed)
    }
}

/// The buckets the follower watches.
pub struct Buckets {
    pub topics: KvBucket,
    pub cursors: KvBucket,
    /// `<prefix>_gateways`: one key per running gateway.
    pub presence: KvBucket,
}

pub struct Follower {
    js: JetStream,
    layout: Layout,
    status: std::sync::Arc<StoreStatus>,
    announcer: Announcer,
    buckets: Buckets,
    gateway: String,
    pull: Option<ContinuousPull>,
    retry_at: Instant,
    /// When the stream read last delivered a message.
    last_read: Instant,
    /// The other gateways seen in the presence bucket (id -> when).
    others: HashMap<String, Instant>,
}

impl Follower {
    pub fn new(
        js: JetStream,
        layout: Layout,
        status: std::sync::Arc<StoreStatus>,
        announcer: Announcer,
        buckets: Buckets,
        gateway: String,
    ) -> Self {
        Follower {
            js,
            layout,
            status,
            announcer,
            buckets,
            gateway,
            pull: None,
            retry_at: Instant::now(),
            last_read: Instant::now(),
            others: HashMap::new(),
        }
    }

    /// Runs until the writer has stopped (or the reactor stopped listening).
    pub fn run(mut self, wake: Wake) {
        let _exit = WakeOnExit(wake);
        let mut topics_watch =
            BucketWatch::new(&self.js, self.buckets.topics.name(), WATCH_CAPACITY);
        let mut cursors_watch =
            BucketWatch::new(&self.js, self.buckets.cursors.name(), WATCH_CAPACITY);
        let mut presence_watch =
            BucketWatch::new(&self.js, self.buckets.presence.name(), WATCH_CAPACITY);
        self.renew_presence();
        let mut next_presence = Instant::now() + PRESENCE_EVERY;
        self.list_others();
        if !self.others.is_empty() {
            log::info!(
                "{} other gateway(s) share this store: following the stream",
                self.others.len()
            );
        }
        loop {
            if self.announcer.is_writer_done() {
                break;
            }
            if Instant::now() >= next_presence {
                self.renew_presence();
                next_presence = Instant::now() + PRESENCE_EVERY;
            }
            self.maintain_pull();
            let mut deadline = Instant::now() + Duration::from_millis(100);
            if let Some(p) = &self.pull {
                deadline = deadline.min(p.deadline());
            }
            let mut select = Select::new();
            let pull_idx = self.pull.as_ref().map(|p| select.recv(p.receiver()));
            for w in [&topics_watch, &cursors_watch, &presence_watch] {
                if let Some(r) = w.receiver() {
                    select.recv(r);
                }
            }
            let ready = select.ready_timeout(deadline.saturating_duration_since(Instant::now()));
            let mut result = Ok(());
            if ready.is_ok() && ready.ok() == pull_idx {
                result = self.read_stream();
            }
            for (id, gone, _) in presence_watch.drain() {
                self.presence_put(&id, gone);
            }
            if presence_watch.take_renewed() {
                self.list_others();
            }
            for (w, is_topic) in [(&mut topics_watch, true), (&mut cursors_watch, false)] {
                for (key, gone, payload) in w.drain() {
                    if gone {
                        continue;
                    }
                    let (t, c) = if is_topic {
                        (Some(key.as_str()), None)
                    } else {
                        (None, Some(key.as_str()))
                    };
                    result = result.and(self.announcer.from_watch(t, c, &payload));
                }
            }
            if result.and(self.announcer.tick()).is_err() {
                break;
            }
        }
        if let Some(p) = self.pull.take() {
            p.stop(&self.js);
        }
        let _ = self.buckets.presence.delete(&self.gateway);
    }

    /// The other gateways whose presence keys are in the bucket now.
    fn list_others(&mut self) {
        match self.buckets.presence.keys("", 10_000) {
            Ok(keys) => {
                for k in keys.into_iter().filter(|k| *k != self.gateway) {
                    self.others.insert(k, Instant::now());
                }
            }
            Err(e) => log::warn!("follower: cannot list the running gateways: {e}"),
        }
    }

    fn presence_put(&mut self, id: &str, gone: bool) {
        if id == self.gateway {
            return;
        }
        if gone {
            self.others.remove(id);
        } else if self.others.insert(id.to_string(), Instant::now()).is_none() {
            log::info!("gateway {id} shares this store: following the stream");
        }
    }

    fn renew_presence(&mut self) {
        if let Err(e) = self.buckets.presence.put(&self.gateway, b"{}") {
            crate::log_limited!(
                log::Level::Warn,
                "follower: cannot renew this gateway's presence: {e}"
            );
        }
        self.others.retain(|_, seen| seen.elapsed() < PRESENCE_TTL);
    }

    /// Makes, keeps going, replaces or stops the stream read.
    fn maintain_pull(&mut self) {
        let must = !self.others.is_empty() || self.announcer.has_holes();
        if !must && self.pull.is_some() && self.last_read.elapsed() >= IDLE_READ {
            log::debug!("follower: nothing to read for now");
            if let Some(p) = self.pull.take() {
                p.stop(&self.js);
            }
            return;
        }
        if let Some(p) = self.pull.as_mut() {
            if p.keep_going(&self.js) {
                return;
            }
            log::info!("follower: starting the stream read again");
            if let Some(p) = self.pull.take() {
                p.stop(&self.js);
            }
        }
        if !must || Instant::now() < self.retry_at || self.status.is_unavailable() {
            return;
        }
        let config = PullConsumerConfig {
            name: None,
            filter_subject: None,
            deliver: DeliverFrom::Sequence(self.announcer.read_from()),
            headers_only: false,
            inactive_threshold: Duration::from_secs(30),
        };
        self.last_read = Instant::now();
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

    /// Hands what the stream read delivered to the announcer.
    fn read_stream(&mut self) -> Result<(), super::announcer::Closed> {
        let Some(p) = self.pull.as_mut() else {
            return Ok(());
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
        let at_end = p.take_at_end();
        if !messages.is_empty() {
            self.last_read = Instant::now();
            self.announcer.from_stream(messages)?;
        }
        if let Some(requested_at) = at_end {
            self.announcer.read_at_end(requested_at)?;
        }
        Ok(())
    }
}
