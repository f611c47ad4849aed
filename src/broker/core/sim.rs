//! Deterministic, seeded simulation of the broker core.
//!
//! One [`Broker`] is driven through a few hundred to a few thousand random
//! events while the sim plays its whole environment, as the reactor would:
//! a storage writer (global sequences, per-topic ordinals, retention, topic
//! deletes and cursor writes, reported back in commit order), a backlog
//! reader that answers `Fetch`es from a snapshot, late and out of order, a
//! clock that jumps, and clients that subscribe (some with dead-letter
//! policies and ack deadlines), grant, pull, ack, nack and leave. The writer
//! also commits dead-letter moves (the copy appended to the dead-letter
//! topic, the group's record and maybe its cursor in one commit; some fail)
//! and keeps cursors, delivery counts and policies. The simulated store is
//! the ground truth. After every step the sim checks credit, ordering,
//! cursor, delivery-count, dead-letter, ack-deadline and timer invariants; at
//! the end it stops the random events, drives everything to quiescence and
//! checks that every stored message owed to a consumer was delivered or,
//! for its group, dead-lettered.
//!
//! Not modelled: restarts (persisted delivery counts and dead-letter records
//! are kept in the simulated store and checked as written, never loaded
//! back with `load_group_deliveries`), and the fences of admin operations:
//! a reset or group delete commits at once, after everything the writer had
//! queued. The core bugs it found are fixed; each has its test in
//! `tests.rs`.
//!
//! `SLUICE_SIM_SEEDS=N` runs seeds `0..N` (default [`DEFAULT_SEEDS`]);
//! `SLUICE_SIM_SEED=S` replays seed `S` alone. A failure names its seed, its
//! step, the last steps taken and the replay command; `SLUICE_SIM_TRACE=1`
//! prints every step of a replay.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;

use super::*;

const DEFAULT_SEEDS: u64 = 200;
const TOPICS: [&str; 3] = ["t0", "t1", "t2"];
const GROUPS: [&str; 3] = ["g0", "g1", "g2"];
/// Dead-letter topics: only dead-letter moves append to them (never
/// `publish`; retention and DeleteTopic apply), and consumers may subscribe
/// to them like any topic.
const DL_TOPICS: [&str; 2] = ["dl0", "dl1"];
/// The core retries a failed dead-letter move this much later.
const DEAD_LETTER_RETRY_MS: u64 = 1_000;
/// Ledger caps at least this large are never reached in a run (it has far
/// fewer sequences), so delivery counts are exact and `max_deliveries` holds.
const EXACT_LEDGER_CAP: usize = 65_536;
const WALL_BASE_MS: i64 = 1_700_000_000_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
/// Bound on the rounds the final phase may take to go quiet.
const SETTLE_ROUNDS: usize = 10_000;
/// Steps remembered for a failure report.
const HISTORY: usize = 40;

/// splitmix64: tiny, seedable and good enough to pick events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo).saturating_add(1))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> Option<T> {
        if xs.is_empty() {
            None
        } else {
            Some(xs[self.below(xs.len() as u64) as usize])
        }
    }
}

/// One topic as the simulated store holds it.
struct StoreTopic {
    created_at_ms: i64,
    messages: BTreeMap<u64, Arc<StoredMessage>>,
    last_ordinal: u64,
}

/// What the writer reports back to the broker, in commit order.
enum Outcome {
    Committed {
        topic: String,
        created_at_ms: i64,
        messages: Vec<Arc<StoredMessage>>,
    },
    Trimmed {
        topic: String,
        first: Option<(u64, u64, i64)>,
    },
    TopicDeleted {
        topic: String,
    },
    CursorSaved {
        topic: String,
        group: String,
        sequence: u64,
        ordinal: u64,
    },
    /// A dead-letter move committed (`copy`: the dead-letter topic, its
    /// creation time and the appended copy) or failed (`copy` is None).
    DeadLettered {
        topic: String,
        group: String,
        sequence: u64,
        advanced: bool,
        copy: Option<(String, i64, Arc<StoredMessage>)>,
    },
}

/// A page the reader has read and not yet handed to the broker.
struct PageReply {
    sub: SubId,
    fetch: u64,
    messages: Vec<Arc<StoredMessage>>,
    end: Option<u64>,
}

/// What the sim expects of one open subscription.
struct SubModel {
    topic: String,
    group: Option<String>,
    granted: u64,
    sent: u64,
    /// Messages at or below this sequence are not owed to the subscription
    /// (its start, its group's cursor when it joined, or a reset).
    lower: u64,
    /// Highest sequence sent in order (not as a nack's redelivery).
    in_order: u64,
    /// Sequence of the last delivery with `delivery_count == 1`.
    last_first: u64,
    /// Sequences sent since it opened (or since its group's reset).
    seen: BTreeSet<u64>,
    /// Redeliveries the broker has queued (a nack it accepted, an ack
    /// deadline that passed, a failed dead-letter move) and not sent yet.
    redo: BTreeMap<u64, Redo>,
    /// Its ack deadline (0: none).
    ack_deadline_ms: u64,
    /// Sent sequences waiting for an ack -> when their deadline passes, and
    /// whether the message was sent as the retry of a failed dead-letter
    /// move (such messages may take the stream past `max_unacked`, and stay
    /// past it through their later redeliveries).
    unacked: BTreeMap<u64, (u64, bool)>,
    /// Sequences this stream sent as retries of failed dead-letter moves.
    retried: BTreeSet<u64>,
    /// BROWSE mode: highest sequence sent (its own ledger).
    own_delivered_max: u64,
    /// Last delivery or heartbeat (or the subscribe), in `now_ms`.
    last_activity_ms: u64,
}

/// Why a message is sent again, and not before when.
#[derive(Debug, Clone, Copy)]
enum Redo {
    Nack {
        due: u64,
    },
    /// Its ack deadline passed at `due` (delivery time + deadline).
    Deadline {
        due: u64,
    },
    /// Its dead-letter move failed; tried again at `due`.
    Retry {
        due: u64,
    },
}

impl Redo {
    fn due(self) -> u64 {
        match self {
            Redo::Nack { due } | Redo::Deadline { due } | Redo::Retry { due } => due,
        }
    }
}

/// A message a group dead-lettered.
#[derive(Debug, Clone, Copy)]
struct DeadModel {
    /// The broker was told the move committed.
    committed: bool,
    /// Sequence of its copy in the dead-letter topic, once stored.
    copy: Option<u64>,
}

/// What the sim expects of one consumer group.
struct GroupModel {
    cursor: u64,
    delivered_max: u64,
    active: Option<SubId>,
    /// Reset to a sequence not yet assigned: its ordinal was fixed then (the
    /// newest message below it), and later commits below it don't refine it.
    ahead_of_store: bool,
    /// Dead-letter settings of its latest Init (`ack_deadline_ms` 0).
    policy: DeliveryPolicy,
    /// Deliveries seen per sequence since the group was made or reset.
    counts: BTreeMap<u64, u32>,
    /// Dead-lettered messages (moves not failed), since its last reset
    /// (kept when the cursor passes them: they must never come again).
    dead: BTreeMap<u64, DeadModel>,
    /// Every sequence it asked to dead-letter since its last reset, failed
    /// or not (a stream's in-order pass skips them).
    dead_asked: BTreeSet<u64>,
}

type GroupKey = (String, String);

struct Sim {
    seed: u64,
    step: usize,
    rng: Rng,
    config: BrokerConfig,
    b: Broker,
    now: u64,
    last_tick: u64,
    // ---- the environment ----
    store: BTreeMap<String, StoreTopic>,
    /// Last sequence the writer handed out (never reused).
    store_seq: u64,
    /// Every message ever committed, by sequence, with its topic.
    committed: HashMap<u64, (String, Arc<StoredMessage>)>,
    outcomes: VecDeque<Outcome>,
    reads: Vec<Fetch>,
    pages: Vec<PageReply>,
    /// The reactor's coalesced cursor writes.
    coalesced: BTreeMap<GroupKey, (u64, i64)>,
    /// Cursors as the store holds them (written when the writer commits).
    store_cursors: BTreeMap<GroupKey, u64>,
    /// Dead-letter records: (topic, group, sequence).
    store_dead: BTreeSet<(String, String, u64)>,
    /// Persisted delivery counts: highest sequence sent, counts above 1.
    store_deliveries: BTreeMap<GroupKey, (u64, BTreeMap<u64, u32>)>,
    /// Persisted dead-letter settings.
    store_policies: BTreeMap<GroupKey, (u32, Option<Arc<str>>)>,
    /// Sequences retention or a topic's delete removed.
    gone: BTreeSet<u64>,
    // ---- the model ----
    subs: BTreeMap<SubId, SubModel>,
    groups: BTreeMap<GroupKey, GroupModel>,
    /// Cursors as last seen in the broker (monotonicity check).
    observed: BTreeMap<GroupKey, u64>,
    /// Highest sequence the broker was told of (`on_committed`).
    notified_last: u64,
    /// Per topic: last sequence the broker was told of.
    topic_last: BTreeMap<String, u64>,
    /// Per topic: the oldest sequence retention left, as the broker knows.
    floor: BTreeMap<String, u64>,
    next_sub: SubId,
    woken: BTreeSet<SubId>,
    /// Streams whose last pull stopped at their send window, not the broker:
    /// they are polled again when it opens.
    blocked: BTreeSet<SubId>,
    expect_ends: Vec<(SubId, EndReason)>,
    /// A subscribe changed its group's dead-letter settings: a
    /// `PersistPolicy` is due.
    expect_policy: Option<GroupKey>,
    /// The final phase: dead-letter moves no longer fail.
    settling: bool,
    /// The ledger never forgets a count in this run (see `EXACT_LEDGER_CAP`).
    exact_counts: bool,
    stats: Stats,
    history: VecDeque<String>,
    /// `SLUICE_SIM_TRACE=1`: print every step as it is taken.
    trace: bool,
}

/// What a run exercised (printed with `--nocapture`).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    dead_letters: u64,
    /// Dead-letter commits that moved the group's cursor.
    dead_letters_advancing: u64,
    /// Cursor moves past dead-lettered messages the model took over.
    cursor_skips: u64,
    dead_letter_failures: u64,
    deadline_redeliveries: u64,
    paused_at_max_unacked: u64,
    persisted_deliveries: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.dead_letters += o.dead_letters;
        self.dead_letters_advancing += o.dead_letters_advancing;
        self.cursor_skips += o.cursor_skips;
        self.dead_letter_failures += o.dead_letter_failures;
        self.deadline_redeliveries += o.deadline_redeliveries;
        self.paused_at_max_unacked += o.paused_at_max_unacked;
        self.persisted_deliveries += o.persisted_deliveries;
    }
}

fn message(topic: &str, seq: u64, ordinal: u64, ts: i64) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        sequence: seq,
        ordinal,
        id: MessageId::new(ts, seq, topic),
        timestamp_ms: ts,
        payload: format!("{topic}/{seq}").into_bytes().into(),
        attributes: Default::default(),
    })
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed ^ 0x005E_ED0F_5A1C_E000);
        let config = BrokerConfig {
            tail_max_messages: [1, 4, 16, 2048][rng.below(4) as usize],
            tail_max_bytes: 1 << 20,
            page_max: [1, 3, 16, 256][rng.below(4) as usize],
            heartbeat_interval_ms: [0, 1_000, 5_000][rng.below(3) as usize],
            ledger_cap: [1, 4, EXACT_LEDGER_CAP, EXACT_LEDGER_CAP][rng.below(4) as usize],
            max_pending_redeliveries: [2, 10_000][rng.below(2) as usize],
            max_unacked: [1, 3, 10_000][rng.below(3) as usize],
            ..BrokerConfig::default()
        };
        let exact_counts = config.ledger_cap >= EXACT_LEDGER_CAP;
        Sim {
            seed,
            step: 0,
            rng,
            b: Broker::new(config.clone()),
            config,
            now: 0,
            last_tick: 0,
            store: BTreeMap::new(),
            store_seq: 0,
            committed: HashMap::new(),
            outcomes: VecDeque::new(),
            reads: Vec::new(),
            pages: Vec::new(),
            coalesced: BTreeMap::new(),
            store_cursors: BTreeMap::new(),
            store_dead: BTreeSet::new(),
            store_deliveries: BTreeMap::new(),
            store_policies: BTreeMap::new(),
            gone: BTreeSet::new(),
            subs: BTreeMap::new(),
            groups: BTreeMap::new(),
            observed: BTreeMap::new(),
            notified_last: 0,
            topic_last: BTreeMap::new(),
            floor: BTreeMap::new(),
            next_sub: 1,
            woken: BTreeSet::new(),
            blocked: BTreeSet::new(),
            expect_ends: Vec::new(),
            expect_policy: None,
            settling: false,
            exact_counts,
            stats: Stats::default(),
            history: VecDeque::new(),
            trace: std::env::var_os("SLUICE_SIM_TRACE").is_some(),
        }
    }

    fn wall(&self) -> i64 {
        WALL_BASE_MS + self.now as i64
    }

    fn note(&mut self, what: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        let line = format!("#{} @{}ms {what}", self.step, self.now);
        if self.trace {
            eprintln!("{line}");
        }
        self.history.push_back(line);
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let mut recent = String::new();
        for h in &self.history {
            let _ = writeln!(recent, "    {h}");
        }
        panic!(
            "broker sim: seed {} step {}: {what}\n  config: {:?}\n  last steps:\n{recent}  \
             replay: SLUICE_SIM_SEED={} cargo test --lib broker::core::sim",
            self.seed, self.step, self.config, self.seed
        );
    }

    fn live_subs(&self) -> Vec<SubId> {
        self.subs.keys().copied().collect()
    }

    fn pick_group_key(&mut self) -> GroupKey {
        let known: Vec<&GroupKey> = self.groups.keys().collect();
        if !known.is_empty() && self.rng.chance(80) {
            let i = self.rng.below(known.len() as u64) as usize;
            return known[i].clone();
        }
        let t = self.rng.pick(&TOPICS).unwrap_or("t0");
        let g = self.rng.pick(&GROUPS).unwrap_or("g0");
        (t.to_string(), g.to_string())
    }

    // ---- the run ----

    fn run(&mut self) {
        let steps = self.rng.range(200, 2_000);
        for _ in 0..steps {
            self.step += 1;
            self.random_step();
            self.check();
        }
        self.settle();
    }

    fn random_step(&mut self) {
        match self.rng.below(100) {
            0..=11 => self.publish(),
            12..=23 => self.deliver_outcomes(),
            24..=30 => self.subscribe_random(),
            31..=39 => self.grant_random(),
            40..=51 => self.pull_random(),
            52..=58 => self.ack_random(),
            59..=63 => self.nack_random(),
            64..=66 => self.unsubscribe_random(),
            67..=68 => self.reset_random(),
            69 => self.delete_group_random(),
            70 => self.delete_topic_random(),
            71..=73 => self.trim_random(),
            74..=83 => self.read_random(),
            84..=92 => self.page_random(),
            93..=96 => self.clock_random(),
            _ => self.flush_cursors(),
        }
    }

    // ---- the writer ----

    /// Commits a batch to the store; the broker hears of it later.
    fn publish(&mut self) {
        let topic = self.rng.pick(&TOPICS).unwrap_or("t0");
        let n = self.rng.range(1, 5);
        let wall = self.wall();
        let t = self
            .store
            .entry(topic.to_string())
            .or_insert_with(|| StoreTopic {
                created_at_ms: wall,
                messages: BTreeMap::new(),
                last_ordinal: 0,
            });
        let mut messages = Vec::new();
        for _ in 0..n {
            self.store_seq += 1;
            t.last_ordinal += 1;
            let m = message(topic, self.store_seq, t.last_ordinal, wall);
            t.messages.insert(m.sequence, m.clone());
            self.committed
                .insert(m.sequence, (topic.to_string(), m.clone()));
            messages.push(m);
        }
        let created_at_ms = t.created_at_ms;
        self.note(format!(
            "commit {topic} {}..={}",
            self.store_seq + 1 - n,
            self.store_seq
        ));
        self.outcomes.push_back(Outcome::Committed {
            topic: topic.to_string(),
            created_at_ms,
            messages,
        });
    }

    /// Retention deletes a topic's oldest messages.
    fn trim_random(&mut self) {
        let names: Vec<String> = self
            .store
            .iter()
            .filter(|(_, t)| !t.messages.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        let Some(name) = self.rng.pick(&names.iter().collect::<Vec<_>>()).cloned() else {
            return;
        };
        let t = self.store.get_mut(&name).expect("picked");
        let len = t.messages.len() as u64;
        let k = if self.rng.chance(15) {
            len
        } else {
            self.rng.range(1, len.min(5))
        };
        for _ in 0..k {
            if let Some((seq, _)) = t.messages.pop_first() {
                self.gone.insert(seq);
            }
        }
        let first = t
            .messages
            .values()
            .next()
            .map(|m| (m.sequence, m.ordinal, m.timestamp_ms));
        self.note(format!(
            "retention trims {k} of {name}, first left {first:?}"
        ));
        self.outcomes
            .push_back(Outcome::Trimmed { topic: name, first });
    }

    /// The reactor's coalesced cursors go to the writer, which looks up the
    /// ordinal at the cursor and reports it back.
    fn flush_cursors(&mut self) {
        let cursors = std::mem::take(&mut self.coalesced);
        if !cursors.is_empty() {
            self.note(format!("flush {} cursor writes", cursors.len()));
        }
        for (key, (sequence, _acked_at_ms)) in cursors {
            self.write_cursor(key, sequence);
        }
    }

    /// The writer stores one cursor, looks up the ordinal at it and reports.
    fn write_cursor(&mut self, (topic, group): GroupKey, sequence: u64) {
        // A cursor never re-creates a topic deleted meanwhile.
        let Some(t) = self.store.get(&topic) else {
            return;
        };
        let ordinal = t
            .messages
            .range(..=sequence)
            .next_back()
            .map_or(0, |(_, m)| m.ordinal);
        self.store_cursors
            .insert((topic.clone(), group.clone()), sequence);
        self.outcomes.push_back(Outcome::CursorSaved {
            topic,
            group,
            sequence,
            ordinal,
        });
    }

    fn deliver_outcomes(&mut self) {
        let n = if self.rng.chance(50) {
            self.outcomes.len()
        } else {
            self.rng.range(1, 3) as usize
        };
        for _ in 0..n {
            let Some(o) = self.outcomes.pop_front() else {
                break;
            };
            self.apply_outcome(o);
        }
    }

    fn apply_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Committed {
                topic,
                created_at_ms,
                messages,
            } => {
                let last = messages.last().map_or(0, |m| m.sequence);
                self.note(format!(
                    "on_committed {topic} ..={last} ({} msgs)",
                    messages.len()
                ));
                self.b.on_committed(&topic, created_at_ms, &messages);
                self.notified_last = self.notified_last.max(last);
                self.topic_last.insert(topic, last);
            }
            Outcome::Trimmed { topic, first } => {
                self.note(format!("on_trimmed {topic} {first:?}"));
                if self.b.topic(&topic).is_some() {
                    let floor = match first {
                        Some((seq, _, _)) => seq,
                        None => self.topic_last.get(&topic).copied().unwrap_or(0) + 1,
                    };
                    self.floor.insert(topic.clone(), floor);
                    // What is gone is no longer waited on.
                    for s in self.subs.values_mut().filter(|s| s.topic == topic) {
                        s.unacked.retain(|&q, _| q >= floor);
                    }
                }
                self.b.on_trimmed(&topic, first);
            }
            Outcome::TopicDeleted { topic } => {
                self.note(format!("topic {topic} deleted (writer reported)"));
                let existed = self.b.topic(&topic).is_some();
                let gone: Vec<SubId> = self
                    .subs
                    .iter()
                    .filter(|(_, s)| s.topic == topic)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.subs.remove(&id);
                    self.expect_ends.push((id, EndReason::TopicDeleted));
                }
                self.groups.retain(|(t, _), _| *t != topic);
                self.observed.retain(|(t, _), _| *t != topic);
                self.coalesced.retain(|(t, _), _| *t != topic);
                self.topic_last.remove(&topic);
                self.floor.remove(&topic);
                if self.b.delete_topic(&topic) != existed {
                    self.fail(format!("delete_topic({topic}) disagrees on existence"));
                }
            }
            Outcome::CursorSaved {
                topic,
                group,
                sequence,
                ordinal,
            } => {
                self.note(format!(
                    "cursor saved {topic}/{group} at {sequence} (ordinal {ordinal})"
                ));
                self.b.set_cursor_ordinal(&topic, &group, sequence, ordinal);
            }
            Outcome::DeadLettered {
                topic,
                group,
                sequence,
                advanced,
                copy,
            } => self.apply_dead_lettered(topic, group, sequence, advanced, copy),
        }
        self.drain_actions();
    }

    /// The reactor's answer to a dead-letter move: the copy is announced
    /// for the dead-letter topic, then the move's outcome for the group.
    fn apply_dead_lettered(
        &mut self,
        topic: String,
        group: String,
        sequence: u64,
        advanced: bool,
        copy: Option<(String, i64, Arc<StoredMessage>)>,
    ) {
        let ok = copy.is_some();
        if let Some((dlt, created_at_ms, m)) = copy {
            self.note(format!(
                "on_committed {dlt} ..={} (dead-letter copy of {topic}/{group} {sequence})",
                m.sequence
            ));
            let stored = self
                .store
                .get(&dlt)
                .is_some_and(|t| t.messages.get(&m.sequence) == Some(&m));
            if !stored && !self.gone.contains(&m.sequence) {
                self.fail(format!(
                    "dead-letter copy {} of {topic}/{group} {sequence} is not in {dlt}",
                    m.sequence
                ));
            }
            self.b
                .on_committed(&dlt, created_at_ms, std::slice::from_ref(&m));
            self.notified_last = self.notified_last.max(m.sequence);
            self.topic_last.insert(dlt, m.sequence);
        }
        self.note(format!(
            "on_dead_lettered {topic}/{group} {sequence} advanced {advanced} ok {ok}"
        ));
        let key = (topic, group);
        // The core retries a failed move it still waits for, on the group's
        // active stream.
        let mut retry_on = None;
        if let Some(gm) = self.groups.get_mut(&key) {
            if ok {
                if let Some(d) = gm.dead.get_mut(&sequence) {
                    d.committed = true;
                }
            } else if gm.dead.remove(&sequence).is_some() && sequence > gm.cursor {
                retry_on = gm.active;
            }
        }
        let pending = |b: &Broker, sub: Option<SubId>| {
            sub.and_then(|sub| b.subs.get(&sub))
                .and_then(|s| s.redeliver_pending.get(&sequence).copied())
        };
        let before = pending(&self.b, retry_on);
        self.b
            .on_dead_lettered(&key.0, &key.1, sequence, advanced, ok, self.now);
        let after = pending(&self.b, retry_on);
        if let (Some(sub), Some(_)) = (retry_on, before) {
            if after != before {
                self.fail(format!(
                    "sub {sub}: failed move of {sequence}: pending {before:?} -> {after:?}, \
                     same timer"
                ));
            }
        }
        if let Some(sub) = retry_on {
            let due = self.now + DEAD_LETTER_RETRY_MS;
            let s = self.subs.get_mut(&sub).expect("active");
            if let std::collections::btree_map::Entry::Vacant(e) = s.redo.entry(sequence) {
                e.insert(Redo::Retry { due });
                if after != Some(due) {
                    self.fail(format!(
                        "failed dead-letter move of {sequence}: retry pending {after:?}, \
                         expected at {due}"
                    ));
                }
            }
        }
        self.adopt_cursor_jump(&key);
    }

    /// A group's cursor the broker moved past dead-lettered messages (not by
    /// an ack): every stored message it passed must be dead-lettered for the
    /// group and its move committed. The model takes it over.
    fn adopt_cursor_jump(&mut self, key: &GroupKey) {
        let (Some(now), Some(gm)) = (self.b.group_cursor(&key.0, &key.1), self.groups.get(key))
        else {
            return;
        };
        if now <= gm.cursor {
            return; // `check_groups` reports any other difference
        }
        let passed = self.store.get(&key.0).and_then(|t| {
            t.messages
                .range(gm.cursor + 1..=now)
                .map(|(&q, _)| q)
                .find(|q| !gm.dead.get(q).is_some_and(|d| d.committed))
        });
        if let Some(q) = passed {
            self.fail(format!(
                "cursor of {}/{} moved {} -> {now} past stored message {q}, which it did not \
                 dead-letter (dead: {:?})",
                key.0, key.1, gm.cursor, gm.dead
            ));
        }
        self.note(format!(
            "{}/{}: cursor {} -> {now} past dead-lettered messages",
            key.0, key.1, gm.cursor
        ));
        self.stats.cursor_skips += 1;
        let gm = self.groups.get_mut(key).expect("checked");
        gm.cursor = now;
        gm.ahead_of_store = false;
    }

    /// The writer commits everything queued before an operator's action (a
    /// reset, a group delete), which the sim applies at once.
    fn commit_queued(&mut self) {
        while let Some(o) = self.outcomes.pop_front() {
            self.apply_outcome(o);
        }
    }

    // ---- the reader ----

    /// Reads one outstanding request against the store as it is now.
    fn read_random(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let i = self.rng.below(self.reads.len() as u64) as usize;
        let f = self.reads.swap_remove(i);
        let failed = self.rng.chance(3);
        self.read(f, failed);
    }

    fn read(&mut self, f: Fetch, failed: bool) {
        let page = if failed {
            // An empty, non-final page: the subscriber asks again.
            PageReply {
                sub: f.sub,
                fetch: f.id,
                messages: Vec::new(),
                end: None,
            }
        } else {
            let messages: Vec<_> = self.store.get(&*f.topic).map_or_else(Vec::new, |t| {
                t.messages
                    .range(f.from..)
                    .take(f.limit as usize)
                    .map(|(_, m)| m.clone())
                    .collect()
            });
            let end = (messages.len() < f.limit as usize).then(|| {
                self.store
                    .values()
                    .filter_map(|t| t.messages.keys().next_back().copied())
                    .max()
                    .unwrap_or(0)
            });
            PageReply {
                sub: f.sub,
                fetch: f.id,
                messages,
                end,
            }
        };
        self.note(format!(
            "reader: fetch {} of sub {} ({} from {} limit {}) -> {} msgs, end {:?}{}",
            f.id,
            f.sub,
            f.topic,
            f.from,
            f.limit,
            page.messages.len(),
            page.end,
            if failed { " (read error)" } else { "" }
        ));
        self.pages.push(page);
    }

    /// Hands one read page to the broker, in any order, maybe late.
    fn page_random(&mut self) {
        if self.pages.is_empty() {
            return;
        }
        let i = self.rng.below(self.pages.len() as u64) as usize;
        let p = self.pages.swap_remove(i);
        self.deliver_page(p);
    }

    fn deliver_page(&mut self, p: PageReply) {
        self.note(format!(
            "on_page sub {} fetch {} ({} msgs, end {:?})",
            p.sub,
            p.fetch,
            p.messages.len(),
            p.end
        ));
        self.b.on_page(p.sub, p.fetch, p.messages, p.end);
        self.drain_actions();
    }

    // ---- the clock ----

    fn clock_random(&mut self) {
        let delta = match self.rng.below(10) {
            0..=4 => self.rng.range(0, 100),
            5..=7 => self.rng.range(100, 10_000),
            8 => self.rng.range(10_000, 3_600_000),
            _ => self.rng.range(DAY_MS, 3 * DAY_MS),
        };
        self.advance(delta);
    }

    fn advance(&mut self, delta: u64) {
        self.now += delta;
        self.note(format!("clock +{delta}ms, tick"));
        // Deliveries whose ack deadline passes now are sent again.
        let now = self.now;
        let mut passed = Vec::new();
        for (&id, s) in self.subs.iter_mut() {
            for (seq, (due, again)) in std::mem::take(&mut s.unacked) {
                if due <= now {
                    passed.push((id, seq));
                    s.redo.entry(seq).or_insert(Redo::Deadline { due });
                } else {
                    s.unacked.insert(seq, (due, again));
                }
            }
        }
        self.b.tick(self.now);
        self.last_tick = self.now;
        for (sub, seq) in passed {
            let queued = self
                .b
                .subs
                .get(&sub)
                .is_some_and(|s| s.redeliver_pending.contains_key(&seq));
            if !queued {
                self.fail(format!(
                    "sub {sub}: ack deadline of {seq} passed but no redelivery is queued"
                ));
            }
        }
        self.drain_actions();
        if let Some(at) = self.b.next_deadline() {
            if at <= self.now {
                self.fail(format!(
                    "after tick({}) a timer is still due at {at}",
                    self.now
                ));
            }
        }
        let interval = self.config.heartbeat_interval_ms;
        if interval > 0 {
            for (id, s) in &self.subs {
                if s.last_activity_ms + interval <= self.now {
                    self.fail(format!(
                        "sub {id} idle since {} got no heartbeat by {}",
                        s.last_activity_ms, self.now
                    ));
                }
            }
        }
    }

    // ---- clients ----

    fn subscribe_random(&mut self) {
        let sub = self.next_sub;
        self.next_sub += 1;
        if self.rng.chance(3) {
            self.note(format!("sub {sub}: subscribe to a bad topic name"));
            let bad = SubscribeRequest {
                topic: "bad name".into(),
                group: None,
                start: Start::Earliest,
                policy: Default::default(),
            };
            if self.b.subscribe(sub, bad, self.now, self.wall()).is_ok() {
                self.fail("a bad topic name was accepted");
            }
            self.drain_actions();
            return;
        }
        // Often a takeover: the same topic and group as a live consumer.
        let active: Vec<GroupKey> = self
            .groups
            .iter()
            .filter(|(_, g)| g.active.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let (topic, group) = if !active.is_empty() && self.rng.chance(30) {
            let (t, g) = active[self.rng.below(active.len() as u64) as usize].clone();
            (t, Some(g))
        } else {
            let t = if self.rng.chance(10) {
                self.rng.pick(&DL_TOPICS).unwrap_or("dl0").to_string()
            } else {
                self.rng.pick(&TOPICS).unwrap_or("t0").to_string()
            };
            let g = if self.rng.chance(30) {
                None
            } else {
                self.rng.pick(&GROUPS).map(str::to_string)
            };
            (t, g)
        };
        let start = match self.rng.below(3) {
            0 => Start::Latest,
            1 => Start::Earliest,
            _ => Start::Offset(self.rng.range(0, self.store_seq + 3)),
        };
        let policy = self.random_policy(&topic, group.as_deref());
        self.subscribe(sub, topic, group, start, policy);
    }

    /// Dead-letter settings and an ack deadline for a consumer group's
    /// stream (BROWSE streams get none).
    fn random_policy(&mut self, topic: &str, group: Option<&str>) -> DeliveryPolicy {
        let Some(group) = group else {
            return DeliveryPolicy::default();
        };
        let ack_deadline_ms = if self.rng.chance(35) {
            self.rng.pick(&[20, 100, 1_000, 5_000]).unwrap_or(100)
        } else {
            0
        };
        let key = (topic.to_string(), group.to_string());
        if let Some(g) = self.groups.get(&key) {
            if self.rng.chance(60) {
                // The consumer comes back with the same settings.
                return DeliveryPolicy {
                    ack_deadline_ms,
                    ..g.policy.clone()
                };
            }
        }
        // Mostly low limits, so that redeliveries reach them.
        let max_deliveries = if self.rng.chance(50) {
            self.rng.pick(&[1, 1, 2, 3, 4]).unwrap_or(1)
        } else {
            0
        };
        let dead_letter_topic =
            (max_deliveries > 0).then(|| Arc::from(self.rng.pick(&DL_TOPICS).unwrap_or("dl0")));
        DeliveryPolicy {
            max_deliveries,
            dead_letter_topic,
            ack_deadline_ms,
        }
    }

    fn subscribe(
        &mut self,
        sub: SubId,
        topic: String,
        group: Option<String>,
        start: Start,
        policy: DeliveryPolicy,
    ) {
        self.note(format!(
            "sub {sub}: subscribe {topic} {group:?} {start:?} {policy:?}"
        ));
        let group_policy = DeliveryPolicy {
            ack_deadline_ms: 0,
            ..policy.clone()
        };
        let start_next = match start {
            Start::Latest => self.notified_last + 1,
            Start::Earliest => 1,
            Start::Offset(o) => o.max(1),
        };
        let lower = match &group {
            None => start_next - 1,
            Some(g) => {
                let key = (topic.clone(), g.clone());
                match self.groups.get_mut(&key) {
                    Some(gm) => {
                        if let Some(old) = gm.active.replace(sub) {
                            self.subs.remove(&old);
                            self.woken.remove(&old);
                            self.expect_ends.push((old, EndReason::TakenOver));
                        }
                        if gm.policy != group_policy {
                            gm.policy = group_policy;
                            self.expect_policy = Some(key);
                        }
                        gm.cursor
                    }
                    None => {
                        if group_policy != DeliveryPolicy::default() {
                            self.expect_policy = Some(key.clone());
                        }
                        self.groups.insert(
                            key,
                            GroupModel {
                                cursor: start_next - 1,
                                delivered_max: 0,
                                active: Some(sub),
                                // An offset past what is stored: as a reset
                                // there, its ordinal is fixed now.
                                ahead_of_store: start_next - 1 > self.store_seq,
                                policy: group_policy,
                                counts: BTreeMap::new(),
                                dead: BTreeMap::new(),
                                dead_asked: BTreeSet::new(),
                            },
                        );
                        start_next - 1
                    }
                }
            }
        };
        self.subs.insert(
            sub,
            SubModel {
                topic: topic.clone(),
                group: group.clone(),
                granted: 0,
                sent: 0,
                lower,
                in_order: lower,
                last_first: 0,
                seen: BTreeSet::new(),
                redo: BTreeMap::new(),
                ack_deadline_ms: if group.is_some() {
                    u64::from(policy.ack_deadline_ms)
                } else {
                    0
                },
                unacked: BTreeMap::new(),
                retried: BTreeSet::new(),
                own_delivered_max: 0,
                last_activity_ms: self.now,
            },
        );
        let request = SubscribeRequest {
            topic,
            group,
            start,
            policy,
        };
        if let Err(e) = self.b.subscribe(sub, request, self.now, self.wall()) {
            self.fail(format!("subscribe {sub} refused: {e}"));
        }
        self.drain_actions();
        if let Some(key) = self.expect_policy.take() {
            self.fail(format!(
                "{key:?}: its new dead-letter settings were not persisted"
            ));
        }
    }

    fn grant_random(&mut self) {
        let Some(sub) = self.rng.pick(&self.live_subs()) else {
            return;
        };
        let credits = match self.rng.below(10) {
            0 => 0,
            1 => self.rng.range(50, 200),
            _ => self.rng.range(1, 8),
        } as u32;
        self.grant(sub, credits);
        // The stream reads the grant and flushes what its window takes.
        let window = self.rng.range(0, 8) as usize;
        self.pull(sub, window);
    }

    fn grant(&mut self, sub: SubId, credits: u32) {
        self.note(format!("sub {sub}: grant {credits}"));
        if let Some(s) = self.subs.get_mut(&sub) {
            s.granted += u64::from(credits);
        }
        self.b.grant(sub, credits);
        self.drain_actions();
    }

    /// The stream's send window opens (or it was woken): pull what fits.
    fn pull_random(&mut self) {
        let woken: Vec<SubId> = self.woken.iter().copied().collect();
        let sub = if !woken.is_empty() && self.rng.chance(70) {
            self.rng.pick(&woken)
        } else {
            self.rng.pick(&self.live_subs())
        };
        let Some(sub) = sub else {
            return;
        };
        let window = if self.rng.chance(30) {
            usize::MAX
        } else {
            self.rng.range(1, 6) as usize
        };
        self.pull(sub, window);
    }

    /// Pulls up to `window` deliveries; returns how many came.
    fn pull(&mut self, sub: SubId, window: usize) -> usize {
        self.woken.remove(&sub);
        self.blocked.insert(sub);
        let mut got = Vec::new();
        while got.len() < window {
            // Due redeliveries go first: whether this one is one of them.
            let due_before: Vec<u64> = self.b.subs.get(&sub).map_or_else(Vec::new, |s| {
                s.redeliver_due.iter().map(|m| m.sequence).collect()
            });
            let Some(d) = self.b.next_delivery(sub, self.now) else {
                self.blocked.remove(&sub);
                if self.paused(sub) {
                    self.stats.paused_at_max_unacked += 1;
                }
                break;
            };
            let due_after = self.b.subs.get(&sub).map_or(0, |s| s.redeliver_due.len());
            let popped = due_before.len().saturating_sub(due_after);
            let redelivery = popped > 0 && due_before[popped - 1] == d.message.sequence;
            got.push((d.message.sequence, d.delivery_count));
            if let Err(e) = self.account_delivery(sub, &d, redelivery) {
                self.note(format!("sub {sub}: pulled {got:?}"));
                self.fail(format!(
                    "sub {sub}: {} of seq {} (count {}): {e}",
                    if redelivery { "redelivery" } else { "delivery" },
                    d.message.sequence,
                    d.delivery_count
                ));
            }
        }
        if !got.is_empty() {
            self.note(format!("sub {sub}: pulled {got:?}"));
        }
        self.drain_actions();
        got.len()
    }

    /// The stream waits for acks: it has an ack deadline, as many unacked
    /// deliveries as `max_unacked` and no redelivery due. (The broker still
    /// wakes it; the reactor polls it anyway when an ack arrives.)
    fn paused(&self, sub: SubId) -> bool {
        // New deliveries pause while unacked deliveries and pending
        // redeliveries fill `max_unacked` (due redeliveries still go).
        self.subs.get(&sub).is_some_and(|s| {
            s.ack_deadline_ms > 0
                && self.b.subs.get(&sub).is_some_and(|b| {
                    b.unacked.len() + b.redeliver_pending.len() >= self.config.max_unacked
                        && b.redeliver_due.is_empty()
                })
        })
    }

    /// Checks one delivery against the model and records it. `redelivery`:
    /// the broker took it from its due redeliveries.
    fn account_delivery(
        &mut self,
        sub: SubId,
        d: &Delivery,
        redelivery: bool,
    ) -> Result<(), String> {
        let m = &d.message;
        let seq = m.sequence;
        let now = self.now;
        let s = self.subs.get_mut(&sub).ok_or("not an open subscription")?;
        let (topic, stored) = self.committed.get(&seq).ok_or("never committed")?;
        if *topic != s.topic {
            return Err(format!("message of {topic} sent on {}", s.topic));
        }
        if **stored != **m {
            return Err("message differs from what was stored".into());
        }
        if MessageId::sequence_in(&m.id.to_string(), &s.topic) != Some(seq) {
            return Err("its id does not carry its sequence for the topic".into());
        }
        s.sent += 1;
        if s.sent > s.granted {
            return Err(format!(
                "more deliveries than credit: {} sent, {} granted",
                s.sent, s.granted
            ));
        }
        if let Some(&floor) = self.floor.get(&s.topic) {
            if seq < floor {
                return Err(format!(
                    "below {floor}, where the broker was told retention left the topic"
                ));
            }
        }
        let mut group = match &s.group {
            None => None,
            Some(g) => Some(
                self.groups
                    .get_mut(&(s.topic.clone(), g.clone()))
                    .ok_or("its group is gone")?,
            ),
        };
        let delivered_max = match &mut group {
            None => &mut s.own_delivered_max,
            Some(gm) => &mut gm.delivered_max,
        };
        let first = seq > *delivered_max;
        if (d.delivery_count == 1) != first {
            return Err(format!(
                "delivery_count {} but the ledger had sent up to {}",
                d.delivery_count, *delivered_max
            ));
        }
        *delivered_max = (*delivered_max).max(seq);
        if let Some(gm) = &mut group {
            if seq <= gm.cursor {
                return Err(format!("at or below the group's cursor {}", gm.cursor));
            }
            if gm.dead.contains_key(&seq) {
                return Err(format!(
                    "the group dead-lettered it (cursor {}, dead {:?})",
                    gm.cursor, gm.dead
                ));
            }
            let seen = gm.counts.entry(seq).or_insert(0);
            *seen += 1;
            // Counts of messages at or below the cursor are forgotten (and
            // such messages are never dead-lettered).
            if self.exact_counts && seq > gm.cursor {
                if d.delivery_count != *seen {
                    return Err(format!("its delivery number {} of the group", *seen));
                }
                let max = gm.policy.max_deliveries;
                if max > 0 && *seen > max {
                    return Err(format!("more deliveries than max_deliveries {max}"));
                }
            }
        }
        if first {
            if seq <= s.last_first {
                return Err(format!(
                    "first deliveries out of order: {seq} after {}",
                    s.last_first
                ));
            }
            s.last_first = seq;
        }
        // Messages it dead-lettered during this pull: their actions are
        // still queued.
        let asked_now = |z: u64| {
            self.b
                .actions
                .iter()
                .any(|a| matches!(a, Action::DeadLetter(d) if d.message.sequence == z))
        };
        // Sent again because its dead-letter move failed: such retries may
        // take a stream past `max_unacked` (the message cannot wait).
        let mut retry = false;
        if redelivery {
            // Sent again for a reason whose time has come.
            let Some(redo) = s.redo.remove(&seq) else {
                return Err("redelivered though nothing asked for it".into());
            };
            if matches!(redo, Redo::Retry { .. }) {
                s.retried.insert(seq);
            }
            retry = s.retried.contains(&seq);
            if now < redo.due() {
                return Err(format!("redelivered before its time: {redo:?}"));
            }
            if matches!(redo, Redo::Deadline { .. }) {
                self.stats.deadline_redeliveries += 1;
            }
        } else {
            // The next message in order, no gaps but dead-lettered ones.
            if seq <= s.in_order {
                return Err(format!(
                    "sent out of order or twice: {seq} after {}",
                    s.in_order
                ));
            }
            if let Some(t) = self.store.get(&s.topic) {
                let skipped = t
                    .messages
                    .range(s.in_order + 1..seq)
                    .map(|(&z, _)| z)
                    .find(|&z| {
                        // Dead-lettered, or passed by the group's cursor (a
                        // group's stream skips what its cursor passed).
                        !group
                            .as_ref()
                            .is_some_and(|g| g.dead_asked.contains(&z) || z <= g.cursor)
                            && !asked_now(z)
                    });
                if let Some(z) = skipped {
                    return Err(format!(
                        "skipped stored message {z} (last in order {})",
                        s.in_order
                    ));
                }
            }
            s.in_order = seq;
        }
        if s.ack_deadline_ms > 0 {
            let waiting = s.unacked.len() - s.unacked.keys().filter(|&&q| asked_now(q)).count();
            if !redelivery && waiting >= self.config.max_unacked {
                return Err(format!(
                    "a new delivery with {waiting} unacked (max_unacked {})",
                    self.config.max_unacked
                ));
            }
            s.unacked.insert(seq, (now + s.ack_deadline_ms, retry));
        }
        s.seen.insert(seq);
        s.last_activity_ms = now;
        Ok(())
    }

    fn ack_random(&mut self) {
        let Some(sub) = self.rng.pick(&self.live_subs()) else {
            return;
        };
        let n = if self.rng.chance(25) {
            self.rng.range(2, 4)
        } else {
            1
        };
        let s = &self.subs[&sub];
        let topic = s.topic.clone();
        let seen: Vec<u64> = s.seen.iter().copied().collect();
        let (cursor, delivered_max) = s
            .group
            .as_ref()
            .and_then(|g| self.groups.get(&(topic.clone(), g.clone())))
            .map_or((0, 0), |g| (g.cursor, g.delivered_max));
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = match self.rng.below(10) {
                0 => "not-an-id".to_string(),
                1 => MessageId::new(5, self.rng.range(1, 50), "elsewhere").to_string(),
                2 | 3 => {
                    let seq = self
                        .rng
                        .range(cursor.saturating_sub(2), delivered_max.saturating_add(2));
                    MessageId::new(self.wall(), seq, &topic).to_string()
                }
                _ => match self.rng.pick(&seen) {
                    Some(seq) => self.committed[&seq].1.id.to_string(),
                    None => "not-an-id".to_string(),
                },
            };
            ids.push(id);
        }
        self.ack(sub, &ids);
    }

    /// Acks (cumulatively) the highest of `ids`; predicts the new cursor.
    fn ack(&mut self, sub: SubId, ids: &[String]) {
        let topic = self.subs[&sub].topic.clone();
        let seqs: Vec<Option<u64>> = ids
            .iter()
            .map(|id| MessageId::sequence_in(id, &topic))
            .collect();
        self.note(format!("sub {sub}: ack {seqs:?}"));
        let s = self.subs.get_mut(&sub).expect("live");
        if let Some(g) = &s.group {
            let gm = self
                .groups
                .get_mut(&(s.topic.clone(), g.clone()))
                .expect("active group");
            let best = seqs
                .iter()
                .flatten()
                .copied()
                .filter(|&q| q > gm.cursor && q <= gm.delivered_max)
                .max();
            if let Some(best) = best {
                gm.cursor = best;
                gm.ahead_of_store = false;
                s.redo.retain(|&q, _| q > best);
                s.unacked.retain(|&q, _| q > best);
            }
        }
        let key = s.group.clone().map(|g| (topic.clone(), g));
        if ids.len() == 1 {
            self.b.ack(sub, &ids[0], self.wall());
        } else {
            self.b
                .ack_many(sub, ids.iter().map(String::as_str), self.wall());
        }
        if let Some(key) = key {
            self.adopt_cursor_jump(&key);
        }
        self.drain_actions();
        // The reactor reads acks when it polls the stream, and then flushes
        // what its window takes (a stream paused at `max_unacked` goes on).
        let window = if self.settling {
            usize::MAX
        } else {
            self.rng.range(0, 6) as usize
        };
        self.pull(sub, window);
    }

    fn nack_random(&mut self) {
        let Some(sub) = self.rng.pick(&self.live_subs()) else {
            return;
        };
        let s = &self.subs[&sub];
        let seen: Vec<u64> = s.seen.iter().copied().collect();
        let delay = match self.rng.below(10) {
            0..=3 => 0,
            4..=6 => self.rng.range(1, 3_000) as u32,
            7 | 8 => self.rng.range(3_000, 600_000) as u32,
            _ => u32::MAX,
        };
        // Only messages this stream was sent: then a delivery of a nacked
        // sequence is always its redelivery.
        let Some(seq) = self.rng.pick(&seen) else {
            self.note(format!("sub {sub}: nack garbage"));
            self.b.nack(sub, "garbage", delay, self.now);
            self.drain_actions();
            return;
        };
        let id = self.committed[&seq].1.id.to_string();
        let (cursor, delivered_max) = match &s.group {
            None => (0, s.own_delivered_max),
            Some(g) => {
                let gm = &self.groups[&(s.topic.clone(), g.clone())];
                (gm.cursor, gm.delivered_max)
            }
        };
        let pending = |b: &Broker| {
            b.subs
                .get(&sub)
                .and_then(|s| s.redeliver_pending.get(&seq).copied())
        };
        let before = pending(&self.b);
        self.note(format!("sub {sub}: nack {seq} delay {delay}"));
        self.b.nack(sub, &id, delay, self.now);
        let after = pending(&self.b);
        if before.is_none() {
            if let Some(due) = after {
                if seq <= cursor || seq > delivered_max {
                    self.fail(format!(
                        "nack of {seq} accepted with cursor {cursor}, sent up to {delivered_max}"
                    ));
                }
                let want = self.now + u64::from(delay.min(MAX_REDELIVERY_DELAY_MS));
                if due != want {
                    self.fail(format!("nack of {seq} due at {due}, expected {want}"));
                }
                if let Some(s) = self.subs.get_mut(&sub) {
                    s.redo.insert(seq, Redo::Nack { due });
                    // The nack's redelivery replaces the ack deadline's.
                    s.unacked.remove(&seq);
                }
            }
        }
        self.drain_actions();
        // Read when the stream is polled, which then flushes what it can.
        let window = self.rng.range(0, 6) as usize;
        self.pull(sub, window);
    }

    fn unsubscribe_random(&mut self) {
        let sub = if self.rng.chance(10) {
            // An old id, maybe already ended: must be a no-op then.
            self.rng.range(1, self.next_sub)
        } else {
            match self.rng.pick(&self.live_subs()) {
                Some(s) => s,
                None => return,
            }
        };
        self.unsubscribe(sub);
    }

    fn unsubscribe(&mut self, sub: SubId) {
        self.note(format!("sub {sub}: stream closed"));
        if let Some(s) = self.subs.remove(&sub) {
            if let Some(g) = s.group {
                if let Some(gm) = self.groups.get_mut(&(s.topic, g)) {
                    if gm.active == Some(sub) {
                        gm.active = None;
                    }
                }
            }
        }
        self.woken.remove(&sub);
        self.b.unsubscribe(sub);
        self.drain_actions();
        if self.b.credit(sub).is_some() || self.b.next_delivery(sub, self.now).is_some() {
            self.fail(format!("sub {sub} still served after it closed"));
        }
    }

    // ---- operators ----

    fn reset_random(&mut self) {
        self.commit_queued();
        let key = self.pick_group_key();
        let cursor = self.groups.get(&key).map_or(0, |g| g.cursor);
        let seq = match self.rng.below(30) {
            0 => u64::MAX,
            1..=4 => 0,
            5..=12 => cursor.saturating_sub(self.rng.range(0, 3)),
            _ => self.rng.range(0, self.notified_last + 3),
        };
        let (topic, group) = key.clone();
        self.note(format!("ResetCursor {topic}/{group} to {seq}"));
        let exists = self.groups.contains_key(&key);
        if self.b.reset_cursor(&topic, &group, seq) != exists {
            self.fail(format!(
                "reset_cursor({topic}/{group}) disagrees on existence"
            ));
        }
        if !exists {
            self.drain_actions();
            return;
        }
        let gm = self.groups.get_mut(&key).expect("exists");
        // Messages it dead-lettered stay dead unless its cursor had passed
        // them (then the group forgot them) or the reset passes them.
        let forgotten = gm.cursor.max(seq);
        gm.dead.retain(|&q, _| q > forgotten);
        gm.dead_asked.retain(|&q| q > seq);
        gm.counts.clear();
        gm.cursor = seq;
        gm.delivered_max = 0;
        gm.ahead_of_store = seq > self.store_seq;
        if let Some(s) = gm.active.and_then(|a| self.subs.get_mut(&a)) {
            s.lower = seq;
            s.in_order = seq;
            s.last_first = 0;
            s.seen.clear();
            s.redo.clear();
            s.unacked.clear();
        }
        // A reset may move the cursor back.
        self.observed.remove(&key);
        // An older coalesced ack must not land after the reset.
        self.coalesced.remove(&key);
        let ordinal = self.store.get(&topic).map_or(0, |t| {
            t.messages
                .range(..=seq)
                .next_back()
                .map_or(0, |(_, m)| m.ordinal)
        });
        if self.store.contains_key(&topic) {
            self.store_cursors.insert(key, seq);
        }
        self.outcomes.push_back(Outcome::CursorSaved {
            topic,
            group,
            sequence: seq,
            ordinal,
        });
        self.drain_actions();
    }

    fn delete_group_random(&mut self) {
        self.commit_queued();
        let key = self.pick_group_key();
        let (topic, group) = key.clone();
        self.note(format!("DeleteConsumerGroup {topic}/{group}"));
        let model = self.groups.remove(&key);
        if let Some(active) = model.as_ref().and_then(|g| g.active) {
            self.subs.remove(&active);
            self.woken.remove(&active);
            self.expect_ends.push((active, EndReason::GroupDeleted));
        }
        if self.b.delete_group(&topic, &group) != model.is_some() {
            self.fail(format!(
                "delete_group({topic}/{group}) disagrees on existence"
            ));
        }
        self.observed.remove(&key);
        self.coalesced.remove(&key);
        self.store_cursors.remove(&key);
        self.store_deliveries.remove(&key);
        self.store_policies.remove(&key);
        self.store_dead
            .retain(|(t, g, _)| (t, g) != (&key.0, &key.1));
        self.drain_actions();
    }

    /// The writer deletes the topic now; the broker forgets it when the
    /// outcome arrives, in commit order.
    fn delete_topic_random(&mut self) {
        let topic = if self.rng.chance(25) {
            self.rng.pick(&DL_TOPICS).unwrap_or("dl0")
        } else {
            self.rng.pick(&TOPICS).unwrap_or("t0")
        }
        .to_string();
        if self.b.topic(&topic).is_none() {
            return;
        }
        self.note(format!("DeleteTopic {topic} (writer deletes it)"));
        self.coalesced.retain(|(t, _), _| *t != topic);
        if let Some(t) = self.store.remove(&topic) {
            self.gone.extend(t.messages.keys());
        }
        self.store_cursors.retain(|(t, _), _| *t != topic);
        self.store_deliveries.retain(|(t, _), _| *t != topic);
        self.store_policies.retain(|(t, _), _| *t != topic);
        self.store_dead.retain(|(t, _, _)| *t != topic);
        self.outcomes.push_back(Outcome::TopicDeleted { topic });
    }

    // ---- what the reactor does with actions ----

    fn drain_actions(&mut self) {
        let mut ends = Vec::new();
        while let Some(action) = self.b.pop_action() {
            match action {
                Action::Wake(sub) => {
                    if !self.subs.contains_key(&sub) {
                        self.fail(format!("Wake for sub {sub}, which is not open"));
                    }
                    self.woken.insert(sub);
                }
                Action::Fetch(f) => {
                    let Some(s) = self.subs.get(&f.sub) else {
                        self.fail(format!("Fetch for sub {}, which is not open", f.sub));
                    };
                    if *f.topic != *s.topic {
                        self.fail(format!("Fetch of {} for a sub of {}", f.topic, s.topic));
                    }
                    if f.limit == 0 || f.limit > self.config.page_max {
                        self.fail(format!("Fetch limit {} out of range", f.limit));
                    }
                    self.reads.push(f);
                }
                Action::PersistCursor {
                    topic,
                    group,
                    sequence,
                    acked_at_ms,
                } => {
                    let key = (topic.to_string(), group.to_string());
                    match self.groups.get(&key) {
                        Some(g) if g.cursor == sequence => {}
                        Some(g) => self.fail(format!(
                            "PersistCursor {topic}/{group} at {sequence}, model cursor {}",
                            g.cursor
                        )),
                        None => self.fail(format!("PersistCursor of unknown group {key:?}")),
                    }
                    self.coalesced.insert(key, (sequence, acked_at_ms));
                }
                Action::DeadLetter(d) => self.dead_letter(d),
                Action::PersistDelivery {
                    topic,
                    group,
                    sequence,
                    count,
                } => {
                    let key = (topic.to_string(), group.to_string());
                    let Some(g) = self.groups.get(&key) else {
                        self.fail(format!("PersistDelivery for unknown group {key:?}"));
                    };
                    let seen = g.counts.get(&sequence).copied().unwrap_or(0);
                    if g.policy.max_deliveries == 0
                        || count == 0
                        || self.exact_counts && count > seen
                    {
                        self.fail(format!(
                            "PersistDelivery {key:?} {sequence} count {count}: policy {:?}, \
                             {seen} deliveries seen",
                            g.policy
                        ));
                    }
                    self.stats.persisted_deliveries += 1;
                    let (max, counts) = self.store_deliveries.entry(key).or_default();
                    *max = (*max).max(sequence);
                    if count > 1 {
                        let c = counts.entry(sequence).or_default();
                        *c = (*c).max(count);
                    }
                }
                Action::PersistPolicy {
                    topic,
                    group,
                    max_deliveries,
                    dead_letter_topic,
                } => {
                    let key = (topic.to_string(), group.to_string());
                    let want = self.groups.get(&key).map(|g| &g.policy);
                    if self.expect_policy.take().as_ref() != Some(&key)
                        || want.map(|p| (p.max_deliveries, &p.dead_letter_topic))
                            != Some((max_deliveries, &dead_letter_topic))
                    {
                        self.fail(format!(
                            "PersistPolicy {key:?} {max_deliveries} {dead_letter_topic:?} \
                             unexpected (model: {want:?})"
                        ));
                    }
                    self.store_policies
                        .insert(key, (max_deliveries, dead_letter_topic));
                }
                Action::CreateTopic {
                    topic,
                    created_at_ms,
                } => {
                    self.store
                        .entry(topic.to_string())
                        .or_insert_with(|| StoreTopic {
                            created_at_ms,
                            messages: BTreeMap::new(),
                            last_ordinal: 0,
                        });
                }
                Action::End { sub, reason } => ends.push((sub, reason)),
                // Only gateways sharing a store act on it.
                Action::GroupIdle { .. } => {}
                Action::Heartbeat { sub, latest_seq } => {
                    let interval = self.config.heartbeat_interval_ms;
                    let now = self.now;
                    let Some(s) = self.subs.get_mut(&sub) else {
                        self.fail(format!("Heartbeat for sub {sub}, which is not open"));
                    };
                    let idle_since = s.last_activity_ms;
                    s.last_activity_ms = now;
                    let last = self.topic_last.get(&s.topic).copied().unwrap_or(0);
                    if interval == 0 || idle_since + interval > now {
                        self.fail(format!(
                            "Heartbeat for sub {sub} active at {idle_since}, now {now}"
                        ));
                    }
                    if latest_seq != last {
                        self.fail(format!(
                            "Heartbeat latest_seq {latest_seq}, topic's last is {last}"
                        ));
                    }
                }
            }
        }
        let mut expected = std::mem::take(&mut self.expect_ends);
        expected.sort_by_key(|e| e.0);
        ends.sort_by_key(|e| e.0);
        if ends != expected {
            self.fail(format!("ends {ends:?}, expected {expected:?}"));
        }
    }

    /// A group moves a message past its `max_deliveries`: the sim checks the
    /// request and plays the writer (the group's older coalesced cursor
    /// first, as the reactor sends it; then one commit: the copy appended to
    /// the dead-letter topic, the record, the cursor if asked and still
    /// below), reporting back in commit order. Some moves fail.
    fn dead_letter(&mut self, d: DeadLetter) {
        let seq = d.message.sequence;
        let key = (d.topic.to_string(), d.group.to_string());
        self.note(format!(
            "DeadLetter {}/{} {seq} (count {}) -> {}{}",
            d.topic,
            d.group,
            d.delivery_count,
            d.dead_letter_topic,
            if d.advance_cursor {
                ", advance cursor"
            } else {
                ""
            }
        ));
        self.stats.dead_letters += 1;
        let Some(gm) = self.groups.get(&key) else {
            self.fail(format!("DeadLetter for unknown group {key:?}"));
        };
        let problem = if !self
            .committed
            .get(&seq)
            .is_some_and(|(t, m)| *t == key.0 && **m == *d.message)
        {
            Some("not the stored message".to_string())
        } else if seq <= gm.cursor {
            Some(format!("at or below the cursor {}", gm.cursor))
        } else if let Some(before) = gm.dead.get(&seq) {
            Some(format!("dead-lettered twice for the group ({before:?})"))
        } else if gm.policy.max_deliveries == 0
            || gm.policy.dead_letter_topic.as_deref() != Some(&*d.dead_letter_topic)
        {
            Some(format!("not the group's policy {:?}", gm.policy))
        } else if d.delivery_count < gm.policy.max_deliveries
            || self.exact_counts && d.delivery_count != gm.counts.get(&seq).copied().unwrap_or(0)
        {
            Some(format!(
                "delivery count, {} deliveries seen, policy {:?}",
                gm.counts.get(&seq).copied().unwrap_or(0),
                gm.policy
            ))
        } else if d.reason != DEAD_LETTER_REASON_MAX_DELIVERIES {
            Some(format!("reason {}", d.reason))
        } else if gm.active.is_none() {
            Some("the group has no consumer".to_string())
        } else if d.advance_cursor {
            self.store
                .get(&key.0)
                .and_then(|t| t.messages.range(gm.cursor + 1..seq).next())
                .map(|(z, _)| format!("advance_cursor past stored message {z}"))
        } else {
            None
        };
        if let Some(p) = problem {
            self.fail(format!("DeadLetter {key:?} {seq}: {p}"));
        }
        let gm = self.groups.get_mut(&key).expect("checked");
        gm.dead.insert(
            seq,
            DeadModel {
                committed: false,
                copy: None,
            },
        );
        gm.dead_asked.insert(seq);
        if let Some(sub) = gm.active {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.redo.remove(&seq);
                s.unacked.remove(&seq);
            }
            // A timer the pending redelivery it dropped leaves behind.
            let pending = self
                .b
                .subs
                .get(&sub)
                .is_some_and(|s| s.redeliver_pending.contains_key(&seq));
            let left: Vec<(u64, Timer)> = self
                .b
                .timers
                .iter()
                .filter(|(_, t)| *t == Timer::Redeliver { sub, seq })
                .copied()
                .collect();
            if !pending && !left.is_empty() {
                self.fail(format!(
                    "sub {sub}: dead-lettering {seq} left timers {left:?}"
                ));
            }
        }
        if let Some((cursor, _)) = self.coalesced.remove(&key) {
            self.write_cursor(key.clone(), cursor);
        }
        if !self.settling && self.rng.chance(15) {
            self.note(format!("writer: dead-letter move of {seq} fails"));
            self.stats.dead_letter_failures += 1;
            self.outcomes.push_back(Outcome::DeadLettered {
                topic: key.0,
                group: key.1,
                sequence: seq,
                advanced: false,
                copy: None,
            });
            return;
        }
        let wall = self.wall();
        let dlt = d.dead_letter_topic.to_string();
        let t = self.store.entry(dlt.clone()).or_insert_with(|| StoreTopic {
            created_at_ms: wall,
            messages: BTreeMap::new(),
            last_ordinal: 0,
        });
        self.store_seq += 1;
        t.last_ordinal += 1;
        let copy = Arc::new(StoredMessage {
            sequence: self.store_seq,
            ordinal: t.last_ordinal,
            id: MessageId::new(wall, self.store_seq, &dlt),
            timestamp_ms: wall,
            payload: d.message.payload.clone(),
            attributes: d.attributes(),
        });
        t.messages.insert(copy.sequence, copy.clone());
        let created_at_ms = t.created_at_ms;
        self.committed
            .insert(copy.sequence, (dlt.clone(), copy.clone()));
        // The record and the cursor only while the topic is stored.
        let mut advanced = false;
        if self.store.contains_key(&key.0) {
            self.store_dead.insert((key.0.clone(), key.1.clone(), seq));
            if let Some(c) = self
                .store_cursors
                .get_mut(&key)
                .filter(|c| d.advance_cursor && **c < seq)
            {
                *c = seq;
                advanced = true;
                self.stats.dead_letters_advancing += 1;
            }
        }
        if let Some(dm) = self.groups.get_mut(&key).and_then(|g| g.dead.get_mut(&seq)) {
            dm.copy = Some(copy.sequence);
        }
        self.note(format!(
            "writer: {dlt} {} is the copy of {}/{} {seq}{}",
            copy.sequence,
            key.0,
            key.1,
            if advanced { ", cursor moved" } else { "" }
        ));
        self.outcomes.push_back(Outcome::DeadLettered {
            topic: key.0,
            group: key.1,
            sequence: seq,
            advanced,
            copy: Some((dlt, created_at_ms, copy)),
        });
    }

    // ---- invariants after every step ----

    fn check(&mut self) {
        if self.b.subscription_count() != self.subs.len() {
            self.fail(format!(
                "broker has {} subscriptions, model {} ({:?})",
                self.b.subscription_count(),
                self.subs.len(),
                self.subs.keys().collect::<Vec<_>>()
            ));
        }
        for (id, s) in &self.subs {
            let want = s.granted - s.sent;
            if self.b.credit(*id) != Some(want) {
                self.fail(format!(
                    "sub {id}: credit {:?}, granted {} minus sent {}",
                    self.b.credit(*id),
                    s.granted,
                    s.sent
                ));
            }
        }
        if self.b.last_sequence() != self.notified_last {
            self.fail(format!(
                "last_sequence {} but {} was the last committed",
                self.b.last_sequence(),
                self.notified_last
            ));
        }
        self.check_groups();
        self.check_timers();
        // Whatever a stream could send now, it was told about (or it is
        // waiting for its send window, which polls it when it opens, for
        // acks, which do too, or for a redelivery read, whose answer wakes
        // it: an ack deadline that passes frees a place below `max_unacked`
        // without a Wake when its message must be read).
        self.blocked.retain(|s| self.subs.contains_key(s));
        for &id in self.subs.keys() {
            let reading = self
                .b
                .subs
                .get(&id)
                .is_some_and(|s| !s.redeliver_fetches.is_empty());
            if self.b.has_ready(id)
                && !self.woken.contains(&id)
                && !self.blocked.contains(&id)
                && !self.paused(id)
                && !reading
            {
                self.fail(format!("sub {id} has a delivery ready but was not woken"));
            }
        }
        // Deliveries waiting for acks: the ones the model expects, each
        // with its deadline, and no more than `max_unacked` (but for
        // redeliveries while the known issue stands).
        for (id, s) in &self.subs {
            let Some(b) = self.b.subs.get(id) else {
                continue;
            };
            let want: BTreeMap<u64, u64> =
                s.unacked.iter().map(|(&q, &(due, _))| (q, due)).collect();
            if b.unacked != want {
                self.fail(format!(
                    "sub {id}: unacked {:?}, expected {want:?}",
                    b.unacked
                ));
            }
            // Retries of failed dead-letter moves may go past it (and all
            // redeliveries while the known issue stands).
            let again = s.unacked.values().filter(|(_, again)| *again).count();
            if b.unacked.len() > self.config.max_unacked + again {
                self.fail(format!(
                    "sub {id}: {} unacked ({again} redelivered), max_unacked {}",
                    b.unacked.len(),
                    self.config.max_unacked
                ));
            }
        }
    }

    fn check_groups(&mut self) {
        let mut count = 0;
        let topics: Vec<Arc<str>> = self.b.topics().map(|t| t.name.clone()).collect();
        for topic in topics {
            for g in self.b.groups(&topic) {
                count += 1;
                let key = (topic.to_string(), g.name.to_string());
                if let Some(&before) = self.observed.get(&key) {
                    if g.cursor < before {
                        self.fail(format!(
                            "cursor of {topic}/{} moved backwards: {before} -> {}",
                            g.name, g.cursor
                        ));
                    }
                }
                self.observed.insert(key.clone(), g.cursor);
                match self.groups.get(&key) {
                    None => self.fail(format!("broker has group {key:?}, the model does not")),
                    Some(m) if m.cursor != g.cursor => self.fail(format!(
                        "cursor of {topic}/{} is {}, expected {}",
                        g.name, g.cursor, m.cursor
                    )),
                    Some(m) => self.check_group_state(&key, m),
                }
            }
        }
        if count != self.groups.len() {
            self.fail(format!(
                "broker has {count} groups, the model {}",
                self.groups.len()
            ));
        }
    }

    /// The group's policy and dead-lettered messages above its cursor are
    /// the ones the model expects.
    fn check_group_state(&self, key: &GroupKey, m: &GroupModel) {
        let Some(g) = self
            .b
            .topics
            .get(key.0.as_str())
            .and_then(|t| t.groups.get(key.1.as_str()))
        else {
            return;
        };
        if g.policy != m.policy {
            self.fail(format!(
                "{key:?}: policy {:?}, expected {:?}",
                g.policy, m.policy
            ));
        }
        let core: Vec<(u64, bool)> = g
            .dead
            .iter()
            .filter(|(&q, _)| q > g.cursor)
            .map(|(&q, e)| (q, e.committed))
            .collect();
        let model: Vec<(u64, bool)> = m
            .dead
            .range(g.cursor.saturating_add(1)..)
            .map(|(&q, d)| (q, d.committed))
            .collect();
        if core != model {
            self.fail(format!(
                "{key:?}: dead-lettered above the cursor {core:?}, expected {model:?}"
            ));
        }
    }

    /// No timer of a gone subscription; one heartbeat timer per open one; a
    /// redelivery timer for each pending nack not yet due, and no other.
    fn check_timers(&self) {
        let mut heartbeats: BTreeMap<SubId, usize> = BTreeMap::new();
        for &(at, timer) in &self.b.timers {
            match timer {
                Timer::Heartbeat { sub } => {
                    if !self.b.subs.contains_key(&sub) {
                        self.fail(format!("heartbeat timer at {at} outlives sub {sub}"));
                    }
                    *heartbeats.entry(sub).or_default() += 1;
                }
                Timer::AckDeadline { sub, seq } => {
                    let waiting = self.b.subs.get(&sub).and_then(|s| s.unacked.get(&seq));
                    if waiting != Some(&at) {
                        self.fail(format!(
                            "ack-deadline timer ({at}, sub {sub}, seq {seq}) without its delivery"
                        ));
                    }
                }
                Timer::Redeliver { sub, seq } => {
                    let pending = self
                        .b
                        .subs
                        .get(&sub)
                        .and_then(|s| s.redeliver_pending.get(&seq));
                    if pending != Some(&at) {
                        self.fail(format!(
                            "redelivery timer ({at}, sub {sub}, seq {seq}) without its nack \
                             (pending: {pending:?})"
                        ));
                    }
                }
            }
        }
        let want = usize::from(self.config.heartbeat_interval_ms > 0);
        for (&sub, s) in &self.b.subs {
            let have = heartbeats.get(&sub).copied().unwrap_or(0);
            if have != want {
                self.fail(format!("sub {sub} has {have} heartbeat timers"));
            }
            for (&seq, &due) in &s.redeliver_pending {
                if due > self.last_tick
                    && !self
                        .b
                        .timers
                        .contains(&(due, Timer::Redeliver { sub, seq }))
                {
                    self.fail(format!("sub {sub}: nack of {seq} due {due} has no timer"));
                }
            }
        }
    }

    // ---- the end: quiescence and liveness ----

    fn settle(&mut self) {
        self.step += 1;
        self.note("settle: random events stop".into());
        self.settling = true;
        // Every nack and ack deadline comes due; every group gets a
        // consumer (with its dead-letter settings) with credit.
        self.advance(u64::from(MAX_REDELIVERY_DELAY_MS) + 1);
        let idle: Vec<(GroupKey, DeliveryPolicy)> = self
            .groups
            .iter()
            .filter(|(_, g)| g.active.is_none())
            .map(|(k, g)| (k.clone(), g.policy.clone()))
            .collect();
        for ((topic, group), policy) in idle {
            let sub = self.next_sub;
            self.next_sub += 1;
            self.subscribe(sub, topic, Some(group), Start::Earliest, policy);
        }
        for sub in self.live_subs() {
            let credit = self.b.credit(sub).unwrap_or(0);
            if credit < 50_000 {
                self.grant(sub, 100_000);
            }
        }
        // Send windows open: streams stopped by theirs are polled once.
        for sub in std::mem::take(&mut self.blocked) {
            self.pull(sub, usize::MAX);
        }
        self.check();
        let mut quiet = false;
        for _ in 0..SETTLE_ROUNDS {
            self.step += 1;
            let mut busy = false;
            while let Some(o) = self.outcomes.pop_front() {
                self.apply_outcome(o);
                busy = true;
            }
            if !self.coalesced.is_empty() {
                self.flush_cursors();
                busy = true;
            }
            for f in std::mem::take(&mut self.reads) {
                self.read(f, false);
                busy = true;
            }
            for p in std::mem::take(&mut self.pages) {
                self.deliver_page(p);
                busy = true;
            }
            // Only woken streams are pulled: a missing Wake stalls them.
            for sub in std::mem::take(&mut self.woken) {
                if self.pull(sub, usize::MAX) > 0 {
                    busy = true;
                }
            }
            // Streams paused at `max_unacked` ack what they got.
            for sub in self.live_subs() {
                if !self.paused(sub) {
                    continue;
                }
                let s = &self.subs[&sub];
                let Some(&last) = s.unacked.keys().next_back() else {
                    continue;
                };
                let id = self.committed[&last].1.id.to_string();
                self.ack(sub, &[id]);
                busy = true;
            }
            self.check();
            // A pull that only dead-lettered sent nothing but asked for writes.
            if !self.outcomes.is_empty() || !self.coalesced.is_empty() {
                busy = true;
            }
            // Failed dead-letter moves are tried again a second later.
            let retry = self
                .b
                .timers
                .iter()
                .find(|(_, t)| matches!(t, Timer::Redeliver { .. }))
                .map(|&(at, _)| at);
            if let (false, Some(at)) = (busy, retry) {
                self.advance(at.saturating_sub(self.now));
                self.check();
                busy = true;
            }
            if !busy {
                quiet = true;
                break;
            }
        }
        if !quiet {
            self.fail(format!("no quiescence after {SETTLE_ROUNDS} rounds"));
        }
        self.check_liveness();
        self.ack_everything();
        self.close_everything();
    }

    /// Every stored message past a consumer's cursor (or start) was sent to
    /// it or, for its group, dead-lettered, and every redelivery it still
    /// owes was made; every committed dead-letter move has its copy.
    fn check_liveness(&self) {
        for (id, s) in &self.subs {
            let (after, dead) = match &s.group {
                Some(g) => {
                    let gm = &self.groups[&(s.topic.clone(), g.clone())];
                    (gm.cursor, Some(&gm.dead))
                }
                None => (s.lower, None),
            };
            let is_dead = |q: u64| dead.is_some_and(|d| d.get(&q).is_some_and(|d| d.committed));
            let Some(t) = self.store.get(&s.topic) else {
                continue;
            };
            let Some(from) = after.checked_add(1) else {
                continue;
            };
            if let Some((&seq, _)) = t
                .messages
                .range(from..)
                .find(|(&seq, _)| !s.seen.contains(&seq) && !is_dead(seq))
            {
                self.fail(format!(
                    "liveness: sub {id} ({} {:?}) never got stored message {seq} \
                     (after {after}; credit {:?}; broker has it ready: {})",
                    s.topic,
                    s.group,
                    self.b.credit(*id),
                    self.b.has_ready(*id)
                ));
            }
            if let Some((seq, redo)) = s
                .redo
                .iter()
                .find(|(&q, _)| q > after && t.messages.contains_key(&q) && !is_dead(q))
            {
                self.fail(format!(
                    "liveness: sub {id}: {seq} never redelivered ({redo:?})"
                ));
            }
        }
        for ((topic, group), g) in &self.groups {
            for (&seq, d) in g.dead.iter().filter(|(_, d)| d.committed) {
                let copy = d.copy.and_then(|c| self.committed.get(&c));
                let Some((dlt, m)) = copy else {
                    self.fail(format!(
                        "{topic}/{group} {seq}: dead-lettered without a copy"
                    ));
                };
                let a = &m.attributes;
                let stored = self
                    .store
                    .get(dlt)
                    .is_some_and(|t| t.messages.contains_key(&m.sequence))
                    || self.gone.contains(&m.sequence);
                if !stored
                    || a["sluice-dead-letter-topic"] != *topic
                    || a["sluice-dead-letter-group"] != *group
                    || a["sluice-dead-letter-sequence"] != seq.to_string()
                    || !self
                        .store_dead
                        .contains(&(topic.clone(), group.clone(), seq))
                        && self.store.contains_key(topic)
                {
                    self.fail(format!(
                        "{topic}/{group} {seq}: copy {} in {dlt} (stored: {stored}) {a:?}",
                        m.sequence
                    ));
                }
            }
        }
    }

    /// Consumers ack all they got; once written, each cursor's ordinal is
    /// the ordinal of its message.
    fn ack_everything(&mut self) {
        for sub in self.live_subs() {
            let s = &self.subs[&sub];
            if s.group.is_none() {
                continue;
            }
            if let Some(&last) = s.seen.last() {
                let id = self.committed[&last].1.id.to_string();
                self.ack(sub, &[id]);
            }
        }
        self.check();
        self.flush_cursors();
        while let Some(o) = self.outcomes.pop_front() {
            self.apply_outcome(o);
        }
        self.check();
        for ((topic, group), g) in &self.groups {
            if g.ahead_of_store {
                continue;
            }
            let Some(m) = self
                .store
                .get(topic)
                .and_then(|t| t.messages.get(&g.cursor))
            else {
                continue;
            };
            let view = self
                .b
                .groups(topic)
                .into_iter()
                .find(|v| *v.name == **group)
                .expect("checked");
            if view.cursor_ordinal != m.ordinal {
                self.fail(format!(
                    "{topic}/{group}: cursor {} has ordinal {}, broker says {}",
                    g.cursor, m.ordinal, view.cursor_ordinal
                ));
            }
        }
    }

    /// All streams close: nothing of them may stay behind.
    fn close_everything(&mut self) {
        for sub in self.live_subs() {
            self.unsubscribe(sub);
        }
        self.check();
        let left = !self.b.timers.is_empty();
        if self.b.subscription_count() != 0 || left {
            self.fail(format!(
                "after every stream closed: {} subscriptions, timers {:?}",
                self.b.subscription_count(),
                self.b.timers
            ));
        }
        if let Some(at) = self.b.next_deadline().filter(|_| left) {
            self.fail(format!(
                "after every stream closed a deadline remains: {at}"
            ));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

#[test]
fn seeded_simulation() {
    let seeds: Vec<u64> = match env_u64("SLUICE_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("SLUICE_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let mut total = Stats::default();
    for seed in seeds {
        let mut sim = Sim::new(seed);
        sim.run();
        total.add(sim.stats);
    }
    eprintln!("broker sim: {total:?}");
}
