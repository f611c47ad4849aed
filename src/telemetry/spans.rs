//! Publish spans: [`Telemetry::start_publish_span`], the [`PublishSpan`] it
//! returns, the parent [`TraceContext`] turned into the SDK's remote span
//! context, and the [`SpanBudget`] that stops new spans while the export
//! queue is full. Calls the tracer set up by `export` and `traceparent`'s
//! formatter; nothing else.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

use super::http::WarnLimiter;
use super::{traceparent, Telemetry, TraceContext};

/// The span [`Telemetry::start_publish_span`] starts.
pub const PUBLISH_SPAN: &str = "sluice.publish";

/// Spans handed to the batch processor and not yet taken by its exporter.
/// Kept at most `span_queue`, so the processor's own queue never overflows
/// and, past it, no span is even created.
pub(super) struct SpanBudget {
    pub(super) queued: AtomicUsize,
    pub(super) cap: usize,
    pub(super) dropped: WarnLimiter,
}

impl fmt::Debug for SpanBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanBudget")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("cap", &self.cap)
            .finish()
    }
}

impl Telemetry {
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
