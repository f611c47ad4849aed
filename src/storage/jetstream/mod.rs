//! The NATS JetStream store (`--store nats://…`), opened by [`open`]: the
//! daemon becomes a stateless gateway in front of a JetStream cluster, which
//! replicates and keeps the data. Same boundary as `storage::sqlite`:
//! requests and pages over channels, replies followed by a wake-up.
//!
//! `layout` names what lives in JetStream and how a message is written;
//! `state` loads the broker's start-up state; `writer` publishes and keeps
//! cursors and the topic registry; `reader` serves backlog pages;
//! `monitor` watches whether the cluster can serve; `status` is what those
//! threads share; `migrate` copies an embedded store into a cluster.
//! Calls `nats` (our own client, no async runtime) and nothing of gRPC.

pub mod announcer;
pub mod follower;
pub mod layout;
pub mod leases;
pub mod migrate;
pub mod monitor;
pub mod reader;
pub mod state;
pub mod status;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use crate::config::JetStreamConfig;
use crate::nats::jetstream::{JetStream, JetStreamError, StreamConfig};
use crate::nats::kv_bucket::KvBucket;
use crate::nats::{NatsClient, Options};
use crate::storage::{OpenedStore, StorageError, StoreLinks, StoreThreads, Wake};
use layout::Layout;
use status::StoreStatus;

/// What the JetStream store is opened with.
#[derive(Debug, Clone)]
pub struct JetStreamStoreConfig {
    pub cluster: JetStreamConfig,
    pub token: Option<String>,
    pub replicas: usize,
    pub prefix: String,
    /// How long a dead gateway's group leases outlive it (`--nats-lease`).
    pub lease: Duration,
    pub writer_queue: usize,
    pub retention_max_age: Option<Duration>,
    pub retention_max_messages: Option<u64>,
    pub retention_max_bytes: Option<u64>,
    /// How long an idempotency key is remembered (`--dedup-window`).
    pub dedup_window: Duration,
}

/// The error for a failed JetStream call.
pub fn storage_error(what: &str, e: &JetStreamError) -> StorageError {
    let too_large = matches!(
        e,
        JetStreamError::Client(crate::nats::Error::PayloadTooLarge { .. })
    );
    StorageError {
        unavailable: e.is_transient(),
        too_large,
        ..StorageError::new(if too_large {
            format!("{what}: {e} (the NATS servers' max_payload limits message size)")
        } else {
            format!("{what}: {e}")
        })
    }
}

/// How long a JetStream API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long JetStream remembers a publish's msg id.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(30);
/// How long start-up waits for a cluster that is still starting.
const START_WAIT: Duration = Duration::from_secs(30);

/// The comma-separated server list for the client.
fn server_list(cfg: &JetStreamConfig) -> String {
    cfg.servers
        .iter()
        .map(|(h, p)| format!("nats://{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects to the cluster (any listed server), waiting up to `wait`.
pub fn connect(
    cfg: &JetStreamConfig,
    token: Option<&str>,
    name: &str,
) -> Result<Arc<NatsClient>, String> {
    let mut options = Options {
        name: Some(name.to_string()),
        token: token.map(str::to_string),
        max_reconnect_rounds: None,
        // A whole BatchPublish (up to 65,536 messages) is sent before its
        // acks are awaited, on top of the writer's window and the reader's
        // and monitor's requests.
        max_pending_requests: 65_536 + 16_384,
        ..Options::default()
    };
    if let Some((user, pass)) = &cfg.credentials {
        options.user = Some(user.clone());
        options.pass = Some(pass.clone());
    }
    let client = NatsClient::connect(&server_list(cfg), options)
        .map_err(|e| format!("cannot connect to NATS at {cfg}: {e}"))?;
    Ok(Arc::new(client))
}

/// The stream Sluice keeps messages in, as configured now.
pub fn stream_config(cfg: &JetStreamStoreConfig, layout: &Layout) -> StreamConfig {
    // Long enough for the writer's retries (10 s after a send, plus the
    // ack timeout); JetStream keeps every msg id this long, so not longer
    // (at 50k msg/s, the default 2 minutes would hold 6 M ids per node).
    // JetStream wants it within max_age.
    let window = DUPLICATE_WINDOW.min(cfg.retention_max_age.unwrap_or(Duration::MAX));
    let mut s = StreamConfig::new(layout.stream(), layout.stream_subjects())
        .replicas(cfg.replicas)
        .duplicate_window(window);
    if let Some(age) = cfg.retention_max_age {
        s = s.max_age(age);
    }
    if let Some(n) = cfg.retention_max_messages {
        s = s.max_msgs_per_subject(n.min(i64::MAX as u64) as i64);
    }
    if let Some(n) = cfg.retention_max_bytes {
        s = s.max_bytes(n.min(i64::MAX as u64) as i64);
    }
    s
}

/// Creates or verifies the stream and buckets. Retention limits that differ
/// from the flags are changed (and logged); any other difference, such as
/// the replica count, is an error naming it.
pub fn prepare(
    js: &JetStream,
    cfg: &JetStreamStoreConfig,
    layout: &Layout,
) -> Result<(KvBucket, KvBucket), String> {
    // A cluster that is still starting (electing its meta leader) answers
    // 503 or not at all for a few seconds: wait for it, within reason.
    let deadline = std::time::Instant::now() + START_WAIT;
    let waiting = |e: &JetStreamError| {
        let starting = e.is_transient() || matches!(e, JetStreamError::Api(a) if a.code == 503);
        if starting && std::time::Instant::now() < deadline {
            log::warn!("waiting for JetStream on {}: {e}", cfg.cluster);
            std::thread::sleep(Duration::from_millis(500));
            true
        } else {
            false
        }
    };
    loop {
        match js.account_info() {
            Ok(_) => break,
            Err(e) if waiting(&e) => {}
            Err(e) => {
                return Err(format!(
                    "JetStream is not available on {}: {e}",
                    cfg.cluster
                ))
            }
        }
    }
    let want = stream_config(cfg, layout);
    // A stream made before admin events existed gains their subject.
    if let Ok(info) = js.stream_info(layout.stream()) {
        let mut have = info.config.subjects.clone();
        have.sort();
        let mut legacy = layout.legacy_stream_subjects();
        legacy.sort();
        if have == legacy {
            let mut update = info.config.clone();
            update.subjects = layout.stream_subjects();
            js.update_stream(&update).map_err(|e| {
                format!(
                    "cannot add the admin subject to stream {}: {e}",
                    layout.stream()
                )
            })?;
            log::info!(
                "stream {}: added subject {}",
                layout.stream(),
                layout.admin_subject()
            );
        }
    }
    let verified = loop {
        match js.create_or_verify_stream(&want) {
            Err(e) if waiting(&e) => {}
            other => break other,
        }
    };
    match verified {
        Ok(info) => log::info!(
            "JetStream stream {} ready: {} messages, last sequence {}, {} replicas",
            layout.stream(),
            info.state.messages,
            info.state.last_seq,
            info.config.num_replicas
        ),
        Err(JetStreamError::StreamMismatch { differences, .. })
            if differences.iter().all(|d| {
                d.starts_with("max_age")
                    || d.starts_with("max_msgs_per_subject")
                    || d.starts_with("max_bytes")
                    || d.starts_with("duplicate_window")
            }) =>
        {
            log::warn!(
                "changing the retention of stream {}: {}",
                layout.stream(),
                differences.join(", ")
            );
            js.update_stream(&want).map_err(|e| {
                format!(
                    "cannot change the retention of stream {}: {e}",
                    layout.stream()
                )
            })?;
        }
        Err(e @ JetStreamError::StreamMismatch { .. }) => {
            return Err(format!(
                "stream {} cannot be used: {e} (--nats-replicas must match what the cluster \
                 holds; another --nats-prefix keeps deployments apart)",
                layout.stream()
            ))
        }
        Err(e) => return Err(format!("cannot create stream {}: {e}", layout.stream())),
    }
    wait_for_leader(js, layout.stream());
    let bucket = |name: String| {
        let b = js
            .kv_bucket(&name, cfg.replicas)
            .map_err(|e| format!("bucket {name} cannot be used: {e}"))?;
        wait_for_leader(js, b.stream_name());
        Ok::<_, String>(b)
    };
    Ok((
        bucket(layout.topics_bucket())?,
        bucket(layout.cursors_bucket())?,
    ))
}

/// Waits (up to `START_WAIT`) until a stream just created has a leader:
/// until then writes to it time out, and the first publishes would.
pub fn wait_for_leader(js: &JetStream, stream: &str) {
    let deadline = std::time::Instant::now() + START_WAIT;
    loop {
        match js.stream_info(stream) {
            Ok(info) if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) => return,
            _ if std::time::Instant::now() >= deadline => {
                log::warn!("stream {stream} has no leader after {START_WAIT:?}; going on");
                return;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Connects, creates or verifies what Sluice needs, loads the broker's
/// start-up state and starts the writer, reader and monitor.
pub fn open(
    cfg: &JetStreamStoreConfig,
    wake: Wake,
    telemetry: Arc<crate::telemetry::Telemetry>,
) -> Result<OpenedStore, String> {
    let client = connect(&cfg.cluster, cfg.token.as_deref(), "sluice gateway")?;
    let js = JetStream::new(client.clone(), API_TIMEOUT);
    let layout = Layout::new(&cfg.prefix);
    let (topics_kv, cursors_kv) = prepare(&js, cfg, &layout)?;
    let (mut state, counters) = state::load(&js, &layout, &topics_kv, &cursors_kv)
        .map_err(|e| format!("cannot load state from JetStream: {e}"))?;
    let deliveries_kv = js
        .kv_bucket(&layout.deliveries_bucket(), cfg.replicas)
        .map_err(|e| format!("bucket {} cannot be used: {e}", layout.deliveries_bucket()))?;
    wait_for_leader(&js, deliveries_kv.stream_name());
    let deliveries = state::load_deliveries(&deliveries_kv)?;
    for ((topic, group), d) in &deliveries {
        state.deliveries.push((
            topic.to_string(),
            group.clone(),
            crate::broker::GroupDeliveries {
                max_deliveries: d.max_deliveries,
                dead_letter_topic: d.dead_letter_topic.as_deref().map(Arc::from),
                delivered_max: d.delivered_max,
                counts: d.counts.clone(),
                dead: Vec::new(),
            },
        ));
    }
    log::info!(
        "JetStream store on {}: {} topics, {} consumer groups, last sequence {}",
        cfg.cluster,
        state.topics.len(),
        state.groups.len(),
        state.last_seq
    );
    let status = Arc::new(StoreStatus::new(state.last_seq));

    let retention = cfg.retention_max_age.is_some()
        || cfg.retention_max_messages.is_some()
        || cfg.retention_max_bytes.is_some();
    let (counts_feed, counts_rx) = if retention {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (Some((layout.all_topics(), tx)), Some(rx))
    } else {
        (None, None)
    };
    let (request_tx, request_rx) = crossbeam_channel::bounded(cfg.writer_queue);
    let (outcome_tx, outcome_rx) = crossbeam_channel::bounded(cfg.writer_queue * 2);
    // Names this gateway in admin events.
    let gateway = uuid::Uuid::new_v4().simple().to_string();
    let created = state
        .topics
        .iter()
        .map(|t| (t.name.clone(), t.created_at_ms))
        .collect();
    let leases_kv = js
        .kv_bucket_with_ttl(&layout.leases_bucket(), cfg.replicas, Some(cfg.lease))
        .map_err(|e| format!("bucket {} cannot be used: {e}", layout.leases_bucket()))?;
    wait_for_leader(&js, leases_kv.stream_name());
    let (lease_tx, lease_rx) = crossbeam_channel::bounded(cfg.writer_queue.max(1024));
    let mut leases = leases::GroupLeases::new(
        cfg.lease,
        js.clone(),
        leases_kv.clone(),
        cursors_kv.clone(),
        gateway.clone(),
        outcome_tx.clone(),
        wake.clone(),
    );
    leases.deliveries_kv = Some(deliveries_kv.clone());
    let leases_bucket = leases_kv.name().to_string();
    let leases_thread = std::thread::Builder::new()
        .name("sluice-js-leases".into())
        .spawn(move || leases.run(lease_rx, leases_bucket))
        .map_err(|e| format!("cannot start the group leases: {e}"))?;
    let forgotten = announcer::Forgotten::default();
    let announcer = announcer::Announcer::new(
        layout.clone(),
        Some(topics_kv.clone()),
        status.clone(),
        announcer::AnnouncerStart {
            gateway: gateway.clone(),
            last_seq: state.last_seq,
            created,
            held_cap: cfg.writer_queue * 2,
            forgotten: forgotten.clone(),
        },
        outcome_tx,
        wake.clone(),
    );
    let keys = js
        .kv_bucket_with_ttl(&layout.keys_bucket(), cfg.replicas, Some(cfg.dedup_window))
        .map_err(|e| format!("bucket {} cannot be used: {e}", layout.keys_bucket()))?;
    wait_for_leader(&js, keys.stream_name());
    let presence = js
        .kv_bucket_with_ttl(
            &layout.gateways_bucket(),
            cfg.replicas,
            Some(follower::PRESENCE_TTL),
        )
        .map_err(|e| format!("bucket {} cannot be used: {e}", layout.gateways_bucket()))?;
    wait_for_leader(&js, presence.stream_name());
    let follower = follower::Follower::new(
        js.clone(),
        layout.clone(),
        status.clone(),
        announcer.clone(),
        follower::Buckets {
            topics: topics_kv.clone(),
            cursors: cursors_kv.clone(),
            presence,
        },
        gateway.clone(),
    );
    let writer = writer::JetStreamWriter::new(
        js.clone(),
        layout.clone(),
        (topics_kv, cursors_kv),
        counters,
        status.clone(),
        writer::WriterConfig {
            retry_for: Duration::from_secs(10),
            gateway,
            forgotten,
            leases: lease_tx,
            retention_counts: counts_rx,
            keys: Some(keys),
            deliveries: Some((deliveries_kv, deliveries)),
            dedup_window: cfg.dedup_window,
        },
        telemetry,
    );
    let w = wake.clone();
    let writer_thread = std::thread::Builder::new()
        .name("sluice-js-writer".into())
        .spawn(move || writer.run(request_rx, announcer, w))
        .map_err(|e| format!("cannot start writer: {e}"))?;
    let w = wake.clone();
    let follower_thread = std::thread::Builder::new()
        .name("sluice-js-follower".into())
        .spawn(move || follower.run(w))
        .map_err(|e| format!("cannot start the stream follower: {e}"))?;

    let (page_req_tx, page_req_rx) = crossbeam_channel::bounded(1024);
    let (page_tx, page_rx) = crossbeam_channel::bounded(1024);
    let reader = reader::JetStreamReader::new(js.clone(), layout.clone(), status.clone());
    let reader_thread = std::thread::Builder::new()
        .name("sluice-js-reader".into())
        .spawn(move || reader.run(page_req_rx, page_tx, wake))
        .map_err(|e| format!("cannot start reader: {e}"))?;

    let mut monitor = monitor::Monitor::spawn(js, layout.stream().to_string(), status, counts_feed)
        .map_err(|e| format!("cannot start the NATS monitor: {e}"))?;

    let threads = StoreThreads::new(
        move || {
            let writer = writer_thread.join();
            let leases = leases_thread.join();
            let follower = follower_thread.join();
            let reader = reader_thread.join();
            monitor.stop();
            client.close();
            if writer.is_err() {
                return Err("writer thread panicked".into());
            }
            if leases.is_err() {
                return Err("group leases thread panicked".into());
            }
            if follower.is_err() {
                return Err("stream follower thread panicked".into());
            }
            if reader.is_err() {
                return Err("reader thread panicked".into());
            }
            Ok(())
        },
        (),
    );
    Ok(OpenedStore {
        links: StoreLinks {
            requests: request_tx,
            outcomes: outcome_rx,
            pages_in: page_req_tx,
            pages_out: page_rx,
            claims_groups: true,
        },
        state,
        threads,
    })
}
