//! Export: [`Telemetry::start`] sets up the OTLP/HTTP metric and span
//! exporters (the periodic reader and the batch span processor, each on its
//! own thread, sending through `http`'s blocking client), and
//! [`Telemetry::shutdown`] flushes and stops them within a bound. Calls
//! `config` for the settings, `metrics` for the instruments and `spans` for
//! the span budget it keeps.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::resource::{Resource, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};

use super::http::{BlockingClient, WarnLimiter, WARN_EVERY};
use super::metrics::{Labels, MAX_GROUP_SERIES, MAX_TOPICS};
use super::spans::SpanBudget;
use super::{
    GaugeSnapshot, Metrics, RootSampler, SamplerSetting, Telemetry, TelemetryConfig, Tracing,
};

/// Longest wait for the final flush in [`Telemetry::shutdown`].
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);

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

/// The OTLP span exporter, counting the spans it takes off the queue.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    budget: Arc<SpanBudget>,
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

impl Telemetry {
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
