//! Length-prefixed gRPC messages: a 1-byte compressed flag, a 4-byte
//! big-endian length, then the message. A message may span DATA frames and a
//! frame may hold several; the length is checked before the body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const PREFIX: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The declared length exceeds the limit.
    TooLarge { declared: usize, limit: usize },
    /// The compressed flag is set (no supported encoding was negotiated).
    Compressed,
    /// A flag value other than 0 or 1.
    BadFlag(u8),
    /// A compressed message that does not decompress.
    BadCompression(String),
}

/// Reassembles messages from DATA chunks.
#[derive(Debug)]
pub struct MessageDecoder {
    buf: BytesMut,
    limit: usize,
    /// The request declared `grpc-encoding: gzip`.
    gzip: bool,
}

impl MessageDecoder {
    pub fn new(limit: usize) -> Self {
        MessageDecoder {
            buf: BytesMut::new(),
            limit,
            gzip: false,
        }
    }

    /// Accepts gzip-compressed messages (flag 1), as negotiated by the
    /// request's `grpc-encoding`.
    pub fn with_gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Adds a DATA chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete message, if one is buffered. Errors as soon as the
    /// prefix is readable, before the body arrives.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        let flag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        let compressed = match flag {
            0 => false,
            1 if self.gzip => true,
            1 => return Err(FrameError::Compressed),
            other => return Err(FrameError::BadFlag(other)),
        };
        if len > self.limit {
            return Err(FrameError::TooLarge {
                declared: len,
                limit: self.limit,
            });
        }
        if self.buf.len() < PREFIX + len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        let body = self.buf.split_to(len).freeze();
        if compressed {
            return gunzip(&body, self.limit).map(Some);
        }
        Ok(Some(body))
    }

    /// Bytes of an incomplete message still buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Decompresses a gzip message, refusing to inflate past `limit` bytes.
fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, FrameError> {
    use std::io::Read;
    let mut out = Vec::new();
    // One byte past the limit tells "too large" from "exactly the limit";
    // saturating, as the limit is configurable up to usize::MAX.
    let cap = (limit as u64).saturating_add(1);
    let mut reader = flate2::read::GzDecoder::new(body).take(cap);
    reader
        .read_to_end(&mut out)
        .map_err(|e| FrameError::BadCompression(e.to_string()))?;
    if out.len() > limit {
        return Err(FrameError::TooLarge {
            declared: out.len(),
            limit,
        });
    }
    Ok(out.into())
}

/// Messages at least this large are compressed when gzip was negotiated.
pub const COMPRESS_FROM: usize = 256;

/// Frames one protobuf message, gzip-compressed when `gzip` is set and the
/// message is large enough to gain from it.
pub fn encode_message_with<M: prost::Message>(message: &M, gzip: bool) -> Bytes {
    let framed = encode_message(message);
    if gzip {
        compress_framed(framed)
    } else {
        framed
    }
}

/// Compresses an already framed, uncompressed message if it is large
/// enough to gain from it.
pub fn compress_framed(framed: Bytes) -> Bytes {
    if framed.len() < PREFIX + COMPRESS_FROM || framed[0] != 0 {
        return framed;
    }
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if enc.write_all(&framed[PREFIX..]).is_err() {
        return framed;
    }
    let Ok(packed) = enc.finish() else {
        return framed;
    };
    let mut out = BytesMut::with_capacity(PREFIX + packed.len());
    out.put_u8(1);
    out.put_u32(packed.len() as u32);
    out.extend_from_slice(&packed);
    out.freeze()
}

/// Frames one protobuf message.
pub fn encode_message<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    // Encoding into a buffer reserved for exactly `len` bytes cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reassembles_across_chunks_and_splits_packed_frames() {
        let mut d = MessageDecoder::new(100);
        let mut wire = frame(b"hello");
        wire.extend(frame(b""));
        wire.extend(frame(b"world!"));
        for byte in wire.chunks(3) {
            d.push(byte);
        }
        assert_eq!(d.next_message().unwrap().unwrap(), &b"hello"[..]);
        assert_eq!(d.next_message().unwrap().unwrap(), &b""[..]);
        assert_eq!(d.next_message().unwrap().unwrap(), &b"world!"[..]);
        assert_eq!(d.next_message().unwrap(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn rejects_an_oversized_length_before_the_body() {
        let mut d = MessageDecoder::new(10);
        d.push(&[0, 0, 0, 0, 11]);
        assert_eq!(
            d.next_message(),
            Err(FrameError::TooLarge {
                declared: 11,
                limit: 10
            })
        );
    }

    #[test]
    fn rejects_compressed_and_bad_flags() {
        let mut d = MessageDecoder::new(10);
        d.push(&[1, 0, 0, 0, 1, 0]);
        assert_eq!(d.next_message(), Err(FrameError::Compressed));
        let mut d = MessageDecoder::new(10);
        d.push(&[7, 0, 0, 0, 1, 0]);
        assert_eq!(d.next_message(), Err(FrameError::BadFlag(7)));
    }

    #[test]
    fn gzip_round_trips_and_is_bounded() {
        let m = crate::proto::PublishRequest {
            topic: "t".into(),
            payload: vec![b'a'; 10_000].into(),
            attributes: Default::default(),
        };
        let framed = encode_message_with(&m, true);
        assert_eq!(framed[0], 1);
        assert!(framed.len() < 1000);
        let mut d = MessageDecoder::new(20_000).with_gzip(true);
        d.push(&framed);
        let body = d.next_message().unwrap().unwrap();
        assert_eq!(
            <crate::proto::PublishRequest as prost::Message>::decode(body).unwrap(),
            m
        );
        let mut small = MessageDecoder::new(5_000).with_gzip(true);
        small.push(&framed);
        assert!(matches!(
            small.next_message(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bad = MessageDecoder::new(100).with_gzip(true);
        bad.push(&[1, 0, 0, 0, 3, 1, 2, 3]);
        assert!(matches!(
            bad.next_message(),
            Err(FrameError::BadCompression(_))
        ));
    }

    /// Found by fuzzing: `limit as u64 + 1` overflowed for a limit of
    /// usize::MAX (`--max-message-bytes 18446744073709551615`): a panic in
    /// debug builds, and in release a cap of 0 that read every gzip message
    /// as empty.
    #[test]
    fn gzip_with_the_largest_limit_neither_overflows_nor_truncates() {
        let m = crate::proto::PublishRequest {
            topic: "t".into(),
            payload: vec![b'a'; 1000].into(),
            attributes: Default::default(),
        };
        let framed = encode_message_with(&m, true);
        assert_eq!(framed[0], 1);
        let mut d = MessageDecoder::new(usize::MAX).with_gzip(true);
        d.push(&framed);
        let body = d.next_message().unwrap().unwrap();
        assert_eq!(
            <crate::proto::PublishRequest as prost::Message>::decode(body).unwrap(),
            m
        );
    }

    #[test]
    fn encodes_with_the_prefix() {
        let m = crate::proto::CreditGrant { credits: 5 };
        let bytes = encode_message(&m);
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 2]);
        let mut d = MessageDecoder::new(10);
        d.push(&bytes);
        let body = d.next_message().unwrap().unwrap();
        assert_eq!(
            <crate::proto::CreditGrant as prost::Message>::decode(body).unwrap(),
            m
        );
    }
}
