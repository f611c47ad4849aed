mod common;
use common::nats_harness::*;
use sluice::nats::jetstream::{JetStream, StreamConfig};
use sluice::nats::pull_consumer::PullConsumerConfig;
use std::time::{Duration, Instant};

#[test]
fn consumer_after_kill() {
    let mut cluster = Cluster::start("scr");
    let c = connect_ready(&cluster.url(), Duration::from_secs(5));
    let js = JetStream::new(c, Duration::from_secs(5));
    js.create_or_verify_stream(&StreamConfig::new("S", vec!["s.>".into()]).replicas(3))
        .unwrap();
    for i in 0..10 {
        js.publish("s.a", None, format!("{i}").as_bytes()).unwrap();
    }
    let info = js.stream_info("S").unwrap();
    let leader = info.cluster.unwrap().leader.unwrap();
    eprintln!("stream leader {leader}");
    let meta = js.account_info();
    eprintln!("{meta:?}");
    cluster.node_named(&leader).kill();
    let t = Instant::now();
    loop {
        let r = js.create_pull_consumer("S", &PullConsumerConfig::from_sequence("s.a", 1));
        eprintln!(
            "{:?} create: {:?}",
            t.elapsed(),
            r.as_ref().map(|c| c.name.clone())
        );
        if let Ok(ci) = r {
            let f = js.fetch("S", &ci.name, 5, None);
            eprintln!("fetch: {:?}", f.map(|v| v.len()));
            let info = js.stream_info("S").unwrap();
            eprintln!("leader now {:?}", info.cluster.and_then(|c| c.leader));
            if t.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(40) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
