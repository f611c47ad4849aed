//! Publish benchmark (`make bench`): durable unary Publish at several
//! concurrency levels, an open-loop run at a fixed rate, and BatchPublish.
//! Reports msgs/s, p50/p99/p999 latency and the daemon's RSS. The load
//! generator shares the machine with the daemon.

#[path = "harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harness::*;
use sluice::proto;

/// How long each run lasts: 5 s, or `SLUICE_BENCH_SECS` (longer runs
/// average out this VM's swings when comparing two builds).
fn run_for() -> Duration {
    let secs = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

fn publish_body(size: usize) -> Bytes {
    frame(&proto::PublishRequest {
        topic: "bench".into(),
        payload: vec![b'x'; size].into(),
        attributes: Default::default(),
        ..Default::default()
    })
}

/// Makes the body of call `n` (unique across the run's tasks).
type BodyFn = Arc<dyn Fn(u64) -> Bytes + Send + Sync>;

/// The same body for every call.
fn same(body: Bytes) -> BodyFn {
    Arc::new(move |_| body.clone())
}

/// A unary Publish of 256 B built for each call, with a fresh idempotency
/// key when `keyed` (the rows with and without keys then cost the load
/// generator the same).
fn built_publish(keyed: bool) -> BodyFn {
    Arc::new(move |n| {
        frame(&proto::PublishRequest {
            topic: "bench".into(),
            payload: vec![b'x'; 256].into(),
            idempotency_key: if keyed {
                format!("key-{n}")
            } else {
                String::new()
            },
            ..Default::default()
        })
    })
}

/// A BatchPublish of 100 × 256 B built for each call, each message with a
/// fresh key when `keyed`.
fn built_batch(keyed: bool) -> BodyFn {
    Arc::new(move |n| {
        frame(&proto::BatchPublishRequest {
            topic: "bench-batch".into(),
            messages: (0..100)
                .map(|i| proto::BatchMessage {
                    payload: vec![b'y'; 256].into(),
                    idempotency_key: if keyed {
                        format!("key-{n}-{i}")
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })
                .collect(),
        })
    })
}

/// `conns` connections × `per_conn` calls in flight, for `run_for()`.
async fn closed_loop(
    port: u16,
    conns: usize,
    per_conn: usize,
    method: &'static str,
    body: BodyFn,
    msgs_per_call: u64,
) -> Summary {
    let start = now();
    let deadline = start + run_for();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let conn = connect(port).await;
        for k in 0..per_conn {
            let mut conn = conn.clone();
            let body = body.clone();
            let task = (c * per_conn + k) as u64;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                let mut n = 0u64;
                while now() < deadline {
                    let this = body(task << 40 | n);
                    n += 1;
                    let t = now();
                    match conn.unary(method, this).await {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    let calls = all.len() as u64;
    summarize(all, calls * msgs_per_call, start.elapsed(), errors)
}

/// Calls started at a fixed rate regardless of replies (open loop).
async fn open_loop(port: u16, rate: u64) -> Summary {
    let conn = connect(port).await;
    let body = publish_body(256);
    let start = now();
    let total = rate * run_for().as_secs();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut ticks = pace(rate, total);
    while let Some(due) = ticks.recv().await {
        let mut conn = conn.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            // Latency from the scheduled start: generator lag counts against us.
            let r = conn.unary("Publish", body).await;
            (r.is_ok(), due.elapsed())
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (ok, d) = t.await.expect("task");
        if ok {
            lat.push(d);
        } else {
            errors += 1;
        }
    }
    let n = lat.len() as u64;
    summarize(lat, n, start.elapsed(), errors)
}

fn report(name: &str, s: &Summary, daemon: &Daemon) {
    println!(
        "| {name} | {:.0} | {} | {} | {} | {} | {:.1} |",
        s.rate(),
        ms(s.p50),
        ms(s.p99),
        ms(s.p999),
        s.errors,
        daemon.peak_rss_kb() as f64 / 1024.0
    );
}

/// The runs, each against a fresh daemon (fresh data dir), so one run's
/// backlog and checkpoints do not colour the next one's latencies.
#[derive(Clone, Copy)]
enum Load {
    Closed {
        conns: usize,
        per_conn: usize,
        batch: bool,
        /// None: one prebuilt body; Some(keyed): built per call.
        keyed: Option<bool>,
    },
    Open {
        rate: u64,
    },
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("machine: {}", machine());
    {
        let d = Daemon::start("publish-idle", &[]);
        std::thread::sleep(Duration::from_millis(500));
        println!("idle RSS: {:.1} MiB", d.rss_kb() as f64 / 1024.0);
    }
    println!();
    println!("| run | msgs/s | p50 ms | p99 ms | p999 ms | errors | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    let batch = frame(&proto::BatchPublishRequest {
        topic: "bench-batch".into(),
        messages: (0..100)
            .map(|_| proto::BatchMessage {
                payload: vec![b'y'; 256].into(),
                attributes: Default::default(),
                ..Default::default()
            })
            .collect(),
    });
    let runs = [
        (
            "unary 256 B, 1 in flight",
            Load::Closed {
                conns: 1,
                per_conn: 1,
                batch: false,
                keyed: None,
            },
        ),
        (
            "unary 256 B, 16 in flight (1 conn)",
            Load::Closed {
                conns: 1,
                per_conn: 16,
                batch: false,
                keyed: None,
            },
        ),
        (
            "unary 256 B, 64 in flight (4 conns)",
            Load::Closed {
                conns: 4,
                per_conn: 16,
                batch: false,
                keyed: None,
            },
        ),
        (
            "unary 256 B, 256 in flight (4 conns)",
            Load::Closed {
                conns: 4,
                per_conn: 64,
                batch: false,
                keyed: None,
            },
        ),
        (
            "unary 256 B, 64 in flight (4 conns), built per call, no key",
            Load::Closed {
                conns: 4,
                per_conn: 16,
                batch: false,
                keyed: Some(false),
            },
        ),
        (
            "unary 256 B, 64 in flight (4 conns), built per call, a fresh idempotency key each",
            Load::Closed {
                conns: 4,
                per_conn: 16,
                batch: false,
                keyed: Some(true),
            },
        ),
        ("unary 256 B, open loop 5,000/s", Load::Open { rate: 5_000 }),
        (
            "BatchPublish 100 × 256 B, 1 in flight",
            Load::Closed {
                conns: 1,
                per_conn: 1,
                batch: true,
                keyed: None,
            },
        ),
        (
            "BatchPublish 100 × 256 B, 8 in flight",
            Load::Closed {
                conns: 2,
                per_conn: 4,
                batch: true,
                keyed: None,
            },
        ),
        (
            "BatchPublish 100 × 256 B, 8 in flight, built per call, no key",
            Load::Closed {
                conns: 2,
                per_conn: 4,
                batch: true,
                keyed: Some(false),
            },
        ),
        (
            "BatchPublish 100 × 256 B, 8 in flight, built per call, a fresh idempotency key each",
            Load::Closed {
                conns: 2,
                per_conn: 4,
                batch: true,
                keyed: Some(true),
            },
        ),
    ];
    // `cargo bench --bench publish -- <text>` runs only the rows whose name
    // contains <text> (cargo passes `--bench` itself; skip flags).
    let only = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for (name, load) in runs {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let daemon = Daemon::start("publish", &[]);
        let port = daemon.port;
        let s = rt.block_on(async {
            match load {
                Load::Closed {
                    conns,
                    per_conn,
                    batch: false,
                    keyed,
                } => {
                    let body = match keyed {
                        Some(keyed) => built_publish(keyed),
                        None => same(publish_body(256)),
                    };
                    closed_loop(port, conns, per_conn, "Publish", body, 1).await
                }
                Load::Closed {
                    conns,
                    per_conn,
                    batch: true,
                    keyed,
                } => {
                    let body = match keyed {
                        Some(keyed) => built_batch(keyed),
                        None => same(batch.clone()),
                    };
                    closed_loop(port, conns, per_conn, "BatchPublish", body, 100).await
                }
                Load::Open { rate } => open_loop(port, rate).await,
            }
        });
        report(name, &s, &daemon);
    }
}
