//! Sustained-load benchmark (issue 15, `make bench-sustained`): does the
//! daemon hold its speed and tail latency for minutes, not just the 5 s rows
//! of `bench/publish.rs`? Each scenario runs against the release daemon and
//! writes one CSV row per second, plus a JSON file with the aims, which
//! `bench/plot_sustained.py` turns into a PNG.
//!
//! `cargo bench --bench sustained -- <scenario>…` with scenarios:
//!   batch     BatchPublish 100 × 256 B, 8 in flight (2 conns × 4), closed loop
//!   unary     unary Publish 256 B, 64 in flight (4 conns × 16), closed loop
//!   openloop  unary Publish 256 B at a fixed rate (open loop) with one
//!             consumer-group subscriber acking every delivery, daemon run
//!             with --retention-max-messages: publish→delivery latency and
//!             the data dir's size per second
//!   fill      fills SLUICE_BENCH_DATA_DIR with SLUICE_BENCH_FILL_MESSAGES
//!             (topic `fill`) for the large-store runs; no CSV
//! No scenario named (as in a plain `cargo bench`, i.e. `make bench`): nothing
//! runs.
//!
//! Environment:
//!   SLUICE_BENCH_OUT                 where CSV and JSON go (default target/bench-sustained)
//!   SLUICE_BENCH_SUSTAINED_SECS      length of batch and unary (default 60)
//!   SLUICE_BENCH_OPENLOOP_SECS       length of openloop (default 600)
//!   SLUICE_BENCH_OPENLOOP_RATE       openloop messages per second (default 5000)
//!   SLUICE_BENCH_OPENLOOP_RETENTION  its --retention-max-messages (default 1000000)
//!   SLUICE_BENCH_DATA_DIR            batch, unary and fill use this data dir as it is (created
//!                                    if missing, never removed) instead of a fresh one
//!   SLUICE_BENCH_FILL_MESSAGES       messages `fill` adds (default 50000000, 256 B each)
//!
//! Every row's second is the window [second, second + 1) from the start of
//! the run. Closed loop: a call counts in the second it completed. Open loop:
//! a message counts in the second it was due (its scheduled send time), and
//! both its publish latency and its publish→delivery latency are measured
//! from that time, so generator lag counts against the daemon.
//! The aims are checked and printed as PASS/FAIL; they never fail the run.

#[path = "harness.rs"]
mod harness;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use harness::*;
use prost::Message;
use sluice::proto::{
    self, subscribe_downstream::Response as Down, subscribe_upstream::Request as Up,
};

const MSG: usize = 256;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        _ => default,
    }
}

fn out_dir() -> PathBuf {
    let dir = std::env::var("SLUICE_BENCH_OUT")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-sustained"));
    std::fs::create_dir_all(&dir).expect("output dir");
    dir
}

/// The pre-filled data dir, if one is named.
fn data_dir() -> Option<PathBuf> {
    std::env::var("SLUICE_BENCH_DATA_DIR")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn start_daemon(name: &str, extra: &[&str], reuse: bool) -> Daemon {
    match data_dir().filter(|_| reuse) {
        Some(dir) => {
            let d = Daemon::start_in(dir, extra);
            println!(
                "data dir {} (kept): {:.1} MiB at start; started in {:.1} ms, RSS {:.1} MiB",
                d.dir.display(),
                d.data_bytes() as f64 / (1 << 20) as f64,
                d.startup.as_secs_f64() * 1e3,
                d.rss_kb() as f64 / 1024.0
            );
            d
        }
        None => {
            let d = Daemon::start(name, extra);
            println!(
                "fresh data dir: started in {:.1} ms, RSS {:.1} MiB",
                d.startup.as_secs_f64() * 1e3,
                d.rss_kb() as f64 / 1024.0
            );
            d
        }
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Latencies (ns) of one second, from the calls that fell in it.
type PerSecond = Vec<Vec<u64>>;

fn merge(into: &mut PerSecond, from: PerSecond) {
    for (a, b) in into.iter_mut().zip(from) {
        a.extend(b);
    }
}

/// Nearest-rank quantile of sorted latencies, as `harness::summarize` takes it.
fn q(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)])
}

fn ms_of(ns: Option<u64>) -> String {
    ns.map_or(String::new(), |v| format!("{:.3}", v as f64 / 1e6))
}

/// The quantiles of one second (or of a whole run).
#[derive(Clone, Copy, Default)]
struct Quantiles {
    n: u64,
    p50: Option<u64>,
    p99: Option<u64>,
    p999: Option<u64>,
    max: Option<u64>,
}

fn quantiles(lat: &mut [u64]) -> Quantiles {
    lat.sort_unstable();
    Quantiles {
        n: lat.len() as u64,
        p50: q(lat, 0.50),
        p99: q(lat, 0.99),
        p999: q(lat, 0.999),
        max: lat.last().copied(),
    }
}

/// Samples the daemon's data dir size and RSS at the end of every second on
/// a thread of its own (the runtime's thread is busy with the load), and
/// prints progress every 10 s from `done` (messages completed so far).
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(u64, u64)>>,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Sampler {
    /// Samples from the instant `start` brings (when the load starts).
    fn start(
        d: &Daemon,
        start: std::sync::mpsc::Receiver<Instant>,
        secs: u64,
        done: Arc<AtomicU64>,
    ) -> Sampler {
        let (dir, pid) = (d.dir.clone(), d.child.id());
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::with_capacity(secs as usize);
            let Ok(start) = start.recv() else {
                return samples;
            };
            let mut last_done = 0;
            for s in 1..=secs {
                let at = start + Duration::from_secs(s);
                while Instant::now() < at {
                    if stop2.load(Ordering::Relaxed) {
                        return samples;
                    }
                    std::thread::sleep(
                        at.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(100)),
                    );
                }
                let (bytes, rss) = (dir_bytes(&dir), rss_kb(pid));
                samples.push((bytes, rss));
                if s.is_multiple_of(10) || s == secs {
                    let n = done.load(Ordering::Relaxed);
                    let span = if s.is_multiple_of(10) { 10 } else { s % 10 };
                    eprintln!(
                        "  {s:>4} s: {:.0} msgs/s over the last {span} s, data dir {:.1} MiB, RSS {:.1} MiB",
                        (n - last_done) as f64 / span as f64,
                        bytes as f64 / (1 << 20) as f64,
                        rss as f64 / 1024.0
                    );
                    last_done = n;
                }
            }
            samples
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler")
    }
}

/// An aim drawn as a line on one of the plot's panels.
struct Line {
    panel: &'static str,
    value: f64,
    label: String,
}

/// One scenario's output: CSV, JSON (title, aims, marks, summary), and the
/// PASS/FAIL lines on stdout.
struct Report {
    scenario: &'static str,
    title: String,
    header: &'static str,
    rows: Vec<String>,
    lines: Vec<Line>,
    /// Vertical marks (second, label).
    marks: Vec<(f64, String)>,
    summary: Vec<String>,
    verdicts: Vec<(bool, String)>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("json")
}

impl Report {
    fn write(&self, started: &str, secs: u64) {
        let dir = out_dir();
        let mut csv = String::new();
        csv.push_str(self.header);
        csv.push('\n');
        for r in &self.rows {
            csv.push_str(r);
            csv.push('\n');
        }
        let csv_path = dir.join(format!("{}.csv", self.scenario));
        std::fs::write(&csv_path, csv).expect("write csv");
        let mut json = String::new();
        let _ = writeln!(json, "{{");
        let _ = writeln!(json, "  \"scenario\": {},", json_str(self.scenario));
        let _ = writeln!(json, "  \"title\": {},", json_str(&self.title));
        let _ = writeln!(json, "  \"machine\": {},", json_str(&machine()));
        let _ = writeln!(json, "  \"started\": {},", json_str(started));
        let _ = writeln!(json, "  \"seconds\": {secs},");
        let aims: Vec<String> = self
            .lines
            .iter()
            .map(|l| {
                format!(
                    "{{\"panel\": {}, \"value\": {}, \"label\": {}}}",
                    json_str(l.panel),
                    l.value,
                    json_str(&l.label)
                )
            })
            .collect();
        let _ = writeln!(json, "  \"aims\": [{}],", aims.join(", "));
        let marks: Vec<String> = self
            .marks
            .iter()
            .map(|(at, label)| format!("{{\"at\": {at}, \"label\": {}}}", json_str(label)))
            .collect();
        let _ = writeln!(json, "  \"marks\": [{}],", marks.join(", "));
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(ok, what)| json_str(&format!("{} {what}", if *ok { "PASS" } else { "FAIL" })))
            .collect();
        let _ = writeln!(json, "  \"verdicts\": [{}]", verdicts.join(", "));
        let _ = writeln!(json, "}}");
        std::fs::write(dir.join(format!("{}.json", self.scenario)), json).expect("write json");

        for l in &self.summary {
            println!("{l}");
        }
        println!();
        for (ok, what) in &self.verdicts {
            println!("aim {}: {what}", if *ok { "PASS" } else { "FAIL" });
        }
        println!("per-second series: {}", csv_path.display());
        println!();
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

// ---------------------------------------------------------------------------
// Closed loop: batch and unary.

struct Closed {
    lat: PerSecond,
    errors: Vec<u64>,
}

/// A closed-loop load: `conns` × `per_conn` calls in flight for `secs`, the
/// same body each call.
struct Load {
    conns: usize,
    per_conn: usize,
    method: &'static str,
    body: Bytes,
    msgs_per_call: u64,
    secs: u64,
}

async fn closed_loop(
    port: u16,
    load: Load,
    start_tx: std::sync::mpsc::Sender<Instant>,
    done: Arc<AtomicU64>,
) -> Closed {
    let Load {
        conns,
        per_conn,
        method,
        body,
        msgs_per_call,
        secs,
    } = load;
    let mut connections = Vec::new();
    for _ in 0..conns {
        connections.push(connect(port).await);
    }
    let start = now();
    let _ = start_tx.send(start);
    let deadline = start + Duration::from_secs(secs);
    let last = secs as usize - 1;
    let mut tasks = Vec::new();
    for conn in &connections {
        for _ in 0..per_conn {
            let (mut conn, body, done) = (conn.clone(), body.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat: PerSecond = vec![Vec::new(); secs as usize];
                let mut errors = vec![0u64; secs as usize];
                while now() < deadline {
                    let t = now();
                    let r = conn.unary(method, body.clone()).await;
                    let end = now();
                    // A call that ends after the deadline counts in the last second.
                    let s = ((end - start).as_secs() as usize).min(last);
                    match r {
                        Ok(_) => {
                            lat[s].push((end - t).as_nanos() as u64);
                            done.fetch_add(msgs_per_call, Ordering::Relaxed);
                        }
                        Err(_) => errors[s] += 1,
                    }
                }
                (lat, errors)
            }));
        }
    }
    let mut all = Closed {
        lat: vec![Vec::new(); secs as usize],
        errors: vec![0; secs as usize],
    };
    for t in tasks {
        let (l, e) = t.await.expect("task");
        merge(&mut all.lat, l);
        for (a, b) in all.errors.iter_mut().zip(e) {
            *a += b;
        }
    }
    close(connections).await;
    all
}

/// Drops the connections and lets their tasks close them, so the daemon's
/// SIGTERM finds no client left and stops at once (no grace period).
async fn close<T>(conns: T) {
    drop(conns);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A framed BatchPublish of `n` messages of `MSG` bytes of `fill` to `topic`.
fn batch_of(topic: &str, n: u64, fill: u8) -> Bytes {
    frame(&proto::BatchPublishRequest {
        topic: topic.into(),
        messages: (0..n)
            .map(|_| proto::BatchMessage {
                payload: vec![fill; MSG].into(),
                ..Default::default()
            })
            .collect(),
    })
}

fn batch_body() -> Bytes {
    batch_of("sustained-batch", 100, b'y')
}

fn unary_body() -> Bytes {
    frame(&proto::PublishRequest {
        topic: "sustained-unary".into(),
        payload: vec![b'x'; MSG].into(),
        ..Default::default()
    })
}

fn run_closed(rt: &tokio::runtime::Runtime, batch: bool) {
    let secs: u64 = env_or("SLUICE_BENCH_SUSTAINED_SECS", 60);
    assert!(secs > 0, "SLUICE_BENCH_SUSTAINED_SECS must be positive");
    let (scenario, name, conns, per_conn, method, body, per_call) = if batch {
        (
            "batch",
            format!("BatchPublish 100 × 256 B, 8 in flight, {secs} s"),
            2,
            4,
            "BatchPublish",
            batch_body(),
            100,
        )
    } else {
        (
            "unary",
            format!("unary 256 B, 64 in flight (4 conns), {secs} s"),
            4,
            16,
            "Publish",
            unary_body(),
            1,
        )
    };
    println!("== {scenario}: {name}");
    let started = utc_now();
    let d = start_daemon(&format!("sustained-{scenario}"), &[], true);
    d.reset_peak();
    let done = Arc::new(AtomicU64::new(0));
    let (start_tx, start_rx) = std::sync::mpsc::channel();
    let sampler = Sampler::start(&d, start_rx, secs, done.clone());
    let res = rt.block_on(closed_loop(
        d.port,
        Load {
            conns,
            per_conn,
            method,
            body,
            msgs_per_call: per_call,
            secs,
        },
        start_tx,
        done,
    ));
    let samples = sampler.finish();
    let peak_rss = d.peak_rss_kb();
    drop(d);

    let mut rows = Vec::new();
    let mut rates = Vec::new();
    let mut all = Vec::new();
    for (s, mut lat) in res.lat.into_iter().enumerate() {
        let qs = quantiles(&mut lat);
        let msgs = qs.n * per_call;
        rates.push(msgs as f64);
        let (bytes, rss) = samples.get(s).copied().unwrap_or_default();
        rows.push(format!(
            "{s},{msgs},{},{},{},{},{},{bytes},{rss}",
            ms_of(qs.p50),
            ms_of(qs.p99),
            ms_of(qs.p999),
            ms_of(qs.max),
            res.errors[s]
        ));
        all.extend(lat);
    }
    let errors: u64 = res.errors.iter().sum();
    let whole = quantiles(&mut all);
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let (min_s, min) = rates
        .iter()
        .copied()
        .enumerate()
        .fold((0, f64::MAX), |m, (i, r)| if r < m.1 { (i, r) } else { m });
    let worst_p999 = ms_of(whole.p999);
    let mut summary = vec![
        "| run | msgs/s | p50 ms | p99 ms | p999 ms | max ms | slowest second msgs/s | errors | peak RSS MiB |".to_string(),
        "|---|---|---|---|---|---|---|---|---|".to_string(),
        format!(
            "| {name} | {mean:.0} | {} | {} | {worst_p999} | {} | {min:.0} (second {min_s}) | {errors} | {:.1} |",
            ms_of(whole.p50),
            ms_of(whole.p99),
            ms_of(whole.max),
            peak_rss as f64 / 1024.0
        ),
    ];
    if batch {
        summary.push("(latency per call of 100 messages)".into());
    }
    let p999_ms = whole.p999.unwrap_or(u64::MAX) as f64 / 1e6;
    let (lines, verdicts) = if batch {
        (
            vec![
                Line {
                    panel: "msgs",
                    value: 500_000.0,
                    label: "aim: mean ≥ 500k msg/s".into(),
                },
                Line {
                    panel: "msgs",
                    value: 300_000.0,
                    label: "aim: every second ≥ 300k".into(),
                },
                Line {
                    panel: "latency",
                    value: 10.0,
                    label: "aim: p999 ≤ 10 ms".into(),
                },
            ],
            vec![
                (
                    mean >= 500_000.0,
                    format!("mean ≥ 500,000 msg/s: {mean:.0}"),
                ),
                (
                    min >= 300_000.0,
                    format!("no second below 300,000 msg/s: slowest {min:.0} (second {min_s})"),
                ),
                (
                    p999_ms <= 10.0,
                    format!("per-call p999 ≤ 10 ms: {worst_p999} ms"),
                ),
            ],
        )
    } else {
        let first = &rates[..rates.len().min(10)];
        let first_mean = first.iter().sum::<f64>() / first.len() as f64;
        let floor = 0.85 * first_mean;
        (
            vec![
                Line {
                    panel: "msgs",
                    value: floor,
                    label: format!("aim: every second ≥ 85 % of the first {} s", first.len()),
                },
                Line {
                    panel: "latency",
                    value: 3.0,
                    label: "aim: p999 ≤ 3 ms".into(),
                },
            ],
            vec![
                (
                    min >= floor,
                    format!(
                        "no second below 85 % of the first {} s' mean ({first_mean:.0}, floor {floor:.0}): slowest {min:.0} (second {min_s}, {:.0} %)",
                        first.len(),
                        min / first_mean * 100.0
                    ),
                ),
                (p999_ms <= 3.0, format!("p999 ≤ 3 ms: {worst_p999} ms")),
            ],
        )
    };
    Report {
        scenario,
        title: name,
        header: "second,msgs,p50_ms,p99_ms,p999_ms,max_ms,errors,data_dir_bytes,rss_kb",
        rows,
        lines,
        marks: Vec::new(),
        summary,
        verdicts,
    }
    .write(&started, secs);
}

// ---------------------------------------------------------------------------
// Open loop with an acking consumer and retention.

fn up(r: Up) -> Bytes {
    frame(&proto::SubscribeUpstream { request: Some(r) })
}

const OPEN_TOPIC: &str = "sustained-open";
/// The subscriber's credit window, topped up as it drains.
const WINDOW: u32 = 10_000;

/// Messages the topic holds now, from GetTopicStats.
async fn kept_messages(port: u16, topic: &str) -> Option<u64> {
    let mut conn = connect(port).await;
    let body = conn
        .unary(
            "GetTopicStats",
            frame(&proto::GetTopicStatsRequest {
                topics: vec![topic.into()],
            }),
        )
        .await
        .ok()?;
    let resp = proto::GetTopicStatsResponse::decode(body).ok()?;
    resp.stats.first().map(|s| s.total_messages)
}

struct Open {
    publish: PerSecond,
    e2e: PerSecond,
    errors: Vec<u64>,
    sent: u64,
    delivered: u64,
    kept: Option<u64>,
}

async fn open_loop(
    port: u16,
    rate: u64,
    secs: u64,
    start_tx: std::sync::mpsc::Sender<Instant>,
    done: Arc<AtomicU64>,
) -> Open {
    let total = rate * secs;
    let n = secs as usize;
    let last = n - 1;
    let mut sconn = connect(port).await;
    let (mut tx, mut rx) = sconn.stream("Subscribe").await;
    let mut first = BytesMut::new();
    first.extend_from_slice(&up(Up::Init(proto::SubscriptionInit {
        topic: OPEN_TOPIC.into(),
        consumer_group: "sustained".into(),
        consumer_id: "bench".into(),
        initial_position: proto::InitialPosition::Latest as i32,
        mode: proto::SubscriptionMode::ConsumerGroup as i32,
        ..Default::default()
    })));
    first.extend_from_slice(&up(Up::Credit(proto::CreditGrant { credits: WINDOW })));
    tx.send_data(first.freeze(), false).expect("init");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pconn = connect(port).await;

    let base = now();
    let _ = start_tx.send(base);
    let reader = tokio::spawn(async move {
        let mut frames = Frames::new();
        let mut e2e: PerSecond = vec![Vec::new(); n];
        let mut got = 0u64;
        let mut since_grant = 0u32;
        while got < total {
            let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), rx.data()).await
            else {
                break;
            };
            let _ = rx.flow_control().release_capacity(chunk.len());
            frames.push(&chunk);
            let mut out = BytesMut::new();
            while let Some(m) = frames.next() {
                if let Ok(proto::SubscribeDownstream {
                    response: Some(Down::Delivery(d)),
                }) = proto::SubscribeDownstream::decode(m)
                {
                    let due = u64::from_le_bytes(d.payload[..8].try_into().expect("stamp"));
                    let s = ((due / 1_000_000_000) as usize).min(last);
                    let at = base.elapsed().as_nanos() as u64;
                    e2e[s].push(at.saturating_sub(due));
                    got += 1;
                    since_grant += 1;
                    out.extend_from_slice(&up(Up::Ack(proto::Ack {
                        message_id: d.message_id,
                    })));
                }
            }
            if since_grant >= WINDOW / 2 {
                out.extend_from_slice(&up(Up::Credit(proto::CreditGrant {
                    credits: since_grant,
                })));
                since_grant = 0;
            }
            if !out.is_empty() {
                let _ = tx.send_data(out.freeze(), false);
            }
        }
        drop(tx);
        (e2e, got)
    });

    // (second due, publish latency) or an error in that second.
    let results: Arc<Mutex<(PerSecond, Vec<u64>)>> =
        Arc::new(Mutex::new((vec![Vec::new(); n], vec![0; n])));
    let finished = Arc::new(AtomicU64::new(0));
    let mut ticks = pace(rate, total);
    while let Some(due) = ticks.recv().await {
        let offset = due.saturating_duration_since(base);
        let s = (offset.as_secs() as usize).min(last);
        // Stamped with the scheduled time: generator lag counts against us.
        let mut payload = (offset.as_nanos() as u64).to_le_bytes().to_vec();
        payload.resize(MSG, b'o');
        let body = frame(&proto::PublishRequest {
            topic: OPEN_TOPIC.into(),
            payload: payload.into(),
            ..Default::default()
        });
        let (mut c, results, finished, done) = (
            pconn.clone(),
            results.clone(),
            finished.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let r = c.unary("Publish", body).await;
            let lat = due.elapsed().as_nanos() as u64;
            {
                let mut g = results.lock().unwrap();
                match r {
                    Ok(_) => {
                        g.0[s].push(lat);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => g.1[s] += 1,
                }
            }
            finished.fetch_add(1, Ordering::Relaxed);
        });
    }
    let until = now() + Duration::from_secs(30);
    while finished.load(Ordering::Relaxed) < total && now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (e2e, delivered) = reader.await.expect("reader");
    let kept = kept_messages(port, OPEN_TOPIC).await;
    close((pconn, sconn)).await;
    let (publish, mut errors) = std::mem::take(&mut *results.lock().unwrap());
    // Calls that never answered count as errors of the last second.
    errors[last] += total - finished.load(Ordering::Relaxed);
    Open {
        publish,
        e2e,
        errors,
        sent: total,
        delivered,
        kept,
    }
}

fn run_open(rt: &tokio::runtime::Runtime) {
    let secs: u64 = env_or("SLUICE_BENCH_OPENLOOP_SECS", 600);
    let rate: u64 = env_or("SLUICE_BENCH_OPENLOOP_RATE", 5_000);
    let keep: u64 = env_or("SLUICE_BENCH_OPENLOOP_RETENTION", 1_000_000);
    assert!(
        secs > 0 && rate > 0 && keep > 0,
        "openloop settings must be positive"
    );
    let name = format!(
        "open loop {rate} msg/s × 256 B, acking consumer, --retention-max-messages {keep}, {secs} s"
    );
    println!("== openloop: {name}");
    if data_dir().is_some() {
        // Retention would trim the pre-filled store's topics too.
        println!("(SLUICE_BENCH_DATA_DIR is not used here: openloop runs with retention on a fresh data dir)");
    }
    let started = utc_now();
    let keep_arg = keep.to_string();
    let d = start_daemon(
        "sustained-openloop",
        &["--retention-max-messages", &keep_arg],
        false,
    );
    d.reset_peak();
    let done = Arc::new(AtomicU64::new(0));
    let (start_tx, start_rx) = std::sync::mpsc::channel();
    let sampler = Sampler::start(&d, start_rx, secs, done.clone());
    let res = rt.block_on(open_loop(d.port, rate, secs, start_tx, done));
    let samples = sampler.finish();
    let peak_rss = d.peak_rss_kb();
    drop(d);

    // Retention starts trimming once the topic holds `keep` messages.
    let trims_from = keep as f64 / rate as f64;
    let mut rows = Vec::new();
    let mut all_pub = Vec::new();
    let mut all_e2e = Vec::new();
    let mut worst = (0usize, 0u64);
    let mut seconds_over = 0;
    for (s, (mut p, mut e)) in res.publish.into_iter().zip(res.e2e).enumerate() {
        let qp = quantiles(&mut p);
        let qe = quantiles(&mut e);
        let (bytes, rss) = samples.get(s).copied().unwrap_or_default();
        if let Some(p99) = qe.p99 {
            if p99 > worst.1 {
                worst = (s, p99);
            }
            if p99 > 1_000_000 {
                seconds_over += 1;
            }
        }
        rows.push(format!(
            "{s},{},{},{},{},{},{},{},{},{},{},{bytes},{rss}",
            qp.n,
            ms_of(qp.p50),
            ms_of(qp.p99),
            ms_of(qp.p999),
            ms_of(qp.max),
            res.errors[s],
            qe.n,
            ms_of(qe.p50),
            ms_of(qe.p99),
            ms_of(qe.max),
        ));
        all_pub.extend(p);
        all_e2e.extend(e);
    }
    let errors: u64 = res.errors.iter().sum();
    let qp = quantiles(&mut all_pub);
    let qe = quantiles(&mut all_e2e);
    let bytes: Vec<u64> = samples.iter().map(|s| s.0).collect();

    // Flat once retention trims: from a while after trimming starts (a
    // quarter of the time the topic took to fill, plus 10 s: the first
    // deletions' free pages must be reused before the file stops growing), the
    // largest size in the second half of that stretch against the first half.
    let steady_from = (trims_from * 1.25 + 10.0).ceil() as usize;
    let flat = if bytes.len() >= steady_from + 20 {
        let steady = &bytes[steady_from..];
        let (a, b) = steady.split_at(steady.len() / 2);
        let (ma, mb) = (*a.iter().max().unwrap_or(&0), *b.iter().max().unwrap_or(&0));
        let growth = mb as f64 / ma.max(1) as f64 - 1.0;
        Some((
            growth <= 0.10,
            format!(
                "data dir flat once retention trims (largest size in seconds {steady_from}–{} vs {}–{}, growth ≤ 10 %): {:.1} → {:.1} MiB ({:+.1} %)",
                steady_from + a.len() - 1,
                steady_from + a.len(),
                bytes.len() - 1,
                mib(ma),
                mib(mb),
                growth * 100.0
            ),
        ))
    } else {
        None
    };

    let mut verdicts = vec![(
        seconds_over == 0 && res.delivered == res.sent,
        format!(
            "publish→delivery p99 ≤ 1 ms in every second: worst {} ms (second {}), {seconds_over} of {secs} seconds over; {} of {} delivered",
            ms_of(Some(worst.1)),
            worst.0,
            res.delivered,
            res.sent
        ),
    )];
    let mut summary = vec![
        "| run | sent | delivered | errors | publish p50 / p99 / p999 ms | publish→delivery p50 / p99 / p999 / max ms | worst second's p99 ms | data dir MiB (max / end) | messages kept | peak RSS MiB |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
        format!(
            "| {name} | {} | {} | {errors} | {} / {} / {} | {} / {} / {} / {} | {} (second {}) | {:.1} / {:.1} | {} | {:.1} |",
            res.sent,
            res.delivered,
            ms_of(qp.p50),
            ms_of(qp.p99),
            ms_of(qp.p999),
            ms_of(qe.p50),
            ms_of(qe.p99),
            ms_of(qe.p999),
            ms_of(qe.max),
            ms_of(Some(worst.1)),
            worst.0,
            mib(bytes.iter().copied().max().unwrap_or(0)),
            mib(bytes.last().copied().unwrap_or(0)),
            res.kept.map_or("?".into(), |k| k.to_string()),
            peak_rss as f64 / 1024.0
        ),
    ];
    match flat {
        Some(v) => verdicts.push(v),
        None => summary.push(format!(
            "data dir flatness not judged: the run is too short (retention trims from ≈ {trims_from:.0} s; needs ≥ {} s)",
            steady_from + 20
        )),
    }
    let mut marks = Vec::new();
    if trims_from < secs as f64 {
        marks.push((trims_from, format!("topic holds {keep}: retention trims")));
    }
    Report {
        scenario: "openloop",
        title: name,
        header: "second,msgs,p50_ms,p99_ms,p999_ms,max_ms,errors,delivered,e2e_p50_ms,e2e_p99_ms,e2e_max_ms,data_dir_bytes,rss_kb",
        rows,
        lines: vec![Line {
            panel: "e2e",
            value: 1.0,
            label: "aim: publish→delivery p99 ≤ 1 ms".into(),
        }],
        marks,
        summary,
        verdicts,
    }
    .write(&started, secs);
}

// ---------------------------------------------------------------------------
// Filling a data dir for the large-store runs.

fn run_fill(rt: &tokio::runtime::Runtime) {
    let Some(dir) = data_dir() else {
        println!("fill: set SLUICE_BENCH_DATA_DIR to the data dir to fill");
        return;
    };
    let count: u64 = env_or("SLUICE_BENCH_FILL_MESSAGES", 50_000_000);
    println!(
        "== fill: {count} × 256 B into topic `fill` of {}",
        dir.display()
    );
    let d = Daemon::start_in(dir, &[]);
    let start = now();
    let calls = count.div_ceil(1000);
    let next = Arc::new(AtomicU64::new(0));
    let port = d.port;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let mut conn = connect(port).await;
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let full = batch_of("fill", 1000, b'f');
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    let n = (count - i * 1000).min(1000);
                    let body = if n == 1000 {
                        full.clone()
                    } else {
                        batch_of("fill", n, b'f')
                    };
                    conn.unary("BatchPublish", body).await.expect("fill");
                    if i > 0 && i.is_multiple_of(5_000) {
                        eprintln!(
                            "  {} messages, {:.0} s",
                            i * 1000,
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("fill task");
        }
    });
    let took = start.elapsed();
    println!(
        "filled {count} messages in {:.1} s ({:.0} msgs/s); data dir {:.1} MiB",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64(),
        mib(d.data_bytes())
    );
}

fn main() {
    // `cargo bench` passes `--bench` itself: skip flags.
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if chosen.is_empty() {
        // A plain `cargo bench` (`make bench`) runs every bench target: these
        // runs take minutes, so they go only when named.
        println!(
            "sustained: no scenario named, nothing run (`cargo bench --bench sustained -- batch|unary|openloop|fill`, or `make bench-sustained`)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("machine: {}", machine());
    println!("output: {}", out_dir().display());
    println!();
    for s in &chosen {
        match s.as_str() {
            "batch" => run_closed(&rt, true),
            "unary" => run_closed(&rt, false),
            "openloop" => run_open(&rt),
            "fill" => run_fill(&rt),
            other => {
                eprintln!("unknown scenario {other:?}: batch, unary, openloop or fill");
                std::process::exit(2);
            }
        }
    }
}
