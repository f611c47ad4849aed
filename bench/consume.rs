//! Consume benchmark (`make bench`): drain a 1,000,000-message backlog with
//! a credit window of 1,000 (acking every message, then without acks),
//! publish→delivery latency at 5,000 msg/s, and the slow-consumer run (a
//! 1 msg/s consumer with a 1,000,000-message backlog must cost the broker a
//! cursor, not memory, and must not slow producers).

#[path = "harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use harness::*;
use prost::Message;
use sluice::proto::{
    self, subscribe_downstream::Response as Down, subscribe_upstream::Request as Up,
};

const BACKLOG: u64 = 1_000_000;

fn up(r: Up) -> Bytes {
    frame(&proto::SubscribeUpstream { request: Some(r) })
}

fn init(
    topic: &str,
    group: &str,
    mode: proto::SubscriptionMode,
    pos: proto::InitialPosition,
) -> Bytes {
    up(Up::Init(proto::SubscriptionInit {
        topic: topic.into(),
        consumer_group: group.into(),
        consumer_id: "bench".into(),
        initial_position: pos as i32,
        offset: 0,
        mode: mode as i32,
        ..Default::default()
    }))
}

async fn preload(port: u16, topic: &str, count: u64, size: usize) -> Duration {
    let start = now();
    let mut tasks = Vec::new();
    let per_task = count / 4;
    for _ in 0..4 {
        let mut conn = connect(port).await;
        let topic = topic.to_string();
        tasks.push(tokio::spawn(async move {
            let batch = frame(&proto::BatchPublishRequest {
                topic,
                messages: (0..1000)
                    .map(|_| proto::BatchMessage {
                        payload: vec![b'z'; size].into(),
                        attributes: Default::default(),
                        ..Default::default()
                    })
                    .collect(),
            });
            for _ in 0..per_task / 1000 {
                conn.unary("BatchPublish", batch.clone())
                    .await
                    .expect("preload");
            }
        }));
    }
    for t in tasks {
        t.await.expect("preload task");
    }
    start.elapsed()
}

/// Drains `count` messages with a window of `window` credits, acking each
/// message (one Ack per message) when `ack` is set. Returns msgs/s.
async fn drain(port: u16, topic: &str, group: &str, count: u64, window: u32, ack: bool) -> f64 {
    let mut conn = connect(port).await;
    let (mut tx, mut rx) = conn.stream("Subscribe").await;
    let mode = if ack {
        proto::SubscriptionMode::ConsumerGroup
    } else {
        proto::SubscriptionMode::Browse
    };
    let mut first = BytesMut::new();
    first.extend_from_slice(&init(topic, group, mode, proto::InitialPosition::Earliest));
    first.extend_from_slice(&up(Up::Credit(proto::CreditGrant { credits: window })));
    tx.send_data(first.freeze(), false).expect("init");
    let start = now();
    let mut frames = Frames::new();
    let mut got = 0u64;
    let mut since_grant = 0u32;
    while got < count {
        let chunk = rx.data().await.expect("stream open").expect("data");
        let _ = rx.flow_control().release_capacity(chunk.len());
        frames.push(&chunk);
        let mut out = BytesMut::new();
        while let Some(m) = frames.next() {
            let m = proto::SubscribeDownstream::decode(m).expect("decode");
            if let Some(Down::Delivery(d)) = m.response {
                got += 1;
                since_grant += 1;
                if ack {
                    out.extend_from_slice(&up(Up::Ack(proto::Ack {
                        message_id: d.message_id,
                    })));
                }
            }
        }
        if since_grant >= window / 2 {
            out.extend_from_slice(&up(Up::Credit(proto::CreditGrant {
                credits: since_grant,
            })));
            since_grant = 0;
        }
        if !out.is_empty() {
            tx.send_data(out.freeze(), false).expect("upstream");
        }
    }
    got as f64 / start.elapsed().as_secs_f64()
}

/// Publishes at `rate`/s for `secs` (to `pub_port`) while one subscriber
/// with ample credit (on `sub_port`: another gateway of one JetStream
/// cluster, or the same daemon) measures publish→delivery latency (payload
/// carries the send time); with `ack`, it acks every delivery as it arrives.
async fn latency(pub_port: u16, sub_port: u16, rate: u64, secs: u64, ack: bool) -> Summary {
    let base = Instant::now();
    let mut sconn = connect(sub_port).await;
    let (mut tx, mut rx) = sconn.stream("Subscribe").await;
    let mut first = BytesMut::new();
    first.extend_from_slice(&init(
        "lat",
        "lat",
        proto::SubscriptionMode::ConsumerGroup,
        proto::InitialPosition::Latest,
    ));
    first.extend_from_slice(&up(Up::Credit(proto::CreditGrant { credits: 1_000_000 })));
    tx.send_data(first.freeze(), false).expect("init");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let total = rate * secs;
    let reader = tokio::spawn(async move {
        let mut frames = Frames::new();
        let mut lat = Vec::with_capacity(total as usize);
        while (lat.len() as u64) < total {
            let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), rx.data()).await
            else {
                break;
            };
            let _ = rx.flow_control().release_capacity(chunk.len());
            frames.push(&chunk);
            let mut acks = BytesMut::new();
            while let Some(m) = frames.next() {
                if let Ok(proto::SubscribeDownstream {
                    response: Some(Down::Delivery(d)),
                }) = proto::SubscribeDownstream::decode(m)
                {
                    let sent = u64::from_le_bytes(d.payload[..8].try_into().expect("stamp"));
                    lat.push(base.elapsed().saturating_sub(Duration::from_nanos(sent)));
                    if ack {
                        acks.extend_from_slice(&up(Up::Ack(proto::Ack {
                            message_id: d.message_id,
                        })));
                    }
                }
            }
            if !acks.is_empty() {
                let _ = tx.send_data(acks.freeze(), false);
            }
        }
        drop(tx);
        lat
    });
    let pconn = connect(pub_port).await;
    let start = now();
    let mut ticks = pace(rate, total);
    while let Some(due) = ticks.recv().await {
        let mut c = pconn.clone();
        // Stamped with the scheduled time: generator lag counts against us.
        let mut payload = ((due - base).as_nanos() as u64).to_le_bytes().to_vec();
        payload.resize(256, b'l');
        let body = frame(&proto::PublishRequest {
            topic: "lat".into(),
            payload: payload.into(),
            attributes: Default::default(),
            ..Default::default()
        });
        tokio::spawn(async move {
            let _ = c.unary("Publish", body).await;
        });
    }
    let lat = reader.await.expect("reader");
    let n = lat.len() as u64;
    summarize(lat, n, start.elapsed(), total - n)
}

/// Closed-loop publishing for `secs` with 16 in flight; returns msgs/s.
async fn produce(port: u16, topic: &str, secs: u64) -> f64 {
    let conn = connect(port).await;
    let deadline = now() + Duration::from_secs(secs);
    let body = frame(&proto::PublishRequest {
        topic: topic.into(),
        payload: vec![b'p'; 256].into(),
        attributes: Default::default(),
        ..Default::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = conn.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while now() < deadline {
                if c.unary("Publish", body.clone()).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("producer");
    }
    total as f64 / secs as f64
}

/// (rate, ack) of a latency run: SLUICE_BENCH_LATENCY_RATE (else
/// `default_rate`) and SLUICE_BENCH_ACK=1.
fn latency_settings(default_rate: u64) -> (u64, bool) {
    let rate = std::env::var("SLUICE_BENCH_LATENCY_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_rate);
    (
        rate,
        std::env::var("SLUICE_BENCH_ACK").is_ok_and(|v| v == "1"),
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("machine: {}", machine());
    // `cargo bench --bench consume -- latency` runs only the publish→delivery
    // latency run, against a fresh daemon.
    // SLUICE_BENCH_LATENCY_RATE (default 5000) sets the rate and
    // SLUICE_BENCH_ACK=1 makes the subscriber ack every delivery.
    // `-- latency-across`: publishing through one gateway, subscribed on a
    // second one (both need SLUICE_BENCH_ARGS naming one JetStream cluster).
    if std::env::args().skip(1).any(|a| a == "latency-across") {
        let (rate, ack) = latency_settings(2_000);
        rt.block_on(async {
            let a = Daemon::start("latency-a", &[]);
            let b = Daemon::start("latency-b", &[]);
            // Each gateway learns of the other (presence) before the run.
            tokio::time::sleep(Duration::from_millis(500)).await;
            a.reset_peak();
            b.reset_peak();
            let s = latency(a.port, b.port, rate, 10, ack).await;
            println!(
                "publish (gateway A)→delivery (gateway B) at {rate} msg/s{}: p50 {} ms, p99 {} ms, p999 {} ms ({} delivered, {} missing); peak RSS A {:.1} / B {:.1} MiB",
                if ack { ", acking consumer" } else { "" },
                ms(s.p50),
                ms(s.p99),
                ms(s.p999),
                s.count,
                s.errors,
                a.peak_rss_kb() as f64 / 1024.0,
                b.peak_rss_kb() as f64 / 1024.0
            );
        });
        return;
    }
    if std::env::args().skip(1).any(|a| a == "latency") {
        let (rate, ack) = latency_settings(5_000);
        rt.block_on(async {
            let d = Daemon::start("latency", &[]);
            d.reset_peak();
            let s = latency(d.port, d.port, rate, 5, ack).await;
            println!(
                "publish→delivery at {rate} msg/s{} (fresh daemon): p50 {} ms, p99 {} ms, p999 {} ms ({} delivered, {} missing); peak RSS {:.1} MiB",
                if ack { ", acking consumer" } else { "" },
                ms(s.p50),
                ms(s.p99),
                ms(s.p999),
                s.count,
                s.errors,
                d.peak_rss_kb() as f64 / 1024.0
            );
        });
        return;
    }
    rt.block_on(async {
        let d = Daemon::start("consume", &[]);
        let took = preload(d.port, "backlog", BACKLOG, 100).await;
        println!("preloaded {BACKLOG} × 100 B in {took:?}");
        println!();
        println!("| run | msgs/s | peak RSS MiB |");
        println!("|---|---|---|");
        d.reset_peak();
        let r = drain(d.port, "backlog", "acking", BACKLOG, 1000, true).await;
        println!("| drain 1,000,000, window 1,000, Ack per message | {r:.0} | {:.1} |", d.peak_rss_kb() as f64 / 1024.0);
        d.reset_peak();
        let r = drain(d.port, "backlog", "browse", BACKLOG, 1000, false).await;
        println!("| drain 1,000,000, window 1,000, no acks (BROWSE) | {r:.0} | {:.1} |", d.peak_rss_kb() as f64 / 1024.0);
        let s = latency(d.port, d.port, 5_000, 5, false).await;
        println!();
        println!(
            "publish→delivery at 5,000 msg/s: p50 {} ms, p99 {} ms, p999 {} ms ({} delivered, {} missing)",
            ms(s.p50),
            ms(s.p99),
            ms(s.p999),
            s.count,
            s.errors
        );
        drop(d);

        // Slow consumer: baseline producer rate, then the same with a 1 msg/s
        // consumer holding a 1,000,000-message backlog open.
        let d = Daemon::start("slow", &[]);
        preload(d.port, "slow", BACKLOG, 100).await;
        let base = produce(d.port, "other", 5).await;
        let mut conn = connect(d.port).await;
        let (mut tx, mut rx) = conn.stream("Subscribe").await;
        tx.send_data(init("slow", "slow", proto::SubscriptionMode::ConsumerGroup, proto::InitialPosition::Earliest), false)
            .expect("init");
        let slow = tokio::spawn(async move {
            let mut frames = Frames::new();
            let mut got = 0;
            for _ in 0..15 {
                tx.send_data(up(Up::Credit(proto::CreditGrant { credits: 1 })), false).expect("credit");
                if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(1), rx.data()).await {
                    let _ = rx.flow_control().release_capacity(chunk.len());
                    frames.push(&chunk);
                    while frames.next().is_some() {
                        got += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            got
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_before = d.rss_kb();
        d.reset_peak();
        // Two producer runs while the slow consumer is attached, then one
        // more without it: the two runs alone show this machine's noise.
        let with1 = produce(d.port, "other", 5).await;
        let with2 = produce(d.port, "other", 5).await;
        let peak = d.peak_rss_kb();
        let received = slow.await.expect("slow consumer");
        let base2 = produce(d.port, "other", 5).await;
        let (alone, with) = ((base + base2) / 2.0, (with1 + with2) / 2.0);
        println!();
        println!("slow consumer (1 msg/s, backlog {BACKLOG}): received {received} in 15 s");
        println!(
            "  producer alone {base:.0} and {base2:.0} msg/s (runs differ by {:.1}%); with the slow consumer {with1:.0} and {with2:.0} msg/s; means {alone:.0} vs {with:.0} ({:+.1}%)",
            ((base - base2) / alone).abs() * 100.0,
            (with / alone - 1.0) * 100.0
        );
        println!(
            "  server RSS {:.1} MiB before the producer run, peak {:.1} MiB during it",
            rss_before as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    });
}
