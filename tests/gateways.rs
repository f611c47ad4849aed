//! Several gateways on one JetStream cluster behave as one broker: live
//! delivery across gateways, one active consumer per group across all of
//! them (takeover, failover after a gateway dies), admin changes reaching
//! streams on other gateways, and concurrent publishers through different
//! gateways reading back in sequence order. Real `nats-server` processes
//! (a three-node cluster) and real gateways on loopback.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats_harness::Cluster;
use common::*;
use sluice::proto::{self, subscribe_downstream::Response as Down};

const WAIT: Duration = Duration::from_secs(10);

fn gateway(cluster: &Cluster) -> Server {
    let url = format!("nats://{}", cluster.url());
    Server::start_with(&["--store", &url, "--nats-replicas", "3"])
}

/// The next delivery, or the StreamError code / status that ended the stream.
async fn next_event(
    sub: &mut Subscription,
    limit: Duration,
) -> Result<proto::MessageDelivery, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next_within(left).await {
            Some(Ok(proto::SubscribeDownstream {
                response: Some(Down::Delivery(d)),
            })) => return Ok(d),
            Some(Ok(proto::SubscribeDownstream {
                response: Some(Down::Error(e)),
            })) => return Err(e.code),
            Some(Ok(_)) => continue,
            Some(Err(s)) => return Err(format!("{:?}", s.code())),
            None => return Err("nothing".into()),
        }
    }
}

async fn reset_cursor(c: &mut Client, topic: &str, group: &str, seq: u64) -> bool {
    c.unary::<_, proto::ResetCursorResponse>(
        "ResetCursor",
        proto::ResetCursorRequest {
            topic: topic.into(),
            consumer_group: group.into(),
            sequence: seq,
        },
    )
    .await
    .unwrap()
    .updated
}

#[tokio::test]
async fn a_message_published_through_one_gateway_reaches_live_subscribers_on_the_others() {
    let _heavy = serial().await;
    let cluster = Cluster::start("live");
    let (a, b, c) = (gateway(&cluster), gateway(&cluster), gateway(&cluster));
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    let mut on_b = cb
        .subscribe("orders", "billing", proto::InitialPosition::Latest)
        .await;
    on_b.send(credit(10_000)).await;
    let mut on_c = cc
        .subscribe("orders", "shipping", proto::InitialPosition::Latest)
        .await;
    on_c.send(credit(10_000)).await;
    // Both subscriptions are live before the first publish.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut acked = Vec::new();
    for i in 0..200u32 {
        let r = ca
            .publish("orders", format!("m{i}").as_bytes())
            .await
            .unwrap();
        acked.push((r.sequence, r.message_id));
    }
    for (name, sub) in [("B", &mut on_b), ("C", &mut on_c)] {
        let mut got = Vec::new();
        while got.len() < acked.len() {
            let d = next_event(sub, WAIT)
                .await
                .unwrap_or_else(|e| panic!("gateway {name}: {e} after {}", got.len()));
            got.push((d.sequence, d.message_id));
        }
        assert_eq!(got, acked, "gateway {name} delivers A's messages in order");
    }
    // And the other way round: a publish on C reaches the stream on B.
    let r = cc.publish("orders", b"from C").await.unwrap();
    let d = next_event(&mut on_b, WAIT).await.unwrap();
    assert_eq!(
        (d.sequence, d.payload.as_ref()),
        (r.sequence, &b"from C"[..])
    );
    // Every gateway counts the topic the same (once it has read C's
    // publish back from the stream: A learns of it asynchronously).
    for (name, cl) in [("A", &mut ca), ("B", &mut cb), ("C", &mut cc)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = cl.topic_stats(&["orders"]).await.unwrap();
            if stats[0].last_sequence == r.sequence || Instant::now() >= deadline {
                assert_eq!(stats[0].last_sequence, r.sequence, "gateway {name}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn two_gateways_publishing_to_one_topic_read_back_in_sequence_order() {
    let _heavy = serial().await;
    let cluster = Cluster::start("order");
    let (a, b, c) = (gateway(&cluster), gateway(&cluster), gateway(&cluster));
    let mut live = c
        .client()
        .await
        .subscribe("shared", "live", proto::InitialPosition::Latest)
        .await;
    live.send(credit(1_000_000)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    type Acked = BTreeMap<u64, (String, Vec<u8>)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut tasks = Vec::new();
    for (g, url) in [("a", a.url()), ("b", b.url())] {
        for p in 0..3 {
            let acked = acked.clone();
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut cl = Client::connect(&url).await;
                for i in 0..150 {
                    let payload = format!("{g}{p}-{i}").into_bytes();
                    let r = cl.publish("shared", &payload).await.unwrap();
                    acked
                        .lock()
                        .unwrap()
                        .insert(r.sequence, (r.message_id, payload));
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 900, "every publish got its own sequence");

    // Live on a third gateway: all of them, in sequence order.
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let d = next_event(&mut live, WAIT)
            .await
            .unwrap_or_else(|e| panic!("live stream: {e} after {}", seen.len()));
        seen.push(d.sequence);
    }
    let want: Vec<u64> = acked.keys().copied().collect();
    assert_eq!(
        seen, want,
        "live deliveries are the acked sequences, ascending"
    );

    // Read back from the start by a fresh group on gateway A.
    let mut fresh = a
        .client()
        .await
        .subscribe("shared", "audit", proto::InitialPosition::Earliest)
        .await;
    fresh.send(credit(1_000_000)).await;
    let mut back = Vec::new();
    while back.len() < acked.len() {
        let d = next_event(&mut fresh, WAIT).await.unwrap();
        back.push((d.sequence, d.message_id, d.payload.to_vec()));
    }
    let want: Vec<(u64, String, Vec<u8>)> = acked
        .iter()
        .map(|(s, (id, p))| (*s, id.clone(), p.clone()))
        .collect();
    assert_eq!(
        back, want,
        "read back: sequence order, ids and payloads as acked"
    );
    // Each publisher's own messages are in its publish order.
    for prefix in ["a0-", "a1-", "a2-", "b0-", "b1-", "b2-"] {
        let mine: Vec<usize> = back
            .iter()
            .filter_map(|(_, _, p)| {
                let s = String::from_utf8_lossy(p).to_string();
                s.strip_prefix(prefix).map(|n| n.parse().unwrap())
            })
            .collect();
        assert_eq!(mine, (0..150).collect::<Vec<_>>(), "{prefix}");
    }
}

#[tokio::test]
async fn a_newcomer_on_another_gateway_takes_the_group_over_from_its_cursor() {
    let _heavy = serial().await;
    let cluster = Cluster::start("takeover");
    let (a, b) = (gateway(&cluster), gateway(&cluster));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut acked = Vec::new();
    for i in 0..100u32 {
        acked.push(
            ca.publish("jobs", format!("j{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    // On A: the group reads 60 and acks the first 40.
    let mut old = ca
        .subscribe("jobs", "workers", proto::InitialPosition::Earliest)
        .await;
    old.send(credit(60)).await;
    let mut got = Vec::new();
    for _ in 0..60 {
        got.push(next_event(&mut old, WAIT).await.unwrap());
    }
    old.send(ack(&got[39].message_id)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A newcomer on B takes over: A's stream ends ABORTED.
    let started = Instant::now();
    let mut new = cb
        .subscribe("jobs", "workers", proto::InitialPosition::Earliest)
        .await;
    new.send(credit(1000)).await;
    let first = next_event(&mut new, WAIT).await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        next_event(&mut old, WAIT).await.unwrap_err(),
        "Aborted",
        "the old stream ends ABORTED"
    );
    // B starts right after A's cursor: nothing acked comes again, nothing
    // unacked is skipped.
    assert_eq!(first.sequence, acked[40].sequence);
    let mut rest = vec![first.sequence];
    while rest.len() < 60 {
        rest.push(next_event(&mut new, WAIT).await.unwrap().sequence);
    }
    let want: Vec<u64> = acked[40..].iter().map(|r| r.sequence).collect();
    assert_eq!(rest, want);
    eprintln!("takeover across gateways took {took:?}");
    assert!(took < Duration::from_secs(3), "takeover took {took:?}");

    // And back again: a newcomer on A ends B's stream, starts after B's acks.
    new.send(ack(&acked[69].message_id)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut back = ca
        .subscribe("jobs", "workers", proto::InitialPosition::Earliest)
        .await;
    back.send(credit(10)).await;
    assert_eq!(
        next_event(&mut back, WAIT).await.unwrap().sequence,
        acked[70].sequence
    );
    assert_eq!(next_event(&mut new, WAIT).await.unwrap_err(), "Aborted");
    // Both gateways report the group's cursor where it is.
    let stats = cb.topic_stats(&["jobs"]).await.unwrap();
    let g = stats[0]
        .consumer_groups
        .iter()
        .find(|g| g.group_name == "workers")
        .unwrap();
    assert_eq!(g.cursor_sequence, acked[69].sequence);
}

#[tokio::test]
async fn admin_through_one_gateway_reaches_streams_on_another() {
    let _heavy = serial().await;
    let cluster = Cluster::start("admin");
    let (a, b) = (gateway(&cluster), gateway(&cluster));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut seqs = Vec::new();
    for i in 0..10u32 {
        seqs.push(
            ca.publish("t", format!("m{i}").as_bytes())
                .await
                .unwrap()
                .sequence,
        );
    }
    // A consumer on B reads and acks everything.
    let mut sub = cb
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(100)).await;
    let mut last = None;
    for _ in 0..10 {
        last = Some(next_event(&mut sub, WAIT).await.unwrap());
    }
    sub.send(ack(&last.unwrap().message_id)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // ResetCursor through A moves B's consumer back.
    assert!(
        reset_cursor(&mut ca, "t", "g", seqs[4]).await,
        "A knows B's group"
    );
    let d = next_event(&mut sub, WAIT).await.unwrap();
    assert_eq!(
        d.sequence, seqs[5],
        "B's stream continues after the reset cursor"
    );

    // DeleteConsumerGroup through A ends B's stream GROUP_DELETED.
    let deleted = ca
        .unary::<_, proto::DeleteConsumerGroupResponse>(
            "DeleteConsumerGroup",
            proto::DeleteConsumerGroupRequest {
                topic: "t".into(),
                consumer_group: "g".into(),
            },
        )
        .await
        .unwrap();
    assert!(deleted.deleted);
    let mut ended = Err(String::new());
    for _ in 0..10 {
        ended = next_event(&mut sub, WAIT).await;
        if ended.is_err() {
            break;
        }
    }
    assert_eq!(ended.unwrap_err(), "GROUP_DELETED");
    // Gone on both gateways, and it stays gone (no late cursor write of
    // B's consumer brings it back).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, cl) in [("A", &mut ca), ("B", &mut cb)] {
        let stats = cl.topic_stats(&["t"]).await.unwrap();
        let groups: Vec<&str> = stats[0]
            .consumer_groups
            .iter()
            .map(|g| g.group_name.as_str())
            .collect();
        assert!(
            !groups.contains(&"g"),
            "gateway {name} still has g: {groups:?}"
        );
    }

    // DeleteTopic through A ends B's other streams TOPIC_DELETED.
    let mut browse = cb.browse("t", proto::InitialPosition::Latest).await;
    browse.send(credit(10)).await;
    let mut other = cb.subscribe("t", "h", proto::InitialPosition::Latest).await;
    other.send(credit(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = ca
        .unary::<_, proto::DeleteTopicResponse>(
            "DeleteTopic",
            proto::DeleteTopicRequest { topic: "t".into() },
        )
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert_eq!(
        next_event(&mut browse, WAIT).await.unwrap_err(),
        "TOPIC_DELETED"
    );
    assert_eq!(
        next_event(&mut other, WAIT).await.unwrap_err(),
        "TOPIC_DELETED"
    );
    let listed = cb.topic_names().await;
    assert!(
        !listed.contains(&"t".to_string()),
        "B forgot the topic: {listed:?}"
    );
}

/// `n` publishers on their own connections to `url` until `stop`; what got
/// acked goes into `acked` (sequence -> id). Failed calls (the gateway
/// died) are retried.
fn publishers(
    url: String,
    tag: &'static str,
    n: usize,
    stop: Instant,
    acked: Arc<Mutex<BTreeMap<u64, String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|p| {
            let url = url.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                let Ok(mut c) =
                    tokio::time::timeout(Duration::from_secs(5), Client::connect(&url)).await
                else {
                    return;
                };
                let mut i = 0u64;
                while Instant::now() < stop {
                    let mut req = tonic::Request::new(proto::PublishRequest {
                        topic: "load".into(),
                        payload: format!("{tag}{p}-{i}").into_bytes().into(),
                        attributes: Default::default(),
                        ..Default::default()
                    });
                    req.set_timeout(Duration::from_secs(2));
                    match c
                        .unary_req::<_, proto::PublishResponse>("Publish", req)
                        .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            acked.lock().unwrap().insert(r.sequence, r.message_id);
                            i += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn sigkill_of_a_gateway_moves_its_consumer_to_another_without_loss() {
    let _heavy = serial().await;
    let cluster = Cluster::start("failover");
    let (mut a, b) = (gateway(&cluster), gateway(&cluster));
    let acked: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(8);
    let mut tasks = publishers(a.url(), "a", 2, stop, acked.clone());
    tasks.extend(publishers(b.url(), "b", 2, stop, acked.clone()));

    // The consumer on A acks every delivery at once.
    let mut ca = a.client().await;
    let mut sub = ca
        .subscribe("load", "workers", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(100)).await;
    let mut before: Vec<u64> = Vec::new();
    let kill_at = Instant::now() + Duration::from_secs(3);
    while Instant::now() < kill_at {
        if let Some(Ok(proto::SubscribeDownstream {
            response: Some(Down::Delivery(d)),
        })) = sub.next_within(Duration::from_millis(100)).await
        {
            sub.send(ack(&d.message_id)).await;
            sub.send(credit(1)).await;
            before.push(d.sequence);
        }
    }
    assert!(
        before.len() > 100,
        "the consumer was busy: {}",
        before.len()
    );
    a.kill9();
    let killed = Instant::now();
    // Its stream breaks; the client moves to gateway B.
    while let Some(Ok(proto::SubscribeDownstream {
        response: Some(Down::Delivery(d)),
    })) = sub.next_within(Duration::from_secs(5)).await
    {
        before.push(d.sequence); // sent before the kill, not acked
    }
    let mut cb = b.client().await;
    let mut sub = cb
        .subscribe("load", "workers", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(100)).await;
    let mut after: Vec<u64> = Vec::new();
    let mut resumed_after = None;
    loop {
        let quiet = if Instant::now() < stop {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        };
        match sub.next_within(quiet).await {
            Some(Ok(proto::SubscribeDownstream {
                response: Some(Down::Delivery(d)),
            })) => {
                resumed_after.get_or_insert(killed.elapsed());
                sub.send(ack(&d.message_id)).await;
                sub.send(credit(1)).await;
                after.push(d.sequence);
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let seen: std::collections::HashSet<u64> = before.iter().chain(&after).copied().collect();
    let missing: Vec<u64> = acked
        .keys()
        .filter(|s| !seen.contains(s))
        .copied()
        .collect();
    let before_set: std::collections::HashSet<u64> = before.iter().copied().collect();
    let dups = after.iter().filter(|s| before_set.contains(s)).count();
    let resumed_after = resumed_after.expect("the consumer resumed on B");
    eprintln!(
        "{} acked publishes, consumer got {} on A and {} on B ({dups} again), resumed on B {resumed_after:?} after the kill, {} missing",
        acked.len(),
        before.len(),
        after.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acked but never delivered: {missing:?}");
    assert!(
        resumed_after < Duration::from_secs(10),
        "resumed within the lease time"
    );
    // Redelivered: at most what was in flight (credit 100) when A died.
    assert!(dups <= 100, "{dups} delivered again");
    // B delivers in sequence order from where A's acks left off.
    let mut sorted = after.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(after, sorted, "in order, once each");
}

#[tokio::test]
async fn a_gateway_cut_off_from_nats_gives_its_groups_up_unavailable() {
    let (mut node, _client) = common::nats_harness::SingleNode::start();
    let url = node.node.url();
    let g = Server::start_with(&[
        "--store",
        &url,
        "--nats-replicas",
        "1",
        "--nats-lease",
        "3s",
    ]);
    let mut c = g.client().await;
    c.publish("cut", b"m1").await.unwrap();
    let mut sub = c
        .subscribe("cut", "workers", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    next_event(&mut sub, WAIT).await.unwrap();
    let cut = Instant::now();
    node.node.kill();
    // Renewals fail; after two thirds of the lease the gateway ends the
    // consumer UNAVAILABLE (not ABORTED: nobody took it over), before the
    // lease could expire and another gateway serve the group too.
    let ended = next_event(&mut sub, Duration::from_secs(10)).await;
    let took = cut.elapsed();
    assert_eq!(ended.unwrap_err(), "Unavailable", "after {took:?}");
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
}

/// A consumer that crashes on one message every time, reconnecting to
/// gateway A and B in turn (as behind a load balancer): the group's
/// delivery counts follow it from gateway to gateway, so the message
/// reaches the dead-letter topic after `max_deliveries` in all, once.
#[tokio::test]
async fn delivery_counts_follow_a_group_across_gateways_to_the_dead_letter_topic() {
    let _heavy = serial().await;
    let cluster = Cluster::start("deadletter");
    let (a, b) = (gateway(&cluster), gateway(&cluster));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let poison = ca.publish("jobs", b"poison").await.unwrap();
    let next = ca.publish("jobs", b"fine").await.unwrap();
    let init = || proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: "jobs".into(),
                consumer_group: "g".into(),
                initial_position: proto::InitialPosition::Earliest as i32,
                max_deliveries: 4,
                ..Default::default()
            },
        )),
    };
    let mut seen = Vec::new();
    for round in 0..5 {
        let c = if round % 2 == 0 { &mut ca } else { &mut cb };
        let mut s = c.subscribe_with(init()).await.unwrap();
        s.send(credit(1)).await;
        let d = next_event(&mut s, WAIT).await.unwrap();
        seen.push((d.sequence, d.delivery_count));
        drop(s);
        // Let the gateway let go of the group before the next one claims it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let p = poison.sequence;
    assert_eq!(
        seen,
        vec![(p, 1), (p, 2), (p, 3), (p, 4), (next.sequence, 1)],
        "counted across both gateways, then dead-lettered"
    );
    let mut dead = cb
        .browse("jobs.dead-letter", proto::InitialPosition::Earliest)
        .await;
    dead.send(credit(10)).await;
    let copies = dead.deliveries_until_quiet(Duration::from_secs(2)).await;
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(
        copies[0].attributes["sluice-dead-letter-delivery-count"],
        "4"
    );
}
