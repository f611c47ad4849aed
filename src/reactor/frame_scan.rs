//! Counting a client's HTTP/2 control frames, which h2 handles without
//! telling us: `FrameScanner` reads the 9-byte frame headers in the bytes a
//! server connection receives (in whatever chunks they arrive), and
//! `ControlFrameRate` says when their rate is far beyond honest use. Pure:
//! no IO, the caller passes the time.

use std::time::{Duration, Instant};

/// The client connection preface (RFC 9113 §3.4) is this long.
const PREFACE_LEN: u8 = 24;
const HEADER_LEN: usize = 9;

/// DATA, HEADERS and CONTINUATION carry requests; every other type
/// (PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY,
/// WINDOW_UPDATE, unknown types) is a control frame.
pub fn is_control(frame_type: u8) -> bool {
    !matches!(frame_type, 0x0 | 0x1 | 0x9)
}

/// Frame headers seen in one scanned chunk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameTally {
    pub frames: u64,
    pub control: u64,
}

impl std::ops::AddAssign for FrameTally {
    fn add_assign(&mut self, rhs: FrameTally) {
        self.frames += rhs.frames;
        self.control += rhs.control;
    }
}

/// Where a server connection's incoming byte stream is: in the client
/// preface, in a frame header, or in a frame's payload.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    preface_left: u8,
    header: [u8; HEADER_LEN],
    header_len: usize,
    payload_left: u32,
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameScanner {
    /// A scanner at the start of a server connection (preface first).
    pub fn new() -> FrameScanner {
        FrameScanner {
            preface_left: PREFACE_LEN,
            header: [0; HEADER_LEN],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Scans the next bytes of the stream; counts the frame headers that
    /// complete in them. The preface is skipped, not checked (h2 does).
    pub fn scan(&mut self, mut bytes: &[u8]) -> FrameTally {
        let mut tally = FrameTally::default();
        if self.preface_left > 0 {
            let n = bytes.len().min(self.preface_left as usize);
            self.preface_left -= n as u8;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let frame_type = if self.header_len == 0 && bytes.len() >= HEADER_LEN {
                // The common case: a whole header in this chunk.
                let (len, ty) = (&bytes[..3], bytes[3]);
                self.payload_left = u32::from_be_bytes([0, len[0], len[1], len[2]]);
                bytes = &bytes[HEADER_LEN..];
                ty
            } else {
                let n = bytes.len().min(HEADER_LEN - self.header_len);
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len < HEADER_LEN {
                    break;
                }
                self.header_len = 0;
                let h = &self.header;
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                h[3]
            };
            tally.frames += 1;
            if is_control(frame_type) {
                tally.control += 1;
            }
        }
        tally
    }
}

/// Control frames per connection per second, over a fixed one-second
/// window: past `limit` in one window the peer is flooding.
/// Control frames allowed per byte the server wrote in the same window: a
/// reader sends WINDOW_UPDATEs (and answers PINGs) in proportion to what it
/// receives, so a fast honest reader with small windows is paid for by the
/// data it was sent. One frame per KiB covers windows down to 2 KiB.
pub const BYTES_PER_EARNED_FRAME: u64 = 1024;

/// Control frames within a one-second window, against `limit` plus what
/// the bytes written in that window earned.
#[derive(Debug, Clone)]
pub struct ControlFrameRate {
    limit: u64,
    window_start: Option<Instant>,
    in_window: u64,
    written_in_window: u64,
}

impl ControlFrameRate {
    pub const WINDOW: Duration = Duration::from_secs(1);

    pub fn new(limit: u64) -> ControlFrameRate {
        ControlFrameRate {
            limit,
            window_start: None,
            in_window: 0,
            written_in_window: 0,
        }
    }

    /// Starts a new window when the current one is over.
    fn roll(&mut self, now: Instant) {
        let current = self
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) < Self::WINDOW);
        if !current {
            self.window_start = Some(now);
            self.in_window = 0;
            self.written_in_window = 0;
        }
    }

    /// The server wrote `bytes` to the peer.
    pub fn wrote(&mut self, bytes: usize, now: Instant) {
        self.roll(now);
        self.written_in_window += bytes as u64;
    }

    /// `n` more control frames arrived: true when the window holds more
    /// than the limit allows.
    pub fn exceeded(&mut self, n: u64, now: Instant) -> bool {
        self.roll(now);
        self.in_window += n;
        self.in_window > self.limit + self.written_in_window / BYTES_PER_EARNED_FRAME
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], ty, 0, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_control_frames_after_the_preface_and_skips_payloads() {
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, &[])); // SETTINGS
        wire.extend(frame(0x1, &[0x82; 20])); // HEADERS
                                              // A DATA payload that looks like frame headers must be skipped.
        wire.extend(frame(0x0, &frame(0x2, &[0; 5]).repeat(3)));
        wire.extend(frame(0x2, &[0, 0, 0, 0, 15])); // PRIORITY
        wire.extend(frame(0x8, &[0, 0, 0, 1])); // WINDOW_UPDATE
        wire.extend(frame(0xfa, &[])); // unknown
        wire.extend(frame(0x9, &[1, 2])); // CONTINUATION
        let mut s = FrameScanner::new();
        assert_eq!(
            s.scan(&wire),
            FrameTally {
                frames: 7,
                control: 4
            }
        );
    }

    #[test]
    fn a_header_split_across_chunks_counts_once_when_complete() {
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x2, &[0, 0, 0, 0, 15]));
        let mut s = FrameScanner::new();
        assert_eq!(s.scan(&wire[..30]).frames, 0);
        assert_eq!(s.scan(&wire[30..32]).frames, 0);
        assert_eq!(s.scan(&wire[32..33]).frames, 1);
        assert_eq!(s.scan(&wire[33..]).frames, 0);
        assert_eq!(s.scan(&frame(0x6, &[0; 8])).control, 1);
    }

    #[test]
    fn the_rate_is_exceeded_only_within_one_window() {
        let t0 = Instant::now();
        let mut r = ControlFrameRate::new(100);
        assert!(!r.exceeded(60, t0));
        assert!(!r.exceeded(40, t0 + Duration::from_millis(500)));
        assert!(r.exceeded(1, t0 + Duration::from_millis(999)));
        // A new window starts afresh.
        let mut r = ControlFrameRate::new(100);
        assert!(!r.exceeded(100, t0));
        assert!(!r.exceeded(100, t0 + Duration::from_secs(1)));
        assert!(!r.exceeded(100, t0 + Duration::from_millis(2500)));
    }

    #[test]
    fn bytes_written_earn_control_frames_in_their_window_only() {
        let t0 = Instant::now();
        let mut r = ControlFrameRate::new(100);
        // 1 MiB sent: a reader may answer it with 1,024 more frames.
        r.wrote(1 << 20, t0);
        assert!(!r.exceeded(1_124, t0 + Duration::from_millis(10)));
        assert!(r.exceeded(1, t0 + Duration::from_millis(20)));
        // The next window starts with no earnings.
        r.wrote(10 << 10, t0 + Duration::from_millis(1500));
        assert!(!r.exceeded(110, t0 + Duration::from_millis(1600)));
        assert!(r.exceeded(1, t0 + Duration::from_millis(1700)));
    }
}

/// Property-based fuzzing of [`FrameScanner`] (`cargo test --lib fuzz`): any
/// chunking of the same bytes gives the same counts, and a stream built of
/// frames is counted exactly.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;

    fn scan_in_chunks(input: &[u8], cuts: &[usize]) -> FrameTally {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        at.extend([0, input.len()]);
        at.sort_unstable();
        at.dedup();
        let mut s = FrameScanner::new();
        let mut total = FrameTally::default();
        for w in at.windows(2) {
            total += s.scan(&input[w[0]..w[1]]);
        }
        total
    }

    proptest! {
        #![proptest_config(config(512, 1))]

        #[test]
        fn fuzz_any_chunking_counts_the_same(
            input in vec(any::<u8>(), 0..2_000),
            cuts in vec(any::<usize>(), 0..40),
        ) {
            let mut whole = FrameScanner::new();
            prop_assert_eq!(scan_in_chunks(&input, &cuts), whole.scan(&input));
        }

        #[test]
        fn fuzz_frames_are_counted_exactly(
            frames in vec((any::<u8>(), vec(any::<u8>(), 0..64)), 0..60),
            cuts in vec(any::<usize>(), 0..40),
        ) {
            let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let mut control = 0;
            for (ty, payload) in &frames {
                let len = (payload.len() as u32).to_be_bytes();
                wire.extend_from_slice(&[len[1], len[2], len[3], *ty, 0, 0, 0, 0, 1]);
                wire.extend_from_slice(payload);
                control += u64::from(is_control(*ty));
            }
            let want = FrameTally { frames: frames.len() as u64, control };
            prop_assert_eq!(scan_in_chunks(&wire, &cuts), want);
        }
    }
}
