//! `serve`: opens storage, loads the broker's state, starts the writer and
//! reader threads, binds the listener and runs the reactor on this thread
//! until a shutdown signal; then lets the writer finish and joins it.

use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpListener;
use mio::Poll;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::broker::{Broker, BrokerConfig};
use crate::config::ServeConfig;
use crate::reactor::connection::{H2Settings, Keepalive};
use crate::reactor::task::ReadyQueue;
use crate::reactor::{Reactor, ReactorConfig, ReactorIo, WAKER};
use crate::storage::dir_lock::DataDirLock;
use crate::storage::high_water::{HighWaterMark, Recorded};
use crate::storage::{self, checkpointer, reader, schema, writer};
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
    // The port first, then the data dir's lock: a second daemon (same port,
    // or the same dir by any path) fails before it touches the database.
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let sock_addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|e| format!("invalid listen address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("invalid listen address {addr}"))?;
    let listener =
        TcpListener::bind(sock_addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let dir_lock = DataDirLock::acquire(&cfg.data_dir)?;
    let data_dir = dir_lock.dir().to_path_buf();
    let conn = schema::open_writer(&data_dir, cfg.max_db_bytes)
        .map_err(|e| format!("cannot open database in {}: {e}", data_dir.display()))?;
    schema::check_writable(&conn, &data_dir)?;
    let state = schema::load_state(&conn).map_err(|e| format!("cannot load state: {e}"))?;
    log::info!(
        "recovered {} topics, {} consumer groups, last sequence {} from {}",
        state.topics.len(),
        state.groups.len(),
        state.last_seq,
        data_dir.display()
    );
    let (hwm, recorded) = HighWaterMark::open(&data_dir)?;
    report_lost_tail(&state, recorded);
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

    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let waker =
        mio::Waker::new(poll.registry(), WAKER).map_err(|e| format!("cannot create waker: {e}"))?;
    let queue = ReadyQueue::new(waker);
    let wake: storage::Wake = {
        let q = queue.clone();
        Arc::new(move || q.wake_poll())
    };

    let (outcome_tx, outcome_rx) = crossbeam_channel::bounded(cfg.writer_queue * 2);
    let wal_wrap = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let group_commit = writer::GroupCommitConfig {
        max_messages: cfg.commit_max_messages,
        max_bytes: cfg.commit_max_bytes,
        retention: storage::retention::RetentionPolicy {
            max_age: cfg.retention_max_age,
            max_messages: cfg.retention_max_messages,
            max_bytes: cfg.retention_max_bytes,
        },
        max_store_bytes: cfg.max_db_bytes,
        queue: cfg.writer_queue,
    };
    let writer = writer::spawn(
        conn,
        group_commit,
        outcome_tx,
        wake.clone(),
        telemetry.clone(),
        wal_wrap.clone(),
        hwm,
    )
    .map_err(|e| format!("cannot start writer: {}", e.message))?;
    let (page_tx, page_rx) = crossbeam_channel::bounded(1024);
    let dir = data_dir.clone();
    let readers = reader::spawn(1, move || schema::open_reader(&dir), 1024, page_tx, wake)
        .map_err(|e| format!("cannot start reader: {}", e.message))?;

    let checkpoint_conn = schema::open_checkpointer(&data_dir)
        .map_err(|e| format!("cannot open checkpoint connection: {e}"))?;
    let checkpointer = checkpointer::spawn(
        checkpoint_conn,
        std::time::Duration::from_millis(200),
        262_144, // 1 GiB of WAL: a last resort that blocks the writer
        wal_wrap,
    )
    .map_err(|e| format!("cannot start checkpointer: {e}"))?;

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
        storage::StoreLinks {
            requests: writer.requests,
            outcomes: outcome_rx,
            pages_in: readers.requests,
            pages_out: page_rx,
        },
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
    // The reactor dropped its senders: the writer commits what it has queued
    // and exits; then the readers.
    if writer.thread.join().is_err() {
        return Err("writer thread panicked".into());
    }
    for t in readers.threads {
        let _ = t.join();
    }
    drop(checkpointer.stop);
    let _ = checkpointer.thread.join();
    telemetry.shutdown();
    result.map_err(|e| format!("reactor failed: {e}"))?;
    log::info!("shutdown complete");
    drop(dir_lock);
    Ok(())
}

/// Says once, loudly, when the database holds less than was committed: the
/// high-water mark or a consumer group's cursor is past its last sequence
/// (a damaged or truncated WAL). New sequences continue after the mark, so
/// none is reused and no cursor skips a new message.
fn report_lost_tail(state: &storage::LoadedState, recorded: Recorded) {
    let cursor_max = state
        .groups
        .iter()
        .map(|(_, g)| g.cursor)
        .max()
        .unwrap_or(0);
    let committed = recorded.committed.max(cursor_max);
    if committed > state.last_seq {
        log::error!(
            "the database lost its tail: sequences up to {committed} were committed (high-water mark {}, \
             highest consumer-group cursor {cursor_max}) but the last one stored is {}; \
             up to {} acknowledged messages are missing. New messages continue after sequence {}",
            recorded.committed,
            state.last_seq,
            committed - state.last_seq,
            recorded.ceiling.max(state.last_seq)
        );
    }
}
