//! `BlockingClient`: a gRPC client for the CLI on the same machinery as the
//! daemon — one mio poll, h2 driven by polling its futures with our own
//! waker, our gRPC framing — and no async runtime. `block_on` runs one
//! future to completion while driving the HTTP/2 connection.

use std::future::Future;
use std::net::ToSocketAddrs;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::client::{Connection, SendRequest};
use http::Request;
use mio::net::TcpStream;
use mio::{Events, Interest, Token};
use prost::Message;

use crate::grpc::status::percent_decode;
use crate::grpc::{encode_message, Code, MessageDecoder, Status};
use crate::socket_io::SocketIo;

/// Set by any wake: the loop polls again before it waits on the socket.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

pub struct BlockingClient {
    poll: mio::Poll,
    events: Events,
    conn: Connection<SocketIo, Bytes>,
    send: SendRequest<Bytes>,
    authority: String,
    flag: Arc<Flag>,
    waker: Waker,
    closed: Option<String>,
}

/// A server-streaming or bidirectional call in progress.
pub struct Stream {
    pub send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    decoder: MessageDecoder,
    trailers_seen: bool,
}

fn status_from(headers: &http::HeaderMap) -> Option<Status> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(Status::new(Code::from_i32(code), message))
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

impl BlockingClient {
    /// Connects to `addr` (`host:port`, optionally with an `http://` prefix).
    pub fn connect(addr: &str, timeout: Duration) -> Result<BlockingClient, Status> {
        let hostport = addr.trim_start_matches("http://").trim_end_matches('/');
        let sock = hostport
            .to_socket_addrs()
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?
            .next()
            .ok_or_else(|| Status::invalid_argument(format!("bad address {addr:?}")))?;
        let std_stream = std::net::TcpStream::connect_timeout(&sock, timeout)
            .map_err(|e| unavailable(format!("cannot connect to {hostport}: {e}")))?;
        std_stream.set_nodelay(true).map_err(unavailable)?;
        std_stream.set_nonblocking(true).map_err(unavailable)?;
        let mut stream = TcpStream::from_std(std_stream);
        let mut poll = mio::Poll::new().map_err(unavailable)?;
        poll.registry()
            .register(
                &mut stream,
                Token(0),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(unavailable)?;
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        let waker = Waker::from(flag.clone());
        let mut handshake = pin!(h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(SocketIo { stream }));
        let mut events = Events::with_capacity(16);
        let deadline = Instant::now() + timeout;
        let mut cx = Context::from_waker(&waker);
        let (send, conn) = loop {
            match handshake.as_mut().poll(&mut cx) {
                Poll::Ready(r) => break r.map_err(unavailable)?,
                Poll::Pending => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Status::new(
                            Code::DeadlineExceeded,
                            "HTTP/2 handshake timed out",
                        ));
                    }
                    poll_once(&mut poll, &mut events, &flag, Some(left))?;
                }
            }
        };
        Ok(BlockingClient {
            poll,
            events,
            conn,
            send,
            authority: hostport.to_string(),
            flag,
            waker,
            closed: None,
        })
    }

    /// Runs `fut` to completion while driving the connection.
    pub fn block_on<F: Future>(&mut self, fut: F) -> Result<F::Output, Status> {
        let mut fut = pin!(fut);
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        loop {
            self.flag.0.store(false, Ordering::Release);
            if self.closed.is_none() {
                if let Poll::Ready(r) = Pin::new(&mut self.conn).poll(&mut cx) {
                    self.closed = Some(match r {
                        Ok(()) => "connection closed by the server".into(),
                        Err(e) => format!("connection failed: {e}"),
                    });
                }
            }
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                // Flush whatever the future queued (e.g. an RST or acks).
                if self.closed.is_none() {
                    let _ = Pin::new(&mut self.conn).poll(&mut cx);
                }
                return Ok(v);
            }
            if let Some(why) = &self.closed {
                return Err(Status::unavailable(why.clone()));
            }
            if !self.flag.0.load(Ordering::Acquire) {
                poll_once(&mut self.poll, &mut self.events, &self.flag, None)?;
            }
        }
    }

    fn request(&self, path: &str) -> Request<()> {
        Request::post(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(
                "user-agent",
                concat!("sluice-cli/", env!("CARGO_PKG_VERSION")),
            )
            .body(())
            .unwrap_or_default()
    }

    /// One unary call.
    pub fn unary<Req: Message, Resp: Message + Default>(
        &mut self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, Status> {
        let mut stream = self.open(path, Some(encode_message(req)), true)?;
        let first = self.next(&mut stream)?;
        let Some(body) = first else {
            return Err(Status::internal("empty response"));
        };
        Resp::decode(body).map_err(|e| Status::internal(format!("bad response: {e}")))
    }

    /// Opens a call, sending `first` (and ending the request when `end`).
    pub fn open(&mut self, path: &str, first: Option<Bytes>, end: bool) -> Result<Stream, Status> {
        let req = self.request(path);
        let send = self.send.clone();
        let (resp, mut send_stream) = self
            .block_on(async move {
                let mut send = send.ready().await?;
                send.send_request(req, false)
            })?
            .map_err(unavailable)?;
        if let Some(body) = first {
            send_stream.send_data(body, end).map_err(unavailable)?;
        } else if end {
            send_stream
                .send_data(Bytes::new(), true)
                .map_err(unavailable)?;
        }
        let resp = self.block_on(resp)?.map_err(unavailable)?;
        if let Some(status) = status_from(resp.headers()) {
            if status.code != Code::Ok {
                return Err(status);
            }
        }
        if resp.status() != http::StatusCode::OK {
            return Err(Status::new(
                Code::Unknown,
                format!("HTTP status {}", resp.status()),
            ));
        }
        Ok(Stream {
            send: send_stream,
            recv: resp.into_body(),
            decoder: MessageDecoder::new(64 << 20),
            trailers_seen: false,
        })
    }

    /// Sends one message on an open call.
    pub fn send<M: Message>(&mut self, stream: &mut Stream, m: &M) -> Result<(), Status> {
        stream
            .send
            .send_data(encode_message(m), false)
            .map_err(unavailable)?;
        // Let the connection write it out.
        self.block_on(std::future::ready(()))
    }

    /// The next message of a call; Ok(None) when it ended with status OK.
    pub fn next(&mut self, stream: &mut Stream) -> Result<Option<Bytes>, Status> {
        loop {
            match stream.decoder.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(Status::internal(format!("bad framing from server: {e:?}"))),
            }
            if stream.trailers_seen {
                return Ok(None);
            }
            let recv = &mut stream.recv;
            let chunk = self.block_on(std::future::poll_fn(|cx| recv.poll_data(cx)))?;
            match chunk {
                Some(Ok(data)) => {
                    let _ = stream.recv.flow_control().release_capacity(data.len());
                    let mut buf = BytesMut::new();
                    buf.extend_from_slice(&data);
                    stream.decoder.push(&buf);
                }
                Some(Err(e)) => return Err(unavailable(format!("stream failed: {e}"))),
                None => {
                    let recv = &mut stream.recv;
                    let trailers =
                        self.block_on(std::future::poll_fn(|cx| recv.poll_trailers(cx)))?;
                    stream.trailers_seen = true;
                    let trailers = trailers.map_err(unavailable)?.unwrap_or_default();
                    match status_from(&trailers) {
                        Some(s) if s.code != Code::Ok => return Err(s),
                        Some(_) => {}
                        None => return Err(Status::internal("response ended without grpc-status")),
                    }
                }
            }
        }
    }
}

fn poll_once(
    poll: &mut mio::Poll,
    events: &mut Events,
    flag: &Flag,
    timeout: Option<Duration>,
) -> Result<(), Status> {
    if flag.0.load(Ordering::Acquire) {
        return Ok(());
    }
    let wait = timeout.map_or(Duration::from_millis(500), |t| {
        t.min(Duration::from_millis(500))
    });
    match poll.poll(events, Some(wait)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
}
