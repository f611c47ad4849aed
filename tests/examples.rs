//! The client quick starts (`examples/python`, `examples/node`, issue 14) run
//! as a user runs them, against the real broker, and their outcome is checked
//! through the API (tonic), not through what they print alone:
//!
//! - `publish` stores what it says, with its attributes and a W3C
//!   `traceparent` per call in one trace, through Publish and BatchPublish;
//! - `publish` is exactly-once: run again with the same key prefix it stores
//!   nothing again and reports the first run's ids as duplicates; through a
//!   broker that is down when it starts, then SIGKILLed and restarted, then
//!   stopped (SIGSTOP) past its deadlines, it retries with the same keys and
//!   every message is stored once;
//! - `consume` processes every message once, nacks and redelivers the ones
//!   whose processing failed, and leaves the group's cursor at the last one;
//!   Ctrl-C leaves the cursor exactly at the last message it printed; a
//!   takeover (ABORTED) ends it with a message;
//! - `consume` survives a SIGKILL and restart of the broker mid-run: it
//!   reconnects by itself and finishes with every message, in order, none
//!   missing (duplicates are skipped, not printed);
//! - `stats` reports the counts and the cursor;
//! - the examples' own checks (`npm test`, `python -m unittest`) pass.
//!
//! Python is `target/pyenv` (made by `make deps`) or `SLUICE_PYTHON`; Node is
//! `node`/`npm` on PATH (or `SLUICE_NODE`) with `examples/node/node_modules`
//! from `npm ci` (also `make deps`). Anything missing fails the test saying
//! what to run; nothing is skipped.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sluice::proto;

/// Bound on any one example run.
const RUN_LIMIT: Duration = Duration::from_secs(30);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Node,
}

fn python() -> PathBuf {
    let p = std::env::var_os("SLUICE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/pyenv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import grpc and grpc_tools: run `make deps` (it makes target/pyenv with \
         grpcio and grpcio-tools from PyPI) or set SLUICE_PYTHON",
        p.display()
    );
    p
}

fn node() -> PathBuf {
    let p = std::env::var_os("SLUICE_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let version = Command::new(&p)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| {
            panic!(
                "no {}: install Node.js 18 or newer with npm (`make deps` does on Debian as \
                 root) or set SLUICE_NODE",
                p.display()
            )
        });
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 18,
        "node {version} is too old: the examples need 18 or newer"
    );
    assert!(
        root()
            .join("examples/node/node_modules/@grpc/grpc-js/package.json")
            .exists()
            && root()
                .join("examples/node/node_modules/@grpc/proto-loader/package.json")
                .exists(),
        "examples/node/node_modules lacks @grpc/grpc-js or @grpc/proto-loader: run `make deps` \
         (it runs `npm ci` in examples/node)"
    );
    p
}

impl Lang {
    fn dir(self) -> PathBuf {
        root().join(match self {
            Lang::Python => "examples/python",
            Lang::Node => "examples/node",
        })
    }

    /// The example `name` (publish, consume, stats) with `args`, talking to
    /// `port`.
    fn program(self, name: &str, port: u16, args: &[&str]) -> Command {
        let mut cmd = match self {
            Lang::Python => {
                let mut c = Command::new(python());
                c.arg(format!("{name}.py"));
                c
            }
            Lang::Node => {
                let mut c = Command::new(node());
                c.arg(format!("{name}.js"));
                c
            }
        };
        cmd.args(["--addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .current_dir(self.dir())
            .env_remove("SLUICE_ADDR")
            .env_remove("SLUICE_PROTO");
        cmd
    }
}

/// A running example: its stdout lines and stderr collected as they come,
/// killed when dropped.
struct Running {
    child: Child,
    what: String,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let l = lines.clone();
        let e = stderr.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    l.lock().unwrap().push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    e.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }),
        ];
        Running {
            child,
            what,
            lines,
            stderr,
            readers,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until it printed `n` lines.
    fn wait_lines(&mut self, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.lines.lock().unwrap().len() < n {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) after {} lines, before {n}; stderr:\n{}",
                    self.what,
                    self.lines().len(),
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} printed {} lines in {limit:?}, not {n}; stderr:\n{}",
                self.what,
                self.lines().len(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for it to exit (killing it after `limit`); its status, stdout
    /// lines and stderr.
    fn finish(mut self, limit: Duration) -> (ExitStatus, Vec<String>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                panic!(
                    "{} did not finish within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.lines().join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (status, self.lines(), self.stderr())
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an example to completion; panics (showing its output) unless it
/// exits 0.
fn run_ok(cmd: Command) -> (Vec<String>, String) {
    let what = format!("{cmd:?}");
    let (status, lines, err) = Running::start(cmd).finish(RUN_LIMIT);
    assert!(
        status.success(),
        "{what} failed ({status}); stdout:\n{}\nstderr:\n{err}",
        lines.join("\n")
    );
    (lines, err)
}

/// `SEQUENCE MESSAGE_ID` lines of publish (those it marks ` duplicate`
/// too).
fn published(lines: &[String]) -> Vec<(u64, String)> {
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert!(
                f.len() == 2 || (f.len() == 3 && f[2] == "duplicate"),
                "line {l:?}"
            );
            (f[0].parse().unwrap(), f[1].to_string())
        })
        .collect()
}

/// Which lines of publish say `duplicate`.
fn duplicate_flags(lines: &[String]) -> Vec<bool> {
    lines.iter().map(|l| l.ends_with(" duplicate")).collect()
}

/// A processed message as consume prints it.
#[derive(Debug, Clone, PartialEq)]
struct Processed {
    seq: u64,
    id: String,
    delivery_count: u32,
    payload: String,
}

fn processed(lines: &[String]) -> Vec<Processed> {
    lines
        .iter()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let mut next = || f.next().unwrap_or_else(|| panic!("line {l:?}"));
            Processed {
                seq: next().parse().unwrap(),
                id: next().to_string(),
                delivery_count: next().parse().unwrap(),
                payload: next().to_string(),
            }
        })
        .collect()
}

/// The trace id publish reports on stderr.
fn trace_id(stderr: &str) -> String {
    stderr
        .split("trace id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no trace id in {stderr:?}"))
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The group's (cursor, pending) in GetTopicStats.
fn cursor(rt: &tokio::runtime::Runtime, c: &mut Client, topic: &str, group: &str) -> (u64, u64) {
    let stats = rt.block_on(c.topic_stats(&[topic])).expect("GetTopicStats");
    let g = stats[0]
        .consumer_groups
        .iter()
        .find(|g| g.group_name == group)
        .unwrap_or_else(|| panic!("no group {group} in {stats:?}"));
    (g.cursor_sequence, g.pending_count)
}

/// Everything in `topic`, read with a BROWSE stream.
fn browse_all(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    topic: &str,
) -> Vec<proto::MessageDelivery> {
    rt.block_on(async {
        let mut sub = c.browse(topic, proto::InitialPosition::Earliest).await;
        sub.send(credit(10_000)).await;
        sub.deliveries_until_quiet(Duration::from_millis(500)).await
    })
}

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && parts[3] == "01"
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

fn publish_consume_and_stats(lang: Lang) {
    let started = Instant::now();
    let server = Server::start();
    let port = server.port;
    let rt = runtime();
    let mut c = rt.block_on(server.client());
    let topic = "quick";

    // publish: 20 Publish calls with attributes, then 30 in BatchPublish calls of 8.
    let (lines, err) = run_ok(lang.program(
        "publish",
        port,
        &[
            "--topic",
            topic,
            "--count",
            "20",
            "--attr",
            "source=example",
            "--attr",
            "k=v=w",
        ],
    ));
    let single = published(&lines);
    assert!(
        !duplicate_flags(&lines).contains(&true),
        "a new run has new keys"
    );
    let single_trace = trace_id(&err);
    let (lines, err) = run_ok(lang.program(
        "publish",
        port,
        &[
            "--topic", topic, "--count", "30", "--batch", "8", "--prefix", "batch-",
        ],
    ));
    let batched = published(&lines);
    let batch_trace = trace_id(&err);
    assert_eq!((single.len(), batched.len()), (20, 30));
    let all: Vec<(u64, String)> = single.iter().chain(&batched).cloned().collect();
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "sequences grow: {all:?}"
    );

    let stats = rt.block_on(c.topic_stats(&[topic])).unwrap();
    assert_eq!(stats[0].total_messages, 50);
    assert_eq!(stats[0].last_sequence, all[49].0);
    let stored = browse_all(&rt, &mut c, topic);
    assert_eq!(
        stored
            .iter()
            .map(|d| (d.sequence, d.message_id.clone()))
            .collect::<Vec<_>>(),
        all,
        "the broker holds what publish printed, in order"
    );
    let mut spans = std::collections::HashSet::new();
    for (i, d) in stored.iter().enumerate() {
        let want = if i < 20 {
            format!("message-{}", i + 1)
        } else {
            format!("batch-{}", i - 19)
        };
        assert_eq!(d.payload, want.as_bytes());
        let tp = d
            .attributes
            .get("traceparent")
            .map(String::as_str)
            .unwrap_or("");
        assert!(
            is_traceparent(tp),
            "message {i} has a W3C traceparent: {tp:?}"
        );
        let trace = if i < 20 { &single_trace } else { &batch_trace };
        assert_eq!(
            tp.split('-').nth(1),
            Some(trace.as_str()),
            "one trace per run"
        );
        spans.insert(tp.split('-').nth(2).unwrap().to_string());
        if i < 20 {
            assert_eq!(
                d.attributes.get("source").map(String::as_str),
                Some("example")
            );
            assert_eq!(d.attributes.get("k").map(String::as_str), Some("v=w"));
        }
    }
    assert_eq!(
        spans.len(),
        20 + 4,
        "a new span per call (20 Publish, 4 BatchPublish)"
    );

    // consume: all 50, a small window, acks every 5; every 7th sequence fails once.
    let (lines, err) = run_ok(lang.program(
        "consume",
        port,
        &[
            "--topic",
            topic,
            "--group",
            "workers",
            "--count",
            "50",
            "--window",
            "8",
            "--ack-every",
            "5",
            "--fail-every",
            "7",
            "--nack-delay-ms",
            "50",
        ],
    ));
    let got = processed(&lines);
    let mut seqs: Vec<u64> = got.iter().map(|p| p.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        all.iter().map(|a| a.0).collect::<Vec<_>>(),
        "each message processed once"
    );
    let failing: Vec<u64> = all.iter().map(|a| a.0).filter(|s| s % 7 == 0).collect();
    assert!(!failing.is_empty());
    for p in &got {
        let want = if p.seq % 7 == 0 { 2 } else { 1 };
        assert_eq!(p.delivery_count, want, "{p:?}");
        let i = all.iter().position(|a| a.0 == p.seq).unwrap();
        assert_eq!(p.id, all[i].1);
        assert_eq!(p.payload.as_bytes(), &stored[i].payload[..]);
    }
    let first_time: Vec<u64> = got
        .iter()
        .filter(|p| p.delivery_count == 1)
        .map(|p| p.seq)
        .collect();
    assert!(
        first_time.windows(2).all(|w| w[0] < w[1]),
        "in order: {first_time:?}"
    );
    assert_eq!(err.matches("; nack,").count(), failing.len(), "{err}");
    assert_eq!(
        cursor(&rt, &mut c, topic, "workers"),
        (all[49].0, 0),
        "acked up to the last"
    );

    // stats
    let (lines, _) = run_ok(lang.program("stats", port, &[topic]));
    let text = lines.join("\n");
    assert!(text.starts_with(&format!("{topic}: 50 messages")), "{text}");
    assert!(
        text.contains(&format!("group workers: cursor {}, pending 0", all[49].0)),
        "{text}"
    );
    let (status, _, err) =
        Running::start(lang.program("stats", port, &["no-such-topic"])).finish(RUN_LIMIT);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("NOT_FOUND"), "{err}");

    // Ctrl-C mid-run: exits 0, and the cursor is exactly at the last message printed.
    let more: Vec<&[u8]> = vec![b"more"; 200];
    rt.block_on(c.batch_publish(topic, &more)).unwrap();
    let mut consumer = Running::start(lang.program(
        "consume",
        port,
        &[
            "--topic",
            topic,
            "--group",
            "workers",
            "--process-ms",
            "10",
            "--ack-every",
            "1000",
        ],
    ));
    consumer.wait_lines(20, RUN_LIMIT);
    consumer.signal("INT");
    let (status, lines, err) = consumer.finish(RUN_LIMIT);
    assert!(status.success(), "Ctrl-C exits 0: {status}; {err}");
    let got = processed(&lines);
    assert!(got.len() < 200, "stopped mid-run ({} processed)", got.len());
    let last = got.last().unwrap().seq;
    assert_eq!(
        cursor(&rt, &mut c, topic, "workers"),
        (last, (200 - got.len()) as u64)
    );

    // Another consumer of the group takes over: ABORTED ends the example with a message.
    let mut consumer = Running::start(lang.program(
        "consume",
        port,
        &["--topic", topic, "--group", "workers", "--process-ms", "50"],
    ));
    consumer.wait_lines(1, RUN_LIMIT);
    let newcomer = rt.block_on(c.subscribe(topic, "workers", proto::InitialPosition::Earliest));
    let (status, _, err) = consumer.finish(RUN_LIMIT);
    drop(newcomer);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("took it over"), "{err}");
    eprintln!(
        "{lang:?}: publish, consume, stats, Ctrl-C and takeover in {:?}",
        started.elapsed()
    );
}

fn consumer_survives_a_sigkill_of_the_broker(lang: Lang) {
    let started = Instant::now();
    let mut server = Server::start();
    let port = server.port;
    let rt = runtime();
    let topic = "survive";
    let first: Vec<Vec<u8>> = (1..=200)
        .map(|i| format!("before-{i}").into_bytes())
        .collect();
    let mut c = rt.block_on(server.client());
    let mut all: Vec<(u64, String)> = rt
        .block_on(c.batch_publish(topic, &first.iter().map(Vec::as_slice).collect::<Vec<_>>()))
        .unwrap()
        .results
        .into_iter()
        .map(|r| (r.sequence, r.message_id))
        .collect();

    let mut consumer = Running::start(lang.program(
        "consume",
        port,
        &[
            "--topic",
            topic,
            "--group",
            "survivor",
            "--count",
            "400",
            "--window",
            "16",
            "--process-ms",
            "8",
            "--max-backoff",
            "1",
        ],
    ));
    consumer.wait_lines(40, RUN_LIMIT);
    server.kill9();
    let at_kill = consumer.lines().len();
    std::thread::sleep(Duration::from_millis(300));
    server.spawn(port);
    // 200 more after the restart: the consumer must get these too.
    let mut c = rt.block_on(server.client());
    let second: Vec<Vec<u8>> = (1..=200)
        .map(|i| format!("after-{i}").into_bytes())
        .collect();
    all.extend(
        rt.block_on(c.batch_publish(topic, &second.iter().map(Vec::as_slice).collect::<Vec<_>>()))
            .unwrap()
            .results
            .into_iter()
            .map(|r| (r.sequence, r.message_id)),
    );
    let (status, lines, err) = consumer.finish(RUN_LIMIT);
    assert!(
        status.success(),
        "consume failed ({status}); stderr:\n{err}"
    );
    assert!(
        at_kill < 200,
        "the broker died mid-run ({at_kill} processed by then)"
    );
    assert!(
        err.contains("reconnecting"),
        "it reconnected by itself: {err}"
    );
    let got = processed(&lines);
    assert_eq!(
        got.iter()
            .map(|p| (p.seq, p.id.clone()))
            .collect::<Vec<_>>(),
        all,
        "every message, in order, none missing, none printed twice; stderr:\n{err}"
    );
    for (p, want) in got.iter().zip(first.iter().chain(&second)) {
        assert_eq!(p.payload.as_bytes(), &want[..]);
    }
    assert_eq!(cursor(&rt, &mut c, topic, "survivor"), (all[399].0, 0));
    eprintln!(
        "{lang:?}: SIGKILL at {at_kill}/400 processed; done in {:?}; {}",
        started.elapsed(),
        err.lines().last().unwrap_or("")
    );
}

/// The (sequence, id, payload) of everything in `topic`.
fn stored(rt: &tokio::runtime::Runtime, c: &mut Client, topic: &str) -> Vec<(u64, String, String)> {
    browse_all(rt, c, topic)
        .into_iter()
        .map(|d| {
            let payload = String::from_utf8(d.payload.to_vec()).unwrap();
            (d.sequence, d.message_id, payload)
        })
        .collect()
}

fn total_messages(rt: &tokio::runtime::Runtime, c: &mut Client, topic: &str) -> u64 {
    rt.block_on(c.topic_stats(&[topic])).expect("GetTopicStats")[0].total_messages
}

fn publish_twice_stores_once(lang: Lang) {
    let started = Instant::now();
    let server = Server::start();
    let port = server.port;
    let rt = runtime();
    let mut c = rt.block_on(server.client());
    let topic = "once";
    let publish = |count: &str, batch: &str| {
        let args = [
            "--topic",
            topic,
            "--count",
            count,
            "--batch",
            batch,
            "--key-prefix",
            "order-7/",
        ];
        let (lines, err) = run_ok(lang.program("publish", port, &args));
        (published(&lines), duplicate_flags(&lines), err)
    };

    let (first, dups, err) = publish("12", "0");
    assert_eq!((first.len(), dups.contains(&true)), (12, false), "{err}");
    assert!(err.contains("12 stored, 0 duplicates"), "{err}");
    // The same run again: nothing new, the first run's ids, each a duplicate.
    let (again, dups, err) = publish("12", "0");
    assert_eq!(again, first, "the stored messages' ids and sequences");
    assert_eq!(dups, vec![true; 12]);
    assert!(err.contains("0 stored, 12 duplicates"), "{err}");
    assert_eq!(total_messages(&rt, &mut c, topic), 12);
    // Three more, in BatchPublish calls of 5 (one call mixes old and new
    // keys): the keys name messages, whatever the call that carries them.
    let (more, dups, err) = publish("15", "5");
    assert_eq!(&more[..12], &first[..]);
    assert_eq!(dups, [vec![true; 12], vec![false; 3]].concat(), "{err}");
    assert_eq!(total_messages(&rt, &mut c, topic), 15);
    let want: Vec<(u64, String, String)> = more
        .iter()
        .enumerate()
        .map(|(i, (seq, id))| (*seq, id.clone(), format!("message-{}", i + 1)))
        .collect();
    assert_eq!(
        stored(&rt, &mut c, topic),
        want,
        "each message once, in order"
    );
    eprintln!(
        "{lang:?}: publish twice, once stored, in {:?}",
        started.elapsed()
    );
}

fn publish_survives_an_unavailable_broker(lang: Lang) {
    const N: usize = 300;
    let started = Instant::now();
    let mut server = Server::start();
    let port = server.port;
    let rt = runtime();
    let topic = "outage";
    // Down before the publisher starts: its first calls cannot reach it.
    server.kill9();
    let count = N.to_string();
    let mut publisher = Running::start(lang.program(
        "publish",
        port,
        &[
            "--topic",
            topic,
            "--count",
            &count,
            "--key-prefix",
            "outage/",
            "--timeout",
            "0.5",
            "--max-backoff",
            "0.4",
            "--attempts",
            "40",
        ],
    ));
    std::thread::sleep(Duration::from_millis(800));
    server.spawn(port);
    // SIGKILLed mid-run: the call in flight may or may not have been stored.
    publisher.wait_lines(60, RUN_LIMIT);
    server.kill9();
    let at_kill = publisher.lines().len();
    std::thread::sleep(Duration::from_millis(700));
    server.spawn(port);
    // Stopped past the calls' deadlines: attempts of one key pile up in the
    // stopped broker and all reach it when it continues.
    publisher.wait_lines(at_kill + 60, RUN_LIMIT);
    server.signal(libc::SIGSTOP);
    let at_stop = publisher.lines().len();
    std::thread::sleep(Duration::from_millis(1200));
    server.signal(libc::SIGCONT);
    let (status, lines, err) = publisher.finish(RUN_LIMIT);
    assert!(
        status.success(),
        "publish failed ({status}); stderr:\n{err}"
    );
    assert!(
        at_kill < N && at_stop < N,
        "the broker failed mid-run ({at_kill}, {at_stop} published)"
    );
    // Calls in flight while the broker was stopped for longer than their
    // deadline ended in DEADLINE_EXCEEDED and were retried. (UNAVAILABLE
    // comes from the SIGKILL, or from the outage at the start with Node,
    // whose calls do not wait for the channel to be ready.)
    assert!(
        err.contains("DEADLINE_EXCEEDED") && err.contains("retrying in"),
        "it retried: {err}"
    );
    let got = published(&lines);
    assert_eq!(got.len(), N, "a line per message; stderr:\n{err}");
    let mut c = rt.block_on(server.client());
    let want: Vec<(u64, String, String)> = got
        .iter()
        .enumerate()
        .map(|(i, (seq, id))| (*seq, id.clone(), format!("message-{}", i + 1)))
        .collect();
    let have = stored(&rt, &mut c, topic);
    if have != want {
        let extra: Vec<_> = have.iter().filter(|h| !want.contains(h)).collect();
        let missing: Vec<_> = want.iter().filter(|w| !have.contains(w)).collect();
        panic!(
            "every message stored once, in order, under the ids publish printed: {} stored, \
             {} printed; stored but not printed: {extra:?}; printed but not stored: \
             {missing:?}; stderr:\n{err}",
            have.len(),
            want.len()
        );
    }
    assert_eq!(total_messages(&rt, &mut c, topic), N as u64, "{err}");
    // The stopped broker went on with the attempt that timed out, so the
    // retry met a stored key: the case a retry without keys stores twice.
    let dups = duplicate_flags(&lines).iter().filter(|d| **d).count();
    assert!(dups >= 1, "a retry was answered as a duplicate: {err}");
    eprintln!(
        "{lang:?}: publish through down/SIGKILL at {at_kill}/SIGSTOP at {at_stop} of {N}: \
         {} retries ({} UNAVAILABLE), {dups} replies were duplicates; done in {:?}",
        err.matches("retrying in").count(),
        err.matches("UNAVAILABLE").count(),
        started.elapsed()
    );
}

#[test]
fn python_examples_publish_consume_and_report_stats() {
    publish_consume_and_stats(Lang::Python);
}

#[test]
fn node_examples_publish_consume_and_report_stats() {
    publish_consume_and_stats(Lang::Node);
}

#[test]
fn python_consumer_survives_a_sigkill_of_the_broker() {
    consumer_survives_a_sigkill_of_the_broker(Lang::Python);
}

#[test]
fn node_consumer_survives_a_sigkill_of_the_broker() {
    consumer_survives_a_sigkill_of_the_broker(Lang::Node);
}

#[test]
fn python_publish_twice_stores_once() {
    publish_twice_stores_once(Lang::Python);
}

#[test]
fn node_publish_twice_stores_once() {
    publish_twice_stores_once(Lang::Node);
}

#[test]
fn python_publish_survives_an_unavailable_broker() {
    publish_survives_an_unavailable_broker(Lang::Python);
}

#[test]
fn node_publish_survives_an_unavailable_broker() {
    publish_survives_an_unavailable_broker(Lang::Node);
}

#[test]
fn the_examples_own_checks_pass() {
    let node_dir = Lang::Node.dir();
    let node = node();
    let mut npm = Command::new("npm");
    npm.arg("test").current_dir(&node_dir);
    // npm runs `node --test …` (package.json): with SLUICE_NODE, that node.
    if let Some(dir) = node.parent().filter(|d| !d.as_os_str().is_empty()) {
        let path = std::env::var("PATH").unwrap_or_default();
        npm.env("PATH", format!("{}:{path}", dir.display()));
    }
    let (lines, _) = run_ok(npm);
    assert!(
        lines.iter().any(|l| l.trim() == "# fail 0"),
        "{}",
        lines.join("\n")
    );
    let mut unit = Command::new(python());
    unit.args(["-m", "unittest", "-v", "test_flow"])
        .current_dir(Lang::Python.dir());
    let (_, err) = run_ok(unit);
    assert!(err.contains("\nOK"), "{err}");
}
