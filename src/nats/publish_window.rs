//! Pipelined JetStream publishing: many publishes in flight on one
//! connection, each with its own reply inbox and `Nats-Msg-Id`, acks
//! collected in order. Owns `PubAckTicket` (one publish whose ack is
//! awaited later) and `JetStream::publish_batch` (a bounded sliding window
//! of tickets). Calls `jetstream` (types, decode) and `client`
//! (`request_start`) only.
//!
//! Errors are per message: `Api` (the stream refused it, e.g. a wrong
//! expected sequence), `Client(Timeout)` (no ack in time: the message may or
//! may not be stored) and `Client(NoResponders)` (no stream leader listens
//! on the subject; nats-server 2.9.10 answers this for the seconds a new
//! stream leader takes to be elected after the old one died). In the last
//! two cases (`JetStreamError::is_transient`) callers retry with the same msg id: within the stream's
//! duplicate window a message that was stored after all is acked again with
//! `duplicate: true` and its first sequence, never stored twice.

use std::time::Instant;

use super::client::PendingReply;
use super::headers::Headers;
use super::jetstream::{decode, JetStream, JetStreamError, PubAck, MSG_ID_HEADER};

/// One message to publish.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingMessage<'a> {
    pub subject: &'a str,
    /// Deduplication id (`Nats-Msg-Id`); always set one when retries may happen.
    pub msg_id: Option<&'a str>,
    /// Extra headers; `Nats-Msg-Id` is added to a copy.
    pub headers: Option<&'a Headers>,
    pub payload: &'a [u8],
}

/// A sent publish whose ack has not been collected.
pub struct PubAckTicket {
    pending: PendingReply,
    deadline: Instant,
}

impl PubAckTicket {
    /// True when `wait` would return at once (the ack came, or the
    /// connection was lost, or the deadline passed).
    pub fn is_ready(&self) -> bool {
        self.pending.is_ready() || Instant::now() >= self.deadline
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The channel the ack arrives on (for `crossbeam_channel::Select`).
    pub fn receiver(
        &self,
    ) -> &crossbeam_channel::Receiver<Result<crate::nats::Message, crate::nats::Error>> {
        self.pending.receiver()
    }

    /// Waits for the ack until the ticket's deadline (send time + the
    /// JetStream timeout).
    pub fn wait(self) -> Result<PubAck, JetStreamError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let reply = self.pending.wait(left)?;
        decode(&reply.payload)
    }
}

impl JetStream {
    /// Sends one publish and returns at once; `PubAckTicket::wait` gets its ack.
    pub fn publish_start(
        &self,
        message: &OutgoingMessage<'_>,
    ) -> Result<PubAckTicket, JetStreamError> {
        let headers = match (message.msg_id, message.headers) {
            (None, h) => h.cloned(),
            (Some(id), h) => {
                let mut h = h.cloned().unwrap_or_default();
                h.insert(MSG_ID_HEADER, id);
                Some(h)
            }
        };
        let pending =
            self.client()
                .request_start(message.subject, headers.as_ref(), message.payload)?;
        Ok(PubAckTicket {
            pending,
            deadline: Instant::now() + self.timeout(),
        })
    }

    /// Publishes every message with at most `window` acks outstanding and
    /// returns one result per message, in order. Sending never waits for an
    /// ack unless `window` are outstanding, so throughput is bounded by the
    /// server, not by round trips.
    pub fn publish_batch(
        &self,
        messages: &[OutgoingMessage<'_>],
        window: usize,
    ) -> Vec<Result<PubAck, JetStreamError>> {
        let window = window.max(1);
        let mut results: Vec<Option<Result<PubAck, JetStreamError>>> =
            (0..messages.len()).map(|_| None).collect();
        let mut in_flight: std::collections::VecDeque<(usize, PubAckTicket)> =
            std::collections::VecDeque::with_capacity(window);
        for (i, message) in messages.iter().enumerate() {
            if in_flight.len() >= window {
                if let Some((j, ticket)) = in_flight.pop_front() {
                    results[j] = Some(ticket.wait());
                }
            }
            match self.publish_start(message) {
                Ok(ticket) => in_flight.push_back((i, ticket)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (j, ticket) in in_flight {
            results[j] = Some(ticket.wait());
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(JetStreamError::Client(super::Error::Timeout))))
            .collect()
    }
}
