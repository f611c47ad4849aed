//! `Inbound`: the one reader of a call's request stream, shared by unary,
//! Subscribe, health and reflection calls. It takes DATA chunks from h2,
//! reassembles gRPC messages with the framer, and owns the memory rules:
//!
//! - `InflightBudget` counts request bytes held in partial messages across
//!   all calls. HTTP/2 window is released for a chunk only while the budget
//!   has room, so past it peers are held back by flow control (nothing
//!   fails); completed messages free their bytes at once.
//! - A message that has not completed within the message timeout ends its
//!   call (the reactor's `MessageStall` timer asks [`Inbound::stalled`]).
//!
//! Calls only h2's receive half and the framer; no sockets, no storage.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;

use crate::grpc::{FrameError, MessageDecoder};

/// Request bytes held in partial messages, across all calls.
#[derive(Debug)]
pub struct InflightBudget {
    limit: usize,
    used: usize,
    /// Calls (uids) holding back window for lack of budget.
    waiting: Vec<u64>,
}

impl InflightBudget {
    pub fn new(limit: usize) -> Self {
        InflightBudget {
            limit,
            used: 0,
            waiting: Vec::new(),
        }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    fn try_take(&mut self, n: usize) -> bool {
        if self.used + n <= self.limit {
            self.used += n;
            true
        } else {
            false
        }
    }

    fn give_back(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
    }

    /// Calls to poll again because budget came free (drained).
    pub fn take_waiting(&mut self) -> Vec<u64> {
        if self.used < self.limit {
            std::mem::take(&mut self.waiting)
        } else {
            Vec::new()
        }
    }
}

/// What the request stream yielded.
#[derive(Debug)]
pub enum Inbound {
    /// One complete message.
    Message(Bytes),
    /// Nothing yet: the call is woken when more arrives (or budget frees).
    Pending,
    /// The client ended its side at a message boundary.
    End,
    /// The client ended its side inside a message.
    EndedInsideMessage,
    /// The framing is wrong (too large, bad flag, bad compression).
    Bad(FrameError),
    /// The stream was reset or the connection failed.
    Reset(h2::Error),
}

/// A call's request stream and the partial message it holds.
#[derive(Debug)]
pub struct RequestReader {
    recv: Option<RecvStream>,
    decoder: MessageDecoder,
    /// Bytes of this call counted in the budget (its partial message).
    counted: usize,
    /// Bytes received whose HTTP/2 window is not yet released.
    unreleased: usize,
    /// When the partial message being held began to arrive.
    partial_since: Option<Instant>,
    /// The reactor's stall timer for this call, if armed.
    stall_timer: Option<Instant>,
}

impl RequestReader {
    pub fn new(recv: RecvStream, decoder: MessageDecoder) -> Self {
        RequestReader {
            recv: Some(recv),
            decoder,
            counted: 0,
            unreleased: 0,
            partial_since: None,
            stall_timer: None,
        }
    }

    /// True until the client's side ended (or reading stopped).
    pub fn is_open(&self) -> bool {
        self.recv.is_some()
    }

    /// Stops reading (the call is finishing). What the partial message held
    /// is given back by [`RequestReader::close`] when the call is released.
    pub fn stop(&mut self) {
        self.recv = None;
    }

    /// Stops reading (the call has what it needs, or failed); frees what the
    /// partial message held.
    pub fn close(&mut self, budget: &mut InflightBudget) {
        self.recv = None;
        self.decoder = MessageDecoder::new(0);
        budget.give_back(std::mem::take(&mut self.counted));
        self.unreleased = 0;
        self.partial_since = None;
    }

    /// The next complete message, or why there is none.
    pub fn poll_next(
        &mut self,
        uid: u64,
        budget: &mut InflightBudget,
        cx: &mut Context<'_>,
    ) -> Inbound {
        loop {
            // A message already buffered goes first.
            match self.decoder.next_message() {
                Ok(Some(body)) => {
                    self.settle(budget);
                    self.release_held(uid, budget);
                    return Inbound::Message(body);
                }
                Ok(None) => {}
                Err(e) => {
                    self.close(budget);
                    return Inbound::Bad(e);
                }
            }
            self.release_held(uid, budget);
            if self.unreleased > 0 {
                // Held back: the peer cannot send more on this stream now.
                return Inbound::Pending;
            }
            let Some(recv) = self.recv.as_mut() else {
                return Inbound::End;
            };
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.decoder.push(&chunk);
                    self.unreleased += chunk.len();
                    if self.partial_since.is_none() {
                        self.partial_since = Some(Instant::now());
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.close(budget);
                    return Inbound::Reset(e);
                }
                Poll::Ready(None) => {
                    let inside = self.decoder.buffered() > 0;
                    self.close(budget);
                    return if inside {
                        Inbound::EndedInsideMessage
                    } else {
                        Inbound::End
                    };
                }
                Poll::Pending => return Inbound::Pending,
            }
        }
    }

    /// Releases window for received bytes while the budget allows; what
    /// stays in the decoder (a partial message) is counted.
    fn release_held(&mut self, uid: u64, budget: &mut InflightBudget) {
        if self.unreleased == 0 {
            return;
        }
        let held = self.decoder.buffered();
        let extra = held.saturating_sub(self.counted);
        if extra > 0 && !budget.try_take(extra) {
            if !budget.waiting.contains(&uid) {
                budget.waiting.push(uid);
            }
            return;
        }
        self.counted += extra;
        if let Some(recv) = self.recv.as_mut() {
            let _ = recv.flow_control().release_capacity(self.unreleased);
        }
        self.unreleased = 0;
    }

    /// A message completed: what is left buffered is a new partial message.
    fn settle(&mut self, budget: &mut InflightBudget) {
        let held = self.decoder.buffered();
        if self.counted > held {
            budget.give_back(self.counted - held);
            self.counted = held;
        }
        self.partial_since = (held > 0).then(Instant::now);
    }

    /// When the partial message must have completed by, if one is held.
    pub fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.partial_since.map(|t| t + timeout)
    }

    /// The reactor's stall timer for this call: `Some(at)` asks it to arm
    /// one at `at` (none is armed yet and a partial message is held).
    pub fn arm_stall_timer(&mut self, timeout: Duration) -> Option<Instant> {
        if self.stall_timer.is_some() {
            return None;
        }
        let at = self.stall_deadline(timeout)?;
        self.stall_timer = Some(at);
        Some(at)
    }

    /// The stall timer fired: true if the message is late. Otherwise the
    /// timer is disarmed (re-armed by the next poll if still needed).
    pub fn stalled(&mut self, now: Instant, timeout: Duration) -> bool {
        self.stall_timer = None;
        matches!(self.stall_deadline(timeout), Some(at) if at <= now)
    }

    /// The timer armed for this call, to remove when the call goes.
    pub fn armed_timer(&self) -> Option<Instant> {
        self.stall_timer
    }

    /// Bytes of an incomplete message buffered.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_limit_and_lists_waiters_once_free() {
        let mut b = InflightBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        b.waiting.push(7);
        assert_eq!(b.used(), 100);
        assert!(b.take_waiting().is_empty(), "full: nobody is woken");
        b.give_back(30);
        assert_eq!(b.take_waiting(), vec![7]);
        assert!(b.take_waiting().is_empty());
    }
}
