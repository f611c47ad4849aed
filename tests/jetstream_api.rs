//! The JetStream API layer the JetStream store (issue 11) builds on, against
//! real `nats-server` processes: reads by sequence, page-reading pull
//! consumers, per-subject counts and purge, KV-style buckets and pipelined
//! publishing on one node; pipelined throughput and a leader failover on a
//! three-node R3 cluster. Every wait is bounded; servers die with the test.

mod nats_harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_harness::*;
use sluice::nats::jetstream::{JetStream, JetStreamError, StreamConfig};
use sluice::nats::kv_bucket::ERR_WRONG_LAST_SEQUENCE;
use sluice::nats::publish_window::OutgoingMessage;
use sluice::nats::pull_consumer::{DeliverFrom, PullConsumerConfig};
use sluice::nats::stored_message::MessageSelector;
use sluice::nats::subject_token::encode_topic;
use sluice::nats::{Error, Headers};

const T: Duration = Duration::from_secs(2);

/// The store's layout: one stream, one subject per topic.
fn messages_stream(js: &JetStream, replicas: usize) {
    let config = StreamConfig::new("MSGS", vec!["t.>".into()]).replicas(replicas);
    js.create_or_verify_stream(&config).unwrap();
}

fn topic_subject(topic: &str) -> String {
    format!("t.{}", encode_topic(topic).unwrap())
}

/// Publishes `n` messages alternating over `subjects`; returns their seqs.
fn publish_round_robin(js: &JetStream, subjects: &[String], n: usize) -> Vec<u64> {
    let payloads: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
    let messages: Vec<OutgoingMessage> = (0..n)
        .map(|i| OutgoingMessage {
            subject: &subjects[i % subjects.len()],
            msg_id: Some(&ids[i]),
            headers: None,
            payload: payloads[i].as_bytes(),
        })
        .collect();
    js.publish_batch(&messages, 16)
        .into_iter()
        .map(|r| r.unwrap().seq)
        .collect()
}

#[test]
fn stored_messages_by_sequence_last_and_next_on_subject() {
    let (_server, client) = SingleNode::start();
    let js = JetStream::new(Arc::clone(&client), T);
    messages_stream(&js, 1);
    let a = topic_subject("orders.eu");
    let b = topic_subject("orders_us");
    assert_eq!(a, "t.orders_2Eeu");
    let mut h = Headers::new();
    h.insert("Sluice-Key", "k1");
    let ack = js
        .publish_start(&OutgoingMessage {
            subject: &a,
            msg_id: Some("first"),
            headers: Some(&h),
            payload: b"one",
        })
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(ack.seq, 1);
    js.publish(&b, None, b"two").unwrap();
    js.publish(&a, None, b"three").unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    let m = js
        .get_message("MSGS", MessageSelector::Seq(1))
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.seq, m.subject.as_str(), &m.payload[..]),
        (1, &a[..], &b"one"[..])
    );
    let headers = m.headers.unwrap();
    assert_eq!(headers.get("Sluice-Key"), Some("k1"));
    assert_eq!(headers.get("Nats-Msg-Id"), Some("first"));
    let stored_at = m.time_unix_nanos.expect("time parses");
    assert!(
        stored_at <= before && before - stored_at < 60_000_000_000,
        "{} vs now {before}",
        m.time
    );

    let last = js
        .get_message("MSGS", MessageSelector::LastBySubject(&a))
        .unwrap()
        .unwrap();
    assert_eq!((last.seq, &last.payload[..]), (3, &b"three"[..]));
    assert!(last.headers.is_none());
    let next = js
        .get_message(
            "MSGS",
            MessageSelector::NextBySubject {
                seq: 2,
                subject: &a,
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(next.seq, 3);
    let next_wild = js
        .get_message(
            "MSGS",
            MessageSelector::NextBySubject {
                seq: 2,
                subject: "t.>",
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(next_wild.seq, 2);

    // Not found is None, not an error.
    assert_eq!(
        js.get_message("MSGS", MessageSelector::Seq(99)).unwrap(),
        None
    );
    assert_eq!(
        js.get_message("MSGS", MessageSelector::LastBySubject("t.none"))
            .unwrap(),
        None
    );
    assert_eq!(
        js.get_message(
            "MSGS",
            MessageSelector::NextBySubject {
                seq: 4,
                subject: &a
            }
        )
        .unwrap(),
        None
    );
    match js.get_message("NOPE", MessageSelector::Seq(1)) {
        Err(e) => assert!(e.is_not_found(), "{e:?}"),
        Ok(m) => panic!("got {m:?} from a missing stream"),
    }
}

#[test]
fn pull_consumer_reads_a_topic_backlog_in_pages() {
    let (_server, client) = SingleNode::start();
    let js = JetStream::new(Arc::clone(&client), T);
    messages_stream(&js, 1);
    let a = topic_subject("alpha");
    let b = topic_subject("beta");
    let seqs = publish_round_robin(&js, &[a.clone(), b.clone()], 50);
    let alpha_seqs: Vec<u64> = seqs.iter().copied().step_by(2).collect();
    assert_eq!(alpha_seqs.len(), 25);

    // A subscriber with credit 10, starting mid-backlog at alpha's 6th message.
    let start = alpha_seqs[5];
    let consumer = js
        .create_pull_consumer("MSGS", &PullConsumerConfig::from_sequence(&a, start))
        .unwrap();
    assert_eq!(consumer.num_pending, 20);
    let mut got = Vec::new();
    let started = Instant::now();
    loop {
        let page = js.fetch("MSGS", &consumer.name, 10, None).unwrap();
        assert!(page.len() <= 10);
        if page.is_empty() {
            break;
        }
        for m in &page {
            assert_eq!(m.subject, a);
            assert!(m.info.timestamp_nanos > 0);
            assert_eq!(
                m.payload,
                format!("m{}", m.info.stream_seq - 1).into_bytes()
            );
        }
        got.extend(page.iter().map(|m| m.info.stream_seq));
    }
    assert_eq!(got, alpha_seqs[5..]);
    // no_wait fetches return at once, empty ones included.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Waiting: a message published during the wait is delivered.
    let waiter = {
        let js = js.clone();
        let name = consumer.name.clone();
        std::thread::spawn(move || js.fetch("MSGS", &name, 10, Some(Duration::from_secs(3))))
    };
    std::thread::sleep(Duration::from_millis(200));
    let late = js.publish(&a, None, b"late").unwrap().seq;
    let page = waiter.join().unwrap().unwrap();
    assert_eq!(
        page.iter().map(|m| m.info.stream_seq).collect::<Vec<_>>(),
        [late]
    );
    // An expiring wait with nothing to deliver ends empty, within the wait.
    let t0 = Instant::now();
    assert!(js
        .fetch("MSGS", &consumer.name, 10, Some(Duration::from_millis(300)))
        .unwrap()
        .is_empty());
    assert!(
        t0.elapsed() < Duration::from_millis(300) + T,
        "{:?}",
        t0.elapsed()
    );

    assert!(js.delete_consumer("MSGS", &consumer.name).unwrap());
    assert!(!js.delete_consumer("MSGS", &consumer.name).unwrap());
    // nats-server 2.9.10 answers nothing at all to a pull from a missing
    // consumer (JetStream's API import counts as a responder, so no 503):
    // the fetch ends with our timeout.
    let t0 = Instant::now();
    match js.fetch("MSGS", &consumer.name, 10, None) {
        Err(JetStreamError::Client(Error::Timeout | Error::NoResponders))
        | Err(JetStreamError::PullStatus { .. }) => {}
        r => panic!("fetch from a deleted consumer: {r:?}"),
    }
    assert!(
        t0.elapsed() < T + Duration::from_secs(1),
        "{:?}",
        t0.elapsed()
    );

    // A named consumer, and a batch over the client's buffer is refused.
    let named = PullConsumerConfig {
        name: Some("pager".into()),
        filter_subject: Some(b.clone()),
        deliver: DeliverFrom::Sequence(1),
        headers_only: false,
        inactive_threshold: Duration::from_secs(5),
    };
    let info = js.create_pull_consumer("MSGS", &named).unwrap();
    assert_eq!((info.name.as_str(), info.num_pending), ("pager", 25));
    let page = js.fetch("MSGS", "pager", 100, None).unwrap();
    assert_eq!(page.len(), 25);
    assert_eq!(page.last().unwrap().info.pending, 0);
    assert!(matches!(
        js.fetch("MSGS", "pager", 1_000_000, None),
        Err(JetStreamError::Invalid(_))
    ));
    js.delete_consumer("MSGS", "pager").unwrap();
}

#[test]
fn subject_counts_purge_by_subject_and_stream_delete() {
    let (_server, client) = SingleNode::start();
    let js = JetStream::new(Arc::clone(&client), T);
    messages_stream(&js, 1);
    let subjects: Vec<String> = ["a", "b.b", "c_c"]
        .iter()
        .map(|t| topic_subject(t))
        .collect();
    publish_round_robin(&js, &subjects, 30);
    js.publish(&subjects[0], None, b"extra").unwrap();

    let counts = js.subject_counts("MSGS", "t.>", 100).unwrap();
    assert_eq!(counts.stream.messages, 31);
    assert_eq!((counts.stream.first_seq, counts.stream.last_seq), (1, 31));
    assert_eq!(counts.subjects.get("t.a"), Some(&11));
    assert_eq!(counts.subjects.get("t.b_2Eb"), Some(&10));
    assert_eq!(counts.subjects.get("t.c_5Fc"), Some(&10));
    assert!(!counts.truncated);
    let limited = js.subject_counts("MSGS", "t.>", 2).unwrap();
    assert_eq!(limited.subjects.len(), 2);
    assert!(limited.truncated);
    assert_eq!(js.subject_message_count("MSGS", "t.b_2Eb").unwrap(), 10);
    assert_eq!(js.subject_message_count("MSGS", "t.none").unwrap(), 0);

    assert_eq!(js.purge_subject("MSGS", "t.b_2Eb").unwrap(), 10);
    assert_eq!(js.subject_message_count("MSGS", "t.b_2Eb").unwrap(), 0);
    let after = js.subject_counts("MSGS", "t.>", 100).unwrap();
    assert_eq!(after.stream.messages, 21);
    assert_eq!(after.stream.last_seq, 31, "a purge keeps the sequence");
    assert_eq!(after.subjects.len(), 2);
    assert_eq!(js.purge_subject("MSGS", "t.b_2Eb").unwrap(), 0);
    // A purged sequence reads as absent; its neighbours are still there.
    assert_eq!(
        js.get_message("MSGS", MessageSelector::Seq(2)).unwrap(),
        None
    );
    assert!(js
        .get_message("MSGS", MessageSelector::Seq(1))
        .unwrap()
        .is_some());

    js.delete_stream("MSGS").unwrap();
    assert!(js.stream_info("MSGS").unwrap_err().is_not_found());
    assert!(js.delete_stream("MSGS").unwrap_err().is_not_found());
}

#[test]
fn kv_bucket_put_get_cas_delete_purge_and_list() {
    let (_server, client) = SingleNode::start();
    let js = JetStream::new(Arc::clone(&client), T);
    let kv = js.kv_bucket("sluice_cursors", 1).unwrap();
    // Idempotent.
    js.kv_bucket("sluice_cursors", 1).unwrap();
    let key = |topic: &str, group: &str| {
        format!(
            "{}.{}",
            encode_topic(topic).unwrap(),
            encode_topic(group).unwrap()
        )
    };
    let k1 = key("orders.eu", "billing");
    let r1 = kv.put(&k1, b"10").unwrap();
    let r2 = kv.put(&k1, b"20").unwrap();
    assert!(r2 > r1);
    let e = kv.get(&k1).unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.revision), (&b"20"[..], r2));
    assert_eq!(kv.get("missing").unwrap(), None);

    // Compare-and-set.
    let r3 = kv.put_if_revision(&k1, b"30", r2).unwrap();
    match kv.put_if_revision(&k1, b"stale", r2) {
        Err(JetStreamError::Api(e)) => assert_eq!(e.err_code, ERR_WRONG_LAST_SEQUENCE, "{e:?}"),
        r => panic!("stale CAS: {r:?}"),
    }
    let k_new = key("fresh", "g");
    kv.put_if_revision(&k_new, b"1", 0).unwrap();
    assert!(kv.put_if_revision(&k_new, b"2", 0).is_err());
    assert_eq!(kv.get(&k1).unwrap().unwrap().revision, r3);

    let k2 = key("orders.eu", "audit");
    let k3 = key("payments", "billing");
    kv.put(&k2, b"5").unwrap();
    kv.put(&k3, b"7").unwrap();
    let mut all = kv.keys("", 100).unwrap();
    all.sort();
    let mut want = vec![k1.clone(), k2.clone(), k3.clone(), k_new.clone()];
    want.sort();
    assert_eq!(all, want);
    let mut orders = kv.keys(&encode_topic("orders.eu").unwrap(), 100).unwrap();
    orders.sort();
    assert_eq!(orders, [k2.clone(), k1.clone()]);
    assert_eq!(kv.keys("", 2).unwrap().len(), 2);

    kv.delete(&k2).unwrap();
    assert_eq!(kv.get(&k2).unwrap(), None);
    kv.purge(&k3).unwrap();
    assert_eq!(kv.get(&k3).unwrap(), None);
    let mut live = kv.keys("", 100).unwrap();
    live.sort();
    let mut want = vec![k1.clone(), k_new.clone()];
    want.sort();
    assert_eq!(live, want);
    // One message kept per key.
    let counts = js.subject_counts(kv.stream_name(), "$KV.>", 100).unwrap();
    assert!(counts.subjects.values().all(|&n| n == 1), "{counts:?}");
    assert!(matches!(
        kv.put("bad key", b""),
        Err(JetStreamError::Invalid(_))
    ));
    assert!(matches!(
        kv.put("a.>", b""),
        Err(JetStreamError::Invalid(_))
    ));
}

/// Publishes `n` 256-byte messages with `window` in flight; msgs/s.
fn pipelined_rate(js: &JetStream, subject: &str, n: usize, window: usize, tag: &str) -> f64 {
    let payload = [b'x'; 256];
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let messages: Vec<OutgoingMessage> = ids
        .iter()
        .map(|id| OutgoingMessage {
            subject,
            msg_id: Some(id),
            headers: None,
            payload: &payload,
        })
        .collect();
    let started = Instant::now();
    let results = js.publish_batch(&messages, window);
    let elapsed = started.elapsed();
    let seqs: Vec<u64> = results.into_iter().map(|r| r.unwrap().seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "acks in order");
    n as f64 / elapsed.as_secs_f64()
}

#[test]
fn pipelined_publish_single_node_throughput_and_per_message_errors() {
    let (_server, client) = SingleNode::start();
    let js = JetStream::new(Arc::clone(&client), T);
    messages_stream(&js, 1);
    let subject = topic_subject("bench");
    let sequential = pipelined_rate(&js, &subject, 1_000, 1, "seq");
    let pipelined = pipelined_rate(&js, &subject, 20_000, 64, "pipe");
    eprintln!(
        "single node, 256-byte messages: {pipelined:.0} msgs/s with 64 in flight, \
         {sequential:.0} msgs/s one at a time"
    );
    assert!(
        pipelined > 2.0 * sequential,
        "pipelining should beat one round trip per message: {pipelined:.0} vs {sequential:.0}"
    );

    // Per-message errors in one batch: a duplicate is acked as such, an
    // unbound subject has no responders, a wrong expected sequence is refused.
    let mut expect_wrong = Headers::new();
    expect_wrong.insert("Nats-Expected-Last-Sequence", "1");
    let batch = [
        OutgoingMessage {
            subject: &subject,
            msg_id: Some("pipe-0"),
            headers: None,
            payload: b"dup",
        },
        OutgoingMessage {
            subject: "nobody.listens",
            msg_id: Some("x"),
            headers: None,
            payload: b"lost",
        },
        OutgoingMessage {
            subject: &subject,
            msg_id: Some("cas"),
            headers: Some(&expect_wrong),
            payload: b"refused",
        },
        OutgoingMessage {
            subject: &subject,
            msg_id: Some("fresh"),
            headers: None,
            payload: b"ok",
        },
    ];
    let results = js.publish_batch(&batch, 64);
    let dup = results[0].as_ref().unwrap();
    assert!(dup.duplicate);
    assert_eq!(
        results[1].as_ref().unwrap_err(),
        &JetStreamError::Client(Error::NoResponders)
    );
    assert!(results[1].as_ref().unwrap_err().is_transient());
    match &results[2] {
        Err(e @ JetStreamError::Api(_)) => assert!(!e.is_transient()),
        r => panic!("expected a refused publish, got {r:?}"),
    }
    assert_eq!(results[3].as_ref().unwrap().seq, 21_001);
}

#[test]
fn pipelined_publish_on_r3_cluster_throughput_and_leader_failover() {
    let mut cluster = Cluster::start("jsapi");
    let client = connect_ready(&cluster.url(), T * 5);
    let js = JetStream::new(Arc::clone(&client), T);
    messages_stream(&js, 3);
    let subject = topic_subject("bench");
    let rate = pipelined_rate(&js, &subject, 10_000, 64, "r3");
    eprintln!("R3 cluster, 256-byte messages: {rate:.0} msgs/s with 64 in flight");

    // Kill the stream leader, publishing through a connection to the other
    // two nodes; keep publishing windows, retrying failed messages with
    // the same msg ids.
    let leader = js
        .stream_info("MSGS")
        .unwrap()
        .cluster
        .and_then(|c| c.leader)
        .expect("an R3 stream has a leader");
    let followers: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.name != leader)
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    assert_eq!(followers.len(), 2);
    let client = connect_ready(&followers.join(","), T * 5);
    let js = JetStream::new(Arc::clone(&client), T);
    let victim = leader;
    cluster.node_named(&victim).kill();
    let killed_at = Instant::now();
    let payload = [b'y'; 256];
    let ids: Vec<String> = (0..500).map(|i| format!("after-{i}")).collect();
    let mut acked: Vec<Option<u64>> = vec![None; ids.len()];
    let mut errors = Vec::new();
    while acked.iter().any(Option::is_none) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "publishing did not resume: {errors:?}"
        );
        let todo: Vec<usize> = (0..ids.len()).filter(|&i| acked[i].is_none()).collect();
        let messages: Vec<OutgoingMessage> = todo
            .iter()
            .map(|&i| OutgoingMessage {
                subject: &subject,
                msg_id: Some(&ids[i]),
                headers: None,
                payload: &payload,
            })
            .collect();
        let mut failed = false;
        for (&i, result) in todo.iter().zip(js.publish_batch(&messages, 64)) {
            match result {
                Ok(ack) => acked[i] = Some(ack.seq),
                Err(e) => {
                    assert!(e.is_transient(), "not retryable: {e}");
                    failed = true;
                    errors.push(e.to_string());
                }
            }
        }
        if failed {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    errors.sort();
    errors.dedup();
    eprintln!(
        "killed leader {victim}: all 500 acked {:?} after the kill; distinct errors meanwhile: {errors:?}",
        killed_at.elapsed()
    );
    let seqs: Vec<u64> = acked.into_iter().flatten().collect();
    let mut unique = seqs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 500, "each message stored once");
    let state = js.stream_info("MSGS").unwrap().state;
    assert_eq!(state.messages, 10_500, "no duplicates from retries");
}
