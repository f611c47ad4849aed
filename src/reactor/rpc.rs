//! What each unary method does with its decoded request: validate it, answer
//! at once from broker state, or submit it to the writer and answer when the
//! commit returns (`reply_for_append`).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::Shared;
use crate::broker::validate_topic_name;
use crate::grpc::headers::Method;
use crate::grpc::{encode_message, Code, Status};
use crate::proto;
use crate::storage::writer::{Appended, NewMessage, WriteRequest};
use crate::storage::StorageError;

/// The handler's answer: now, or after the writer.
pub enum Handled {
    Reply(Result<Bytes, Status>),
    Submitted,
}

fn decode<M: Message + Default>(body: Bytes) -> Result<M, Status> {
    M::decode(body).map_err(|e| {
        Status::internal(format!("failed to decode {}: {e}", std::any::type_name::<M>().rsplit("::").next().unwrap_or("request")))
    })
}

pub fn handle_unary(method: Method, body: Bytes, uid: u64, shared: &mut Shared) -> Handled {
    match dispatch(method, body, uid, shared) {
        Ok(h) => h,
        Err(status) => Handled::Reply(Err(status)),
    }
}

fn dispatch(method: Method, body: Bytes, uid: u64, shared: &mut Shared) -> Result<Handled, Status> {
    match method {
        Method::Publish => {
            let req: proto::PublishRequest = decode(body)?;
            validate_topic_name(&req.topic).map_err(Status::invalid_argument)?;
            let messages = vec![NewMessage { payload: req.payload, attributes: req.attributes }];
            shared.submit(WriteRequest::Append { token: uid, topic: req.topic.into(), messages });
            Ok(Handled::Submitted)
        }
        Method::BatchPublish => {
            let req: proto::BatchPublishRequest = decode(body)?;
            validate_topic_name(&req.topic).map_err(Status::invalid_argument)?;
            if req.messages.is_empty() {
                return Err(Status::invalid_argument("BatchPublish needs at least one message"));
            }
            let messages = req
                .messages
                .into_iter()
                .map(|m| NewMessage { payload: m.payload, attributes: m.attributes })
                .collect();
            shared.submit(WriteRequest::Append { token: uid, topic: req.topic.into(), messages });
            Ok(Handled::Submitted)
        }
        Method::ListTopics => {
            let _: proto::ListTopicsRequest = decode(body)?;
            let topics = shared
                .broker
                .topics()
                .map(|t| proto::Topic { name: t.name.to_string(), created_at: t.created_at_ms })
                .collect();
            Ok(Handled::Reply(Ok(encode_message(&proto::ListTopicsResponse { topics }))))
        }
        Method::GetTopicStats | Method::DeleteTopic | Method::DeleteConsumerGroup | Method::ResetCursor => {
            Err(Status::unimplemented(format!("{} is not implemented yet", method.name())))
        }
        Method::Subscribe => Err(Status::internal("Subscribe is a streaming method")),
    }
}

/// The response to send for a finished append.
pub fn reply_for_append(method: Method, result: &Result<Appended, StorageError>) -> Result<Bytes, Status> {
    let appended = result.as_ref().map_err(|e| {
        if e.disk_full {
            Status::unavailable(format!("storage is full: {}", e.message))
        } else {
            Status::new(Code::Internal, format!("storage failure: {}", e.message))
        }
    })?;
    Ok(match method {
        Method::Publish => {
            let m = appended.messages.first().ok_or_else(|| Status::internal("empty append"))?;
            encode_message(&proto::PublishResponse {
                message_id: m.id.to_string(),
                sequence: m.sequence,
                timestamp: m.timestamp_ms,
            })
        }
        _ => encode_message(&proto::BatchPublishResponse {
            results: appended
                .messages
                .iter()
                .map(|m| proto::PublishResult { message_id: m.id.to_string(), sequence: m.sequence })
                .collect(),
            timestamp: appended.timestamp_ms,
        }),
    })
}

/// A topic name shared with the broker when it already knows the topic.
pub fn shared_topic_name(shared: &Shared, name: &str) -> Arc<str> {
    shared.broker.topic(name).map_or_else(|| name.into(), |t| t.name.clone())
}
