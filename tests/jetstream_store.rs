//! The JetStream store (`--store nats://…`) against real `nats-server`
//! processes on loopback: start-up checks, isolation by prefix, and faults
//! with every acknowledged message accounted for (a NATS node SIGKILLed
//! during publishing, every node down and back, the gateway SIGKILLed under
//! load). The shared black-box suites also run on this store
//! (`SLUICE_TEST_STORE=nats`, see tests/common/mod.rs).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats_harness::{Cluster, SingleNode};
use common::*;
use http::uri::PathAndQuery;
use sluice::nats::jetstream::JetStream;
use sluice::proto::{self, health, subscribe_downstream::Response as Down};
use tonic::{Code, Request};
use tonic_prost::ProstCodec;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

fn gateway(url: &str, replicas: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--store", url, "--nats-replicas", replicas];
    args.extend_from_slice(extra);
    Server::start_with(&args)
}

fn nats_url(cluster_list: &str) -> String {
    format!("nats://{cluster_list}")
}

async fn health_check(c: &Client) -> Result<i32, tonic::Status> {
    let mut grpc = c.grpc.clone();
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(health::HealthCheckRequest {
            service: String::new(),
        }),
        PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
        ProstCodec::<health::HealthCheckRequest, health::HealthCheckResponse>::default(),
    )
    .await
    .map(|r| r.into_inner().status)
}

async fn wait_health(c: &Client, want: i32, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if health_check(c).await.ok() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "health did not become {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_within(
    c: &mut Client,
    topic: &str,
    payload: &[u8],
    limit: Duration,
) -> Result<proto::PublishResponse, tonic::Status> {
    let mut req = Request::new(proto::PublishRequest {
        topic: topic.into(),
        payload: payload.to_vec().into(),
        attributes: Default::default(),
        ..Default::default()
    });
    req.set_timeout(limit);
    c.unary_req("Publish", req).await.map(|r| r.into_inner())
}

/// Every message of `topic` from the earliest, read by a fresh group: at
/// least `expect` of them, then until a second passes without one.
async fn read_everything(
    c: &mut Client,
    topic: &str,
    group: &str,
    expect: usize,
) -> Vec<proto::MessageDelivery> {
    let mut out: Vec<proto::MessageDelivery> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // A gateway that cannot read the group's cursor yet (its bucket is
    // still electing a leader after a restart of the cluster) ends the
    // stream UNAVAILABLE: subscribe again, as a client would; nothing is
    // acked here, so the group starts from the beginning each time.
    let mut attempts = 0;
    'again: loop {
        attempts += 1;
        let mut sub = c
            .subscribe(topic, group, proto::InitialPosition::Earliest)
            .await;
        sub.send(credit(1_000_000)).await;
        let mut last = Instant::now();
        loop {
            // Reads from a cluster that just lost a node can stall for seconds
            // (nats-server 2.9.10 times out consumer creation and single reads
            // while it recovers; the gateway retries): wait long enough.
            let quiet = if out.len() >= expect {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(20)
            };
            let left = quiet.saturating_sub(last.elapsed());
            match sub.next_within(left).await {
                Some(Ok(proto::SubscribeDownstream {
                    response: Some(Down::Delivery(d)),
                })) => {
                    if seen.insert(d.sequence) {
                        out.push(d);
                    }
                    last = Instant::now();
                }
                Some(Ok(_)) => {} // heartbeats do not count as progress
                Some(Err(e)) if e.code() == tonic::Code::Unavailable && attempts < 10 => {
                    eprintln!("reading {topic} ended: {e:?}; subscribing again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'again;
                }
                other => {
                    if other.is_some() {
                        eprintln!("reading {topic} ended: {other:?}");
                    }
                    break 'again;
                }
            }
        }
    }
    out
}

/// What concurrent publishers got acknowledged, and how many calls failed.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<u64, String>,
    failed: u64,
    worst_failure: Duration,
}

/// `n` publishers on their own connections until `stop`, each call with a
/// 3 s deadline; failures are counted and retried.
fn publishers(
    url: String,
    topic: &'static str,
    n: usize,
    stop: Instant,
    ledger: Arc<Mutex<Ledger>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|p| {
            let url = url.clone();
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let mut c = Client::connect(&url).await;
                let mut i = 0u64;
                while Instant::now() < stop {
                    let body = format!("p{p}-{i}");
                    let t = Instant::now();
                    match publish_within(&mut c, topic, body.as_bytes(), Duration::from_secs(3))
                        .await
                    {
                        Ok(r) => {
                            ledger
                                .lock()
                                .unwrap()
                                .acked
                                .insert(r.sequence, r.message_id);
                            i += 1;
                        }
                        Err(_) => {
                            {
                                let mut l = ledger.lock().unwrap();
                                l.failed += 1;
                                l.worst_failure = l.worst_failure.max(t.elapsed());
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

/// A consumer group that acks everything it gets, subscribing again
/// whenever its stream ends (as a client should), until `stop`; records the
/// sequences delivered.
fn live_consumer(
    url: String,
    topic: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<HashSet<u64>>>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let mut c = Client::connect(&url).await;
            let Ok(mut sub) = c
                .subscribe_with(init(topic, "live", proto::InitialPosition::Earliest))
                .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            sub.send(credit(1000)).await;
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), sub.down.message()).await {
                    Err(_) => {}
                    Ok(Ok(Some(proto::SubscribeDownstream {
                        response: Some(Down::Delivery(d)),
                    }))) => {
                        seen.lock().unwrap().insert(d.sequence);
                        // The stream may end meanwhile (a gateway that could
                        // not renew its group lease during the election ends
                        // it UNAVAILABLE): then subscribe again.
                        if sub.up.send(ack(&d.message_id)).await.is_err()
                            || sub.up.send(credit(1)).await.is_err()
                        {
                            break;
                        }
                    }
                    Ok(Ok(Some(_))) => {}
                    Ok(_) => break, // ended: subscribe again
                }
            }
        }
    })
}

/// Checks every acknowledged message is stored, once, with its id.
fn account(acked: &BTreeMap<u64, String>, found: &[proto::MessageDelivery]) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut dups = 0;
    for d in found {
        if !seen.insert(d.sequence) {
            dups += 1;
        }
    }
    let by_seq: BTreeMap<u64, &str> = found
        .iter()
        .map(|d| (d.sequence, d.message_id.as_str()))
        .collect();
    let mut missing = 0;
    for (seq, id) in acked {
        match by_seq.get(seq) {
            Some(found_id) => assert_eq!(found_id, id, "sequence {seq} has another id"),
            None => missing += 1,
        }
    }
    (missing, dups)
}

#[tokio::test]
async fn start_up_creates_what_it_needs_and_refuses_a_replica_mismatch() {
    let (node, client) = SingleNode::start();
    let url = node.node.url();
    let mut g = gateway(&url, "1", &[]);
    let log = g.log_text();
    assert!(log.contains("JetStream stream SLUICE ready"), "{log}");
    let mut c = g.client().await;
    c.publish("orders.eu", b"x").await.unwrap();
    g.signal(15);
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));

    // What it created is there, with one replica.
    let js = JetStream::new(client, Duration::from_secs(2));
    let info = js.stream_info("SLUICE").unwrap();
    assert_eq!(info.config.num_replicas, 1);
    assert_eq!(info.state.messages, 1);
    assert!(js.stream_info("KV_sluice_topics").is_ok());
    assert!(js.stream_info("KV_sluice_cursors").is_ok());

    // Another replica count is refused at start, naming the difference.
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--store",
            &url,
            "--nats-replicas",
            "3",
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replicas 1 != 3"), "{err}");
    assert!(err.contains("--nats-replicas"), "{err}");
    // Nothing changed.
    assert_eq!(js.stream_info("SLUICE").unwrap().config.num_replicas, 1);
}

#[tokio::test]
async fn prefixes_keep_deployments_apart_on_one_account() {
    let (node, _client) = SingleNode::start();
    let url = node.node.url();
    let a = gateway(&url, "1", &["--nats-prefix", "blue"]);
    let b = gateway(&url, "1", &["--nats-prefix", "green"]);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.publish("only-blue", b"1").await.unwrap();
    cb.publish("only-green", b"2").await.unwrap();
    let names = |r: proto::ListTopicsResponse| -> Vec<String> {
        r.topics.into_iter().map(|t| t.name).collect()
    };
    assert_eq!(names(ca.list_topics().await.unwrap()), vec!["only-blue"]);
    assert_eq!(names(cb.list_topics().await.unwrap()), vec!["only-green"]);
    // Sequences are per deployment: each stream starts at 1.
    assert_eq!(cb.publish("only-green", b"3").await.unwrap().sequence, 2);
}

#[tokio::test]
async fn a_message_over_the_servers_max_payload_is_resource_exhausted() {
    // The harness's nats-server allows 8 MB; the gateway allows 16 MiB.
    let (node, _client) = SingleNode::start();
    let g = gateway(&node.node.url(), "1", &["--max-message-bytes", "16777216"]);
    let mut c = g.client().await;
    let err = c.publish("big", &vec![7u8; 9 << 20]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_payload"), "{err:?}");
    // The channel and the store carry on.
    assert_eq!(
        c.publish("big", &vec![7u8; 4 << 20])
            .await
            .unwrap()
            .sequence,
        1
    );
}

/// SIGKILL of the stream's leader while four publishers run: publishing
/// continues once a new leader is elected and no acknowledged message is
/// lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_nats_node_during_publishing_loses_no_acked_message() {
    let _heavy = serial().await;
    let mut cluster = Cluster::start("kill1");
    let url = nats_url(&cluster.url());
    let g = gateway(
        &url,
        "3",
        &["--log-level", "info,sluice::storage::jetstream=debug"],
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Instant::now() + Duration::from_secs(14);
    let live_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let live_seen = Arc::new(Mutex::new(HashSet::new()));
    let live = live_consumer(g.url(), "orders", live_stop.clone(), live_seen.clone());
    let tasks = publishers(g.url(), "orders", 4, stop, ledger.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = ledger.lock().unwrap().acked.len();
    assert!(before_kill > 0, "publishing works before the kill");
    let probe = common::nats_harness::connect_ready(&cluster.url(), Duration::from_secs(5));
    let leader = JetStream::new(probe, Duration::from_secs(2))
        .stream_info("SLUICE")
        .unwrap()
        .cluster
        .and_then(|c| c.leader)
        .expect("the stream has a leader");
    cluster.node_named(&leader).kill();
    let killed_at = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let after_kill = l
        .acked
        .len()
        .checked_sub(before_kill)
        .expect("acks only grow");
    eprintln!(
        "leader {leader} killed {:?} before the end: {} acked ({} after the kill), {} failed calls (slowest {:?})",
        stop.saturating_duration_since(killed_at),
        l.acked.len(),
        after_kill,
        l.failed,
        l.worst_failure
    );
    assert!(after_kill > 0, "publishing continued after the election");
    assert!(
        l.worst_failure <= Duration::from_millis(3_500),
        "a failed call took {:?}, past its 3 s deadline",
        l.worst_failure
    );
    let mut c = g.client().await;
    let found = read_everything(&mut c, "orders", "audit", l.acked.len()).await;
    // The live consumer gets every stored message, including any stored
    // by a call that failed (at least once: none skipped).
    let deadline = Instant::now() + Duration::from_secs(20);
    let skipped: Vec<u64> = loop {
        let seen = live_seen.lock().unwrap().clone();
        let skipped: Vec<u64> = found
            .iter()
            .map(|d| d.sequence)
            .filter(|q| !seen.contains(q))
            .collect();
        if skipped.is_empty() || Instant::now() > deadline {
            break skipped;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    live_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    live.await.unwrap();
    eprintln!(
        "live consumer: {} of {} stored messages never delivered",
        skipped.len(),
        found.len()
    );
    assert!(
        skipped.is_empty(),
        "the live group never got {:?}…",
        &skipped[..skipped.len().min(10)]
    );
    let (missing, dups) = account(&l.acked, &found);
    let log = g.log_text();
    eprintln!(
        "LOG lines {} page lines {}",
        log.lines().count(),
        log.matches("page of").count()
    );
    if missing > 0 {
        for l in log.lines().filter(|l| !l.contains(" acked")).take(80) {
            eprintln!("LOG {l}");
        }
    }
    eprintln!(
        "found {} messages: {missing} acked ones missing, {dups} duplicates",
        found.len()
    );
    assert_eq!((missing, dups), (0, 0));
}

/// Every NATS node down: health turns NOT_SERVING (Watch streams are told
/// and stay open), publishes fail UNAVAILABLE at once instead of hanging;
/// when the nodes come back, service resumes by itself with everything
/// acknowledged before still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nats_nodes_down_then_back_fails_fast_and_recovers() {
    let _heavy = serial().await;
    let mut cluster = Cluster::start("down");
    let url = nats_url(&cluster.url());
    let g = gateway(&url, "3", &[]);
    let mut c = g.client().await;
    let mut acked = BTreeMap::new();
    for i in 0..200 {
        let r = c
            .publish("t", format!("before-{i}").as_bytes())
            .await
            .unwrap();
        acked.insert(r.sequence, r.message_id);
    }
    let mut watch = c.health_watch().await;
    assert_eq!(watch.message().await.unwrap().unwrap().status, SERVING);

    for n in cluster.nodes.iter_mut() {
        n.kill();
    }
    let flipped = wait_health(&c, NOT_SERVING, Duration::from_secs(5)).await;
    let w = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch is told");
    assert_eq!(w.unwrap().unwrap().status, NOT_SERVING);
    let t = Instant::now();
    let err = publish_within(&mut c, "t", b"while-down", Duration::from_secs(10))
        .await
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("health NOT_SERVING after {flipped:?}; a publish failed in {took:?}: {err:?}");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unavailable"), "{err:?}");
    assert!(
        took < Duration::from_secs(1),
        "failed fast, not after {took:?}"
    );

    for n in cluster.nodes.iter_mut() {
        n.launch();
    }
    let back = wait_health(&c, SERVING, Duration::from_secs(60)).await;
    let w = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch is told again");
    assert_eq!(w.unwrap().unwrap().status, SERVING);
    // Publishing works again (the first calls may still meet the election).
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match publish_within(&mut c, "t", b"after", Duration::from_secs(5)).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!(
        "SERVING again {back:?} after the restart; publish got sequence {}",
        r.sequence
    );
    acked.insert(r.sequence, r.message_id);
    let found = read_everything(&mut c, "t", "audit", acked.len()).await;
    assert_eq!(account(&acked, &found), (0, 0));
    assert_eq!(found.len(), 201, "nothing else was stored");
}

/// SIGKILL of the gateway while a publisher and an acking consumer run: the
/// restarted gateway has every acknowledged publish, and the consumer
/// resumes right after its stored cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigkill_under_load_keeps_acked_messages_and_cursors() {
    let (node, _client) = SingleNode::start();
    let url = node.node.url();
    let mut g = gateway(&url, "1", &[]);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Instant::now() + Duration::from_secs(3);
    let tasks = publishers(g.url(), "jobs", 2, stop, ledger.clone());

    // A consumer acking everything it gets.
    let mut c = g.client().await;
    let mut sub = c
        .subscribe("jobs", "workers", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(100)).await;
    let mut last_acked = 0u64;
    let consume_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < consume_until {
        if let Some(Ok(proto::SubscribeDownstream {
            response: Some(Down::Delivery(d)),
        })) = sub.next_within(Duration::from_millis(200)).await
        {
            sub.send(ack(&d.message_id)).await;
            sub.send(credit(1)).await;
            last_acked = d.sequence;
        }
    }
    assert!(last_acked > 0, "the consumer got messages");
    // Let the last acks reach the store, then kill the gateway mid-publish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    g.spawn(0);
    let mut c = g.client().await;
    let stats = c.topic_stats(&["jobs"]).await.unwrap();
    let cursor = stats[0]
        .consumer_groups
        .iter()
        .find(|g| g.group_name == "workers")
        .expect("the group survived")
        .cursor_sequence;
    assert!(
        cursor >= last_acked,
        "cursor {cursor} is behind the last ack {last_acked} that had time to be stored"
    );
    let acked_before_kill = ledger.lock().unwrap().acked.len();
    let found = read_everything(&mut c, "jobs", "audit", acked_before_kill).await;
    // The consumer resumes right after its cursor: at the first stored
    // message past it.
    let expected = found
        .iter()
        .map(|d| d.sequence)
        .filter(|&s| s > cursor)
        .min();
    let mut sub = c
        .subscribe("jobs", "workers", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    let next = sub.delivery(Duration::from_secs(5)).await;
    assert_eq!(Some(next.sequence), expected, "cursor {cursor}");
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let (missing, dups) = account(&l.acked, &found);
    eprintln!(
        "{} acked before the kill, {} stored, {missing} missing, {dups} duplicates; cursor {cursor}",
        l.acked.len(),
        found.len()
    );
    assert_eq!((missing, dups), (0, 0));
}

/// A BatchPublish as large as the default limit (10,000 messages) is stored
/// whole: every message is sent before its ack is awaited, so the client's
/// limit on requests in flight must allow it.
#[tokio::test]
async fn a_batch_of_ten_thousand_is_stored_whole() {
    let (node, _client) = SingleNode::start();
    let g = gateway(&node.node.url(), "1", &[]);
    let mut c = g.client().await;
    let payload = [9u8; 64];
    let refs: Vec<&[u8]> = (0..10_000).map(|_| &payload[..]).collect();
    let r = c.batch_publish("big-batch", &refs).await.unwrap();
    assert_eq!(r.results.len(), 10_000);
    let seqs: Vec<u64> = r.results.iter().map(|m| m.sequence).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in call order");
}

/// SIGTERM right after a consumer acked: the gateway stores the acks it
/// had queued before it exits, so the group resumes after its last ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_stores_the_acks_it_had_queued() {
    let (node, _client) = SingleNode::start();
    let mut g = gateway(&node.node.url(), "1", &[]);
    let mut c = g.client().await;
    let payload = [1u8; 32];
    let refs: Vec<&[u8]> = (0..2_000).map(|_| &payload[..]).collect();
    for _ in 0..5 {
        c.batch_publish("acks", &refs).await.unwrap();
    }
    let mut sub = c
        .subscribe("acks", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10_000)).await;
    let mut last = 0;
    for _ in 0..10_000 {
        let d = sub.delivery(Duration::from_secs(10)).await;
        sub.send(ack(&d.message_id)).await;
        last = d.sequence;
    }
    // Give the acks a moment to reach the daemon, then stop it at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.signal(15);
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
    g.spawn(0);
    let mut c = g.client().await;
    let stats = c.topic_stats(&["acks"]).await.unwrap();
    let cursor = stats[0].consumer_groups[0].cursor_sequence;
    assert_eq!(cursor, last, "{}", g.log_text());
}

/// A BatchPublish whose middle message the servers refuse (over their
/// max_payload) stores the others and says so; the topic's counts stay
/// exact afterwards (no number is left to the refused message).
#[tokio::test]
async fn counts_stay_exact_after_a_partly_stored_batch() {
    let (node, _client) = SingleNode::start();
    let g = gateway(&node.node.url(), "1", &["--max-message-bytes", "16777216"]);
    let mut c = g.client().await;
    let big = vec![0u8; 9 << 20];
    let err = c
        .batch_publish("partly", &[b"a", &big, b"c"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("2 of the call's messages were stored"),
        "{err:?}"
    );
    c.publish("partly", b"d").await.unwrap();
    // A group from the earliest sees the three stored messages.
    let found = read_everything(&mut c, "partly", "count", 3).await;
    let payloads: Vec<&[u8]> = found.iter().map(|d| d.payload.as_ref()).collect();
    assert_eq!(payloads, [&b"a"[..], b"c", b"d"]);
    let stats = c.topic_stats(&["partly"]).await.unwrap();
    assert_eq!(stats[0].total_messages, 3, "{stats:?}");
    let mut fresh = c
        .subscribe("partly", "fresh", proto::InitialPosition::Earliest)
        .await;
    // Subscribed once it delivers (the gateway claims the group first).
    fresh.send(credit(1)).await;
    fresh.delivery(Duration::from_secs(5)).await;
    drop(fresh);
    let stats = c.topic_stats(&["partly"]).await.unwrap();
    let pending: Vec<(String, u64)> = stats[0]
        .consumer_groups
        .iter()
        .map(|g| (g.group_name.clone(), g.pending_count))
        .collect();
    assert!(pending.contains(&("fresh".to_string(), 3)), "{pending:?}");
}
