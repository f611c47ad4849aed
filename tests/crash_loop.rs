//! Crash loop (issue 9): SIGKILL the daemon at seeded random moments under
//! mixed load (unary publishes, BatchPublish, a consumer group acking), and
//! after every restart check that every acknowledged message is stored
//! exactly once, that batches are all-or-nothing, that sequences only grow,
//! and that the consumer group resumes at or before its first unacked
//! message. `SLUICE_CRASH_ROUNDS` sets the rounds (CI: 10; `make crash-loop
//! ROUNDS=100`), `SLUICE_CRASH_SEED` the seed.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sluice::proto;

const TOPIC: &str = "crash";

/// A message's identity, carried in its attributes: (round, task, n).
type Key = (u64, u64, u64);

fn key_of(d: &proto::MessageDelivery) -> Option<Key> {
    let get = |k: &str| d.attributes.get(k)?.parse::<u64>().ok();
    Some((get("round")?, get("task")?, get("n")?))
}

fn message(round: u64, task: u64, n: u64, batch: u64) -> proto::BatchMessage {
    let attributes = [("round", round), ("task", task), ("n", n), ("batch", batch)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    proto::BatchMessage {
        payload: format!("{round}/{task}/{n}").into_bytes().into(),
        attributes,
        ..Default::default()
    }
}

/// What the load saw acknowledged: key -> sequence; and batch id -> its size.
#[derive(Default)]
struct Seen {
    acked: HashMap<Key, u64>,
    batches: HashMap<(u64, u64, u64), usize>,
    /// Highest sequence the consumer acked.
    consumer_acked: u64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads the topic in BROWSE mode from `from` until it is quiet.
async fn read_from(c: &mut Client, from: u64) -> Vec<proto::MessageDelivery> {
    let mut sub = c
        .subscribe_with(proto::SubscribeUpstream {
            request: Some(proto::subscribe_upstream::Request::Init(
                proto::SubscriptionInit {
                    topic: TOPIC.into(),
                    initial_position: proto::InitialPosition::Offset as i32,
                    offset: from,
                    mode: proto::SubscriptionMode::Browse as i32,
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
    sub.send(credit(1_000_000)).await;
    let mut out = Vec::new();
    // The first delivery may need a backlog read: allow it time.
    let mut quiet = Duration::from_secs(3);
    loop {
        let batch = sub.deliveries_until_quiet(quiet).await;
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
        quiet = Duration::from_millis(700);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_loop_keeps_every_acknowledged_message_once() {
    let rounds: u64 = std::env::var("SLUICE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut rng: u64 = std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    eprintln!("crash loop: {rounds} rounds, seed {rng}");
    let mut server = Server::start();
    // Everything stored below this was verified in an earlier round.
    let mut verified_to = 0u64;
    let mut total_acked = 0usize;
    for round in 0..rounds {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut tasks = Vec::new();
        // Four unary publishers and two batch publishers.
        for task in 0..6u64 {
            let mut c = server.client().await;
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let batch = if task >= 4 { 1 + (n % 5) } else { 0 };
                    let reply = if batch == 0 {
                        let m = message(round, task, n, 0);
                        c.unary::<_, proto::PublishResponse>(
                            "Publish",
                            proto::PublishRequest {
                                topic: TOPIC.into(),
                                payload: m.payload,
                                attributes: m.attributes,
                                ..Default::default()
                            },
                        )
                        .await
                        .map(|r| vec![(n, r.sequence)])
                    } else {
                        let base = n * 10;
                        let messages = (0..batch)
                            .map(|i| message(round, task, base + i, n + 1))
                            .collect();
                        c.unary::<_, proto::BatchPublishResponse>(
                            "BatchPublish",
                            proto::BatchPublishRequest {
                                topic: TOPIC.into(),
                                messages,
                            },
                        )
                        .await
                        .map(|r| {
                            r.results
                                .iter()
                                .enumerate()
                                .map(|(i, x)| (base + i as u64, x.sequence))
                                .collect()
                        })
                    };
                    let Ok(acked) = reply else { return };
                    let mut s = seen.lock().unwrap();
                    if batch > 0 {
                        s.batches.insert((round, task, n + 1), batch as usize);
                    }
                    for (n, seq) in acked {
                        s.acked.insert((round, task, n), seq);
                    }
                }
            }));
        }
        // A consumer group that acks what it receives.
        let mut c = server.client().await;
        let consumer_seen = seen.clone();
        let mut sub = c
            .subscribe_with(init(TOPIC, "crash-group", proto::InitialPosition::Earliest))
            .await
            .unwrap();
        sub.send(credit(1_000_000)).await;
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(m)) = sub.next_within(Duration::from_secs(30)).await {
                if let Some(proto::subscribe_downstream::Response::Delivery(d)) = m.response {
                    if sub.up.send(ack(&d.message_id)).await.is_err() {
                        return;
                    }
                    let mut s = consumer_seen.lock().unwrap();
                    s.consumer_acked = s.consumer_acked.max(d.sequence);
                }
            }
        }));
        let run_ms = 150 + splitmix(&mut rng) % 700;
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        tokio::task::block_in_place(|| server.kill9());
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a load task hung after SIGKILL")
                .unwrap();
        }
        server.spawn(0);
        let mut c = server.client().await;
        let stored = read_from(&mut c, verified_to + 1).await;
        let s = std::mem::take(&mut *seen.lock().unwrap());

        // Sequences only grow, each message is stored once and is one that
        // was sent in this round.
        let mut by_key: HashMap<Key, u64> = HashMap::new();
        let mut batch_found: BTreeMap<(u64, u64, u64), usize> = BTreeMap::new();
        let mut last = verified_to;
        for d in &stored {
            assert!(
                d.sequence > last,
                "round {round}: sequence {} after {last}",
                d.sequence
            );
            last = d.sequence;
            let key = key_of(d).expect("attributes");
            assert_eq!(
                key.0, round,
                "round {round}: a message of round {} below the verified line",
                key.0
            );
            assert!(
                by_key.insert(key, d.sequence).is_none(),
                "round {round}: {key:?} stored twice"
            );
            let b: u64 = d.attributes["batch"].parse().unwrap();
            if b > 0 {
                *batch_found.entry((key.0, key.1, b)).or_default() += 1;
            }
        }
        for (key, seq) in &s.acked {
            assert_eq!(
                by_key.get(key),
                Some(seq),
                "round {round}: acknowledged {key:?} (seq {seq}) lost"
            );
        }
        // A batch is stored whole or not at all.
        for (batch, found) in &batch_found {
            let size = s.batches.get(batch).copied();
            match size {
                Some(size) => assert_eq!(*found, size, "round {round}: batch {batch:?} is partial"),
                None => assert!(*found <= 5, "round {round}: unacknowledged batch {batch:?}"),
            }
        }
        // The group resumes at or before its first unacked message.
        let next_unacked = stored
            .iter()
            .map(|d| d.sequence)
            .chain(std::iter::once(u64::MAX))
            .find(|q| *q > s.consumer_acked)
            .unwrap_or(u64::MAX);
        let mut sub = c
            .subscribe_with(init(TOPIC, "crash-group", proto::InitialPosition::Earliest))
            .await
            .unwrap();
        sub.send(credit(1)).await;
        if next_unacked != u64::MAX {
            let d = sub.delivery(Duration::from_secs(5)).await;
            assert!(
                d.sequence <= next_unacked,
                "round {round}: the group skipped {next_unacked} (resumed at {})",
                d.sequence
            );
        }
        drop(sub);
        total_acked += s.acked.len();
        verified_to = verified_to.max(last);
        // New sequences continue above everything stored.
        let probe = c.publish("probe", b"p").await.unwrap().sequence;
        assert!(
            probe > verified_to,
            "round {round}: sequence {probe} reused"
        );
        verified_to = probe;
        eprintln!(
            "round {round}: killed after {run_ms} ms, {} acked, {} stored, consumer at {}",
            s.acked.len(),
            stored.len(),
            s.consumer_acked
        );
    }
    eprintln!("crash loop: {rounds} rounds, {total_acked} acknowledged messages, none lost");
    assert!(total_acked > 0);
}
