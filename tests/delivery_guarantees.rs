//! Black-box tests of issue 13: idempotent publishing (keys, the dedup
//! window, its bound, SIGKILL inside it), poison-message protection
//! (`max_deliveries` and dead-letter topics, counts across reconnects and
//! restarts, retention and DeleteTopic) and ack deadlines (with credit
//! exhausted, with acks, counted towards `max_deliveries`). All run on both
//! stores but the rows of the README's difference table: on JetStream
//! `--dedup-max-keys` does not apply and JetStream itself deduplicates a key
//! for 30 s at least.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use sluice::proto;
use sluice::proto::subscribe_downstream::Response as Down;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

async fn publish_key(
    c: &mut Client,
    topic: &str,
    payload: &str,
    key: &str,
) -> Result<proto::PublishResponse, tonic::Status> {
    c.unary(
        "Publish",
        proto::PublishRequest {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec().into(),
            idempotency_key: key.into(),
            ..Default::default()
        },
    )
    .await
}

async fn total(c: &mut Client, topic: &str) -> u64 {
    c.topic_stats(&[topic]).await.expect("stats")[0].total_messages
}

async fn cursor(c: &mut Client, topic: &str, group: &str) -> u64 {
    c.topic_stats(&[topic]).await.expect("stats")[0]
        .consumer_groups
        .iter()
        .find(|g| g.group_name == group)
        .map_or(0, |g| g.cursor_sequence)
}

fn init_with(
    topic: &str,
    group: &str,
    max_deliveries: u32,
    dead_letter_topic: &str,
    ack_deadline_ms: u32,
) -> proto::SubscribeUpstream {
    let mut up = init(topic, group, proto::InitialPosition::Earliest);
    if let Some(proto::subscribe_upstream::Request::Init(i)) = up.request.as_mut() {
        i.max_deliveries = max_deliveries;
        i.dead_letter_topic = dead_letter_topic.into();
        i.ack_deadline_ms = ack_deadline_ms;
    }
    up
}

/// Everything a BROWSE stream of `topic` holds, read until quiet.
async fn browse_all(c: &mut Client, topic: &str) -> Vec<proto::MessageDelivery> {
    let s = c.browse(topic, proto::InitialPosition::Earliest).await;
    s.send(credit(1000)).await;
    let mut s = s;
    s.deliveries_until_quiet(Duration::from_millis(700)).await
}

// ---------------------------------------------------------------------------
// Idempotent publish
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_repeated_key_returns_the_original_and_stores_nothing() {
    let server = Server::start();
    let mut c = server.client().await;
    let first = publish_key(&mut c, "orders", "one", "order-1")
        .await
        .unwrap();
    assert!(!first.duplicate);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = publish_key(&mut c, "orders", "changed", "order-1")
        .await
        .unwrap();
    assert!(again.duplicate, "{again:?}");
    assert_eq!(
        (again.message_id.as_str(), again.sequence, again.timestamp),
        (first.message_id.as_str(), first.sequence, first.timestamp)
    );
    assert_eq!(total(&mut c, "orders").await, 1);
    // Keys are per topic; no key means no deduplication.
    let other = publish_key(&mut c, "invoices", "one", "order-1")
        .await
        .unwrap();
    assert!(!other.duplicate);
    c.publish("orders", b"x").await.unwrap();
    c.publish("orders", b"x").await.unwrap();
    assert_eq!(total(&mut c, "orders").await, 3);
    let stored = browse_all(&mut c, "orders").await;
    assert_eq!(
        stored[0].payload,
        b"one".to_vec(),
        "the original payload stays"
    );
}

#[tokio::test]
async fn bad_keys_are_refused() {
    let server = Server::start();
    let mut c = server.client().await;
    for key in ["k".repeat(129), "tab\there".into(), "naïve".into()] {
        let e = publish_key(&mut c, "t", "p", &key).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key:?}: {e:?}");
        assert!(e.message().contains("idempotency_key"), "{e:?}");
    }
    let e = c
        .unary::<_, proto::BatchPublishResponse>(
            "BatchPublish",
            proto::BatchPublishRequest {
                topic: "t".into(),
                messages: vec![proto::BatchMessage {
                    payload: b"p".to_vec().into(),
                    idempotency_key: "\u{7f}".into(),
                    ..Default::default()
                }],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // 128 printable bytes, spaces included, are fine.
    publish_key(&mut c, "t", "p", &format!("a b{}", "x".repeat(125)))
        .await
        .unwrap();
}

#[tokio::test]
async fn batch_duplicates_are_answered_per_message_and_the_rest_is_stored() {
    let server = Server::start();
    let mut c = server.client().await;
    let earlier = publish_key(&mut c, "t", "c", "c").await.unwrap();
    let msg = |p: &str, k: &str| proto::BatchMessage {
        payload: p.as_bytes().to_vec().into(),
        idempotency_key: k.into(),
        ..Default::default()
    };
    let r: proto::BatchPublishResponse = c
        .unary(
            "BatchPublish",
            proto::BatchPublishRequest {
                topic: "t".into(),
                messages: vec![
                    msg("a", "a"),
                    msg("b", "b"),
                    msg("a again", "a"),
                    msg("c again", "c"),
                    msg("no key", ""),
                ],
            },
        )
        .await
        .unwrap();
    let dup: Vec<bool> = r.results.iter().map(|m| m.duplicate).collect();
    assert_eq!(dup, [false, false, true, true, false]);
    assert_eq!(r.results[2].sequence, r.results[0].sequence);
    assert_eq!(r.results[2].message_id, r.results[0].message_id);
    assert_eq!(r.results[3].sequence, earlier.sequence);
    assert_eq!(r.results[3].message_id, earlier.message_id);
    assert_eq!(total(&mut c, "t").await, 4);
    let payloads: Vec<Vec<u8>> = browse_all(&mut c, "t")
        .await
        .into_iter()
        .map(|d| d.payload.to_vec())
        .collect();
    assert_eq!(payloads, [&b"c"[..], b"a", b"b", b"no key"]);
}

#[tokio::test]
async fn concurrent_publishes_of_one_key_store_it_once() {
    let server = Server::start();
    let url = server.url();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            publish_key(&mut c, "t", &format!("try {i}"), "the-key")
                .await
                .unwrap()
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let fresh = replies.iter().filter(|r| !r.duplicate).count();
    assert_eq!(fresh, 1, "{replies:?}");
    assert!(replies.iter().all(|r| r.sequence == replies[0].sequence));
    let mut c = server.client().await;
    assert_eq!(total(&mut c, "t").await, 1);
}

#[tokio::test]
async fn keys_survive_a_sigkill_inside_the_window() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let first = publish_key(&mut c, "t", "p", "k1").await.unwrap();
    server.kill9();
    server.spawn(server.port);
    let mut c = server.client().await;
    let again = publish_key(&mut c, "t", "p", "k1").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.sequence, again.message_id, again.timestamp),
        (first.sequence, first.message_id, first.timestamp)
    );
    assert_eq!(total(&mut c, "t").await, 1);
}

#[tokio::test]
async fn keys_expire_after_the_window() {
    if sqlite_only("JetStream deduplicates a key for 30 s at least") {
        return;
    }
    let server = Server::start_with(&["--dedup-window", "1s"]);
    let mut c = server.client().await;
    let first = publish_key(&mut c, "t", "p", "k").await.unwrap();
    assert!(publish_key(&mut c, "t", "p", "k").await.unwrap().duplicate);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let later = publish_key(&mut c, "t", "p", "k").await.unwrap();
    assert!(!later.duplicate);
    assert!(later.sequence > first.sequence);
}

#[tokio::test]
async fn past_the_key_bound_the_oldest_keys_are_forgotten_first() {
    if sqlite_only("--dedup-max-keys bounds the SQLite store's keys") {
        return;
    }
    // At most 4 keys, at least 2: the oldest half goes when it is full.
    let server = Server::start_with(&["--dedup-max-keys", "4"]);
    let mut c = server.client().await;
    for k in ["k1", "k2", "k3", "k4", "k5"] {
        assert!(!publish_key(&mut c, "t", "p", k).await.unwrap().duplicate);
    }
    for k in ["k3", "k4", "k5"] {
        assert!(
            publish_key(&mut c, "t", "p", k).await.unwrap().duplicate,
            "{k}"
        );
    }
    assert!(!publish_key(&mut c, "t", "p", "k1").await.unwrap().duplicate);
    assert_eq!(total(&mut c, "t").await, 6);
}

// ---------------------------------------------------------------------------
// Max deliveries and dead-letter topics
// ---------------------------------------------------------------------------

/// Subscribes with `max_deliveries`, takes one delivery with one credit
/// and drops the stream without acking: a consumer that crashes on it.
async fn crash_on_next(c: &mut Client, topic: &str, max: u32) -> Option<proto::MessageDelivery> {
    let mut s = c
        .subscribe_with(init_with(topic, "g", max, "", 0))
        .await
        .expect("subscribe");
    s.send(credit(1)).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        match s.next_within(Duration::from_secs(3)).await {
            Some(Ok(proto::SubscribeDownstream {
                response: Some(Down::Delivery(d)),
            })) => return Some(d),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
    None
}

#[tokio::test]
async fn a_crash_looping_consumer_moves_the_poison_message_to_the_dead_letter_topic() {
    let server = Server::start();
    let mut c = server.client().await;
    let poison = c
        .publish_attrs("jobs", b"poison", &[("kind", "bad")])
        .await
        .unwrap();
    let next = c.publish("jobs", b"fine").await.unwrap();
    for round in 1..=5u32 {
        let d = crash_on_next(&mut c, "jobs", 5).await.expect("delivery");
        assert_eq!(d.sequence, poison.sequence, "round {round}");
        assert_eq!(d.delivery_count, round);
    }
    // The sixth attempt gets the next message: the poison one went to the
    // dead-letter topic and the cursor moved past it in the same commit.
    let d = crash_on_next(&mut c, "jobs", 5).await.expect("delivery");
    assert_eq!((d.sequence, d.delivery_count), (next.sequence, 1));
    // The dead-letter commit runs beside that delivery: wait for it.
    let deadline = Instant::now() + WAIT;
    while cursor(&mut c, "jobs", "g").await != poison.sequence && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cursor(&mut c, "jobs", "g").await, poison.sequence);
    let dead = browse_all(&mut c, "jobs.dead-letter").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let a: &HashMap<String, String> = &dead[0].attributes;
    assert_eq!(dead[0].payload, b"poison".to_vec());
    assert_eq!(a["kind"], "bad");
    assert_eq!(a["sluice-dead-letter-topic"], "jobs");
    assert_eq!(
        a["sluice-dead-letter-sequence"],
        poison.sequence.to_string()
    );
    assert_eq!(a["sluice-dead-letter-message-id"], poison.message_id);
    assert_eq!(a["sluice-dead-letter-group"], "g");
    assert_eq!(a["sluice-dead-letter-delivery-count"], "5");
    assert_eq!(a["sluice-dead-letter-reason"], "max_deliveries");
    // Never dead-lettered twice, never delivered again.
    for _ in 0..3 {
        let d = crash_on_next(&mut c, "jobs", 5).await.expect("delivery");
        assert_eq!(d.sequence, next.sequence);
    }
    assert_eq!(browse_all(&mut c, "jobs.dead-letter").await.len(), 1);
}

#[tokio::test]
async fn delivery_counts_of_a_group_with_max_deliveries_survive_a_broker_sigkill() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let poison = c.publish("jobs", b"poison").await.unwrap();
    let next = c.publish("jobs", b"fine").await.unwrap();
    for round in 1..=3u32 {
        let d = crash_on_next(&mut c, "jobs", 4).await.expect("delivery");
        assert_eq!((d.sequence, d.delivery_count), (poison.sequence, round));
    }
    // Counts are written like cursors (coalesced, then committed): give the
    // last one a moment to be handed to the writer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill9();
    server.spawn(server.port);
    let mut c = server.client().await;
    let d = crash_on_next(&mut c, "jobs", 4).await.expect("delivery");
    assert_eq!((d.sequence, d.delivery_count), (poison.sequence, 4));
    let d = crash_on_next(&mut c, "jobs", 4).await.expect("delivery");
    assert_eq!(
        d.sequence, next.sequence,
        "the fifth delivery was dead-lettered"
    );
    assert_eq!(browse_all(&mut c, "jobs.dead-letter").await.len(), 1);
}

#[tokio::test]
async fn nacks_count_towards_max_deliveries_and_a_custom_dead_letter_topic_is_used() {
    let server = Server::start();
    let mut c = server.client().await;
    let poison = c.publish("t", b"poison").await.unwrap();
    let mut s = c
        .subscribe_with(init_with("t", "g", 3, "t-poison", 0))
        .await
        .unwrap();
    s.send(credit(1)).await;
    for round in 1..=3u32 {
        let d = s.delivery(WAIT).await;
        assert_eq!((d.sequence, d.delivery_count), (poison.sequence, round));
        s.send(nack(&d.message_id, 0)).await;
        s.send(credit(1)).await;
    }
    // The fourth delivery would pass max_deliveries: it is dead-lettered.
    let none = s.deliveries_until_quiet(Duration::from_millis(500)).await;
    assert!(none.is_empty(), "{none:?}");
    let next = c.publish("t", b"fine").await.unwrap();
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (next.sequence, 1));
    let dead = browse_all(&mut c, "t-poison").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attributes["sluice-dead-letter-delivery-count"], "3");
}

#[tokio::test]
async fn a_dead_lettered_message_outlives_retention_and_delete_topic_of_its_source() {
    let server = Server::start_with(&["--retention-max-messages", "2"]);
    let mut c = server.client().await;
    let poison = c.publish("src", b"poison").await.unwrap();
    c.publish("src", b"fine").await.unwrap();
    for _ in 0..2 {
        crash_on_next(&mut c, "src", 2).await.expect("delivery");
    }
    let d = crash_on_next(&mut c, "src", 2).await.expect("delivery");
    assert_ne!(d.sequence, poison.sequence);
    // Retention trims the source; the dead-letter copy stays.
    for i in 0..5 {
        c.publish("src", format!("more {i}").as_bytes())
            .await
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while total(&mut c, "src").await > 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(total(&mut c, "src").await, 2);
    let r: proto::DeleteTopicResponse = c
        .unary(
            "DeleteTopic",
            proto::DeleteTopicRequest {
                topic: "src".into(),
            },
        )
        .await
        .unwrap();
    assert!(r.deleted);
    let dead = browse_all(&mut c, "src.dead-letter").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"poison".to_vec());
    assert_eq!(
        dead[0].attributes["sluice-dead-letter-sequence"],
        poison.sequence.to_string()
    );
}

#[tokio::test]
async fn settings_that_break_the_rules_are_refused() {
    let server = Server::start();
    let mut c = server.client().await;
    let browse = proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: "t".into(),
                mode: proto::SubscriptionMode::Browse as i32,
                max_deliveries: 3,
                ..Default::default()
            },
        )),
    };
    let cases = [
        (browse, "consumer group"),
        (init_with("t", "g", 3, "t", 0), "differ"),
        (init_with("t", "g", 3, "bad name!", 0), "dead_letter_topic"),
        (init_with("t", "g", 0, "elsewhere", 0), "max_deliveries"),
        (
            init_with(&"x".repeat(250), "g", 3, "", 0),
            "dead-letter topic is too long",
        ),
    ];
    for (first, says) in cases {
        let result = match c.subscribe_with(first).await {
            Err(e) => Err(e),
            Ok(mut s) => match s.next_within(WAIT).await {
                Some(Err(e)) => Err(e),
                other => Ok(format!("{other:?}")),
            },
        };
        let e = result.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{says}: {e:?}");
    }
}

// ---------------------------------------------------------------------------
// Ack deadline
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_unacked_delivery_comes_again_after_its_deadline_only_with_credit() {
    let server = Server::start();
    let mut c = server.client().await;
    let m1 = c.publish("t", b"one").await.unwrap();
    let m2 = c.publish("t", b"two").await.unwrap();
    let mut s = c
        .subscribe_with(init_with("t", "g", 0, "", 300))
        .await
        .unwrap();
    s.send(credit(1)).await;
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (m1.sequence, 1));
    // The deadline passes with no credit: nothing may be sent.
    let quiet = s.deliveries_until_quiet(Duration::from_millis(800)).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    s.send(credit(1)).await;
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (m1.sequence, 2));
    // Once per deadline while credit lasts.
    s.send(credit(2)).await;
    let d = s.delivery(WAIT).await;
    assert_eq!(d.sequence, m2.sequence, "new messages are not held back");
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (m1.sequence, 3));
    // A cumulative ack covers both: nothing comes back after it.
    s.send(ack(&m2.message_id)).await;
    s.send(credit(10)).await;
    let after = s.deliveries_until_quiet(Duration::from_millis(1000)).await;
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(cursor(&mut c, "t", "g").await, m2.sequence);
}

#[tokio::test]
async fn deadline_redeliveries_count_towards_max_deliveries() {
    let server = Server::start();
    let mut c = server.client().await;
    let poison = c.publish("t", b"slow").await.unwrap();
    let mut s = c
        .subscribe_with(init_with("t", "g", 2, "", 200))
        .await
        .unwrap();
    s.send(credit(1)).await;
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (poison.sequence, 1));
    s.send(credit(1)).await;
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (poison.sequence, 2));
    s.send(credit(1)).await;
    // Its next deadline would make a third delivery: dead-lettered instead.
    let none = s.deliveries_until_quiet(Duration::from_millis(600)).await;
    assert!(none.is_empty(), "{none:?}");
    let next = c.publish("t", b"fine").await.unwrap();
    let d = s.delivery(WAIT).await;
    assert_eq!((d.sequence, d.delivery_count), (next.sequence, 1));
    s.send(ack(&d.message_id)).await;
    assert_eq!(browse_all(&mut c, "t.dead-letter").await.len(), 1);
}

#[tokio::test]
async fn a_topic_deleted_and_created_again_does_not_know_the_old_keys() {
    let server = Server::start();
    let mut c = server.client().await;
    let first = publish_key(&mut c, "t", "old", "k").await.unwrap();
    let r: proto::DeleteTopicResponse = c
        .unary(
            "DeleteTopic",
            proto::DeleteTopicRequest { topic: "t".into() },
        )
        .await
        .unwrap();
    assert!(r.deleted);
    let again = publish_key(&mut c, "t", "new", "k").await.unwrap();
    assert!(!again.duplicate, "{again:?}");
    assert!(again.sequence > first.sequence);
    assert!(
        publish_key(&mut c, "t", "new", "k")
            .await
            .unwrap()
            .duplicate
    );
    assert_eq!(total(&mut c, "t").await, 1);
}
