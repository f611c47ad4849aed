//! The NATS client protocol on the wire: an incremental, pure parser of the
//! server's operations (INFO, MSG, HMSG, PING, PONG, +OK, -ERR) and encoders
//! for the client's (CONNECT, PUB, HPUB, SUB, UNSUB, PING, PONG). No IO: the
//! client feeds it whatever bytes a read returned. May call `headers` and
//! serde_json; nothing else in the crate.
//!
//! Memory is bounded: a partial operation is held only while it is shorter
//! than the control-line limit plus the server's max_payload; anything longer
//! is an error, never a growing buffer.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::headers::{HeaderError, Headers};

/// nats-server's default limit on one control line (the op and its arguments).
pub const DEFAULT_MAX_CONTROL_LINE: usize = 4096;
/// nats-server's default max_payload, used until INFO says otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What the server says about itself in INFO (only the fields we use).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: i64,
    pub max_payload: usize,
    pub headers: bool,
    pub jetstream: bool,
    pub auth_required: bool,
    /// Other servers of the cluster a client may reconnect to (`host:port`).
    pub connect_urls: Vec<String>,
}

/// The CONNECT options we send. verbose and pedantic are always off; headers
/// and no_responders always on (requests fail fast with 503 instead of timing out).
#[derive(Clone, Debug, Serialize)]
pub struct ConnectInfo {
    pub verbose: bool,
    pub pedantic: bool,
    pub headers: bool,
    pub no_responders: bool,
    pub lang: &'static str,
    pub version: &'static str,
    pub protocol: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
}

impl ConnectInfo {
    /// The fixed options plus the caller's name and credentials.
    pub fn new(
        name: Option<String>,
        user: Option<String>,
        pass: Option<String>,
        auth_token: Option<String>,
    ) -> Self {
        ConnectInfo {
            verbose: false,
            pedantic: false,
            headers: true,
            no_responders: true,
            lang: "rust-sluice",
            version: env!("CARGO_PKG_VERSION"),
            // 1: the server may send INFO updates (cluster topology) at any time.
            protocol: 1,
            name,
            user,
            pass,
            auth_token,
        }
    }
}

/// A message the server delivered to one of our subscriptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// Present for HMSG (headers, or a status line such as 503).
    pub headers: Option<Headers>,
    pub payload: Vec<u8>,
}

/// One operation from the server.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerOp {
    Info(Box<ServerInfo>),
    Msg(Message),
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Why the byte stream from the server is not valid protocol. After one of
/// these the connection must be dropped: the parser's position is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// No CRLF within the control-line limit.
    ControlLineTooLong { limit: usize },
    /// A MSG/HMSG announces more bytes than max_payload.
    PayloadTooLarge { size: usize, limit: usize },
    /// An operation name we do not know.
    UnknownOp(String),
    /// Wrong argument count, a non-number size, a header size above the total...
    BadArguments(String),
    /// The payload is not followed by CRLF.
    MissingPayloadTerminator,
    /// INFO's JSON does not decode.
    BadInfo(String),
    /// An HMSG header block does not decode.
    BadHeaders(HeaderError),
    /// A subject or other text field is not UTF-8.
    NotUtf8,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ControlLineTooLong { limit } => {
                write!(f, "control line longer than {limit} bytes")
            }
            ProtocolError::PayloadTooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds max_payload {limit}")
            }
            ProtocolError::UnknownOp(op) => write!(f, "unknown operation {op:?}"),
            ProtocolError::BadArguments(line) => write!(f, "bad arguments in {line:?}"),
            ProtocolError::MissingPayloadTerminator => f.write_str("payload not followed by CRLF"),
            ProtocolError::BadInfo(e) => write!(f, "INFO does not decode: {e}"),
            ProtocolError::BadHeaders(e) => write!(f, "bad header block: {e}"),
            ProtocolError::NotUtf8 => f.write_str("control line is not UTF-8"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A MSG/HMSG whose control line is parsed and whose payload is awaited.
#[derive(Debug)]
struct PendingMsg {
    subject: String,
    sid: u64,
    reply: Option<String>,
    header_len: usize,
    total_len: usize,
    has_headers: bool,
}

/// Incremental parser: feed it any chunking of the server's bytes.
#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    pending: Option<PendingMsg>,
    max_control_line: usize,
    max_payload: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Parser::new(DEFAULT_MAX_CONTROL_LINE, DEFAULT_MAX_PAYLOAD)
    }
}

impl Parser {
    /// A parser with these limits (max_payload should follow INFO).
    pub fn new(max_control_line: usize, max_payload: usize) -> Self {
        Parser {
            buf: Vec::new(),
            pending: None,
            max_control_line,
            max_payload,
        }
    }

    /// Adopts the max_payload an INFO announced (0 keeps the current one).
    pub fn set_max_payload(&mut self, max_payload: usize) {
        if max_payload > 0 {
            self.max_payload = max_payload;
        }
    }

    /// Bytes of a partial operation currently held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Consumes `input`, appending every operation it completes to `out`.
    /// On error the stream is unusable (drop the connection).
    pub fn push(&mut self, input: &[u8], out: &mut Vec<ServerOp>) -> Result<(), ProtocolError> {
        self.buf.extend_from_slice(input);
        let mut pos = 0;
        let result = loop {
            match self.next_op(pos) {
                Ok(Some((op, next))) => {
                    pos = next;
                    out.extend(op);
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..pos);
        if result.is_err() {
            self.buf = Vec::new();
            self.pending = None;
        }
        result
    }

    /// The step starting at `pos` and where the next one starts: a whole
    /// operation, or (None) a MSG/HMSG control line whose payload is awaited.
    /// None when more bytes are needed.
    #[allow(clippy::type_complexity)]
    fn next_op(&mut self, pos: usize) -> Result<Option<(Option<ServerOp>, usize)>, ProtocolError> {
        if let Some(p) = self.pending.take() {
            let need = p.total_len + 2;
            if self.buf.len() - pos < need {
                self.pending = Some(p);
                return Ok(None);
            }
            let body = &self.buf[pos..pos + p.total_len];
            if &self.buf[pos + p.total_len..pos + need] != b"\r\n" {
                return Err(ProtocolError::MissingPayloadTerminator);
            }
            let headers = if p.has_headers {
                Some(Headers::decode(&body[..p.header_len]).map_err(ProtocolError::BadHeaders)?)
            } else {
                None
            };
            let msg = Message {
                subject: p.subject,
                sid: p.sid,
                reply: p.reply,
                headers,
                payload: body[p.header_len..].to_vec(),
            };
            return Ok(Some((Some(ServerOp::Msg(msg)), pos + need)));
        }
        let rest = &self.buf[pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > self.max_control_line {
                return Err(ProtocolError::ControlLineTooLong {
                    limit: self.max_control_line,
                });
            }
            return Ok(None);
        };
        if lf > self.max_control_line {
            return Err(ProtocolError::ControlLineTooLong {
                limit: self.max_control_line,
            });
        }
        let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
        let line = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
        let next = pos + lf + 1;
        let (op, args) = match line.find([' ', '\t']) {
            Some(i) => (&line[..i], line[i..].trim_start_matches([' ', '\t'])),
            None => (line, ""),
        };
        let op_upper = op.to_ascii_uppercase();
        let done = match op_upper.as_str() {
            "PING" => ServerOp::Ping,
            "PONG" => ServerOp::Pong,
            "+OK" => ServerOp::Ok,
            "-ERR" => {
                let text = args.trim();
                let text = text
                    .strip_prefix('\'')
                    .and_then(|t| t.strip_suffix('\''))
                    .unwrap_or(text);
                ServerOp::Err(text.to_string())
            }
            "INFO" => {
                let info: ServerInfo = serde_json::from_str(args)
                    .map_err(|e| ProtocolError::BadInfo(e.to_string()))?;
                ServerOp::Info(Box::new(info))
            }
            "MSG" | "HMSG" => {
                self.pending = Some(self.parse_msg_args(line, args, op_upper == "HMSG")?);
                return Ok(Some((None, next)));
            }
            _ => {
                let shown: String = op.chars().take(32).collect();
                return Err(ProtocolError::UnknownOp(shown));
            }
        };
        Ok(Some((Some(done), next)))
    }

    fn parse_msg_args(
        &self,
        line: &str,
        args: &str,
        has_headers: bool,
    ) -> Result<PendingMsg, ProtocolError> {
        let bad = || ProtocolError::BadArguments(line.chars().take(64).collect());
        let parts: Vec<&str> = args.split_ascii_whitespace().collect();
        let size = |s: &str| s.parse::<usize>().map_err(|_| bad());
        let (subject, sid, reply, header_len, total_len) = match (has_headers, parts.as_slice()) {
            (false, [s, sid, n]) => (*s, *sid, None, 0, size(n)?),
            (false, [s, sid, r, n]) => (*s, *sid, Some(*r), 0, size(n)?),
            (true, [s, sid, h, n]) => (*s, *sid, None, size(h)?, size(n)?),
            (true, [s, sid, r, h, n]) => (*s, *sid, Some(*r), size(h)?, size(n)?),
            _ => return Err(bad()),
        };
        if header_len > total_len {
            return Err(bad());
        }
        if total_len > self.max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                size: total_len,
                limit: self.max_payload,
            });
        }
        let sid = sid.parse::<u64>().map_err(|_| bad())?;
        Ok(PendingMsg {
            subject: subject.to_string(),
            sid,
            reply: reply.map(str::to_string),
            header_len,
            total_len,
            has_headers,
        })
    }
}

/// Why a client operation could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// Empty, or holds whitespace or control bytes.
    InvalidSubject(String),
    /// A queue group name with whitespace or control bytes.
    InvalidQueue(String),
    Headers(HeaderError),
    Json(String),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::InvalidSubject(s) => write!(f, "invalid subject {s:?}"),
            EncodeError::InvalidQueue(s) => write!(f, "invalid queue group {s:?}"),
            EncodeError::Headers(e) => write!(f, "headers: {e}"),
            EncodeError::Json(e) => write!(f, "json: {e}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A subject (or reply subject) the wire can carry: non-empty, printable
/// ASCII/UTF-8 without whitespace or control bytes.
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty() && !subject.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn check_subject(subject: &str) -> Result<(), EncodeError> {
    if valid_subject(subject) {
        Ok(())
    } else {
        Err(EncodeError::InvalidSubject(
            subject.chars().take(64).collect(),
        ))
    }
}

/// `CONNECT {json}\r\n`.
pub fn encode_connect(info: &ConnectInfo, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let json = serde_json::to_string(info).map_err(|e| EncodeError::Json(e.to_string()))?;
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// `PUB` (no headers) or `HPUB` (headers present) with the payload.
pub fn encode_publish(
    subject: &str,
    reply: Option<&str>,
    headers: Option<&Headers>,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    check_subject(subject)?;
    if let Some(r) = reply {
        check_subject(r)?;
    }
    let reply_part = reply.map(|r| format!(" {r}")).unwrap_or_default();
    let size = match headers {
        None => {
            out.extend_from_slice(
                format!("PUB {subject}{reply_part} {}\r\n", payload.len()).as_bytes(),
            );
            payload.len()
        }
        Some(h) => {
            let block = h.to_bytes().map_err(EncodeError::Headers)?;
            out.extend_from_slice(
                format!(
                    "HPUB {subject}{reply_part} {} {}\r\n",
                    block.len(),
                    block.len() + payload.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(&block);
            block.len() + payload.len()
        }
    };
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    Ok(size)
}

/// `SUB <subject> [queue] <sid>\r\n`.
pub fn encode_sub(
    subject: &str,
    queue: Option<&str>,
    sid: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_subject(subject)?;
    match queue {
        Some(q) => {
            if !valid_subject(q) {
                return Err(EncodeError::InvalidQueue(q.chars().take(64).collect()));
            }
            out.extend_from_slice(format!("SUB {subject} {q} {sid}\r\n").as_bytes());
        }
        None => out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes()),
    }
    Ok(())
}

/// `UNSUB <sid> [max]\r\n`: with `max`, the server unsubscribes after that
/// many more messages.
pub fn encode_unsub(sid: u64, max: Option<u64>, out: &mut Vec<u8>) {
    match max {
        Some(m) => out.extend_from_slice(format!("UNSUB {sid} {m}\r\n").as_bytes()),
        None => out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes()),
    }
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// The server's MSG/HMSG for `msg` (tests and fuzzing use it to check the parser).
pub fn encode_server_msg(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    check_subject(&msg.subject)?;
    let reply = msg
        .reply
        .as_deref()
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    match &msg.headers {
        None => out.extend_from_slice(
            format!(
                "MSG {} {}{reply} {}\r\n",
                msg.subject,
                msg.sid,
                msg.payload.len()
            )
            .as_bytes(),
        ),
        Some(h) => {
            let block = h.to_bytes().map_err(EncodeError::Headers)?;
            out.extend_from_slice(
                format!(
                    "HMSG {} {}{reply} {} {}\r\n",
                    msg.subject,
                    msg.sid,
                    block.len(),
                    block.len() + msg.payload.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(&block);
        }
    }
    out.extend_from_slice(&msg.payload);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Vec<ServerOp>, ProtocolError> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        p.push(bytes, &mut out)?;
        Ok(out)
    }

    #[test]
    fn parses_every_server_op() {
        let ops = parse_all(
            b"INFO {\"server_id\":\"x\",\"max_payload\":1048576,\"headers\":true}\r\n\
              PING\r\npong\r\n+OK\r\n-ERR 'Authorization Violation'\r\n\
              MSG a.b 7 5\r\nhello\r\n\
              MSG a.b 7 _INBOX.x.1 0\r\n\r\n\
              HMSG c 9 r 24 26\r\nNATS/1.0\r\nK: v\r\nA: 1\r\n\r\nhi\r\n\
              hmsg c 9 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        )
        .unwrap();
        assert_eq!(ops.len(), 9, "{ops:?}");
        match &ops[0] {
            ServerOp::Info(i) => {
                assert_eq!(i.server_id, "x");
                assert_eq!(i.max_payload, 1048576);
                assert!(i.headers);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ops[1], ServerOp::Ping);
        assert_eq!(ops[2], ServerOp::Pong);
        assert_eq!(ops[3], ServerOp::Ok);
        assert_eq!(ops[4], ServerOp::Err("Authorization Violation".into()));
        let ServerOp::Msg(m) = &ops[5] else { panic!() };
        assert_eq!(
            (m.subject.as_str(), m.sid, &m.payload[..]),
            ("a.b", 7, &b"hello"[..])
        );
        let ServerOp::Msg(m) = &ops[6] else { panic!() };
        assert_eq!(m.reply.as_deref(), Some("_INBOX.x.1"));
        assert!(m.payload.is_empty());
        let ServerOp::Msg(m) = &ops[7] else { panic!() };
        let h = m.headers.as_ref().unwrap();
        assert_eq!(h.get("K"), Some("v"));
        assert_eq!(m.payload, b"hi");
        let ServerOp::Msg(m) = &ops[8] else { panic!() };
        assert!(m.headers.as_ref().unwrap().is_no_responders());
    }

    #[test]
    fn waits_for_split_payload() {
        let mut p = Parser::default();
        let mut out = Vec::new();
        p.push(b"MSG a 1 5\r\nhel", &mut out).unwrap();
        assert!(out.is_empty());
        p.push(b"lo\r", &mut out).unwrap();
        assert!(out.is_empty());
        p.push(b"\nPI", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        p.push(b"NG\r\n", &mut out).unwrap();
        assert_eq!(out[1], ServerOp::Ping);
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn limits_are_errors() {
        let mut p = Parser::new(16, 10);
        let mut out = Vec::new();
        assert_eq!(
            p.push(&[b'x'; 17], &mut out),
            Err(ProtocolError::ControlLineTooLong { limit: 16 })
        );
        let mut p = Parser::new(64, 10);
        assert_eq!(
            p.push(b"MSG a 1 11\r\n", &mut out),
            Err(ProtocolError::PayloadTooLarge {
                size: 11,
                limit: 10
            })
        );
        assert!(matches!(
            parse_all(b"BOGUS\r\n"),
            Err(ProtocolError::UnknownOp(_))
        ));
        assert!(matches!(
            parse_all(b"MSG a 1\r\n"),
            Err(ProtocolError::BadArguments(_))
        ));
        assert!(matches!(
            parse_all(b"HMSG a 1 5 4\r\n"),
            Err(ProtocolError::BadArguments(_))
        ));
        assert_eq!(
            parse_all(b"MSG a 1 2\r\nabcd\r\n"),
            Err(ProtocolError::MissingPayloadTerminator)
        );
        assert!(matches!(
            parse_all(b"INFO {nope\r\n"),
            Err(ProtocolError::BadInfo(_))
        ));
    }

    #[test]
    fn encodes_client_ops() {
        let mut out = Vec::new();
        encode_publish("a.b", None, None, b"xy", &mut out).unwrap();
        assert_eq!(out, b"PUB a.b 2\r\nxy\r\n");
        out.clear();
        let mut h = Headers::new();
        h.append("Nats-Msg-Id", "1");
        encode_publish("a", Some("r.1"), Some(&h), b"p", &mut out).unwrap();
        assert_eq!(
            out,
            b"HPUB a r.1 28 29\r\nNATS/1.0\r\nNats-Msg-Id: 1\r\n\r\np\r\n"
        );
        out.clear();
        encode_sub("x.*", None, 3, &mut out).unwrap();
        encode_sub("x.>", Some("q"), 4, &mut out).unwrap();
        encode_unsub(3, None, &mut out);
        encode_unsub(4, Some(10), &mut out);
        assert_eq!(
            out,
            b"SUB x.* 3\r\nSUB x.> q 4\r\nUNSUB 3\r\nUNSUB 4 10\r\n"
        );
        assert!(encode_publish("a b", None, None, b"", &mut out).is_err());
        assert!(encode_publish("", None, None, b"", &mut out).is_err());
        assert!(encode_sub("a\r\nPUB", None, 1, &mut out).is_err());
    }

    #[test]
    fn connect_json_has_the_fixed_options() {
        let mut out = Vec::new();
        let info = ConnectInfo::new(None, Some("u".into()), Some("p".into()), None);
        encode_connect(&info, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let json = text
            .strip_prefix("CONNECT ")
            .and_then(|t| t.strip_suffix("\r\n"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["verbose"], false);
        assert_eq!(v["pedantic"], false);
        assert_eq!(v["headers"], true);
        assert_eq!(v["no_responders"], true);
        assert_eq!(v["user"], "u");
        assert_eq!(v["pass"], "p");
        assert!(v.get("auth_token").is_none());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz_support::config;
    use proptest::prelude::*;

    fn subject() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_$>*-]{1,12}(\\.[a-zA-Z0-9_$>*-]{1,12}){0,4}"
    }

    fn headers() -> impl Strategy<Value = Headers> {
        (
            prop::option::of((100u16..=999, "([!-~]([ -~]{0,10}[!-~])?)?")),
            prop::collection::vec(("[!-9;-~]{1,12}", "([!-~]([ -~]{0,20}[!-~])?)?"), 0..5),
        )
            .prop_map(|(status, entries)| {
                let mut h = Headers::new();
                if let Some((code, description)) = status {
                    h.set_status(code, description);
                }
                for (n, v) in entries {
                    h.append(n, v);
                }
                h
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            subject(),
            any::<u64>(),
            prop::option::of(subject()),
            prop::option::of(headers()),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(subject, sid, reply, headers, payload)| Message {
                subject,
                sid,
                reply,
                headers,
                payload,
            })
    }

    fn op() -> impl Strategy<Value = ServerOp> {
        prop_oneof![
            message().prop_map(ServerOp::Msg),
            Just(ServerOp::Ping),
            Just(ServerOp::Pong),
            Just(ServerOp::Ok),
            "[a-zA-Z ]{0,20}".prop_map(|t| ServerOp::Err(t.trim().to_string())),
        ]
    }

    fn encode(op: &ServerOp, out: &mut Vec<u8>) {
        match op {
            ServerOp::Msg(m) => encode_server_msg(m, out).unwrap(),
            ServerOp::Ping => out.extend_from_slice(b"PING\r\n"),
            ServerOp::Pong => out.extend_from_slice(b"PONG\r\n"),
            ServerOp::Ok => out.extend_from_slice(b"+OK\r\n"),
            ServerOp::Err(t) => out.extend_from_slice(format!("-ERR '{t}'\r\n").as_bytes()),
            ServerOp::Info(_) => unreachable!(),
        }
    }

    proptest! {
        #![proptest_config(config(256, 1))]

        #[test]
        fn arbitrary_bytes_never_panic(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
            limit in 1usize..64,
        ) {
            let mut p = Parser::new(limit, limit * 4);
            let mut out = Vec::new();
            for c in &chunks {
                if p.push(c, &mut out).is_err() {
                    break;
                }
                // Bounded: never more than one partial op's worth.
                prop_assert!(p.buffered() <= limit * 5 + 4 + limit);
            }
        }

        #[test]
        fn arbitrary_text_ops_never_panic(
            lines in prop::collection::vec(
                "(MSG|HMSG|INFO|PING|-ERR|\\+OK)( [a-z0-9{}\":.]{0,8}){0,6}\r\n[a-zA-Z0-9\r\n ]{0,16}", 0..8),
        ) {
            let mut p = Parser::default();
            let mut out = Vec::new();
            let _ = p.push(lines.concat().as_bytes(), &mut out);
        }

        #[test]
        fn any_chunking_parses_the_same_ops(
            ops in prop::collection::vec(op(), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut wire = Vec::new();
            for op in &ops {
                encode(op, &mut wire);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let mut p = Parser::default();
            let mut out = Vec::new();
            for w in points.windows(2) {
                p.push(&wire[w[0]..w[1]], &mut out).unwrap();
            }
            prop_assert_eq!(&out, &ops);
            prop_assert_eq!(p.buffered(), 0);
        }

        #[test]
        fn msg_round_trips(msg in message()) {
            let mut wire = Vec::new();
            encode_server_msg(&msg, &mut wire).unwrap();
            let mut p = Parser::default();
            let mut out = Vec::new();
            p.push(&wire, &mut out).unwrap();
            prop_assert_eq!(out, vec![ServerOp::Msg(msg)]);
        }

        #[test]
        fn hpub_header_block_round_trips(h in headers(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut wire = Vec::new();
            encode_publish("s", None, Some(&h), &payload, &mut wire).unwrap();
            let line_end = wire.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            let line = std::str::from_utf8(&wire[..line_end - 2]).unwrap();
            let parts: Vec<&str> = line.split(' ').collect();
            let hlen: usize = parts[2].parse().unwrap();
            let total: usize = parts[3].parse().unwrap();
            prop_assert_eq!(total, hlen + payload.len());
            let back = Headers::decode(&wire[line_end..line_end + hlen]).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(&wire[line_end + hlen..line_end + total], &payload[..]);
        }
    }
}
