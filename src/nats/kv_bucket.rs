//! A key-value bucket kept in a JetStream stream, in the layout NATS KV uses
//! (stream `KV_<bucket>`, subjects `$KV.<bucket>.<key>`, one message kept
//! per key, rollup headers allowed): put (returns the revision = stream
//! sequence), compare-and-set put, get, delete and purge a key, list live
//! keys. Owns `KvBucket` and `KvEntry`. Calls `jetstream` (streams,
//! publish), `stored_message` (get last by subject) and `pull_consumer`
//! (key listing) only.
//!
//! Keys are one or more `.`-separated tokens of `[A-Za-z0-9_=/-]`; build
//! them from topic and group names with `subject_token::encode_topic` so a
//! name's dots never split a key.

use std::time::Duration;

use super::headers::Headers;
use super::jetstream::{JetStream, JetStreamError, PubAck, StreamConfig};
use super::publish_window::OutgoingMessage;
use super::pull_consumer::{DeliverFrom, PullConsumerConfig};
use super::stored_message::MessageSelector;

/// The header marking a delete or purge tombstone.
pub const KV_OPERATION_HEADER: &str = "KV-Operation";
const ROLLUP_HEADER: &str = "Nats-Rollup";
/// Makes a publish fail unless the subject's last sequence is this one (0: no message yet).
pub const EXPECTED_LAST_SUBJECT_SEQ_HEADER: &str = "Nats-Expected-Last-Subject-Sequence";
/// JetStream's err_code for "wrong last sequence" on an expected-sequence publish.
pub const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
/// Keys listed per fetch while walking a bucket.
const LIST_PAGE: usize = 256;

/// The current value of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    /// The stream sequence of the put; compare-and-set compares this.
    pub revision: u64,
}

/// A bucket handle; cheap to clone.
#[derive(Clone)]
pub struct KvBucket {
    js: JetStream,
    bucket: String,
    stream: String,
}

/// A key the bucket can hold: tokens of `[A-Za-z0-9_=/-]` joined by `.`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'/' | b'-'))
        })
}

fn is_tombstone(headers: Option<&Headers>) -> bool {
    matches!(
        headers.and_then(|h| h.get(KV_OPERATION_HEADER)),
        Some("DEL" | "PURGE")
    )
}

impl JetStream {
    /// Creates (or verifies) the bucket's stream with `replicas` copies.
    pub fn kv_bucket(&self, bucket: &str, replicas: usize) -> Result<KvBucket, JetStreamError> {
        self.kv_bucket_with_ttl(bucket, replicas, None)
    }

    /// As `kv_bucket`; with `ttl`, a key not written for that long is gone.
    pub fn kv_bucket_with_ttl(
        &self,
        bucket: &str,
        replicas: usize,
        ttl: Option<Duration>,
    ) -> Result<KvBucket, JetStreamError> {
        if !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            || bucket.is_empty()
        {
            return Err(JetStreamError::Invalid(format!("bucket name {bucket:?}")));
        }
        let stream = format!("KV_{bucket}");
        let mut config = StreamConfig::new(stream.clone(), vec![format!("$KV.{bucket}.>")])
            .replicas(replicas)
            .max_msgs_per_subject(1)
            .allow_rollup_hdrs(true)
            .duplicate_window(Duration::from_secs(120));
        if let Some(ttl) = ttl {
            // The duplicate window may not exceed the max age.
            config = config.max_age(ttl).duplicate_window(ttl);
        }
        match self.create_or_verify_stream(&config) {
            Ok(_) => {}
            // Another time-to-live: the newest setting wins (logged).
            Err(JetStreamError::StreamMismatch { differences, .. })
                if ttl.is_some()
                    && differences
                        .iter()
                        .all(|d| d.starts_with("max_age") || d.starts_with("duplicate_window")) =>
            {
                log::warn!("bucket {bucket}: changing {}", differences.join(", "));
                self.update_stream(&config)?;
            }
            Err(e) => return Err(e),
        }
        Ok(KvBucket {
            js: self.clone(),
            bucket: bucket.to_string(),
            stream,
        })
    }
}

impl KvBucket {
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The bucket's name (its keys live on `$KV.<name>.<key>`).
    pub fn name(&self) -> &str {
        &self.bucket
    }

    fn subject(&self, key: &str) -> Result<String, JetStreamError> {
        if !valid_key(key) {
            return Err(JetStreamError::Invalid(format!("KV key {key:?}")));
        }
        Ok(format!("$KV.{}.{key}", self.bucket))
    }

    fn publish(
        &self,
        key: &str,
        headers: Option<&Headers>,
        value: &[u8],
    ) -> Result<PubAck, JetStreamError> {
        let subject = self.subject(key)?;
        let message = OutgoingMessage {
            subject: &subject,
            msg_id: None,
            headers,
            payload: value,
        };
        self.js.publish_start(&message)?.wait()
    }

    /// Sends a put and returns at once; the ticket's ack carries the revision.
    pub fn put_start(
        &self,
        key: &str,
        value: &[u8],
    ) -> Result<crate::nats::publish_window::PubAckTicket, JetStreamError> {
        let subject = self.subject(key)?;
        self.js.publish_start(&OutgoingMessage {
            subject: &subject,
            msg_id: None,
            headers: None,
            payload: value,
        })
    }

    /// Sets `key`; returns the new revision.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<u64, JetStreamError> {
        Ok(self.publish(key, None, value)?.seq)
    }

    /// Sets `key` only if its current revision is `expected` (0: the key has
    /// never been written or was purged). A lost race is `Api` with
    /// err_code `ERR_WRONG_LAST_SEQUENCE`.
    pub fn put_if_revision(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<u64, JetStreamError> {
        let mut h = Headers::new();
        h.insert(EXPECTED_LAST_SUBJECT_SEQ_HEADER, expected.to_string());
        Ok(self.publish(key, Some(&h), value)?.seq)
    }

    /// The live value of `key`; None when absent, deleted or purged.
    pub fn get(&self, key: &str) -> Result<Option<KvEntry>, JetStreamError> {
        let subject = self.subject(key)?;
        let Some(m) = self
            .js
            .get_message(&self.stream, MessageSelector::LastBySubject(&subject))?
        else {
            return Ok(None);
        };
        if is_tombstone(m.headers.as_ref()) {
            return Ok(None);
        }
        Ok(Some(KvEntry {
            key: key.to_string(),
            value: m.payload,
            revision: m.seq,
        }))
    }

    /// Marks `key` deleted (a tombstone replaces its value); returns the revision.
    pub fn delete(&self, key: &str) -> Result<u64, JetStreamError> {
        let mut h = Headers::new();
        h.insert(KV_OPERATION_HEADER, "DEL");
        Ok(self.publish(key, Some(&h), b"")?.seq)
    }

    /// Removes `key`'s history, leaving one purge tombstone; returns its revision.
    pub fn purge(&self, key: &str) -> Result<u64, JetStreamError> {
        let mut h = Headers::new();
        h.insert(KV_OPERATION_HEADER, "PURGE");
        h.insert(ROLLUP_HEADER, "sub");
        Ok(self.publish(key, Some(&h), b"")?.seq)
    }

    /// Live keys (tombstones skipped) under `prefix` (`""`: all; else a
    /// whole-token prefix such as `"topic"` for `topic.*` keys), at most
    /// `limit`. Walks the newest message of every key through a headers-only
    /// pull consumer, `LIST_PAGE` at a time.
    pub fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, JetStreamError> {
        let filter = if prefix.is_empty() {
            format!("$KV.{}.>", self.bucket)
        } else {
            format!("{}.>", self.subject(prefix)?)
        };
        let config = PullConsumerConfig {
            name: None,
            filter_subject: Some(filter),
            deliver: DeliverFrom::LastPerSubject,
            headers_only: true,
            inactive_threshold: Duration::from_secs(10),
        };
        let consumer = self.js.create_pull_consumer(&self.stream, &config)?;
        let key_start = format!("$KV.{}.", self.bucket).len();
        let mut keys = Vec::new();
        let result = (|| {
            let mut remaining = consumer.num_pending;
            while remaining > 0 && keys.len() < limit {
                let page_size = LIST_PAGE.min(self.js.client().subscription_capacity());
                let page = self
                    .js
                    .fetch(&self.stream, &consumer.name, page_size, None)?;
                let Some(last) = page.last() else {
                    // Keys are pending but none came (a recovering cluster
                    // answers so): a partial list would be taken as whole.
                    return Err(JetStreamError::Client(super::Error::Timeout));
                };
                remaining = last.info.pending;
                for m in &page {
                    if !is_tombstone(m.headers.as_ref()) && keys.len() < limit {
                        keys.push(m.subject.get(key_start..).unwrap_or_default().to_string());
                    }
                }
            }
            Ok(())
        })();
        let _ = self.js.delete_consumer(&self.stream, &consumer.name);
        result.map(|()| keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_subject_tokens() {
        assert!(valid_key("cursor.orders_2Eeu.g1"));
        assert!(valid_key("a=b/c-d_e"));
        assert!(!valid_key(""));
        assert!(!valid_key("a..b"));
        assert!(!valid_key(".a"));
        assert!(!valid_key("a.*"));
        assert!(!valid_key("a.>"));
        assert!(!valid_key("a b"));
    }
}
