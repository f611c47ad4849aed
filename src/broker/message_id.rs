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

/// Property-based fuzzing of message-id parsing (`cargo test --lib fuzz`):
/// formatted ids parse back to their sequence for their topic, and no string
/// (arbitrary, or an issued id re-spelled, cut or edited) parses unless it is
/// exactly the canonical text of the id it decodes to.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;

    /// Ways a client might re-spell or damage an issued id.
    #[derive(Debug, Clone)]
    enum Spelling {
        Same,
        Upper,
        UpperAt(usize),
        Simple,
        Braced,
        Urn,
        Edit(Vec<(usize, char)>),
        Cut(usize),
        Pad(String),
    }

    fn spelling() -> impl Strategy<Value = Spelling> {
        let c = proptest::sample::select("0789abfAF-{} xg".chars().collect::<Vec<_>>());
        prop_oneof![
            Just(Spelling::Same),
            Just(Spelling::Upper),
            any::<usize>().prop_map(Spelling::UpperAt),
            Just(Spelling::Simple),
            Just(Spelling::Braced),
            Just(Spelling::Urn),
            vec((any::<usize>(), c), 1..3).prop_map(Spelling::Edit),
            any::<usize>().prop_map(Spelling::Cut),
            "[ \t\n]{1,2}|\\PC".prop_map(Spelling::Pad),
        ]
    }

    fn respell(id: &str, how: &Spelling) -> String {
        match how {
            Spelling::Same => id.to_string(),
            Spelling::Upper => id.to_uppercase(),
            Spelling::UpperAt(at) => {
                let mut c: Vec<char> = id.chars().collect();
                let i = at % c.len();
                c[i] = c[i].to_ascii_uppercase();
                c.into_iter().collect()
            }
            Spelling::Simple => id.replace('-', ""),
            Spelling::Braced => format!("{{{id}}}"),
            Spelling::Urn => format!("urn:uuid:{id}"),
            Spelling::Edit(edits) => {
                let mut c: Vec<char> = id.chars().collect();
                for (at, x) in edits {
                    let n = c.len();
                    c[at % n] = *x;
                }
                c.into_iter().collect()
            }
            Spelling::Cut(at) => id[..at % id.len()].to_string(),
            Spelling::Pad(p) => format!("{p}{id}"),
        }
    }

    fn topic() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9._-]{1,12}", any::<String>()]
    }

    proptest! {
        #![proptest_config(config(1024, 1))]

        #[test]
        fn fuzz_ids_round_trip(ts: i64, seq: u64, topic in topic()) {
            let text = MessageId::new(ts, seq, &topic).to_string();
            prop_assert_eq!(text.len(), 36);
            prop_assert_eq!(text.to_lowercase(), text.clone());
            prop_assert_eq!(MessageId::sequence_in(&text, &topic), Some(seq & MAX_SEQUENCE));
        }

        #[test]
        fn fuzz_only_canonical_ids_parse(
            ts in 0i64..(1 << 48),
            seq in 0..=MAX_SEQUENCE,
            topic in topic(),
            how in spelling(),
            noise in any::<String>(),
            use_noise: bool,
        ) {
            let text = if use_noise {
                noise
            } else {
                respell(&MessageId::new(ts, seq, &topic).to_string(), &how)
            };
            if let Some(parsed) = MessageId::sequence_in(&text, &topic) {
                let v = uuid::Uuid::try_parse(&text).unwrap().as_u128();
                let canonical = MessageId::new((v >> 80) as i64, parsed, &topic);
                prop_assert_eq!(canonical.as_u128(), v);
                prop_assert_eq!(canonical.to_string(), text);
            }
        }
    }
}
