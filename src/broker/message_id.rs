//! `MessageId`: a UUIDv7 that carries its message's global sequence.
//!
//! Layout (RFC 9562 allows the random bits to hold a counter): 48 bits of Unix
//! milliseconds, version 7, then the sequence's top 12 bits in `rand_a`, the
//! variant, the sequence's low 44 bits and an 18-bit check over
//! (timestamp, sequence, topic). Acks name messages by id; decoding the id
//! gives the sequence with no lookup and no per-message memory, and the check
//! rejects ids that were never issued for the topic.

use std::fmt;

/// Largest sequence an id can carry (56 bits).
pub const MAX_SEQUENCE: u64 = (1 << 56) - 1;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MessageId(u128);

fn check_bits(timestamp_ms: u64, sequence: u64, topic: &str) -> u128 {
    // FNV-1a 64: stable across builds and restarts.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&timestamp_ms.to_le_bytes());
    eat(&sequence.to_le_bytes());
    eat(topic.as_bytes());
    u128::from((h ^ (h >> 32)) & 0x3_FFFF)
}

impl MessageId {
    /// The id of message `sequence` stored at `timestamp_ms` in `topic`.
    pub fn new(timestamp_ms: i64, sequence: u64, topic: &str) -> MessageId {
        let ts = (timestamp_ms.max(0) as u64) & 0xFFFF_FFFF_FFFF;
        let seq = sequence & MAX_SEQUENCE;
        let mut v: u128 = u128::from(ts) << 80;
        v |= 0x7 << 76;
        v |= u128::from(seq >> 44) << 64;
        v |= 0b10 << 62;
        v |= u128::from(seq & 0xFFF_FFFF_FFFF) << 18;
        v |= check_bits(ts, seq, topic);
        MessageId(v)
    }

    /// Parses the canonical text form and checks that the id was issued for
    /// `topic`; returns the sequence it carries.
    pub fn sequence_in(text: &str, topic: &str) -> Option<u64> {
        let uuid = uuid::Uuid::try_parse(text).ok()?;
        // `try_parse` also reads uppercase, simple, braced and URN spellings;
        // an id is only ever the lowercase hyphenated text it was issued as.
        let mut canonical = uuid::Uuid::encode_buffer();
        if uuid.hyphenated().encode_lower(&mut canonical) != text {
            return None;
        }
        let v = uuid.as_u128();
        if (v >> 76) & 0xF != 7 || (v >> 62) & 0b11 != 0b10 {
            return None;
        }
        let ts = (v >> 80) as u64;
        let seq = (((v >> 64) & 0xFFF) as u64) << 44 | ((v >> 18) & 0xFFF_FFFF_FFFF) as u64;
        if v & 0x3_FFFF != check_bits(ts, seq, topic) {
            return None;
        }
        Some(seq)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = uuid::Uuid::encode_buffer();
        f.write_str(
            uuid::Uuid::from_u128(self.0)
                .hyphenated()
                .encode_lower(&mut buf),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_canonical_uuid_v7() {
        let id = MessageId::new(1_700_000_000_123, 42, "t").to_string();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id, id.to_lowercase());
        assert_eq!(id.len(), 36);
        let (secs, nanos) = parsed.get_timestamp().unwrap().to_unix();
        assert_eq!(
            secs * 1000 + u64::from(nanos) / 1_000_000,
            1_700_000_000_123
        );
    }

    #[test]
    fn round_trips_the_sequence_for_its_topic_only() {
        for seq in [1, 4095, 1 << 44, (1 << 44) + 7, MAX_SEQUENCE] {
            let id = MessageId::new(1_700_000_000_000, seq, "orders").to_string();
            assert_eq!(MessageId::sequence_in(&id, "orders"), Some(seq));
            assert_eq!(MessageId::sequence_in(&id, "other"), None);
        }
    }

    #[test]
    fn ids_sort_like_sequences_within_a_millisecond() {
        let a = MessageId::new(5, 10, "t").as_u128();
        let b = MessageId::new(5, 11, "t").as_u128();
        assert!(a < b);
    }

    #[test]
    fn rejects_foreign_ids() {
        assert_eq!(MessageId::sequence_in("not-a-uuid", "t"), None);
        assert_eq!(
            MessageId::sequence_in("0190d9b1-5c1a-7000-8000-000000000000", "t"),
            None
        );
        let v4 = "9b2f0c4e-8d1a-4f7b-9c3e-2a5d6e7f8a9b";
        assert_eq!(MessageId::sequence_in(v4, "t"), None);
    }

    /// Found by fuzzing: other spellings of an issued id (here the simple
    /// form of the id of sequence 0 at time 0 in topic "0") were accepted as
    /// that id, although only the canonical text is ever issued.
    #[test]
    fn rejects_other_spellings_of_an_issued_id() {
        let id = MessageId::new(0, 0, "0").to_string();
        assert_eq!(id, "00000000-0000-7000-8000-000000014090");
        assert_eq!(MessageId::sequence_in(&id, "0"), Some(0));
        assert_eq!(
            MessageId::sequence_in("00000000000070008000000000014090", "0"),
            None
        );
        let id = MessageId::new(1_700_000_000_123, 42, "t").to_string();
        assert_eq!(MessageId::sequence_in(&id, "t"), Some(42));
        for other in [
            id.replace('-', ""),
            id.to_uppercase(),
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
        ] {
            assert_ne!(other, id);
            assert_eq!(MessageId::sequence_in(&other, "t"), None, "{other}");
        }
    }
}
