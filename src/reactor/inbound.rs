//! `Inbound`: the one reader of a call's request stream, shared by unary,
//! Subscribe, health and reflection calls. It takes DATA chunks from h2,
//! reassembles gRPC messages with the framer, and owns the memory rules:
//!
//! - `InflightBudget` counts request bytes held in partial messages across
//!   all calls. HTTP/2 window is released for a chunk only while the budget
//!   has room, so past it peers are held back by flow control (nothing
//!   fails); completed messages free their bytes at once.
//! - A message that has not completed within the message timeout ends its
//!   call (the reactor's `MessageStall` timer asks [`RequestReader::stalled`]).
//!
//! Calls only h2's receive half and the framer; no sockets, no storage.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;

use crate::grpc::{FrameError, MessageDecoder};

/// Bytes a call may hold whatever the budget says (see `take_for`).
const SMALL_CALL: usize = 16 << 10;

/// Request bytes held in partial messages, across all calls.
///
/// When the budget is full, one waiting call (the first to wait) may go past
/// it by up to `overdraft` (one largest message plus a window), so some
/// message can always complete and free its bytes: concurrent large uploads
/// are slowed, never deadlocked.
#[derive(Debug)]
pub struct InflightBudget {
    limit: usize,
    used: usize,
    overdraft: usize,
    /// The call allowed past the limit until its message completes.
    overdraft_owner: Option<u64>,
    /// Calls (uids) holding back window for lack of budget.
    waiting: Vec<u64>,
    /// Bytes were given back since waiters were last woken.
    freed: bool,
}

impl InflightBudget {
    pub fn new(limit: usize) -> Self {
        InflightBudget {
            limit,
            used: 0,
            overdraft: 0,
            overdraft_owner: None,
            waiting: Vec::new(),
            freed: false,
        }
    }

    /// Lets one waiting call go up to `overdraft` past the limit.
    pub fn with_overdraft(mut self, overdraft: usize) -> Self {
        self.overdraft = overdraft;
        self
    }

    /// `n` more bytes for `uid`, whose call then holds `call_total`; or
    /// false (it must wait). A call holding no more than `SMALL_CALL` always
    /// gets them: small requests (acks, credits, ordinary publishes) are never
    /// held back behind large ones, and what they can hold is of the order of
    /// the HTTP/2 window each connection already has.
    fn take_for(&mut self, uid: u64, n: usize, call_total: usize) -> bool {
        if self.try_take(n) {
            return true;
        }
        if call_total <= SMALL_CALL {
            self.used += n;
            return true;
        }
        let owner = *self.overdraft_owner.get_or_insert(uid);
        if owner == uid && self.used + n <= self.limit + self.overdraft {
            self.used += n;
            return true;
        }
        if !self.waiting.contains(&uid) {
            self.waiting.push(uid);
        }
        false
    }

    /// `uid`'s message completed or its call ended: the overdraft goes on.
    fn settled(&mut self, uid: u64) {
        if self.overdraft_owner == Some(uid) {
            self.overdraft_owner = None;
            self.freed = true;
        }
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
        if n > 0 {
            self.used = self.used.saturating_sub(n);
            self.freed = true;
        }
    }

    /// Calls to poll again because budget came free since the last call
    /// (drained); none while nothing was freed, so waiters never spin.
    pub fn take_waiting(&mut self) -> Vec<u64> {
        if std::mem::take(&mut self.freed) && self.used < self.limit + self.overdraft {
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
    /// Unary calls: completed messages stay counted (and timed) until the
    /// request stream ends, since the call holds them until then.
    hold_until_end: bool,
    /// Bytes of completed messages held that way.
    kept: usize,
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
            hold_until_end: false,
            kept: 0,
            partial_since: None,
            stall_timer: None,
        }
    }

    /// For unary calls: a completed message stays counted against the budget
    /// and under the message timeout until the request stream ends.
    pub fn holding_until_end(mut self) -> Self {
        self.hold_until_end = true;
        self
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
    pub fn close(&mut self, budget: &mut InflightBudget, uid: u64) {
        self.recv = None;
        self.decoder = MessageDecoder::new(0);
        budget.give_back(std::mem::take(&mut self.counted));
        budget.settled(uid);
        self.unreleased = 0;
        self.kept = 0;
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
                    self.settle(uid, body.len(), budget);
                    self.release_held(uid, budget);
                    return Inbound::Message(body);
                }
                Ok(None) => {}
                Err(e) => {
                    self.close(budget, uid);
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
                    self.close(budget, uid);
                    return Inbound::Reset(e);
                }
                Poll::Ready(None) => {
                    let inside = self.decoder.buffered() > 0;
                    self.close(budget, uid);
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
        let held = self.decoder.buffered() + self.kept;
        let extra = held.saturating_sub(self.counted);
        if extra > 0 && !budget.take_for(uid, extra, held) {
            return;
        }
        self.counted += extra;
        if let Some(recv) = self.recv.as_mut() {
            let _ = recv.flow_control().release_capacity(self.unreleased);
        }
        self.unreleased = 0;
    }

    /// A message of `len` bytes completed: what is left buffered is a new
    /// partial message (unless the call holds messages until the end).
    fn settle(&mut self, uid: u64, len: usize, budget: &mut InflightBudget) {
        budget.settled(uid);
        if self.hold_until_end {
            self.kept += len + 5;
            return;
        }
        let held = self.decoder.buffered();
        if self.counted > held {
            budget.give_back(self.counted - held);
            self.counted = held;
        }
        self.partial_since = (held > 0).then(Instant::now);
    }

    /// When the partial message must have completed by, if one is held.
    fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
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
        assert_eq!(b.used, 100);
        assert!(b.take_waiting().is_empty(), "full: nobody is woken");
        b.give_back(30);
        assert_eq!(b.take_waiting(), vec![7]);
        assert!(b.take_waiting().is_empty());
        b.waiting.push(8);
        assert!(b.take_waiting().is_empty(), "nothing freed since: no spin");
    }

    #[test]
    fn the_first_waiter_may_overdraw_so_some_message_always_completes() {
        let big = SMALL_CALL + 1;
        let mut b = InflightBudget::new(100).with_overdraft(50);
        assert!(b.take_for(1, 100, big));
        assert!(b.take_for(2, 30, big), "the first to wait overdraws");
        assert!(!b.take_for(3, 10, big), "only one call at a time");
        assert!(!b.take_for(2, 30, big), "and only up to the overdraft");
        assert!(b.take_for(4, 10, 10), "a small call always gets its bytes");
        b.settled(2);
        assert!(b.take_for(3, 10, big), "the next one may now");
    }
}
