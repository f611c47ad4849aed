//! Hostile clients (issue 10): what an attacker can make the broker do
//! must stay bounded. Each test counts (log lines, statuses, stored state).

mod common;

use std::time::Duration;

use common::*;
use sluice::proto;
use tonic::Code;

#[tokio::test]
async fn refused_connections_cannot_flood_the_log() {
    let server = Server::start_with(&["--max-connections", "1"]);
    let mut c = server.client().await;
    c.publish("t", b"held").await.unwrap();
    // An open stream: the held connection is not idle, so it is not closed
    // to make room.
    let _sub = c.subscribe("t", "g", proto::InitialPosition::Latest).await;
    // 300 more connections, each refused at accept.
    for _ in 0..300 {
        let s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = server.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("refusing connection"))
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    // The held client is still served.
    c.publish("t", b"still").await.unwrap();
}

#[tokio::test]
async fn get_topic_stats_validates_every_name_before_looking_any_up() {
    let server = Server::start();
    let mut c = server.client().await;
    let err = c
        .unary::<_, proto::GetTopicStatsResponse>(
            "GetTopicStats",
            proto::GetTopicStatsRequest {
                topics: vec!["missing".into(), "bad/name".into()],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn reset_cursor_past_the_newest_message_is_invalid_argument() {
    let server = Server::start();
    let mut c = server.client().await;
    let last = c.publish("t", b"x").await.unwrap().sequence;
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    sub.delivery(Duration::from_secs(5)).await;
    for bad in [last + 2, u64::MAX] {
        let err = c
            .unary::<_, proto::ResetCursorResponse>(
                "ResetCursor",
                proto::ResetCursorRequest {
                    topic: "t".into(),
                    consumer_group: "g".into(),
                    sequence: bad,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    let ok: proto::ResetCursorResponse = c
        .unary(
            "ResetCursor",
            proto::ResetCursorRequest {
                topic: "t".into(),
                consumer_group: "g".into(),
                sequence: last,
            },
        )
        .await
        .unwrap();
    assert!(ok.updated);
}
