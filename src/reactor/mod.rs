//! The reactor: one mio thread that owns the listener and every connection,
//! drives HTTP/2 (h2) by polling its futures with our own wakers, applies
//! storage replies to the broker core, carries out the core's actions, and
//! keeps the timers (heartbeats, redelivery, shutdown) as its poll timeout.
//!
//! It never blocks: a full writer queue parks requests (publishers wait for
//! their replies, bounded by HTTP/2 stream limits) while every stream's
//! upstream is still read, so a Subscribe stream's credits and acks always
//! get through.

pub mod connection;
pub mod frame_scan;
pub mod health;
pub mod inbound;
pub mod metered_io;
pub mod outbound;
pub mod reflection;
pub mod rpc;
pub mod subscribe;
pub mod task;
pub mod timers;
pub mod unary;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;

use self::connection::{Call, Connection, H2Settings, Keepalive, Liveness};
use self::task::{ReadyQueue, TaskId};
pub use self::timers::Timer;
use self::timers::TimerSet;
use crate::broker::{Action, Broker};
use crate::grpc::Status;
use crate::socket_io::SocketIo;
use crate::storage::{
    NewMessage, Page, PageRequest, RemoteChange, StoreLinks, WriteOutcome, WriteRequest,
};
use crate::telemetry::{GaugeSnapshot, SubscriptionGauge, Telemetry};

pub const LISTENER: Token = Token(0);
pub const WAKER: Token = Token(1);
pub const SIGNALS: Token = Token(2);
const FIRST_CONN: usize = 3;
/// Rounds of task polling per loop turn, so IO events are not starved.
const TASK_ROUNDS: usize = 32;
/// How soon a failed `accept` (e.g. EMFILE) is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Monotonic and wall time, handed to the broker core.
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    pub fn wall_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
    fn instant_of(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }
}

/// How long a deleted topic or group stays deleted against late puts of
/// its cursor or registry entry seen in the watched buckets.
const DELETE_GRACE: Duration = Duration::from_secs(10);

/// A group's coalesced delivery counts: the highest sequence delivered and
/// (sequence, count) of repeated deliveries.
pub type DeliveryCounts = (u64, BTreeMap<u64, u32>);

/// State every call handler may touch.
pub struct Shared {
    pub broker: Broker,
    writer: Sender<WriteRequest>,
    /// Writer requests waiting for room in its queue (at most one per call).
    parked: VecDeque<WriteRequest>,
    /// Call uid -> (connection token, slot).
    pub routes: HashMap<u64, (usize, usize)>,
    pub max_message_bytes: usize,
    /// Most messages one BatchPublish may carry.
    pub max_batch_messages: usize,
    /// Request bytes held in partial messages, across all calls.
    pub inflight: inbound::InflightBudget,
    /// Appends in flight to topics the broker does not know yet (they count
    /// against `--max-topics` until their commit answers).
    creating: HashMap<Arc<str>, usize>,
    /// How long one request message may take to arrive.
    pub message_timeout: Duration,
    pub clock: Clock,
    pub shutting_down: bool,
    /// A read found the database damaged: health says NOT_SERVING.
    pub store_damaged: bool,
    /// A storage thread died: every call is refused and the process exits.
    pub storage_failed: Option<String>,
    /// The store cannot be reached for now (JetStream): health says
    /// NOT_SERVING until it can.
    pub store_unavailable: Option<String>,
    uid: u64,
    /// Cursor writes coalesced per group until the writer has room.
    pub cursors: HashMap<(Arc<str>, Arc<str>), (u64, i64)>,
    /// Delivery counts of groups with `max_deliveries`, coalesced per group
    /// the same way: the highest sequence delivered, and repeated counts.
    pub deliveries: HashMap<(Arc<str>, Arc<str>), DeliveryCounts>,
    /// The store is shared by several gateways: group consumers are claimed
    /// before they start and released when they end.
    pub claims_groups: bool,
    /// Groups to release once their cursor writes are handed to the writer.
    pub releases: Vec<(Arc<str>, Arc<str>)>,
    /// Topics (group None) and groups deleted lately, here or through
    /// another gateway: a late put of theirs seen in the watched buckets
    /// does not bring them back.
    pub deleted: HashMap<(Arc<str>, Option<Arc<str>>), Instant>,
    /// Claims sent and not yet answered, per group (such a group is not
    /// released: its claim would be undone).
    pub claiming: HashMap<(Arc<str>, Arc<str>), usize>,
    /// Deadlines, connection checks and the like, earliest first.
    timers: TimerSet,
    /// The reactor's loop turn: each connection's read budget is refilled
    /// once per turn.
    pub turn: u64,
    /// Connections that used up this turn's read budget with bytes maybe
    /// still waiting: polled again next turn (their socket is
    /// edge-triggered, so no event would come for those bytes).
    pub read_starved: Vec<usize>,
    pub telemetry: Arc<Telemetry>,
}

impl Shared {
    pub fn add_timer(&mut self, at: Instant, timer: Timer) {
        self.timers.add(at, timer);
    }

    pub fn remove_timer(&mut self, at: Instant, timer: Timer) {
        self.timers.remove(at, timer);
    }

    pub fn next_uid(&mut self) -> u64 {
        self.uid += 1;
        self.uid
    }

    /// Sends a request to the writer, or parks it (in order) if it is full.
    pub fn submit(&mut self, req: WriteRequest) {
        if !self.parked.is_empty() {
            self.parked.push_back(req);
            return;
        }
        match self.writer.try_send(req) {
            Ok(()) => {}
            Err(TrySendError::Full(req)) | Err(TrySendError::Disconnected(req)) => {
                self.parked.push_back(req)
            }
        }
    }

    fn flush_parked(&mut self) {
        while let Some(req) = self.parked.pop_front() {
            if let Err(TrySendError::Full(req) | TrySendError::Disconnected(req)) =
                self.writer.try_send(req)
            {
                self.parked.push_front(req);
                return;
            }
        }
        for req in self.coalesced() {
            self.submit(req);
        }
        for (topic, group) in self.releasable() {
            self.submit(WriteRequest::ReleaseGroup { topic, group });
        }
    }

    /// Hands the group's coalesced cursor write to the writer now (before
    /// a write that must follow it).
    fn submit_cursor_now(&mut self, topic: &Arc<str>, group: &Arc<str>) {
        let key = (topic.clone(), group.clone());
        if let Some((sequence, acked_at_ms)) = self.cursors.remove(&key) {
            self.submit(WriteRequest::SetCursor {
                token: None,
                topic: key.0,
                group: key.1,
                sequence,
                acked_at_ms,
            });
        }
    }

    /// The coalesced cursor and delivery-count writes, taken out.
    fn coalesced(&mut self) -> Vec<WriteRequest> {
        // Cursors first: a new group's row must exist for its counts.
        let mut out = Vec::with_capacity(self.cursors.len() + self.deliveries.len());
        for ((topic, group), (sequence, acked_at_ms)) in self.cursors.drain() {
            out.push(WriteRequest::SetCursor {
                token: None,
                topic,
                group,
                sequence,
                acked_at_ms,
            });
        }
        for ((topic, group), (delivered_max, counts)) in self.deliveries.drain() {
            out.push(WriteRequest::SetDeliveries {
                topic,
                group,
                delivered_max,
                counts: counts.into_iter().collect(),
            });
        }
        out
    }

    /// The groups to release now: those whose consumer has not come back.
    fn releasable(&mut self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut out = std::mem::take(&mut self.releases);
        out.retain(|(t, g)| {
            !self.broker.group_active(t, g) && !self.claiming.contains_key(&(t.clone(), g.clone()))
        });
        out.sort();
        out.dedup();
        out
    }

    /// Remembers a delete for `DELETE_GRACE`.
    pub fn note_deleted(&mut self, topic: &Arc<str>, group: Option<&Arc<str>>) {
        let now = Instant::now();
        self.deleted
            .retain(|_, at| now.duration_since(*at) < DELETE_GRACE);
        self.deleted.insert((topic.clone(), group.cloned()), now);
    }

    /// The topic, or the group, was deleted within `DELETE_GRACE`.
    fn deleted_lately(&self, topic: &Arc<str>, group: Option<&Arc<str>>) -> bool {
        let lately = |k: &(Arc<str>, Option<Arc<str>>)| {
            self.deleted
                .get(k)
                .is_some_and(|at| at.elapsed() < DELETE_GRACE)
        };
        lately(&(topic.clone(), None))
            || group.is_some_and(|g| lately(&(topic.clone(), Some(g.clone()))))
    }

    /// A claim of the group was sent.
    pub fn claim_started(&mut self, topic: &Arc<str>, group: &Arc<str>) {
        *self
            .claiming
            .entry((topic.clone(), group.clone()))
            .or_insert(0) += 1;
    }

    /// A claim of the group was answered.
    pub fn claim_done(&mut self, topic: &Arc<str>, group: &Arc<str>) {
        let key = (topic.clone(), group.clone());
        if let Some(n) = self.claiming.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.claiming.remove(&key);
            }
        }
    }

    pub fn writer_backlog(&self) -> usize {
        self.writer.len() + self.parked.len()
    }

    /// An append to `topic` may go ahead: the topic exists, or creating it
    /// stays within `--max-topics` (appends in flight to new topics count).
    pub fn admit_topic(&mut self, topic: &Arc<str>) -> Result<(), Status> {
        if self.broker.topic(topic).is_none() {
            if let Some(n) = self.creating.get_mut(topic) {
                *n += 1;
                return Ok(());
            }
            let (max_topics, _) = self.broker.limits();
            if self.broker.topic_count() + self.creating.len() >= max_topics {
                return Err(Status::new(
                    crate::grpc::Code::ResourceExhausted,
                    format!(
                        "cannot create topic {topic:?}: the limit of {max_topics} topics is reached (--max-topics)"
                    ),
                ));
            }
            self.creating.insert(topic.clone(), 1);
        }
        Ok(())
    }

    /// An append admitted by `admit_topic` was answered.
    fn creation_done(&mut self, topic: &Arc<str>) {
        if let Some(n) = self.creating.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                self.creating.remove(topic);
            }
        }
    }

    /// What health checks report: false while shutting down, after a storage
    /// thread died, or once the database was found damaged.
    pub fn serving(&self) -> bool {
        !self.shutting_down
            && !self.store_damaged
            && self.storage_failed.is_none()
            && self.store_unavailable.is_none()
    }

    /// The status for a call refused because the server is stopping.
    pub fn stopping_status(&self) -> Status {
        match &self.storage_failed {
            Some(why) => Status::unavailable(format!("storage is unavailable: {why}")),
            None => Status::unavailable("server is shutting down"),
        }
    }

    /// At exit: hands the writer everything still parked or coalesced,
    /// waiting for room, so acked cursors are not lost (the writer drains
    /// its queue before it exits).
    fn flush_blocking(&mut self) {
        if self.storage_failed.is_some() {
            return;
        }
        for req in self.coalesced() {
            self.parked.push_back(req);
        }
        for (topic, group) in self.releasable() {
            self.parked
                .push_back(WriteRequest::ReleaseGroup { topic, group });
        }
        while let Some(req) = self.parked.pop_front() {
            if self.writer.send(req).is_err() {
                log::error!(
                    "shutdown: the writer is gone; {} writes not stored",
                    self.parked.len() + 1
                );
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReactorConfig {
    pub h2: H2Settings,
    pub keepalive: Keepalive,
    pub max_connections: usize,
    /// Most connections served at once from one peer IP address.
    pub max_connections_per_ip: usize,
    /// A connection without an open stream for this long is sent GOAWAY.
    pub max_connection_idle: Duration,
    pub max_batch_messages: usize,
    pub max_inflight_bytes: usize,
    pub message_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// The reactor's own event sources, created on its thread.
pub struct ReactorIo {
    pub poll: Poll,
    pub queue: Arc<ReadyQueue>,
    pub listener: TcpListener,
    pub signals: Signals,
}

pub struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    conns: HashMap<usize, Connection>,
    /// Connections served per peer IP address (entries at 0 are removed).
    per_ip: HashMap<IpAddr, usize>,
    /// An `AcceptRetry` timer is pending.
    accept_retry_pending: bool,
    next_token: usize,
    queue: Arc<ReadyQueue>,
    shared: Shared,
    outcomes: Receiver<WriteOutcome>,
    pages: Receiver<Page>,
    reader: Sender<PageRequest>,
    fetches: VecDeque<PageRequest>,
    config: ReactorConfig,
    shutdown_deadline: Option<Instant>,
}

impl Reactor {
    /// Builds the reactor. Must run on the thread that will call `run`.
    pub fn new(
        io: ReactorIo,
        broker: Broker,
        telemetry: Arc<Telemetry>,
        links: StoreLinks,
        config: ReactorConfig,
    ) -> std::io::Result<Self> {
        let ReactorIo {
            poll,
            queue,
            mut listener,
            mut signals,
        } = io;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        Ok(Reactor {
            poll,
            listener: Some(listener),
            signals,
            conns: HashMap::new(),
            per_ip: HashMap::new(),
            accept_retry_pending: false,
            next_token: FIRST_CONN,
            queue,
            shared: Shared {
                broker,
                writer: links.requests,
                parked: VecDeque::new(),
                routes: HashMap::new(),
                max_message_bytes: config.h2.max_message_bytes,
                max_batch_messages: config.max_batch_messages,
                inflight: inbound::InflightBudget::new(config.max_inflight_bytes).with_overdraft(
                    config.h2.max_message_bytes + 5 + config.h2.stream_window as usize,
                ),
                creating: HashMap::new(),
                message_timeout: config.message_timeout,
                clock: Clock {
                    start: Instant::now(),
                },
                shutting_down: false,
                store_damaged: false,
                store_unavailable: None,
                storage_failed: None,
                uid: 0,
                cursors: HashMap::new(),
                deliveries: HashMap::new(),
                claims_groups: links.claims_groups,
                releases: Vec::new(),
                claiming: HashMap::new(),
                deleted: HashMap::new(),
                timers: {
                    let mut timers = TimerSet::default();
                    if telemetry.is_enabled() {
                        timers.add(Instant::now(), Timer::Gauges);
                    }
                    timers
                },
                turn: 0,
                read_starved: Vec::new(),
                telemetry,
            },
            outcomes: links.outcomes,
            pages: links.pages_out,
            reader: links.pages_in,
            fetches: VecDeque::new(),
            config,
            shutdown_deadline: None,
        })
    }

    /// Runs until a signal asks for shutdown and in-flight work is done.
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut ids = Vec::new();
        loop {
            let timeout = if self.queue.is_empty() {
                self.next_timeout()
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.shared.turn += 1;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    SIGNALS => {
                        let got: Vec<i32> = self.signals.pending().collect();
                        if !got.is_empty() {
                            self.begin_shutdown(&got);
                        }
                    }
                    Token(t) => {
                        if let Some(c) = self.conns.get(&t) {
                            c.schedule();
                        }
                    }
                }
            }
            self.drain_storage();
            self.fire_timers();
            let now = self.shared.clock.now_ms();
            self.shared.broker.tick(now);
            self.apply_actions();
            self.run_tasks(&mut ids);
            self.wake_budget_waiters();
            self.shared.flush_parked();
            self.flush_fetches();
            if let Some(deadline) = self.shutdown_deadline {
                let done = self.conns.is_empty()
                    && (self.shared.parked.is_empty() || self.shared.storage_failed.is_some());
                if done {
                    log::info!("shutdown: all connections closed");
                } else if Instant::now() >= deadline {
                    log::warn!(
                        "shutdown: grace period over, closing {} connections",
                        self.conns.len()
                    );
                }
                if done || Instant::now() >= deadline {
                    // The writer keeps committing without anyone reading its
                    // outcomes: so it can never block on a full outcome
                    // channel while this thread blocks on its request queue.
                    self.outcomes = crossbeam_channel::never();
                    self.shared.flush_blocking();
                    return match &self.shared.storage_failed {
                        Some(why) => Err(std::io::Error::other(format!("storage failed: {why}"))),
                        None => Ok(()),
                    };
                }
            }
        }
    }

    /// Expires deadlines and runs keepalive checks that are due.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some((at, timer)) = self.shared.timers.pop_due(now) {
            match timer {
                Timer::Deadline(uid) => {
                    let Some(&(conn, slot)) = self.shared.routes.get(&uid) else {
                        continue;
                    };
                    if let Some(c) = self.conns.get_mut(&conn) {
                        if let Some(call) = c.call_mut(slot, uid) {
                            log::debug!("call {uid}: deadline exceeded");
                            call.expire();
                        }
                        c.schedule_slot(slot);
                    }
                }
                Timer::MessageStall(uid) => {
                    let Some(&(conn, slot)) = self.shared.routes.get(&uid) else {
                        continue;
                    };
                    let timeout = self.shared.message_timeout;
                    if let Some(c) = self.conns.get_mut(&conn) {
                        if let Some(call) = c.call_mut(slot, uid) {
                            if call.reader_mut().stalled(now, timeout) {
                                log::debug!("call {uid}: request message stalled");
                                call.message_timed_out(timeout);
                            }
                        }
                        c.schedule_slot(slot);
                    }
                }
                Timer::Gauges => {
                    self.refresh_gauges();
                    let every = self
                        .shared
                        .telemetry
                        .export_interval()
                        .min(Duration::from_secs(5));
                    self.shared.add_timer(now + every / 2, Timer::Gauges);
                }
                Timer::Connection(token) => {
                    let Some(c) = self.conns.get_mut(&token) else {
                        continue;
                    };
                    c.timer_fired(at);
                    match c.check(now, &self.config.keepalive) {
                        Liveness::Next(at) => c.set_timer(&mut self.shared.timers, Some(at)),
                        Liveness::Dead(why) => {
                            crate::log_limited!(log::Level::Info, "conn {token}: dropped: {why}");
                            self.close(token);
                        }
                    }
                }
                Timer::AcceptRetry => {
                    self.accept_retry_pending = false;
                    self.accept();
                }
            }
        }
    }

    /// Calls that held back HTTP/2 window for lack of budget go again once
    /// some came free.
    fn wake_budget_waiters(&mut self) {
        for uid in self.shared.inflight.take_waiting() {
            if let Some(&(conn, slot)) = self.shared.routes.get(&uid) {
                if let Some(c) = self.conns.get(&conn) {
                    c.schedule_slot(slot);
                }
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let broker = self
            .shared
            .broker
            .next_deadline()
            .map(|ms| self.shared.clock.instant_of(ms));
        let broker = match (broker, self.shared.timers.first_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let at = match (broker, self.shutdown_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|at| at.saturating_duration_since(now))
    }

    /// Accepts every pending connection. Past `--max-connections-per-ip` a
    /// connection is refused; at `--max-connections` the longest-idle
    /// connection without an open stream is closed to make room (if there
    /// is none, the new one is refused). When accept itself fails (out of
    /// file descriptors) it is tried again shortly: the listener is
    /// edge-triggered, so no new event would come for connections already
    /// waiting.
    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "accept failed: {e}; trying again in {ACCEPT_RETRY:?}"
                    );
                    if !self.accept_retry_pending {
                        self.accept_retry_pending = true;
                        self.shared
                            .add_timer(Instant::now() + ACCEPT_RETRY, Timer::AcceptRetry);
                    }
                    return;
                }
            }
        }
    }

    /// Serves a just-accepted connection, or refuses it (by dropping it).
    fn admit(&mut self, mut stream: mio::net::TcpStream, peer: std::net::SocketAddr) {
        let ip = peer_key(peer.ip());
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.config.max_connections_per_ip {
            crate::log_limited!(
                log::Level::Warn,
                "refusing connection from {peer}: --max-connections-per-ip ({}) reached",
                self.config.max_connections_per_ip
            );
            return;
        }
        if self.conns.len() >= self.config.max_connections {
            match self.longest_idle() {
                Some((token, since)) => {
                    crate::log_limited!(
                        log::Level::Info,
                        "--max-connections ({}) reached: closing conn {token} (no stream for {:?}) to admit {peer}",
                        self.config.max_connections,
                        since.elapsed()
                    );
                    self.close_now(token);
                }
                None => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "refusing connection from {peer}: --max-connections ({}) reached",
                        self.config.max_connections
                    );
                    return;
                }
            }
        }
        let _ = stream.set_nodelay(true);
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            crate::log_limited!(
                log::Level::Warn,
                "cannot register connection from {peer}: {e}"
            );
            return;
        }
        log::debug!("conn {token}: accepted from {peer}");
        let mut conn = Connection::new(
            token,
            SocketIo { stream },
            ip,
            &self.config.h2,
            self.config.max_connection_idle,
            self.queue.clone(),
        );
        conn.schedule();
        let keepalive = &self.config.keepalive;
        let first_check = Instant::now()
            + keepalive
                .timeout
                .min(keepalive.interval)
                .min(self.config.max_connection_idle);
        conn.set_timer(&mut self.shared.timers, Some(first_check));
        self.conns.insert(token, conn);
        *self.per_ip.entry(ip).or_insert(0) += 1;
    }

    /// The connection that has gone longest without an open stream.
    fn longest_idle(&self) -> Option<(usize, Instant)> {
        self.conns
            .iter()
            .filter_map(|(&token, c)| c.idle_since().map(|since| (token, since)))
            .min_by_key(|&(token, since)| (since, token))
    }

    /// Closes a connection without an open stream at once: GOAWAY
    /// (NO_ERROR), flushed if the socket takes it, then the socket is closed.
    fn close_now(&mut self, token: usize) {
        if let Some(c) = self.conns.get_mut(&token) {
            let shared = &mut self.shared;
            let _ = catch_unwind(AssertUnwindSafe(|| c.goaway_now(shared)));
        }
        self.close(token);
    }

    /// Applies a change another gateway made to the shared store: its
    /// streams end or move here as they would have there.
    fn apply_remote(&mut self, change: RemoteChange) {
        match change {
            RemoteChange::TopicCreated {
                topic,
                created_at_ms,
            } => {
                if !self.shared.deleted_lately(&topic, None) {
                    self.shared.broker.on_committed(&topic, created_at_ms, &[]);
                }
            }
            RemoteChange::CursorMoved {
                topic,
                group,
                sequence,
                acked_at_ms,
            } => {
                // Only forward: a late put of an earlier owner must not move
                // the cursor back (a reset comes as CursorReset).
                let broker = &mut self.shared.broker;
                let behind = broker
                    .group_cursor(&topic, &group)
                    .is_some_and(|c| sequence <= c);
                if broker.topic(&topic).is_some()
                    && !behind
                    && !self.shared.deleted_lately(&topic, Some(&group))
                {
                    self.shared
                        .broker
                        .adopt_cursor(&topic, &group, sequence, acked_at_ms, 0);
                }
            }
            RemoteChange::TopicDeleted { topic } => {
                self.shared.note_deleted(&topic, None);
                self.shared.broker.delete_topic(&topic);
                self.shared.cursors.retain(|(t, _), _| *t != topic);
            }
            RemoteChange::GroupDeleted { topic, group } => {
                self.shared.note_deleted(&topic, Some(&group));
                self.shared.broker.delete_group(&topic, &group);
                self.shared.cursors.remove(&(topic, group));
            }
            RemoteChange::CursorReset {
                topic,
                group,
                sequence,
            } => {
                // Our coalesced cursor write is older than the reset.
                self.shared.cursors.remove(&(topic.clone(), group.clone()));
                let broker = &mut self.shared.broker;
                if broker.fence_group(&topic, &group) {
                    broker.reset_cursor(&topic, &group, sequence);
                }
            }
        }
    }

    fn drain_storage(&mut self) {
        loop {
            let outcome = match self.outcomes.try_recv() {
                Ok(o) => o,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.storage_failed("the writer thread stopped");
                    break;
                }
            };
            match outcome {
                WriteOutcome::Appended {
                    token,
                    topic,
                    result,
                } => {
                    self.shared.creation_done(&topic);
                    if let Ok(a) = &result {
                        if !a.announced {
                            self.shared
                                .broker
                                .on_committed(&a.topic, a.created_at_ms, &a.messages);
                        }
                    }
                    if let Some(&(conn, slot)) = self.shared.routes.get(&token) {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            if let Some(Call::Unary(call)) = c.call_mut(slot, token) {
                                call.complete(rpc::reply_for_append(call.method(), &result));
                            }
                            c.schedule_slot(slot);
                        }
                    }
                }
                WriteOutcome::DeadLettered {
                    topic,
                    group,
                    sequence,
                    advanced,
                    result,
                } => {
                    match &result {
                        Ok(a) => {
                            if !a.announced {
                                self.shared.broker.on_committed(
                                    &a.topic,
                                    a.created_at_ms,
                                    &a.messages,
                                );
                            }
                            self.shared
                                .telemetry
                                .metrics()
                                .dead_lettered(&topic, &group, 1);
                        }
                        Err(e) => crate::log_limited!(
                            log::Level::Error,
                            "dead-lettering message {sequence} of {topic}/{group} failed: {}; \
                             it is delivered again and retried",
                            e.message
                        ),
                    }
                    let now = self.shared.clock.now_ms();
                    self.shared.broker.on_dead_lettered(
                        &topic,
                        &group,
                        sequence,
                        advanced,
                        result.is_ok(),
                        now,
                    );
                }
                WriteOutcome::CursorSaved {
                    token,
                    topic,
                    group,
                    sequence,
                    ordinal,
                } => {
                    // A ResetCursor (it carries a token) applies now, committed.
                    let reset =
                        token.map(|_| self.shared.broker.reset_cursor(&topic, &group, sequence));
                    self.shared
                        .broker
                        .set_cursor_ordinal(&topic, &group, sequence, ordinal);
                    if let (Some(token), Some(found)) = (token, reset) {
                        self.complete_call(token, Ok(rpc::reset_reply(found)));
                    }
                }
                WriteOutcome::CursorFailed {
                    token,
                    topic,
                    group,
                    error,
                } => {
                    let wall = self.shared.clock.wall_ms();
                    self.shared.broker.unfence_group(&topic, &group, wall);
                    self.complete_call(token, Err(rpc::storage_status(&error)));
                }
                WriteOutcome::TopicDeleted {
                    token,
                    topic,
                    result,
                } => {
                    // Applied now, in commit order: appends committed before
                    // the delete are already in, later ones re-create it.
                    // A failed delete changed nothing on disk: nor here, and
                    // the cursor writes dropped when it was asked for go again.
                    let reply = match result {
                        Ok(stored) => {
                            self.shared.note_deleted(&topic, None);
                            let existed = self.shared.broker.delete_topic(&topic);
                            self.shared.cursors.retain(|(t, _), _| *t != topic);
                            Ok(rpc::delete_topic_reply(stored || existed))
                        }
                        Err(e) => {
                            self.shared.broker.repersist_cursors(&topic);
                            Err(rpc::storage_status(&e))
                        }
                    };
                    self.complete_call(token, reply);
                }
                WriteOutcome::GroupDeleted {
                    token,
                    topic,
                    group,
                    result,
                } => {
                    let reply = match result {
                        Ok(stored) => {
                            self.shared.note_deleted(&topic, Some(&group));
                            let existed = self.shared.broker.delete_group(&topic, &group);
                            self.shared.cursors.remove(&(topic, group));
                            Ok(rpc::delete_group_reply(stored || existed))
                        }
                        Err(e) => {
                            let wall = self.shared.clock.wall_ms();
                            self.shared.broker.group_delete_failed(&topic, &group, wall);
                            Err(rpc::storage_status(&e))
                        }
                    };
                    self.complete_call(token, reply);
                }
                WriteOutcome::Availability { unavailable } => self.store_availability(unavailable),
                WriteOutcome::Remote(change) => self.apply_remote(change),
                WriteOutcome::GroupClaimed {
                    token,
                    topic,
                    group,
                    result,
                    deliveries,
                } => {
                    self.shared.claim_done(&topic, &group);
                    let mut claimed = Some((result, deliveries));
                    self.with_subscription(token, |call, shared| {
                        if let Some((result, deliveries)) = claimed.take() {
                            call.claimed(token, result, deliveries, shared);
                        }
                    });
                    if claimed.is_some() {
                        // The stream is gone: nobody here serves the group.
                        self.shared.releases.push((topic, group));
                    }
                }
                WriteOutcome::GroupLost {
                    topic,
                    group,
                    taken,
                } => {
                    let reason = if taken {
                        log::info!("group {group} of {topic} is now served by another gateway");
                        crate::broker::EndReason::TakenOver
                    } else {
                        crate::broker::EndReason::GroupUnavailable
                    };
                    self.shared
                        .broker
                        .end_group_consumer(&topic, &group, reason);
                    self.shared.releases.push((topic, group));
                }
                WriteOutcome::Committed {
                    topic,
                    created_at_ms,
                    messages,
                } => self
                    .shared
                    .broker
                    .on_committed(&topic, created_at_ms, &messages),
                WriteOutcome::Trimmed {
                    topic,
                    first,
                    removed,
                } => {
                    log::debug!("retention: removed {removed} messages of {topic}");
                    self.shared.broker.on_trimmed(&topic, first);
                }
            }
        }
        loop {
            let page = match self.pages.try_recv() {
                Ok(p) => p,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.storage_failed("the reader thread stopped");
                    break;
                }
            };
            log::debug!(
                "page for sub {} (fetch {}): {} messages{}, end {:?}",
                page.sub,
                page.fetch,
                page.messages.len(),
                page.messages
                    .first()
                    .zip(page.messages.last())
                    .map(|(a, b)| format!(" {}..={}", a.sequence, b.sequence))
                    .unwrap_or_default(),
                page.end
            );
            match page.error {
                None => self
                    .shared
                    .broker
                    .on_page(page.sub, page.fetch, page.messages, page.end),
                Some(e) => self.read_failed(page.sub, &e),
            }
        }
    }

    /// The store became unreachable or reachable again: logged, and health
    /// watchers are told.
    fn store_availability(&mut self, unavailable: Option<String>) {
        if self.shared.store_unavailable == unavailable {
            return;
        }
        match &unavailable {
            Some(why) => log::error!("storage is unavailable ({why}); health reports NOT_SERVING"),
            None => log::info!("storage is reachable again; health reports SERVING"),
        }
        let was_serving = self.shared.serving();
        self.shared.store_unavailable = unavailable;
        let serving = self.shared.serving();
        if was_serving == serving {
            return;
        }
        for conn in self.conns.values_mut() {
            let mut slots = Vec::new();
            for (_, slot, call) in conn.calls_mut() {
                if let Call::Watch(w) = call {
                    w.status_changed(serving);
                    slots.push(slot);
                }
            }
            for slot in slots {
                conn.schedule_slot(slot);
            }
        }
    }

    /// A backlog read failed: the subscription ends with the error (no
    /// retry loop); a damaged database also turns health NOT_SERVING.
    fn read_failed(&mut self, sub: u64, e: &crate::storage::StorageError) {
        let code = if e.corrupt {
            if !self.shared.store_damaged {
                self.shared.store_damaged = true;
                log::error!(
                    "the database is damaged ({}); health now reports NOT_SERVING. \
                     Stop sluice and run `sluice check --data-dir DIR`",
                    e.message
                );
            }
            crate::grpc::Code::DataLoss
        } else if e.unavailable {
            crate::grpc::Code::Unavailable
        } else {
            crate::grpc::Code::Internal
        };
        let status = Status::new(code, format!("cannot read stored messages: {}", e.message));
        self.with_subscription(sub, |call, shared| {
            call.forget(sub, shared);
            call.finish(status);
        });
    }

    /// A storage thread died: said once, every waiting and new call gets
    /// UNAVAILABLE, health reports NOT_SERVING, and the reactor stops soon
    /// after so the process exits non-zero and its service manager restarts
    /// it.
    fn storage_failed(&mut self, why: &str) {
        if self.shared.storage_failed.is_some() {
            return;
        }
        log::error!(
            "storage failed: {why}; answering UNAVAILABLE and exiting so the service manager restarts sluice"
        );
        self.shared.storage_failed = Some(why.to_string());
        self.shared.parked.clear();
        self.shared.cursors.clear();
        self.shared.deliveries.clear();
        self.fetches.clear();
        let status = self.shared.stopping_status();
        for conn in self.conns.values_mut() {
            let mut slots = Vec::new();
            for (_, slot, call) in conn.calls_mut() {
                if let Call::Unary(u) = call {
                    u.complete(Err(status.clone()));
                    slots.push(slot);
                }
            }
            for slot in slots {
                conn.schedule_slot(slot);
            }
        }
        // Already stopping (a signal came first): only hurry it along.
        if self.shutdown_deadline.is_none() {
            self.begin_shutdown(&[]);
        }
        let soon = Instant::now() + Duration::from_secs(1);
        self.shutdown_deadline = self.shutdown_deadline.map(|d| d.min(soon));
    }

    /// Copies what the gauges report into the exporter's snapshot.
    fn refresh_gauges(&mut self) {
        let subscriptions = self
            .shared
            .broker
            .subscription_gauges()
            .into_iter()
            .map(|g| SubscriptionGauge {
                topic: g.topic,
                consumer_group: g.group,
                lag: g.lag,
                backpressure: g.backpressure,
            })
            .collect();
        let gauges = self.shared.telemetry.gauges();
        if let Ok(mut snap) = gauges.lock() {
            *snap = GaugeSnapshot {
                connections: self.conns.len() as u64,
                writer_queue_depth: self.shared.writer_backlog() as u64,
                subscriptions,
            };
        };
    }

    /// Hands a finished writer round trip to the unary call waiting on it.
    fn complete_call(&mut self, token: u64, reply: Result<bytes::Bytes, Status>) {
        let Some(&(conn, slot)) = self.shared.routes.get(&token) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Some(Call::Unary(call)) = c.call_mut(slot, token) {
                call.complete(reply);
            }
            c.schedule_slot(slot);
        }
    }

    /// Carries out what the broker core asked for.
    fn apply_actions(&mut self) {
        while let Some(action) = self.shared.broker.pop_action() {
            match action {
                Action::Wake(sub) => {
                    if let Some(&(conn, slot)) = self.shared.routes.get(&sub) {
                        if let Some(c) = self.conns.get(&conn) {
                            c.schedule_slot(slot);
                        }
                    }
                }
                Action::Fetch(f) => self.fetches.push_back(PageRequest {
                    sub: f.sub,
                    fetch: f.id,
                    topic: f.topic,
                    from: f.from,
                    limit: f.limit,
                }),
                Action::PersistCursor {
                    topic,
                    group,
                    sequence,
                    acked_at_ms,
                } => {
                    self.shared
                        .cursors
                        .insert((topic, group), (sequence, acked_at_ms));
                }
                Action::CreateTopic {
                    topic,
                    created_at_ms,
                } => {
                    self.shared.submit(WriteRequest::CreateTopic {
                        topic,
                        created_at_ms,
                    });
                }
                Action::End { sub, reason } => {
                    self.with_subscription(sub, |call, _| call.ended_by_broker(reason));
                }
                Action::Heartbeat { sub, latest_seq } => {
                    let wall = self.shared.clock.wall_ms();
                    self.with_subscription(sub, |call, _| call.heartbeat(wall, latest_seq));
                }
                Action::GroupIdle { topic, group } => {
                    if self.shared.claims_groups {
                        self.shared.releases.push((topic, group));
                    }
                }
                Action::DeadLetter(d) => {
                    // The group's older coalesced cursor goes first, so it
                    // cannot land after (and below) the one this moves.
                    self.shared.submit_cursor_now(&d.topic, &d.group);
                    let message = NewMessage {
                        payload: d.message.payload.clone(),
                        attributes: d.attributes(),
                        idempotency_key: None,
                    };
                    self.shared.submit(WriteRequest::DeadLetter {
                        topic: d.topic,
                        group: d.group,
                        sequence: d.message.sequence,
                        ordinal: d.message.ordinal,
                        advance_cursor: d.advance_cursor,
                        dead_letter_topic: d.dead_letter_topic,
                        message,
                    });
                }
                Action::PersistDelivery {
                    topic,
                    group,
                    sequence,
                    count,
                } => {
                    let (max, counts) = self.shared.deliveries.entry((topic, group)).or_default();
                    *max = (*max).max(sequence);
                    if count > 1 {
                        counts.insert(sequence, count);
                    }
                }
                Action::PersistPolicy {
                    topic,
                    group,
                    max_deliveries,
                    dead_letter_topic,
                } => {
                    // A new group's first cursor write creates its row.
                    self.shared.submit_cursor_now(&topic, &group);
                    self.shared.submit(WriteRequest::SetPolicy {
                        topic,
                        group,
                        max_deliveries,
                        dead_letter_topic,
                    })
                }
            }
        }
    }

    fn with_subscription(
        &mut self,
        sub: u64,
        f: impl FnOnce(&mut subscribe::SubscribeCall, &mut Shared),
    ) {
        let Some(&(conn, slot)) = self.shared.routes.get(&sub) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(Call::Subscribe(call)) = c.call_mut(slot, sub) {
            f(call, &mut self.shared);
        }
        c.schedule_slot(slot);
    }

    fn flush_fetches(&mut self) {
        while let Some(req) = self.fetches.pop_front() {
            match self.reader.try_send(req) {
                Ok(()) => {}
                Err(TrySendError::Full(req)) | Err(TrySendError::Disconnected(req)) => {
                    self.fetches.push_front(req);
                    return;
                }
            }
        }
    }

    fn run_tasks(&mut self, ids: &mut Vec<TaskId>) {
        let mut dead = Vec::new();
        for _ in 0..TASK_ROUNDS {
            ids.clear();
            self.queue.take(ids);
            if ids.is_empty() {
                break;
            }
            for id in ids.iter() {
                let Some(conn) = self.conns.get_mut(&id.conn) else {
                    continue;
                };
                let shared = &mut self.shared;
                let outcome = catch_unwind(AssertUnwindSafe(|| match id.slot {
                    None => conn.poll(shared),
                    Some(slot) => conn.poll_slot(slot, shared),
                }));
                if outcome.is_err() {
                    crate::log_limited!(
                        log::Level::Error,
                        "conn {}: panic while serving it; dropping the connection",
                        id.conn
                    );
                    dead.push(id.conn);
                } else if conn.is_closed() {
                    dead.push(id.conn);
                }
                self.apply_actions();
            }
        }
        for token in dead {
            self.close(token);
        }
        // After this turn's rounds, so a connection that used its budget
        // waits for every other ready task before it reads again.
        for token in std::mem::take(&mut self.shared.read_starved) {
            if let Some(c) = self.conns.get(&token) {
                c.schedule();
            }
        }
    }

    fn close(&mut self, token: usize) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&conn.fd()));
        let shared = &mut self.shared;
        if catch_unwind(AssertUnwindSafe(|| conn.teardown(shared))).is_err() {
            crate::log_limited!(
                log::Level::Error,
                "conn {token}: panic while tearing it down"
            );
        }
        if let Some(n) = self.per_ip.get_mut(&peer_key(conn.peer_ip())) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&peer_key(conn.peer_ip()));
            }
        }
        log::debug!(
            "conn {token}: closed ({} connections, {} timers pending)",
            self.conns.len(),
            self.shared.timers.len()
        );
        self.apply_actions();
    }

    fn begin_shutdown(&mut self, signals: &[i32]) {
        if self.shutdown_deadline.is_some() {
            log::warn!("second shutdown signal: exiting now");
            self.shutdown_deadline = Some(Instant::now());
            return;
        }
        if signals.is_empty() {
            log::info!("shutdown: draining {} connections", self.conns.len());
        } else {
            log::info!(
                "shutdown: signal {signals:?}, draining {} connections",
                self.conns.len()
            );
        }
        crate::notify::notify("STOPPING=1");
        self.shared.shutting_down = true;
        self.shutdown_deadline = Some(Instant::now() + self.config.shutdown_grace);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        for conn in self.conns.values_mut() {
            conn.start_drain();
            let mut slots = Vec::new();
            for (uid, slot, call) in conn.calls_mut() {
                match call {
                    Call::Subscribe(s) => {
                        s.forget(uid, &mut self.shared);
                        s.finish(self.shared.stopping_status());
                        slots.push(slot);
                    }
                    Call::Watch(w) => {
                        w.shutting_down();
                        slots.push(slot);
                    }
                    Call::Reflection(r) => {
                        r.finish(self.shared.stopping_status());
                        slots.push(slot);
                    }
                    Call::Unary(_) => {}
                }
            }
            for slot in slots {
                conn.schedule_slot(slot);
            }
        }
    }
}

/// What `--max-connections-per-ip` counts by: an IPv4 address, or an IPv6
/// address's /64 (one host or site is usually given a whole /64, so counting
/// single addresses would let it open connections without limit).
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::peer_key;
    use std::net::IpAddr;

    #[test]
    fn connections_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(peer_key(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_ne!(peer_key(ip("10.0.0.7")), peer_key(ip("10.0.0.8")));
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            peer_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(peer_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_ne!(
            peer_key(ip("2001:db8:1:2::1")),
            peer_key(ip("2001:db8:1:3::1"))
        );
        // An IPv4 client reaching an IPv6 socket counts as its IPv4 address.
        assert_eq!(peer_key(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
    }
}
