//! Sluice: a durable, gRPC-native message broker.
//!
//! Layering (every arrow points down): `server` wires threads together;
//! `reactor` owns sockets and drives HTTP/2 + gRPC; `socket_io` adapts a mio
//! socket to the async IO traits h2 needs (for the reactor and the CLI
//! client); `grpc` is pure framing and status handling; `broker` is the sans-IO state machine (topics,
//! subscriptions, credit, cursors, redelivery); `storage` is the store-neutral boundary
//! (channels of requests, outcomes and pages) with one implementation today,
//! `storage::sqlite`; only `server` and the `check`/`backup` commands name it.

pub mod broker;
pub mod cli;
pub mod config;
pub mod failpoint;
#[cfg(test)]
mod fuzz_support;
pub mod grpc;
pub mod log_limit;
pub mod nats;
pub mod notify;
pub mod proto;
pub mod reactor;
pub mod server;
pub mod socket_io;
pub mod storage;
pub mod telemetry;
