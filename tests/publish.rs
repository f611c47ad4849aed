//! Black-box tests of Publish, BatchPublish, ListTopics and the gRPC layer's
//! answers to bad input.

mod common;

use std::time::Duration;

use common::*;
use sluice::proto;
use tonic::Code;

#[tokio::test]
async fn publish_returns_uuid_v7_and_global_monotonic_sequences() {
    let server = Server::start();
    let mut c = server.client().await;
    let a = c.publish("orders", b"one").await.unwrap();
    let b = c.publish("payments", b"two").await.unwrap();
    let d = c.publish("orders", b"three").await.unwrap();
    assert!(
        a.sequence < b.sequence && b.sequence < d.sequence,
        "{a:?} {b:?} {d:?}"
    );
    let id = uuid::Uuid::parse_str(&a.message_id).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(a.message_id, a.message_id.to_lowercase());
    assert_eq!(a.message_id.len(), 36);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now_ms - a.timestamp).abs() < 10_000,
        "timestamp is Unix ms: {}",
        a.timestamp
    );
}

#[tokio::test]
async fn batch_publish_returns_one_result_per_message_in_order() {
    let server = Server::start();
    let mut c = server.client().await;
    let r = c.batch_publish("t", &[b"a", b"b", b"c"]).await.unwrap();
    assert_eq!(r.results.len(), 3);
    assert!(r
        .results
        .windows(2)
        .all(|w| w[1].sequence == w[0].sequence + 1));
    assert!(r.timestamp > 0);
    let ids: std::collections::HashSet<_> =
        r.results.iter().map(|x| x.message_id.clone()).collect();
    assert_eq!(ids.len(), 3);
    let err = c.batch_publish("t", &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn topics_are_auto_created_and_listed_by_name() {
    let server = Server::start();
    let mut c = server.client().await;
    assert!(c.list_topics().await.unwrap().topics.is_empty());
    for t in ["zeta", "alpha", "mid.dle_1-x"] {
        c.publish(t, b"x").await.unwrap();
    }
    let names: Vec<_> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["alpha", "mid.dle_1-x", "zeta"]);
    let topics = c.list_topics().await.unwrap().topics;
    assert!(topics.iter().all(|t| t.created_at > 1_600_000_000_000));
}

#[tokio::test]
async fn bad_topic_names_are_invalid_argument_naming_the_rule() {
    let server = Server::start();
    let mut c = server.client().await;
    let long = "a".repeat(256);
    for bad in ["", "has space", "slash/x", "ünï", long.as_str()] {
        let err = c.publish(bad, b"x").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            err.message().contains("[A-Za-z0-9._-]"),
            "{}",
            err.message()
        );
        let err = c.batch_publish(bad, &[b"x"]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert!(c.publish(&"a".repeat(255), b"x").await.is_ok());
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let server = Server::start();
    let mut c = server.client().await;
    let err = c
        .raw("NoSuchMethod", bytes::Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(bytes::Bytes::new()),
            http::uri::PathAndQuery::from_static("/other.Service/Method"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn undecodable_protobuf_is_internal_and_says_so() {
    let server = Server::start();
    let mut c = server.client().await;
    let err = c
        .raw("Publish", bytes::Bytes::from_static(&[0xff, 0xff, 0xff]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("decode"), "{}", err.message());
    // The channel stays usable.
    c.publish("t", b"ok").await.unwrap();
}

#[tokio::test]
async fn oversized_message_is_resource_exhausted_and_channel_survives() {
    let server = Server::start_with(&["--max-message-bytes", "1000"]);
    let mut c = server.client().await;
    let err = c.publish("t", &[7u8; 2000]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    c.publish("t", &[7u8; 500]).await.unwrap();
}

#[tokio::test]
async fn four_mib_limit_by_default() {
    let server = Server::start();
    let mut c = server.client().await;
    // tonic's own client-side limit is the default 4 MiB for decoding only;
    // sending is unlimited.
    let err = c
        .publish("t", &vec![1u8; 4 * 1024 * 1024 + 10])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    c.publish("t", &vec![1u8; 4 * 1024 * 1024 - 100])
        .await
        .unwrap();
}

#[tokio::test]
async fn many_concurrent_publishers_over_one_and_many_connections() {
    let server = Server::start();
    let c = server.client().await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut c = if i % 2 == 0 {
            c.clone()
        } else {
            server.client().await
        };
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for j in 0..20 {
                seqs.push(
                    c.publish(&format!("t{}", i % 4), format!("{i}-{j}").as_bytes())
                        .await
                        .unwrap()
                        .sequence,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 64 * 20, "sequences are unique");
}

#[tokio::test]
async fn sequences_continue_after_restart() {
    let mut server = Server::start();
    let mut c = server.client().await;
    let last = c.publish("t", b"a").await.unwrap().sequence;
    c.publish("u", b"b").await.unwrap();
    server.signal(15);
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    server.spawn(0);
    let mut c = server.client().await;
    let next = c.publish("t", b"c").await.unwrap().sequence;
    assert_eq!(next, last + 2);
    let names: Vec<_> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["t", "u"]);
}

#[tokio::test]
async fn attributes_round_trip_through_storage() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish_attrs("t", b"p", &[("k", "v"), ("trace", "x")])
        .await
        .unwrap();
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    let d = sub.delivery(Duration::from_secs(5)).await;
    assert_eq!(d.payload.as_ref(), b"p");
    assert_eq!(d.attributes.get("k").map(String::as_str), Some("v"));
    assert_eq!(d.attributes.get("trace").map(String::as_str), Some("x"));
}

#[tokio::test]
async fn full_storage_fails_publishes_unavailable_and_keeps_what_was_acknowledged() {
    if sqlite_only("--max-db-bytes caps the SQLite database; a cluster's limits are its own") {
        return;
    }
    let server = Server::start_with(&["--max-db-bytes", "1MiB"]);
    let mut c = server.client().await;
    let mut acked = Vec::new();
    let payload = vec![9u8; 16 * 1024];
    let err = loop {
        match c.publish("fill", &payload).await {
            Ok(r) => acked.push(r.sequence),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "the cap never bit");
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());
    assert!(!acked.is_empty());
    // A failed batch loses nothing already acknowledged; the broker still serves.
    let mut sub = c
        .subscribe_with(proto::SubscribeUpstream {
            request: Some(proto::subscribe_upstream::Request::Init(
                proto::SubscriptionInit {
                    topic: "fill".into(),
                    initial_position: proto::InitialPosition::Earliest as i32,
                    mode: proto::SubscriptionMode::Browse as i32,
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
    sub.send(credit(10_000)).await;
    let got: Vec<u64> = sub
        .deliveries_until_quiet(Duration::from_millis(700))
        .await
        .iter()
        .map(|d| d.sequence)
        .collect();
    assert_eq!(got, acked);
    assert!(c.list_topics().await.is_ok());
}
