//! OpenTelemetry export, checked at a real OTLP/HTTP receiver: a small HTTP/1.1
//! server in this process (std `TcpListener`) that takes POSTs to
//! `/v1/metrics` and `/v1/traces` and decodes them with `opentelemetry-proto`.
//!
//! `library_*` tests drive `sluice::telemetry` directly; `daemon_*` tests run
//! the real binary with `--otel-endpoint` / `--otel-interval` and talk to it
//! over gRPC, then look at what reached the collector.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric};
use opentelemetry_proto::tonic::trace::v1::{span, status, Span};
use prost::Message;
use sluice::proto;
use sluice::telemetry::{
    GaugeSnapshot, SubscriptionGauge, Telemetry, TelemetryConfig, TraceContext,
};
use tonic::metadata::MetadataValue;
use tonic::Request;

const WAIT: Duration = Duration::from_secs(5);
/// Long enough for several 1 s metric exports and one span batch.
const EXPORT_WAIT: Duration = Duration::from_secs(15);

const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const PARENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------
// The collector.

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers every POST with 200.
    Answer,
    /// Accepts connections and reads, but never answers.
    Silent,
}

#[derive(Default)]
struct Seen {
    metrics: Vec<ExportMetricsServiceRequest>,
    traces: Vec<ExportTraceServiceRequest>,
    /// Anything that was not a well-formed OTLP/HTTP protobuf POST.
    problems: Vec<String>,
}

struct Collector {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Collector {
    fn start(mode: Mode) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || match mode {
                    Mode::Answer => serve(conn, &s),
                    Mode::Silent => hold(conn),
                });
            }
        });
        Collector { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.seen.lock().unwrap().metrics.clone()
    }

    fn spans(&self) -> Vec<Span> {
        let seen = self.seen.lock().unwrap();
        seen.traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    fn problems(&self) -> Vec<String> {
        self.seen.lock().unwrap().problems.clone()
    }
}

/// A port nobody listens on.
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn hold(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// HTTP/1.1 with keep-alive: one request after another on the connection.
fn serve(conn: TcpStream, seen: &Mutex<Seen>) {
    let mut out = conn.try_clone().expect("clone stream");
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request_line = line.trim_end().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let body = if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            read_chunked(&mut r)
        } else {
            let n: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; n];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            body
        };
        record(seen, &request_line, &headers, &body);
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if out.write_all(answer).is_err() {
            return;
        }
    }
}

fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            return body;
        }
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).unwrap_or(0);
        let mut chunk = vec![0u8; n + 2];
        if r.read_exact(&mut chunk).is_err() {
            return body;
        }
        if n == 0 {
            return body;
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn record(seen: &Mutex<Seen>, request_line: &str, headers: &HashMap<String, String>, body: &[u8]) {
    let mut seen = seen.lock().unwrap();
    if headers.get("content-type").map(String::as_str) != Some("application/x-protobuf") {
        seen.problems.push(format!(
            "{request_line}: content-type {:?}",
            headers.get("content-type")
        ));
    }
    match request_line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["POST", "/v1/metrics"] => match ExportMetricsServiceRequest::decode(body) {
            Ok(m) => seen.metrics.push(m),
            Err(e) => seen.problems.push(format!("undecodable metrics: {e}")),
        },
        ["POST", "/v1/traces"] => match ExportTraceServiceRequest::decode(body) {
            Ok(t) => seen.traces.push(t),
            Err(e) => seen.problems.push(format!("undecodable traces: {e}")),
        },
        _ => seen
            .problems
            .push(format!("unexpected request {request_line:?}")),
    }
}

// ---------------------------------------------------------------------------
// Reading OTLP data.

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Every wanted attribute is present with that value.
fn matches(attrs: &[KeyValue], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| attr(attrs, k).as_deref() == Some(*v))
}

fn find<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> Option<&'a Metric> {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)
}

/// The value of a counter or gauge series.
fn number(req: &ExportMetricsServiceRequest, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let points = match find(req, name)?.data.as_ref()? {
        metric::Data::Sum(s) => &s.data_points,
        metric::Data::Gauge(g) => &g.data_points,
        _ => return None,
    };
    let p = points.iter().find(|p| matches(&p.attributes, want))?;
    Some(match p.value? {
        number_data_point::Value::AsInt(i) => i as f64,
        number_data_point::Value::AsDouble(d) => d,
    })
}

/// (count, sum) of a histogram series.
fn histogram(
    req: &ExportMetricsServiceRequest,
    name: &str,
    want: &[(&str, &str)],
) -> Option<(u64, f64)> {
    let metric::Data::Histogram(h) = find(req, name)?.data.as_ref()? else {
        return None;
    };
    let p = h
        .data_points
        .iter()
        .find(|p| matches(&p.attributes, want))?;
    Some((p.count, p.sum.unwrap_or(0.0)))
}

fn series(req: &ExportMetricsServiceRequest, name: &str) -> usize {
    match find(req, name).and_then(|m| m.data.as_ref()) {
        Some(metric::Data::Sum(s)) => s.data_points.len(),
        Some(metric::Data::Gauge(g)) => g.data_points.len(),
        Some(metric::Data::Histogram(h)) => h.data_points.len(),
        _ => 0,
    }
}

fn service_name(req: &ExportMetricsServiceRequest) -> Option<String> {
    attr(
        &req.resource_metrics.first()?.resource.as_ref()?.attributes,
        "service.name",
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A short summary of an export, for failure messages.
fn dump(req: &ExportMetricsServiceRequest) -> String {
    let mut out = String::new();
    for m in req
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
    {
        let points: Vec<String> = match m.data.as_ref() {
            Some(metric::Data::Sum(s)) => s
                .data_points
                .iter()
                .map(|p| format!("{:?}={:?}", brief(&p.attributes), p.value))
                .collect(),
            Some(metric::Data::Gauge(g)) => g
                .data_points
                .iter()
                .map(|p| format!("{:?}={:?}", brief(&p.attributes), p.value))
                .collect(),
            Some(metric::Data::Histogram(h)) => h
                .data_points
                .iter()
                .map(|p| {
                    format!(
                        "{:?}=count {} sum {:?}",
                        brief(&p.attributes),
                        p.count,
                        p.sum
                    )
                })
                .collect(),
            other => vec![format!("{other:?}")],
        };
        out.push_str(&format!("  {}: {}\n", m.name, points.join(", ")));
    }
    out
}

fn brief(attrs: &[KeyValue]) -> Vec<String> {
    attrs
        .iter()
        .map(|kv| format!("{}={}", kv.key, attr(attrs, &kv.key).unwrap_or_default()))
        .collect()
}

/// Polls the latest metrics export until `check` passes.
fn wait_for_metrics(
    c: &Collector,
    limit: Duration,
    check: impl Fn(&ExportMetricsServiceRequest) -> Result<(), String>,
) -> ExportMetricsServiceRequest {
    let deadline = Instant::now() + limit;
    let mut why = "no metrics export arrived".to_string();
    loop {
        if let Some(last) = c.metrics().pop() {
            match check(&last) {
                Ok(()) => return last,
                Err(e) => why = format!("{e}\nlatest export:\n{}", dump(&last)),
            }
        }
        if Instant::now() > deadline {
            panic!(
                "metrics never matched within {limit:?}: {why}\nproblems: {:?}",
                c.problems()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_span(c: &Collector, limit: Duration, pred: impl Fn(&Span) -> bool) -> Span {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = c.spans().into_iter().find(|s| pred(s)) {
            return s;
        }
        if Instant::now() > deadline {
            let names: Vec<_> = c
                .spans()
                .iter()
                .map(|s| {
                    format!(
                        "{} trace {} parent {}",
                        s.name,
                        hex(&s.trace_id),
                        hex(&s.parent_span_id)
                    )
                })
                .collect();
            panic!(
                "no matching span within {limit:?}; spans seen: {names:?}; problems: {:?}",
                c.problems()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Collects failures so one check reports everything that is off.
struct Expect(Vec<String>);

impl Expect {
    fn eq(&mut self, what: &str, got: Option<f64>, want: f64) {
        if got != Some(want) {
            self.0.push(format!("{what}: got {got:?}, want {want}"));
        }
    }
    fn that(&mut self, what: &str, ok: bool) {
        if !ok {
            self.0.push(what.to_string());
        }
    }
    fn done(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("\n"))
        }
    }
}

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

// ---------------------------------------------------------------------------
// The library on its own.

#[test]
fn library_exports_every_instrument_and_publish_spans() {
    let c = Collector::start(Mode::Answer);
    let cfg =
        TelemetryConfig::resolve(Some(c.url()), Some(Duration::from_millis(200)), env_of(&[]))
            .unwrap();
    let t = Telemetry::start(&cfg).unwrap();
    let m = t.metrics();
    m.published("orders", 3);
    m.published("orders", 2);
    m.batch_published("orders");
    for ms in [1, 2, 3] {
        m.publish_latency("orders", Duration::from_millis(ms));
    }
    m.committed(5, Duration::from_micros(900));
    m.delivered("orders", "billing", 5);
    m.acked("orders", "billing", 4);
    m.redelivered("orders", "billing", 1);
    m.credits_granted("orders", "billing", 10);
    // More topics than the cardinality bound.
    for i in 0..300 {
        m.published(&format!("many-{i}"), 1);
    }
    {
        let g = t.gauges();
        let mut g = g.lock().unwrap();
        *g = GaugeSnapshot {
            connections: 2,
            writer_queue_depth: 7,
            subscriptions: vec![
                SubscriptionGauge {
                    topic: "orders".into(),
                    consumer_group: "billing".into(),
                    lag: 4,
                    backpressure: true,
                },
                SubscriptionGauge {
                    topic: "orders".into(),
                    consumer_group: "audit".into(),
                    lag: 0,
                    backpressure: false,
                },
            ],
        };
    }
    let parent = TraceContext::parse(PARENT, Some("vendor=abc")).unwrap();
    let ok = t.start_publish_span(Some(&parent), "orders", 2);
    let ok_tp = TraceContext::parse(ok.traceparent().unwrap(), None).unwrap();
    assert_eq!(ok_tp.trace_id_hex(), PARENT_TRACE);
    ok.end(Ok(()));
    let failed = t.start_publish_span(None, "orders", 1);
    let failed_tp = TraceContext::parse(failed.traceparent().unwrap(), None).unwrap();
    failed.end(Err((14, "writer unavailable")));

    let topic = [("topic", "orders")];
    let pair = [("topic", "orders"), ("consumer_group", "billing")];
    let export = wait_for_metrics(&c, WAIT, |r| {
        let mut e = Expect(Vec::new());
        // 5 for "orders", then 255 more topics get their own series and
        // the remaining 45 share "_other".
        e.eq(
            "publish_total{orders}",
            number(r, "sluice_publish_total", &topic),
            5.0,
        );
        e.eq(
            "publish_total{_other}",
            number(r, "sluice_publish_total", &[("topic", "_other")]),
            45.0,
        );
        e.that(
            "publish_total series bounded",
            series(r, "sluice_publish_total") == 257,
        );
        e.eq(
            "batch_publish_total",
            number(r, "sluice_batch_publish_total", &topic),
            1.0,
        );
        e.eq(
            "delivered",
            number(r, "sluice_messages_delivered", &pair),
            5.0,
        );
        e.eq("acked", number(r, "sluice_messages_acked", &pair), 4.0);
        e.eq(
            "redelivered",
            number(r, "sluice_messages_redelivered", &pair),
            1.0,
        );
        e.eq("credits", number(r, "sluice_credits_granted", &pair), 10.0);
        let lat = histogram(r, "sluice_publish_latency_seconds", &topic);
        e.that(
            &format!("publish latency {lat:?}"),
            lat.is_some_and(|(n, s)| n == 3 && (s - 0.006).abs() < 1e-9),
        );
        e.that(
            "latency unit",
            find(r, "sluice_publish_latency_seconds").is_some_and(|m| m.unit == "s"),
        );
        let batch = histogram(r, "sluice_commit_batch_size", &[]);
        e.that(&format!("commit batch {batch:?}"), batch == Some((1, 5.0)));
        let commit = histogram(r, "sluice_commit_latency_seconds", &[]);
        e.that(
            &format!("commit latency {commit:?}"),
            commit.is_some_and(|(n, _)| n == 1),
        );
        e.eq(
            "active subscriptions",
            number(r, "sluice_active_subscriptions", &topic),
            2.0,
        );
        e.eq(
            "lag billing",
            number(r, "sluice_subscription_lag", &pair),
            4.0,
        );
        e.eq(
            "lag audit",
            number(
                r,
                "sluice_subscription_lag",
                &[("topic", "orders"), ("consumer_group", "audit")],
            ),
            0.0,
        );
        e.eq(
            "backpressure billing",
            number(r, "sluice_backpressure_active", &pair),
            1.0,
        );
        e.eq(
            "backpressure audit",
            number(
                r,
                "sluice_backpressure_active",
                &[("topic", "orders"), ("consumer_group", "audit")],
            ),
            0.0,
        );
        e.eq("connections", number(r, "sluice_connections", &[]), 2.0);
        e.eq(
            "writer queue",
            number(r, "sluice_writer_queue_depth", &[]),
            7.0,
        );
        e.done()
    });
    assert_eq!(service_name(&export).as_deref(), Some("sluice"));

    let child = wait_for_span(&c, WAIT, |s| hex(&s.span_id) == ok_tp.span_id_hex());
    assert_eq!(child.name, "sluice.publish");
    assert_eq!(child.kind, span::SpanKind::Server as i32);
    assert_eq!(hex(&child.trace_id), PARENT_TRACE);
    assert_eq!(hex(&child.parent_span_id), PARENT_SPAN);
    assert_eq!(child.trace_state, "vendor=abc");
    assert_eq!(
        attr(&child.attributes, "messaging.system").as_deref(),
        Some("sluice")
    );
    assert_eq!(
        attr(&child.attributes, "messaging.destination.name").as_deref(),
        Some("orders")
    );
    assert_eq!(
        attr(&child.attributes, "messaging.batch.message_count").as_deref(),
        Some("2")
    );
    assert_ne!(
        child.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error as i32)
    );

    let root = wait_for_span(&c, WAIT, |s| hex(&s.span_id) == failed_tp.span_id_hex());
    assert!(root.parent_span_id.is_empty(), "a root span");
    let st = root.status.expect("status");
    assert_eq!(st.code, status::StatusCode::Error as i32);
    assert!(st.message.contains("writer unavailable"), "{st:?}");
    assert_eq!(
        attr(&root.attributes, "rpc.grpc.status_code").as_deref(),
        Some("14")
    );

    t.shutdown();
    assert!(c.problems().is_empty(), "{:?}", c.problems());
}

/// With a collector that accepts and never answers, recording stays cheap and
/// never waits for the exporter; the span queue stays bounded; shutdown ends.
#[test]
fn library_hung_collector_never_blocks_the_caller() {
    let c = Collector::start(Mode::Silent);
    let cfg = TelemetryConfig::resolve(
        Some(c.url()),
        Some(Duration::from_millis(100)),
        env_of(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "256"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ]),
    )
    .unwrap();
    let t = Telemetry::start(&cfg).unwrap();
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut recording = 0;
    for i in 0..20_000u32 {
        let one = Instant::now();
        let span = t.start_publish_span(None, "t", 1);
        recording += usize::from(span.is_recording());
        t.metrics().published("t", 1);
        t.metrics().publish_latency("t", Duration::from_micros(150));
        span.end(Ok(()));
        slowest = slowest.max(one.elapsed());
        if i % 5000 == 0 {
            // Let the export threads get stuck on the silent collector.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let took = start.elapsed();
    // An export blocks for the request timeout (5 s); nothing here may wait on it.
    assert!(
        slowest < Duration::from_secs(1),
        "one call took {slowest:?}"
    );
    assert!(took < Duration::from_secs(20), "20k calls took {took:?}");
    // Spans past the queue bound are not created at all.
    assert!(
        recording < 20_000,
        "every span was recorded: the queue is unbounded"
    );
    let start = Instant::now();
    t.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The daemon.

fn otel_server(endpoint: &str, extra_env: &[(&str, &str)]) -> Server {
    let mut env = vec![("OTEL_METRIC_EXPORT_INTERVAL", "1000")];
    env.extend_from_slice(extra_env);
    Server::start_with_env(
        &["--otel-endpoint", endpoint, "--otel-interval", "1s"],
        &env,
    )
}

fn traced<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("traceparent", MetadataValue::from_static(PARENT));
    req.metadata_mut()
        .insert("tracestate", MetadataValue::from_static("sluice=test"));
    req
}

/// After publishing and consuming, every instrument shows the right values;
/// the Publish span is a child of the client's `traceparent`, and the
/// delivered message carries that span's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_exports_metrics_and_publish_spans() {
    let c = Collector::start(Mode::Answer);
    let s = otel_server(&c.url(), &[]);
    let mut client = s.client().await;
    let topic = "tel-orders";

    // 10 Publish calls (the first traced) and one BatchPublish of 5: 15 messages.
    let first: proto::PublishResponse = client
        .unary_req(
            "Publish",
            traced(proto::PublishRequest {
                topic: topic.into(),
                payload: b"m0".to_vec().into(),
                attributes: Default::default(),
                ..Default::default()
            }),
        )
        .await
        .expect("traced publish")
        .into_inner();
    for i in 1..10 {
        client
            .publish(topic, format!("m{i}").as_bytes())
            .await
            .unwrap();
    }
    let payloads: Vec<Vec<u8>> = (10..15).map(|i| format!("m{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    client.batch_publish(topic, &refs).await.unwrap();
    const N: usize = 15;

    // Group "billing" consumes and acks everything.
    let mut billing = client
        .subscribe(topic, "billing", proto::InitialPosition::Earliest)
        .await;
    billing.send(credit(N as u32)).await;
    let mut got = Vec::new();
    for _ in 0..N {
        got.push(billing.delivery(WAIT).await);
    }
    for d in &got {
        billing.send(ack(&d.message_id)).await;
    }
    let traced_msg = got
        .iter()
        .find(|d| d.message_id == first.message_id)
        .expect("the traced message was delivered");

    // Group "audit" takes 5, nacks the last, and gets it again: nothing
    // acked, 10 messages waiting and no credit left.
    let mut audit = client
        .subscribe(topic, "audit", proto::InitialPosition::Earliest)
        .await;
    audit.send(credit(5)).await;
    let mut last = None;
    for _ in 0..5 {
        last = Some(audit.delivery(WAIT).await);
    }
    audit.send(nack(&last.unwrap().message_id, 0)).await;
    let mut audit_credits = 5;
    let mut audit_deliveries = 5;
    loop {
        audit.send(credit(1)).await;
        audit_credits += 1;
        audit_deliveries += 1;
        if audit.delivery(WAIT).await.delivery_count > 1 {
            break;
        }
        assert!(audit_credits < 20, "the nacked message never came back");
    }
    let audit_backlog = N as f64; // nothing acked: latest sequence − cursor

    let billing_p = [("topic", topic), ("consumer_group", "billing")];
    let audit_p = [("topic", topic), ("consumer_group", "audit")];
    let tp = [("topic", topic)];
    // block_in_place: the runtime keeps driving the open streams meanwhile.
    let export = tokio::task::block_in_place(|| {
        wait_for_metrics(&c, EXPORT_WAIT, |r| {
            let mut e = Expect(Vec::new());
            e.eq(
                "sluice_publish_total",
                number(r, "sluice_publish_total", &tp),
                N as f64,
            );
            e.eq(
                "sluice_batch_publish_total",
                number(r, "sluice_batch_publish_total", &tp),
                1.0,
            );
            e.eq(
                "delivered billing",
                number(r, "sluice_messages_delivered", &billing_p),
                N as f64,
            );
            let d = number(r, "sluice_messages_delivered", &audit_p).unwrap_or(0.0);
            e.that(
                &format!("delivered audit {d}, want 5..={audit_deliveries}"),
                (5.0..=audit_deliveries as f64).contains(&d),
            );
            e.eq(
                "acked billing",
                number(r, "sluice_messages_acked", &billing_p),
                N as f64,
            );
            e.eq(
                "redelivered audit",
                number(r, "sluice_messages_redelivered", &audit_p),
                1.0,
            );
            e.eq(
                "credits billing",
                number(r, "sluice_credits_granted", &billing_p),
                N as f64,
            );
            e.eq(
                "credits audit",
                number(r, "sluice_credits_granted", &audit_p),
                audit_credits as f64,
            );
            let lat = histogram(r, "sluice_publish_latency_seconds", &tp);
            e.that(
                &format!("publish latency {lat:?}: want 10 or 11 calls, sum > 0"),
                lat.is_some_and(|(n, sum)| (10..=11).contains(&n) && sum > 0.0),
            );
            let batch = histogram(r, "sluice_commit_batch_size", &[]);
            e.that(
                &format!("commit batch size {batch:?}: want >= 1 commit of >= {N} messages in all"),
                batch.is_some_and(|(n, sum)| n >= 1 && sum >= N as f64),
            );
            let commit = histogram(r, "sluice_commit_latency_seconds", &[]);
            e.that(
                &format!("commit latency {commit:?}"),
                commit.is_some_and(|(n, sum)| n >= 1 && sum > 0.0),
            );
            e.eq(
                "active subscriptions",
                number(r, "sluice_active_subscriptions", &tp),
                2.0,
            );
            e.eq(
                "lag audit",
                number(r, "sluice_subscription_lag", &audit_p),
                audit_backlog,
            );
            e.eq(
                "lag billing",
                number(r, "sluice_subscription_lag", &billing_p),
                0.0,
            );
            e.eq(
                "backpressure audit",
                number(r, "sluice_backpressure_active", &audit_p),
                1.0,
            );
            e.eq(
                "backpressure billing",
                number(r, "sluice_backpressure_active", &billing_p),
                0.0,
            );
            let conns = number(r, "sluice_connections", &[]);
            e.that(
                &format!("connections {conns:?}"),
                conns.is_some_and(|n| n >= 1.0),
            );
            e.that(
                "writer queue depth",
                number(r, "sluice_writer_queue_depth", &[]).is_some(),
            );
            e.done()
        })
    });
    assert_eq!(service_name(&export).as_deref(), Some("sluice"));

    // The traced Publish: a SERVER span, child of the client's context.
    let publish = tokio::task::block_in_place(|| {
        wait_for_span(&c, EXPORT_WAIT, |s| {
            hex(&s.trace_id) == PARENT_TRACE && hex(&s.parent_span_id) == PARENT_SPAN
        })
    });
    assert_eq!(publish.name, "sluice.publish");
    assert_eq!(publish.kind, span::SpanKind::Server as i32);
    assert_eq!(
        attr(&publish.attributes, "messaging.destination.name").as_deref(),
        Some(topic)
    );
    assert_eq!(publish.trace_state, "sluice=test");

    // The stored message carries the span's context (and the tracestate).
    let carried = traced_msg
        .attributes
        .get("traceparent")
        .expect("delivered message has a traceparent attribute");
    let carried = TraceContext::parse(carried, None).expect("valid traceparent");
    assert_eq!(carried.trace_id_hex(), PARENT_TRACE);
    assert_eq!(carried.span_id_hex(), hex(&publish.span_id));
    assert!(carried.is_sampled());
    assert_eq!(
        traced_msg.attributes.get("tracestate").map(String::as_str),
        Some("sluice=test")
    );
    // Untraced publishes are roots: sampled, each its own trace.
    let other = got
        .iter()
        .find(|d| d.message_id != first.message_id)
        .unwrap();
    if let Some(tp) = other.attributes.get("traceparent") {
        assert_ne!(
            TraceContext::parse(tp, None).unwrap().trace_id_hex(),
            PARENT_TRACE
        );
    }
    assert!(c.problems().is_empty(), "{:?}", c.problems());
}

/// A message moved to the dead-letter topic counts in
/// `sluice_messages_dead_lettered` for its topic and group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_counts_dead_lettered_messages() {
    let c = Collector::start(Mode::Answer);
    let s = otel_server(&c.url(), &[]);
    let mut client = s.client().await;
    let topic = "tel-jobs";
    client.publish(topic, b"poison").await.unwrap();
    let init = || proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                consumer_group: "workers".into(),
                initial_position: proto::InitialPosition::Earliest as i32,
                max_deliveries: 1,
                ..Default::default()
            },
        )),
    };
    // Delivered once, not acked; the next consumer's delivery would be the
    // second: dead-lettered instead.
    let first = client.subscribe_with(init()).await.unwrap();
    first.send(credit(1)).await;
    let mut first = first;
    first.delivery(WAIT).await;
    drop(first);
    let second = client.subscribe_with(init()).await.unwrap();
    second.send(credit(1)).await;
    let pair = [("topic", topic), ("consumer_group", "workers")];
    let _export = tokio::task::block_in_place(|| {
        wait_for_metrics(&c, EXPORT_WAIT, |r| {
            let mut e = Expect(Vec::new());
            e.eq(
                "dead-lettered workers",
                number(r, "sluice_messages_dead_lettered", &pair),
                1.0,
            );
            e.done()
        })
    });
    drop(second);
}

/// Without an endpoint there is no span, but a client's `traceparent` is
/// still stored on the message unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_without_endpoint_still_propagates_traceparent() {
    let s = Server::start();
    let mut client = s.client().await;
    let r: proto::PublishResponse = client
        .unary_req(
            "Publish",
            traced(proto::PublishRequest {
                topic: "tel-plain".into(),
                payload: b"x".to_vec().into(),
                attributes: Default::default(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
    let mut sub = client
        .subscribe("tel-plain", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(1)).await;
    let d = sub.delivery(WAIT).await;
    assert_eq!(d.message_id, r.message_id);
    assert_eq!(
        d.attributes.get("traceparent").map(String::as_str),
        Some(PARENT)
    );
    assert_eq!(
        d.attributes.get("tracestate").map(String::as_str),
        Some("sluice=test")
    );
}

async fn mean_publish_latency(client: &mut Client, topic: &str, n: usize) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        client
            .publish(topic, format!("p{i}").as_bytes())
            .await
            .unwrap();
    }
    start.elapsed() / n as u32
}

/// Publishes `calls` messages from 4 concurrent clients.
async fn flood(s: &Server, calls: usize) {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut client = s.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..calls / 4 {
                client
                    .publish("tel-flood", format!("{w}-{i}").as_bytes())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A collector that is down (nothing listening) or hung (accepts, never
/// answers) changes neither publish latency nor memory beyond noise, and its
/// failures are logged without flooding the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_dead_collector_costs_publishers_nothing() {
    let hung = Collector::start(Mode::Silent);
    let base = Server::start();
    let refused = otel_server(&format!("http://127.0.0.1:{}", dead_port()), &[]);
    let silent = otel_server(&hung.url(), &[]);
    let servers = [
        ("no telemetry", &base),
        ("refused", &refused),
        ("hung", &silent),
    ];
    let mut clients = Vec::new();
    for (_, s) in &servers {
        let mut c = s.client().await;
        mean_publish_latency(&mut c, "tel-warmup", 50).await;
        clients.push(c);
    }
    // Let a few exports fail (the hung one waits out its timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before: Vec<u64> = servers.iter().map(|(_, s)| s.rss_kb()).collect();

    // Interleaved rounds, so load from elsewhere hits all three alike; the
    // median round, so one burst of load elsewhere does not decide it.
    let mut rounds: [Vec<Duration>; 3] = Default::default();
    for _ in 0..5 {
        for (i, c) in clients.iter_mut().enumerate() {
            rounds[i].push(mean_publish_latency(c, "tel-latency", 100).await);
        }
    }
    let mean: Vec<Duration> = rounds
        .iter_mut()
        .map(|r| {
            r.sort();
            r[r.len() / 2]
        })
        .collect();
    for (i, (name, _)) in servers.iter().enumerate().skip(1) {
        let limit = mean[0] * 2 + Duration::from_millis(1);
        assert!(
            mean[i] <= limit,
            "{name} collector: mean publish latency {:?} vs {:?} without telemetry",
            mean[i],
            mean[0]
        );
    }

    // Memory: more publish spans than the span queue holds (2048), while
    // exports keep failing.
    for (_, s) in &servers {
        flood(s, 6000).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let growth: Vec<i64> = servers
        .iter()
        .zip(&rss_before)
        .map(|((_, s), before)| s.rss_kb() as i64 - *before as i64)
        .collect();
    for (i, (name, _)) in servers.iter().enumerate().skip(1) {
        assert!(
            growth[i] <= growth[0] + 16 * 1024,
            "{name} collector: RSS grew {} KiB vs {} KiB without telemetry",
            growth[i],
            growth[0]
        );
    }

    // Failures are reported, but not once per export.
    for (name, s) in &servers[1..] {
        let log = s.log_text();
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("telemetry"))
            .count();
        assert!(
            warnings >= 1,
            "{name}: no warning about failing exports:\n{log}"
        );
        assert!(
            warnings <= 6,
            "{name}: {warnings} telemetry warnings:\n{log}"
        );
    }
}
