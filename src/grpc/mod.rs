//! gRPC over HTTP/2, the pure parts: message framing, status codes,
//! request-header checks and response header/trailer construction. Nothing
//! here touches a socket; the reactor calls it.

pub mod framing;
pub mod headers;
pub mod status;

pub use framing::{encode_message, encode_message_with, FrameError, MessageDecoder};
pub use status::{Code, Status};
