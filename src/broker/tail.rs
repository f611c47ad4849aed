//! `MessageTail`: the small in-memory cache of the newest messages of every
//! topic, so live subscribers are served straight from the commit. One global
//! budget (messages and bytes); the oldest entries across all topics go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::message::StoredMessage;

#[derive(Debug)]
struct TopicTail {
    messages: VecDeque<Arc<StoredMessage>>,
    /// Every message of the topic with sequence >= floor is in `messages`.
    floor: u64,
}

#[derive(Debug)]
pub struct MessageTail {
    topics: HashMap<Arc<str>, TopicTail>,
    /// Insertion order across topics: (topic, sequence).
    order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl MessageTail {
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        MessageTail {
            topics: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Starts tracking a topic whose messages below `floor` are only on disk.
    pub fn add_topic(&mut self, topic: Arc<str>, floor: u64) {
        self.topics.entry(topic).or_insert(TopicTail {
            messages: VecDeque::new(),
            floor,
        });
    }

    pub fn remove_topic(&mut self, topic: &str) {
        if let Some(t) = self.topics.remove(topic) {
            self.bytes -= t.messages.iter().map(|m| m.footprint()).sum::<usize>();
        }
        self.order.retain(|(name, _)| &**name != topic);
    }

    /// Appends newly committed messages (ascending sequences) to a topic.
    pub fn append(&mut self, topic: &Arc<str>, messages: &[Arc<StoredMessage>]) {
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        for m in messages {
            self.bytes += m.footprint();
            t.messages.push_back(m.clone());
            self.order.push_back((topic.clone(), m.sequence));
        }
        while self.order.len() > self.max_messages || self.bytes > self.max_bytes {
            let Some((name, seq)) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.topics.get_mut(&name) {
                if t.messages.front().is_some_and(|m| m.sequence == seq) {
                    if let Some(m) = t.messages.pop_front() {
                        self.bytes -= m.footprint();
                        t.floor = seq + 1;
                    }
                }
            }
        }
    }

    /// Drops a topic's messages below `seq` (deleted by retention).
    pub fn trim_before(&mut self, topic: &str, seq: u64) {
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        while t.messages.front().is_some_and(|m| m.sequence < seq) {
            if let Some(m) = t.messages.pop_front() {
                self.bytes -= m.footprint();
            }
        }
        // Their entries in `order` no longer match a front and are skipped.
    }

    /// The lowest sequence served from memory for `topic`.
    pub fn floor(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(u64::MAX, |t| t.floor)
    }

    /// The first message of `topic` with sequence >= `from`, if the tail
    /// covers that position.
    pub fn first_from(&self, topic: &str, from: u64) -> Option<&Arc<StoredMessage>> {
        let t = self.topics.get(topic)?;
        if from < t.floor {
            return None;
        }
        let i = t.messages.partition_point(|m| m.sequence < from);
        t.messages.get(i)
    }

    /// The message with exactly this sequence, if it is in memory.
    pub fn get(&self, topic: &str, seq: u64) -> Option<&Arc<StoredMessage>> {
        self.first_from(topic, seq).filter(|m| m.sequence == seq)
    }

    /// Whether `from` lies in the part of the topic only on disk.
    pub fn needs_disk(&self, topic: &str, from: u64) -> bool {
        from < self.floor(topic)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message_id::MessageId;

    fn msg(seq: u64, len: usize) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            sequence: seq,
            ordinal: seq,
            id: MessageId::new(0, seq, "t"),
            timestamp_ms: 0,
            payload: vec![0; len].into(),
            attributes: Default::default(),
        })
    }

    #[test]
    fn evicts_oldest_first_across_topics_and_raises_the_floor() {
        let mut tail = MessageTail::new(3, usize::MAX);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        tail.add_topic(a.clone(), 1);
        tail.add_topic(b.clone(), 1);
        tail.append(&a, &[msg(1, 1), msg(2, 1)]);
        tail.append(&b, &[msg(3, 1), msg(4, 1)]);
        assert_eq!(tail.floor("a"), 2);
        assert!(tail.needs_disk("a", 1));
        assert_eq!(tail.first_from("a", 1).map(|m| m.sequence), None);
        assert_eq!(tail.first_from("a", 2).map(|m| m.sequence), Some(2));
        assert_eq!(tail.first_from("b", 1).map(|m| m.sequence), Some(3));
        assert_eq!(tail.first_from("b", 5).map(|m| m.sequence), None);
        assert!(tail.get("b", 4).is_some());
    }

    #[test]
    fn respects_the_byte_budget() {
        let mut tail = MessageTail::new(1000, 3000);
        let a: Arc<str> = "a".into();
        tail.add_topic(a.clone(), 0);
        for s in 1..=10 {
            tail.append(&a, &[msg(s, 1000)]);
        }
        assert!(tail.bytes() <= 3000);
        assert!(tail.floor("a") > 1);
    }
}
