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
//!
//! # Layout
//!
//! This file is the public face: the [`Telemetry`] handle, its cheap
//! accessors and the re-exports. `config` resolves the settings, `export`
//! starts and stops the OTLP exporters, `spans` makes publish spans,
//! `metrics` holds the instruments, `traceparent` parses and formats W3C
//! trace context and `http` is the blocking OTLP/HTTP client.

mod config;
mod export;
mod http;
pub mod metrics;
mod spans;
pub mod traceparent;

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

pub use self::config::{
    RootSampler, SamplerSetting, TelemetryConfig, DEFAULT_EXPORT_INTERVAL, DEFAULT_SERVICE_NAME,
    DEFAULT_SPAN_QUEUE, DEFAULT_TIMEOUT,
};
pub use self::export::SHUTDOWN_LIMIT;
pub use self::metrics::{GaugeSnapshot, Metrics, SubscriptionGauge};
pub use self::spans::{PublishSpan, PUBLISH_SPAN};
pub use self::traceparent::TraceContext;

use self::spans::SpanBudget;

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
}

#[cfg(test)]
mod tests;
