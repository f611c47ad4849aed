//! Request-header checks, method routing, and the response HEADERS and
//! trailers a gRPC server sends (including Trailers-Only error responses).

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};

use super::status::{percent_encode, Code, Status};

/// The methods of `sluice.v1.Sluice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Publish,
    BatchPublish,
    ListTopics,
    Subscribe,
    GetTopicStats,
    DeleteTopic,
    DeleteConsumerGroup,
    ResetCursor,
    HealthCheck,
    HealthWatch,
    /// Server reflection, `grpc.reflection.v1` (or `v1alpha` when `alpha`).
    Reflection {
        alpha: bool,
    },
}

impl Method {
    pub fn from_path(path: &str) -> Option<Method> {
        match path {
            "/grpc.health.v1.Health/Check" => return Some(Method::HealthCheck),
            "/grpc.health.v1.Health/Watch" => return Some(Method::HealthWatch),
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" => {
                return Some(Method::Reflection { alpha: false })
            }
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => {
                return Some(Method::Reflection { alpha: true })
            }
            _ => {}
        }
        let method = path.strip_prefix("/sluice.v1.Sluice/")?;
        Some(match method {
            "Publish" => Method::Publish,
            "BatchPublish" => Method::BatchPublish,
            "ListTopics" => Method::ListTopics,
            "Subscribe" => Method::Subscribe,
            "GetTopicStats" => Method::GetTopicStats,
            "DeleteTopic" => Method::DeleteTopic,
            "DeleteConsumerGroup" => Method::DeleteConsumerGroup,
            "ResetCursor" => Method::ResetCursor,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Publish => "Publish",
            Method::BatchPublish => "BatchPublish",
            Method::ListTopics => "ListTopics",
            Method::Subscribe => "Subscribe",
            Method::GetTopicStats => "GetTopicStats",
            Method::DeleteTopic => "DeleteTopic",
            Method::DeleteConsumerGroup => "DeleteConsumerGroup",
            Method::ResetCursor => "ResetCursor",
            Method::HealthCheck => "Health/Check",
            Method::HealthWatch => "Health/Watch",
            Method::Reflection { .. } => "ServerReflectionInfo",
        }
    }
}

/// Message encodings this server accepts.
pub const ACCEPT_ENCODING: &str = "identity,gzip";

/// What a well-formed gRPC request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    pub method: Method,
    pub timeout: Option<Duration>,
    /// Request messages may be gzip-compressed.
    pub request_gzip: bool,
    /// Response messages may be gzip-compressed (the client sent gzip and
    /// accepts it back).
    pub respond_gzip: bool,
    /// W3C trace context metadata, if the client sent it.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Why a request is refused before any message is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a gRPC request at all: a plain HTTP status.
    Http(StatusCode, &'static str),
    /// A gRPC request that fails with a status (sent Trailers-Only).
    Grpc(Status),
}

/// Checks a request's headers and routes it.
pub fn check_request<B>(req: &Request<B>) -> Result<CallInfo, Refusal> {
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Media types compare case-insensitively (RFC 9110 §8.3.1); parameters
    // after ';' are ignored.
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_grpc = media_type == "application/grpc" || media_type == "application/grpc+proto";
    if !is_grpc {
        return Err(Refusal::Http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/grpc",
        ));
    }
    if req.method() != http::Method::POST {
        return Err(Refusal::Http(
            StatusCode::METHOD_NOT_ALLOWED,
            "gRPC requests use POST",
        ));
    }
    let request_gzip = match req.headers().get("grpc-encoding") {
        None => false,
        Some(enc) => match enc.to_str().unwrap_or("?") {
            "identity" => false,
            "gzip" => true,
            other => {
                return Err(Refusal::Grpc(Status::unimplemented(format!(
                    "grpc-encoding {other:?} is not supported; accepted: {ACCEPT_ENCODING}"
                ))))
            }
        },
    };
    let accepts_gzip = match req.headers().get("grpc-accept-encoding") {
        None => true,
        Some(v) => v
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|e| e.trim() == "gzip"),
    };
    let path = req.uri().path();
    let Some(method) = Method::from_path(path) else {
        return Err(Refusal::Grpc(Status::unimplemented(format!(
            "unknown method {path}"
        ))));
    };
    let timeout = match req.headers().get("grpc-timeout") {
        None => None,
        Some(v) => Some(parse_timeout(v.to_str().unwrap_or("")).ok_or_else(|| {
            Refusal::Grpc(Status::invalid_argument(format!(
                "malformed grpc-timeout {v:?}"
            )))
        })?),
    };
    Ok(CallInfo {
        method,
        timeout,
        request_gzip,
        respond_gzip: request_gzip && accepts_gzip,
        traceparent: header_text(req, "traceparent"),
        tracestate: header_text(req, "tracestate"),
    })
}

fn header_text<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    // ASCII only, so the unit is the last byte and splitting there cannot
    // fall inside a character.
    if v.len() < 2 || v.len() > 9 || !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// HEADERS that open a successful response; `gzip` announces that
/// response messages may be compressed.
pub fn response_headers_with(gzip: bool) -> Response<()> {
    let mut r = response_headers();
    if gzip {
        r.headers_mut()
            .insert("grpc-encoding", HeaderValue::from_static("gzip"));
    }
    r
}

/// HEADERS that open a successful response.
pub fn response_headers() -> Response<()> {
    let mut r = Response::new(());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    r.headers_mut().insert(
        "grpc-accept-encoding",
        HeaderValue::from_static(ACCEPT_ENCODING),
    );
    r
}

fn put_status(map: &mut HeaderMap, status: &Status) {
    map.insert(
        "grpc-status",
        HeaderValue::from_static(status.code.as_str()),
    );
    if !status.message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&status.message)) {
            map.insert("grpc-message", v);
        }
    }
}

/// Trailers that end a response.
pub fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    put_status(&mut map, status);
    map
}

/// A Trailers-Only response: one HEADERS frame carrying the status.
pub fn trailers_only(status: &Status) -> Response<()> {
    let mut r = response_headers();
    put_status(r.headers_mut(), status);
    r
}

/// A plain HTTP error response for requests that are not gRPC.
pub fn http_refusal(code: StatusCode, why: &str) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r.headers_mut().insert(
        "grpc-status",
        HeaderValue::from_static(Code::Unknown.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(why) {
        r.headers_mut().insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, ct: &str) -> Request<()> {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", ct)
            .body(())
            .unwrap()
    }

    #[test]
    fn routes_known_methods() {
        let info = check_request(&req("/sluice.v1.Sluice/Publish", "application/grpc")).unwrap();
        for ct in [
            "APPLICATION/GRPC",
            "Application/gRPC+Proto",
            "application/grpc ; charset=utf-8",
        ] {
            assert!(
                check_request(&req("/sluice.v1.Sluice/Publish", ct)).is_ok(),
                "{ct}"
            );
        }
        for ct in ["application/grpc+json", "application/grpcx", "text/plain"] {
            assert!(
                check_request(&req("/sluice.v1.Sluice/Publish", ct)).is_err(),
                "{ct}"
            );
        }
        assert_eq!(info.method, Method::Publish);
        let info = check_request(&req(
            "/sluice.v1.Sluice/Subscribe",
            "application/grpc+proto",
        ))
        .unwrap();
        assert_eq!(info.method, Method::Subscribe);
    }

    #[test]
    fn refuses_unknown_methods_and_non_grpc() {
        match check_request(&req("/sluice.v1.Sluice/Nope", "application/grpc")) {
            Err(Refusal::Grpc(s)) => assert_eq!(s.code, Code::Unimplemented),
            other => panic!("{other:?}"),
        }
        match check_request(&req("/sluice.v1.Sluice/Publish", "application/json")) {
            Err(Refusal::Http(code, _)) => assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_unsupported_encodings() {
        let r = Request::builder()
            .method("POST")
            .uri("/sluice.v1.Sluice/Publish")
            .header("content-type", "application/grpc")
            .header("grpc-encoding", "snappy")
            .body(())
            .unwrap();
        match check_request(&r) {
            Err(Refusal::Grpc(s)) => {
                assert_eq!(s.code, Code::Unimplemented);
                assert!(s.message.contains("identity"));
                assert!(s.message.contains("gzip"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_timeouts() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("123456789S"), None);
        assert_eq!(parse_timeout("5x"), None);
        assert_eq!(parse_timeout("S"), None);
    }

    /// Found by fuzzing: a multi-byte last character made `split_at` panic
    /// off a char boundary. (Header values reach it only as visible ASCII,
    /// but the function takes any `&str`.)
    #[test]
    fn refuses_non_ascii_timeouts_without_panicking() {
        assert_eq!(parse_timeout("\u{1e800}"), None);
        assert_eq!(parse_timeout("1é"), None);
        assert_eq!(parse_timeout("5\u{1d40d}"), None);
    }

    #[test]
    fn trailers_carry_status_and_encoded_message() {
        let t = trailers(&Status::new(Code::NotFound, "no such topic: ü"));
        assert_eq!(t["grpc-status"], "5");
        assert_eq!(t["grpc-message"], "no such topic: %C3%BC");
    }
}

/// Property-based fuzzing of request-header parsing (`cargo test --lib
/// fuzz`): `grpc-timeout` against an independent reading of the spec (up to
/// 8 digits and one of H M S m u n; everything else refused), `check_request`
/// on arbitrary paths, methods and header bytes, and the `grpc-status` /
/// percent-encoded `grpc-message` trailers built from arbitrary statuses.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;
    use crate::grpc::status::percent_decode;

    /// The spec's TimeoutValue TimeoutUnit, read byte by byte.
    fn spec_timeout(v: &str) -> Option<Duration> {
        let (&unit, digits) = v.as_bytes().split_last()?;
        if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits
            .iter()
            .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
        let nanos_per: u128 = match unit {
            b'H' => 3_600_000_000_000,
            b'M' => 60_000_000_000,
            b'S' => 1_000_000_000,
            b'm' => 1_000_000,
            b'u' => 1_000,
            b'n' => 1,
            _ => return None,
        };
        let nanos = n * nanos_per;
        Some(Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        ))
    }

    fn timeout_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,8}[HMSmun]",
            "[0-9]{0,10}[HMSmunhsx ]?",
            "[-+ ]?[0-9 .,_]{0,9}[HMSmun]",
            "[0-9]{0,8}\\PC{0,2}",
            any::<String>(),
        ]
    }

    fn header_bytes(plausible: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::sample::select(plausible).prop_map(|s| s.as_bytes().to_vec()),
            "[ -~]{0,24}".prop_map(String::into_bytes),
            vec(any::<u8>(), 0..24),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(
                &[
                    "/sluice.v1.Sluice/Publish",
                    "/sluice.v1.Sluice/Subscribe",
                    "/sluice.v1.Sluice/ResetCursor",
                    "/grpc.health.v1.Health/Check",
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                ][..]
            )
            .prop_map(str::to_string),
            "/sluice\\.v1\\.Sluice/[A-Za-z]{0,14}",
            "/[!-~]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(config(512, 1))]

        #[test]
        fn fuzz_timeouts_follow_the_spec(v in timeout_text()) {
            prop_assert_eq!(parse_timeout(&v), spec_timeout(&v));
        }

        #[test]
        fn fuzz_valid_timeouts_round_trip(
            n in 0u64..100_000_000,
            width in 1usize..=8,
            unit in proptest::sample::select(&['H', 'M', 'S', 'm', 'u', 'n'][..]),
        ) {
            let text = format!("{n:0width$}{unit}");
            let expected = match unit {
                'H' => Duration::from_secs(n * 3600),
                'M' => Duration::from_secs(n * 60),
                'S' => Duration::from_secs(n),
                'm' => Duration::from_millis(n),
                'u' => Duration::from_micros(n),
                _ => Duration::from_nanos(n),
            };
            let parsed = parse_timeout(&text);
            if text.len() <= 9 {
                prop_assert_eq!(parsed, Some(expected));
            } else {
                // More than 8 digits: refused, never cut short.
                prop_assert_eq!(parsed, None);
            }
        }

        #[test]
        fn fuzz_check_request_refuses_or_routes(
            path in path(),
            method in proptest::sample::select(&["POST", "GET", "PUT"][..]),
            content_type in header_bytes(&[
                "application/grpc",
                "application/grpc+proto",
                "application/grpc;charset=utf-8",
                "application/json",
            ]),
            encoding in option::of(header_bytes(&["identity", "gzip", "deflate", "GZIP"])),
            accept in option::of(header_bytes(&["gzip", "identity, gzip", "deflate,gzip ", ""])),
            timeout in option::of(prop_oneof![
                timeout_text().prop_map(String::into_bytes),
                vec(any::<u8>(), 0..12),
            ]),
            traceparent in option::of(header_bytes(&[
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ])),
            tracestate in option::of(header_bytes(&["a=1,b=2"])),
        ) {
            let Ok(mut req) = Request::builder().method(method).uri(path.as_str()).body(()) else {
                return Ok(()); // not a request h2 would hand over
            };
            let headers = [
                ("content-type", Some(content_type)),
                ("grpc-encoding", encoding),
                ("grpc-accept-encoding", accept),
                ("grpc-timeout", timeout),
                ("traceparent", traceparent),
                ("tracestate", tracestate),
            ];
            for (name, value) in headers {
                if let Some(v) = value.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
                    req.headers_mut().insert(name, v);
                }
            }
            let text = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
            let ct = text("content-type").unwrap_or("");
            let result = check_request(&req);
            if !ct.to_ascii_lowercase().starts_with("application/grpc") {
                prop_assert!(matches!(
                    result,
                    Err(Refusal::Http(StatusCode::UNSUPPORTED_MEDIA_TYPE, _))
                ));
            }
            match result {
                Ok(info) => {
                    prop_assert_eq!(req.method(), http::Method::POST);
                    prop_assert_eq!(Some(info.method), Method::from_path(req.uri().path()));
                    let timeout = req.headers().get("grpc-timeout").map(|_| {
                        text("grpc-timeout").and_then(spec_timeout)
                    });
                    prop_assert_eq!(info.timeout, timeout.flatten());
                    prop_assert!(timeout.is_none() || info.timeout.is_some());
                    prop_assert_eq!(info.request_gzip, text("grpc-encoding") == Some("gzip"));
                    prop_assert!(!info.respond_gzip || info.request_gzip);
                    prop_assert_eq!(info.traceparent.as_deref(), text("traceparent"));
                    prop_assert_eq!(info.tracestate.as_deref(), text("tracestate"));
                }
                Err(Refusal::Http(code, why)) => {
                    prop_assert!(
                        code == StatusCode::UNSUPPORTED_MEDIA_TYPE
                            || code == StatusCode::METHOD_NOT_ALLOWED
                    );
                    let r = http_refusal(code, why);
                    prop_assert_eq!(r.status(), code);
                }
                Err(Refusal::Grpc(status)) => {
                    prop_assert!(
                        status.code == Code::Unimplemented || status.code == Code::InvalidArgument
                    );
                    let r = trailers_only(&status);
                    prop_assert_eq!(&r.headers()["grpc-status"], status.code.as_str());
                    prop_assert!(r.headers().contains_key("grpc-message"));
                }
            }
        }

        #[test]
        fn fuzz_trailers_carry_any_status(n: i32, message in any::<String>()) {
            let code = Code::from_i32(n);
            prop_assert_eq!(code.as_str().parse::<i32>().ok(), Some(code as i32));
            let t = trailers(&Status::new(code, message.clone()));
            prop_assert_eq!(&t["grpc-status"], code.as_str());
            match t.get("grpc-message") {
                None => prop_assert!(message.is_empty()),
                Some(v) => {
                    let text = v.to_str().unwrap();
                    prop_assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)));
                    // Every `%` starts an escape, so decoding is unambiguous.
                    prop_assert!(text.split('%').skip(1).all(|e| e.len() >= 2
                        && e.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)));
                    prop_assert_eq!(percent_decode(text), message);
                }
            }
        }
    }
}
