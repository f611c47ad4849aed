//! Black-box tests of the Subscribe stream: the Init handshake, credit, start
//! positions, BROWSE mode, cumulative acks, nacks, delivery counts, takeover,
//! heartbeats, restarts and shutdown.
//!
//! Synchronisation: the broker answers a Subscribe call with its response
//! headers before it has read the SubscriptionInit, so "the subscription
//! exists" is never inferred from the call having opened. Instead a test waits
//! for something only an initialised subscription produces: a delivery, a
//! heartbeat, the takeover of an older stream. Upstream messages of one stream
//! are applied in order, so "Ack, then CreditGrant(1), then the delivery that
//! credit paid for" proves the Ack was applied (an ack barrier).

mod common;

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use sluice::proto;
use sluice::proto::subscribe_downstream::Response as Down;
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(5);

fn init_full(
    topic: &str,
    group: &str,
    pos: proto::InitialPosition,
    offset: u64,
    mode: proto::SubscriptionMode,
) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                consumer_group: group.into(),
                consumer_id: "test".into(),
                initial_position: pos as i32,
                offset,
                mode: mode as i32,
                ..Default::default()
            },
        )),
    }
}

fn browse(
    topic: &str,
    group: &str,
    pos: proto::InitialPosition,
    offset: u64,
) -> proto::SubscribeUpstream {
    init_full(topic, group, pos, offset, proto::SubscriptionMode::Browse)
}

fn at_offset(topic: &str, group: &str, offset: u64) -> proto::SubscribeUpstream {
    init_full(
        topic,
        group,
        proto::InitialPosition::Offset,
        offset,
        proto::SubscriptionMode::ConsumerGroup,
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A random (version 4) UUID in canonical text.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Publishes `payloads` one by one; returns the responses.
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

/// Exactly the next `n` deliveries (heartbeats skipped), each within `WAIT`.
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

fn counts(ds: &[proto::MessageDelivery]) -> Vec<u32> {
    ds.iter().map(|d| d.delivery_count).collect()
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
            }))) => {
                panic!(
                    "unexpected delivery of {:?} (seq {})",
                    String::from_utf8_lossy(&d.payload),
                    d.sequence
                )
            }
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("stream ended while it should stay open"),
            Ok(Err(s)) => panic!("stream failed while it should stay open: {s:?}"),
        }
    }
}

/// Reads until the stream ends with an error status, within `limit`
/// (anything received before is discarded). Panics on a clean end.
async fn end_status(sub: &mut Subscription, limit: Duration) -> Status {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, sub.down.message()).await {
            Err(_) => panic!("stream still open after {limit:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("stream ended with OK, expected an error status"),
            Ok(Err(s)) => return s,
        }
    }
}

/// The status a Subscribe call ends with, whether the broker refuses it at
/// once (trailers-only) or after opening the stream.
async fn call_status(r: Result<Subscription, Status>) -> Status {
    match r {
        Err(s) => s,
        Ok(mut sub) => end_status(&mut sub, WAIT).await,
    }
}

/// The next heartbeat within `limit`; panics on a delivery or the end.
async fn heartbeat(sub: &mut Subscription, limit: Duration) -> proto::Heartbeat {
    match sub.next_within(limit).await {
        Some(Ok(proto::SubscribeDownstream {
            response: Some(Down::Heartbeat(h)),
        })) => h,
        other => panic!("expected a heartbeat within {limit:?}, got {other:?}"),
    }
}

// ---- 1-3: the Init handshake ----

#[tokio::test]
async fn first_message_must_be_init() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();

    let s = call_status(c.subscribe_with(credit(5)).await).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    let s = call_status(
        c.subscribe_with(ack("00000000-0000-7000-8000-000000000000"))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // The connection is still good for a proper subscription.
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    assert_eq!(sub.delivery(WAIT).await.payload.as_ref(), b"x");
}

#[tokio::test]
async fn second_init_on_a_stream_is_invalid_argument() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    sub.delivery(WAIT).await;
    sub.send(init("t", "g", proto::InitialPosition::Earliest))
        .await;
    let s = end_status(&mut sub, WAIT).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
}

#[tokio::test]
async fn invalid_topic_name_in_init_is_invalid_argument() {
    let server = Server::start();
    let mut c = server.client().await;
    let long = "a".repeat(256);
    for bad in ["", "has space", "slash/x", "ünï", long.as_str()] {
        let s = call_status(
            c.subscribe_with(init(bad, "g", proto::InitialPosition::Earliest))
                .await,
        )
        .await;
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}: {s:?}");
    }
    assert!(
        c.list_topics().await.unwrap().topics.is_empty(),
        "no topic was created"
    );
}

// ---- 4: credit ----

#[tokio::test]
async fn deliveries_never_exceed_credit() {
    let server = Server::start();
    let mut c = server.client().await;
    let names: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    publish_all(&mut c, "t", &names).await;

    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    // No credit: nothing, although 10 messages wait.
    assert_no_delivery(&mut sub, Duration::from_secs(1)).await;
    // CreditGrant(0) changes nothing.
    sub.send(credit(0)).await;
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;

    sub.send(credit(5)).await;
    let got = take(&mut sub, 5).await;
    assert_eq!(payloads(&got), names[..5]);
    assert_no_delivery(&mut sub, Duration::from_secs(1)).await;

    sub.send(credit(100)).await;
    let got = take(&mut sub, 5).await;
    assert_eq!(payloads(&got), names[5..]);
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;
}

// ---- 5: start positions of a new group ----

#[tokio::test]
async fn new_group_earliest_starts_at_the_oldest_message() {
    let server = Server::start();
    let mut c = server.client().await;
    publish_all(&mut c, "t", &["a", "b", "c"]).await;
    c.publish("other", b"zz").await.unwrap();
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    assert_eq!(payloads(&take(&mut sub, 3).await), ["a", "b", "c"]);
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn new_group_latest_gets_only_messages_published_after_init() {
    // Heartbeats show when the Init has been applied (nothing else would).
    let server = Server::start_with(&["--heartbeat-interval", "100ms"]);
    let mut c = server.client().await;
    publish_all(&mut c, "t", &["before1", "before2", "before3"]).await;
    let mut sub = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    sub.send(credit(10)).await;
    heartbeat(&mut sub, WAIT).await;
    publish_all(&mut c, "t", &["after1", "after2"]).await;
    assert_eq!(payloads(&take(&mut sub, 2).await), ["after1", "after2"]);
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn new_group_offset_starts_at_first_sequence_at_or_after_it() {
    let server = Server::start();
    let mut c = server.client().await;
    let t1 = publish_all(&mut c, "t", &["a", "b"]).await;
    let gap = publish_all(&mut c, "other", &["x", "y"]).await;
    let t2 = publish_all(&mut c, "t", &["c", "d"]).await;
    assert!(t1[1].sequence < gap[0].sequence && gap[1].sequence < t2[0].sequence);

    // An offset inside the gap: the topic's next message after it.
    let mut sub = c
        .subscribe_with(at_offset("t", "in-gap", gap[1].sequence))
        .await
        .unwrap();
    sub.send(credit(10)).await;
    let got = take(&mut sub, 2).await;
    assert_eq!(payloads(&got), ["c", "d"]);
    assert_eq!(got[0].sequence, t2[0].sequence);
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;

    // An offset naming a message exactly: inclusive.
    let mut sub = c
        .subscribe_with(at_offset("t", "exact", t1[1].sequence))
        .await
        .unwrap();
    sub.send(credit(10)).await;
    assert_eq!(payloads(&take(&mut sub, 3).await), ["b", "c", "d"]);
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;
}

// ---- 6: an existing group resumes at its cursor ----

#[tokio::test]
async fn existing_group_resumes_after_its_cursor_whatever_position_is_asked() {
    let server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3", "m4", "m5", "m6"]).await;

    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(3)).await;
    assert_eq!(payloads(&take(&mut a, 3).await), ["m1", "m2", "m3"]);
    a.send(ack(&m[1].message_id)).await;
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.payload.as_ref(), b"m4"); // ack barrier
    drop(a);

    // LATEST is ignored: the group has a cursor (m2).
    let mut b = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    b.send(credit(4)).await;
    let got = take(&mut b, 4).await;
    assert_eq!(payloads(&got), ["m3", "m4", "m5", "m6"]);
    assert_eq!(counts(&got), [2, 2, 1, 1]);
    b.send(ack(&m[4].message_id)).await;
    b.send(credit(1)).await;
    c.publish("t", b"m7").await.unwrap();
    assert_eq!(b.delivery(WAIT).await.payload.as_ref(), b"m7"); // ack barrier
    drop(b);

    // OFFSET (before the cursor) is ignored too: the cursor is m5.
    let mut d = c
        .subscribe_with(at_offset("t", "g", m[0].sequence))
        .await
        .unwrap();
    d.send(credit(10)).await;
    assert_eq!(payloads(&take(&mut d, 2).await), ["m6", "m7"]);
    assert_no_delivery(&mut d, Duration::from_millis(500)).await;
}

// ---- 7: BROWSE ----

#[tokio::test]
async fn browse_honours_the_position_and_never_creates_or_moves_a_cursor() {
    let server = Server::start_with(&["--heartbeat-interval", "100ms"]);
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3"]).await;
    c.publish("other", b"gap").await.unwrap();
    let m4 = c.publish("t", b"m4").await.unwrap();

    // LATEST: only what comes after the Init (a heartbeat shows it applied).
    let mut b = c
        .subscribe_with(browse("t", "g", proto::InitialPosition::Latest, 0))
        .await
        .unwrap();
    b.send(credit(10)).await;
    heartbeat(&mut b, WAIT).await;
    let m5 = c.publish("t", b"m5").await.unwrap();
    let got = b.delivery(WAIT).await;
    assert_eq!(got.payload.as_ref(), b"m5");
    assert_eq!(got.delivery_count, 1);
    b.send(ack(&m5.message_id)).await;
    drop(b);

    // EARLIEST: everything; acking it all moves nothing.
    let mut b = c
        .subscribe_with(browse("t", "g", proto::InitialPosition::Earliest, 0))
        .await
        .unwrap();
    b.send(credit(10)).await;
    let got = take(&mut b, 5).await;
    assert_eq!(payloads(&got), ["m1", "m2", "m3", "m4", "m5"]);
    let ids: Vec<&str> = got.iter().map(|d| d.message_id.as_str()).collect();
    b.send(batch_ack(&ids)).await;
    b.send(ack(&m5.message_id)).await;
    assert_no_delivery(&mut b, Duration::from_millis(300)).await;
    drop(b);

    // OFFSET inside the gap before m4.
    let mut b = c
        .subscribe_with(browse(
            "t",
            "g",
            proto::InitialPosition::Offset,
            m[2].sequence + 1,
        ))
        .await
        .unwrap();
    b.send(credit(10)).await;
    let got = take(&mut b, 2).await;
    assert_eq!(payloads(&got), ["m4", "m5"]);
    assert_eq!(got[0].sequence, m4.sequence);
    b.send(ack(&m5.message_id)).await;
    b.send(credit(1)).await;
    assert_no_delivery(&mut b, Duration::from_millis(300)).await;

    // A consumer group of the same name starts fresh at EARLIEST: all five.
    let mut g = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    g.send(credit(10)).await;
    let got = take(&mut g, 5).await;
    assert_eq!(payloads(&got), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(counts(&got), [1, 1, 1, 1, 1]);
    assert_no_delivery(&mut g, Duration::from_millis(300)).await;
}

// ---- 8: the default group ----

#[tokio::test]
async fn empty_group_is_the_default_group() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"m1").await.unwrap();
    let mut a = c.subscribe("t", "", proto::InitialPosition::Earliest).await;
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.delivery_count, 1);

    let mut c2 = server.client().await;
    let mut b = c2
        .subscribe("t", "default", proto::InitialPosition::Earliest)
        .await;
    let s = end_status(&mut a, WAIT).await;
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    b.send(credit(1)).await;
    let d = b.delivery(WAIT).await;
    assert_eq!(d.payload.as_ref(), b"m1");
    assert_eq!(
        d.delivery_count, 2,
        "same group: the unacked message is a redelivery"
    );
}

// ---- 9: acks ----

#[tokio::test]
async fn acks_are_cumulative_and_bad_ids_are_ignored() {
    let server = Server::start();
    let mut c = server.client().await;
    let names: Vec<String> = (1..=9).map(|i| format!("m{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let m = publish_all(&mut c, "t", &names[..6]).await;
    let foreign = c.publish("other", b"o").await.unwrap();

    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(5)).await;
    assert_eq!(payloads(&take(&mut a, 5).await), names[..5]);
    a.send(ack(&m[2].message_id)).await; // only the 3rd
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.payload.as_ref(), b"m6"); // ack barrier
    drop(a);

    // Reconnect: everything after m3 again.
    let mut b = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    b.send(credit(3)).await;
    let got = take(&mut b, 3).await;
    assert_eq!(payloads(&got), ["m4", "m5", "m6"]);
    assert_eq!(counts(&got), [2, 2, 2]);

    // Ignored: a duplicate, garbage, a random UUID, an id of another topic.
    b.send(ack(&m[2].message_id)).await;
    b.send(ack(&m[0].message_id)).await;
    b.send(ack("not-a-uuid")).await;
    b.send(ack(&random_uuid())).await;
    b.send(ack(&foreign.message_id)).await;
    b.send(batch_ack(&["garbage", &random_uuid(), &foreign.message_id]))
        .await;
    b.send(nack("garbage", 0)).await;
    b.send(nack(&random_uuid(), 0)).await;
    // The stream stays open and still delivers.
    let m7 = c.publish("t", b"m7").await.unwrap();
    b.send(credit(1)).await;
    assert_eq!(b.delivery(WAIT).await.payload.as_ref(), b"m7");

    // BatchAck: the highest sequence among the ids, whatever their order.
    b.send(batch_ack(&[
        &m[3].message_id,
        &m[5].message_id,
        &m[4].message_id,
        "garbage",
    ]))
    .await;
    // A later ack of a lower message never moves the cursor back.
    b.send(ack(&m[3].message_id)).await;
    b.send(credit(1)).await;
    c.publish("t", b"m8").await.unwrap();
    assert_eq!(b.delivery(WAIT).await.payload.as_ref(), b"m8"); // ack barrier
    drop(b);

    let mut d = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    d.send(credit(10)).await;
    let got = take(&mut d, 2).await;
    assert_eq!(payloads(&got), ["m7", "m8"]);
    assert_eq!(got[0].sequence, m7.sequence);
    assert_eq!(counts(&got), [2, 2]);
    assert_no_delivery(&mut d, Duration::from_millis(500)).await;
}

// ---- 10: resume after SIGKILL ----

#[tokio::test]
async fn group_resumes_after_broker_sigkill() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3", "m4", "m5"]).await;
    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(4)).await;
    assert_eq!(payloads(&take(&mut a, 4).await), ["m1", "m2", "m3", "m4"]);
    a.send(ack(&m[2].message_id)).await;
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.payload.as_ref(), b"m5"); // ack barrier

    // The reactor hands the cursor write to the writer before this publish,
    // and the writer commits in order: its reply means the cursor is on disk.
    c.publish("barrier", b"x").await.unwrap();
    drop(a);
    drop(c);

    server.kill9();
    server.spawn(0);
    let mut c = server.client().await;
    let mut b = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    b.send(credit(10)).await;
    let got = take(&mut b, 2).await;
    assert_eq!(payloads(&got), ["m4", "m5"]);
    assert_eq!(got[0].sequence, m[3].sequence);
    assert_eq!(got[0].message_id, m[3].message_id);
    assert_no_delivery(&mut b, Duration::from_millis(500)).await;
}

// ---- 11: takeover ----

#[tokio::test]
async fn second_consumer_of_a_group_takes_over() {
    let server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3", "m4", "m5"]).await;
    let mut a = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    a.send(credit(2)).await;
    assert_eq!(payloads(&take(&mut a, 2).await), ["m1", "m2"]);
    a.send(ack(&m[0].message_id)).await;
    a.send(credit(1)).await;
    assert_eq!(a.delivery(WAIT).await.payload.as_ref(), b"m3"); // ack barrier

    let mut c2 = server.client().await;
    let mut b = c2
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    let s = end_status(&mut a, WAIT).await;
    assert_eq!(s.code(), Code::Aborted, "{s:?}");

    // The newcomer starts with zero credit.
    assert_no_delivery(&mut b, Duration::from_secs(1)).await;
    b.send(credit(10)).await;
    let got = take(&mut b, 4).await;
    assert_eq!(payloads(&got), ["m2", "m3", "m4", "m5"]);
    assert_eq!(counts(&got), [2, 2, 1, 1]);
    assert_no_delivery(&mut b, Duration::from_millis(500)).await;

    // A different group on the same topic takes nothing over.
    let mut other = c
        .subscribe("t", "other", proto::InitialPosition::Earliest)
        .await;
    other.send(credit(1)).await;
    other.delivery(WAIT).await;
    let m6 = c.publish("t", b"m6").await.unwrap();
    b.send(credit(1)).await;
    assert_eq!(b.delivery(WAIT).await.message_id, m6.message_id);
}

// ---- 12: nack ----

#[tokio::test]
async fn nack_redelivers_that_message_after_the_delay_spending_credit() {
    let server = Server::start();
    let mut c = server.client().await;
    let m = publish_all(&mut c, "t", &["m1", "m2", "m3"]).await;
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(4)).await;
    let got = take(&mut sub, 3).await;
    assert_eq!(payloads(&got), ["m1", "m2", "m3"]);
    assert_eq!(counts(&got), [1, 1, 1]);

    // One credit left: the nacked message comes back, after the delay.
    let t0 = Instant::now();
    sub.send(nack(&m[1].message_id, 500)).await;
    let d = sub.delivery(WAIT).await;
    let elapsed = t0.elapsed();
    assert_eq!(d.payload.as_ref(), b"m2");
    assert_eq!(d.message_id, m[1].message_id);
    assert_eq!(d.delivery_count, 2);
    assert!(
        elapsed >= Duration::from_millis(450),
        "redelivered after {elapsed:?}"
    );
    // Credit is spent; nothing else was redelivered.
    sub.send(credit(1)).await;
    assert_no_delivery(&mut sub, Duration::from_millis(700)).await;

    // That credit went unspent; spend it on a new message.
    c.publish("t", b"m4").await.unwrap();
    assert_eq!(sub.delivery(WAIT).await.payload.as_ref(), b"m4");

    // No credit: a due redelivery waits for it.
    sub.send(nack(&m[1].message_id, 0)).await;
    assert_no_delivery(&mut sub, Duration::from_secs(1)).await;
    sub.send(credit(1)).await;
    let d = sub.delivery(WAIT).await;
    assert_eq!(d.payload.as_ref(), b"m2");
    assert_eq!(d.delivery_count, 3);
    assert_no_delivery(&mut sub, Duration::from_millis(300)).await;
}

// ---- 13: delivery counts across reconnects ----

#[tokio::test]
async fn delivery_count_grows_across_reconnects_of_the_group() {
    let server = Server::start();
    let mut c = server.client().await;
    let m = c.publish("t", b"m1").await.unwrap();
    for expected in 1..=3u32 {
        let mut sub = c
            .subscribe("t", "g", proto::InitialPosition::Earliest)
            .await;
        sub.send(credit(1)).await;
        let d = sub.delivery(WAIT).await;
        assert_eq!(d.message_id, m.message_id);
        assert_eq!(d.delivery_count, expected, "connection {expected}");
        drop(sub);
    }
}

// ---- 14: heartbeats ----

#[tokio::test]
async fn idle_stream_gets_heartbeats_with_the_topic_latest_sequence() {
    let server = Server::start_with(&["--heartbeat-interval", "300ms"]);
    let mut c = server.client().await;
    let m = publish_all(&mut c, "hb", &["a", "b", "c"]).await;
    c.publish("other", b"newer").await.unwrap(); // the global latest is not the topic's

    let mut sub = c.subscribe("hb", "g", proto::InitialPosition::Latest).await;
    let h = heartbeat(&mut sub, Duration::from_secs(3)).await;
    assert_eq!(h.latest_seq, m[2].sequence);
    assert!(
        (now_ms() - h.timestamp).abs() < 5_000,
        "timestamp is Unix ms: {}",
        h.timestamp
    );

    // Still idle (no credit): heartbeats keep coming and follow the topic.
    let m4 = c.publish("hb", b"d").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let h = heartbeat(&mut sub, deadline.saturating_duration_since(Instant::now())).await;
        assert!((now_ms() - h.timestamp).abs() < 5_000);
        if h.latest_seq == m4.sequence {
            break;
        }
        assert_eq!(h.latest_seq, m[2].sequence);
    }

    // An empty topic reports 0.
    let mut empty = c
        .subscribe("fresh", "g", proto::InitialPosition::Latest)
        .await;
    assert_eq!(
        heartbeat(&mut empty, Duration::from_secs(3))
            .await
            .latest_seq,
        0
    );
}

// ---- 15: subscribing creates the topic ----

#[tokio::test]
async fn subscribing_to_a_new_topic_creates_it() {
    let server = Server::start();
    let mut c = server.client().await;
    let mut sub = c
        .subscribe("fresh", "g", proto::InitialPosition::Latest)
        .await;
    sub.send(credit(10)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let topics = c.list_topics().await.unwrap().topics;
        if let Some(t) = topics.iter().find(|t| t.name == "fresh") {
            assert!((now_ms() - t.created_at).abs() < 10_000, "{t:?}");
            break;
        }
        assert!(Instant::now() < deadline, "topic not listed: {topics:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish_all(&mut c, "fresh", &["a", "b"]).await;
    assert_eq!(payloads(&take(&mut sub, 2).await), ["a", "b"]);
}

// ---- 16: fan-out ----

#[tokio::test]
async fn one_hundred_groups_each_receive_every_message() {
    let server = Server::start();
    let mut c = server.client().await;
    let names: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    publish_all(&mut c, "fan", &refs[..10]).await;

    let clients = [
        server.client().await,
        server.client().await,
        server.client().await,
        server.client().await,
    ];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut sub = client
                .subscribe("fan", &format!("g{i}"), proto::InitialPosition::Earliest)
                .await;
            sub.send(credit(20)).await;
            let got = take(&mut sub, 20).await;
            (payloads(&got), counts(&got))
        }));
    }
    publish_all(&mut c, "fan", &refs[10..]).await;
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("subscriber task"));
        }
        out
    })
    .await
    .expect("fan-out finished in time");
    for (i, (p, n)) in all.iter().enumerate() {
        assert_eq!(p, &names, "group g{i}");
        assert!(n.iter().all(|&n| n == 1), "group g{i}: {n:?}");
    }
}

// ---- 17: live delivery ----

#[tokio::test]
async fn new_messages_reach_a_live_subscriber_promptly() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"m0").await.unwrap();
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(100)).await;
    assert_eq!(sub.delivery(WAIT).await.payload.as_ref(), b"m0");
    for i in 1..=5 {
        let p = format!("m{i}");
        let r = c.publish("t", p.as_bytes()).await.unwrap();
        let t0 = Instant::now();
        let d = sub.delivery(Duration::from_secs(2)).await;
        assert_eq!(d.message_id, r.message_id);
        assert_eq!(d.payload.as_ref(), p.as_bytes());
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}

// ---- 18: a large backlog ----

#[tokio::test]
async fn large_backlog_is_delivered_completely_and_in_order() {
    const TOTAL: usize = 3000;
    let server = Server::start();
    let mut c = server.client().await;
    let names: Vec<String> = (0..TOTAL).map(|i| format!("p{i}")).collect();
    for chunk in names.chunks(100) {
        let batch: Vec<&[u8]> = chunk.iter().map(|s| s.as_bytes()).collect();
        c.batch_publish("big", &batch).await.unwrap();
    }

    let mut sub = c
        .subscribe("big", "g", proto::InitialPosition::Earliest)
        .await;
    let got = tokio::time::timeout(Duration::from_secs(90), async {
        let mut got = Vec::with_capacity(TOTAL);
        while got.len() < TOTAL {
            sub.send(credit(100)).await;
            for _ in 0..100 {
                let d = sub.delivery(Duration::from_secs(10)).await;
                sub.send(ack(&d.message_id)).await;
                got.push(d);
            }
        }
        got
    })
    .await
    .expect("backlog delivered in time");
    assert_eq!(payloads(&got), names);
    assert!(
        got.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "ascending sequences"
    );
    assert!(got.iter().all(|d| d.delivery_count == 1));
    sub.send(credit(100)).await;
    assert_no_delivery(&mut sub, Duration::from_millis(500)).await;
}

// ---- 19: SIGTERM ----

#[tokio::test]
async fn sigterm_ends_open_streams_unavailable_and_exits_zero() {
    let mut server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();
    c.publish("u", b"y").await.unwrap();
    let mut c2 = server.client().await;
    let mut subs = [
        c.subscribe("t", "g1", proto::InitialPosition::Earliest)
            .await,
        c.subscribe("t", "g2", proto::InitialPosition::Earliest)
            .await,
        c2.subscribe("u", "g1", proto::InitialPosition::Earliest)
            .await,
    ];
    for s in subs.iter_mut() {
        s.send(credit(10)).await;
        s.delivery(WAIT).await;
    }
    let t0 = Instant::now();
    server.signal(15);
    for s in subs.iter_mut() {
        let st = end_status(s, Duration::from_secs(10)).await;
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    }
    assert_eq!(
        server.wait_exit(Duration::from_secs(10)),
        Some(0),
        "log:\n{}",
        server.log_text()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );
}
