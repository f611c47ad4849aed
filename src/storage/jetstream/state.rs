//! Loads the broker's start-up state from JetStream: the stream's last
//! sequence, every topic (registry bucket plus the stream's per-subject
//! counts, with its first and last message's sequence, ordinal and time)
//! and every cursor (with the ordinal at it, so pending counts are exact).
//! Calls `nats` and `layout` only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::layout::{self, CursorValue, Layout, TopicValue};
use super::writer::TopicCounters;
use crate::broker::{GroupView, TopicView};
use crate::nats::jetstream::{JetStream, JetStreamError};
use crate::nats::kv_bucket::KvBucket;
use crate::nats::stored_message::MessageSelector;
use crate::storage::LoadedState;

/// Most topics (and cursors) read at start-up; more is a start-up error.
const MAX_KEYS: usize = 1_000_000;

/// (sequence, ordinal, timestamp) of a stored message.
fn position(
    js: &JetStream,
    layout: &Layout,
    selector: MessageSelector<'_>,
) -> Result<Option<(u64, u64, i64)>, String> {
    match js.get_message(layout.stream(), selector) {
        Ok(Some(m)) => {
            let meta = layout::message_meta(m.headers.as_ref())
                .map_err(|e| format!("message {} on {}: {e}", m.seq, m.subject))?;
            Ok(Some((m.seq, meta.ordinal, meta.timestamp_ms)))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(format!("cannot read a message: {e}")),
    }
}

fn err(what: &str) -> impl Fn(JetStreamError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The state plus the writer's per-topic counters.
pub fn load(
    js: &JetStream,
    layout: &Layout,
    topics_kv: &KvBucket,
    cursors_kv: &KvBucket,
) -> Result<(LoadedState, HashMap<Arc<str>, TopicCounters>), String> {
    let counts = js
        .subject_counts(layout.stream(), &layout.all_topics(), MAX_KEYS)
        .map_err(err("cannot read the stream's subjects"))?;
    if counts.truncated {
        return Err(format!("more than {MAX_KEYS} topics in the stream"));
    }
    let mut topics: BTreeMap<String, (Option<i64>, u64)> = BTreeMap::new();
    for (subject, n) in &counts.subjects {
        if let Some(topic) = layout.topic_of(subject) {
            topics.entry(topic).or_insert((None, 0)).1 = *n;
        }
    }
    for key in topics_kv
        .keys("", MAX_KEYS)
        .map_err(err("cannot list the topic registry"))?
    {
        let Ok(topic) = crate::nats::subject_token::decode_topic(&key) else {
            log::warn!("ignoring topic registry key {key:?}: not a topic");
            continue;
        };
        let created = match topics_kv
            .get(&key)
            .map_err(err("cannot read the topic registry"))?
        {
            Some(entry) => serde_json::from_slice::<TopicValue>(&entry.value)
                .map(|v| v.created_at_ms)
                .ok(),
            None => continue,
        };
        topics.entry(topic).or_insert((None, 0)).0 = created;
    }

    let mut state = LoadedState {
        last_seq: counts.stream.last_seq,
        ..LoadedState::default()
    };
    let mut counters = HashMap::new();
    for (topic, (created, n)) in topics {
        let subject = layout
            .subject(&topic)
            .ok_or_else(|| format!("invalid topic name {topic:?}"))?;
        let (first, last) = if n == 0 {
            (None, None)
        } else {
            (
                position(
                    js,
                    layout,
                    MessageSelector::NextBySubject {
                        seq: 1,
                        subject: &subject,
                    },
                )?,
                position(js, layout, MessageSelector::LastBySubject(&subject))?,
            )
        };
        let first = first.unwrap_or((0, 0, 0));
        let last = last.unwrap_or((0, 0, 0));
        let created_at_ms = created.unwrap_or(first.2);
        let name: Arc<str> = topic.into();
        state.topics.push(TopicView {
            name: name.clone(),
            created_at_ms,
            first_seq: first.0,
            first_ordinal: first.1,
            first_ts: first.2,
            last_seq: last.0,
            last_ordinal: last.1,
            last_ts: last.2,
        });
        counters.insert(
            name,
            TopicCounters::new(created_at_ms, (first.0, first.1), (last.0, last.1)),
        );
    }

    let by_name: HashMap<Arc<str>, usize> = state
        .topics
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    for key in cursors_kv
        .keys("", MAX_KEYS)
        .map_err(err("cannot list the cursors"))?
    {
        let Some((topic, group)) = layout::parse_cursor_key(&key) else {
            log::warn!("ignoring cursor key {key:?}: not topic.group");
            continue;
        };
        let Some(entry) = cursors_kv.get(&key).map_err(err("cannot read a cursor"))? else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<CursorValue>(&entry.value) else {
            log::warn!("ignoring cursor {key:?}: its value is not a cursor");
            continue;
        };
        let Some(view) = by_name
            .get(topic.as_str())
            .and_then(|&i| state.topics.get(i))
        else {
            continue;
        };
        let cursor_ordinal = if view.first_seq == 0 {
            0
        } else if v.seq < view.first_seq {
            view.first_ordinal.saturating_sub(1)
        } else if v.seq >= view.last_seq {
            view.last_ordinal
        } else {
            let subject = layout.subject(&topic).unwrap_or_default();
            match position(
                js,
                layout,
                MessageSelector::NextBySubject {
                    seq: v.seq + 1,
                    subject: &subject,
                },
            )? {
                Some((_, ordinal, _)) => ordinal.saturating_sub(1),
                None => view.last_ordinal,
            }
        };
        state.groups.push((
            topic,
            GroupView {
                name: group.into(),
                cursor: v.seq,
                cursor_ordinal,
                last_ack_ms: v.acked_at_ms,
            },
        ));
    }
    Ok((state, counters))
}

/// The delivery counts and dead-letter settings the deliveries bucket
/// holds, per (topic, group).
pub fn load_deliveries(kv: &KvBucket) -> Result<super::writer::GroupDeliveriesMap, String> {
    let mut out = HashMap::new();
    for key in kv
        .keys("", MAX_KEYS)
        .map_err(|e| format!("cannot list the delivery counts: {e}"))?
    {
        let Some((topic, group)) = layout::parse_cursor_key(&key) else {
            continue;
        };
        let Some(entry) = kv
            .get(&key)
            .map_err(|e| format!("cannot read delivery counts: {e}"))?
        else {
            continue;
        };
        match serde_json::from_slice::<layout::DeliveriesValue>(&entry.value) {
            Ok(v) => {
                out.insert((topic.into(), group.into()), v);
            }
            Err(e) => log::warn!("ignoring delivery counts {key:?}: {e}"),
        }
    }
    Ok(out)
}
