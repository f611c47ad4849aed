//! NATS message headers: the `NATS/1.0[ code[ description]]` status line and
//! the `Name: value` lines that HPUB and HMSG carry, encoded to and decoded
//! from the wire's header block. Pure data; calls nothing outside `std`.

use std::fmt;

/// The status-line code the server puts on a request's reply when no one
/// subscribes to the request subject (the client asked for `no_responders`).
pub const STATUS_NO_RESPONDERS: u16 = 503;

const VERSION_LINE: &str = "NATS/1.0";

/// A header block: an optional status (code and description, as the server
/// sends on e.g. "503 no responders") and name/value entries in wire order.
/// A name may repeat: every repetition is one value of a multi-valued header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    status: Option<u16>,
    description: String,
    entries: Vec<(String, String)>,
}

/// Why a header block could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The block does not start with `NATS/1.0`.
    BadVersionLine,
    /// The status code is not three digits.
    BadStatus,
    /// A line has no `:` or an empty or otherwise invalid name.
    BadLine,
    /// The block does not end with an empty line.
    Unterminated,
    /// A name or value holds bytes the wire cannot carry (CR, LF, `:` in a name...).
    InvalidText,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            HeaderError::BadVersionLine => "header block does not start with NATS/1.0",
            HeaderError::BadStatus => "header status code is not three digits",
            HeaderError::BadLine => "header line is not `Name: value`",
            HeaderError::Unterminated => "header block does not end with an empty line",
            HeaderError::InvalidText => "header name or value holds bytes the wire cannot carry",
        };
        f.write_str(what)
    }
}

impl std::error::Error for HeaderError {}

/// Header names: printable ASCII without space or `:` (the wire's token rule).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Header values: no CR or LF, and no leading or trailing whitespace (the
/// decoder trims it, so it could not round-trip).
fn valid_value(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\r' || b == b'\n') && value.trim() == value
}

impl Headers {
    /// An empty block (no status, no entries).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one value for `name` (a repeated name is a multi-valued header).
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.entries.push((name.into(), value.into()));
        self
    }

    /// Replaces every value of `name` with one value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        let name = name.into();
        self.entries.retain(|(n, _)| *n != name);
        self.entries.push((name, value.into()));
        self
    }

    /// The first value of `name` (names are compared exactly, as nats-server does).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in wire order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All entries in wire order.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// The status-line code (e.g. 503), if the block has one.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The status line's description (may be empty).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Sets the status line (code must be 100..=999; description one line).
    pub fn set_status(&mut self, code: u16, description: impl Into<String>) -> &mut Self {
        self.status = Some(code);
        self.description = description.into();
        self
    }

    /// True when the block is the server's "no responders" status.
    pub fn is_no_responders(&self) -> bool {
        self.status == Some(STATUS_NO_RESPONDERS)
    }

    /// Appends the wire form (ending with the empty line) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        out.extend_from_slice(VERSION_LINE.as_bytes());
        if let Some(code) = self.status {
            if !(100..=999).contains(&code) {
                return Err(HeaderError::BadStatus);
            }
            out.extend_from_slice(format!(" {code}").as_bytes());
            if !self.description.is_empty() {
                if !valid_value(&self.description) {
                    return Err(HeaderError::InvalidText);
                }
                out.push(b' ');
                out.extend_from_slice(self.description.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.entries {
            if !valid_name(name) || !valid_value(value) {
                return Err(HeaderError::InvalidText);
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes a whole header block (exactly the header-size bytes of HMSG).
    pub fn decode(block: &[u8]) -> Result<Self, HeaderError> {
        let text = std::str::from_utf8(block).map_err(|_| HeaderError::InvalidText)?;
        let body = text
            .strip_suffix("\r\n\r\n")
            .ok_or(HeaderError::Unterminated)?;
        let mut lines = body.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let rest = first
            .strip_prefix(VERSION_LINE)
            .ok_or(HeaderError::BadVersionLine)?;
        let mut headers = Headers::new();
        let rest = rest.trim();
        if !rest.is_empty() {
            let (code, description) = rest.split_once(' ').unwrap_or((rest, ""));
            if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeaderError::BadStatus);
            }
            let code: u16 = code.parse().map_err(|_| HeaderError::BadStatus)?;
            headers.set_status(code, description.trim());
        }
        for line in lines {
            let (name, value) = line.split_once(':').ok_or(HeaderError::BadLine)?;
            if !valid_name(name) {
                return Err(HeaderError::BadLine);
            }
            headers.append(name, value.trim());
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_only_block_decodes() {
        let h = Headers::decode(b"NATS/1.0 503\r\n\r\n").unwrap();
        assert!(h.is_no_responders());
        assert_eq!(h.description(), "");
        assert!(h.entries().is_empty());
        let h = Headers::decode(b"NATS/1.0 408 Request Timeout\r\n\r\n").unwrap();
        assert_eq!(h.status(), Some(408));
        assert_eq!(h.description(), "Request Timeout");
    }

    #[test]
    fn multi_valued_headers_keep_order() {
        let mut h = Headers::new();
        h.append("A", "1").append("B", "x y").append("A", "2");
        let bytes = h.to_bytes().unwrap();
        assert_eq!(bytes, b"NATS/1.0\r\nA: 1\r\nB: x y\r\nA: 2\r\n\r\n");
        let back = Headers::decode(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.get_all("A").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(back.get("B"), Some("x y"));
        assert_eq!(back.get("a"), None);
    }

    #[test]
    fn insert_replaces_all_values() {
        let mut h = Headers::new();
        h.append("A", "1").append("A", "2").insert("A", "3");
        assert_eq!(h.get_all("A").collect::<Vec<_>>(), ["3"]);
    }

    #[test]
    fn bad_blocks_are_errors() {
        assert_eq!(
            Headers::decode(b"HTTP/1.1\r\n\r\n"),
            Err(HeaderError::BadVersionLine)
        );
        assert_eq!(
            Headers::decode(b"NATS/1.0\r\nA: 1\r\n"),
            Err(HeaderError::Unterminated)
        );
        assert_eq!(
            Headers::decode(b"NATS/1.0\r\nnocolon\r\n\r\n"),
            Err(HeaderError::BadLine)
        );
        assert_eq!(
            Headers::decode(b"NATS/1.0 5x3\r\n\r\n"),
            Err(HeaderError::BadStatus)
        );
    }

    #[test]
    fn unencodable_text_is_refused() {
        let mut h = Headers::new();
        h.append("A", "x\r\nB: injected");
        assert_eq!(h.to_bytes(), Err(HeaderError::InvalidText));
        let mut h = Headers::new();
        h.append("A:B", "x");
        assert_eq!(h.to_bytes(), Err(HeaderError::InvalidText));
    }
}
