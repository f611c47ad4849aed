//! `MeteredIo`: the socket of a server connection as h2 sees it, with two
//! limits h2 has no hooks for. Reads stop (`Pending`) once the connection
//! has used its byte budget for this reactor turn, so one busy peer cannot
//! hold the reactor; and the frame headers read are scanned so a peer
//! flooding control frames (PRIORITY, WINDOW_UPDATE, PING, unknown types…)
//! is noticed. Either way the `Connection` learns it through the shared
//! [`ReadMeter`] and acts (reschedules itself for the next turn, or sends
//! GOAWAY ENHANCE_YOUR_CALM); the socket is edge-triggered, so a read that
//! stops before `WouldBlock` must be followed by a poll without an event.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame_scan::{ControlFrameRate, FrameScanner};
use crate::socket_io::SocketIo;

/// What one connection's reads did this turn, shared between its
/// `MeteredIo` (inside h2) and its `Connection`.
#[derive(Debug, Default)]
pub struct ReadMeter {
    /// Bytes the connection may still read this turn.
    budget: Cell<usize>,
    /// A read was refused for lack of budget: bytes may be waiting that no
    /// readiness event will announce.
    starved: Cell<bool>,
    /// The peer sent control frames past the limit; nothing more is read.
    flooding: Cell<bool>,
}

impl ReadMeter {
    /// A new turn: `budget` bytes may be read.
    pub fn refill(&self, budget: usize) {
        self.budget.set(budget);
        self.starved.set(false);
    }

    pub fn starved(&self) -> bool {
        self.starved.get()
    }

    pub fn flooding(&self) -> bool {
        self.flooding.get()
    }
}

pub struct MeteredIo {
    io: SocketIo,
    meter: Rc<ReadMeter>,
    scanner: FrameScanner,
    rate: ControlFrameRate,
}

impl MeteredIo {
    /// Wraps a just-accepted server socket: the client preface comes first.
    /// More than `control_frames_per_second` control frames within a
    /// second mark the peer as flooding.
    pub fn new(io: SocketIo, control_frames_per_second: u64) -> (MeteredIo, Rc<ReadMeter>) {
        let meter = Rc::new(ReadMeter::default());
        let io = MeteredIo {
            io,
            meter: meter.clone(),
            scanner: FrameScanner::new(),
            rate: ControlFrameRate::new(control_frames_per_second),
        };
        (io, meter)
    }
}

impl AsyncRead for MeteredIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.meter.flooding.get() {
            // The connection is about to be sent GOAWAY and closed.
            return Poll::Pending;
        }
        let budget = this.meter.budget.get();
        if budget == 0 {
            this.meter.starved.set(true);
            return Poll::Pending;
        }
        let unfilled = buf.initialize_unfilled();
        let take = unfilled.len().min(budget);
        let mut limited = ReadBuf::new(&mut unfilled[..take]);
        match Pin::new(&mut this.io).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let got = limited.filled();
                let n = got.len();
                let tally = this.scanner.scan(got);
                if tally.control > 0 && this.rate.exceeded(tally.control, Instant::now()) {
                    this.meter.flooding.set(true);
                }
                this.meter.budget.set(budget - n);
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for MeteredIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.rate.wrote(n, Instant::now());
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.rate.wrote(n, Instant::now());
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::task::Waker;
    use std::time::Duration;

    use super::*;

    /// A connected pair: our metered server side, and the peer's socket.
    fn pair(limit: u64) -> (MeteredIo, Rc<ReadMeter>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = mio::net::TcpStream::from_std(ours);
        let (io, meter) = MeteredIo::new(SocketIo { stream }, limit);
        (io, meter, peer)
    }

    /// Reads until `Pending`; returns the bytes read.
    fn read_all(io: &mut MeteredIo) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let mut total = 0;
        loop {
            let mut space = [0u8; 4096];
            let mut buf = ReadBuf::new(&mut space);
            match Pin::new(&mut *io).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => total += buf.filled().len(),
                _ => return total,
            }
        }
    }

    /// Waits until the peer's bytes have arrived (loopback is quick).
    fn settle() {
        std::thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn reads_stop_at_the_turns_budget_and_say_more_may_wait() {
        let (mut io, meter, mut peer) = pair(u64::MAX);
        peer.write_all(&[0u8; 10_000]).unwrap();
        settle();
        meter.refill(6_000);
        assert_eq!(read_all(&mut io), 6_000);
        assert!(meter.starved());
        meter.refill(6_000);
        assert_eq!(read_all(&mut io), 4_000);
        // Drained to WouldBlock: the next readiness event will come.
        assert!(!meter.starved());
    }

    #[test]
    fn a_control_frame_flood_is_flagged_and_reading_stops() {
        let (mut io, meter, mut peer) = pair(100);
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..150 {
            wire.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        }
        peer.write_all(&wire).unwrap();
        settle();
        meter.refill(1 << 20);
        assert!(read_all(&mut io) > 0);
        assert!(meter.flooding());
        meter.refill(1 << 20);
        assert_eq!(read_all(&mut io), 0);
    }
}
