//! `UnaryCall`: one request message in, one response (or a status) out.
//! Reads the request stream to its end; exactly one message is a request
//! (none, two, or a stream ending inside a message is `INTERNAL` and nothing
//! is handled). Hands it to the method's handler, and
//! sends HEADERS + DATA + trailers once the answer is ready (for Publish:
//! after the writer's commit returned). Errors before that go Trailers-Only.

use std::task::Context;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;

use super::inbound::{Inbound, RequestReader};
use super::rpc::{self, Handled, PublishMeta};
use super::Shared;
use crate::grpc::framing::compress_framed;
use crate::grpc::framing::frame_status;
use crate::grpc::headers::{response_headers_with, trailers, trailers_only, CallInfo, Method};
use crate::grpc::{MessageDecoder, Status};
use crate::telemetry::Telemetry;

enum State {
    Reading,
    /// Submitted to the writer; `complete` will move it on.
    Waiting,
    Reply(Result<Bytes, Status>),
    Done,
}

pub struct UnaryCall {
    info: CallInfo,
    started: Instant,
    /// Set for publishes: metrics and the span to finish with the reply.
    publish: Option<PublishMeta>,
    reader: RequestReader,
    /// The request message, held until the stream ends.
    request: Option<Bytes>,
    respond: SendResponse<Bytes>,
    state: State,
}

/// Logs refused input at warn level, rate-limited (a misbehaving client must
/// not flood the log); the rest are counted and reported.
pub fn warn_rejected(method: &str, status: &Status) {
    log::debug!("{method} refused: {status}");
    crate::log_limited!(log::Level::Warn, "{method} refused: {status}");
}

impl UnaryCall {
    pub fn new(
        info: &CallInfo,
        recv: RecvStream,
        respond: SendResponse<Bytes>,
        max_message: usize,
    ) -> Self {
        UnaryCall {
            info: info.clone(),
            started: Instant::now(),
            publish: None,
            // The request is held until its stream ends: it stays counted
            // against the in-flight budget and under the message timeout.
            reader: RequestReader::new(
                recv,
                MessageDecoder::new(max_message).with_gzip(info.request_gzip),
            )
            .holding_until_end(),
            request: None,
            respond,
            state: State::Reading,
        }
    }

    pub fn method(&self) -> Method {
        self.info.method
    }

    /// The call's deadline passed: answer DEADLINE_EXCEEDED unless done.
    pub fn expire(&mut self) {
        if matches!(self.state, State::Reading | State::Waiting) {
            self.reader.stop();
            self.state = State::Reply(Err(Status::new(
                crate::grpc::Code::DeadlineExceeded,
                "deadline exceeded",
            )));
        }
    }

    /// The writer answered (or failed) this call's submission.
    pub fn complete(&mut self, reply: Result<Bytes, Status>) {
        if matches!(self.state, State::Waiting) {
            self.state = State::Reply(reply);
        }
    }

    /// Drives the call; true once it is finished and can be dropped.
    pub fn poll(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) -> bool {
        if let State::Reading = self.state {
            self.read(uid, shared, cx);
        }
        if matches!(self.state, State::Waiting) {
            // A client that gives up does not undo a durable write; only
            // notice it so the slot is freed once the reply is dropped.
            if self.respond.poll_reset(cx).is_ready() {
                log::debug!("call {uid}: client reset the stream while waiting for the commit");
            }
        }
        if let State::Reply(_) = self.state {
            if let State::Reply(reply) = std::mem::replace(&mut self.state, State::Done) {
                self.send(reply, &shared.telemetry);
            }
        }
        matches!(self.state, State::Done)
    }

    /// The call's request stream, for the reactor's memory rules.
    pub fn reader_mut(&mut self) -> &mut RequestReader {
        &mut self.reader
    }

    /// Its message did not complete in time: answer, stop reading.
    pub fn message_timed_out(&mut self, status: Status) {
        if matches!(self.state, State::Reading) {
            self.reader.stop();
            self.state = State::Reply(Err(status));
        }
    }

    fn read(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) {
        let name = self.info.method.name();
        let failed = |why: &str| State::Reply(Err(Status::internal(format!("{name} {why}"))));
        loop {
            match self.reader.poll_next(uid, &mut shared.inflight, cx) {
                Inbound::Message(body) => {
                    if self.request.is_some() {
                        self.reader.close(&mut shared.inflight, uid);
                        self.state = failed("request carried more than one message");
                        return;
                    }
                    self.request = Some(body);
                }
                Inbound::Pending => return,
                Inbound::End => {
                    self.reader.close(&mut shared.inflight, uid);
                    let Some(body) = self.request.take() else {
                        self.state = failed("request ended without a message");
                        return;
                    };
                    self.state = match rpc::handle_unary(
                        self.info.method,
                        body,
                        uid,
                        shared,
                        &self.info,
                        &mut self.publish,
                    ) {
                        Handled::Reply(r) => State::Reply(r),
                        Handled::Submitted => State::Waiting,
                    };
                    return;
                }
                Inbound::EndedInsideMessage => {
                    self.state = failed("request ended inside a message");
                    return;
                }
                Inbound::Bad(e) => {
                    self.state = State::Reply(Err(frame_status(e)));
                    return;
                }
                Inbound::Reset(e) => {
                    log::debug!("call {uid}: request stream failed: {e}");
                    self.state = State::Done;
                    return;
                }
            }
        }
    }

    fn send(&mut self, reply: Result<Bytes, Status>, telemetry: &Telemetry) {
        if let Some(p) = self.publish.take() {
            let metrics = telemetry.metrics();
            if reply.is_ok() {
                metrics.published(&p.topic, p.messages);
                if p.batch {
                    metrics.batch_published(&p.topic);
                }
            }
            metrics.publish_latency(&p.topic, self.started.elapsed());
            p.span.end(match &reply {
                Ok(_) => Ok(()),
                Err(s) => Err((s.code as i32, s.message.as_str())),
            });
        }
        match reply {
            Ok(body) => match self
                .respond
                .send_response(response_headers_with(self.info.respond_gzip), false)
            {
                Ok(mut stream) => {
                    let body = if self.info.respond_gzip {
                        compress_framed(body)
                    } else {
                        body
                    };
                    let _ = stream.send_data(body, false);
                    let _ = stream.send_trailers(trailers(&Status::ok()));
                }
                Err(e) => log::debug!("response not sent: {e}"),
            },
            Err(status) => {
                use crate::grpc::Code;
                match status.code {
                    // The client's input was refused: worth a (rate-limited) warning.
                    Code::InvalidArgument
                    | Code::ResourceExhausted
                    | Code::Unimplemented
                    | Code::Internal => warn_rejected(self.info.method.name(), &status),
                    Code::Ok => {}
                    _ => log::debug!("{} failed: {status}", self.info.method.name()),
                }
                let _ = self.respond.send_response(trailers_only(&status), true);
            }
        }
    }
}
