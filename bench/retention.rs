//! Retention benchmark (`make bench`): steady open-loop publishing (2,000
//! msg/s of 1 KiB, paced with a yield loop) for N minutes, twice, each against
//! a fresh daemon: (a) without retention, (b) with `--retention-max-age 1m`.
//! The data dir size (database + WAL) is sampled every 10 s. With retention
//! the data dir must level off once messages start expiring, and publish p99
//! must stay within 2x of the run without retention.
//!
//! Environment:
//!   SLUICE_BENCH_RETENTION_MINUTES   length of each run (default 4; fractions allowed)
//!   SLUICE_BENCH_RETENTION_MAX_AGE   --retention-max-age of run (b) (default 1m)
//!   SLUICE_BENCH_RETENTION_RATE      messages per second (default 2000)

#[path = "harness.rs"]
mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use prost::Message;
use sluice::proto;

const PAYLOAD: usize = 1024;
const TOPIC: &str = "steady";
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The data dir at one moment.
struct Sample {
    at: Duration,
    total: u64,
    db: u64,
    wal: u64,
}

struct Run {
    samples: Vec<Sample>,
    /// p99 of the calls due in each sampling window (index i: window ending
    /// at samples[i + 1]).
    window_p99: Vec<Duration>,
    summary: Summary,
    max: Duration,
    sent: u64,
    kept: Option<u64>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        Err(_) => default,
    }
}

fn file_len(d: &Daemon, name: &str) -> u64 {
    std::fs::metadata(d.dir.join(name)).map_or(0, |m| m.len())
}

fn sample(d: &Daemon, at: Duration) -> Sample {
    Sample {
        at,
        total: d.data_bytes(),
        db: file_len(d, "sluice.db"),
        wal: file_len(d, "sluice.db-wal"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

fn p99(lat: &mut [Duration]) -> Duration {
    lat.sort_unstable();
    lat.get(((lat.len() as f64 * 0.99) as usize).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Messages the topic holds now, from GetTopicStats.
async fn kept_messages(port: u16) -> Option<u64> {
    let mut conn = connect(port).await;
    let body = conn
        .unary(
            "GetTopicStats",
            frame(&proto::GetTopicStatsRequest {
                topics: vec![TOPIC.into()],
            }),
        )
        .await
        .ok()?;
    let resp = proto::GetTopicStatsResponse::decode(body).ok()?;
    resp.stats.first().map(|s| s.total_messages)
}

/// Lets the disk settle: the previous run's data dir (hundreds of MiB, just
/// removed) and anything else dirty is flushed before the next run starts, so
/// its fsyncs do not pay for it.
async fn settle() {
    let _ = std::process::Command::new("sync").status();
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// Publishes `rate`/s for `length` (open loop) against a fresh daemon started
/// with `extra`, sampling the data dir every `SAMPLE_EVERY`.
async fn run(name: &str, extra: &[&str], rate: u64, length: Duration) -> Run {
    settle().await;
    let d = Daemon::start(name, extra);
    let conn = connect(d.port).await;
    let body = frame(&proto::PublishRequest {
        topic: TOPIC.into(),
        payload: vec![b'r'; PAYLOAD].into(),
        attributes: Default::default(),
        ..Default::default()
    });
    let total = (rate as f64 * length.as_secs_f64()) as u64;
    // (sampling window of the call's due time, latency from its due time)
    let lat: Arc<Mutex<Vec<(u32, Duration)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut samples = vec![sample(&d, Duration::ZERO)];
    let start = now();
    let mut next_sample = SAMPLE_EVERY;
    let mut ticks = pace(rate, total);
    while let Some(due) = ticks.recv().await {
        let offset = due.saturating_duration_since(start);
        if offset >= next_sample {
            samples.push(sample(&d, next_sample));
            next_sample += SAMPLE_EVERY;
        }
        let window = (offset.as_nanos() / SAMPLE_EVERY.as_nanos()) as u32;
        let (mut c, body) = (conn.clone(), body.clone());
        let (lat, errors, done) = (lat.clone(), errors.clone(), done.clone());
        tokio::spawn(async move {
            match c.unary("Publish", body).await {
                Ok(_) => lat.lock().unwrap().push((window, due.elapsed())),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
    let drain_until = now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < total && now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    samples.push(sample(&d, elapsed));
    let kept = kept_messages(d.port).await;
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    let windows = samples.len() - 1;
    let mut per_window: Vec<Vec<Duration>> = vec![Vec::new(); windows];
    for &(w, l) in &lat {
        per_window[(w as usize).min(windows - 1)].push(l);
    }
    let window_p99 = per_window.iter_mut().map(|w| p99(w)).collect();
    let lat: Vec<Duration> = lat.into_iter().map(|(_, l)| l).collect();
    let max = lat.iter().copied().max().unwrap_or_default();
    let ok = lat.len() as u64;
    let summary = summarize(
        lat,
        ok,
        elapsed,
        errors.load(Ordering::Relaxed) + (total - done.load(Ordering::Relaxed)),
    );
    Run {
        samples,
        window_p99,
        summary,
        max,
        sent: total,
        kept,
    }
}

fn main() {
    let minutes: f64 = env_or("SLUICE_BENCH_RETENTION_MINUTES", 4.0);
    let max_age: String = env_or("SLUICE_BENCH_RETENTION_MAX_AGE", "1m".to_string());
    let rate: u64 = env_or("SLUICE_BENCH_RETENTION_RATE", 2_000);
    assert!(minutes > 0.0 && rate > 0, "need a positive length and rate");
    let max_age_d = sluice::config::parse_duration(&max_age).expect("max age");
    let length = Duration::from_secs_f64(minutes * 60.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("machine: {}", machine());
    println!(
        "steady publishing: {rate} msg/s × {PAYLOAD} B, open loop, {minutes} min per run; \
         run (b) with --retention-max-age {max_age}"
    );
    let (a, b) = rt.block_on(async {
        let a = run("retention-off", &[], rate, length).await;
        let b = run(
            "retention-age",
            &["--retention-max-age", &max_age],
            rate,
            length,
        )
        .await;
        (a, b)
    });

    println!();
    println!(
        "| t (s) | (a) no retention: data dir MiB | (a) p99 ms | (b) max-age {max_age}: data dir MiB | (b) db MiB | (b) WAL MiB | (b) p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let rows = a.samples.len().max(b.samples.len());
    for i in 0..rows {
        let (sa, sb) = (a.samples.get(i), b.samples.get(i));
        let at = sa.or(sb).map_or(0.0, |s| s.at.as_secs_f64());
        let win = |r: &Run| {
            i.checked_sub(1)
                .and_then(|w| r.window_p99.get(w))
                .map_or("".into(), |d| ms(*d))
        };
        println!(
            "| {at:.0} | {} | {} | {} | {} | {} | {} |",
            sa.map_or("".into(), |s| mib(s.total)),
            win(&a),
            sb.map_or("".into(), |s| mib(s.total)),
            sb.map_or("".into(), |s| mib(s.db)),
            sb.map_or("".into(), |s| mib(s.wal)),
            win(&b),
        );
    }

    println!();
    println!("| run | sent | ok | errors | p50 ms | p99 ms | p999 ms | max ms | final data dir MiB | messages kept |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let label_b = format!("(b) max-age {max_age}");
    for (label, r) in [("(a) no retention", &a), (label_b.as_str(), &b)] {
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.sent,
            r.summary.count,
            r.summary.errors,
            ms(r.summary.p50),
            ms(r.summary.p99),
            ms(r.summary.p999),
            ms(r.max),
            r.samples.last().map_or("".into(), |s| mib(s.total)),
            r.kept.map_or("?".into(), |k| k.to_string()),
        );
    }

    let ratio = b.summary.p99.as_secs_f64() / a.summary.p99.as_secs_f64().max(1e-9);
    println!();
    println!(
        "p99 with retention / without: {ratio:.2}x ({})",
        if ratio <= 2.0 { "within 2x" } else { "OVER 2x" }
    );
    // Steady state: from 1.5 × max-age (at least max-age + 10 s) to the end.
    let steady_from = (max_age_d.mul_f64(1.5)).max(max_age_d + SAMPLE_EVERY);
    let steady: Vec<&Sample> = b.samples.iter().filter(|s| s.at >= steady_from).collect();
    match (steady.first(), steady.last()) {
        (Some(first), Some(last)) if steady.len() >= 2 => {
            let lo = steady.iter().map(|s| s.total).min().unwrap_or(0);
            let hi = steady.iter().map(|s| s.total).max().unwrap_or(0);
            println!(
                "(b) data dir from {:.0} s to {:.0} s: {} → {} MiB (min {}, max {}; growth {:+.1} MiB); \
                 (a) grew {} → {} MiB over the whole run",
                first.at.as_secs_f64(),
                last.at.as_secs_f64(),
                mib(first.total),
                mib(last.total),
                mib(lo),
                mib(hi),
                (last.total as f64 - first.total as f64) / (1 << 20) as f64,
                mib(a.samples.first().map_or(0, |s| s.total)),
                mib(a.samples.last().map_or(0, |s| s.total)),
            );
        }
        _ => println!(
            "(b) run too short to reach a steady state (needs > {:.0} s); raise SLUICE_BENCH_RETENTION_MINUTES or lower SLUICE_BENCH_RETENTION_MAX_AGE",
            steady_from.as_secs_f64() + SAMPLE_EVERY.as_secs_f64()
        ),
    }
}
