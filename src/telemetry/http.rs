//! The OTLP exporters' HTTP transport: a blocking `ureq` agent, called from
//! the SDK's own export threads (the periodic metric reader and the batch
//! span processor block on our future, which completes synchronously). No
//! async runtime is involved.
//!
//! Every request has a hard deadline (connect, send, response and body), so
//! a collector that is down or hangs costs one stalled export thread for at
//! most that long, never the reactor. Failures are logged with
//! [`WarnLimiter`] so a dead collector does not flood the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

/// Largest collector response read (OTLP responses are tiny).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// How often a repeating problem is logged at most.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// Logs the first occurrence of a problem at once, then at most once per
/// [`WARN_EVERY`] with the number of occurrences in between. Recovery is
/// logged once after a logged warning; it does not reopen the window, so a
/// flapping condition costs at most two lines per period.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    what: &'static str,
    every: Duration,
    /// Fast path for [`WarnLimiter::succeeded`]: no lock while all is well.
    failing: AtomicBool,
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    last_warn: Option<Instant>,
    /// Occurrences since the last warning.
    unreported: u64,
    /// A warning was logged and no recovery message since.
    warned: bool,
}

impl WarnLimiter {
    pub(crate) fn new(what: &'static str, every: Duration) -> WarnLimiter {
        WarnLimiter {
            what,
            every,
            failing: AtomicBool::new(false),
            state: Mutex::new(LimiterState::default()),
        }
    }

    /// One more occurrence; `detail` is only formatted when logged.
    /// Returns true if this call logged.
    pub(crate) fn failed(&self, detail: impl FnOnce() -> String) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.failing.store(true, Ordering::Relaxed);
        s.unreported += 1;
        let due = s.last_warn.is_none_or(|t| t.elapsed() >= self.every);
        if !due {
            return false;
        }
        let earlier = s.unreported - 1;
        s.unreported = 0;
        s.last_warn = Some(Instant::now());
        s.warned = true;
        drop(s);
        if earlier > 0 {
            log::warn!(
                "telemetry: {}: {} ({earlier} more since the last warning)",
                self.what,
                detail()
            );
        } else {
            log::warn!("telemetry: {}: {}", self.what, detail());
        }
        true
    }

    /// Things work (again). Returns true if this call logged the recovery.
    pub(crate) fn succeeded(&self, detail: impl FnOnce() -> String) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return false;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.failing.store(false, Ordering::Relaxed);
        if !std::mem::take(&mut s.warned) {
            return false;
        }
        drop(s);
        log::info!("telemetry: {}: {}", self.what, detail());
        true
    }
}

/// `opentelemetry_http::HttpClient` over a blocking `ureq` agent.
#[derive(Debug)]
pub(crate) struct BlockingClient {
    agent: ureq::Agent,
    health: WarnLimiter,
}

impl BlockingClient {
    /// A client whose every request (connect to last body byte) ends within
    /// `timeout`. `signal` names the data it carries in log lines.
    pub(crate) fn new(timeout: Duration, signal: &'static str) -> BlockingClient {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // Hand 4xx/5xx back to the exporter: it decides about retries.
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build();
        BlockingClient {
            agent: ureq::Agent::new_with_config(config),
            health: WarnLimiter::new(signal, WARN_EVERY),
        }
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri().clone();
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, &body[..]);
        let outcome = self.agent.run(request).and_then(|mut response| {
            let bytes = response
                .body_mut()
                .with_config()
                .limit(MAX_RESPONSE_BYTES)
                .read_to_vec()?;
            let (parts, _) = response.into_parts();
            Ok(Response::from_parts(parts, Bytes::from(bytes)))
        });
        match outcome {
            Ok(response) if response.status().is_success() => {
                self.health
                    .succeeded(|| format!("export to {uri} works again"));
                Ok(response)
            }
            Ok(response) => {
                self.health.failed(|| {
                    format!(
                        "export to {uri} refused with HTTP {}; this export is dropped",
                        response.status()
                    )
                });
                Ok(response)
            }
            Err(e) => {
                self.health
                    .failed(|| format!("export to {uri} failed ({e}); this export is dropped"));
                Err(Box::new(e))
            }
        }
    }
}

#[async_trait]
impl HttpClient for BlockingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // Blocking on purpose: the SDK calls this from its own export thread
        // (`futures_executor::block_on`), never from the reactor.
        self.send(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn limiter_reports_first_then_at_most_once_per_period() {
        let l = WarnLimiter::new("test", Duration::from_secs(3600));
        assert!(l.failed(|| "one".into()));
        for _ in 0..1000 {
            assert!(!l.failed(|| unreachable!("not formatted when suppressed")));
        }
        // Recovery is logged once after a warning...
        assert!(l.succeeded(|| "back".into()));
        assert!(!l.succeeded(|| unreachable!("already said")));
        // ...and does not reopen the window: flapping stays quiet.
        for _ in 0..100 {
            assert!(!l.failed(|| unreachable!("suppressed")));
            assert!(!l.succeeded(|| unreachable!("nothing new was logged")));
        }
        let l = WarnLimiter::new("test", Duration::ZERO);
        assert!(l.failed(|| "a".into()));
        assert!(l.failed(|| "b".into()));
        assert!(l.succeeded(|| "c".into()));
    }

    #[test]
    fn posts_the_body_and_returns_the_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers plus the 5-byte body.
            while !got.ends_with(b"hello") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                got.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let client = BlockingClient::new(Duration::from_secs(5), "test");
        let req = Request::post(format!("http://127.0.0.1:{port}/v1/metrics"))
            .header("content-type", "application/x-protobuf")
            .body(Bytes::from_static(b"hello"))
            .unwrap();
        let resp = client.send(req).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(&resp.body()[..], b"ok");
        let head = server.join().unwrap();
        assert!(head.starts_with("POST /v1/metrics HTTP/1.1\r\n"), "{head}");
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: application/x-protobuf"));
    }

    #[test]
    fn a_silent_collector_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts (the kernel does) but never answers.
        let client = BlockingClient::new(Duration::from_millis(300), "test");
        let req = Request::post(format!("http://127.0.0.1:{port}/v1/traces"))
            .body(Bytes::from_static(b"x"))
            .unwrap();
        let start = Instant::now();
        assert!(client.send(req).is_err());
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(listener);
    }
}
