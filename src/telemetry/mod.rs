//! OpenTelemetry metrics and traces, exported over OTLP/HTTP (protobuf)
//! without an async runtime.
//!
//! # Threads and cost
//!
//! With no endpoint configured nothing is started: [`Telemetry::disabled`]
//! owns no thread and every method is a branch on `None`. With an endpoint,
//! the SDK's periodic metric reader and its batch span processor each run on
//! their own thread and send through a blocking `ureq` client
//! (`telemetry/http.rs`): metrics are POSTed to `<endpoint>/v1/metrics` every export
//! interval, spans to `<endpoint>/v1/traces` in batches. A collector that is
//! down or slow only delays those threads: every request has a deadline
//! (`OTEL_EXPORTER_OTLP_TIMEOUT`, default 5 s), the span queue is bounded
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048; past it new publish spans are not
//! created at all) and metric memory is bounded by the attribute cardinality
//! limits in [`metrics`]. Dropped or failed exports are logged with
//! `log::warn!`, at most once a minute per kind.
//!
//! # Configuration
//!
//! [`TelemetryConfig::resolve`] takes the daemon's flags (`--otel-endpoint`,
//! `--otel-interval`) and an environment lookup:
//!
//! | setting | source (first wins) | default |
//! |---|---|---|
//! | endpoint (collector base URL, `http://host:4318`) | flag, `OTEL_EXPORTER_OTLP_ENDPOINT` | none: telemetry off |
//! | metric export interval | flag, `OTEL_METRIC_EXPORT_INTERVAL` (ms) | 10 s |
//! | request timeout | `OTEL_EXPORTER_OTLP_TIMEOUT` (ms) | 5 s |
//! | extra request headers | `OTEL_EXPORTER_OTLP_HEADERS` (`k=v,k2=v2`) | none |
//! | `service.name` | `OTEL_SERVICE_NAME`, `service.name` in `OTEL_RESOURCE_ATTRIBUTES` | `sluice` |
//! | resource attributes | `OTEL_RESOURCE_ATTRIBUTES` | `service.version` |
//! | sampler | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `parentbased_always_on` |
//! | span queue, batch delay | `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY` (ms) | 2048, min(interval, 5 s) |
//!
//! `OTEL_SDK_DISABLED=true` turns telemetry off. The HTTP client honours
//! `HTTP_PROXY`/`NO_PROXY` like any other. Signal-specific endpoints
//! (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, …) are not used: both signals go
//! to the one base URL. Only `http://` is supported (no TLS in the binary).
//!
//! # Use
//!
//! [`Telemetry`] is `Send + Sync`: share it in an `Arc` if the writer thread
//! should record commits itself. [`PublishSpan`] is `Send`.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use sluice::telemetry::{Telemetry, TelemetryConfig, TraceContext};
//!
//! let cfg = TelemetryConfig::resolve(None, None, |k| std::env::var(k).ok())?;
//! let telemetry = Telemetry::start(&cfg)?;
//!
//! // Reactor thread, per Publish call:
//! let started = Instant::now();
//! let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
//! let span = telemetry.start_publish_span(parent.as_ref(), "orders", 1);
//! let traceparent: Option<&str> = span.traceparent(); // store on the message(s)
//! // ... commit ...
//! telemetry.metrics().published("orders", 1);
//! telemetry.metrics().publish_latency("orders", started.elapsed());
//! span.end(Ok(()));
//!
//! // Reactor timer (at least once per export interval):
//! let gauges = telemetry.gauges();
//! gauges.lock().unwrap().connections = 3;
//!
//! // Exit:
//! telemetry.shutdown();
//! # Ok::<(), String>(())
//! ```
//!
//! # Instruments
//!
//! Counters: `sluice_publish_total` (messages, `topic`), `sluice_batch_publish_total`
//! (calls, `topic`), `sluice_messages_delivered`, `sluice_messages_acked`,
//! `sluice_messages_redelivered`, `sluice_credits_granted` (`topic`, `consumer_group`).
//! Histograms: `sluice_publish_latency_seconds` (`topic`), `sluice_commit_batch_size`,
//! `sluice_commit_latency_seconds`. Gauges, read from [`GaugeSnapshot`] at export:
//! `sluice_active_subscriptions` (`topic`), `sluice_subscription_lag` and
//! `sluice_backpressure_active` (`topic`, `consumer_group`), `sluice_connections`,
//! `sluice_writer_queue_depth`.
//!
//! # Spans
//!
//! [`Telemetry::start_publish_span`] starts a SERVER span `sluice.publish` with
//! `messaging.system` = `sluice`, `messaging.destination.name` = the topic,
//! `messaging.operation.type` = `publish` and `messaging.batch.message_count`;
//! its parent is the given [`TraceContext`] (from gRPC metadata or from a
//! message's `traceparent` attribute: the caller decides). [`PublishSpan::end`]
//! adds `rpc.grpc.status_code` and, on failure, an error status. Without an
//! endpoint no span is made and [`PublishSpan::traceparent`] is the parent's,
//! unchanged, so propagation still works.

mod http;
pub mod metrics;
pub mod traceparent;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::resource::{Resource, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};

pub use self::metrics::{GaugeSnapshot, Metrics, SubscriptionGauge};
pub use self::traceparent::TraceContext;

use self::http::{BlockingClient, WarnLimiter, WARN_EVERY};
use self::metrics::{Labels, MAX_GROUP_SERIES, MAX_TOPICS};

pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SERVICE_NAME: &str = "sluice";
pub const DEFAULT_SPAN_QUEUE: usize = 2048;
/// Longest wait for the final flush in [`Telemetry::shutdown`].
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);
/// The span [`Telemetry::start_publish_span`] starts.
pub const PUBLISH_SPAN: &str = "sluice.publish";

/// Which traces are recorded (`OTEL_TRACES_SAMPLER`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// Follow the parent's sampled flag; roots use the inner setting.
    ParentBased(RootSampler),
}

/// The root sampler of [`SamplerSetting::ParentBased`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

impl SamplerSetting {
    fn to_sdk(self) -> Sampler {
        let root = |r: RootSampler| match r {
            RootSampler::AlwaysOn => Sampler::AlwaysOn,
            RootSampler::AlwaysOff => Sampler::AlwaysOff,
            RootSampler::TraceIdRatio(p) => Sampler::TraceIdRatioBased(p),
        };
        match self {
            SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
            SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
            SamplerSetting::TraceIdRatio(p) => Sampler::TraceIdRatioBased(p),
            SamplerSetting::ParentBased(r) => Sampler::ParentBased(Box::new(root(r))),
        }
    }
}

/// Resolved telemetry settings (see the module docs for the sources).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Collector base URL (`http://host:4318`); `None` disables telemetry.
    pub endpoint: Option<String>,
    pub export_interval: Duration,
    /// Deadline of one export request.
    pub timeout: Duration,
    /// Extra request headers (e.g. authentication for a gateway).
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    /// Further resource attributes (`service.name` excluded).
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: SamplerSetting,
    /// Spans waiting for export before new ones are dropped.
    pub span_queue: usize,
    /// Longest a finished span waits before its batch is sent.
    pub span_delay: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            headers: Vec::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            resource_attributes: Vec::new(),
            sampler: SamplerSetting::ParentBased(RootSampler::AlwaysOn),
            span_queue: DEFAULT_SPAN_QUEUE,
            span_delay: DEFAULT_EXPORT_INTERVAL.min(Duration::from_secs(5)),
        }
    }
}

fn millis(env: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<u64>, String> {
    match env(var).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("invalid value {v:?} for {var}: expected milliseconds")),
    }
}

fn ratio(env: &impl Fn(&str) -> Option<String>) -> Result<f64, String> {
    match env("OTEL_TRACES_SAMPLER_ARG").as_deref().map(str::trim) {
        None | Some("") => Ok(1.0),
        Some(v) => match v.parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
            _ => Err(format!(
                "invalid value {v:?} for OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1"
            )),
        },
    }
}

/// Checks a collector base URL: `http://host[:port][/prefix]`.
fn check_endpoint(v: &str, source: &str) -> Result<String, String> {
    let uri: ::http::Uri = v
        .parse()
        .map_err(|e| format!("invalid value {v:?} for {source}: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "invalid value {v:?} for {source}: https is not supported; \
                 send to a local collector or agent over http://"
            ))
        }
        _ => {
            return Err(format!(
                "invalid value {v:?} for {source}: expected a URL like http://localhost:4318"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
        return Err(format!(
            "invalid value {v:?} for {source}: expected a URL like http://localhost:4318"
        ));
    }
    Ok(v.trim_end_matches('/').to_string())
}

/// Splits `k=v,k2=v2` (values percent-decoded), skipping malformed members.
fn key_values(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TelemetryConfig {
    /// Resolves the settings from the daemon's flags and the environment
    /// (`env` is `|k| std::env::var(k).ok()` in the daemon). An empty
    /// `flag_endpoint` turns telemetry off even if the environment names one.
    /// Errors name the flag or variable at fault; without an endpoint the
    /// other variables are not looked at.
    pub fn resolve(
        flag_endpoint: Option<String>,
        flag_interval: Option<Duration>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TelemetryConfig, String> {
        let mut cfg = TelemetryConfig::default();
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(cfg);
        }
        let endpoint = match flag_endpoint {
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(check_endpoint(v.trim(), "--otel-endpoint")?),
            None => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(v) if !v.trim().is_empty() => {
                    Some(check_endpoint(v.trim(), "OTEL_EXPORTER_OTLP_ENDPOINT")?)
                }
                _ => None,
            },
        };
        if endpoint.is_none() {
            return Ok(cfg);
        }
        cfg.endpoint = endpoint;

        cfg.export_interval =
            match flag_interval {
                Some(d) if d.is_zero() => {
                    return Err("invalid value for --otel-interval: must be more than 0".into())
                }
                Some(d) => d,
                None => match millis(&env, "OTEL_METRIC_EXPORT_INTERVAL")? {
                    Some(0) => return Err(
                        "invalid value \"0\" for OTEL_METRIC_EXPORT_INTERVAL: must be more than 0"
                            .into(),
                    ),
                    Some(ms) => Duration::from_millis(ms),
                    None => DEFAULT_EXPORT_INTERVAL,
                },
            };
        cfg.timeout = match millis(&env, "OTEL_EXPORTER_OTLP_TIMEOUT")? {
            Some(0) => {
                return Err(
                    "invalid value \"0\" for OTEL_EXPORTER_OTLP_TIMEOUT: must be more than 0"
                        .into(),
                )
            }
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_TIMEOUT,
        };
        cfg.headers = env("OTEL_EXPORTER_OTLP_HEADERS")
            .map(|v| key_values(&v))
            .unwrap_or_default();

        let mut resource = env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|v| key_values(&v))
            .unwrap_or_default();
        let from_resource = resource
            .iter()
            .rposition(|(k, _)| k == "service.name")
            .map(|i| resource[i].1.clone());
        resource.retain(|(k, _)| k != "service.name");
        cfg.resource_attributes = resource;
        cfg.service_name = env("OTEL_SERVICE_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .or(from_resource.filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.into());

        cfg.sampler = match env("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
            None | Some("") | Some("parentbased_always_on") => {
                SamplerSetting::ParentBased(RootSampler::AlwaysOn)
            }
            Some("parentbased_always_off") => SamplerSetting::ParentBased(RootSampler::AlwaysOff),
            Some("parentbased_traceidratio") => {
                SamplerSetting::ParentBased(RootSampler::TraceIdRatio(ratio(&env)?))
            }
            Some("always_on") => SamplerSetting::AlwaysOn,
            Some("always_off") => SamplerSetting::AlwaysOff,
            Some("traceidratio") => SamplerSetting::TraceIdRatio(ratio(&env)?),
            Some(other) => {
                return Err(format!(
                    "invalid value {other:?} for OTEL_TRACES_SAMPLER: expected always_on, \
                     always_off, traceidratio or parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ))
            }
        };
        cfg.span_queue = match millis(&env, "OTEL_BSP_MAX_QUEUE_SIZE")
            .map_err(|e| e.replace("milliseconds", "a number of spans"))?
        {
            Some(0) => {
                return Err(
                    "invalid value \"0\" for OTEL_BSP_MAX_QUEUE_SIZE: must be more than 0".into(),
                )
            }
            Some(n) => n.min(1 << 20) as usize,
            None => DEFAULT_SPAN_QUEUE,
        };
        cfg.span_delay = match millis(&env, "OTEL_BSP_SCHEDULE_DELAY")? {
            Some(ms) => Duration::from_millis(ms.max(1)),
            None => cfg.export_interval.min(Duration::from_secs(5)),
        };
        Ok(cfg)
    }
}

/// Spans handed to the batch processor and not yet taken by its exporter.
/// Kept at most `span_queue`, so the processor's own queue never overflows
/// and, past it, no span is even created.
struct SpanBudget {
    queued: AtomicUsize,
    cap: usize,
    dropped: WarnLimiter,
}

/// The OTLP span exporter, counting the spans it takes off the queue.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    budget: Arc<SpanBudget>,
}

impl fmt::Debug for SpanBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanBudget")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("cap", &self.cap)
            .finish()
    }
}

impl SpanExporter for CountingExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        let _ = self
            .budget
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        self.inner.export(batch)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    budget: Arc<SpanBudget>,
}

/// The process's telemetry: cheap to call when disabled. `Send + Sync`.
pub struct Telemetry {
    metrics: Metrics,
    gauges: Arc<Mutex<GaugeSnapshot>>,
    meter_provider: Option<SdkMeterProvider>,
    tracing: Option<Tracing>,
    export_interval: Duration,
    shut: AtomicBool,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.is_enabled())
            .field("export_interval", &self.export_interval)
            .finish()
    }
}

impl Telemetry {
    /// Telemetry that records and exports nothing (no threads).
    pub fn disabled() -> Telemetry {
        Telemetry {
            metrics: Metrics::disabled(),
            gauges: Arc::default(),
            meter_provider: None,
            tracing: None,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            shut: AtomicBool::new(false),
        }
    }

    /// Starts the exporters (two threads) if `cfg` names an endpoint;
    /// otherwise the same as [`Telemetry::disabled`]. Fails only on settings
    /// the exporter rejects (e.g. an unsupported `OTEL_EXPORTER_OTLP_COMPRESSION`).
    pub fn start(cfg: &TelemetryConfig) -> Result<Telemetry, String> {
        let Some(endpoint) = cfg.endpoint.as_deref() else {
            return Ok(Telemetry::disabled());
        };
        let headers: std::collections::HashMap<String, String> =
            cfg.headers.iter().cloned().collect();
        let resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(
                cfg.resource_attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_service_name(cfg.service_name.clone())
            .build();

        // Metrics.
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(BlockingClient::new(cfg.timeout, "metrics"))
            .with_endpoint(format!("{endpoint}/v1/metrics"))
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(cfg.timeout)
            .with_headers(headers.clone())
            .build()
            .map_err(|e| format!("cannot set up the OTLP metric exporter: {e}"))?;
        let reader = PeriodicReader::builder(exporter)
            .with_interval(cfg.export_interval)
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource.clone())
            .build();
        let meter = meter_provider.meter("sluice");
        let gauges = Arc::new(Mutex::new(GaugeSnapshot::default()));
        let labels = Arc::new(Mutex::new(Labels::new(MAX_TOPICS, MAX_GROUP_SERIES)));
        let metrics = Metrics::new(&meter, gauges.clone(), labels);

        // Traces.
        let inner = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(BlockingClient::new(cfg.timeout, "traces"))
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(cfg.timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("cannot set up the OTLP span exporter: {e}"))?;
        let budget = Arc::new(SpanBudget {
            queued: AtomicUsize::new(0),
            cap: cfg.span_queue,
            dropped: WarnLimiter::new("spans", WARN_EVERY),
        });
        let processor = BatchSpanProcessor::builder(CountingExporter {
            inner,
            budget: budget.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(cfg.span_queue)
                .with_max_export_batch_size(512.min(cfg.span_queue))
                .with_scheduled_delay(cfg.span_delay)
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(cfg.sampler.to_sdk())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sluice");

        log::info!(
            "telemetry: OTLP/HTTP to {endpoint} (metrics every {:?}, spans within {:?}, \
             service.name {})",
            cfg.export_interval,
            cfg.span_delay,
            cfg.service_name
        );
        Ok(Telemetry {
            metrics,
            gauges,
            meter_provider: Some(meter_provider),
            tracing: Some(Tracing {
                provider,
                tracer,
                budget,
            }),
            export_interval: cfg.export_interval,
            shut: AtomicBool::new(false),
        })
    }

    /// True if an exporter is running (worth refreshing the gauges for).
    pub fn is_enabled(&self) -> bool {
        self.meter_provider.is_some()
    }

    /// How often metrics are exported (a sensible gauge refresh period).
    pub fn export_interval(&self) -> Duration {
        self.export_interval
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The snapshot the gauges are read from at each export.
    pub fn gauges(&self) -> Arc<Mutex<GaugeSnapshot>> {
        self.gauges.clone()
    }

    /// Starts the span for one Publish/BatchPublish call of `messages`
    /// messages on `topic`, child of `parent` if given. See [`PublishSpan`].
    pub fn start_publish_span(
        &self,
        parent: Option<&TraceContext>,
        topic: &str,
        messages: usize,
    ) -> PublishSpan {
        let Some(t) = &self.tracing else {
            return PublishSpan::passthrough(parent);
        };
        if t.budget.queued.load(Ordering::Relaxed) >= t.budget.cap {
            t.budget.dropped.failed(|| {
                format!(
                    "{} spans wait for export (collector down or slow?); new spans are dropped",
                    t.budget.cap
                )
            });
            return PublishSpan::passthrough(parent);
        }
        t.budget
            .dropped
            .succeeded(|| "the span queue has room again".into());
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(remote_span_context(p)),
            None => Context::new(),
        };
        let span = t
            .tracer
            .span_builder(PUBLISH_SPAN)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("messaging.system", "sluice"),
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("messaging.batch.message_count", messages as i64),
            ])
            .start_with_context(&t.tracer, &cx);
        let sc = span.span_context();
        let traceparent = traceparent::format_traceparent(
            &sc.trace_id().to_bytes(),
            &sc.span_id().to_bytes(),
            sc.trace_flags().to_u8(),
        );
        let tracestate = Some(sc.trace_state().header()).filter(|s| !s.is_empty());
        if span.is_recording() {
            t.budget.queued.fetch_add(1, Ordering::Relaxed);
        }
        PublishSpan {
            span: Some(Box::new(span)),
            traceparent: Some(traceparent),
            tracestate,
        }
    }

    /// Flushes what is pending and stops the exporter threads, waiting at
    /// most [`SHUTDOWN_LIMIT`]. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        self.shutdown_within(SHUTDOWN_LIMIT)
    }

    /// [`Telemetry::shutdown`] with a chosen bound.
    pub fn shutdown_within(&self, limit: Duration) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let meters = self.meter_provider.clone();
        let tracer = self.tracing.as_ref().map(|t| t.provider.clone());
        if meters.is_none() && tracer.is_none() {
            return;
        }
        let (done, wait) = std::sync::mpsc::channel();
        // Both flushes run at once on helper threads; if the collector hangs
        // past `limit` we stop waiting (the threads end with the process).
        let mut helpers = 0;
        if let Some(m) = meters {
            let done = done.clone();
            helpers += spawn_helper(move || {
                let _ = m.shutdown();
                let _ = done.send(());
            });
        }
        if let Some(t) = tracer {
            let done = done.clone();
            helpers += spawn_helper(move || {
                let _ = t.shutdown_with_timeout(limit);
                let _ = done.send(());
            });
        }
        drop(done);
        let deadline = std::time::Instant::now() + limit;
        for _ in 0..helpers {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if wait.recv_timeout(left).is_err() {
                log::warn!("telemetry: final export did not finish within {limit:?}; dropped");
                return;
            }
        }
    }
}

fn spawn_helper(f: impl FnOnce() + Send + 'static) -> usize {
    std::thread::Builder::new()
        .name("telemetry-shutdown".into())
        .spawn(f)
        .map_or(0, |_| 1)
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn remote_span_context(p: &TraceContext) -> SpanContext {
    let state = p
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(p.trace_id),
        SpanId::from_bytes(p.span_id),
        TraceFlags::new(p.flags),
        true,
        state,
    )
}

/// The span of one publish call. Keep it with the call; [`PublishSpan::end`]
/// it when the reply is sent (dropping it ends it too, without a status).
pub struct PublishSpan {
    /// Boxed: keeps `PublishSpan` small inside the reactor's call state.
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl fmt::Debug for PublishSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishSpan")
            .field("recording", &self.is_recording())
            .field("traceparent", &self.traceparent)
            .finish()
    }
}

impl PublishSpan {
    /// No span: the parent's context (if any) is propagated unchanged.
    pub fn passthrough(parent: Option<&TraceContext>) -> PublishSpan {
        PublishSpan {
            span: None,
            traceparent: parent.map(TraceContext::traceparent),
            tracestate: parent.and_then(|p| p.tracestate.clone()),
        }
    }

    /// The `traceparent` to store on the published message(s): this span's
    /// context, or the parent's unchanged when no span was made; `None` when
    /// there is neither.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The `tracestate` to store alongside, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// True if the span will be exported (a span exists and was sampled).
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Ends the span: `Ok` or `Err((grpc_code, message))` for the reply sent.
    pub fn end(mut self, result: Result<(), (i32, &str)>) {
        let Some(span) = self.span.as_mut() else {
            return;
        };
        if span.is_recording() {
            match result {
                Ok(()) => span.set_attribute(KeyValue::new("rpc.grpc.status_code", 0i64)),
                Err((code, message)) => {
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                    span.set_status(Status::error(message.to_string()));
                }
            }
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_endpoint_means_disabled() {
        let cfg = TelemetryConfig::resolve(None, None, env_of(&[])).unwrap();
        assert_eq!(cfg, TelemetryConfig::default());
        assert_eq!(cfg.endpoint, None);
        // Other variables are not even looked at.
        let cfg = TelemetryConfig::resolve(
            None,
            None,
            env_of(&[("OTEL_METRIC_EXPORT_INTERVAL", "soon")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
        // An empty flag beats the environment.
        let cfg = TelemetryConfig::resolve(
            Some(String::new()),
            None,
            env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[("OTEL_SDK_DISABLED", "true")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
    }

    #[test]
    fn flag_beats_environment_beats_default() {
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1500"),
        ]);
        let cfg = TelemetryConfig::resolve(None, None, &env).unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://env:4318"));
        assert_eq!(cfg.export_interval, Duration::from_millis(1500));
        assert_eq!(cfg.span_delay, Duration::from_millis(1500));
        let cfg = TelemetryConfig::resolve(
            Some("http://flag:4318/prefix".into()),
            Some(Duration::from_secs(1)),
            &env,
        )
        .unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://flag:4318/prefix"));
        assert_eq!(cfg.export_interval, Duration::from_secs(1));
        let cfg = TelemetryConfig::resolve(Some("http://x:1".into()), None, env_of(&[])).unwrap();
        assert_eq!(cfg.export_interval, DEFAULT_EXPORT_INTERVAL);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.service_name, "sluice");
        assert_eq!(
            cfg.sampler,
            SamplerSetting::ParentBased(RootSampler::AlwaysOn)
        );
        assert_eq!(cfg.span_delay, Duration::from_secs(5));
    }

    #[test]
    fn standard_variables_are_honoured() {
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=s3cr%20t, x-team = core ,junk",
                ),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,service.name=from-attrs",
                ),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.timeout, Duration::from_secs(2));
        assert_eq!(
            cfg.headers,
            vec![
                ("api-key".to_string(), "s3cr t".to_string()),
                ("x-team".to_string(), "core".to_string())
            ]
        );
        assert_eq!(cfg.service_name, "from-attrs");
        assert_eq!(
            cfg.resource_attributes,
            vec![("deployment.environment".to_string(), "prod".to_string())]
        );
        assert_eq!(
            cfg.sampler,
            SamplerSetting::ParentBased(RootSampler::TraceIdRatio(0.25))
        );
        assert_eq!(cfg.span_queue, 100);
        assert_eq!(cfg.span_delay, Duration::from_millis(250));
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[
                ("OTEL_SERVICE_NAME", "orders-broker"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.service_name, "orders-broker");
    }

    #[test]
    fn bad_values_name_their_source() {
        let err = |flag: Option<&str>, interval: Option<Duration>, env: &[(&str, &str)]| {
            TelemetryConfig::resolve(flag.map(String::from), interval, env_of(env)).unwrap_err()
        };
        assert!(err(Some("localhost:4318"), None, &[]).contains("--otel-endpoint"));
        assert!(err(Some("https://c:4318"), None, &[]).contains("https"));
        assert!(err(Some("http://"), None, &[]).contains("--otel-endpoint"));
        assert!(
            err(None, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")])
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT")
        );
        let ok = Some("http://c:4318");
        assert!(err(ok, Some(Duration::ZERO), &[]).contains("--otel-interval"));
        assert!(err(ok, None, &[("OTEL_METRIC_EXPORT_INTERVAL", "10s")])
            .contains("OTEL_METRIC_EXPORT_INTERVAL"));
        assert!(err(ok, None, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")])
            .contains("OTEL_EXPORTER_OTLP_TIMEOUT"));
        assert!(
            err(ok, None, &[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("OTEL_TRACES_SAMPLER")
        );
        assert!(err(
            ok,
            None,
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2")
            ]
        )
        .contains("OTEL_TRACES_SAMPLER_ARG"));
        assert!(err(ok, None, &[("OTEL_BSP_MAX_QUEUE_SIZE", "many")])
            .contains("OTEL_BSP_MAX_QUEUE_SIZE"));
    }

    #[test]
    fn handles_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Telemetry>();
        send_sync::<Metrics>();
        send::<PublishSpan>();
        // Small enough to live inline in per-call state.
        assert!(std::mem::size_of::<PublishSpan>() <= 64);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Cc"), "a b,c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn disabled_telemetry_is_a_no_op_that_still_propagates() {
        let t = Telemetry::start(&TelemetryConfig::default()).unwrap();
        assert!(!t.is_enabled());
        assert!(!t.metrics().is_enabled());
        t.metrics().published("t", 1);
        t.gauges().lock().unwrap().connections = 1;

        let span = t.start_publish_span(None, "t", 1);
        assert!(!span.is_recording());
        assert_eq!(span.traceparent(), None);
        span.end(Ok(()));

        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceContext::parse(tp, Some("k=v")).unwrap();
        let span = t.start_publish_span(Some(&parent), "t", 3);
        assert_eq!(span.traceparent(), Some(tp));
        assert_eq!(span.tracestate(), Some("k=v"));
        span.end(Err((14, "unavailable")));
        t.shutdown();
        t.shutdown();
    }

    /// An endpoint nobody listens on: spans and metrics work locally, and
    /// shutdown stays bounded.
    #[test]
    fn spans_are_children_of_the_parent_and_shutdown_is_bounded() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = TelemetryConfig::resolve(
            Some(format!("http://127.0.0.1:{port}")),
            Some(Duration::from_secs(60)),
            env_of(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "200")]),
        )
        .unwrap();
        let t = Telemetry::start(&cfg).unwrap();
        assert!(t.is_enabled());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceContext::parse(tp, Some("k=v")).unwrap();
        let span = t.start_publish_span(Some(&parent), "orders", 2);
        assert!(span.is_recording());
        let child = TraceContext::parse(span.traceparent().unwrap(), None).unwrap();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert!(child.is_sampled());
        assert_eq!(span.tracestate(), Some("k=v"));
        span.end(Ok(()));

        // An unsampled parent is honoured: no recording, flag propagated.
        let unsampled = TraceContext::parse(&tp.replace("-01", "-00"), None).unwrap();
        let span = t.start_publish_span(Some(&unsampled), "orders", 1);
        assert!(!span.is_recording());
        let child = TraceContext::parse(span.traceparent().unwrap(), None).unwrap();
        assert_eq!(child.trace_id, unsampled.trace_id);
        assert!(!child.is_sampled());
        span.end(Ok(()));

        // Roots are sampled and start a new trace.
        let span = t.start_publish_span(None, "orders", 1);
        assert!(span.is_recording());
        let root = TraceContext::parse(span.traceparent().unwrap(), None).unwrap();
        assert_ne!(root.trace_id, parent.trace_id);
        span.end(Err((13, "disk on fire")));

        t.metrics().published("orders", 2);
        t.metrics().committed(2, Duration::from_micros(80));
        let start = std::time::Instant::now();
        t.shutdown();
        assert!(start.elapsed() < SHUTDOWN_LIMIT + Duration::from_secs(1));
    }

    #[test]
    fn span_budget_drops_new_spans_when_full() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = TelemetryConfig::resolve(
            Some(format!("http://127.0.0.1:{port}")),
            None,
            env_of(&[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
                ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ]),
        )
        .unwrap();
        let t = Telemetry::start(&cfg).unwrap();
        let spans: Vec<_> = (0..10)
            .map(|_| t.start_publish_span(None, "t", 1))
            .collect();
        let recording = spans.iter().filter(|s| s.is_recording()).count();
        assert_eq!(recording, 4);
        for s in spans {
            s.end(Ok(()));
        }
        t.shutdown_within(Duration::from_millis(500));
    }
}
