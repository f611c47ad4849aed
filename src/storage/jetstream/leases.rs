//! Which gateway serves each consumer group's consumer, so that a group has
//! one active consumer across every gateway sharing the store, as it has
//! on one node. The leases thread owns the `<prefix>_leases` KV bucket (one
//! key per group, kept for the lease time unless renewed):
//!
//! - a claim puts this gateway's lease over whatever is there
//!   (compare-and-set on the key's revision, so concurrent claims are
//!   ordered and the last wins); when another gateway held it, the claim
//!   waits (up to `RELEASE_WAIT`) for that gateway to end its consumer and
//!   store its cursor, then answers with the stored cursor;
//! - the holder learns that it lost a lease from the bucket's subject
//!   (every put is seen) or when a renewal's compare-and-set fails, and
//!   reports `GroupLost`; once the reactor has ended the consumer and
//!   queued its cursor, `Release` tells the claimer (a message to the inbox
//!   its lease names);
//! - a gateway that dies stops renewing: its leases expire after the lease
//!   time (`--nats-lease`, default 10 s; renewed every third of it), and
//!   until then a claim from elsewhere waits only `RELEASE_WAIT` for an
//!   answer that does not come.
//!
//! Calls `nats` (KV, publish, subscriptions) and `layout`; answers over the
//! reactor's outcome channel plus `Wake`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use serde::{Deserialize, Serialize};

use super::layout::{self, CursorValue};
use super::storage_error;
use crate::nats::jetstream::{JetStream, JetStreamError};
use crate::nats::kv_bucket::{KvBucket, ERR_WRONG_LAST_SEQUENCE};
use crate::storage::{send_waking, ClaimError, StorageError, Wake, WakeOnExit, WriteOutcome};

/// Longest a claim waits for the previous gateway to let go.
const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// Longest a claim keeps trying.
const CLAIM_LIMIT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts per claim before it fails.
const CLAIM_ATTEMPTS: usize = 8;

/// What the writer forwards (a release after the cursor writes before it).
#[derive(Debug)]
pub enum LeaseRequest {
    Claim {
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
    },
    Release {
        topic: Arc<str>,
        group: Arc<str>,
    },
}

/// A lease's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    /// The gateway serving the group (or that served it last, when `free`).
    gateway: String,
    /// Where that gateway hears that a claimer is waiting for its release.
    #[serde(default)]
    inbox: String,
    /// Released: nobody serves the group now.
    #[serde(default)]
    free: bool,
}

type Key = String;

struct WaitingClaim {
    token: u64,
    topic: Arc<str>,
    group: Arc<str>,
    until: Instant,
}

pub struct GroupLeases {
    /// How often held leases are renewed (a third of the lease time, the
    /// bucket's max age). A lease not put for two of these is given up
    /// here (its consumer ends) before it can expire and be claimed
    /// elsewhere.
    renew_every: Duration,
    js: JetStream,
    kv: KvBucket,
    cursors_kv: KvBucket,
    /// Delivery counts of groups with `max_deliveries` (None in tests).
    pub deliveries_kv: Option<KvBucket>,
    gateway: String,
    /// Our inbox for releases.
    inbox: String,
    /// Leases held: key -> (topic, group, revision, when last put).
    held: HashMap<Key, (Arc<str>, Arc<str>, u64, Instant)>,
    /// Lost leases whose claimer waits for our release: key -> its inbox.
    releasing: HashMap<Key, String>,
    /// Claims waiting for another gateway's release, by key.
    waiting: HashMap<Key, WaitingClaim>,
    out: Sender<WriteOutcome>,
    wake: Wake,
}

impl GroupLeases {
    pub fn new(
        lease: Duration,
        js: JetStream,
        kv: KvBucket,
        cursors_kv: KvBucket,
        gateway: String,
        out: Sender<WriteOutcome>,
        wake: Wake,
    ) -> Self {
        let inbox = js.client().new_inbox();
        GroupLeases {
            renew_every: lease / 3,
            js,
            kv,
            cursors_kv,
            deliveries_kv: None,
            gateway,
            inbox,
            held: HashMap::new(),
            releasing: HashMap::new(),
            waiting: HashMap::new(),
            out,
            wake,
        }
    }

    /// Runs until the writer drops its request sender.
    pub fn run(mut self, requests: Receiver<LeaseRequest>, bucket: String) {
        let _exit = WakeOnExit(self.wake.clone());
        let client = self.js.client().clone();
        // Every put on the bucket (our own renewals echo there too).
        let mut watch = super::follower::BucketWatch::new(&self.js, &bucket, 8192);
        let mut releases = None;
        let mut next_renew = Instant::now() + self.renew_every;
        loop {
            if releases.is_none() {
                releases = client
                    .subscribe_with_capacity(&self.inbox, 256)
                    .map_err(|e| {
                        crate::log_limited!(log::Level::Warn, "leases: cannot subscribe: {e}")
                    })
                    .ok();
            }
            let mut until = next_renew.min(Instant::now() + Duration::from_millis(500));
            for w in self.waiting.values() {
                until = until.min(w.until);
            }
            let mut select = Select::new();
            let r_req = select.recv(&requests);
            if let Some(r) = watch.receiver() {
                select.recv(r);
            }
            if let Some(r) = &releases {
                select.recv(r.receiver());
            }
            if let Ok(i) = select.ready_timeout(until.saturating_duration_since(Instant::now())) {
                if i == r_req {
                    match requests.try_recv() {
                        Ok(LeaseRequest::Claim {
                            token,
                            topic,
                            group,
                        }) => self.claim(token, topic, group),
                        Ok(LeaseRequest::Release { topic, group }) => self.release(&topic, &group),
                        Err(crossbeam_channel::TryRecvError::Empty) => {}
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            self.release_all();
                            return;
                        }
                    }
                }
            }
            self.give_up_stale();
            for (key, gone, payload) in watch.drain() {
                if gone {
                    continue;
                }
                if let Ok(lease) = serde_json::from_slice::<Lease>(&payload) {
                    self.observed(&key, &lease);
                }
            }
            if let Some(r) = &releases {
                loop {
                    match r.receiver().try_recv() {
                        Ok(m) => {
                            let key = String::from_utf8_lossy(&m.payload).to_string();
                            if let Some(w) = self.waiting.remove(&key) {
                                self.finish_claim(&key, w);
                            }
                        }
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            releases = None;
                            break;
                        }
                    }
                }
            }
            let now = Instant::now();
            let due: Vec<Key> = self
                .waiting
                .iter()
                .filter(|(_, w)| w.until <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for key in due {
                if let Some(w) = self.waiting.remove(&key) {
                    log::info!(
                        "leases: no release of {}/{} came within {RELEASE_WAIT:?}; taking it over",
                        w.topic,
                        w.group
                    );
                    self.finish_claim(&key, w);
                }
            }
            if now >= next_renew {
                self.renew();
                next_renew = Instant::now() + self.renew_every;
            }
        }
    }

    fn answer(
        &self,
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
        result: Result<Option<(u64, i64)>, ClaimError>,
    ) {
        self.answer_with(token, topic, group, result, None);
    }

    fn answer_with(
        &self,
        token: u64,
        topic: Arc<str>,
        group: Arc<str>,
        result: Result<Option<(u64, i64)>, ClaimError>,
        deliveries: Option<crate::broker::GroupDeliveries>,
    ) {
        let claimed = WriteOutcome::GroupClaimed {
            token,
            topic,
            group,
            result,
            deliveries,
        };
        if send_waking(&self.out, &self.wake, claimed) {
            (self.wake)();
        }
    }

    fn lease_value(&self, free: bool) -> Vec<u8> {
        serde_json::to_vec(&Lease {
            gateway: self.gateway.clone(),
            inbox: self.inbox.clone(),
            free,
        })
        .unwrap_or_default()
    }

    fn claim(&mut self, token: u64, topic: Arc<str>, group: Arc<str>) {
        let Some(key) = layout::cursor_key(&topic, &group) else {
            let e = StorageError::new(format!("cannot name the lease of {topic}/{group}"));
            return self.answer(token, topic, group, Err(ClaimError::Store(e)));
        };
        // A claim still waiting for the same group loses to this one.
        if let Some(w) = self.waiting.remove(&key) {
            self.answer(w.token, w.topic, w.group, Err(ClaimError::TakenOver));
        }
        let value = self.lease_value(false);
        let held_before = self.held.contains_key(&key);
        // The lease as first seen: a retry after an ack that did not come
        // may find our own put already there.
        let mut first_seen: Option<Option<Lease>> = None;
        let mut last_error: Option<JetStreamError> = None;
        let started = Instant::now();
        for _ in 0..CLAIM_ATTEMPTS {
            // A cluster that does not answer fails the claim rather than
            // hold the leases thread (and its renewals) for long.
            if started.elapsed() >= CLAIM_LIMIT {
                break;
            }
            let current = match self.kv.get(&key) {
                Ok(c) => c,
                Err(e) => {
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let expected = current.as_ref().map_or(0, |c| c.revision);
            let seen = current
                .as_ref()
                .and_then(|c| serde_json::from_slice::<Lease>(&c.value).ok());
            let previous = first_seen.get_or_insert(seen).clone();
            match self.kv.put_if_revision(&key, &value, expected) {
                Ok(revision) => {
                    self.held.insert(
                        key.clone(),
                        (topic.clone(), group.clone(), revision, Instant::now()),
                    );
                    self.releasing.remove(&key);
                    match previous {
                        // Ours already: this gateway's cursor is the newest.
                        _ if held_before => self.answer(token, topic, group, Ok(None)),
                        Some(p) if p.gateway == self.gateway => {
                            self.answer(token, topic, group, Ok(None))
                        }
                        // Another gateway serves it: wait for it to let go.
                        Some(p) if !p.free => {
                            log::info!(
                                "leases: taking {topic}/{group} over from gateway {}",
                                p.gateway
                            );
                            self.waiting.insert(
                                key,
                                WaitingClaim {
                                    token,
                                    topic,
                                    group,
                                    until: Instant::now() + RELEASE_WAIT,
                                },
                            );
                        }
                        // Released or expired: start from the stored cursor.
                        _ => {
                            let w = WaitingClaim {
                                token,
                                topic,
                                group,
                                until: Instant::now(),
                            };
                            self.finish_claim(&key, w);
                        }
                    }
                    return;
                }
                Err(JetStreamError::Api(e)) if e.err_code == ERR_WRONG_LAST_SEQUENCE => {
                    // Someone else wrote the lease meanwhile: look again,
                    // and decide on what is there now.
                    first_seen = None;
                    last_error = Some(JetStreamError::Api(e));
                }
                Err(e) => {
                    // Not answered: the put may have landed (a retry then
                    // decides on the lease first seen).
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let e = last_error.map_or_else(
            || StorageError::new("cannot claim the consumer group"),
            |e| storage_error("cannot claim the consumer group", &e),
        );
        self.answer(token, topic, group, Err(ClaimError::Store(e)));
    }

    /// Answers a claim with the cursor stored for its group.
    fn finish_claim(&mut self, key: &str, w: WaitingClaim) {
        if !self.held.contains_key(key) {
            // Lost again while waiting.
            return self.answer(w.token, w.topic, w.group, Err(ClaimError::TakenOver));
        }
        let cursor = match self.cursors_kv.get(key) {
            Ok(Some(entry)) => serde_json::from_slice::<CursorValue>(&entry.value)
                .ok()
                .map(|c| (c.seq, c.acked_at_ms)),
            Ok(None) => None,
            Err(e) => {
                let e = storage_error("cannot read the group's cursor", &e);
                return self.answer(w.token, w.topic, w.group, Err(ClaimError::Store(e)));
            }
        };
        // The delivery counts of a group with max_deliveries carry on here.
        let deliveries = self
            .deliveries_kv
            .as_ref()
            .and_then(|kv| kv.get(key).ok().flatten())
            .and_then(|e| serde_json::from_slice::<layout::DeliveriesValue>(&e.value).ok())
            .map(|d| crate::broker::GroupDeliveries {
                max_deliveries: d.max_deliveries,
                dead_letter_topic: d.dead_letter_topic.as_deref().map(Arc::from),
                delivered_max: d.delivered_max,
                counts: d.counts,
                dead: Vec::new(),
            });
        self.answer_with(w.token, w.topic, w.group, Ok(cursor), deliveries);
    }

    /// A put on the bucket: if it names another gateway on a lease we
    /// hold, we lost it.
    fn observed(&mut self, key: &str, lease: &Lease) {
        if lease.gateway == self.gateway || lease.free {
            return;
        }
        if let Some(w) = self.waiting.remove(key) {
            self.answer(w.token, w.topic, w.group, Err(ClaimError::TakenOver));
        }
        if let Some((topic, group, _, _)) = self.held.remove(key) {
            self.lost(key, topic, group, lease.inbox.clone(), true);
        }
    }

    /// A lease is no longer ours: `taken` by another gateway (whose inbox
    /// waits for our release), or given up because we could not renew it.
    fn lost(&mut self, key: &str, topic: Arc<str>, group: Arc<str>, claimer: String, taken: bool) {
        if taken {
            log::info!("leases: {topic}/{group} was claimed by another gateway");
        }
        self.releasing.insert(key.to_string(), claimer);
        let lost = WriteOutcome::GroupLost {
            topic,
            group,
            taken,
        };
        if send_waking(&self.out, &self.wake, lost) {
            (self.wake)();
        }
    }

    /// The reactor ended the group's consumer and its cursor is stored.
    fn release(&mut self, topic: &str, group: &str) {
        let Some(key) = layout::cursor_key(topic, group) else {
            return;
        };
        if let Some(claimer) = self.releasing.remove(&key) {
            if !claimer.is_empty() {
                if let Err(e) = self.js.client().publish(&claimer, None, key.as_bytes()) {
                    log::warn!("leases: cannot tell the claimer of {topic}/{group}: {e}");
                }
            }
        }
        if let Some((_, _, revision, _)) = self.held.remove(&key) {
            let value = self.lease_value(true);
            // A failure means someone claimed it meanwhile: theirs now.
            if let Err(e) = self.kv.put_if_revision(&key, &value, revision) {
                log::debug!("leases: release of {topic}/{group}: {e}");
            }
        }
    }

    fn release_all(&mut self) {
        let keys: Vec<(Arc<str>, Arc<str>)> = self
            .held
            .values()
            .map(|(t, g, _, _)| (t.clone(), g.clone()))
            .collect();
        for (t, g) in keys {
            self.release(&t, &g);
        }
    }

    /// Puts every held lease again (compare-and-set on the revision we
    /// wrote): keeps it from expiring, and finds one lost while the watch
    /// missed it. A round stops at the first put the cluster does not
    /// answer (the others would wait as long).
    fn renew(&mut self) {
        let value = self.lease_value(false);
        let keys: Vec<Key> = self.held.keys().cloned().collect();
        for key in keys {
            let Some(&(_, _, revision, _)) = self.held.get(&key) else {
                continue;
            };
            match self.kv.put_if_revision(&key, &value, revision) {
                Ok(r) => self.renewed(&key, r),
                Err(JetStreamError::Api(e)) if e.err_code == ERR_WRONG_LAST_SEQUENCE => {
                    match self.kv.get(&key) {
                        Ok(Some(entry)) => match serde_json::from_slice::<Lease>(&entry.value) {
                            Ok(l) if l.gateway == self.gateway && !l.free => {
                                self.renewed(&key, entry.revision)
                            }
                            Ok(l) => {
                                if let Some((t, g, _, _)) = self.held.remove(&key) {
                                    let taken = !l.free;
                                    let inbox = if taken { l.inbox } else { String::new() };
                                    self.lost(&key, t, g, inbox, taken);
                                }
                            }
                            Err(_) => {}
                        },
                        // Expired (we could not renew in time): put it back.
                        Ok(None) => {
                            if let Ok(r) = self.kv.put_if_revision(&key, &value, 0) {
                                self.renewed(&key, r);
                            }
                        }
                        Err(e) => {
                            crate::log_limited!(
                                log::Level::Warn,
                                "leases: cannot check a lease: {e}"
                            );
                            break;
                        }
                    }
                }
                Err(e) => {
                    crate::log_limited!(log::Level::Warn, "leases: cannot renew a lease: {e}");
                    break;
                }
            }
        }
        self.give_up_stale();
    }

    fn renewed(&mut self, key: &str, revision: u64) {
        if let Some(h) = self.held.get_mut(key) {
            h.2 = revision;
            h.3 = Instant::now();
        }
    }

    /// Gives up the leases not put for two renewal intervals: they may
    /// expire before we can renew them, so their consumers end here
    /// (`UNAVAILABLE`) rather than serve beside whoever claims them next.
    fn give_up_stale(&mut self) {
        let limit = self.renew_every * 2;
        let stale: Vec<Key> = self
            .held
            .iter()
            .filter(|(_, h)| h.3.elapsed() >= limit)
            .map(|(k, _)| k.clone())
            .collect();
        if stale.is_empty() {
            return;
        }
        log::warn!(
            "leases: {} lease(s) not renewed for {limit:?}; ending their consumers on this gateway",
            stale.len()
        );
        for key in stale {
            if let Some((t, g, _, _)) = self.held.remove(&key) {
                self.lost(&key, t, g, String::new(), false);
            }
        }
    }
}
