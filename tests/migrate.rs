//! `sluice migrate` end to end, with real processes: a SQLite daemon fills a
//! data dir (100 000 messages over three topics, attributes, a topic
//! deleted in the middle, consumer groups part-way through), a migration is
//! killed half-way and run again, a third run finds nothing to do, and a
//! gateway on the JetStream cluster then serves the very same data: stats,
//! every message (id, sequence, timestamp, payload, attributes), cursors
//! that resume where they were, new sequences above the old ones. Also: a
//! migration refuses a data dir a daemon holds.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats_harness::SingleNode;
use common::*;
use sluice::nats::jetstream::JetStream;
use sluice::proto;

/// The topics that survive, the one deleted half-way, and a small one
/// whose last message is the store's last.
const TOPICS: [&str; 3] = ["orders.eu", "billing_1", "audit-log"];
const DOOMED: &str = "scratch.tmp";
const TINY: &str = "tiny";
/// Every message of `TINY` carries the attributes of this message number.
const TINY_ATTRS: u64 = 3;
const BATCHES: u64 = 100;
const BATCH: u64 = 1000;
/// Messages each group acks, per topic: (g1, g2).
const ACKED: [(usize, usize); 3] = [(1500, 700), (2500, 1), (1000, 1200)];

/// One acknowledged publish.
#[derive(Clone, Debug)]
struct Sent {
    n: u64,
    id: String,
    seq: u64,
    ts: i64,
}

fn payload(n: u64) -> Vec<u8> {
    let mut p = format!("message {n:08} ").into_bytes();
    p.resize(256, b'a' + (n % 26) as u8);
    p
}

fn attributes(n: u64) -> HashMap<String, String> {
    let mut a = HashMap::new();
    if n % 10 == 3 {
        a.insert("n".to_string(), n.to_string());
        a.insert("note".to_string(), "line\nbreak ü \"q\"".to_string());
    }
    a
}

async fn batch(c: &mut Client, topic: &str, first: u64, count: u64) -> Vec<Sent> {
    let r: proto::BatchPublishResponse = c
        .unary(
            "BatchPublish",
            proto::BatchPublishRequest {
                topic: topic.into(),
                messages: (first..first + count)
                    .map(|n| proto::BatchMessage {
                        payload: payload(n).into(),
                        attributes: attributes(n),
                        ..Default::default()
                    })
                    .collect(),
            },
        )
        .await
        .expect("batch publish");
    assert_eq!(r.results.len() as u64, count);
    r.results
        .into_iter()
        .zip(first..)
        .map(|(res, n)| Sent {
            n,
            id: res.message_id,
            seq: res.sequence,
            ts: r.timestamp,
        })
        .collect()
}

async fn stats(c: &mut Client, topics: &[&str]) -> Vec<proto::TopicStats> {
    let r: proto::GetTopicStatsResponse = c
        .unary(
            "GetTopicStats",
            proto::GetTopicStatsRequest {
                topics: topics.iter().map(|t| t.to_string()).collect(),
            },
        )
        .await
        .expect("stats");
    let mut s = r.stats;
    s.sort_by(|a, b| a.topic.cmp(&b.topic));
    for t in &mut s {
        t.consumer_groups
            .sort_by(|a, b| a.group_name.cmp(&b.group_name));
    }
    s
}

fn all_topics() -> Vec<&'static str> {
    TOPICS.iter().copied().chain([TINY]).collect()
}

async fn cursor_of(c: &mut Client, topic: &str, group: &str) -> Option<u64> {
    stats(c, &[topic]).await[0]
        .consumer_groups
        .iter()
        .find(|g| g.group_name == group)
        .map(|g| g.cursor_sequence)
}

/// Takes the first `n` messages of `topic` as `group` and acks them; waits
/// until the cursor is at the last one.
async fn consume(c: &mut Client, topic: &str, group: &str, sent: &[Sent], n: usize) {
    let mut sub = c
        .subscribe(topic, group, proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(n as u32)).await;
    let mut ids = Vec::with_capacity(n);
    for expected in &sent[..n] {
        let d = sub.delivery(Duration::from_secs(10)).await;
        assert_eq!(d.sequence, expected.seq, "{topic}/{group} in order");
        ids.push(d.message_id);
    }
    for chunk in ids.chunks(500) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        sub.send(batch_ack(&refs)).await;
    }
    let want = sent[n - 1].seq;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cursor_of(c, topic, group).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{topic}/{group} cursor never at {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn migrate_cmd(dir: &Path, url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("migrate")
        .arg("--data-dir")
        .arg(dir)
        .args(["--to", url, "--nats-replicas", "1"])
        .env_remove("SLUICE_NATS_PREFIX")
        .env_remove("SLUICE_NATS_REPLICAS")
        .env_remove("SLUICE_NATS_TOKEN")
        .stdin(Stdio::null());
    cmd
}

fn run_migrate(dir: &Path, url: &str) -> (Output, Duration) {
    let started = Instant::now();
    let out = migrate_cmd(dir, url).output().expect("run sluice migrate");
    let took = started.elapsed();
    eprintln!(
        "migrate ({took:?}) exit {:?}\nstdout: {}stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, took)
}

/// The number before `what` in the summary line.
fn count(summary: &str, what: &str) -> u64 {
    let at = summary
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} in {summary:?}"));
    summary[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("a number before {what:?} in {summary:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_store_is_served_by_a_gateway_exactly_as_before() {
    let t0 = Instant::now();
    // 1. Fill a SQLite data dir.
    let mut daemon = Server::start_with(&["--store", "sqlite"]);
    let mut c = daemon.client().await;
    let mut sent: Vec<Vec<Sent>> = vec![Vec::new(); TOPICS.len()];
    let mut n = 0u64;
    for b in 0..BATCHES {
        if b == 40 || b == 41 {
            batch(&mut c, DOOMED, 1_000_000 + b * BATCH, BATCH).await;
        }
        if b == 60 {
            let r: proto::DeleteTopicResponse = c
                .unary(
                    "DeleteTopic",
                    proto::DeleteTopicRequest {
                        topic: DOOMED.into(),
                    },
                )
                .await
                .unwrap();
            assert!(r.deleted);
        }
        let t = (b % 3) as usize;
        sent[t].extend(batch(&mut c, TOPICS[t], n, BATCH).await);
        n += BATCH;
    }
    let mut tiny = Vec::new();
    for i in 0..5u64 {
        let n = 2_000_000 + i;
        let attrs = attributes(TINY_ATTRS);
        let attrs: Vec<(&str, &str)> = attrs.iter().map(|(k, v)| (&**k, &**v)).collect();
        let r = c
            .publish_attrs(TINY, &payload(n), &attrs)
            .await
            .expect("publish");
        tiny.push(Sent {
            n,
            id: r.message_id,
            seq: r.sequence,
            ts: r.timestamp,
        });
    }
    for (t, &(g1, g2)) in ACKED.iter().enumerate() {
        consume(&mut c, TOPICS[t], "g1", &sent[t], g1).await;
        consume(&mut c, TOPICS[t], "g2", &sent[t], g2).await;
    }
    consume(&mut c, TINY, "g1", &tiny, tiny.len()).await;
    let before = stats(&mut c, &all_topics()).await;
    let last_seq = tiny[4].seq;
    let total: u64 = sent.iter().map(|s| s.len() as u64).sum::<u64>() + tiny.len() as u64;
    drop(c);
    daemon.signal(15);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    eprintln!("filled the SQLite store in {:?}", t0.elapsed());

    // 2. A migration killed half-way, then run to the end.
    let (nats, nats_client) = SingleNode::start();
    let url = nats.node.url();
    let t1 = Instant::now();
    let mut child = migrate_cmd(daemon.data_dir(), &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice migrate");
    let stderr = child.stderr.take().expect("stderr");
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        eprintln!("first run: {line}");
        if line.contains("messages copied") {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    let (out, took) = run_migrate(daemon.data_dir(), &url);
    assert_eq!(out.status.code(), Some(0));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let (copied, already) = (
        count(&summary, "messages copied"),
        count(&summary, "were already there"),
    );
    assert!(
        copied > 0 && already > 0,
        "the first run was interrupted half-way: {summary}"
    );
    assert_eq!(copied + already, total, "{summary}");
    assert!(
        count(&summary, "fillers") >= 2 * BATCH || already > 40 * BATCH,
        "the deleted topic's sequences were filled: {summary}"
    );
    assert_eq!(count(&summary, "consumer group cursors"), 7, "{summary}");
    assert_eq!(count(&summary, "written)"), 7, "{summary}");
    assert!(
        summary.contains(&format!("last sequence {last_seq}")),
        "{summary}"
    );
    eprintln!(
        "interrupted + resumed migration: {:?} (the resumed run {took:?})",
        t1.elapsed()
    );

    let js = JetStream::new(Arc::clone(&nats_client), Duration::from_secs(2));
    let state = js.stream_info("SLUICE").expect("stream info").state;
    assert_eq!((state.messages, state.last_seq), (total, last_seq));

    // 3. Again: nothing new.
    let (out, _) = run_migrate(daemon.data_dir(), &url);
    assert_eq!(out.status.code(), Some(0));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(count(&summary, "messages copied"), 0, "{summary}");
    assert_eq!(count(&summary, "were already there"), total, "{summary}");
    assert_eq!(count(&summary, "fillers"), 0, "{summary}");
    assert_eq!(count(&summary, "newly registered)"), 0, "{summary}");
    assert_eq!(count(&summary, "written)"), 0, "{summary}");
    let again = js.stream_info("SLUICE").expect("stream info").state;
    assert_eq!(again, state, "a second run changes nothing");

    // 4. A gateway on the cluster serves the same data.
    let t2 = Instant::now();
    let gateway = Server::start_with(&["--store", &url, "--nats-replicas", "1"]);
    let mut g = gateway.client().await;
    let after = stats(&mut g, &all_topics()).await;
    assert_eq!(after, before, "stats on the gateway = stats on SQLite");

    let mut expected: Vec<(&str, &[Sent])> = TOPICS
        .iter()
        .zip(&sent)
        .map(|(t, s)| (*t, s.as_slice()))
        .collect();
    expected.push((TINY, &tiny));
    for (topic, sent) in &expected {
        let mut sub = g
            .subscribe_with(proto::SubscribeUpstream {
                request: Some(proto::subscribe_upstream::Request::Init(
                    proto::SubscriptionInit {
                        topic: topic.to_string(),
                        initial_position: proto::InitialPosition::Earliest as i32,
                        mode: proto::SubscriptionMode::Browse as i32,
                        ..Default::default()
                    },
                )),
            })
            .await
            .expect("browse");
        sub.send(credit(sent.len() as u32)).await;
        for s in sent.iter() {
            let d = sub.delivery(Duration::from_secs(10)).await;
            assert_eq!(
                (d.sequence, d.message_id.as_str(), d.timestamp),
                (s.seq, s.id.as_str(), s.ts),
                "{topic}"
            );
            assert_eq!(&d.payload[..], &payload(s.n)[..], "{topic} {}", s.seq);
            let want = attributes(if *topic == TINY { TINY_ATTRS } else { s.n });
            assert_eq!(d.attributes, want, "{topic} {}", s.seq);
        }
    }
    eprintln!(
        "read back {total} messages through the gateway in {:?}",
        t2.elapsed()
    );

    // Existing groups resume right after their cursors.
    for (t, &(g1, g2)) in ACKED.iter().enumerate() {
        for (group, acked) in [("g1", g1), ("g2", g2)] {
            let mut sub = g
                .subscribe(TOPICS[t], group, proto::InitialPosition::Latest)
                .await;
            sub.send(credit(1)).await;
            let d = sub.delivery(Duration::from_secs(10)).await;
            assert_eq!(d.sequence, sent[t][acked].seq, "{}/{group}", TOPICS[t]);
            assert_eq!(d.message_id, sent[t][acked].id);
        }
    }
    // ... and new messages continue above the old last sequence.
    let r = g
        .publish(TINY, b"after the migration")
        .await
        .expect("publish");
    assert!(r.sequence > last_seq, "{} > {last_seq}", r.sequence);
    let mut sub = g
        .subscribe(TINY, "g1", proto::InitialPosition::Latest)
        .await;
    sub.send(credit(1)).await;
    let d = sub.delivery(Duration::from_secs(10)).await;
    assert_eq!(
        (d.sequence, &d.payload[..]),
        (r.sequence, &b"after the migration"[..])
    );
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[test]
fn a_data_dir_held_by_a_daemon_is_refused() {
    let daemon = Server::start_with(&["--store", "sqlite"]);
    let port = common::nats_harness::free_port();
    let (out, _) = run_migrate(daemon.data_dir(), &format!("nats://127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("sluice.lock") && last.contains("in use"),
        "one line naming the lock: {err}"
    );
}

/// A stopped SQLite daemon's data dir holding `n` messages on topic `a`.
async fn small_store(n: usize) -> Server {
    let mut daemon = Server::start_with(&["--store", "sqlite"]);
    let mut c = daemon.client().await;
    for i in 0..n {
        c.publish("a", format!("m{i}").as_bytes())
            .await
            .expect("publish");
    }
    drop(c);
    daemon.signal(15);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_a_copy_of_the_store_is_refused() {
    let first = small_store(10).await;
    // Same topic, same sequences, other timestamps.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = small_store(10).await;
    let (nats, _client) = SingleNode::start();
    let url = nats.node.url();
    let (out, _) = run_migrate(first.data_dir(), &url);
    assert_eq!(out.status.code(), Some(0));

    let (out, _) = run_migrate(other.data_dir(), &url);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a copy of") && err.contains("is not the store's message"),
        "{err}"
    );

    // The gateway took over and stored more: the store is no longer ahead.
    let gateway = Server::start_with(&["--store", &url, "--nats-replicas", "1"]);
    gateway
        .client()
        .await
        .publish("a", b"new")
        .await
        .expect("publish");
    drop(gateway);
    let (out, _) = run_migrate(first.data_dir(), &url);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past this store's last sequence 10"), "{err}");
}

#[test]
fn usage_errors_exit_2_and_help_lists_migrate() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("sluice migrate [--data-dir DIR] --to nats://"),
        "{text}"
    );
    for bad in [
        &["migrate"][..],
        &["migrate", "--to", "sqlite"][..],
        &["migrate", "--to", "nats://host"][..],
        &["migrate", "--to", "nats://h:4222", "--nats-replicas", "0"][..],
        &["migrate", "--to", "nats://h:4222", "--nats-prefix", "a.b"][..],
        &["migrate", "--to", "nats://h:4222", "--bogus"][..],
    ] {
        let o = Command::new(BIN).args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("sluice migrate: "), "{bad:?}: {err}");
    }
}
