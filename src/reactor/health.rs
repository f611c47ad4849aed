//! `grpc.health.v1.Health`: Check answers at once; `WatchCall` sends the
//! current status, then each change (NOT_SERVING from the moment shutdown
//! starts). `""` and `sluice.v1.Sluice` are the services known.

use std::task::Context;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use prost::Message;

use super::inbound::{Inbound, RequestReader};
use super::outbound::Outbound;
use super::Shared;
use crate::grpc::framing::frame_status;
use crate::grpc::headers::CallInfo;
use crate::grpc::{encode_message, Code, MessageDecoder, Status};
use crate::proto::health::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

/// The status of `service`, or None when the server does not know it.
pub fn status_of(service: &str, shutting_down: bool) -> Option<ServingStatus> {
    match service {
        "" | crate::proto::SERVICE => Some(if shutting_down {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }),
        _ => None,
    }
}

/// The Check answer for a decoded request body.
pub fn check(body: Bytes, shutting_down: bool) -> Result<Bytes, Status> {
    let req = HealthCheckRequest::decode(body)
        .map_err(|e| Status::internal(format!("failed to decode HealthCheckRequest: {e}")))?;
    match status_of(&req.service, shutting_down) {
        Some(status) => Ok(encode_message(&HealthCheckResponse {
            status: status as i32,
        })),
        None => Err(Status::new(
            Code::NotFound,
            format!("unknown service {:?}", req.service),
        )),
    }
}

fn response(status: ServingStatus) -> Bytes {
    encode_message(&HealthCheckResponse {
        status: status as i32,
    })
}

pub struct WatchCall {
    reader: RequestReader,
    out: Outbound,
    /// The watched service, once the request arrived.
    service: Option<String>,
}

impl WatchCall {
    pub fn new(
        recv: RecvStream,
        send: SendStream<Bytes>,
        max_message: usize,
        info: &CallInfo,
    ) -> Self {
        WatchCall {
            reader: RequestReader::new(
                recv,
                MessageDecoder::new(max_message).with_gzip(info.request_gzip),
            ),
            out: Outbound::new(send),
            service: None,
        }
    }

    /// Shutdown started: report NOT_SERVING and end the stream.
    pub fn shutting_down(&mut self) {
        if let Some(service) = &self.service {
            if status_of(service, true).is_some() {
                self.out.push(response(ServingStatus::NotServing));
            }
        }
        self.out
            .finish(Status::unavailable("server is shutting down"));
        self.reader.stop();
    }

    /// The store became reachable or unreachable: tell the watcher.
    pub fn status_changed(&mut self, serving: bool) {
        if let Some(service) = &self.service {
            if let Some(status) = status_of(service, !serving) {
                self.out.push(response(status));
            }
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

    /// Drives the stream; true once it is finished.
    pub fn poll(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) -> bool {
        let shutting_down = !shared.serving();
        // Unreachable storage comes back by itself: the watch stays open.
        let ending = shutting_down && shared.store_unavailable.is_none();
        if self.out.poll_reset(cx) {
            return true;
        }
        while self.reader.is_open() {
            match self.reader.poll_next(uid, &mut shared.inflight, cx) {
                Inbound::Message(body) => {
                    // One request is the whole of it: stop reading.
                    self.reader.stop();
                    match HealthCheckRequest::decode(body) {
                        Ok(req) => {
                            let status = status_of(&req.service, shutting_down)
                                .unwrap_or(ServingStatus::ServiceUnknown);
                            self.out.push(response(status));
                            if ending {
                                self.out
                                    .finish(Status::unavailable("server is shutting down"));
                            }
                            self.service = Some(req.service);
                        }
                        Err(e) => self.finish(Status::internal(format!(
                            "failed to decode HealthCheckRequest: {e}"
                        ))),
                    }
                }
                Inbound::Pending => break,
                Inbound::End => {
                    if self.service.is_none() {
                        self.finish(Status::internal(
                            "Health/Watch request ended without a message",
                        ));
                    }
                }
                Inbound::EndedInsideMessage => self.finish(Status::internal(
                    "Health/Watch request ended inside a message",
                )),
                Inbound::Bad(e) => self.finish(frame_status(e)),
                Inbound::Reset(_) => return true,
            }
        }
        self.out.flush(cx, || None).unwrap_or(true)
    }
}
