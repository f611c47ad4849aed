//! The broker's instruments and the bounded attribute sets they are recorded
//! with.
//!
//! Recording happens on the reactor thread at up to ~100k calls per second,
//! so each call is: one uncontended mutex, one hash lookup of the topic (and
//! group) in a cache of ready-made attribute sets, and the SDK's own update
//! (read lock + atomic). No allocation once a topic has been seen.
//!
//! Cardinality is bounded: at most [`MAX_TOPICS`] distinct `topic` values
//! (later topics are recorded as [`OTHER`]) and at most [`MAX_GROUP_SERIES`]
//! distinct (`topic`, `consumer_group`) pairs (later groups are recorded as
//! `consumer_group` = [`OTHER`]). A real topic or group literally named
//! `_other` shares that series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::KeyValue;

/// Distinct `topic` attribute values before the rest become [`OTHER`].
pub const MAX_TOPICS: usize = 256;
/// Distinct (`topic`, `consumer_group`) pairs before new groups become [`OTHER`].
pub const MAX_GROUP_SERIES: usize = 1024;
/// The attribute value standing for everything past a cardinality bound.
pub const OTHER: &str = "_other";

pub const TOPIC: &str = "topic";
pub const CONSUMER_GROUP: &str = "consumer_group";

/// Latency buckets in seconds: 50 µs … 10 s.
const LATENCY_BOUNDS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Messages per commit (the writer caps a batch at `--commit-max-messages`).
const BATCH_BOUNDS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// What the reactor knows right now, read by the exporter thread at each
/// export (observable gauges). Refresh it at least once per export interval;
/// keep the lock only while copying values in.
#[derive(Debug, Default, Clone)]
pub struct GaugeSnapshot {
    /// Open client connections.
    pub connections: u64,
    /// Requests queued for (or parked in front of) the writer.
    pub writer_queue_depth: u64,
    /// One entry per active Subscribe stream.
    pub subscriptions: Vec<SubscriptionGauge>,
}

/// One active subscription, as the gauges see it.
#[derive(Debug, Clone)]
pub struct SubscriptionGauge {
    pub topic: Arc<str>,
    pub consumer_group: Arc<str>,
    /// Latest sequence in the topic minus the group's cursor (0 if caught up).
    pub lag: u64,
    /// Messages are waiting but the consumer has no credit left.
    pub backpressure: bool,
}

/// Ready-made attribute sets, bounded as described in the module docs.
#[derive(Debug)]
pub(crate) struct Labels {
    max_topics: usize,
    max_pairs: usize,
    pairs: usize,
    topics: HashMap<Box<str>, TopicLabels>,
    other: TopicLabels,
}

#[derive(Debug)]
struct TopicLabels {
    topic: [KeyValue; 1],
    groups: HashMap<Box<str>, [KeyValue; 2]>,
    other_group: [KeyValue; 2],
}

impl TopicLabels {
    fn new(topic: &str) -> TopicLabels {
        let topic = KeyValue::new(TOPIC, Arc::<str>::from(topic));
        TopicLabels {
            other_group: [topic.clone(), KeyValue::new(CONSUMER_GROUP, OTHER)],
            topic: [topic],
            groups: HashMap::new(),
        }
    }
}

impl Labels {
    pub(crate) fn new(max_topics: usize, max_pairs: usize) -> Labels {
        Labels {
            max_topics,
            max_pairs,
            pairs: 0,
            topics: HashMap::new(),
            other: TopicLabels::new(OTHER),
        }
    }

    /// `[topic]`.
    pub(crate) fn topic(&mut self, topic: &str) -> &[KeyValue] {
        &entry(&mut self.topics, &mut self.other, self.max_topics, topic).topic
    }

    /// `[topic, consumer_group]`.
    pub(crate) fn pair(&mut self, topic: &str, group: &str) -> &[KeyValue] {
        let Labels {
            max_topics,
            max_pairs,
            pairs,
            topics,
            other,
        } = self;
        let entry = entry(topics, other, *max_topics, topic);
        if !entry.groups.contains_key(group) {
            if *pairs >= *max_pairs {
                return &entry.other_group;
            }
            *pairs += 1;
            let kv = [
                entry.topic[0].clone(),
                KeyValue::new(CONSUMER_GROUP, Arc::<str>::from(group)),
            ];
            entry.groups.insert(group.into(), kv);
        }
        &entry.groups[group]
    }
}

/// The labels for `topic`, added if there is room, else the `_other` ones.
fn entry<'a>(
    topics: &'a mut HashMap<Box<str>, TopicLabels>,
    other: &'a mut TopicLabels,
    max_topics: usize,
    topic: &str,
) -> &'a mut TopicLabels {
    if !topics.contains_key(topic) {
        if topics.len() >= max_topics {
            return other;
        }
        topics.insert(topic.into(), TopicLabels::new(topic));
    }
    topics.get_mut(topic).expect("present")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The broker's instruments. Every method is a no-op (one branch) when
/// telemetry is disabled.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Option<Box<Instruments>>,
}

#[derive(Debug)]
struct Instruments {
    labels: Arc<Mutex<Labels>>,
    publish_total: Counter<u64>,
    batch_publish_total: Counter<u64>,
    delivered: Counter<u64>,
    acked: Counter<u64>,
    redelivered: Counter<u64>,
    dead_lettered: Counter<u64>,
    credits_granted: Counter<u64>,
    publish_latency: Histogram<f64>,
    commit_batch_size: Histogram<u64>,
    commit_latency: Histogram<f64>,
    /// Kept so the callbacks live as long as the instruments.
    _gauges: Vec<ObservableGauge<u64>>,
}

impl Metrics {
    /// Metrics that record nothing.
    pub fn disabled() -> Metrics {
        Metrics { inner: None }
    }

    /// Creates every instrument on `meter`; the gauges read `gauges` when
    /// the meter's reader collects.
    pub(crate) fn new(
        meter: &Meter,
        gauges: Arc<Mutex<GaugeSnapshot>>,
        labels: Arc<Mutex<Labels>>,
    ) -> Metrics {
        let counter = |name: &'static str, unit: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(description)
                .build()
        };
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build()
        };
        let instruments = Instruments {
            publish_total: counter(
                "sluice_publish_total",
                "{message}",
                "Messages published (Publish and BatchPublish), per topic",
            ),
            batch_publish_total: counter(
                "sluice_batch_publish_total",
                "{call}",
                "BatchPublish calls, per topic",
            ),
            delivered: counter(
                "sluice_messages_delivered",
                "{message}",
                "Messages sent to subscribers, per topic and consumer group",
            ),
            acked: counter(
                "sluice_messages_acked",
                "{message}",
                "Messages acknowledged, per topic and consumer group",
            ),
            redelivered: counter(
                "sluice_messages_redelivered",
                "{message}",
                "Messages delivered again (nack or reconnect, ack deadline), per topic and consumer group",
            ),
            dead_lettered: counter(
                "sluice_messages_dead_lettered",
                "{message}",
                "Messages moved to a dead-letter topic after max_deliveries, per topic and consumer group",
            ),
            credits_granted: counter(
                "sluice_credits_granted",
                "{credit}",
                "Credits granted by subscribers, per topic and consumer group",
            ),
            publish_latency: seconds(
                "sluice_publish_latency_seconds",
                "Publish calls from request in to reply out, per topic",
            ),
            commit_batch_size: meter
                .u64_histogram("sluice_commit_batch_size")
                .with_unit("{message}")
                .with_description("Messages per group commit (one fsync)")
                .with_boundaries(BATCH_BOUNDS.to_vec())
                .build(),
            commit_latency: seconds(
                "sluice_commit_latency_seconds",
                "Group commit duration, including the fsync",
            ),
            _gauges: register_gauges(meter, gauges, labels.clone()),
            labels,
        };
        Metrics {
            inner: Some(Box::new(instruments)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `n` messages were published to `topic` (counted once committed).
    #[inline]
    pub fn published(&self, topic: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.publish_total.add(n, lock(&i.labels).topic(topic));
        }
    }

    /// One BatchPublish call on `topic` succeeded.
    #[inline]
    pub fn batch_published(&self, topic: &str) {
        if let Some(i) = &self.inner {
            i.batch_publish_total.add(1, lock(&i.labels).topic(topic));
        }
    }

    /// A publish call on `topic` took `elapsed` from request in to reply out.
    #[inline]
    pub fn publish_latency(&self, topic: &str, elapsed: Duration) {
        if let Some(i) = &self.inner {
            i.publish_latency
                .record(elapsed.as_secs_f64(), lock(&i.labels).topic(topic));
        }
    }

    /// One group commit of `batch_size` messages took `elapsed` (fsync included).
    #[inline]
    pub fn committed(&self, batch_size: u64, elapsed: Duration) {
        if let Some(i) = &self.inner {
            i.commit_batch_size.record(batch_size, &[]);
            i.commit_latency.record(elapsed.as_secs_f64(), &[]);
        }
    }

    #[inline]
    pub fn delivered(&self, topic: &str, group: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.delivered.add(n, lock(&i.labels).pair(topic, group));
        }
    }

    #[inline]
    pub fn acked(&self, topic: &str, group: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.acked.add(n, lock(&i.labels).pair(topic, group));
        }
    }

    #[inline]
    pub fn redelivered(&self, topic: &str, group: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.redelivered.add(n, lock(&i.labels).pair(topic, group));
        }
    }

    #[inline]
    pub fn dead_lettered(&self, topic: &str, group: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.dead_lettered.add(n, lock(&i.labels).pair(topic, group));
        }
    }

    #[inline]
    pub fn credits_granted(&self, topic: &str, group: &str, n: u64) {
        if let Some(i) = &self.inner {
            i.credits_granted.add(n, lock(&i.labels).pair(topic, group));
        }
    }
}

/// Per-series gauge values, after cardinality folding.
#[derive(Default)]
struct Folded {
    per_topic: HashMap<Vec<KeyValue>, u64>,
    lag: HashMap<Vec<KeyValue>, u64>,
    backpressure: HashMap<Vec<KeyValue>, u64>,
}

/// Folds the snapshot's subscriptions onto bounded attribute sets: counts
/// per topic, the largest lag and any backpressure per (topic, group).
fn fold(snapshot: &Mutex<GaugeSnapshot>, labels: &Mutex<Labels>) -> Folded {
    let snapshot = lock(snapshot);
    let mut labels = lock(labels);
    let mut out = Folded::default();
    for s in &snapshot.subscriptions {
        *out.per_topic
            .entry(labels.topic(&s.topic).to_vec())
            .or_default() += 1;
        let pair = labels.pair(&s.topic, &s.consumer_group).to_vec();
        let lag = out.lag.entry(pair.clone()).or_default();
        *lag = (*lag).max(s.lag);
        let bp = out.backpressure.entry(pair).or_default();
        *bp = (*bp).max(u64::from(s.backpressure));
    }
    out
}

fn register_gauges(
    meter: &Meter,
    snapshot: Arc<Mutex<GaugeSnapshot>>,
    labels: Arc<Mutex<Labels>>,
) -> Vec<ObservableGauge<u64>> {
    type Pick = fn(&Folded) -> &HashMap<Vec<KeyValue>, u64>;
    let per_series =
        |name: &'static str, unit: &'static str, description: &'static str, pick: Pick| {
            let snapshot = snapshot.clone();
            let labels = labels.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| {
                    let folded = fold(&snapshot, &labels);
                    for (attrs, value) in pick(&folded) {
                        observer.observe(*value, attrs);
                    }
                })
                .build()
        };
    let single = |name: &'static str,
                  unit: &'static str,
                  description: &'static str,
                  pick: fn(&GaugeSnapshot) -> u64| {
        let snapshot = snapshot.clone();
        meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| observer.observe(pick(&lock(&snapshot)), &[]))
            .build()
    };
    vec![
        per_series(
            "sluice_active_subscriptions",
            "{subscription}",
            "Active Subscribe streams, per topic",
            |f| &f.per_topic,
        ),
        per_series(
            "sluice_subscription_lag",
            "{message}",
            "Latest sequence minus the group's cursor, per topic and consumer group",
            |f| &f.lag,
        ),
        per_series(
            "sluice_backpressure_active",
            "1",
            "1 while a subscription has messages waiting but no credit, per topic and consumer group",
            |f| &f.backpressure,
        ),
        single(
            "sluice_connections",
            "{connection}",
            "Open client connections",
            |s| s.connections,
        ),
        single(
            "sluice_writer_queue_depth",
            "{request}",
            "Requests waiting for the storage writer",
            |s| s.writer_queue_depth,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(attrs: &[KeyValue], key: &str) -> Option<String> {
        attrs
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    }

    #[test]
    fn topics_past_the_bound_become_other() {
        let mut l = Labels::new(3, 100);
        for t in ["a", "b", "c"] {
            assert_eq!(value(l.topic(t), TOPIC).as_deref(), Some(t));
        }
        assert_eq!(value(l.topic("d"), TOPIC).as_deref(), Some(OTHER));
        assert_eq!(value(l.topic("e"), TOPIC).as_deref(), Some(OTHER));
        // Known topics keep their own series.
        assert_eq!(value(l.topic("b"), TOPIC).as_deref(), Some("b"));
        assert_eq!(l.topics.len(), 3);
        // Pairs on an overflowed topic carry topic=_other.
        let p = l.pair("zz", "g").to_vec();
        assert_eq!(value(&p, TOPIC).as_deref(), Some(OTHER));
        assert_eq!(value(&p, CONSUMER_GROUP).as_deref(), Some("g"));
    }

    #[test]
    fn group_pairs_past_the_bound_become_other() {
        let mut l = Labels::new(10, 2);
        let p = l.pair("t", "g1").to_vec();
        assert_eq!(value(&p, TOPIC).as_deref(), Some("t"));
        assert_eq!(value(&p, CONSUMER_GROUP).as_deref(), Some("g1"));
        l.pair("t", "g2");
        let p = l.pair("t", "g3").to_vec();
        assert_eq!(value(&p, TOPIC).as_deref(), Some("t"));
        assert_eq!(value(&p, CONSUMER_GROUP).as_deref(), Some(OTHER));
        // Known pairs stay themselves.
        let p = l.pair("t", "g2").to_vec();
        assert_eq!(value(&p, CONSUMER_GROUP).as_deref(), Some("g2"));
        assert_eq!(l.pairs, 2);
    }

    #[test]
    fn the_default_bounds_hold_under_many_names() {
        let mut l = Labels::new(MAX_TOPICS, MAX_GROUP_SERIES);
        let mut distinct = std::collections::HashSet::new();
        for i in 0..5_000 {
            let t = format!("topic-{}", i % 1000);
            let g = format!("group-{i}");
            let attrs = l.pair(&t, &g).to_vec();
            distinct.insert(format!("{attrs:?}"));
        }
        assert!(l.topics.len() <= MAX_TOPICS);
        assert!(l.pairs <= MAX_GROUP_SERIES);
        // Every pair series plus at most one `_other` group per topic label.
        assert!(distinct.len() <= MAX_GROUP_SERIES + MAX_TOPICS + 1);
    }

    #[test]
    fn folding_sums_per_topic_and_keeps_worst_lag() {
        let snap = Mutex::new(GaugeSnapshot::default());
        let sub = |t: &str, g: &str, lag, bp| SubscriptionGauge {
            topic: t.into(),
            consumer_group: g.into(),
            lag,
            backpressure: bp,
        };
        lock(&snap).subscriptions = vec![
            sub("a", "g", 5, false),
            sub("a", "g", 7, true),
            sub("a", "h", 1, false),
            sub("b", "g", 0, false),
            sub("c", "g", 9, false),
        ];
        // Two topics allowed: "c" folds into _other.
        let labels = Mutex::new(Labels::new(2, 100));
        let f = fold(&snap, &labels);
        let get = |m: &HashMap<Vec<KeyValue>, u64>, t: &str, g: Option<&str>| {
            m.iter()
                .find(|(k, _)| {
                    value(k, TOPIC).as_deref() == Some(t)
                        && value(k, CONSUMER_GROUP).as_deref() == g
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(get(&f.per_topic, "a", None), Some(3));
        assert_eq!(get(&f.per_topic, "b", None), Some(1));
        assert_eq!(get(&f.per_topic, OTHER, None), Some(1));
        assert_eq!(get(&f.lag, "a", Some("g")), Some(7));
        assert_eq!(get(&f.lag, "a", Some("h")), Some(1));
        assert_eq!(get(&f.lag, OTHER, Some("g")), Some(9));
        assert_eq!(get(&f.backpressure, "a", Some("g")), Some(1));
        assert_eq!(get(&f.backpressure, "a", Some("h")), Some(0));
    }

    #[test]
    fn disabled_metrics_do_nothing() {
        let m = Metrics::disabled();
        assert!(!m.is_enabled());
        m.published("t", 1);
        m.batch_published("t");
        m.publish_latency("t", Duration::from_millis(1));
        m.committed(10, Duration::from_millis(1));
        m.delivered("t", "g", 1);
        m.acked("t", "g", 1);
        m.redelivered("t", "g", 1);
        m.credits_granted("t", "g", 1);
    }
}
