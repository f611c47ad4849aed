//! A small synchronous NATS client of our own (no async runtime): the wire
//! protocol (`headers`, `protocol`), a connection with a reader thread,
//! subscriptions, requests (blocking or pipelined), liveness pings and
//! reconnect (`client`), and a typed JetStream API layer on top:
//! `jetstream` (errors, streams, per-subject counts, purge), `publish_window`
//! (pipelined acked publish), `stored_message` (reads by sequence),
//! `pull_consumer` (backlog pages), `kv_bucket` (KV-style streams), plus the
//! pure `subject_token` (topic name <-> one subject token). Nothing here
//! calls the rest of the crate; the JetStream store (issue 11) will call this.

pub mod client;
pub mod headers;
pub mod jetstream;
pub mod kv_bucket;
pub mod protocol;
pub mod publish_window;
pub mod pull_consumer;
pub mod stored_message;
pub mod subject_token;

pub use client::{Error, NatsClient, Options, PendingReply, Subscription};
pub use headers::Headers;
pub use protocol::Message;
