//! Server reflection (`grpc.reflection.v1` and `v1alpha`, one wire format):
//! lists the services and serves the compiled descriptors of our .proto
//! files by file name or by symbol, with their dependencies, so grpcurl-style
//! tools work without the .proto files.

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::task::Context;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

use super::inbound::{Inbound, RequestReader};
use super::outbound::Outbound;
use super::Shared;
use crate::grpc::framing::frame_status;
use crate::grpc::headers::CallInfo;
use crate::grpc::{encode_message, Code, MessageDecoder, Status};
use crate::proto::reflection_v1::{
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse,
    ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
};

/// Our descriptors, indexed.
pub struct Descriptors {
    /// (file name, serialized FileDescriptorProto, dependency names)
    files: Vec<(String, Bytes, Vec<String>)>,
    /// Fully qualified symbol -> index in `files`.
    symbols: HashMap<String, usize>,
    messages: Vec<String>,
    services: Vec<String>,
}

fn index_message(prefix: &str, m: &DescriptorProto, file: usize, d: &mut Descriptors) {
    let name = format!("{prefix}.{}", m.name());
    for nested in &m.nested_type {
        index_message(&name, nested, file, d);
    }
    for e in &m.enum_type {
        d.symbols.insert(format!("{name}.{}", e.name()), file);
    }
    d.messages.push(name.clone());
    d.symbols.insert(name, file);
}

impl Descriptors {
    pub fn get() -> &'static Descriptors {
        static D: OnceLock<Descriptors> = OnceLock::new();
        D.get_or_init(|| Descriptors::from_set(crate::proto::DESCRIPTORS))
    }

    fn from_set(bytes: &[u8]) -> Descriptors {
        let mut d = Descriptors {
            files: Vec::new(),
            symbols: HashMap::new(),
            messages: Vec::new(),
            services: Vec::new(),
        };
        let set = FileDescriptorSet::decode(bytes).unwrap_or_default();
        for (i, f) in set.file.iter().enumerate() {
            let pkg = f.package();
            for m in &f.message_type {
                index_message(pkg, m, i, &mut d);
            }
            for e in &f.enum_type {
                d.symbols.insert(format!("{pkg}.{}", e.name()), i);
            }
            for s in &f.service {
                let name = format!("{pkg}.{}", s.name());
                for m in &s.method {
                    d.symbols.insert(format!("{name}.{}", m.name()), i);
                }
                d.services.push(name.clone());
                d.symbols.insert(name, i);
            }
            d.files.push((
                f.name().to_string(),
                f.encode_to_vec().into(),
                f.dependency.clone(),
            ));
        }
        d
    }

    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// The file at `index` and everything it imports, each once.
    fn with_dependencies(&self, index: usize) -> Vec<Bytes> {
        let mut seen = vec![false; self.files.len()];
        let mut todo = VecDeque::from([index]);
        let mut out = Vec::new();
        while let Some(i) = todo.pop_front() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            out.push(self.files[i].1.clone());
            for dep in &self.files[i].2 {
                if let Some(j) = self.files.iter().position(|f| &f.0 == dep) {
                    todo.push_back(j);
                }
            }
        }
        out
    }

    fn answer(&self, request: &MessageRequest) -> MessageResponse {
        let not_found = |what: String| {
            MessageResponse::ErrorResponse(ErrorResponse {
                error_code: Code::NotFound as i32,
                error_message: what,
            })
        };
        let files = |i| {
            MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                file_descriptor_proto: self.with_dependencies(i),
            })
        };
        match request {
            MessageRequest::ListServices(_) => {
                MessageResponse::ListServicesResponse(ListServiceResponse {
                    service: self
                        .services
                        .iter()
                        .map(|name| ServiceResponse { name: name.clone() })
                        .collect(),
                })
            }
            MessageRequest::FileByFilename(name) => {
                match self.files.iter().position(|f| &f.0 == name) {
                    Some(i) => files(i),
                    None => not_found(format!("file {name:?} not found")),
                }
            }
            MessageRequest::FileContainingSymbol(symbol) => {
                match self.symbols.get(symbol.trim_start_matches('.')) {
                    Some(&i) => files(i),
                    None => not_found(format!("symbol {symbol:?} not found")),
                }
            }
            MessageRequest::FileContainingExtension(ext) => not_found(format!(
                "no extension {} of {:?}",
                ext.extension_number, ext.containing_type
            )),
            MessageRequest::AllExtensionNumbersOfType(t) => {
                let t = t.trim_start_matches('.');
                if self.messages.iter().any(|m| m == t) {
                    MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                        base_type_name: t.to_string(),
                        extension_number: Vec::new(),
                    })
                } else {
                    not_found(format!("type {t:?} not found"))
                }
            }
        }
    }
}

/// Answers queued but not yet sent before the stream stops reading.
const MAX_QUEUED: usize = 16;

pub struct ReflectionCall {
    reader: RequestReader,
    out: Outbound,
}

impl ReflectionCall {
    pub fn new(
        recv: RecvStream,
        send: SendStream<Bytes>,
        max_message: usize,
        info: &CallInfo,
    ) -> Self {
        ReflectionCall {
            reader: RequestReader::new(
                recv,
                MessageDecoder::new(max_message).with_gzip(info.request_gzip),
            ),
            out: Outbound::new(send),
        }
    }

    pub fn finish(&mut self, status: Status) {
        self.out.finish(status);
        self.reader.stop();
    }

    /// The call's request stream, for the reactor's memory rules.
    pub fn reader_mut(&mut self) -> &mut RequestReader {
        &mut self.reader
    }

    /// Answers one request.
    fn answer(&mut self, body: Bytes) {
        match ServerReflectionRequest::decode(body) {
            Ok(req) => {
                let answer = req
                    .message_request
                    .as_ref()
                    .map(|m| Descriptors::get().answer(m))
                    .unwrap_or_else(|| {
                        MessageResponse::ErrorResponse(ErrorResponse {
                            error_code: Code::InvalidArgument as i32,
                            error_message: "empty reflection request".into(),
                        })
                    });
                self.out.push(encode_message(&ServerReflectionResponse {
                    valid_host: req.host.clone(),
                    original_request: Some(req),
                    message_response: Some(answer),
                }));
            }
            Err(e) => self.finish(Status::internal(format!(
                "failed to decode ServerReflectionRequest: {e}"
            ))),
        }
    }

    /// Drives the stream; true once it is finished. Requests are read only
    /// while fewer than `MAX_QUEUED` answers wait to be sent.
    pub fn poll(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) -> bool {
        if self.out.poll_reset(cx) {
            return true;
        }
        let mut starved = false;
        while self.reader.is_open() {
            if self.out.queued() >= MAX_QUEUED {
                starved = true;
                break;
            }
            match self.reader.poll_next(uid, &mut shared.inflight, cx) {
                Inbound::Message(body) => self.answer(body),
                Inbound::Pending => break,
                // The client is done: once every request is answered, so are we.
                Inbound::End => self.finish(Status::ok()),
                Inbound::EndedInsideMessage => {
                    self.finish(Status::internal("request stream ended inside a message"))
                }
                Inbound::Bad(e) => self.finish(frame_status(e)),
                Inbound::Reset(_) => return true,
            }
        }
        let done = self.out.flush(cx, || None).unwrap_or(true);
        // Reading stopped for a full queue and answers went out: come back.
        if !done && starved && self.out.queued() < MAX_QUEUED {
            cx.waker().wake_by_ref();
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_our_services_and_symbols() {
        let d = Descriptors::get();
        for s in [
            "sluice.v1.Sluice",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(d.services().iter().any(|x| x == s), "{s}");
        }
        for sym in [
            "sluice.v1.Sluice.Publish",
            "sluice.v1.PublishRequest",
            "sluice.v1.InitialPosition",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
        ] {
            assert!(d.symbols.contains_key(sym), "{sym}");
        }
        match d.answer(&MessageRequest::FileContainingSymbol(
            "sluice.v1.Sluice".into(),
        )) {
            MessageResponse::FileDescriptorResponse(f) => {
                let file =
                    prost_types::FileDescriptorProto::decode(f.file_descriptor_proto[0].clone())
                        .unwrap();
                assert_eq!(file.name(), "sluice/v1/sluice.proto");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Property-based fuzzing of server reflection requests (`cargo test --lib
/// fuzz`): arbitrary bytes decoded as `ServerReflectionRequest`, and requests
/// naming arbitrary or real files and symbols, are answered without panicking:
/// descriptors for what exists, NOT_FOUND for the rest.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;
    use crate::proto::reflection_v1::ExtensionRequest;

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(
                &[
                    "sluice.v1.Sluice",
                    ".sluice.v1.PublishRequest",
                    "sluice.v1.Sluice.Subscribe",
                    "grpc.health.v1.Health",
                    "sluice/v1/sluice.proto",
                    "grpc/health/v1/health.proto",
                ][..]
            )
            .prop_map(str::to_string),
            "[a-z.]{0,20}",
            "\\PC{0,20}",
        ]
    }

    fn request() -> impl Strategy<Value = MessageRequest> {
        prop_oneof![
            "\\PC{0,4}".prop_map(MessageRequest::ListServices),
            name().prop_map(MessageRequest::FileByFilename),
            name().prop_map(MessageRequest::FileContainingSymbol),
            name().prop_map(MessageRequest::AllExtensionNumbersOfType),
            (name(), any::<i32>()).prop_map(|(containing_type, extension_number)| {
                MessageRequest::FileContainingExtension(ExtensionRequest {
                    containing_type,
                    extension_number,
                })
            }),
        ]
    }

    proptest! {
        #![proptest_config(config(512, 1))]

        #[test]
        fn fuzz_reflection_requests_are_answered(
            body in vec(any::<u8>(), 0..64),
            request in request(),
        ) {
            let d = Descriptors::get();
            let decoded = ServerReflectionRequest::decode(body.as_slice())
                .ok()
                .and_then(|r| r.message_request);
            for m in decoded.iter().chain([&request]) {
                match d.answer(m) {
                    MessageResponse::FileDescriptorResponse(f) => {
                        prop_assert!(!f.file_descriptor_proto.is_empty());
                    }
                    MessageResponse::ErrorResponse(e) => {
                        prop_assert_eq!(e.error_code, Code::NotFound as i32);
                    }
                    MessageResponse::ListServicesResponse(l) => {
                        prop_assert_eq!(l.service.len(), d.services().len());
                    }
                    MessageResponse::AllExtensionNumbersResponse(_) => {}
                }
            }
        }
    }
}
