//! Shared benchmark plumbing: start the release daemon on a disk-backed
//! data dir, a lean gRPC-over-h2 client (no tonic layers, so the load
//! generator costs as little CPU as possible on a 2-core box), latency
//! summaries and the daemon's RSS from /proc.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::Request;
use tokio::net::TcpStream;

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// From spawning the process to its "listening on" log line (the
    /// listener is bound by then).
    pub startup: Duration,
    /// The data dir is the caller's (`start_in`): left in place on drop.
    keep: bool,
}

impl Daemon {
    /// A daemon on a fresh data dir, removed again when it is dropped.
    pub fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        Daemon::spawn(dir, false, extra)
    }

    /// A daemon on an existing (e.g. pre-filled) data dir, created if
    /// missing and kept when the daemon is dropped.
    pub fn start_in(dir: PathBuf, extra: &[&str]) -> Daemon {
        Daemon::spawn(dir, true, extra)
    }

    fn spawn(dir: PathBuf, keep: bool, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(&dir).expect("bench data dir");
        // `make bench` points SLUICE_BIN at the static release binary (what
        // ships); plain `cargo bench` uses the bench profile's build.
        let bin = std::env::var("SLUICE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").to_string());
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--port",
                "0",
                "--log-level",
                "warn,sluice::server=info",
                "--data-dir",
            ])
            .arg(&dir)
            .args(extra)
            // `SLUICE_BENCH_ARGS="--store nats://… --nats-replicas 3"` runs
            // the same benchmark through a JetStream gateway (bench/jetstream.sh).
            .args(
                std::env::var("SLUICE_BENCH_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on ") {
                    if let Some(tx) = tx.take() {
                        let addr = line[i + 13..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let _ = tx.send(addr);
                    }
                } else if !line.contains(" INFO ") {
                    eprintln!("[sluice] {line}");
                }
            }
        });
        // A large pre-filled store (start_in) may take a while to open.
        let addr = rx
            .recv_timeout(Duration::from_secs(if keep { 600 } else { 20 }))
            .expect("sluice started");
        let startup = spawned.elapsed();
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        Daemon {
            child,
            port,
            dir,
            startup,
            keep,
        }
    }

    fn status_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Current resident set, KiB.
    pub fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// Peak resident set since start, KiB.
    pub fn peak_rss_kb(&self) -> u64 {
        self.status_kb("VmHWM:")
    }

    /// Resets the kernel's peak-RSS mark (so a phase's peak can be read).
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    pub fn data_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A clean stop (SIGTERM) as an operator would do it: a JetStream
        // gateway then withdraws its presence at once, and the next run's
        // gateway does not follow the stream for a dead one.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One HTTP/2 connection speaking gRPC.
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Bytes>,
    authority: String,
}

pub async fn connect(port: u16) -> Conn {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Conn {
        send,
        authority: format!("127.0.0.1:{port}"),
    }
}

pub fn frame<M: prost::Message>(m: &M) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + m.encoded_len());
    b.put_u8(0);
    b.put_u32(m.encoded_len() as u32);
    m.encode(&mut b).expect("encode");
    b.freeze()
}

impl Conn {
    fn request(&self, method: &str) -> Request<()> {
        Request::post(format!(
            "http://{}/sluice.v1.Sluice/{method}",
            self.authority
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
    }

    /// One unary call with an already framed body; returns the response body.
    pub async fn unary(&mut self, method: &str, framed: Bytes) -> Result<Bytes, String> {
        let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
        let (resp, mut stream) = send
            .send_request(self.request(method), false)
            .map_err(|e| e.to_string())?;
        stream.send_data(framed, true).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        if let Some(s) = resp.headers().get("grpc-status") {
            return Err(format!("grpc-status {s:?}"));
        }
        let mut body = resp.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        match trailers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            Some("0") => {}
            other => return Err(format!("grpc-status {other:?}")),
        }
        if data.len() < 5 {
            return Err("short response".into());
        }
        data.advance(5);
        Ok(data.freeze())
    }

    /// Opens a bidirectional stream; returns its halves.
    pub async fn stream(&mut self, method: &str) -> (h2::SendStream<Bytes>, h2::RecvStream) {
        let mut send = self.send.clone().ready().await.expect("ready");
        let (resp, stream) = send
            .send_request(self.request(method), false)
            .expect("send_request");
        let resp = resp.await.expect("response");
        (stream, resp.into_body())
    }
}

/// Reassembles gRPC messages from a receive stream.
pub struct Frames {
    buf: BytesMut,
}

impl Frames {
    pub fn new() -> Self {
        Frames {
            buf: BytesMut::new(),
        }
    }
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }
    pub fn next(&mut self) -> Option<Bytes> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        self.buf.advance(5);
        Some(self.buf.split_to(len).freeze())
    }
}

/// Latency summary of one run.
pub struct Summary {
    pub count: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub errors: u64,
}

pub fn summarize(mut lat: Vec<Duration>, messages: u64, elapsed: Duration, errors: u64) -> Summary {
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Summary {
        count: messages,
        elapsed,
        p50: q(0.50),
        p99: q(0.99),
        p999: q(0.999),
        errors,
    }
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

pub fn now() -> Instant {
    Instant::now()
}

/// Paces an open-loop run: a thread sleeps until each call's due time and
/// hands that instant to the runtime, which starts the call. The thread's
/// timer slack is cut to 1 ns so it wakes on time. (Spinning on the runtime
/// thread instead, as the first version of these benches did, kept one of
/// the machine's two cores busy and took it from the daemon.)
pub fn pace(rate: u64, total: u64) -> tokio::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    std::thread::spawn(move || {
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let start = Instant::now();
        for i in 0..total {
            let due = start + interval * i as u32;
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if tx.blocking_send(due).is_err() {
                return;
            }
        }
    });
    rx
}

/// Prints the machine line for RESULTS.md.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}
