//! Tests of the telemetry handle as a whole: disabled no-ops, spans against
//! an endpoint nobody listens on, the span budget and bounded shutdown.

use super::config::tests::env_of;
use super::*;

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
