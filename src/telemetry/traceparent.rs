//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): parsing and
//! formatting `traceparent`, carrying `tracestate` along unchanged.
//!
//! `traceparent` is `VERSION-TRACEID-PARENTID-FLAGS`: 2, 32, 16 and 2 lowercase
//! hex digits. Version `00` must be exactly 55 characters; a later version
//! (anything but the invalid `ff`) is read by its first four fields, as the
//! specification asks, provided a `-` follows them. All-zero trace or span ids
//! are invalid. Anything invalid is ignored (`None`): the caller then starts a
//! new trace.

use std::fmt::Write as _;

/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

/// Longest `tracestate` carried (the specification's recommended minimum that
/// implementations must propagate); longer values are dropped, not cut.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// A parsed `traceparent` plus the `tracestate` that travelled with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the span we start.
    pub span_id: [u8; 8],
    pub flags: u8,
    /// Vendor state, carried verbatim (`None` when absent, empty or invalid).
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` header value (and an optional `tracestate`).
    /// `None` if `traceparent` is not valid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let s = traceparent
            .trim_matches(|c| c == ' ' || c == '\t')
            .as_bytes();
        if s.len() < 55 {
            return None;
        }
        let version = hex_byte(&s[0..2])?;
        match version {
            0xff => return None,
            0x00 if s.len() != 55 => return None,
            0x00 => {}
            _ if s.len() > 55 && s[55] != b'-' => return None,
            _ => {}
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&s[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&s[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&s[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
            tracestate: tracestate.and_then(clean_tracestate),
        })
    }

    /// The `traceparent` value (always version `00`).
    pub fn traceparent(&self) -> String {
        format_traceparent(&self.trace_id, &self.span_id, self.flags)
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The (parent) span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// Formats a version-00 `traceparent`.
pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    push_hex(&mut s, trace_id);
    s.push('-');
    push_hex(&mut s, span_id);
    let _ = write!(s, "-{flags:02x}");
    s
}

/// `tracestate` as carried: trimmed, printable ASCII, at most
/// [`MAX_TRACESTATE_LEN`] characters; otherwise dropped.
fn clean_tracestate(v: &str) -> Option<String> {
    let v = v.trim_matches(|c| c == ' ' || c == '\t');
    let printable = v.bytes().all(|b| (0x20..0x7f).contains(&b));
    (!v.is_empty() && v.len() <= MAX_TRACESTATE_LEN && printable).then(|| v.to_string())
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // Uppercase is not valid in traceparent.
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_round_trip() {
        let tc = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.span_id_hex(), "00f067aa0ba902b7");
        assert!(tc.is_sampled());
        assert_eq!(tc.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(tc.traceparent(), GOOD);
        let unsampled = GOOD.replace("-01", "-00");
        let tc = TraceContext::parse(&unsampled, None).unwrap();
        assert!(!tc.is_sampled());
        assert_eq!(tc.traceparent(), unsampled);
        assert_eq!(tc.tracestate, None);
        // Surrounding optional whitespace is tolerated.
        assert!(TraceContext::parse(&format!(" {GOOD}\t"), None).is_some());
    }

    #[test]
    fn rejects_malformed_values() {
        let bad = [
            "",
            "00",
            // wrong lengths
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // not hex, uppercase, wrong separators
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // all-zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff is invalid
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // a later version must be followed by '-' if longer
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(
                TraceContext::parse(b, None),
                None,
                "{b:?} should be rejected"
            );
        }
    }

    #[test]
    fn later_versions_are_read_by_their_first_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let tc = TraceContext::parse(v, None).unwrap();
        // Propagated as version 00.
        assert_eq!(tc.traceparent(), GOOD);
        assert!(TraceContext::parse(&v[..55], None).is_some());
    }

    #[test]
    fn tracestate_is_carried_only_when_sane() {
        let ts = |v: &str| TraceContext::parse(GOOD, Some(v)).unwrap().tracestate;
        assert_eq!(ts("  a=1,b=2 ").as_deref(), Some("a=1,b=2"));
        assert_eq!(ts(""), None);
        assert_eq!(ts("a=\u{7}"), None);
        assert_eq!(ts(&"a".repeat(MAX_TRACESTATE_LEN + 1)), None);
        assert!(ts(&"a".repeat(MAX_TRACESTATE_LEN)).is_some());
    }

    #[test]
    fn formats_flags_and_ids() {
        let s = format_traceparent(&[0xab; 16], &[0x01; 8], 0);
        assert_eq!(s, format!("00-{}-{}-00", "ab".repeat(16), "01".repeat(8)));
        assert_eq!(s.len(), 55);
    }
}

/// Property-based fuzzing of `traceparent` / `tracestate` parsing (`cargo
/// test --lib fuzz`): arbitrary and near-valid values are read exactly as an
/// independent, field-splitting reading of the W3C rules reads them (version
/// `ff` and uppercase hex refused, all-zero ids refused, exact lengths, later
/// versions by their first four fields); formatted contexts round-trip; the
/// carried `tracestate` is always trimmed, printable and bounded.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;

    type Fields = ([u8; 16], [u8; 8], u8);

    /// The W3C rules, read by splitting on `-`.
    fn spec(value: &str) -> Option<Fields> {
        let v = value.trim_matches([' ', '\t']);
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let version = v.get(0..2)?;
        if !lower_hex(version) || version == "ff" {
            return None;
        }
        let fields = if version == "00" {
            v
        } else {
            if v.len() > 55 && v.as_bytes()[55] != b'-' {
                return None;
            }
            v.get(..55)?
        };
        let parts: Vec<&str> = fields.split('-').collect();
        let [_, trace, span, flags] = parts[..] else {
            return None;
        };
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
            return None;
        }
        let trace = u128::from_str_radix(trace, 16).ok()?;
        let span = u64::from_str_radix(span, 16).ok()?;
        if trace == 0 || span == 0 {
            return None;
        }
        Some((
            trace.to_be_bytes(),
            span.to_be_bytes(),
            u8::from_str_radix(flags, 16).ok()?,
        ))
    }

    fn id16() -> impl Strategy<Value = [u8; 16]> {
        prop_oneof![1 => Just([0; 16]), 8 => any::<[u8; 16]>()]
    }

    fn id8() -> impl Strategy<Value = [u8; 8]> {
        prop_oneof![1 => Just([0; 8]), 8 => any::<[u8; 8]>()]
    }

    /// Mostly well-formed values with a few characters replaced, cut or
    /// appended, in any version.
    fn near_valid() -> impl Strategy<Value = String> {
        let version = prop_oneof![
            proptest::sample::select(&["00", "01", "cc", "fe", "ff", "FF", "0A", "0g"][..])
                .prop_map(str::to_string),
            "[0-9a-f]{2}",
            "\\PC{0,2}",
        ];
        let edits = vec(
            (
                any::<usize>(),
                proptest::sample::select("0aAfF9g-_ \té".chars().collect::<Vec<_>>()),
            ),
            0..3,
        );
        let tail = prop_oneof!["", "-[a-z0-9-]{0,10}", "[a-z.]{0,3}", "\\PC{0,3}"];
        (
            version,
            id16(),
            id8(),
            any::<u8>(),
            edits,
            any::<Option<usize>>(),
            tail,
            "[ \t]{0,2}",
        )
            .prop_map(|(version, trace, span, flags, edits, cut, tail, pad)| {
                let mut chars: Vec<char> =
                    format!("{version}-{}-{}-{flags:02x}", hex(&trace), hex(&span))
                        .chars()
                        .collect();
                for (at, c) in edits {
                    let n = chars.len();
                    chars[at % n] = c;
                }
                if let Some(cut) = cut {
                    chars.truncate(cut % (chars.len() + 1));
                }
                let body: String = chars.into_iter().collect();
                format!("{pad}{body}{tail}{pad}")
            })
    }

    proptest! {
        #![proptest_config(config(1024, 1))]

        #[test]
        fn fuzz_traceparent_follows_the_spec(v in prop_oneof![near_valid(), any::<String>()]) {
            let parsed = TraceContext::parse(&v, None).map(|c| (c.trace_id, c.span_id, c.flags));
            prop_assert_eq!(parsed, spec(&v));
        }

        #[test]
        fn fuzz_formatted_contexts_round_trip(trace: [u8; 16], span: [u8; 8], flags: u8) {
            let text = format_traceparent(&trace, &span, flags);
            let parsed = TraceContext::parse(&text, None);
            if trace == [0; 16] || span == [0; 8] {
                prop_assert_eq!(parsed, None);
            } else {
                let c = parsed.unwrap();
                prop_assert_eq!((c.trace_id, c.span_id, c.flags), (trace, span, flags));
                prop_assert_eq!(c.traceparent(), text.clone());
                prop_assert_eq!(c.is_sampled(), flags & SAMPLED != 0);
                prop_assert_eq!(format!("00-{}-{}", c.trace_id_hex(), c.span_id_hex()), text[..52].to_string());
                // The same ids in uppercase are not a traceparent.
                let upper = text.to_uppercase();
                prop_assert!(upper == text || TraceContext::parse(&upper, None).is_none());
            }
        }

        #[test]
        fn fuzz_tracestate_is_carried_clean_or_dropped(
            ts in prop_oneof!["[ \t]{0,2}[ -~]{0,600}[ \t]{0,2}", any::<String>()],
        ) {
            let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let carried = TraceContext::parse(good, Some(&ts)).unwrap().tracestate;
            let trimmed = ts.trim_matches([' ', '\t']);
            let clean = !trimmed.is_empty()
                && trimmed.len() <= MAX_TRACESTATE_LEN
                && trimmed.bytes().all(|b| (b' '..=b'~').contains(&b));
            prop_assert_eq!(carried.as_deref(), clean.then_some(trimmed));
        }
    }
}
