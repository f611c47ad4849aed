//! Black-box tests of the admin RPCs (GetTopicStats, DeleteTopic,
//! DeleteConsumerGroup, ResetCursor) and of retention (max age, max messages,
//! max bytes; off by default), including their effects on live streams and
//! across a SIGKILL restart.
//!
//! Synchronisation follows tests/subscribe.rs: a subscription is known to be
//! live once it produced a delivery or a heartbeat, and "Ack, then
//! CreditGrant(1), then the delivery that credit paid for" proves the Ack was
//! applied (an ack barrier). Everything that waits on the broker polls with a
//! deadline.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use sluice::proto;
use sluice::proto::subscribe_downstream::Response as Down;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn browse(topic: &str, pos: proto::InitialPosition) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                consumer_group: String::new(),
                consumer_id: "test".into(),
                initial_position: pos as i32,
                offset: 0,
                mode: proto::SubscriptionMode::Browse as i32,
                ..Default::default()
            },
        )),
    }
}

async fn stats(c: &mut Client, topics: &[&str]) -> Result<Vec<proto::TopicStats>, Status> {
    c.topic_stats(topics).await
}

/// Stats of one topic (which must exist).
async fn stat(c: &mut Client, topic: &str) -> proto::TopicStats {
    let mut all = stats(c, &[topic]).await.expect("GetTopicStats");
    assert_eq!(all.len(), 1, "one entry per named topic: {all:?}");
    let s = all.remove(0);
    assert_eq!(s.topic, topic);
    s
}

fn group<'a>(s: &'a proto::TopicStats, name: &str) -> Option<&'a proto::ConsumerGroupStats> {
    s.consumer_groups.iter().find(|g| g.group_name == name)
}

fn group_names(s: &proto::TopicStats) -> Vec<&str> {
    let mut v: Vec<&str> = s
        .consumer_groups
        .iter()
        .map(|g| g.group_name.as_str())
        .collect();
    v.sort_unstable();
    v
}

/// Polls the stats of `topic` until `pred` holds; panics after `limit`.
async fn stats_until(
    c: &mut Client,
    topic: &str,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&proto::TopicStats) -> bool,
) -> proto::TopicStats {
    let deadline = Instant::now() + limit;
    loop {
        let s = stat(c, topic).await;
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {limit:?}; last stats: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delete_topic(c: &mut Client, topic: &str) -> Result<bool, Status> {
    c.unary::<_, proto::DeleteTopicResponse>(
        "DeleteTopic",
        proto::DeleteTopicRequest {
            topic: topic.into(),
        },
    )
    .await
    .map(|r| r.deleted)
}

async fn delete_group(c: &mut Client, topic: &str, group: &str) -> Result<bool, Status> {
    c.unary::<_, proto::DeleteConsumerGroupResponse>(
        "DeleteConsumerGroup",
        proto::DeleteConsumerGroupRequest {
            topic: topic.into(),
            consumer_group: group.into(),
        },
    )
    .await
    .map(|r| r.deleted)
}

async fn reset_cursor(
    c: &mut Client,
    topic: &str,
    group: &str,
    sequence: u64,
) -> Result<bool, Status> {
    c.unary::<_, proto::ResetCursorResponse>(
        "ResetCursor",
        proto::ResetCursorRequest {
            topic: topic.into(),
            consumer_group: group.into(),
            sequence,
        },
    )
    .await
    .map(|r| r.updated)
}

async fn publish_all(
    c: &mut Client,
    topic: &str,
    payloads: &[&str],
) -> Vec<proto::PublishResponse> {
    let mut out = Vec::new();
    for p in payloads {
        out.push(c.publish(topic, p.as_bytes()).await.expect("publish"));
    }
    out
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn take(sub: &mut Subscription, n: usize) -> Vec<proto::MessageDelivery> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(sub.delivery(WAIT).await);
    }
    out
}

fn payloads(ds: &[proto::MessageDelivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

/// Fails if a delivery arrives or the stream ends within `quiet`
/// (heartbeats are allowed).
async fn assert_no_delivery(sub: &mut Subscription, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, sub.down.message()).await {
            Err(_) => return,
            Ok(Ok(Some(proto::SubscribeDownstream {
                response: Some(Down::Delivery(d)),
            }))) => panic!(
                "unexpected delivery of {:?} (seq {})",
                String::from_utf8_lossy(&d.payload),
                d.sequence
            ),
            Ok(Ok(Some(proto::SubscribeDownstream {
                response: Some(Down::Error(e)),
            }))) => panic!("unexpected StreamError {e:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("stream ended while it should stay open"),
            Ok(Err(s)) => panic!("stream failed while it should stay open: {s:?}"),
        }
    }
}

/// The next message must be `StreamError { code }` (heartbeats skipped), and
/// the stream must end right after it.
async fn expect_stream_error(sub: &mut Subscription, code: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sub.down.message()).await {
            Err(_) => panic!("no StreamError {code} within {WAIT:?}"),
            Ok(Ok(Some(proto::SubscribeDownstream {
                response: Some(Down::Error(e)),
            }))) => {
                assert_eq!(e.code, code, "{e:?}");
                break;
            }
            Ok(Ok(Some(proto::SubscribeDownstream {
                response: Some(Down::Heartbeat(_)),
            }))) => continue,
            Ok(Ok(Some(other))) => panic!("expected StreamError {code}, got {other:?}"),
            Ok(Ok(None)) => panic!("stream ended without a StreamError {code}"),
            Ok(Err(s)) => panic!("stream failed ({s:?}) without a StreamError {code}"),
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    match tokio::time::timeout_at(deadline, sub.down.message()).await {
        Err(_) => panic!("stream still open {WAIT:?} after StreamError {code}"),
        Ok(Ok(Some(m))) => panic!("message after StreamError {code}: {m:?}"),
        // Ended: cleanly, or with a status.
        Ok(Ok(None)) | Ok(Err(_)) => {}
    }
}

/// The next heartbeat within `limit` (proves the subscription is live).
async fn heartbeat(sub: &mut Subscription, limit: Duration) -> proto::Heartbeat {
    match sub.next_within(limit).await {
        Some(Ok(proto::SubscribeDownstream {
            response: Some(Down::Heartbeat(h)),
        })) => h,
        other => panic!("expected a heartbeat within {limit:?}, got {other:?}"),
    }
}

/// Reads a topic from the start in BROWSE mode; payloads until quiet. The
/// first delivery gets 3 s (a purge or retention pass may be running on a
/// loaded machine), so an empty result means nothing came in that time.
async fn read_all(c: &mut Client, topic: &str) -> Vec<proto::MessageDelivery> {
    let mut sub = c
        .subscribe_with(browse(topic, proto::InitialPosition::Earliest))
        .await
        .expect("browse");
    sub.send(credit(100_000)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let first = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next_within(left).await {
            Some(Ok(proto::SubscribeDownstream {
                response: Some(Down::Delivery(d)),
            })) => break d,
            Some(Ok(_)) if !left.is_zero() => continue,
            _ => return Vec::new(),
        }
    };
    let mut out = vec![first];
    out.extend(sub.deliveries_until_quiet(Duration::from_millis(700)).await);
    out
}

/// Publishes to `topic` in a loop on its own connection until `stop`;
/// returns (calls, slowest call, failures).
fn spawn_publisher(
    mut c: Client,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u64, Duration, Vec<String>)> {
    tokio::spawn(async move {
        let (mut n, mut worst, mut errors) = (0u64, Duration::ZERO, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            match tokio::time::timeout(Duration::from_secs(10), c.publish(topic, b"steady")).await {
                Ok(Ok(_)) => n += 1,
                Ok(Err(s)) => errors.push(format!("{s:?}")),
                Err(_) => errors.push("publish took over 10 s".into()),
            }
            worst = worst.max(t.elapsed());
        }
        (n, worst, errors)
    })
}

/// BatchPublishes `total` small messages to `topic` in batches of 1,000.
async fn preload(c: &mut Client, topic: &str, total: usize) {
    let payload = [b'b'; 32];
    let batch: Vec<&[u8]> = (0..1000).map(|_| &payload[..]).collect();
    for _ in 0..total / 1000 {
        c.batch_publish(topic, &batch).await.expect("batch publish");
    }
}

// ---------------------------------------------------------------------------
// GetTopicStats
// ---------------------------------------------------------------------------

#[tokio::test]
async fn topic_stats_are_exact_with_interleaved_topics_and_groups() {
    let server = Server::start_with(&["--heartbeat-interval", "100ms"]);
    let mut c = server.client().await;
    let t0 = now_ms();
    // Interleave two topics so that t's sequences have gaps.
    let a1 = c.publish("t", b"a1").await.unwrap();
    let b1 = c.publish("u", b"b1").await.unwrap();
    let a2 = c.publish("t", b"a2").await.unwrap();
    c.publish("u", b"b2").await.unwrap();
    c.publish("u", b"b3").await.unwrap();
    let a3 = c.publish("t", b"a3").await.unwrap();
    let a4 = c.publish("t", b"a4").await.unwrap();
    let b4 = c.publish("u", b"b4").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await; // a distinct timestamp
    let a5 = c.publish("t", b"a5").await.unwrap();
    assert!(a5.timestamp > a1.timestamp);

    let listed = c.list_topics().await.unwrap().topics;
    let created = |name: &str| {
        listed
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.created_at)
            .unwrap()
    };

    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 5);
    assert_eq!(s.first_sequence, a1.sequence);
    assert_eq!(s.last_sequence, a5.sequence);
    assert_eq!(s.first_message_timestamp, a1.timestamp);
    assert_eq!(s.last_message_timestamp, a5.timestamp);
    assert_eq!(s.created_at, created("t"));
    assert!(
        t0 - 1_000 <= s.created_at && s.created_at <= a1.timestamp,
        "created_at {} (test started {t0}, first message {})",
        s.created_at,
        a1.timestamp
    );
    assert!(s.consumer_groups.is_empty(), "{s:?}");

    let su = stat(&mut c, "u").await;
    assert_eq!(su.total_messages, 4);
    assert_eq!(su.first_sequence, b1.sequence);
    assert_eq!(su.last_sequence, b4.sequence);
    assert_eq!(su.first_message_timestamp, b1.timestamp);
    assert_eq!(su.last_message_timestamp, b4.timestamp);
    assert_eq!(su.created_at, created("u"));
    assert!(su.created_at >= s.created_at);

    // g1 acks a2 (ack barrier: the credit after it pays for a5).
    let mut g1 = c
        .subscribe("t", "g1", proto::InitialPosition::Earliest)
        .await;
    g1.send(credit(4)).await;
    let got = take(&mut g1, 4).await;
    assert_eq!(payloads(&got), ["a1", "a2", "a3", "a4"]);
    assert_eq!(got[2].sequence, a3.sequence);
    let before_ack = now_ms();
    g1.send(ack(&a2.message_id)).await;
    g1.send(credit(1)).await;
    assert_eq!(g1.delivery(WAIT).await.payload.as_ref(), b"a5");
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g1").expect("g1 listed");
    assert_eq!(g.cursor_sequence, a2.sequence);
    // Sequences are global: a5 - a2 would count u's messages too.
    assert_eq!(g.pending_count, 3, "a3, a4, a5 are after the cursor: {g:?}");
    assert!(
        before_ack <= g.last_ack_timestamp && g.last_ack_timestamp <= now_ms(),
        "last_ack_timestamp {} not in [{before_ack}, now]",
        g.last_ack_timestamp
    );

    // An ack without a barrier: the stats answer from memory, so the ack
    // shows as soon as the broker has read it (no wait for the cursor write).
    g1.send(ack(&a4.message_id)).await;
    let started = Instant::now();
    let mut polls = 0;
    let s = stats_until(&mut c, "t", Duration::from_secs(2), "ack of a4", |s| {
        polls += 1;
        group(s, "g1").is_some_and(|g| g.cursor_sequence == a4.sequence)
    })
    .await;
    eprintln!(
        "ack of a4 visible in stats after {polls} call(s), {:?}",
        started.elapsed()
    );
    assert_eq!(group(&s, "g1").unwrap().pending_count, 1);

    // g2 starts at LATEST: nothing pending, nothing acked yet.
    let mut g2 = c.subscribe("t", "g2", proto::InitialPosition::Latest).await;
    heartbeat(&mut g2, WAIT).await;
    // g3 starts at EARLIEST and acks nothing.
    let mut g3 = c
        .subscribe("t", "g3", proto::InitialPosition::Earliest)
        .await;
    g3.send(credit(1)).await;
    assert_eq!(g3.delivery(WAIT).await.payload.as_ref(), b"a1");

    let s = stat(&mut c, "t").await;
    assert_eq!(group_names(&s), ["g1", "g2", "g3"]);
    let g = group(&s, "g2").unwrap();
    assert_eq!(g.pending_count, 0, "{g:?}");
    assert_eq!(g.cursor_sequence, a5.sequence, "{g:?}");
    assert_eq!(g.last_ack_timestamp, 0, "{g:?}");
    let g = group(&s, "g3").unwrap();
    assert_eq!(g.cursor_sequence, 0, "{g:?}");
    assert_eq!(g.pending_count, 5, "{g:?}");
    assert_eq!(g.last_ack_timestamp, 0, "{g:?}");

    // New messages on both topics.
    c.publish("u", b"b5").await.unwrap();
    let a6 = c.publish("t", b"a6").await.unwrap();
    c.publish("u", b"b6").await.unwrap();
    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 6);
    assert_eq!(s.first_sequence, a1.sequence);
    assert_eq!(s.last_sequence, a6.sequence);
    assert_eq!(s.last_message_timestamp, a6.timestamp);
    let pending: Vec<u64> = ["g1", "g2", "g3"]
        .iter()
        .map(|n| group(&s, n).unwrap().pending_count)
        .collect();
    assert_eq!(pending, [2, 1, 6], "{s:?}");
    assert_eq!(stat(&mut c, "u").await.total_messages, 6);

    // The empty request: every topic, each exactly as asked by name.
    let mut all = stats(&mut c, &[]).await.unwrap();
    all.sort_by(|x, y| x.topic.cmp(&y.topic));
    let names: Vec<&str> = all.iter().map(|s| s.topic.as_str()).collect();
    assert_eq!(names, ["t", "u"]);
    let mut t_stats = s.clone();
    t_stats
        .consumer_groups
        .sort_by(|x, y| x.group_name.cmp(&y.group_name));
    all[0]
        .consumer_groups
        .sort_by(|x, y| x.group_name.cmp(&y.group_name));
    assert_eq!(all[0], t_stats);
    assert_eq!(all[1], stat(&mut c, "u").await);

    // Several names: one entry each.
    let both = stats(&mut c, &["u", "t"]).await.unwrap();
    let mut names: Vec<&str> = both.iter().map(|s| s.topic.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["t", "u"]);
}

#[tokio::test]
async fn topic_stats_survive_a_restart() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let a = publish_all(&mut c, "t", &["a1", "a2"]).await;
    c.publish("u", b"gap").await.unwrap();
    let a3 = c.publish("t", b"a3").await.unwrap();
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(2)).await;
    take(&mut sub, 2).await;
    sub.send(ack(&a[0].message_id)).await;
    sub.send(credit(1)).await;
    sub.delivery(WAIT).await; // ack barrier
    let before = stat(&mut c, "t").await;
    assert_eq!(group(&before, "g").unwrap().pending_count, 2);
    // The reactor hands the cursor write to the writer before this publish,
    // and the writer commits in order: its reply means the cursor is on disk.
    c.publish("barrier", b"x").await.unwrap();
    drop(sub);
    drop(c);

    server.kill9();
    server.spawn(0);
    let mut c = server.client().await;
    let after = stat(&mut c, "t").await;
    assert_eq!(after, before);
    assert_eq!(after.total_messages, 3);
    assert_eq!(after.last_sequence, a3.sequence);
}

#[tokio::test]
async fn topic_stats_of_an_empty_topic() {
    let server = Server::start_with(&["--heartbeat-interval", "100ms"]);
    let mut c = server.client().await;
    let t0 = now_ms();
    let mut sub = c
        .subscribe("empty", "g", proto::InitialPosition::Latest)
        .await;
    heartbeat(&mut sub, WAIT).await;
    let s = stat(&mut c, "empty").await;
    assert_eq!(s.total_messages, 0);
    assert_eq!(s.first_sequence, 0);
    assert_eq!(s.last_sequence, 0);
    assert_eq!(s.first_message_timestamp, 0);
    assert_eq!(s.last_message_timestamp, 0);
    assert!(
        (s.created_at - t0).abs() < 10_000,
        "created_at {}",
        s.created_at
    );
    let g = group(&s, "g").expect("group listed");
    assert_eq!((g.pending_count, g.last_ack_timestamp), (0, 0), "{g:?}");
}

#[tokio::test]
async fn topic_stats_not_found_and_invalid_argument() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();

    let s = stats(&mut c, &["nope"]).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = stats(&mut c, &["t", "nope"]).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    let long = "a".repeat(256);
    for bad in ["", "has space", "slash/x", long.as_str()] {
        let s = stats(&mut c, &[bad]).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}: {s:?}");
        let s = stats(&mut c, &["t", bad]).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "t, {bad:?}: {s:?}");
    }
    for bad in ["", "has space", long.as_str()] {
        let s = delete_topic(&mut c, bad).await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "DeleteTopic {bad:?}: {s:?}"
        );
        let s = delete_group(&mut c, bad, "g").await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "DeleteConsumerGroup {bad:?}: {s:?}"
        );
        let s = reset_cursor(&mut c, bad, "g", 0).await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "ResetCursor {bad:?}: {s:?}"
        );
    }
    // Nothing was created by the failed calls.
    let topics: Vec<String> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(topics, ["t"]);
    assert_eq!(stat(&mut c, "t").await.total_messages, 1);
}

// ---------------------------------------------------------------------------
// DeleteTopic
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_topic_ends_streams_and_publishing_recreates_it_fresh() {
    let server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3"]).await;
    c.publish("keep", b"k1").await.unwrap();

    let mut g = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    g.send(credit(10)).await;
    assert_eq!(payloads(&take(&mut g, 3).await), ["m1", "m2", "m3"]);
    g.send(ack(&m[1].message_id)).await;
    let mut b = c
        .subscribe_with(browse("t", proto::InitialPosition::Earliest))
        .await
        .unwrap();
    b.send(credit(10)).await;
    assert_eq!(take(&mut b, 3).await.len(), 3);
    let mut k = c
        .subscribe("keep", "g", proto::InitialPosition::Earliest)
        .await;
    k.send(credit(10)).await;
    assert_eq!(k.delivery(WAIT).await.payload.as_ref(), b"k1");
    let old = stat(&mut c, "t").await;

    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(delete_topic(&mut c, "t").await.unwrap());
    expect_stream_error(&mut g, "TOPIC_DELETED").await;
    expect_stream_error(&mut b, "TOPIC_DELETED").await;

    // Other topics are untouched.
    let k2 = c.publish("keep", b"k2").await.unwrap();
    assert_eq!(k.delivery(WAIT).await.message_id, k2.message_id);

    let listed: Vec<String> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(listed, ["keep"]);
    let s = stats(&mut c, &["t"]).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let all = stats(&mut c, &[]).await.unwrap();
    assert_eq!(
        all.iter().map(|s| s.topic.as_str()).collect::<Vec<_>>(),
        ["keep"]
    );

    // Unknown now (and never known): deleted=false, and the group and cursor
    // operations find nothing either.
    assert!(!delete_topic(&mut c, "t").await.unwrap());
    assert!(!delete_topic(&mut c, "never").await.unwrap());
    assert!(!delete_group(&mut c, "t", "g").await.unwrap());
    assert!(!reset_cursor(&mut c, "t", "g", 0).await.unwrap());

    // Publishing re-creates it: fresh, without the old messages or groups.
    let n1 = c.publish("t", b"n1").await.unwrap();
    assert!(n1.sequence > m[2].sequence);
    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 1);
    assert_eq!(
        (s.first_sequence, s.last_sequence),
        (n1.sequence, n1.sequence)
    );
    assert_eq!(s.first_message_timestamp, n1.timestamp);
    assert!(
        s.created_at > old.created_at,
        "re-created at {} (first created {})",
        s.created_at,
        old.created_at
    );
    assert!(s.consumer_groups.is_empty(), "{s:?}");
    // The old group's cursor (m2) is gone: it starts where it asks, at
    // EARLIEST, and sees only the new message.
    let mut g = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    g.send(credit(10)).await;
    let d = g.delivery(WAIT).await;
    assert_eq!(d.message_id, n1.message_id);
    assert_eq!(d.delivery_count, 1);
    assert_no_delivery(&mut g, Duration::from_millis(500)).await;
    assert_eq!(payloads(&read_all(&mut c, "t").await), ["n1"]);
}

#[tokio::test]
async fn delete_topic_survives_a_restart() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "gone", &["g1", "g2", "g3"]).await;
    publish_all(&mut c, "t", &["m1", "m2"]).await;
    c.publish("other", b"o1").await.unwrap();
    let mut sub = c
        .subscribe("gone", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(3)).await;
    take(&mut sub, 3).await;
    sub.send(ack(&m[2].message_id)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sub);

    assert!(delete_topic(&mut c, "gone").await.unwrap());
    assert!(delete_topic(&mut c, "t").await.unwrap());
    // "t" comes back with one new message before the crash.
    let n1 = c.publish("t", b"n1").await.unwrap();
    drop(c);
    server.kill9();
    server.spawn(0);

    let mut c = server.client().await;
    let listed: Vec<String> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(listed, ["other", "t"]);
    let s = stats(&mut c, &["gone"]).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 1, "{s:?}");
    assert_eq!(
        (s.first_sequence, s.last_sequence),
        (n1.sequence, n1.sequence)
    );
    assert_eq!(payloads(&read_all(&mut c, "t").await), ["n1"]);
    assert!(!delete_group(&mut c, "gone", "g").await.unwrap());

    // Subscribing re-creates "gone" empty: the old messages do not come back,
    // and the old group is gone too.
    let mut sub = c
        .subscribe("gone", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    assert_no_delivery(&mut sub, Duration::from_secs(1)).await;
    assert!(read_all(&mut c, "gone").await.is_empty());
    let s = stat(&mut c, "gone").await;
    assert_eq!(s.total_messages, 0, "{s:?}");
    let g = group(&s, "g").unwrap();
    assert_eq!((g.cursor_sequence, g.pending_count), (0, 0), "{g:?}");
}

#[tokio::test]
async fn deleting_a_large_topic_does_not_stall_other_publishers() {
    let _heavy = common::serial().await;
    const BIG: usize = 200_000;
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("other", b"first").await.unwrap();
    let t = Instant::now();
    preload(&mut c, "big", BIG).await;
    eprintln!("preloaded {BIG} messages in {:?}", t.elapsed());
    assert_eq!(stat(&mut c, "big").await.total_messages, BIG as u64);

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = spawn_publisher(server.client().await, "other", stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    assert!(delete_topic(&mut c, "big").await.unwrap());
    let delete_took = t.elapsed();
    // Keep publishing to "other" while the old messages are purged.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (calls, worst, errors) = publisher.await.unwrap();
    eprintln!(
        "DeleteTopic answered in {delete_took:?}; {calls} publishes to another topic meanwhile, slowest {worst:?}"
    );
    assert!(errors.is_empty(), "publish errors: {errors:?}");
    assert!(calls > 50, "only {calls} publishes in 6.5 s");
    assert!(
        worst < Duration::from_secs(1),
        "a publish to another topic took {worst:?} during the delete"
    );
    assert!(
        delete_took < Duration::from_secs(2),
        "DeleteTopic took {delete_took:?}"
    );
    let s = stats(&mut c, &["big"]).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = stat(&mut c, "other").await;
    assert_eq!(s.total_messages, calls + 1, "{s:?}");
}

#[tokio::test]
async fn topic_recreated_while_its_old_messages_are_purged_keeps_only_new_ones() {
    let _heavy = common::serial().await;
    const BIG: usize = 50_000;
    let mut server = Server::start();
    let mut c = server.client().await;
    // "other" is created first, so "big" holds the highest topic id.
    c.publish("other", b"first").await.unwrap();
    preload(&mut c, "big", BIG).await;
    assert!(delete_topic(&mut c, "big").await.unwrap());
    // Re-create "big" and a brand-new topic while the purge is under way.
    let fresh = c.publish("big", b"fresh").await.unwrap().sequence;
    let newcomer = c.publish("newcomer", b"hello").await.unwrap().sequence;
    check_recreated(&mut c, fresh, newcomer, "right after the delete").await;
    // Give the purge time to finish, then push the new messages out of any
    // in-memory cache with traffic on a third topic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    preload(&mut c, "other", 5_000).await;
    check_recreated(&mut c, fresh, newcomer, "after the purge").await;
    // After a crash (the purge resumes if unfinished) nothing changes either.
    drop(c);
    server.kill9();
    server.spawn(0);
    let mut c = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        check_recreated(&mut c, fresh, newcomer, "after a restart").await;
    }
}

/// "big" was deleted and re-created with one message ("fresh"), "newcomer"
/// created with one ("hello").
async fn check_recreated(c: &mut Client, fresh: u64, newcomer: u64, when: &str) {
    let s = stat(c, "big").await;
    assert_eq!(s.total_messages, 1, "{when}: {s:?}");
    assert_eq!(
        (s.first_sequence, s.last_sequence),
        (fresh, fresh),
        "{when}: {s:?}"
    );
    assert_eq!(payloads(&read_all(c, "big").await), ["fresh"], "{when}");
    let s = stat(c, "newcomer").await;
    assert_eq!(s.total_messages, 1, "{when}: {s:?}");
    assert_eq!(
        (s.first_sequence, s.last_sequence),
        (newcomer, newcomer),
        "{when}: {s:?}"
    );
    assert_eq!(
        payloads(&read_all(c, "newcomer").await),
        ["hello"],
        "{when}"
    );
}

// ---------------------------------------------------------------------------
// DeleteConsumerGroup
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_group_ends_its_consumer_and_the_name_starts_fresh() {
    let mut server = Server::start_with(&["--heartbeat-interval", "100ms"]);
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3", "m4"]).await;

    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(2)).await;
    assert_eq!(payloads(&take(&mut a, 2).await), ["m1", "m2"]);
    a.send(ack(&m[1].message_id)).await;
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.payload.as_ref(), b"m3"); // ack barrier
    let mut h = c
        .subscribe("t", "h", proto::InitialPosition::Earliest)
        .await;
    h.send(credit(1)).await;
    assert_eq!(h.delivery(WAIT).await.payload.as_ref(), b"m1");
    assert_eq!(group_names(&stat(&mut c, "t").await), ["g", "h"]);

    assert!(delete_group(&mut c, "t", "g").await.unwrap());
    expect_stream_error(&mut a, "GROUP_DELETED").await;
    // The other group's consumer is untouched.
    h.send(credit(1)).await;
    assert_eq!(h.delivery(WAIT).await.payload.as_ref(), b"m2");
    assert_eq!(group_names(&stat(&mut c, "t").await), ["h"]);

    assert!(!delete_group(&mut c, "t", "g").await.unwrap());
    assert!(!delete_group(&mut c, "t", "nope").await.unwrap());
    assert!(!delete_group(&mut c, "nope", "h").await.unwrap());

    // The name starts fresh at the position it asks for (the old cursor was m2).
    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(10)).await;
    let got = take(&mut a, 4).await;
    assert_eq!(payloads(&got), ["m1", "m2", "m3", "m4"]);
    assert_no_delivery(&mut a, Duration::from_millis(300)).await;
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!((g.cursor_sequence, g.pending_count), (0, 4), "{g:?}");

    // Deleted again, then LATEST: only what comes next.
    assert!(delete_group(&mut c, "t", "g").await.unwrap());
    expect_stream_error(&mut a, "GROUP_DELETED").await;
    let mut a = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    a.send(credit(10)).await;
    heartbeat(&mut a, WAIT).await;
    let m5 = c.publish("t", b"m5").await.unwrap();
    assert_eq!(a.delivery(WAIT).await.message_id, m5.message_id);
    a.send(ack(&m5.message_id)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);

    // The empty group name is "default".
    let mut d = c.subscribe("t", "", proto::InitialPosition::Earliest).await;
    d.send(credit(1)).await;
    d.delivery(WAIT).await;
    assert!(group(&stat(&mut c, "t").await, "default").is_some());
    assert!(delete_group(&mut c, "t", "").await.unwrap());
    expect_stream_error(&mut d, "GROUP_DELETED").await;

    // A deletion survives a restart.
    assert!(delete_group(&mut c, "t", "g").await.unwrap());
    drop(c);
    server.kill9();
    server.spawn(0);
    let mut c = server.client().await;
    assert_eq!(group_names(&stat(&mut c, "t").await), ["h"]);
    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(10)).await;
    assert_eq!(
        payloads(&take(&mut a, 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
}

// ---------------------------------------------------------------------------
// ResetCursor
// ---------------------------------------------------------------------------

#[tokio::test]
async fn reset_cursor_moves_a_live_consumer_and_survives_a_restart() {
    let mut server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"m1").await.unwrap();
    let x1 = c.publish("u", b"x1").await.unwrap();
    let m2 = c.publish("t", b"m2").await.unwrap();
    let m3 = c.publish("t", b"m3").await.unwrap();
    c.publish("u", b"x2").await.unwrap();
    let m4 = c.publish("t", b"m4").await.unwrap();
    let m5 = c.publish("t", b"m5").await.unwrap();

    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(1000)).await;
    assert_eq!(
        payloads(&take(&mut a, 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    a.send(ack(&m5.message_id)).await;
    stats_until(&mut c, "t", WAIT, "ack of m5", |s| {
        group(s, "g").is_some_and(|g| g.cursor_sequence == m5.sequence)
    })
    .await;

    // Back to m2: the live consumer continues with m3.
    assert!(reset_cursor(&mut c, "t", "g", m2.sequence).await.unwrap());
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (m2.sequence, 3),
        "{g:?}"
    );
    assert_eq!(payloads(&take(&mut a, 3).await), ["m3", "m4", "m5"]);
    assert_no_delivery(&mut a, Duration::from_millis(300)).await;

    // 0 replays everything.
    assert!(reset_cursor(&mut c, "t", "g", 0).await.unwrap());
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!((g.cursor_sequence, g.pending_count), (0, 5), "{g:?}");
    assert_eq!(
        payloads(&take(&mut a, 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    assert_no_delivery(&mut a, Duration::from_millis(300)).await;

    // A sequence of another topic (in the gap after m1): resumes at m2.
    assert!(reset_cursor(&mut c, "t", "g", x1.sequence).await.unwrap());
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (x1.sequence, 4),
        "{g:?}"
    );
    assert_eq!(payloads(&take(&mut a, 4).await), ["m2", "m3", "m4", "m5"]);

    // Forwards: to m4, and only m5 is left.
    assert!(reset_cursor(&mut c, "t", "g", m4.sequence).await.unwrap());
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (m4.sequence, 1),
        "{g:?}"
    );
    assert_eq!(payloads(&take(&mut a, 1).await), ["m5"]);
    assert_no_delivery(&mut a, Duration::from_millis(300)).await;

    // To the end: nothing until a new message.
    assert!(reset_cursor(&mut c, "t", "g", m5.sequence).await.unwrap());
    assert_eq!(
        group(&stat(&mut c, "t").await, "g").unwrap().pending_count,
        0
    );
    assert_no_delivery(&mut a, Duration::from_millis(300)).await;

    // Unknown group or topic.
    assert!(!reset_cursor(&mut c, "t", "nope", 1).await.unwrap());
    assert!(!reset_cursor(&mut c, "nope", "g", 1).await.unwrap());
    assert!(
        stats(&mut c, &["nope"]).await.is_err(),
        "ResetCursor must not create a topic"
    );
    assert!(group(&stat(&mut c, "t").await, "nope").is_none());

    // 0 on a group without a consumer replays everything on reconnect
    // (LATEST is ignored: the group has a cursor).
    drop(a);
    assert!(reset_cursor(&mut c, "t", "g", 0).await.unwrap());
    let mut b = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    b.send(credit(10)).await;
    assert_eq!(
        payloads(&take(&mut b, 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    drop(b);

    // A reset survives a crash right after it was answered.
    assert!(reset_cursor(&mut c, "t", "g", m3.sequence).await.unwrap());
    drop(c);
    server.kill9();
    server.spawn(0);
    let mut c = server.client().await;
    let s = stat(&mut c, "t").await;
    let g = group(&s, "g").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (m3.sequence, 2),
        "{g:?}"
    );
    let mut b = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    b.send(credit(10)).await;
    assert_eq!(payloads(&take(&mut b, 2).await), ["m4", "m5"]);
    assert_no_delivery(&mut b, Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retention_max_messages_keeps_the_newest_and_moves_cursors_forward() {
    let server = Server::start_with(&["--retention-max-messages", "10"]);
    let mut c = server.client().await;
    let all = names("m", 1..51);
    let mut m = publish_all(&mut c, "t", &refs(&all[..5])).await;
    publish_all(&mut c, "u", &["x1", "x2", "x3"]).await;

    // "parked" acks m2 and goes away.
    let mut p = c
        .subscribe("t", "parked", proto::InitialPosition::Earliest)
        .await;
    p.send(credit(2)).await;
    take(&mut p, 2).await;
    p.send(ack(&m[1].message_id)).await;
    p.send(credit(1)).await;
    p.delivery(WAIT).await; // ack barrier
    drop(p);
    // "live" acks m5 and stays connected without credit.
    let mut live = c
        .subscribe("t", "live", proto::InitialPosition::Earliest)
        .await;
    live.send(credit(5)).await;
    take(&mut live, 5).await;
    live.send(ack(&m[4].message_id)).await;

    m.extend(publish_all(&mut c, "t", &refs(&all[5..])).await);
    let s = stats_until(&mut c, "t", Duration::from_secs(10), "10 left", |s| {
        s.total_messages == 10
    })
    .await;
    assert_eq!(s.first_sequence, m[40].sequence, "{s:?}");
    assert_eq!(s.first_message_timestamp, m[40].timestamp, "{s:?}");
    assert_eq!(s.last_sequence, m[49].sequence, "{s:?}");
    assert_eq!(s.last_message_timestamp, m[49].timestamp, "{s:?}");
    let g = group(&s, "parked").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (m[1].sequence, 10),
        "{g:?}"
    );
    let g = group(&s, "live").unwrap();
    assert_eq!(
        (g.cursor_sequence, g.pending_count),
        (m[4].sequence, 10),
        "{g:?}"
    );
    // Other topics are below the limit and untouched.
    assert_eq!(stat(&mut c, "u").await.total_messages, 3);

    // Whatever reads from before the oldest message continues from it.
    assert_eq!(payloads(&read_all(&mut c, "t").await), &all[40..]);
    live.send(credit(100)).await;
    let got = take(&mut live, 10).await;
    assert_eq!(payloads(&got), &all[40..], "live consumer");
    assert_no_delivery(&mut live, Duration::from_millis(300)).await;
    let mut p = c
        .subscribe("t", "parked", proto::InitialPosition::Earliest)
        .await;
    p.send(credit(100)).await;
    assert_eq!(
        payloads(&take(&mut p, 10).await),
        &all[40..],
        "parked group"
    );
    assert_no_delivery(&mut p, Duration::from_millis(300)).await;
    let mut f = c
        .subscribe("t", "fresh", proto::InitialPosition::Earliest)
        .await;
    f.send(credit(100)).await;
    assert_eq!(payloads(&take(&mut f, 10).await), &all[40..], "new group");

    // It keeps applying.
    let more = publish_all(&mut c, "t", &["n1", "n2", "n3", "n4", "n5"]).await;
    let s = stats_until(&mut c, "t", Duration::from_secs(10), "window moved", |s| {
        s.first_sequence == m[45].sequence
    })
    .await;
    assert_eq!(s.total_messages, 10);
    assert_eq!(s.last_sequence, more[4].sequence);
}

#[tokio::test]
async fn retention_max_age_expires_old_messages() {
    let server = Server::start_with(&["--retention-max-age", "2s"]);
    let mut c = server.client().await;
    let o = publish_all(&mut c, "t", &["o1", "o2", "o3"]).await;
    let mut g = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    g.send(credit(1)).await;
    assert_eq!(g.delivery(WAIT).await.payload.as_ref(), b"o1");
    g.send(ack(&o[0].message_id)).await;

    // Not before their time.
    let s = stat(&mut c, "t").await;
    if now_ms() - o[0].timestamp < 1_500 {
        assert_eq!(s.total_messages, 3, "{s:?}");
    }
    let s = stats_until(&mut c, "t", Duration::from_secs(10), "all expired", |s| {
        s.total_messages == 0
    })
    .await;
    let age = now_ms() - o[2].timestamp;
    assert!(age >= 2_000, "expired after only {age} ms");
    assert_eq!(
        (s.first_sequence, s.first_message_timestamp),
        (0, 0),
        "{s:?}"
    );
    // The topic and the group stay.
    assert_eq!(group(&s, "g").unwrap().pending_count, 0);
    let listed = c.list_topics().await.unwrap().topics;
    assert!(listed.iter().any(|t| t.name == "t"), "{listed:?}");

    // Nothing is left to read, live or anew.
    assert!(
        read_all(&mut c, "t").await.is_empty(),
        "expired messages read"
    );
    g.send(credit(10)).await;
    assert_no_delivery(&mut g, Duration::from_millis(500)).await;
    let mut f = c
        .subscribe("t", "f", proto::InitialPosition::Earliest)
        .await;
    f.send(credit(10)).await;
    assert_no_delivery(&mut f, Duration::from_millis(500)).await;

    // New messages are kept while young, and reach both.
    let n1 = c.publish("t", b"n1").await.unwrap();
    assert_eq!(g.delivery(WAIT).await.message_id, n1.message_id);
    assert_eq!(f.delivery(WAIT).await.message_id, n1.message_id);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 1, "{s:?}");
    assert_eq!(
        (s.first_sequence, s.last_sequence),
        (n1.sequence, n1.sequence)
    );
    assert_eq!(s.first_message_timestamp, n1.timestamp);
}

#[tokio::test]
async fn retention_max_bytes_keeps_payload_bytes_under_the_limit() {
    if sqlite_only(
        "--retention-max-bytes is per stream (whole messages) on JetStream, not per topic",
    ) {
        return;
    }
    let server = Server::start_with(&["--retention-max-bytes", "1000"]);
    let mut c = server.client().await;
    let mut m = Vec::new();
    for i in 0..20 {
        let p = format!("{i:03}").repeat(34)[..100].to_string();
        m.push(c.publish("t", p.as_bytes()).await.unwrap());
    }
    let s = stats_until(
        &mut c,
        "t",
        Duration::from_secs(10),
        "1000 bytes left",
        |s| s.total_messages == 10,
    )
    .await;
    assert_eq!(s.first_sequence, m[10].sequence, "{s:?}");
    assert_eq!(s.last_sequence, m[19].sequence, "{s:?}");

    // 500 more bytes push out five 100-byte messages.
    let big = c.publish("t", &[b'B'; 500]).await.unwrap();
    let s = stats_until(&mut c, "t", Duration::from_secs(10), "five out", |s| {
        s.total_messages == 6
    })
    .await;
    assert_eq!(s.first_sequence, m[15].sequence, "{s:?}");
    assert_eq!(s.last_sequence, big.sequence, "{s:?}");
    let got = read_all(&mut c, "t").await;
    let seqs: Vec<u64> = got.iter().map(|d| d.sequence).collect();
    let want: Vec<u64> = m[15..]
        .iter()
        .map(|r| r.sequence)
        .chain([big.sequence])
        .collect();
    assert_eq!(seqs, want);
}

#[tokio::test]
async fn retention_is_off_by_default() {
    let server = Server::start();
    let mut c = server.client().await;
    let payload = [b'p'; 1000];
    let batch: Vec<&[u8]> = (0..100).map(|_| &payload[..]).collect();
    let first = c.batch_publish("t", &batch).await.unwrap();
    for _ in 0..49 {
        c.batch_publish("t", &batch).await.unwrap();
    }
    // Retention passes run every second when enabled.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = stat(&mut c, "t").await;
    assert_eq!(s.total_messages, 5_000);
    assert_eq!(s.first_sequence, first.results[0].sequence);
    assert_eq!(s.first_message_timestamp, first.timestamp);
}

#[tokio::test]
async fn retention_of_a_large_backlog_does_not_stall_publishing() {
    let _heavy = common::serial().await;
    const BIG: usize = 100_000;
    let server = Server::start_with(&["--retention-max-age", "3s"]);
    let mut c = server.client().await;
    c.publish("other", b"first").await.unwrap();
    preload(&mut c, "big", BIG).await;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = spawn_publisher(server.client().await, "other", stop.clone());
    let t = Instant::now();
    stats_until(
        &mut c,
        "big",
        Duration::from_secs(30),
        "backlog expired",
        |s| s.total_messages == 0,
    )
    .await;
    eprintln!("{BIG} messages expired {:?} after the preload", t.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (calls, worst, errors) = publisher.await.unwrap();
    eprintln!("{calls} publishes meanwhile, slowest {worst:?}");
    assert!(errors.is_empty(), "publish errors: {errors:?}");
    assert!(calls > 50, "only {calls} publishes");
    assert!(
        worst < Duration::from_secs(1),
        "a publish took {worst:?} while retention deleted the backlog"
    );
    assert!(read_all(&mut c, "big").await.is_empty());
    // Publishing went on throughout: "other" lost only expired messages.
    let s = stat(&mut c, "other").await;
    assert!(s.total_messages > 0, "{s:?}");
}

/// A ResetCursor that arrives while a DeleteConsumerGroup of the same group
/// waits for its commit must not write the cursor back after the delete:
/// the group stays deleted, in memory and after a restart.
#[tokio::test]
async fn a_reset_during_a_pending_group_delete_does_not_bring_the_group_back() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["a", "b"]).await;
    let groups = names("g", 0..20);
    for g in &groups {
        let mut sub = c.subscribe("t", g, proto::InitialPosition::Earliest).await;
        sub.send(credit(2)).await;
        let got = take(&mut sub, 2).await;
        sub.send(ack(&got[1].message_id)).await;
        stats_until(&mut c, "t", WAIT, "the ack is stored", |s| {
            group(s, g).is_some_and(|x| x.cursor_sequence == m[1].sequence)
        })
        .await;
    }
    let mut resets_applied = 0;
    for g in &groups {
        // Both calls are in flight at once on one connection.
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (deleted, reset) = tokio::join!(
            delete_group(&mut c1, "t", g),
            reset_cursor(&mut c2, "t", g, m[0].sequence)
        );
        assert!(deleted.unwrap(), "{g} existed");
        resets_applied += usize::from(reset.unwrap());
    }
    let s = stat(&mut c, "t").await;
    assert!(s.consumer_groups.is_empty(), "{s:?}");
    server.signal(15);
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    server.spawn(0);
    let mut c = server.client().await;
    let s = stat(&mut c, "t").await;
    assert!(
        s.consumer_groups.is_empty(),
        "deleted groups came back after a restart ({resets_applied} of 20 resets were applied before their delete): {:?}",
        group_names(&s)
    );
}
