//! Length-prefixed gRPC messages: a 1-byte compressed flag, a 4-byte
//! big-endian length, then the message. A message may span DATA frames and a
//! frame may hold several; the length is checked before the body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::status::{Code, Status};

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
            // The buffer grows as bytes arrive, never by the declared length:
            // a peer that announces 4 MiB and sends 5 bytes holds 5 bytes.
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

/// The status for a framing error on a request stream.
pub fn frame_status(e: FrameError) -> Status {
    match e {
        FrameError::TooLarge { declared, limit } => Status::new(
            Code::ResourceExhausted,
            format!("received message larger than max ({declared} vs. {limit})"),
        ),
        FrameError::Compressed => Status::internal(
            "compressed flag set but no grpc-encoding was negotiated for the request",
        ),
        FrameError::BadFlag(f) => Status::internal(format!(
            "invalid compressed-flag byte {f} in message prefix"
        )),
        FrameError::BadCompression(e) => {
            Status::internal(format!("failed to decompress gzip message: {e}"))
        }
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
            idempotency_key: String::new(),
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
            idempotency_key: String::new(),
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

/// Property-based fuzzing of [`MessageDecoder`] (`cargo test --lib fuzz`):
/// arbitrary bytes under arbitrary chunk splits never panic and decode the
/// same whatever the chunking; encoded messages round-trip, plain and gzip;
/// a declared length over the limit is refused from the prefix alone; gzip
/// bombs are refused once they inflate past the limit.
#[cfg(test)]
mod fuzz {
    use std::io::Write;

    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;
    use crate::grpc::Code;
    use crate::proto::PublishRequest;

    fn gzip(body: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(body).unwrap();
        enc.finish().unwrap()
    }

    fn framed(flag: u8, declared: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&declared.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// What the decoder yields for `input` pushed in chunks cut at `cuts`:
    /// the messages before the first error, that error (callers stop there),
    /// and the bytes still buffered.
    fn run(
        input: &[u8],
        cuts: &[usize],
        limit: usize,
        gzip: bool,
    ) -> (Vec<Bytes>, Option<FrameError>, usize) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        at.extend([0, input.len()]);
        at.sort_unstable();
        at.dedup();
        let mut d = MessageDecoder::new(limit).with_gzip(gzip);
        let mut out = Vec::new();
        for w in at.windows(2) {
            d.push(&input[w[0]..w[1]]);
            loop {
                match d.next_message() {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e), d.buffered()),
                }
            }
        }
        (out, None, d.buffered())
    }

    /// Wire bytes that are mostly frame-shaped: well-formed frames, gzip
    /// frames, frames with a wrong length or flag, and raw noise.
    fn wire() -> impl Strategy<Value = Vec<u8>> {
        let segment = prop_oneof![
            vec(any::<u8>(), 0..40).prop_map(|b| framed(0, b.len() as u32, &b)),
            vec(any::<u8>(), 0..300).prop_map(|b| {
                let z = gzip(&b);
                framed(1, z.len() as u32, &z)
            }),
            (any::<u8>(), 0u32..64, vec(any::<u8>(), 0..40)).prop_map(|(f, n, b)| framed(
                f % 3,
                n,
                &b
            )),
            vec(any::<u8>(), 0..16),
        ];
        vec(segment, 0..6).prop_map(|s| s.concat())
    }

    fn publish_request() -> impl Strategy<Value = PublishRequest> {
        (
            "[a-z.]{0,12}",
            vec(any::<u8>(), 0..700),
            btree_map("\\PC{0,6}", "\\PC{0,10}", 0..3),
        )
            .prop_map(|(topic, payload, attrs)| PublishRequest {
                topic,
                payload: payload.into(),
                attributes: attrs.into_iter().collect(),
                idempotency_key: String::new(),
            })
    }

    proptest! {
        #![proptest_config(config(256, 1))]

        #[test]
        fn fuzz_arbitrary_bytes_never_panic(
            input in prop_oneof![vec(any::<u8>(), 0..200), wire()],
            cuts in vec(any::<usize>(), 0..12),
            limit in prop_oneof![0usize..=300, Just(usize::MAX)],
            gzip: bool,
        ) {
            let (messages, error, buffered) = run(&input, &cuts, limit, gzip);
            prop_assert!(messages.iter().all(|m| m.len() <= limit));
            if error.is_none() {
                prop_assert!(buffered <= input.len());
            }
        }

        #[test]
        fn fuzz_chunking_does_not_change_the_result(
            input in wire(),
            a in vec(any::<usize>(), 0..12),
            b in vec(any::<usize>(), 0..12),
            limit in 0usize..=300,
            gzip: bool,
        ) {
            let whole = run(&input, &[], limit, gzip);
            let x = run(&input, &a, limit, gzip);
            let y = run(&input, &b, limit, gzip);
            prop_assert_eq!((&x.0, &x.1), (&whole.0, &whole.1));
            prop_assert_eq!((&y.0, &y.1), (&whole.0, &whole.1));
            if whole.1.is_none() {
                prop_assert_eq!(x.2, whole.2);
                prop_assert_eq!(y.2, whole.2);
            }
        }

        #[test]
        fn fuzz_encoded_messages_round_trip(
            messages in vec(publish_request(), 0..5),
            compress: bool,
            cuts in vec(any::<usize>(), 0..12),
        ) {
            let frames: Vec<Bytes> =
                messages.iter().map(|m| encode_message_with(m, compress)).collect();
            let wire = frames.concat();
            // Room for each message, inflated or (incompressible) deflated.
            let limit = messages
                .iter()
                .map(prost::Message::encoded_len)
                .chain(frames.iter().map(|f| f.len() - PREFIX))
                .max()
                .unwrap_or(0);
            let (bodies, error, buffered) = run(&wire, &cuts, limit, compress);
            prop_assert_eq!(error, None);
            prop_assert_eq!(buffered, 0);
            let decoded: Vec<PublishRequest> = bodies
                .into_iter()
                .map(|b| <PublishRequest as prost::Message>::decode(b).unwrap())
                .collect();
            prop_assert_eq!(decoded, messages);
        }

        #[test]
        fn fuzz_compressed_frames_need_negotiated_gzip(body in vec(any::<u8>(), 0..1200)) {
            let packed = compress_framed(Bytes::from(framed(0, body.len() as u32, &body)));
            let compressed = packed[0] == 1;
            prop_assert_eq!(compressed, body.len() >= COMPRESS_FROM);
            let limit = body.len().max(packed.len() - PREFIX);
            let with = run(&packed, &[], limit, true);
            prop_assert_eq!(with.0, vec![Bytes::from(body.clone())]);
            let without = run(&packed, &[], limit, false);
            if compressed {
                prop_assert_eq!(without.1, Some(FrameError::Compressed));
            } else {
                prop_assert_eq!(without.0, vec![Bytes::from(body)]);
            }
        }

        #[test]
        fn fuzz_oversized_lengths_are_refused_from_the_prefix(
            limit in prop_oneof![0usize..=4096, 0usize..u32::MAX as usize],
            over in any::<u32>(),
            flag in 0u8..2,
            gzip: bool,
            split in 0usize..=5,
        ) {
            let room = u32::MAX as u64 - limit as u64;
            let declared = (limit as u64 + 1 + u64::from(over) % room) as u32;
            let prefix = framed(flag, declared, &[]);
            let mut d = MessageDecoder::new(limit).with_gzip(gzip);
            d.push(&prefix[..split]);
            if split < PREFIX {
                prop_assert_eq!(d.next_message(), Ok(None));
                d.push(&prefix[split..]);
            }
            let expected = if flag == 1 && !gzip {
                FrameError::Compressed
            } else {
                FrameError::TooLarge { declared: declared as usize, limit }
            };
            prop_assert_eq!(d.next_message(), Err(expected.clone()));
            let status = super::frame_status(expected);
            let code = if flag == 1 && !gzip { Code::Internal } else { Code::ResourceExhausted };
            prop_assert_eq!(status.code, code);
        }

        #[test]
        fn fuzz_lengths_within_the_limit_wait_for_the_body(
            limit in 0usize..=65536,
            len in any::<usize>(),
            have in any::<usize>(),
            gzip: bool,
        ) {
            let len = len % (limit + 1);
            let have = have % (len + 1);
            let mut d = MessageDecoder::new(limit).with_gzip(gzip);
            d.push(&framed(0, len as u32, &vec![0; have]));
            let next = d.next_message();
            if have == len {
                prop_assert_eq!(next, Ok(Some(Bytes::from(vec![0; len]))));
            } else {
                prop_assert_eq!(next, Ok(None));
                prop_assert_eq!(d.buffered(), PREFIX + have);
            }
        }

        #[test]
        fn fuzz_gzip_bodies_are_bounded_by_the_limit(
            limit in prop_oneof![0usize..=70_000, Just(usize::MAX - 1), Just(usize::MAX)],
            size in prop_oneof![0usize..=1000, 0usize..=200_000],
            byte: u8,
        ) {
            // Repeated bytes compress ~1000:1: past the limit this is a bomb.
            let body = vec![byte; size];
            let z = gzip(&body);
            let mut d = MessageDecoder::new(limit).with_gzip(true);
            d.push(&framed(1, z.len() as u32, &z));
            match d.next_message() {
                Ok(Some(m)) => {
                    prop_assert!(size <= limit);
                    prop_assert_eq!(m, Bytes::from(body));
                }
                Err(FrameError::TooLarge { declared, limit: l }) => {
                    prop_assert_eq!(l, limit);
                    prop_assert!(declared > limit);
                    prop_assert!(size > limit || z.len() > limit);
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn fuzz_corrupt_gzip_is_refused_not_misread(
            body in vec(any::<u8>(), 0..600),
            flips in vec((any::<usize>(), 1u8..=255), 0..4),
            noise in vec(any::<u8>(), 0..64),
            use_noise: bool,
        ) {
            let mut z = if use_noise { noise } else { gzip(&body) };
            for (at, x) in &flips {
                let n = z.len();
                if n > 0 {
                    z[at % n] ^= x;
                }
            }
            let mut d = MessageDecoder::new(4096).with_gzip(true);
            d.push(&framed(1, z.len() as u32, &z));
            match d.next_message() {
                // gzip's CRC-32 and length trailer: what inflates is the original.
                Ok(Some(m)) => prop_assert!(use_noise || m == body),
                Err(FrameError::BadCompression(_)) => {}
                other => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
