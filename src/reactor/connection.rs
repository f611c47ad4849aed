//! `Connection`: one client TCP connection driven as an h2 server, and the
//! table of its gRPC calls. The connection itself is one task (handshake,
//! accepting streams, flushing frames); each call is a task of its own, so
//! only woken calls are polled.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::{Connection as H2Connection, Handshake};

use super::health::WatchCall;
use super::inbound::RequestReader;
use super::metered_io::{MeteredIo, ReadMeter};
use super::reflection::ReflectionCall;
use super::subscribe::SubscribeCall;
use super::task::{ReadyQueue, TaskId, TaskWaker};
use super::timers::{Timer, TimerSet};
use super::unary::UnaryCall;
use super::Shared;
use crate::grpc::headers::{
    check_request, http_refusal, response_headers_with, trailers_only, Method, Refusal,
};
use crate::grpc::{Code, Status};
use crate::socket_io::SocketIo;

/// The HTTP/2 connection-level receive window (4 MiB).
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Bytes one connection may read per reactor turn: a connection that has
/// more waiting is polled again next turn, after every other ready one.
pub const READ_BUDGET_PER_TURN: usize = 64 * 1024;
/// Control frames (all but DATA, HEADERS, CONTINUATION) one connection may
/// send within a second before it is sent GOAWAY ENHANCE_YOUR_CALM. Honest
/// clients send a few per call at most (WINDOW_UPDATE as they read,
/// SETTINGS, PING, RST_STREAM); floods send millions.
pub const MAX_CONTROL_FRAMES_PER_SECOND: u64 = 10_000;

pub enum Call {
    Unary(UnaryCall),
    Subscribe(SubscribeCall),
    Watch(WatchCall),
    Reflection(ReflectionCall),
}

impl Call {
    /// The call's request stream.
    pub fn reader_mut(&mut self) -> &mut RequestReader {
        match self {
            Call::Unary(c) => c.reader_mut(),
            Call::Subscribe(c) => c.reader_mut(),
            Call::Watch(c) => c.reader_mut(),
            Call::Reflection(c) => c.reader_mut(),
        }
    }

    /// A request message did not complete within `timeout`.
    pub fn message_timed_out(&mut self, timeout: Duration) {
        let status = Status::new(
            Code::DeadlineExceeded,
            format!("a request message did not complete within {timeout:?} (--message-timeout)"),
        );
        match self {
            Call::Unary(c) => c.message_timed_out(status),
            Call::Subscribe(c) => c.finish(status),
            Call::Watch(c) => c.finish(status),
            Call::Reflection(c) => c.finish(status),
        }
    }

    /// The call's deadline passed.
    pub fn expire(&mut self) {
        let status = || Status::new(Code::DeadlineExceeded, "deadline exceeded");
        match self {
            Call::Unary(c) => c.expire(),
            Call::Subscribe(c) => c.finish(status()),
            Call::Watch(c) => c.finish(status()),
            Call::Reflection(c) => c.finish(status()),
        }
    }
}

struct Slot {
    uid: u64,
    /// When the call's `grpc-timeout` expires (its timer goes with it).
    deadline: Option<Instant>,
    task: Arc<TaskWaker>,
    waker: Waker,
    call: Call,
}

enum Phase {
    Handshaking(Handshake<MeteredIo, Bytes>),
    Serving(H2Connection<MeteredIo, Bytes>),
    Closed,
}

pub struct Connection {
    token: usize,
    fd: RawFd,
    phase: Phase,
    /// What this connection's socket reads did this turn.
    meter: Rc<ReadMeter>,
    /// The reactor turn `meter`'s budget was last refilled in.
    budget_turn: u64,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    task: Arc<TaskWaker>,
    waker: Waker,
    queue: Arc<ReadyQueue>,
    draining: bool,
    born: Instant,
    ping: Option<h2::PingPong>,
    /// When the outstanding keepalive ping went out.
    ping_sent: Option<Instant>,
    last_pong: Instant,
    peer_ip: IpAddr,
    /// Since when no call has been open (None while one is).
    idle_since: Option<Instant>,
    /// A connection idle this long is sent GOAWAY.
    max_idle: Duration,
    /// When the GOAWAY for being idle went out.
    idle_goaway_sent: Option<Instant>,
    /// When this connection's `Timer::Connection` is due (it has one
    /// while it is in the reactor's table).
    timer_at: Option<Instant>,
}

/// Keepalive settings: ping a connection every `interval`; a peer that does
/// not answer within `timeout` (or finish its handshake within `timeout`)
/// is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// What a keepalive tick decided.
pub enum Liveness {
    Dead(&'static str),
    /// Check again then.
    Next(Instant),
}

/// HTTP/2 settings for every connection.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub max_message_bytes: usize,
}

impl Connection {
    pub fn new(
        token: usize,
        io: SocketIo,
        peer_ip: IpAddr,
        settings: &H2Settings,
        max_idle: Duration,
        queue: Arc<ReadyQueue>,
    ) -> Self {
        let fd = io.stream.as_raw_fd();
        let (io, meter) = MeteredIo::new(io, MAX_CONTROL_FRAMES_PER_SECOND);
        // What one connection may send before its data is read and released:
        // the bound on what a peer parks in h2's buffers when the in-flight
        // budget withholds window.
        let conn_window = settings
            .stream_window
            .saturating_mul(4)
            .max(CONNECTION_WINDOW)
            .min(i32::MAX as u32);
        let handshake = h2::server::Builder::new()
            .max_concurrent_streams(settings.max_concurrent_streams)
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(conn_window)
            .max_frame_size(64 * 1024)
            .max_header_list_size(64 * 1024)
            .max_send_buffer_size(256 * 1024)
            .handshake(io);
        let (task, waker) = TaskWaker::new(
            TaskId {
                conn: token,
                slot: None,
            },
            queue.clone(),
        );
        let now = Instant::now();
        Connection {
            token,
            fd,
            phase: Phase::Handshaking(handshake),
            meter,
            budget_turn: 0,
            slots: Vec::new(),
            free: Vec::new(),
            task,
            waker,
            queue,
            draining: false,
            born: now,
            ping: None,
            ping_sent: None,
            last_pong: now,
            peer_ip,
            idle_since: Some(now),
            max_idle,
            idle_goaway_sent: None,
            timer_at: None,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn peer_ip(&self) -> IpAddr {
        self.peer_ip
    }

    /// Since when no call has been open on this connection (None: one is).
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Moves (or with `None` cancels) this connection's check timer.
    pub fn set_timer(&mut self, timers: &mut TimerSet, at: Option<Instant>) {
        timers.rearm(&mut self.timer_at, at, Timer::Connection(self.token));
    }

    /// Moves the check timer earlier to `at` (never later).
    fn timer_by(&mut self, timers: &mut TimerSet, at: Instant) {
        if self.timer_at.is_none_or(|t| at < t) {
            self.set_timer(timers, Some(at));
        }
    }

    /// The reactor took this connection's timer due at `at` off its set.
    pub fn timer_fired(&mut self, at: Instant) {
        if self.timer_at == Some(at) {
            self.timer_at = None;
        }
    }

    fn open_calls(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn schedule(&self) {
        self.task.schedule();
    }

    /// Schedules one call's task.
    pub fn schedule_slot(&self, slot: usize) {
        if let Some(Some(s)) = self.slots.get(slot) {
            s.task.schedule();
        }
    }

    /// The call in `slot`, if it still belongs to `uid`.
    pub fn call_mut(&mut self, slot: usize, uid: u64) -> Option<&mut Call> {
        match self.slots.get_mut(slot) {
            Some(Some(s)) if s.uid == uid => Some(&mut s.call),
            _ => None,
        }
    }

    /// Every call (for shutdown and teardown).
    pub fn calls_mut(&mut self) -> impl Iterator<Item = (u64, usize, &mut Call)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.as_mut().map(|s| (s.uid, i, &mut s.call)))
    }

    /// Sends GOAWAY and lets in-flight calls finish.
    pub fn start_drain(&mut self) {
        if !self.draining {
            self.draining = true;
            if let Phase::Serving(c) = &mut self.phase {
                c.graceful_shutdown();
            }
            self.schedule();
        }
    }

    /// The periodic check: keepalive, and GOAWAY once idle too long.
    pub fn check(&mut self, now: Instant, k: &Keepalive) -> Liveness {
        let next = match self.keepalive(now, k) {
            Liveness::Next(at) => at,
            dead => return dead,
        };
        match self.idle_check(now, k) {
            Ok(Some(at)) => Liveness::Next(next.min(at)),
            Ok(None) => Liveness::Next(next),
            Err(why) => Liveness::Dead(why),
        }
    }

    /// Sends GOAWAY (NO_ERROR, the two-step graceful one, so a call racing
    /// it is still served) to a connection that has had no open call for
    /// `max_idle`; drops it if it is still there, callless, `k.timeout`
    /// later. Returns when to check again.
    fn idle_check(&mut self, now: Instant, k: &Keepalive) -> Result<Option<Instant>, &'static str> {
        if let Some(sent) = self.idle_goaway_sent {
            if self.open_calls() > 0 {
                return Ok(None);
            }
            return if now >= sent + k.timeout {
                Err("still open after GOAWAY for being idle")
            } else {
                Ok(Some(sent + k.timeout))
            };
        }
        if self.draining {
            return Ok(None);
        }
        let Some(since) = self.idle_since else {
            return Ok(None);
        };
        let Phase::Serving(conn) = &mut self.phase else {
            // The handshake has its own limit (keepalive timeout).
            return Ok(None);
        };
        let at = since + self.max_idle;
        if now < at {
            return Ok(Some(at));
        }
        log::debug!(
            "conn {}: no open stream for {:?}; sending GOAWAY",
            self.token,
            now - since
        );
        conn.graceful_shutdown();
        self.idle_goaway_sent = Some(now);
        self.schedule();
        Ok(Some(now + k.timeout))
    }

    /// Closes the connection now (it has no open call): GOAWAY (NO_ERROR)
    /// is written if the socket takes it; the caller then drops it.
    pub fn goaway_now(&mut self, shared: &mut Shared) {
        if let Phase::Serving(conn) = &mut self.phase {
            conn.abrupt_shutdown(h2::Reason::NO_ERROR);
            // Drives h2 to write the GOAWAY and shut the socket's write side.
            self.drive(shared);
        }
    }

    /// Sends keepalive pings and notices dead peers.
    fn keepalive(&mut self, now: Instant, k: &Keepalive) -> Liveness {
        let conn = match &mut self.phase {
            Phase::Closed => return Liveness::Dead("closed"),
            Phase::Handshaking(_) => {
                return if now >= self.born + k.timeout {
                    Liveness::Dead("no HTTP/2 handshake in time")
                } else {
                    Liveness::Next(self.born + k.timeout)
                };
            }
            Phase::Serving(conn) => conn,
        };
        if let Some(sent) = self.ping_sent {
            return if now >= sent + k.timeout {
                Liveness::Dead("no answer to keepalive ping")
            } else {
                Liveness::Next(sent + k.timeout)
            };
        }
        if now < self.last_pong + k.interval {
            return Liveness::Next(self.last_pong + k.interval);
        }
        if self.ping.is_none() {
            self.ping = conn.ping_pong();
        }
        let Some(ping) = self.ping.as_mut() else {
            return Liveness::Next(now + k.interval);
        };
        match ping.send_ping(h2::Ping::opaque()) {
            Ok(()) => {
                self.ping_sent = Some(now);
                self.schedule();
                Liveness::Next(now + k.timeout)
            }
            Err(_) => Liveness::Dead("cannot ping"),
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Drives the connection task: handshake, then accept new streams,
    /// reading at most this turn's budget. A connection that used it up is
    /// listed in `shared.read_starved` (the reactor polls it again next
    /// turn); one flooding control frames is sent GOAWAY and closed.
    pub fn poll(&mut self, shared: &mut Shared) {
        if self.budget_turn != shared.turn {
            self.budget_turn = shared.turn;
            self.meter.refill(READ_BUDGET_PER_TURN);
        }
        self.drive(shared);
        if self.meter.flooding() && !self.is_closed() {
            self.calm(shared);
        } else if self.meter.starved() && !self.is_closed() {
            shared.read_starved.push(self.token);
        }
    }

    /// A peer flooding control frames: GOAWAY ENHANCE_YOUR_CALM (written
    /// if the socket takes it), then the connection is closed without
    /// waiting for its calls.
    fn calm(&mut self, shared: &mut Shared) {
        crate::log_limited!(
            log::Level::Warn,
            "conn {} from {}: more than {MAX_CONTROL_FRAMES_PER_SECOND} control frames \
             (PRIORITY, WINDOW_UPDATE, PING, SETTINGS, RST_STREAM, unknown types) within a second; \
             sending GOAWAY ENHANCE_YOUR_CALM and closing it",
            self.token,
            self.peer_ip
        );
        if let Phase::Serving(conn) = &mut self.phase {
            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            // Writes the GOAWAY and shuts the socket's write side.
            self.drive(shared);
        }
        self.phase = Phase::Closed;
    }

    /// One poll of h2: the handshake, then accepting streams.
    fn drive(&mut self, shared: &mut Shared) {
        self.task.clear();
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        if let Phase::Handshaking(hs) = &mut self.phase {
            match Pin::new(hs).poll(&mut cx) {
                Poll::Ready(Ok(mut conn)) => {
                    if self.draining {
                        conn.graceful_shutdown();
                    }
                    self.phase = Phase::Serving(conn);
                }
                Poll::Ready(Err(e)) => {
                    log::debug!("conn {}: handshake failed: {e}", self.token);
                    self.phase = Phase::Closed;
                    return;
                }
                Poll::Pending => return,
            }
        }
        if self.ping_sent.is_some() {
            if let Some(ping) = self.ping.as_mut() {
                if let Poll::Ready(Ok(_)) = ping.poll_pong(&mut cx) {
                    self.ping_sent = None;
                    self.last_pong = Instant::now();
                }
            }
        }
        loop {
            let Phase::Serving(conn) = &mut self.phase else {
                return;
            };
            match conn.poll_accept(&mut cx) {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    self.open_call(request, respond, shared)
                }
                Poll::Ready(Some(Err(e))) => {
                    if e.is_io() || e.is_go_away() {
                        log::debug!("conn {}: closed: {e}", self.token);
                    } else {
                        log::debug!("conn {}: protocol error: {e}", self.token);
                    }
                    self.phase = Phase::Closed;
                    return;
                }
                Poll::Ready(None) => {
                    self.phase = Phase::Closed;
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    fn open_call(
        &mut self,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        shared: &mut Shared,
    ) {
        // A refused call is use of the connection too: the idle clock restarts.
        if self.idle_since.is_some() {
            self.idle_since = Some(Instant::now());
        }
        let info = match check_request(&request) {
            Ok(info) => info,
            Err(Refusal::Http(code, why)) => {
                super::unary::warn_rejected(
                    request.uri().path(),
                    &Status::new(Code::Unknown, format!("HTTP {code}: {why}")),
                );
                let _ = respond.send_response(http_refusal(code, why), true);
                return;
            }
            Err(Refusal::Grpc(status)) => {
                super::unary::warn_rejected(request.uri().path(), &status);
                let _ = respond.send_response(trailers_only(&status), true);
                return;
            }
        };
        // Health checks are answered during shutdown (NOT_SERVING).
        let health = matches!(info.method, Method::HealthCheck | Method::HealthWatch);
        if (self.draining || shared.shutting_down) && !health {
            let status = shared.stopping_status();
            let _ = respond.send_response(trailers_only(&status), true);
            return;
        }
        let recv = request.into_body();
        let max = shared.max_message_bytes;
        let call = match info.method {
            Method::Subscribe | Method::HealthWatch | Method::Reflection { .. } => {
                let send =
                    match respond.send_response(response_headers_with(info.respond_gzip), false) {
                        Ok(send) => send,
                        Err(e) => {
                            log::debug!("conn {}: stream response failed: {e}", self.token);
                            return;
                        }
                    };
                match info.method {
                    Method::Subscribe => {
                        Call::Subscribe(SubscribeCall::new(recv, send, max, &info))
                    }
                    Method::HealthWatch => Call::Watch(WatchCall::new(recv, send, max, &info)),
                    _ => Call::Reflection(ReflectionCall::new(recv, send, max, &info)),
                }
            }
            _ => Call::Unary(UnaryCall::new(&info, recv, respond, max)),
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let uid = shared.next_uid();
        let (task, waker) = TaskWaker::new(
            TaskId {
                conn: self.token,
                slot: Some(slot),
            },
            self.queue.clone(),
        );
        task.schedule();
        shared.routes.insert(uid, (self.token, slot));
        let deadline = info.timeout.map(|t| Instant::now() + t);
        if let Some(at) = deadline {
            shared.add_timer(at, Timer::Deadline(uid));
        }
        self.slots[slot] = Some(Slot {
            uid,
            deadline,
            task,
            waker,
            call,
        });
        self.idle_since = None;
    }

    /// Drives one call's task.
    pub fn poll_slot(&mut self, slot: usize, shared: &mut Shared) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        s.task.clear();
        let waker = s.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let uid = s.uid;
        let done = match &mut s.call {
            Call::Unary(c) => c.poll(uid, shared, &mut cx),
            Call::Subscribe(c) => c.poll(uid, shared, &mut cx),
            Call::Watch(c) => c.poll(uid, shared, &mut cx),
            Call::Reflection(c) => c.poll(uid, shared, &mut cx),
        };
        if done {
            self.release(slot, shared);
            return;
        }
        let reader = s.call.reader_mut();
        if !reader.is_open() {
            // Finished or half-closed: what it held goes back to the budget
            // now, not when a slow peer finally takes the rest of the reply.
            reader.close(&mut shared.inflight, uid);
        } else if let Some(at) = reader.arm_stall_timer(shared.message_timeout) {
            // A partial message is held: it must complete in time.
            shared.add_timer(at, Timer::MessageStall(uid));
        }
    }

    /// Gives back what a call held: its partial message's budget, its timers.
    fn forget_call(s: &mut Slot, shared: &mut Shared) {
        shared.routes.remove(&s.uid);
        if let Some(at) = s.deadline {
            shared.remove_timer(at, Timer::Deadline(s.uid));
        }
        let reader = s.call.reader_mut();
        if let Some(at) = reader.armed_timer() {
            shared.remove_timer(at, Timer::MessageStall(s.uid));
        }
        reader.close(&mut shared.inflight, s.uid);
    }

    fn release(&mut self, slot: usize, shared: &mut Shared) {
        if let Some(Some(mut s)) = self.slots.get_mut(slot).map(Option::take) {
            Self::forget_call(&mut s, shared);
            self.free.push(slot);
            if self.open_calls() == 0 {
                let now = Instant::now();
                self.idle_since = Some(now);
                self.timer_by(&mut shared.timers, now + self.max_idle);
            }
            // Frames the call queued are written by the connection task.
            self.schedule();
        }
    }

    /// Forgets every call (the connection is being dropped).
    pub fn teardown(&mut self, shared: &mut Shared) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(mut s) = s.take() {
                Self::forget_call(&mut s, shared);
                if let Call::Subscribe(c) = &mut s.call {
                    c.forget(s.uid, shared);
                }
                let _ = i;
            }
        }
        self.set_timer(&mut shared.timers, None);
        self.phase = Phase::Closed;
    }
}
