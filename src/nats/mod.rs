//! A small synchronous NATS client of our own (no async runtime): the wire
//! protocol (`headers`, `protocol`), a connection with a reader thread,
//! subscriptions, requests, liveness pings and reconnect (`client`), and a
//! thin typed JetStream API layer on top (`jetstream`). Nothing here calls
//! the rest of the crate; the JetStream store (issue 11) will call this.

pub mod client;
pub mod headers;
pub mod jetstream;
pub mod protocol;
pub mod subject_token;

pub use client::{Error, NatsClient, Options, PendingReply, Subscription};
pub use headers::Headers;
pub use protocol::Message;
