//! `Outbound`: the sending half of a streaming response. Messages are handed
//! to h2 only as HTTP/2 send capacity allows; at most one message is ever
//! partly sent, plus a short queue of control messages (heartbeats, health
//! updates, reflection answers) whose length the caller bounds.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::SendStream;

use crate::grpc::headers::trailers;
use crate::grpc::Status;

/// The peer reset the stream or the connection went away.
#[derive(Debug)]
pub struct StreamGone;

pub struct Outbound {
    send: SendStream<Bytes>,
    /// The message being sent (its unsent rest).
    current: Option<Bytes>,
    queue: VecDeque<Bytes>,
    end: Option<Status>,
}

impl Outbound {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Outbound {
            send,
            current: None,
            queue: VecDeque::new(),
            end: None,
        }
    }

    /// Queues a message (sent before anything pulled later).
    pub fn push(&mut self, message: Bytes) {
        if self.end.is_none() {
            self.queue.push_back(message);
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len() + usize::from(self.current.is_some())
    }

    /// Whether nothing waits to be sent.
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty()
    }

    /// Ends the stream with `status` once what is queued has gone out.
    pub fn finish(&mut self, status: Status) {
        if self.end.is_none() {
            self.end = Some(status);
        }
    }

    pub fn is_finishing(&self) -> bool {
        self.end.is_some()
    }

    /// Whether the client reset the stream.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> bool {
        self.send.poll_reset(cx).is_ready()
    }

    /// Sends what capacity allows: queued messages first, then those `pull`
    /// yields (it is called only when there is room to start one more).
    /// Ok(true) once the trailers are sent; Err when the stream is gone.
    pub fn flush(
        &mut self,
        cx: &mut Context<'_>,
        mut pull: impl FnMut() -> Option<Bytes>,
    ) -> Result<bool, StreamGone> {
        loop {
            if self.current.is_none() {
                self.current = self.queue.pop_front();
            }
            if self.current.is_none() && self.end.is_none() {
                self.current = pull();
            }
            let Some(mut bytes) = self.current.take() else {
                break;
            };
            let room = capacity(&mut self.send, bytes.len(), cx)?;
            if room == 0 {
                self.current = Some(bytes);
                return Ok(false);
            }
            let now = bytes.split_to(room.min(bytes.len()));
            if !bytes.is_empty() {
                self.current = Some(bytes);
            }
            self.send.send_data(now, false).map_err(|_| StreamGone)?;
        }
        if let Some(status) = self.end.take() {
            let _ = self.send.send_trailers(trailers(&status));
            return Ok(true);
        }
        Ok(false)
    }
}

/// Send capacity available for up to `need` bytes; 0 means wait (the waker
/// is registered). Err when the stream is gone.
fn capacity(
    send: &mut SendStream<Bytes>,
    need: usize,
    cx: &mut Context<'_>,
) -> Result<usize, StreamGone> {
    loop {
        let have = send.capacity();
        if have >= need {
            return Ok(have);
        }
        send.reserve_capacity(need);
        let have = send.capacity();
        if have > 0 {
            return Ok(have);
        }
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return Err(StreamGone),
            Poll::Pending => return Ok(0),
        }
    }
}
