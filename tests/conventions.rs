//! gRPC conventions any gRPC tool relies on: health checking, server
//! reflection, deadlines, gzip, keepalive and dead peers, connection and
//! stream limits.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::uri::PathAndQuery;
use prost::Message;
use sluice::proto::{self, health, reflection_v1 as refl};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request};
use tonic_prost::ProstCodec;

async fn check(c: &mut Client, service: &str) -> Result<i32, tonic::Status> {
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(health::HealthCheckRequest {
            service: service.into(),
        }),
        PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
        ProstCodec::<health::HealthCheckRequest, health::HealthCheckResponse>::default(),
    )
    .await
    .map(|r| r.into_inner().status)
}

async fn watch(c: &mut Client, service: &str) -> tonic::Streaming<health::HealthCheckResponse> {
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    grpc.server_streaming(
        Request::new(health::HealthCheckRequest {
            service: service.into(),
        }),
        PathAndQuery::from_static("/grpc.health.v1.Health/Watch"),
        ProstCodec::<health::HealthCheckRequest, health::HealthCheckResponse>::default(),
    )
    .await
    .unwrap()
    .into_inner()
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;
const SERVICE_UNKNOWN: i32 = 3;

#[tokio::test]
async fn health_check_and_watch() {
    let mut server = Server::start();
    let mut c = server.client().await;
    assert_eq!(check(&mut c, "").await.unwrap(), SERVING);
    assert_eq!(check(&mut c, "sluice.v1.Sluice").await.unwrap(), SERVING);
    assert_eq!(
        check(&mut c, "nope.Service").await.unwrap_err().code(),
        Code::NotFound
    );

    let mut unknown = watch(&mut c, "nope.Service").await;
    let first = tokio::time::timeout(Duration::from_secs(5), unknown.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, SERVICE_UNKNOWN);

    let mut w = watch(&mut c, "").await;
    let first = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.status, SERVING,
        "Watch sends the current status at once"
    );

    // Shutdown starts: the watcher hears NOT_SERVING.
    server.signal(15);
    let next = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("a change");
    assert_eq!(next.unwrap().unwrap().status, NOT_SERVING);
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
}

async fn reflect(
    c: &mut Client,
    path: &'static str,
    reqs: Vec<refl::ServerReflectionRequest>,
) -> Vec<refl::ServerReflectionResponse> {
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    let n = reqs.len();
    let (tx, rx) = mpsc::channel(16);
    for r in reqs {
        tx.send(r).await.unwrap();
    }
    let mut stream = grpc
        .streaming(
            Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(path),
            ProstCodec::<refl::ServerReflectionRequest, refl::ServerReflectionResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push(m);
    }
    drop(tx);
    out
}

fn req(r: refl::server_reflection_request::MessageRequest) -> refl::ServerReflectionRequest {
    refl::ServerReflectionRequest {
        host: "localhost".into(),
        message_request: Some(r),
    }
}

#[tokio::test]
async fn reflection_lists_services_and_serves_descriptors_v1_and_v1alpha() {
    use refl::server_reflection_request::MessageRequest as Q;
    use refl::server_reflection_response::MessageResponse as A;
    let server = Server::start();
    let mut c = server.client().await;
    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        let answers = reflect(
            &mut c,
            path,
            vec![
                req(Q::ListServices(String::new())),
                req(Q::FileContainingSymbol("sluice.v1.Sluice".into())),
                req(Q::FileContainingSymbol(
                    "sluice.v1.SubscribeUpstream".into(),
                )),
                req(Q::FileByFilename("grpc/health/v1/health.proto".into())),
                req(Q::FileContainingSymbol("no.such.Symbol".into())),
            ],
        )
        .await;
        let Some(A::ListServicesResponse(list)) = &answers[0].message_response else {
            panic!("{:?}", answers[0])
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"sluice.v1.Sluice"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("grpc.reflection.")),
            "{names:?}"
        );
        for a in &answers[1..3] {
            let Some(A::FileDescriptorResponse(f)) = &a.message_response else {
                panic!("{a:?}")
            };
            let file = prost_types::FileDescriptorProto::decode(f.file_descriptor_proto[0].clone())
                .unwrap();
            assert_eq!(file.package(), "sluice.v1");
            let svc = file.service.iter().find(|s| s.name() == "Sluice").unwrap();
            let methods: Vec<_> = svc.method.iter().map(|m| m.name()).collect();
            assert_eq!(
                methods,
                [
                    "Publish",
                    "BatchPublish",
                    "ListTopics",
                    "Subscribe",
                    "GetTopicStats",
                    "DeleteTopic",
                    "DeleteConsumerGroup",
                    "ResetCursor"
                ]
            );
            let sub = svc.method.iter().find(|m| m.name() == "Subscribe").unwrap();
            assert!(sub.client_streaming() && sub.server_streaming());
            assert_eq!(sub.input_type(), ".sluice.v1.SubscribeUpstream");
        }
        let Some(A::FileDescriptorResponse(f)) = &answers[3].message_response else {
            panic!()
        };
        let file =
            prost_types::FileDescriptorProto::decode(f.file_descriptor_proto[0].clone()).unwrap();
        assert_eq!(file.package(), "grpc.health.v1");
        let Some(A::ErrorResponse(e)) = &answers[4].message_response else {
            panic!("{:?}", answers[4])
        };
        assert_eq!(e.error_code, Code::NotFound as i32);
        assert_eq!(answers[0].valid_host, "localhost");
        assert!(answers[1].original_request.is_some());
    }
}

#[tokio::test]
async fn an_expired_deadline_cancels_the_call() {
    let server = Server::start();
    let mut c = server.client().await;
    // A Subscribe with nothing to deliver outlives a 300 ms deadline.
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(init("quiet", "g", proto::InitialPosition::Latest))
        .await
        .unwrap();
    tx.send(credit(10)).await.unwrap();
    let mut r = Request::new(ReceiverStream::new(rx));
    r.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut stream = grpc
        .streaming(
            r,
            path("Subscribe"),
            ProstCodec::<proto::SubscribeUpstream, proto::SubscribeDownstream>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("stream ended");
    let err = end.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    drop(tx);
    // A call within its deadline is unaffected.
    let mut req = Request::new(proto::PublishRequest {
        topic: "t".into(),
        payload: Bytes::from_static(b"x"),
        attributes: Default::default(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(5));
    let ok: tonic::Response<proto::PublishResponse> = c.unary_req("Publish", req).await.unwrap();
    assert!(ok.into_inner().sequence > 0);
}

#[tokio::test]
async fn gzip_both_ways() {
    let server = Server::start();
    let mut c = server.client().await;
    let mut gz = c
        .grpc
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    gz.ready().await.unwrap();
    let payload = vec![b'z'; 100_000];
    let resp = gz
        .unary(
            Request::new(proto::PublishRequest {
                topic: "gz".into(),
                payload: payload.clone().into(),
                attributes: Default::default(),
                ..Default::default()
            }),
            path("Publish"),
            ProstCodec::<proto::PublishRequest, proto::PublishResponse>::default(),
        )
        .await
        .unwrap();
    assert!(resp.into_inner().sequence > 0);
    // A large response comes back compressed to a client that asked for gzip.
    let mut big = c
        .grpc
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    for i in 0..40 {
        c.publish(&format!("gz-topic-with-a-long-name-{i:03}"), b"x")
            .await
            .unwrap();
    }
    big.ready().await.unwrap();
    let list = big
        .unary(
            Request::new(proto::ListTopicsRequest {}),
            path("ListTopics"),
            ProstCodec::<proto::ListTopicsRequest, proto::ListTopicsResponse>::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        list.metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    assert_eq!(list.into_inner().topics.len(), 41);
    // Subscribe: deliveries of a compressible payload arrive intact.
    let (tx, rx) = mpsc::channel(4);
    tx.send(init("gz", "g", proto::InitialPosition::Earliest))
        .await
        .unwrap();
    tx.send(credit(1)).await.unwrap();
    let mut s = c
        .grpc
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    s.ready().await.unwrap();
    let resp = s
        .streaming(
            Request::new(ReceiverStream::new(rx)),
            path("Subscribe"),
            ProstCodec::<proto::SubscribeUpstream, proto::SubscribeDownstream>::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    let mut down = resp.into_inner();
    let m = tokio::time::timeout(Duration::from_secs(5), down.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(proto::subscribe_downstream::Response::Delivery(d)) = m.response else {
        panic!("{m:?}")
    };
    assert_eq!(d.payload.as_ref(), payload.as_slice());
    drop(tx);
}

#[tokio::test]
async fn unsupported_encoding_is_unimplemented_with_the_accepted_list() {
    let server = Server::start();
    let mut c = server.client().await;
    let mut grpc = c.grpc.clone();
    grpc.ready().await.unwrap();
    let mut r = Request::new(proto::ListTopicsRequest {});
    r.metadata_mut()
        .insert("grpc-encoding", "br".parse().unwrap());
    let err = grpc
        .unary(
            r,
            path("ListTopics"),
            ProstCodec::<proto::ListTopicsRequest, proto::ListTopicsResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("gzip") && err.message().contains("identity"),
        "{}",
        err.message()
    );
    c.list_topics().await.unwrap();
}

/// Reads until EOF or error; true when the server closed the socket in time.
fn closed_within(sock: &mut std::net::TcpStream, limit: Duration) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
    false
}

#[tokio::test]
async fn dead_peers_are_dropped_and_live_idle_streams_are_kept() {
    let server = Server::start_with(&[
        "--keepalive-interval",
        "200ms",
        // Room for a loaded machine to answer in time; dead peers still go
        // well within the 5 s the checks below allow.
        "--keepalive-timeout",
        "1500ms",
    ]);
    // A peer that connects and never speaks HTTP/2.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    // A peer that does the handshake, then never reads or answers pings.
    let mut mute = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    mute.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
                                                           // A healthy client with an idle Subscribe stream (its h2 stack answers pings).
    let mut c = server.client().await;
    let mut sub = c
        .subscribe("idle", "g", proto::InitialPosition::Latest)
        .await;
    sub.send(credit(1)).await;
    let (s, m) = tokio::task::spawn_blocking(move || {
        let s = closed_within(&mut silent, Duration::from_secs(5));
        let m = closed_within(&mut mute, Duration::from_secs(5));
        (s, m)
    })
    .await
    .unwrap();
    assert!(s, "a peer that never handshakes is dropped");
    assert!(m, "a peer that never answers pings is dropped");
    // The live stream survived several keepalive rounds and still delivers.
    c.publish("idle", b"still here").await.unwrap();
    assert_eq!(
        sub.delivery(Duration::from_secs(5)).await.payload.as_ref(),
        b"still here"
    );
}

#[tokio::test]
async fn connection_limit_refuses_extra_connections() {
    let server = Server::start_with(&["--max-connections", "2"]);
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.publish("t", b"a").await.unwrap();
    b.publish("t", b"b").await.unwrap();
    // Both have a stream open, so neither is closed to make room.
    let _sa = a.subscribe("t", "ga", proto::InitialPosition::Latest).await;
    let _sb = b.subscribe("t", "gb", proto::InitialPosition::Latest).await;
    let mut third = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    third
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    let closed =
        tokio::task::spawn_blocking(move || closed_within(&mut third, Duration::from_secs(5)))
            .await
            .unwrap();
    assert!(closed, "a connection past --max-connections is closed");
    a.publish("t", b"a2").await.unwrap();
    drop(b);
}

#[tokio::test]
async fn stream_limit_holds_extra_streams_back() {
    let server = Server::start_with(&["--max-concurrent-streams", "2"]);
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();
    let _s1 = c.subscribe("t", "g1", proto::InitialPosition::Latest).await;
    let _s2 = c.subscribe("t", "g2", proto::InitialPosition::Latest).await;
    // Both streams stay open: a third call on this connection must wait.
    let mut c3 = c.clone();
    let third = tokio::spawn(async move { c3.list_topics().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "the peer may not exceed SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    drop(_s1);
    let r = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("admitted once a stream ended");
    assert!(r.unwrap().is_ok());
}

#[tokio::test]
async fn client_keepalive_pings_are_tolerated_on_idle_streams() {
    let server = Server::start();
    // A client pinging far more often than every 10 s.
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(100))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .unwrap();
    let mut c = Client {
        grpc: tonic::client::Grpc::new(channel),
    };
    let mut sub = c
        .subscribe("pinged", "g", proto::InitialPosition::Latest)
        .await;
    sub.send(credit(1)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.publish("pinged", b"after many pings").await.unwrap();
    assert_eq!(
        sub.delivery(Duration::from_secs(5)).await.payload.as_ref(),
        b"after many pings"
    );
}

/// Encodes one HPACK header as "literal without indexing" with a name from
/// the static table (index < 15) or a literal name.
fn hpack_literal(out: &mut Vec<u8>, name_index: Option<u8>, name: &str, value: &str) {
    match name_index {
        Some(i) => out.push(i),
        None => {
            out.push(0);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
        }
    }
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![
        (payload.len() >> 16) as u8,
        (payload.len() >> 8) as u8,
        payload.len() as u8,
        kind,
        flags,
    ];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn streams_past_the_limit_are_refused() {
    let server = Server::start_with(&["--max-concurrent-streams", "2"]);
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    sock.write_all(&frame(4, 0, 0, &[])).unwrap(); // SETTINGS
                                                   // Let the server's SETTINGS (with its limit) arrive, and acknowledge it.
    std::thread::sleep(Duration::from_millis(300));
    sock.write_all(&frame(4, 1, 0, &[])).unwrap();
    // Three Subscribe streams (left open) on a connection allowed two.
    for stream in [1u32, 3, 5] {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (indexed)
        hpack_literal(&mut block, Some(4), ":path", "/sluice.v1.Sluice/Subscribe");
        hpack_literal(&mut block, Some(1), ":authority", "localhost");
        hpack_literal(&mut block, None, "content-type", "application/grpc");
        hpack_literal(&mut block, None, "te", "trailers");
        sock.write_all(&frame(1, 0x4, stream, &block)).unwrap(); // HEADERS, END_HEADERS
    }
    // Read frames until an RST_STREAM for stream 5 (REFUSED_STREAM = 7).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut refused = None;
    while Instant::now() < deadline && refused.is_none() {
        match sock.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (buf[at] as usize) << 16 | (buf[at + 1] as usize) << 8 | buf[at + 2] as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let (kind, stream) = (
                buf[at + 3],
                u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                    & 0x7fff_ffff,
            );
            if kind == 3 && len == 4 {
                let p = &buf[at + 9..at + 13];
                refused = Some((stream, u32::from_be_bytes([p[0], p[1], p[2], p[3]])));
            }
            at += 9 + len;
        }
    }
    assert_eq!(
        refused,
        Some((5, 7)),
        "the third stream is refused with REFUSED_STREAM"
    );
}
