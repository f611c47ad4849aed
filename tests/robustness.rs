//! Black-box robustness tests: hostile or broken peers (garbage bytes,
//! HTTP/1.1, clients vanishing mid-message or mid-stream), the gRPC layer
//! seen through a raw HTTP/2 client, many streams on one connection, and
//! durability across SIGKILL and SIGTERM under load.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use http::{HeaderMap, Request, StatusCode};
use prost::Message;
use sluice::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Deterministic pseudo-random bytes (xorshift64).
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads until the peer closes the connection (EOF or reset). Returns the
/// bytes read, or None if the connection is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn alive(server: &mut Server) -> bool {
    match server.child.as_mut() {
        Some(c) => c.try_wait().unwrap().is_none(),
        None => false,
    }
}

/// A publisher that keeps publishing on its own connection until stopped;
/// any failure or hang is reported by `stop`.
struct Background {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

impl Background {
    fn start(mut client: Client, topic: &str) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), ok.clone());
        let topic = topic.to_string();
        let handle = tokio::spawn(async move {
            let mut ok = 0u64;
            for n in 0..1_000_000u64 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let payload = format!("bg-{n}");
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    client.publish(&topic, payload.as_bytes()),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        ok += 1;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(s)) => return Err(format!("background publish {n} failed: {s:?}")),
                    Err(_) => return Err(format!("background publish {n} hung for 5 s")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(ok)
        });
        Background { stop, ok, handle }
    }

    /// Waits (up to 5 s) until it has published `n` more messages.
    async fn progress(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "background publisher stalled");
            assert!(!self.handle.is_finished(), "background publisher stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops it; panics if any publish failed or none succeeded.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let n = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("background publisher did not stop")
            .expect("background task panicked")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "the background publisher never succeeded");
        n
    }
}

/// A raw HTTP/2 client connection (h2) and the task driving it.
struct RawConn {
    h2: SendRequest<Bytes>,
    driver: JoinHandle<()>,
    port: u16,
}

impl RawConn {
    /// Connects; with `reset_on_close` the socket is closed with RST (SO_LINGER 0).
    async fn connect(port: u16, reset_on_close: bool) -> RawConn {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp connect");
        tcp.set_nodelay(true).unwrap();
        if reset_on_close {
            tcp.set_zero_linger().unwrap();
        }
        let (h2, conn) = tokio::time::timeout(Duration::from_secs(5), h2::client::handshake(tcp))
            .await
            .expect("h2 handshake hung")
            .expect("h2 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        RawConn { h2, driver, port }
    }

    fn request(&self, method: &str) -> http::request::Builder {
        Request::builder()
            .method("POST")
            .uri(format!(
                "http://127.0.0.1:{}/sluice.v1.Sluice/{method}",
                self.port
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
    }

    /// Opens a stream (waiting for a stream slot).
    async fn open(
        &mut self,
        req: Request<()>,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
        let mut ready = tokio::time::timeout(Duration::from_secs(5), self.h2.clone().ready())
            .await
            .expect("h2 ready hung")?;
        ready.send_request(req, end)
    }

    /// Drops the TCP connection abruptly (no RST_STREAM, no GOAWAY).
    async fn vanish(self) {
        self.driver.abort();
        let _ = self.driver.await;
        drop(self.h2);
    }

    /// A complete, valid Publish over this connection; returns its sequence.
    async fn publish_ok(&mut self, topic: &str, payload: &[u8]) -> u64 {
        let body = proto::PublishRequest {
            topic: topic.into(),
            payload: payload.to_vec().into(),
            attributes: Default::default(),
            ..Default::default()
        }
        .encode_to_vec();
        let (resp, mut send) = self
            .open(self.request("Publish").body(()).unwrap(), false)
            .await
            .expect("open stream");
        send.send_data(frame(0, &body).into(), true).unwrap();
        let r = reply(resp, Duration::from_secs(5)).await;
        assert_eq!(r.grpc_status(), Some(0), "raw publish failed: {r:?}");
        proto::PublishResponse::decode(unframe(&r.body))
            .expect("PublishResponse")
            .sequence
    }
}

/// A gRPC length-prefixed message.
fn frame(flag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The single message of a unary response body.
fn unframe(body: &[u8]) -> &[u8] {
    assert!(body.len() >= 5, "response body too short: {body:?}");
    assert_eq!(body[0], 0, "response compressed flag");
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    assert_eq!(body.len(), 5 + len, "response body is exactly one message");
    &body[5..]
}

/// Pops one complete length-prefixed message off `buf`.
fn take_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    let msg = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Some(msg)
}

/// A whole raw HTTP/2 response.
#[derive(Debug)]
struct RawReply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

impl RawReply {
    /// A gRPC header from the trailers, or from HEADERS (Trailers-Only).
    fn grpc(&self, name: &str) -> Option<&http::HeaderValue> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .or_else(|| self.headers.get(name))
    }

    fn grpc_status(&self) -> Option<u32> {
        self.grpc("grpc-status").map(|v| {
            v.to_str()
                .expect("ascii grpc-status")
                .parse()
                .expect("numeric grpc-status")
        })
    }

    fn grpc_message_raw(&self) -> Vec<u8> {
        self.grpc("grpc-message")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

/// Awaits the response HEADERS, body and trailers, all within `limit`.
async fn reply(resp: ResponseFuture, limit: Duration) -> RawReply {
    tokio::time::timeout(limit, async move {
        let resp = resp.await.expect("response");
        let (parts, mut recv) = resp.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("response body");
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.expect("trailers");
        RawReply {
            status: parts.status,
            headers: parts.headers,
            body,
            trailers,
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no complete response within {limit:?}"))
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

fn browse_init(topic: &str) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                consumer_group: String::new(),
                consumer_id: "verify".into(),
                initial_position: proto::InitialPosition::Earliest as i32,
                offset: 0,
                mode: proto::SubscriptionMode::Browse as i32,
                ..Default::default()
            },
        )),
    }
}

/// Every message of `topic` (BROWSE from the start): reads until every
/// sequence in `want` arrived and then 500 ms of quiet, or until `limit`.
async fn read_topic(
    c: &mut Client,
    topic: &str,
    want: &HashSet<u64>,
    limit: Duration,
) -> Vec<proto::MessageDelivery> {
    let mut sub = c
        .subscribe_with(browse_init(topic))
        .await
        .expect("browse subscribe");
    sub.send(credit(1_000_000_000)).await;
    let deadline = Instant::now() + limit;
    let mut missing = want.clone();
    let mut got = Vec::new();
    loop {
        let wait = if missing.is_empty() {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match sub.next_within(wait).await {
            Some(Ok(proto::SubscribeDownstream {
                response: Some(proto::subscribe_downstream::Response::Delivery(d)),
            })) => {
                missing.remove(&d.sequence);
                got.push(d);
            }
            Some(Ok(_)) if Instant::now() < deadline => continue,
            Some(Ok(_)) => break,
            Some(Err(s)) => panic!("browse stream on {topic} failed: {s:?}"),
            None => break,
        }
    }
    got
}

// ---------------------------------------------------------------------------
// 1, 2: garbage and HTTP/1.1 on a raw socket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_bytes_close_the_connection_and_others_keep_publishing() {
    let mut server = Server::start();
    let mut c = server.client().await;
    c.publish("bg", b"before").await.unwrap();
    let bg = Background::start(server.client().await, "bg");
    for round in 0..10u64 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        // Even rounds: no preface at all. Odd rounds: a valid preface, then
        // a "frame" whose length (0xff....) exceeds any frame size.
        let mut bytes = if round % 2 == 0 {
            Vec::new()
        } else {
            PREFACE.to_vec()
        };
        let mut g = garbage(round + 1, 8192);
        g[0] = 0xff;
        bytes.extend(g);
        let _ = s.write_all(&bytes).await; // the server may already have closed
        let got = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(
            got.is_some(),
            "round {round}: connection still open 5 s after garbage"
        );
        bg.progress(2).await;
    }
    assert!(alive(&mut server), "server died");
    let mut fresh = server.client().await;
    fresh
        .publish("bg", b"after")
        .await
        .expect("publish after garbage");
    c.publish("bg", b"after, old connection")
        .await
        .expect("publish on an older connection");
    bg.stop().await;
}

#[tokio::test]
async fn http1_request_is_dropped_and_broker_keeps_serving() {
    let mut server = Server::start();
    let bg = Background::start(server.client().await, "bg");
    for _ in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(5)).await;
        let got = got.expect("HTTP/1.1 connection still open after 5 s");
        // Either nothing, the server's own SETTINGS frame, or an HTTP/1.1
        // error answer; never a successful HTTP/1.1 response.
        assert!(
            !got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        bg.progress(2).await;
    }
    assert!(alive(&mut server), "server died");
    server
        .client()
        .await
        .publish("bg", b"after")
        .await
        .expect("publish after HTTP/1.1");
    bg.stop().await;
}

// ---------------------------------------------------------------------------
// 3: clients vanishing mid-message and mid-stream
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_vanishing_mid_publish_body_is_harmless() {
    let mut server = Server::start();
    let bg = Background::start(server.client().await, "bg");
    let body = proto::PublishRequest {
        topic: "halfbody".into(),
        payload: vec![0xabu8; 20_000].into(),
        attributes: Default::default(),
        ..Default::default()
    }
    .encode_to_vec();
    let framed = frame(0, &body);
    let partial = &framed[..5 + body.len() / 2];
    for round in 0..8 {
        let mut conn = RawConn::connect(server.port, round % 2 == 1).await;
        let (resp, mut send) = conn
            .open(conn.request("Publish").body(()).unwrap(), false)
            .await
            .unwrap();
        send.send_data(Bytes::copy_from_slice(&framed[..5]), false)
            .unwrap();
        send.send_data(Bytes::copy_from_slice(&partial[5..]), false)
            .unwrap();
        // Let the frames reach the server before the connection disappears.
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(resp);
        drop(send);
        conn.vanish().await;
        bg.progress(2).await;
    }
    // A stream reset mid-body must leave the connection usable.
    let mut conn = RawConn::connect(server.port, false).await;
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    send.send_data(Bytes::copy_from_slice(partial), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send.send_reset(h2::Reason::CANCEL);
    drop(resp);
    let seq = conn.publish_ok("after", b"same connection").await;
    assert!(seq > 0);

    assert!(alive(&mut server), "server died");
    let mut c = server.client().await;
    c.publish("bg", b"after")
        .await
        .expect("publish after vanished clients");
    let topics: Vec<_> = c
        .list_topics()
        .await
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        !topics.contains(&"halfbody".to_string()),
        "a half-sent message created its topic: {topics:?}"
    );
    bg.stop().await;
}

#[tokio::test]
async fn subscriber_vanishing_while_deliveries_flow_is_harmless() {
    const ROUNDS: u32 = 5;
    let mut server = Server::start();
    let mut c = server.client().await;
    let payload = vec![b'x'; 1024];
    let mut first_seq = 0;
    for i in 0..40 {
        let msgs: Vec<&[u8]> = (0..50).map(|_| payload.as_slice()).collect();
        let r = c.batch_publish("flow", &msgs).await.unwrap();
        if i == 0 {
            first_seq = r.results[0].sequence;
        }
    }
    let bg = Background::start(server.client().await, "flow");
    for round in 0..ROUNDS {
        let mut conn = RawConn::connect(server.port, round % 2 == 0).await;
        let (resp, mut send) = conn
            .open(conn.request("Subscribe").body(()).unwrap(), false)
            .await
            .unwrap();
        let mut up = frame(
            0,
            &init("flow", "g", proto::InitialPosition::Earliest).encode_to_vec(),
        );
        up.extend(frame(0, &credit(1_000_000).encode_to_vec()));
        send.send_data(up.into(), false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("subscribe headers")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut recv = resp.into_body();
        let mut buf = Vec::new();
        let mut first = None;
        let mut received = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Take ~256 KiB of deliveries, then vanish with more on the way.
        while received < 256 * 1024 {
            let chunk = tokio::time::timeout_at(deadline, recv.data())
                .await
                .expect("deliveries stalled")
                .expect("stream ended early")
                .expect("stream failed");
            let _ = recv.flow_control().release_capacity(chunk.len());
            received += chunk.len();
            buf.extend_from_slice(&chunk);
            if first.is_none() {
                if let Some(m) = take_message(&mut buf) {
                    first = Some(proto::SubscribeDownstream::decode(m.as_slice()).unwrap());
                }
            }
        }
        match first.and_then(|f| f.response) {
            Some(proto::subscribe_downstream::Response::Delivery(d)) => {
                assert_eq!(d.sequence, first_seq);
                assert_eq!(
                    d.delivery_count,
                    round + 1,
                    "delivery_count counts deliveries across reconnects"
                );
            }
            other => panic!("first downstream message is not a delivery: {other:?}"),
        }
        drop(send);
        conn.vanish().await;
        bg.progress(2).await;
    }
    assert!(alive(&mut server), "server died");
    // The group is usable by a new consumer, which gets everything again.
    let mut sub = c
        .subscribe("flow", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    let d = sub.delivery(Duration::from_secs(5)).await;
    assert_eq!(d.sequence, first_seq);
    assert_eq!(d.delivery_count, ROUNDS + 1);
    c.publish("flow", b"after")
        .await
        .expect("publish after vanished subscribers");
    bg.stop().await;
}

// ---------------------------------------------------------------------------
// 4: the gRPC layer through a raw HTTP/2 client
// ---------------------------------------------------------------------------

#[tokio::test]
async fn raw_non_grpc_content_type_is_415() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!(
            "http://127.0.0.1:{}/sluice.v1.Sluice/Publish",
            server.port
        ))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut send) = conn.open(req, false).await.unwrap();
    send.send_data(Bytes::from_static(b"{\"topic\":\"t\"}"), true)
        .unwrap();
    let r = reply(resp, Duration::from_secs(5)).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{r:?}");
    // The connection is still usable.
    conn.publish_ok("t", b"x").await;
}

#[tokio::test]
async fn raw_oversized_length_prefix_is_resource_exhausted_before_the_body() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    let declared: u32 = 5 * 1024 * 1024;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&declared.to_be_bytes());
    send.send_data(prefix.into(), false).unwrap();
    // The stream stays open from the client's side: no body, no END_STREAM.
    let r = reply(resp, Duration::from_secs(2)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.grpc_status(), Some(8), "{r:?}");
    drop(send);
    conn.publish_ok("t", b"x").await;
}

#[tokio::test]
async fn raw_compressed_flag_without_encoding_is_internal() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let body = proto::PublishRequest {
        topic: "t".into(),
        payload: b"p".to_vec().into(),
        attributes: Default::default(),
        ..Default::default()
    }
    .encode_to_vec();
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    send.send_data(frame(1, &body).into(), true).unwrap();
    let r = reply(resp, Duration::from_secs(5)).await;
    assert_eq!(r.grpc_status(), Some(13), "{r:?}");
    conn.publish_ok("t", b"x").await;
}

#[tokio::test]
async fn raw_unsupported_grpc_encoding_is_unimplemented_listing_accepted_ones() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let body = proto::PublishRequest {
        topic: "t".into(),
        payload: b"p".to_vec().into(),
        attributes: Default::default(),
        ..Default::default()
    }
    .encode_to_vec();
    let req = conn
        .request("Publish")
        .header("grpc-encoding", "snappy")
        .body(())
        .unwrap();
    let (resp, mut send) = conn.open(req, false).await.unwrap();
    send.send_data(frame(1, &body).into(), true).unwrap();
    let r = reply(resp, Duration::from_secs(5)).await;
    assert_eq!(r.grpc_status(), Some(12), "{r:?}");
    let msg = String::from_utf8(percent_decode(&r.grpc_message_raw())).unwrap();
    assert!(
        msg.contains("identity"),
        "grpc-message should list accepted encodings: {msg:?}"
    );
    let accept = r
        .grpc("grpc-accept-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        accept.as_deref().is_some_and(|a| a.contains("identity")),
        "grpc-accept-encoding: {accept:?}"
    );
    conn.publish_ok("t", b"x").await;
}

#[tokio::test]
async fn raw_message_in_one_byte_data_frames_is_reassembled() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let req_msg = proto::PublishRequest {
        topic: "bytes".into(),
        payload: payload.clone().into(),
        attributes: [("k".to_string(), "v".to_string())].into_iter().collect(),
        ..Default::default()
    };
    let wire = frame(0, &req_msg.encode_to_vec());
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    for (i, b) in wire.iter().enumerate() {
        send.send_data(Bytes::copy_from_slice(&[*b]), i + 1 == wire.len())
            .unwrap();
    }
    let r = reply(resp, Duration::from_secs(10)).await;
    assert_eq!(r.grpc_status(), Some(0), "{r:?}");
    assert!(
        r.trailers.is_some(),
        "an OK response carries its status in trailers"
    );
    let seq = proto::PublishResponse::decode(unframe(&r.body))
        .unwrap()
        .sequence;
    let mut c = server.client().await;
    let mut sub = c
        .subscribe("bytes", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    let d = sub.delivery(Duration::from_secs(5)).await;
    assert_eq!(d.sequence, seq);
    assert_eq!(d.payload.as_ref(), payload.as_slice());
    assert_eq!(d.attributes, req_msg.attributes);
}

#[tokio::test]
async fn raw_grpc_message_is_percent_encoded() {
    let server = Server::start();
    let mut conn = RawConn::connect(server.port, false).await;
    let body = proto::PublishRequest {
        topic: "ü".into(),
        payload: b"p".to_vec().into(),
        attributes: Default::default(),
        ..Default::default()
    }
    .encode_to_vec();
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    send.send_data(frame(0, &body).into(), true).unwrap();
    let r = reply(resp, Duration::from_secs(5)).await;
    assert_eq!(r.grpc_status(), Some(3), "{r:?}");
    let raw = r.grpc_message_raw();
    assert!(
        raw.iter().all(|b| (0x20..=0x7e).contains(b)),
        "grpc-message is not printable ASCII: {raw:?}"
    );
    let text = String::from_utf8(raw.clone()).unwrap();
    assert!(text.contains("%C3%BC"), "{text}");
    let decoded = String::from_utf8(percent_decode(&raw)).unwrap();
    assert!(decoded.contains('ü'), "{decoded}");
}

// ---------------------------------------------------------------------------
// 5: many concurrent streams on one connection
// ---------------------------------------------------------------------------

#[tokio::test]
async fn many_concurrent_streams_on_one_connection_all_succeed() {
    let server = Server::start();
    let c = server.client().await;
    for (round, calls) in [200usize, 1000].into_iter().enumerate() {
        let mut tasks = Vec::new();
        for i in 0..calls {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.publish(&format!("cc{}", i % 5), format!("{round}-{i}").as_bytes())
                    .await
            }));
        }
        let results = tokio::time::timeout(Duration::from_secs(60), async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
        .await
        .expect("concurrent publishes hung");
        let mut seqs = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            seqs.push(
                r.unwrap_or_else(|s| panic!("call {i} of {calls} failed: {s:?}"))
                    .sequence,
            );
        }
        let unique: HashSet<_> = seqs.iter().collect();
        assert_eq!(unique.len(), calls);
    }
}

// ---------------------------------------------------------------------------
// 6, 7: durability under load across SIGKILL and SIGTERM
// ---------------------------------------------------------------------------

const TASKS: usize = 8;
/// Tasks at or above this index use BatchPublish (3 messages per call).
const FIRST_BATCH_TASK: usize = 6;
const BATCH: u64 = 3;

fn load_topic(task: usize) -> String {
    format!("load{}", task % 3)
}

fn load_payload(task: usize, n: u64) -> Vec<u8> {
    let mut p = format!("task={task};n={n};").into_bytes();
    let extra = (n as usize * 37 + task * 11) % 700;
    p.extend((0..extra).map(|i| (i as u64 * 131 + n + task as u64) as u8));
    p
}

fn load_attrs(task: usize, n: u64) -> HashMap<String, String> {
    let mut a = HashMap::new();
    a.insert("task".to_string(), task.to_string());
    a.insert("n".to_string(), n.to_string());
    a.insert(format!("k{}", n % 3), format!("ü-{n}-{task}"));
    a
}

#[derive(Debug, Clone)]
struct Acked {
    topic: String,
    seq: u64,
    task: usize,
    n: u64,
}

#[derive(Debug, Default)]
struct TaskResult {
    acked: Vec<Acked>,
    /// Calls that failed: (started at, status).
    failed: Vec<(Instant, tonic::Status)>,
    /// Calls with no answer within 10 s.
    hung: usize,
    /// Message counters handed out (the next unsent one).
    next_n: u64,
}

struct Load {
    tasks: Vec<JoinHandle<TaskResult>>,
}

impl Load {
    /// TASKS publishers over TASKS/2 connections, each publishing in a loop
    /// until it gets an error (or hangs).
    async fn start(server: &Server) -> Load {
        let mut clients = Vec::new();
        for _ in 0..TASKS / 2 {
            clients.push(server.client().await);
        }
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let mut c = clients[task / 2].clone();
            tasks.push(tokio::spawn(async move {
                let topic = load_topic(task);
                let mut r = TaskResult::default();
                for _ in 0..1_000_000 {
                    let started = Instant::now();
                    let n0 = r.next_n;
                    let call = async {
                        if task >= FIRST_BATCH_TASK {
                            r.next_n += BATCH;
                            let req = proto::BatchPublishRequest {
                                topic: topic.clone(),
                                messages: (n0..n0 + BATCH)
                                    .map(|n| proto::BatchMessage {
                                        payload: load_payload(task, n).into(),
                                        attributes: load_attrs(task, n),
                                        ..Default::default()
                                    })
                                    .collect(),
                            };
                            c.unary::<_, proto::BatchPublishResponse>("BatchPublish", req)
                                .await
                                .map(|b| {
                                    b.results
                                        .into_iter()
                                        .map(|x| x.sequence)
                                        .collect::<Vec<_>>()
                                })
                        } else {
                            r.next_n += 1;
                            let req = proto::PublishRequest {
                                topic: topic.clone(),
                                payload: load_payload(task, n0).into(),
                                attributes: load_attrs(task, n0),
                                ..Default::default()
                            };
                            c.unary::<_, proto::PublishResponse>("Publish", req)
                                .await
                                .map(|p| vec![p.sequence])
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(10), call).await {
                        Ok(Ok(seqs)) => {
                            let want = if task >= FIRST_BATCH_TASK {
                                BATCH as usize
                            } else {
                                1
                            };
                            assert_eq!(seqs.len(), want, "one result per message");
                            for (i, seq) in seqs.into_iter().enumerate() {
                                r.acked.push(Acked {
                                    topic: topic.clone(),
                                    seq,
                                    task,
                                    n: n0 + i as u64,
                                });
                            }
                        }
                        Ok(Err(s)) => {
                            r.failed.push((started, s));
                            break;
                        }
                        Err(_) => {
                            r.hung += 1;
                            break;
                        }
                    }
                }
                r
            }));
        }
        Load { tasks }
    }

    async fn finish(self, limit: Duration) -> Vec<TaskResult> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        for t in self.tasks {
            let r = tokio::time::timeout_at(deadline, t)
                .await
                .expect("publisher task did not finish")
                .expect("publisher panicked");
            out.push(r);
        }
        out
    }
}

/// Reads every load topic back and checks that each acknowledged message is
/// there with its sequence, payload and attributes; that nothing else is
/// there but at most the one in-flight call per task; that batches are
/// all-or-nothing. Returns the highest sequence seen.
async fn verify_after_restart(c: &mut Client, results: &[TaskResult]) -> u64 {
    let acked: Vec<&Acked> = results.iter().flat_map(|r| r.acked.iter()).collect();
    let mut max_seen = acked.iter().map(|a| a.seq).max().unwrap_or(0);
    let mut all_seqs = HashSet::new();
    let mut delivered_by_task: HashMap<usize, Vec<u64>> = HashMap::new();
    let topics: BTreeSet<String> = (0..TASKS).map(load_topic).collect();
    for topic in &topics {
        let want: HashSet<u64> = acked
            .iter()
            .filter(|a| &a.topic == topic)
            .map(|a| a.seq)
            .collect();
        let got = read_topic(c, topic, &want, Duration::from_secs(30)).await;
        let by_seq: HashMap<u64, &proto::MessageDelivery> =
            got.iter().map(|d| (d.sequence, d)).collect();
        assert_eq!(
            by_seq.len(),
            got.len(),
            "{topic}: a sequence was delivered twice"
        );
        for a in acked.iter().filter(|a| &a.topic == topic) {
            let d = by_seq.get(&a.seq).unwrap_or_else(|| {
                panic!("{topic}: acknowledged message lost: task {} n {} seq {} ({} of {} acked present)", a.task, a.n, a.seq,
                    want.iter().filter(|s| by_seq.contains_key(s)).count(), want.len())
            });
            let want_payload = load_payload(a.task, a.n);
            assert!(
                d.payload.as_ref() == want_payload.as_slice(),
                "{topic}: payload of acknowledged seq {} differs ({} bytes stored, {} sent)",
                a.seq,
                d.payload.len(),
                want_payload.len()
            );
            assert_eq!(
                d.attributes,
                load_attrs(a.task, a.n),
                "{topic}: attributes of seq {}",
                a.seq
            );
        }
        for d in &got {
            assert!(
                all_seqs.insert(d.sequence),
                "sequence {} appears in two topics",
                d.sequence
            );
            max_seen = max_seen.max(d.sequence);
            // Every stored message is one a publisher sent, intact.
            let task: usize = d
                .attributes
                .get("task")
                .expect("task attribute")
                .parse()
                .unwrap();
            let n: u64 = d.attributes.get("n").expect("n attribute").parse().unwrap();
            assert_eq!(
                &load_topic(task),
                topic,
                "message of task {task} in the wrong topic"
            );
            assert!(
                d.payload.as_ref() == load_payload(task, n).as_slice(),
                "{topic}: stored payload of seq {} (task {task} n {n}) is not what was sent",
                d.sequence
            );
            assert_eq!(d.attributes, load_attrs(task, n));
            delivered_by_task.entry(task).or_default().push(n);
        }
    }
    for (task, r) in results.iter().enumerate() {
        let mut ns = delivered_by_task.remove(&task).unwrap_or_default();
        ns.sort_unstable();
        let acked_n = r.acked.len() as u64;
        // Each task has at most one call in flight: what is stored is the
        // acknowledged prefix, plus possibly the call that got no answer.
        let step = if task >= FIRST_BATCH_TASK { BATCH } else { 1 };
        let prefix: Vec<u64> = (0..acked_n).collect();
        let with_last: Vec<u64> = (0..(acked_n + step).min(r.next_n)).collect();
        assert!(ns == prefix || ns == with_last,
            "task {task}: stored counters are not the acknowledged prefix (acked {acked_n}, sent {}, stored {:?}..)",
            r.next_n, &ns[..ns.len().min(20)]);
    }
    max_seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let mut server = Server::start();
    let load = Load::start(&server).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| server.kill9());
    let results = load.finish(Duration::from_secs(30)).await;
    let acked: usize = results.iter().map(|r| r.acked.len()).sum();
    assert!(
        acked >= 50,
        "too little was published before the kill: {acked}"
    );
    for (task, r) in results.iter().enumerate() {
        assert_eq!(r.hung, 0, "task {task}: a call hung after SIGKILL");
        assert!(
            !r.failed.is_empty(),
            "task {task}: no call failed although the server was killed"
        );
    }
    server.spawn(0);
    let mut c = server.client().await;
    let max_seen = verify_after_restart(&mut c, &results).await;
    let next = c.publish("load0", b"after restart").await.unwrap().sequence;
    assert!(
        next > max_seen,
        "sequence reused after SIGKILL: {next} <= {max_seen}"
    );
}

/// A stream the client opened after the server's final GOAWAY (its id is
/// above the GOAWAY's last-stream-id) was never processed. HTTP/2 says such
/// a stream may be retried; tonic surfaces it as INTERNAL carrying the h2
/// error `GoAway(_, NO_ERROR, Remote)` rather than UNAVAILABLE, so accept
/// exactly that shape and nothing else.
fn refused_by_goaway(status: &tonic::Status) -> bool {
    let text = format!("{status:?}");
    status.code() == Code::Internal && text.contains("GoAway(") && text.contains("NO_ERROR, Remote")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_zero_and_keeps_every_acknowledged_message() {
    let mut server = Server::start();
    let load = Load::start(&server).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let signalled = Instant::now();
    server.signal(15);
    let code = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(6)));
    let exit_after = signalled.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM (None: still running after 6 s); log:\n{}",
        server.log_text()
    );
    let results = load.finish(Duration::from_secs(20)).await;
    let acked: usize = results.iter().map(|r| r.acked.len()).sum();
    assert!(
        acked >= 50,
        "too little was published before SIGTERM: {acked}"
    );
    for (task, r) in results.iter().enumerate() {
        assert_eq!(r.hung, 0, "task {task}: a call hung after SIGTERM");
        assert_eq!(
            r.failed.len(),
            1,
            "task {task}: publishing stopped without an error"
        );
        let (started, status) = &r.failed[0];
        assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            ) || refused_by_goaway(status),
            "task {task}: unexpected status for a call refused by a stopping server: {status:?}"
        );
        // A call the server had well before the signal is drained, not failed.
        assert!(
            *started + Duration::from_secs(1) > signalled,
            "task {task}: a call started {:?} before SIGTERM failed instead of completing: {status:?}",
            signalled - *started
        );
    }
    eprintln!("exited {exit_after:?} after SIGTERM; {acked} messages acknowledged");
    server.spawn(0);
    let mut c = server.client().await;
    let max_seen = verify_after_restart(&mut c, &results).await;
    let next = c.publish("load0", b"after restart").await.unwrap().sequence;
    assert!(
        next > max_seen,
        "sequence reused after SIGTERM: {next} <= {max_seen}"
    );
}

// ---------------------------------------------------------------------------
// 8: no new connections after SIGTERM
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_sigterm_the_port_stops_accepting_and_in_flight_calls_finish() {
    let mut server = Server::start_with(&["--shutdown-grace", "5s"]);
    let port = server.port;
    // An in-flight Publish: headers and half its body sent.
    let mut conn = RawConn::connect(port, false).await;
    let body = proto::PublishRequest {
        topic: "drain".into(),
        payload: vec![5u8; 1000].into(),
        attributes: Default::default(),
        ..Default::default()
    }
    .encode_to_vec();
    let wire = frame(0, &body);
    let (resp, mut send) = conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
        .unwrap();
    send.send_data(Bytes::copy_from_slice(&wire[..500]), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    server.signal(15);
    // Until the daemon has taken the signal (it closes its listener then).
    let took = Instant::now();
    while !server.log_text().contains("shutdown: signal") {
        assert!(
            took.elapsed() < Duration::from_secs(5),
            "no shutdown within 5 s of SIGTERM; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        alive(&mut server),
        "the server exited at once although a call was in flight"
    );

    // New connections are refused, or fail their calls (never hang).
    match tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(Err(_)) => {}
        Err(_) => panic!("connect hung after SIGTERM"),
        Ok(Ok(_s)) => {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(2));
            let r = tokio::time::timeout(Duration::from_secs(4), async move {
                let ch = ch
                    .connect()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let mut c = Client {
                    grpc: tonic::client::Grpc::new(ch),
                };
                c.publish("t", b"x").await
            })
            .await
            .expect("a call on a connection made after SIGTERM hung");
            assert!(r.is_err(), "a connection made after SIGTERM was served");
        }
    }
    // A new stream on the existing connection is refused (GOAWAY or UNAVAILABLE).
    match conn
        .open(conn.request("Publish").body(()).unwrap(), false)
        .await
    {
        Err(_) => {}
        Ok((resp2, mut send2)) => {
            let body2 = proto::PublishRequest {
                topic: "drain".into(),
                payload: b"late".to_vec().into(),
                attributes: Default::default(),
                ..Default::default()
            }
            .encode_to_vec();
            let _ = send2.send_data(frame(0, &body2).into(), true);
            match tokio::time::timeout(Duration::from_secs(3), resp2)
                .await
                .expect("new stream after GOAWAY hung")
            {
                Err(_) => {}
                Ok(resp2) => {
                    let (parts, mut recv) = resp2.into_parts();
                    let status = match parts.headers.get("grpc-status") {
                        Some(s) => s.to_str().unwrap().to_string(),
                        None => {
                            while let Some(Ok(_)) = recv.data().await {}
                            let t = recv.trailers().await.ok().flatten().unwrap_or_default();
                            t.get("grpc-status")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default()
                        }
                    };
                    assert_eq!(
                        status, "14",
                        "a stream opened after SIGTERM must be UNAVAILABLE"
                    );
                }
            }
        }
    }
    // The in-flight call completes.
    send.send_data(Bytes::copy_from_slice(&wire[500..]), true)
        .unwrap();
    let r = reply(resp, Duration::from_secs(3)).await;
    assert_eq!(
        r.grpc_status(),
        Some(0),
        "the in-flight call was not drained: {r:?}"
    );
    let seq = proto::PublishResponse::decode(unframe(&r.body))
        .unwrap()
        .sequence;
    drop(send);
    conn.vanish().await;
    let code = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(6)));
    assert_eq!(
        code,
        Some(0),
        "exit after SIGTERM ({:?} since the signal)",
        signalled.elapsed()
    );

    server.spawn(0);
    let mut c = server.client().await;
    let got = read_topic(
        &mut c,
        "drain",
        &HashSet::from([seq]),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload.as_ref(), &[5u8; 1000][..]);
}
