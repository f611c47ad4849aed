//! `Connection`: one client TCP connection driven as an h2 server, and the
//! table of its gRPC calls. The connection itself is one task (handshake,
//! accepting streams, flushing frames); each call is a task of its own, so
//! only woken calls are polled.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::server::{Connection as H2Connection, Handshake};

use super::io::SocketIo;
use super::subscribe::SubscribeCall;
use super::task::{ReadyQueue, TaskId, TaskWaker};
use super::unary::UnaryCall;
use super::Shared;
use crate::grpc::headers::{
    check_request, http_refusal, response_headers, trailers_only, Method, Refusal,
};
use crate::grpc::Status;

pub enum Call {
    Unary(UnaryCall),
    Subscribe(SubscribeCall),
}

struct Slot {
    uid: u64,
    task: Arc<TaskWaker>,
    waker: Waker,
    call: Call,
}

enum Phase {
    Handshaking(Handshake<SocketIo, Bytes>),
    Serving(H2Connection<SocketIo, Bytes>),
    Closed,
}

pub struct Connection {
    token: usize,
    fd: RawFd,
    phase: Phase,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    task: Arc<TaskWaker>,
    waker: Waker,
    queue: Arc<ReadyQueue>,
    draining: bool,
}

/// HTTP/2 settings for every connection.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub max_message_bytes: usize,
}

impl Connection {
    pub fn new(token: usize, io: SocketIo, settings: &H2Settings, queue: Arc<ReadyQueue>) -> Self {
        let fd = io.stream.as_raw_fd();
        let conn_window = settings
            .stream_window
            .saturating_mul(settings.max_concurrent_streams)
            .saturating_add(1 << 20)
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
        Connection {
            token,
            fd,
            phase: Phase::Handshaking(handshake),
            slots: Vec::new(),
            free: Vec::new(),
            task,
            waker,
            queue,
            draining: false,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
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

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Drives the connection task: handshake, then accept new streams.
    pub fn poll(&mut self, shared: &mut Shared) {
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
        let info = match check_request(&request) {
            Ok(info) => info,
            Err(Refusal::Http(code, why)) => {
                let _ = respond.send_response(http_refusal(code, why), true);
                return;
            }
            Err(Refusal::Grpc(status)) => {
                let _ = respond.send_response(trailers_only(&status), true);
                return;
            }
        };
        if self.draining || shared.shutting_down {
            let status = Status::unavailable("server is shutting down");
            let _ = respond.send_response(trailers_only(&status), true);
            return;
        }
        let recv = request.into_body();
        let call = if info.method == Method::Subscribe {
            match respond.send_response(response_headers(), false) {
                Ok(send) => {
                    Call::Subscribe(SubscribeCall::new(recv, send, shared.max_message_bytes))
                }
                Err(e) => {
                    log::debug!("conn {}: subscribe response failed: {e}", self.token);
                    return;
                }
            }
        } else {
            Call::Unary(UnaryCall::new(
                info.method,
                recv,
                respond,
                shared.max_message_bytes,
            ))
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
        self.slots[slot] = Some(Slot {
            uid,
            task,
            waker,
            call,
        });
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
        };
        if done {
            self.release(slot, shared);
        }
    }

    fn release(&mut self, slot: usize, shared: &mut Shared) {
        if let Some(Some(s)) = self.slots.get_mut(slot).map(Option::take) {
            shared.routes.remove(&s.uid);
            self.free.push(slot);
            // Frames the call queued are written by the connection task.
            self.schedule();
        }
    }

    /// Forgets every call (the connection is being dropped).
    pub fn teardown(&mut self, shared: &mut Shared) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(mut s) = s.take() {
                shared.routes.remove(&s.uid);
                if let Call::Subscribe(c) = &mut s.call {
                    c.forget(s.uid, shared);
                }
                let _ = i;
            }
        }
        self.phase = Phase::Closed;
    }

    pub fn active_calls(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}
