//! Test harness: starts the real `sluice` binary on an ephemeral port with a
//! temporary data dir, and talks to it with tonic (an independent gRPC stack).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use sluice::proto;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

#[path = "../nats_harness/mod.rs"]
pub mod nats_harness;

/// A message in gRPC's length-prefixed framing (uncompressed).
pub fn grpc_frame<M: prost::Message>(m: &M) -> Bytes {
    let mut b = bytes::BytesMut::new();
    b.put_u8(0);
    b.put_u32(m.encoded_len() as u32);
    m.encode(&mut b).expect("encode");
    b.freeze()
}

/// A raw HTTP/2 client connection (no gRPC layers) with these initial
/// stream and connection windows, TCP_NODELAY on like any gRPC stack.
pub async fn raw_h2(
    port: u16,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<tokio::net::TcpStream, Bytes>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake")
}

/// The request head of a gRPC call to `method` of sluice.v1.Sluice.
pub fn grpc_request(port: u16, method: &str) -> http::Request<()> {
    http::Request::post(format!("http://127.0.0.1:{port}/sluice.v1.Sluice/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// `SLUICE_TEST_STORE=nats` runs the black-box suites against the JetStream
/// store: every `Server` then gets its own single-node `nats-server` (kept
/// across restarts of the daemon) instead of SQLite in its data dir.
pub fn store_is_nats() -> bool {
    std::env::var("SLUICE_TEST_STORE").as_deref() == Ok("nats")
}

/// True (and says so) when the suite runs on JetStream and the test checks
/// a promise only the SQLite store keeps (a row of the README's difference
/// table): the caller returns.
pub fn sqlite_only(why: &str) -> bool {
    if store_is_nats() {
        eprintln!("not run on the JetStream store (README difference table): {why}");
    }
    store_is_nats()
}

/// Held by the heavy tests of one test binary (large backlogs, purges,
/// latency comparisons) so two of them never share this 2-core machine's
/// CPU and disk at once; the others still run in parallel.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    HEAVY
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// A running broker. Killed (SIGKILL) when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub log: Arc<Mutex<String>>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// The NATS node behind the daemon when the suite runs on JetStream.
    pub nats: Option<nats_harness::SingleNode>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server {
            child: None,
            port: 0,
            dir,
            _tmp: Some(tmp),
            log: Arc::new(Mutex::new(String::new())),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: Vec::new(),
            nats: None,
        };
        s.use_nats_if_asked();
        s.spawn(0);
        s
    }

    /// Like `start_with`, with extra environment variables for the daemon.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server {
            child: None,
            port: 0,
            dir,
            _tmp: Some(tmp),
            log: Arc::new(Mutex::new(String::new())),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nats: None,
        };
        s.use_nats_if_asked();
        s.spawn(0);
        s
    }

    /// Under `SLUICE_TEST_STORE=nats` (and unless the test chose a store),
    /// starts a NATS node and points the daemon at it.
    fn use_nats_if_asked(&mut self) {
        if !store_is_nats() || self.args.iter().any(|a| a == "--store") {
            return;
        }
        let (node, _client) = nats_harness::SingleNode::start();
        self.args.extend([
            "--store".to_string(),
            node.node.url(),
            "--nats-replicas".to_string(),
            "1".to_string(),
        ]);
        self.nats = Some(node);
    }

    /// Starts (again) on `port` (0: any) with the same data dir and args.
    pub fn spawn(&mut self, port: u16) {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("sluice did not start; log:\n{}", self.log.lock().unwrap());
            });
        self.port = addr.rsplit(':').next().unwrap().parse().expect("port");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url()).await
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        let r = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(r.success());
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss_kb(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A thin sluice.v1 client on tonic's generic gRPC client.
#[derive(Clone)]
pub struct Client {
    pub grpc: tonic::client::Grpc<Channel>,
}

/// Sends raw bytes as the message body (for undecodable-protobuf tests).
#[derive(Default, Clone)]
pub struct RawCodec;
pub struct RawEnc;
pub struct RawDec;

impl Encoder for RawEnc {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

pub fn path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(format!("/sluice.v1.Sluice/{method}")).unwrap()
}

/// Upstream half of a Subscribe stream plus its downstream.
pub struct Subscription {
    pub up: mpsc::Sender<proto::SubscribeUpstream>,
    pub down: Streaming<proto::SubscribeDownstream>,
}

pub fn init(topic: &str, group: &str, pos: proto::InitialPosition) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                consumer_group: group.into(),
                consumer_id: "test".into(),
                initial_position: pos as i32,
                offset: 0,
                mode: proto::SubscriptionMode::ConsumerGroup as i32,
                ..Default::default()
            },
        )),
    }
}

pub fn credit(n: u32) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Credit(
            proto::CreditGrant { credits: n },
        )),
    }
}

pub fn ack(id: &str) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Ack(proto::Ack {
            message_id: id.into(),
        })),
    }
}

pub fn nack(id: &str, delay_ms: u32) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Nack(proto::Nack {
            message_id: id.into(),
            redelivery_delay_ms: delay_ms,
        })),
    }
}

pub fn batch_ack(ids: &[&str]) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::BatchAck(
            proto::BatchAck {
                message_ids: ids.iter().map(|s| s.to_string()).collect(),
            },
        )),
    }
}

impl Subscription {
    pub async fn send(&self, m: proto::SubscribeUpstream) {
        self.up.send(m).await.expect("upstream open");
    }

    /// The next downstream message within `limit` (None: nothing came).
    pub async fn next_within(
        &mut self,
        limit: Duration,
    ) -> Option<Result<proto::SubscribeDownstream, Status>> {
        match tokio::time::timeout(limit, self.down.message()).await {
            Err(_) => None,
            Ok(Ok(Some(m))) => Some(Ok(m)),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(Err(s)),
        }
    }

    /// The next MessageDelivery (skipping heartbeats), failing the test after `limit`.
    pub async fn delivery(&mut self, limit: Duration) -> proto::MessageDelivery {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Ok(proto::SubscribeDownstream {
                    response: Some(proto::subscribe_downstream::Response::Delivery(d)),
                })) => return d,
                Some(Ok(_)) => continue,
                Some(Err(s)) => panic!("stream failed: {s:?}"),
                None => panic!("no delivery within {limit:?}"),
            }
        }
    }

    /// Deliveries arriving within `quiet` of each other (heartbeats skipped).
    pub async fn deliveries_until_quiet(&mut self, quiet: Duration) -> Vec<proto::MessageDelivery> {
        let mut out = Vec::new();
        loop {
            match self.next_within(quiet).await {
                Some(Ok(proto::SubscribeDownstream {
                    response: Some(proto::subscribe_downstream::Response::Delivery(d)),
                })) => out.push(d),
                Some(Ok(_)) => continue,
                _ => return out,
            }
        }
    }
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Channel::from_shared(url.to_string())
                .unwrap()
                .connect()
                .await
            {
                Ok(ch) => {
                    return Client {
                        grpc: tonic::client::Grpc::new(ch),
                    }
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot connect to {url}: {e}"),
            }
        }
    }

    pub async fn unary<Req, Resp>(&mut self, method: &str, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.unary_req(method, Request::new(req))
            .await
            .map(Response::into_inner)
    }

    pub async fn unary_req<Req, Resp>(
        &mut self,
        method: &str,
        req: Request<Req>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc
            .unary(req, path(method), ProstCodec::<Req, Resp>::default())
            .await
    }

    pub async fn raw(&mut self, method: &str, body: Bytes) -> Result<Bytes, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc
            .unary(Request::new(body), path(method), RawCodec)
            .await
            .map(Response::into_inner)
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> Result<proto::PublishResponse, Status> {
        self.unary(
            "Publish",
            proto::PublishRequest {
                topic: topic.into(),
                payload: payload.to_vec().into(),
                attributes: Default::default(),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn publish_attrs(
        &mut self,
        topic: &str,
        payload: &[u8],
        attrs: &[(&str, &str)],
    ) -> Result<proto::PublishResponse, Status> {
        self.unary(
            "Publish",
            proto::PublishRequest {
                topic: topic.into(),
                payload: payload.to_vec().into(),
                attributes: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn batch_publish(
        &mut self,
        topic: &str,
        payloads: &[&[u8]],
    ) -> Result<proto::BatchPublishResponse, Status> {
        self.unary(
            "BatchPublish",
            proto::BatchPublishRequest {
                topic: topic.into(),
                messages: payloads
                    .iter()
                    .map(|p| proto::BatchMessage {
                        payload: p.to_vec().into(),
                        attributes: Default::default(),
                        ..Default::default()
                    })
                    .collect(),
            },
        )
        .await
    }

    /// grpc.health.v1.Health/Watch for the whole server.
    pub async fn health_watch(&self) -> Streaming<proto::health::HealthCheckResponse> {
        let mut grpc = self.grpc.clone();
        grpc.ready().await.expect("ready");
        grpc.server_streaming(
            Request::new(proto::health::HealthCheckRequest {
                service: String::new(),
            }),
            PathAndQuery::from_static("/grpc.health.v1.Health/Watch"),
            ProstCodec::<proto::health::HealthCheckRequest, proto::health::HealthCheckResponse>::default(),
        )
        .await
        .expect("Health/Watch")
        .into_inner()
    }

    /// GetTopicStats of these topics.
    pub async fn topic_stats(&mut self, topics: &[&str]) -> Result<Vec<proto::TopicStats>, Status> {
        self.unary::<_, proto::GetTopicStatsResponse>(
            "GetTopicStats",
            proto::GetTopicStatsRequest {
                topics: topics.iter().map(|t| t.to_string()).collect(),
            },
        )
        .await
        .map(|r| r.stats)
    }

    pub async fn list_topics(&mut self) -> Result<proto::ListTopicsResponse, Status> {
        self.unary("ListTopics", proto::ListTopicsRequest {}).await
    }

    /// The names ListTopics gives.
    pub async fn topic_names(&mut self) -> Vec<String> {
        self.list_topics()
            .await
            .expect("ListTopics")
            .topics
            .into_iter()
            .map(|t| t.name)
            .collect()
    }

    /// Opens a BROWSE stream (no group) on `topic` from `pos`.
    pub async fn browse(&mut self, topic: &str, pos: proto::InitialPosition) -> Subscription {
        self.subscribe_with(proto::SubscribeUpstream {
            request: Some(proto::subscribe_upstream::Request::Init(
                proto::SubscriptionInit {
                    topic: topic.into(),
                    mode: proto::SubscriptionMode::Browse as i32,
                    initial_position: pos as i32,
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("browse")
    }

    /// Opens a Subscribe stream and sends `first` on it.
    pub async fn subscribe_with(
        &mut self,
        first: proto::SubscribeUpstream,
    ) -> Result<Subscription, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(first).await.unwrap();
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let resp = self
            .grpc
            .streaming(
                Request::new(ReceiverStream::new(rx)),
                path("Subscribe"),
                ProstCodec::<proto::SubscribeUpstream, proto::SubscribeDownstream>::default(),
            )
            .await?;
        Ok(Subscription {
            up: tx,
            down: resp.into_inner(),
        })
    }

    pub async fn subscribe(
        &mut self,
        topic: &str,
        group: &str,
        pos: proto::InitialPosition,
    ) -> Subscription {
        self.subscribe_with(init(topic, group, pos))
            .await
            .expect("subscribe")
    }
}
