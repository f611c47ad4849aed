//! gRPC status codes and the `grpc-message` percent-encoding (and its decoding).

use std::fmt;

/// The canonical gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The code for a `grpc-status` number (unknown numbers are `Unknown`).
    pub fn from_i32(n: i32) -> Code {
        use Code::*;
        const ALL: [Code; 17] = [
            Ok,
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ];
        usize::try_from(n)
            .ok()
            .and_then(|i| ALL.get(i))
            .copied()
            .unwrap_or(Unknown)
    }

    pub fn as_str(self) -> &'static str {
        // Decimal text as it goes in `grpc-status`.
        const TEXT: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        TEXT[self as usize]
    }
}

/// A status with its human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
    pub fn ok() -> Self {
        Status::new(Code::Ok, "")
    }
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Status::new(Code::InvalidArgument, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Status::new(Code::Internal, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Status::new(Code::Unavailable, m)
    }
    pub fn unimplemented(m: impl Into<String>) -> Self {
        Status::new(Code::Unimplemented, m)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Percent-encodes a `grpc-message` value: bytes outside printable ASCII,
/// and `%` itself, become `%XX` (the gRPC over HTTP/2 spec).
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes percent-encoding: each `%XX` (two hex digits) becomes that byte;
/// anything else, including a `%` not followed by two hex digits, is kept as
/// it is. Bytes that are not UTF-8 become U+FFFD. The one decoder for
/// `grpc-message` values (the CLI) and the `OTEL_*` key=value lists.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_only_what_the_spec_requires() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("100%\n"), "100%25%0A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn decodes_what_it_can_and_keeps_the_rest() {
        assert_eq!(percent_decode("a%20b%2Cc"), "a b,c");
        assert_eq!(percent_decode("%c3%A9"), "é");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        // Not a sign or other text from_str_radix would take.
        assert_eq!(percent_decode("%+1"), "%+1");
        assert_eq!(percent_decode("%é%"), "%é%");
        assert_eq!(percent_decode("%FF"), "\u{fffd}");
        let text = "100% sure:\n é, 日本";
        assert_eq!(percent_decode(&percent_encode(text)), text);
    }

    #[test]
    fn codes_round_trip_their_numbers() {
        for n in 0..17 {
            assert_eq!(Code::from_i32(n) as i32, n);
        }
        assert_eq!(Code::from_i32(99), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
    }

    #[test]
    fn codes_are_their_numbers() {
        assert_eq!(Code::ResourceExhausted.as_str(), "8");
        assert_eq!(Code::Unauthenticated.as_str(), "16");
    }
}
