//! Sluice topic names as single NATS subject tokens, reversibly. Pure: calls
//! nothing. Used to build per-topic subjects and KV keys (issue 11).
//!
//! Topic names are 1–255 chars of `[A-Za-z0-9._-]`. In a NATS subject `.`
//! separates tokens, so a topic `a.b` must not become two tokens. The scheme:
//!
//! - `A-Z a-z 0-9 -` are copied as they are;
//! - `_` becomes `_5F` and `.` becomes `_2E` (`_` + the byte in upper-case hex).
//!
//! `_` only ever starts an escape, so decoding is unambiguous; the decoder
//! accepts exactly the two escapes above (upper-case), so every token has at
//! most one topic and `encode(decode(t)) == t` whenever `decode` succeeds.
//! An encoded token is 1–765 chars of `[A-Za-z0-9_-]`: never `.`, `*`, `>`
//! or whitespace, hence one valid subject token and a valid KV key.

use std::fmt;

/// Longest topic name.
pub const MAX_TOPIC_LEN: usize = 255;

/// Why a name cannot be encoded or a token cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// The topic is empty or longer than `MAX_TOPIC_LEN`.
    Length(usize),
    /// A character outside the topic (or token) alphabet, at this byte offset.
    Character(usize),
    /// `_` not followed by `5F` or `2E`, at this byte offset.
    Escape(usize),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Length(n) => write!(f, "topic name length {n} is not 1..={MAX_TOPIC_LEN}"),
            TokenError::Character(i) => write!(f, "character at byte {i} is not allowed"),
            TokenError::Escape(i) => write!(f, "bad escape at byte {i} (only _5F and _2E)"),
        }
    }
}

impl std::error::Error for TokenError {}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// The subject token for a topic name.
pub fn encode_topic(topic: &str) -> Result<String, TokenError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(TokenError::Length(topic.len()));
    }
    let mut out = String::with_capacity(topic.len() + 8);
    for (i, b) in topic.bytes().enumerate() {
        match b {
            b'_' => out.push_str("_5F"),
            b'.' => out.push_str("_2E"),
            b if plain(b) => out.push(b as char),
            _ => return Err(TokenError::Character(i)),
        }
    }
    Ok(out)
}

/// The topic name a token encodes (the exact inverse of `encode_topic`).
pub fn decode_topic(token: &str) -> Result<String, TokenError> {
    let bytes = token.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                match bytes.get(i + 1..i + 3) {
                    Some(b"5F") => out.push('_'),
                    Some(b"2E") => out.push('.'),
                    _ => return Err(TokenError::Escape(i)),
                }
                i += 3;
            }
            b if plain(b) => {
                out.push(b as char);
                i += 1;
            }
            _ => return Err(TokenError::Character(i)),
        }
    }
    if out.is_empty() || out.len() > MAX_TOPIC_LEN {
        return Err(TokenError::Length(out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_only_dot_and_underscore() {
        assert_eq!(encode_topic("orders").unwrap(), "orders");
        assert_eq!(encode_topic("a.b_c-D9").unwrap(), "a_2Eb_5Fc-D9");
        assert_eq!(encode_topic("._").unwrap(), "_2E_5F");
        assert_eq!(decode_topic("a_2Eb_5Fc-D9").unwrap(), "a.b_c-D9");
        let longest = "_".repeat(MAX_TOPIC_LEN);
        assert_eq!(encode_topic(&longest).unwrap().len(), 3 * MAX_TOPIC_LEN);
    }

    #[test]
    fn rejects_what_is_not_a_topic_or_token() {
        assert_eq!(encode_topic(""), Err(TokenError::Length(0)));
        assert_eq!(encode_topic(&"a".repeat(256)), Err(TokenError::Length(256)));
        assert_eq!(encode_topic("a*b"), Err(TokenError::Character(1)));
        assert_eq!(encode_topic("a b"), Err(TokenError::Character(1)));
        assert_eq!(encode_topic("é"), Err(TokenError::Character(0)));
        assert_eq!(decode_topic(""), Err(TokenError::Length(0)));
        assert_eq!(decode_topic("a.b"), Err(TokenError::Character(1)));
        assert_eq!(decode_topic("a_"), Err(TokenError::Escape(1)));
        assert_eq!(decode_topic("a_5f"), Err(TokenError::Escape(1)));
        assert_eq!(decode_topic("_41"), Err(TokenError::Escape(0)));
        assert_eq!(decode_topic(">"), Err(TokenError::Character(0)));
        assert_eq!(decode_topic(&"a".repeat(256)), Err(TokenError::Length(256)));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz_support::{config, topic_rule_ok};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config(512, 1))]

        /// Every topic encodes to one token that decodes back to it.
        #[test]
        fn round_trips(topic in "[A-Za-z0-9._-]{1,255}") {
            let token = encode_topic(&topic).unwrap();
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            prop_assert_eq!(decode_topic(&token).unwrap(), topic);
        }

        /// Distinct topics never share a token.
        #[test]
        fn injective(a in "[a._-]{1,12}", b in "[a._-]{1,12}") {
            prop_assume!(a != b);
            prop_assert_ne!(encode_topic(&a).unwrap(), encode_topic(&b).unwrap());
        }

        /// Arbitrary strings: encode succeeds exactly on topic names, and any
        /// token that decodes is the encoding of what it decodes to.
        #[test]
        fn arbitrary_input(s in "[A-Za-z0-9._ *>5FE-]{0,20}|\\PC{0,20}") {
            prop_assert_eq!(encode_topic(&s).is_ok(), topic_rule_ok(&s));
            if let Ok(topic) = decode_topic(&s) {
                prop_assert_eq!(encode_topic(&topic).unwrap(), s);
            }
        }
    }
}
