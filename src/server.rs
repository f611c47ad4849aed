//! `serve`: binds the listener, opens the store chosen at start-up (its
//! `open` locks its data, starts its threads and returns neutral links plus
//! the broker's start-up state), builds the broker and runs the reactor on
//! this thread until a shutdown signal; then lets the store finish what it
//! has queued and joins its threads. The one place the daemon chooses a
//! store implementation (`--store`).

use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpListener;
use mio::Poll;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::broker::{Broker, BrokerConfig};
use crate::config::{ServeConfig, StoreConfig};
use crate::reactor::connection::{H2Settings, Keepalive};
use crate::reactor::task::ReadyQueue;
use crate::reactor::{Reactor, ReactorConfig, ReactorIo, WAKER};
use crate::storage::jetstream::{self, JetStreamStoreConfig};
use crate::storage::sqlite::retention::RetentionPolicy;
use crate::storage::sqlite::{self, SqliteConfig};
use crate::storage::{self, OpenedStore};
use crate::telemetry::{Telemetry, TelemetryConfig};

pub fn run(cfg: &ServeConfig, telemetry_cfg: &TelemetryConfig) -> Result<(), String> {
    let started = Instant::now();
    let telemetry = Arc::new(Telemetry::start(telemetry_cfg)?);
    if let Some(endpoint) = &telemetry_cfg.endpoint {
        log::info!(
            "exporting OTLP metrics (every {:?}) and spans to {endpoint}",
            telemetry.export_interval()
        );
    }
    // The port first, then the store (which takes the data dir's lock): a
    // second daemon (same port, or the same dir by any path) fails before it
    // touches the database.
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let sock_addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|e| format!("invalid listen address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("invalid listen address {addr}"))?;
    let listener =
        TcpListener::bind(sock_addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let waker =
        mio::Waker::new(poll.registry(), WAKER).map_err(|e| format!("cannot create waker: {e}"))?;
    let queue = ReadyQueue::new(waker);
    let wake: storage::Wake = {
        let q = queue.clone();
        Arc::new(move || q.wake_poll())
    };
    let OpenedStore {
        links,
        state,
        mut threads,
    } = open_store(cfg, wake, telemetry.clone())?;
    let mut broker = Broker::new(BrokerConfig {
        heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
        max_topics: cfg.max_topics,
        max_groups_per_topic: cfg.max_groups_per_topic,
        ..BrokerConfig::default()
    });
    broker.set_last_sequence(state.last_seq);
    for t in state.topics {
        broker.load_topic(t, state.last_seq);
    }
    for (topic, g) in state.groups {
        broker.load_group(&topic, g);
    }
    for (topic, group, d) in state.deliveries {
        broker.load_group_deliveries(&topic, &group, d);
    }

    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let reactor = Reactor::new(
        ReactorIo {
            poll,
            queue,
            listener,
            signals,
        },
        broker,
        telemetry.clone(),
        links,
        ReactorConfig {
            keepalive: Keepalive {
                interval: cfg.keepalive_interval,
                timeout: cfg.keepalive_timeout,
            },
            h2: H2Settings {
                max_concurrent_streams: cfg.max_concurrent_streams,
                stream_window: 256 * 1024,
                max_message_bytes: cfg.max_message_bytes,
            },
            max_connections: cfg.max_connections,
            max_connections_per_ip: cfg.max_connections_per_ip,
            max_connection_idle: cfg.max_connection_idle,
            max_batch_messages: cfg.max_batch_messages,
            max_inflight_bytes: cfg.max_inflight_bytes,
            message_timeout: cfg.message_timeout,
            shutdown_grace: cfg.shutdown_grace,
        },
    )
    .map_err(|e| format!("cannot start reactor: {e}"))?;
    log::info!(
        "sluice {} listening on {local} (started in {:?})",
        env!("CARGO_PKG_VERSION"),
        started.elapsed()
    );
    crate::notify::notify(&format!("READY=1\nSTATUS=listening on {local}"));
    let result = reactor.run();
    // The reactor dropped its senders: the store finishes what it has queued
    // and its threads end.
    threads.join()?;
    telemetry.shutdown();
    result.map_err(|e| format!("reactor failed: {e}"))?;
    log::info!("shutdown complete");
    drop(threads);
    Ok(())
}

/// Opens the store chosen at start-up (`--store`) and returns its neutral
/// links.
fn open_store(
    cfg: &ServeConfig,
    wake: storage::Wake,
    telemetry: Arc<Telemetry>,
) -> Result<OpenedStore, String> {
    if let StoreConfig::JetStream(cluster) = &cfg.store {
        return jetstream::open(
            &JetStreamStoreConfig {
                cluster: cluster.clone(),
                token: cfg.nats_token.clone(),
                replicas: cfg.nats_replicas,
                prefix: cfg.nats_prefix.clone(),
                lease: cfg.nats_lease,
                writer_queue: cfg.writer_queue,
                retention_max_age: cfg.retention_max_age,
                retention_max_messages: cfg.retention_max_messages,
                retention_max_bytes: cfg.retention_max_bytes,
                dedup_window: cfg.dedup_window,
            },
            wake,
            telemetry,
        );
    }
    sqlite::open(
        &SqliteConfig {
            data_dir: cfg.data_dir.clone(),
            max_db_bytes: cfg.max_db_bytes,
            writer_queue: cfg.writer_queue,
            commit_max_messages: cfg.commit_max_messages,
            commit_max_bytes: cfg.commit_max_bytes,
            retention: RetentionPolicy {
                max_age: cfg.retention_max_age,
                max_messages: cfg.retention_max_messages,
                max_bytes: cfg.retention_max_bytes,
            },
            dedup_window: cfg.dedup_window,
            dedup_max_keys: cfg.dedup_max_keys,
        },
        wake,
        telemetry,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_store;

    #[test]
    fn an_unreachable_jetstream_store_fails_at_start_and_leaves_the_data_dir_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        // Nothing listens on port 1.
        let cfg = ServeConfig {
            store: parse_store("nats://sluice:secret@127.0.0.1:1").unwrap(),
            port: 0,
            data_dir: data_dir.clone(),
            ..ServeConfig::default()
        };
        let e = run(&cfg, &TelemetryConfig::default()).unwrap_err();
        assert!(
            e.starts_with("cannot connect to NATS at nats://sluice:***@127.0.0.1:1"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        assert!(!data_dir.exists());
    }
}
