//! Backpressure: a saturated writer holds publishers back (they slow down,
//! never fail, memory stays bounded) and never starves a Subscribe stream
//! that shares their HTTP/2 connection.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturating_publisher_and_consumer_share_one_connection() {
    // A one-slot writer queue makes the reactor park publishes constantly.
    let server = Server::start_with(&["--writer-queue", "1"]);
    let client = server.client().await; // one channel = one HTTP/2 connection
    let mut pre = client.clone();
    for chunk in 0..20 {
        let payloads: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("c{}", chunk * 100 + i).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        pre.batch_publish("consumed", &refs).await.unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for _ in 0..64 {
        let mut c = client.clone();
        let (stop, published, failures) = (stop.clone(), published.clone(), failures.clone());
        publishers.push(tokio::spawn(async move {
            let payload = vec![7u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match c.publish("flood", &payload).await {
                    Ok(_) => published.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("publish failed: {e:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = published.load(Ordering::Relaxed);
    assert!(before > 0, "publishers are running");

    // The consumer on the same connection drains 2,000 messages in windows
    // of 100, acking each, while the flood goes on.
    let mut c = client.clone();
    let mut sub = c
        .subscribe("consumed", "g", proto::InitialPosition::Earliest)
        .await;
    let started = Instant::now();
    let mut got = 0;
    while got < 2000 {
        sub.send(credit(100)).await;
        for _ in 0..100 {
            let d = sub.delivery(Duration::from_secs(10)).await;
            assert_eq!(d.payload.as_ref(), format!("c{got}").as_bytes());
            sub.send(ack(&d.message_id)).await;
            got += 1;
        }
    }
    let took = started.elapsed();
    let during = published.load(Ordering::Relaxed) - before;
    let rss_mb = server.rss_kb() / 1024;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(20), p)
            .await
            .expect("publisher finished")
            .unwrap();
    }
    assert!(took < Duration::from_secs(30), "consumer starved: {took:?}");
    assert!(
        during > 0,
        "publishers kept going while the consumer drained"
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "publishers slow down instead of failing"
    );
    assert!(
        rss_mb < 96,
        "memory stays bounded under a flood: {rss_mb} MiB"
    );
}

/// A consumer that grants plenty of credit and a huge HTTP/2 window, then
/// stops reading its socket: the broker must not buffer the backlog for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_costs_bounded_memory() {
    use bytes::BytesMut;
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("stall", b"warm-up").await.unwrap();

    let (send, mut conn) = raw_h2(server.port, i32::MAX as u32).await;
    let setup = async {
        let mut send = send.ready().await.unwrap();
        let req = grpc_request(server.port, "Subscribe");
        let (resp, mut stream) = send.send_request(req, false).unwrap();
        let mut first = BytesMut::new();
        first.extend_from_slice(&grpc_frame(&init(
            "stall",
            "g",
            proto::InitialPosition::Earliest,
        )));
        first.extend_from_slice(&grpc_frame(&credit(1_000_000)));
        stream.send_data(first.freeze(), false).unwrap();
        let resp = resp.await.unwrap();
        (stream, resp)
    };
    // Drive the connection only until the stream is set up; then never
    // again: nothing more is read from the socket.
    let (_stream, _resp) = tokio::select! {
        r = &mut conn => panic!("connection ended: {r:?}"),
        s = setup => s,
    };
    let before = server.rss_kb();
    // 64 MiB of backlog the stalled consumer is entitled to by credit.
    let payload = vec![3u8; 256 * 1024];
    let refs: Vec<&[u8]> = (0..15).map(|_| payload.as_slice()).collect();
    for _ in 0..17 {
        c.batch_publish("stall", &refs).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_mb = server.rss_kb().saturating_sub(before) / 1024;
    assert!(
        grown_mb < 24,
        "a stalled consumer made the broker hold {grown_mb} MiB"
    );
    // Everyone else is unaffected.
    let t = Instant::now();
    c.publish("other", b"x").await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(conn);
}
