//! `NatsClient`: one connection to a NATS server list, usable from any number
//! of threads. Owns the socket, a reader thread, the subscription table, the
//! pending-request table and reconnection. Calls `protocol` and `headers`
//! only (plus std, crossbeam-channel, log, uuid).
//!
//! Threads: the reader thread owns the socket's read side. It parses the
//! server's operations, answers PING, sends our liveness PINGs (one every
//! `ping_interval`; after `max_pings_out` unanswered the connection is dead),
//! delivers messages, and on any failure reconnects across the server list
//! with exponential backoff. Writers (publish, subscribe, request) share the
//! write side under a mutex, each operation written whole.
//!
//! Bounded memory: each subscription delivers into a bounded channel of
//! `Options::subscription_capacity` messages. When it is full the reader
//! never waits and never buffers: the subscription is dropped (UNSUB sent,
//! removed from the table) and its receiver, once drained, reports
//! `Error::SlowConsumer`. In-flight requests are capped at
//! `Options::max_pending_requests`. While disconnected, publish and request
//! fail at once with `Error::NotConnected`; nothing is queued. Core NATS is
//! at-most-once: messages sent while we were disconnected are not replayed.

use std::collections::HashMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use super::headers::Headers;
use super::protocol::{
    encode_connect, encode_publish, encode_sub, encode_unsub, ConnectInfo, EncodeError, Message,
    Parser, ProtocolError, ServerInfo, ServerOp, DEFAULT_MAX_CONTROL_LINE, PING, PONG,
};

/// Servers learned from INFO are capped so a hostile INFO cannot grow the list.
const MAX_SERVERS: usize = 64;
/// How often the reader thread wakes when the socket is quiet.
const READ_TICK: Duration = Duration::from_millis(100);

/// Connection settings. `Options::default()` suits tests and most uses.
#[derive(Clone, Debug)]
pub struct Options {
    /// Sent in CONNECT; shows in the server's monitoring.
    pub name: Option<String>,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
    /// Per TCP connect and for the INFO/CONNECT/PONG handshake.
    pub connect_timeout: Duration,
    /// Blocking writes give up after this long (the connection is then dropped).
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    /// Unanswered PINGs after which the connection is considered dead.
    pub max_pings_out: u32,
    /// First pause between reconnect rounds; doubles up to `reconnect_max_wait`.
    pub reconnect_initial_wait: Duration,
    pub reconnect_max_wait: Duration,
    /// Full passes over the server list before giving up (None: forever, until close).
    pub max_reconnect_rounds: Option<u32>,
    /// Messages buffered per subscription before it is dropped as a slow consumer.
    pub subscription_capacity: usize,
    pub max_pending_requests: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: None,
            user: None,
            pass: None,
            token: None,
            connect_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(2),
            max_pings_out: 2,
            reconnect_initial_wait: Duration::from_millis(50),
            reconnect_max_wait: Duration::from_secs(2),
            max_reconnect_rounds: None,
            subscription_capacity: 4096,
            max_pending_requests: 4096,
        }
    }
}

/// Everything the client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The URL list does not parse.
    BadUrl(String),
    /// No server of the list could be reached (last reason attached).
    Connect(String),
    /// The server refused our credentials (-ERR 'Authorization Violation').
    Authorization(String),
    /// The server sent something that is not the protocol.
    Protocol(String),
    /// Currently between connections; retry later.
    NotConnected,
    /// The connection dropped while a request waited for its reply.
    Disconnected,
    /// `close()` was called.
    Closed,
    Timeout,
    /// A request's subject has no subscribers (status 503).
    NoResponders,
    /// Headers plus payload exceed the server's max_payload.
    PayloadTooLarge {
        size: usize,
        limit: usize,
    },
    /// The subscription fell `subscription_capacity` messages behind and was dropped.
    SlowConsumer,
    TooManyPendingRequests,
    Encode(String),
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadUrl(u) => write!(f, "bad NATS url {u:?}"),
            Error::Connect(e) => write!(f, "no NATS server reachable: {e}"),
            Error::Authorization(e) => write!(f, "NATS authorization failed: {e}"),
            Error::Protocol(e) => write!(f, "NATS protocol error: {e}"),
            Error::NotConnected => f.write_str("not connected to NATS (reconnecting)"),
            Error::Disconnected => f.write_str("NATS connection lost while waiting for a reply"),
            Error::Closed => f.write_str("NATS client closed"),
            Error::Timeout => f.write_str("NATS request timed out"),
            Error::NoResponders => f.write_str("no responders for the NATS request subject"),
            Error::PayloadTooLarge { size, limit } => {
                write!(
                    f,
                    "NATS message of {size} bytes exceeds max_payload {limit}"
                )
            }
            Error::SlowConsumer => {
                f.write_str("subscription dropped: it fell too far behind (slow consumer)")
            }
            Error::TooManyPendingRequests => f.write_str("too many NATS requests in flight"),
            Error::Encode(e) => write!(f, "cannot encode NATS operation: {e}"),
            Error::Io(e) => write!(f, "NATS socket error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<EncodeError> for Error {
    fn from(e: EncodeError) -> Self {
        Error::Encode(e.to_string())
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// One server of the list: `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServerAddr(String);

/// Parses `nats://[user:pass@|token@]host:port[,host:port...]` (scheme optional).
fn parse_urls(urls: &str, options: &mut Options) -> Result<Vec<ServerAddr>, Error> {
    let mut servers = Vec::new();
    for part in urls.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let rest = part.strip_prefix("nats://").unwrap_or(part);
        let hostport = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                match cred.split_once(':') {
                    Some((u, p)) => {
                        options.user.get_or_insert_with(|| u.to_string());
                        options.pass.get_or_insert_with(|| p.to_string());
                    }
                    None => {
                        options.token.get_or_insert_with(|| cred.to_string());
                    }
                }
                hp
            }
            None => rest,
        };
        let hostport = hostport.trim_end_matches('/');
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:4222")
        };
        if hostport.starts_with(':') {
            return Err(Error::BadUrl(part.to_string()));
        }
        servers.push(ServerAddr(hostport));
    }
    if servers.is_empty() {
        return Err(Error::BadUrl(urls.to_string()));
    }
    Ok(servers)
}

struct SubEntry {
    subject: String,
    sender: Sender<Message>,
    slow: Arc<AtomicBool>,
}

struct Connection {
    writer: TcpStream,
    /// Operations a corked thread wrote, sent together by `uncork` (or when
    /// `CORK_FLUSH` bytes have gathered, or before that thread waits).
    corked: Vec<u8>,
}

/// Bytes gathered by a corked thread before they are sent anyway.
const CORK_FLUSH: usize = 64 * 1024;

thread_local! {
    /// Whether this thread's writes are being gathered (`NatsClient::cork`).
    static CORKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// State shared by the handle, the reader thread and subscriptions.
struct Shared {
    options: Options,
    servers: Mutex<Vec<ServerAddr>>,
    conn: Mutex<Option<Connection>>,
    info: Mutex<ServerInfo>,
    max_payload: AtomicUsize,
    subs: Mutex<HashMap<u64, SubEntry>>,
    pending: Mutex<HashMap<u64, Sender<Result<Message, Error>>>>,
    next_sid: AtomicU64,
    next_request: AtomicU64,
    inbox_prefix: String,
    inbox_sid: u64,
    closed: AtomicBool,
    /// Wakes a reconnect backoff early on close.
    wake: (Mutex<()>, Condvar),
    reconnects: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A live NATS connection (reconnecting underneath). Share it behind an `Arc`.
pub struct NatsClient {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// The handshake's result: the socket, its parser (holding any bytes read past
/// PONG) and INFO.
struct Handshake {
    stream: TcpStream,
    parser: Parser,
    info: ServerInfo,
    early_ops: Vec<ServerOp>,
}

fn io_err(e: std::io::Error) -> Error {
    Error::Io(e.to_string())
}

fn resolve(server: &ServerAddr) -> Result<Vec<SocketAddr>, Error> {
    server
        .0
        .to_socket_addrs()
        .map(|a| a.collect())
        .map_err(|e| Error::Connect(format!("{}: {e}", server.0)))
}

/// Reads one chunk into the parser; Ok(false) on timeout.
fn read_ops(
    stream: &mut TcpStream,
    parser: &mut Parser,
    buf: &mut [u8],
    out: &mut Vec<ServerOp>,
) -> Result<bool, Error> {
    match stream.read(buf) {
        Ok(0) => Err(Error::Io("connection closed by server".into())),
        Ok(n) => {
            parser.push(&buf[..n], out)?;
            Ok(true)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

fn is_auth_error(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("authorization") || t.contains("authentication")
}

/// TCP connect, INFO, CONNECT, PING, then wait for PONG (or -ERR).
fn handshake(server: &ServerAddr, options: &Options) -> Result<Handshake, Error> {
    let deadline = Instant::now() + options.connect_timeout;
    let mut last = Error::Connect(format!("{}: no address", server.0));
    let mut stream = None;
    for addr in resolve(server)? {
        match TcpStream::connect_timeout(&addr, options.connect_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Error::Connect(format!("{}: {e}", server.0)),
        }
    }
    let mut stream = stream.ok_or(last)?;
    stream.set_nodelay(true).map_err(io_err)?;
    stream
        .set_write_timeout(Some(options.write_timeout))
        .map_err(io_err)?;
    stream.set_read_timeout(Some(READ_TICK)).map_err(io_err)?;
    let mut parser = Parser::new(
        DEFAULT_MAX_CONTROL_LINE,
        super::protocol::DEFAULT_MAX_PAYLOAD,
    );
    let mut buf = vec![0u8; 16 * 1024];
    let mut ops = Vec::new();
    let mut info = None;
    let mut sent_connect = false;
    loop {
        if Instant::now() > deadline {
            return Err(Error::Connect(format!("{}: handshake timed out", server.0)));
        }
        read_ops(&mut stream, &mut parser, &mut buf, &mut ops)?;
        let mut drained = std::mem::take(&mut ops).into_iter();
        for op in drained.by_ref() {
            match op {
                ServerOp::Info(i) if info.is_none() => {
                    parser.set_max_payload(i.max_payload);
                    info = Some(*i);
                }
                ServerOp::Info(i) => info = Some(*i),
                ServerOp::Err(text) if is_auth_error(&text) => {
                    return Err(Error::Authorization(text))
                }
                ServerOp::Err(text) => return Err(Error::Connect(format!("{}: {text}", server.0))),
                ServerOp::Pong if sent_connect => {
                    let info = info
                        .take()
                        .ok_or_else(|| Error::Protocol("no INFO".into()))?;
                    return Ok(Handshake {
                        stream,
                        parser,
                        info,
                        early_ops: drained.collect(),
                    });
                }
                ServerOp::Ping => stream.write_all(PONG).map_err(io_err)?,
                _ if info.is_none() => {
                    return Err(Error::Protocol("server did not start with INFO".into()))
                }
                _ => {}
            }
        }
        if info.is_some() && !sent_connect {
            let connect = ConnectInfo::new(
                options.name.clone(),
                options.user.clone(),
                options.pass.clone(),
                options.token.clone(),
            );
            let mut out = Vec::new();
            encode_connect(&connect, &mut out)?;
            out.extend_from_slice(PING);
            stream.write_all(&out).map_err(io_err)?;
            sent_connect = true;
        }
    }
}

impl NatsClient {
    /// Connects to the first reachable server of `urls`
    /// (`nats://[user:pass@]host:port[,host:port...]`).
    pub fn connect(urls: &str, mut options: Options) -> Result<NatsClient, Error> {
        let servers = parse_urls(urls, &mut options)?;
        let inbox_prefix = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
        let shared = Arc::new(Shared {
            options,
            servers: Mutex::new(servers.clone()),
            conn: Mutex::new(None),
            info: Mutex::new(ServerInfo::default()),
            max_payload: AtomicUsize::new(super::protocol::DEFAULT_MAX_PAYLOAD),
            subs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(2),
            next_request: AtomicU64::new(1),
            inbox_prefix,
            inbox_sid: 1,
            closed: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            reconnects: AtomicU64::new(0),
        });
        let mut last = Error::Connect("empty server list".into());
        let mut connected = None;
        for (i, server) in servers.iter().enumerate() {
            match handshake(server, &shared.options) {
                Ok(h) => {
                    connected = Some((i, h));
                    break;
                }
                Err(e @ Error::Authorization(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        let (index, h) = connected.ok_or(last)?;
        let reader_stream = shared.install(h.stream, &h.info)?;
        let shared2 = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nats-reader".into())
            .spawn(move || {
                reader_loop(shared2, reader_stream, h.parser, h.early_ops, index);
            })
            .map_err(io_err)?;
        Ok(NatsClient {
            shared,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Publishes without waiting for anything (core NATS: at most once).
    pub fn publish(
        &self,
        subject: &str,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.shared.publish(subject, None, headers, payload)
    }

    /// Publishes with a reply subject.
    pub fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.shared.publish(subject, Some(reply), headers, payload)
    }

    /// Subscribes to `subject` (wildcards allowed). Survives reconnects.
    pub fn subscribe(&self, subject: &str) -> Result<Subscription, Error> {
        self.subscribe_queue(subject, None)
    }

    /// As `subscribe`, holding at most `capacity` messages (less than
    /// `Options::subscription_capacity` for a quiet subject saves memory).
    pub fn subscribe_with_capacity(
        &self,
        subject: &str,
        capacity: usize,
    ) -> Result<Subscription, Error> {
        self.subscribe_inner(subject, None, capacity)
    }

    /// Subscribes as a member of queue group `queue`.
    pub fn subscribe_queue(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, Error> {
        self.subscribe_inner(subject, queue, self.shared.options.subscription_capacity)
    }

    fn subscribe_inner(
        &self,
        subject: &str,
        queue: Option<&str>,
        capacity: usize,
    ) -> Result<Subscription, Error> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let sid = shared.next_sid.fetch_add(1, Ordering::SeqCst);
        let mut op = Vec::new();
        encode_sub(subject, queue, sid, &mut op)?;
        let (tx, rx) = bounded(capacity.max(1));
        let slow = Arc::new(AtomicBool::new(false));
        lock(&shared.subs).insert(
            sid,
            SubEntry {
                subject: subject.to_string(),
                sender: tx,
                slow: Arc::clone(&slow),
            },
        );
        // If not connected, the reconnect re-sends SUB for every table entry.
        // (A reconnect racing this write may send the same SUB twice; the
        // server keeps one subscription per sid.)
        match shared.write(&op) {
            Ok(()) | Err(Error::NotConnected) => {}
            Err(e) => {
                lock(&shared.subs).remove(&sid);
                return Err(e);
            }
        }
        Ok(Subscription {
            shared: Arc::clone(shared),
            sid,
            receiver: rx,
            slow,
        })
    }

    /// Sends a request and waits up to `timeout` for the first reply. A 503
    /// status reply is `Error::NoResponders`.
    pub fn request(
        &self,
        subject: &str,
        headers: Option<&Headers>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Message, Error> {
        self.request_start(subject, headers, payload)?.wait(timeout)
    }

    /// From now on this thread's publishes and requests are gathered and
    /// sent together by `uncork` (one write for many operations); a wait
    /// for a reply on this thread sends them first.
    pub fn cork(&self) {
        CORKED.with(|c| c.set(true));
    }

    /// Sends what this thread gathered since `cork`, and stops gathering.
    pub fn uncork(&self) -> Result<(), Error> {
        CORKED.with(|c| c.set(false));
        self.shared.flush_corked()
    }

    /// Sends a request without waiting: the reply is collected later with
    /// `PendingReply::wait`, so many requests can be in flight on one
    /// connection (pipelining). Counts against `max_pending_requests` until
    /// the handle is waited on or dropped.
    pub fn request_start(
        &self,
        subject: &str,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Result<PendingReply, Error> {
        let shared = &self.shared;
        let id = shared.next_request.fetch_add(1, Ordering::SeqCst);
        let reply = format!("{}.{id}", shared.inbox_prefix);
        let (tx, rx) = bounded(1);
        {
            let mut pending = lock(&shared.pending);
            if pending.len() >= shared.options.max_pending_requests {
                return Err(Error::TooManyPendingRequests);
            }
            pending.insert(id, tx);
        }
        if let Err(e) = shared.publish(subject, Some(&reply), headers, payload) {
            lock(&shared.pending).remove(&id);
            return Err(e);
        }
        Ok(PendingReply {
            shared: Arc::clone(shared),
            id,
            receiver: rx,
        })
    }

    /// A fresh subject under this connection's private prefix, for replies
    /// that come as a stream of messages (subscribe to it before use).
    pub fn new_inbox(&self) -> String {
        let id = self.shared.next_request.fetch_add(1, Ordering::SeqCst);
        format!("{}.s.{id}", self.shared.inbox_prefix)
    }

    /// Round trip to the server: every operation sent before has been processed.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        // A request to our own inbox answers itself: PUB then MSG back,
        // in order after everything written before.
        let shared = &self.shared;
        let id = shared.next_request.fetch_add(1, Ordering::SeqCst);
        let reply = format!("{}.{id}", shared.inbox_prefix);
        let (tx, rx) = bounded(1);
        lock(&shared.pending).insert(id, tx);
        let sent = shared.publish(&reply, None, None, b"");
        shared.flush_before_wait();
        let result = sent.and_then(|()| match rx.recv_timeout(timeout) {
            Ok(r) => r.map(|_| ()),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected),
        });
        lock(&shared.pending).remove(&id);
        result
    }

    /// The INFO of the server we are (or were last) connected to.
    pub fn server_info(&self) -> ServerInfo {
        lock(&self.shared.info).clone()
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.shared.conn).is_some()
    }

    /// Waits until connected (e.g. after a reconnect), up to `timeout`.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.is_connected() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.is_connected()
    }

    /// Messages a subscription buffers before it is dropped as a slow consumer.
    pub fn subscription_capacity(&self) -> usize {
        self.shared.options.subscription_capacity.max(1)
    }

    /// How many times the connection was re-established.
    pub fn reconnect_count(&self) -> u64 {
        self.shared.reconnects.load(Ordering::SeqCst)
    }

    /// Closes the connection and stops the reader thread. Pending requests
    /// fail with `Error::Closed`; subscriptions end.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        {
            // Under the lock, so a backoff pause cannot miss the wake-up.
            let _guard = lock(&self.shared.wake.0);
            self.shared.wake.1.notify_all();
        }
        if let Some(c) = lock(&self.shared.conn).take() {
            let _ = c.writer.shutdown(Shutdown::Both);
        }
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
        self.shared.fail_pending(Error::Closed);
        lock(&self.shared.subs).clear();
    }
}

impl Drop for NatsClient {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// Makes `stream` the live connection: subscribes the inbox, re-sends
    /// SUB for every live subscription, and returns the read side.
    fn install(&self, stream: TcpStream, info: &ServerInfo) -> Result<TcpStream, Error> {
        let reader = stream.try_clone().map_err(io_err)?;
        if info.max_payload > 0 {
            self.max_payload.store(info.max_payload, Ordering::SeqCst);
        }
        *lock(&self.info) = info.clone();
        self.learn_servers(info);
        let mut ops = Vec::new();
        encode_sub(
            &format!("{}.*", self.inbox_prefix),
            None,
            self.inbox_sid,
            &mut ops,
        )?;
        for (sid, entry) in lock(&self.subs).iter() {
            encode_sub(&entry.subject, None, *sid, &mut ops)?;
        }
        let mut conn = lock(&self.conn);
        let mut writer = stream;
        writer.write_all(&ops).map_err(io_err)?;
        *conn = Some(Connection {
            writer,
            corked: Vec::new(),
        });
        Ok(reader)
    }

    fn learn_servers(&self, info: &ServerInfo) {
        let mut servers = lock(&self.servers);
        for url in &info.connect_urls {
            let addr = ServerAddr(url.clone());
            if servers.len() < MAX_SERVERS && !servers.contains(&addr) {
                servers.push(addr);
            }
        }
    }

    /// Writes one whole operation; a failed write drops the connection (the
    /// reader thread then reconnects).
    fn write(&self, bytes: &[u8]) -> Result<(), Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.on_connection(|c| {
            if !CORKED.with(std::cell::Cell::get) {
                return c.writer.write_all(bytes);
            }
            // Whole operations only, so other threads' direct writes may go
            // between them.
            c.corked.extend_from_slice(bytes);
            if c.corked.len() < CORK_FLUSH {
                return Ok(());
            }
            let out = std::mem::take(&mut c.corked);
            c.writer.write_all(&out)
        })
    }

    /// Sends what a corked thread gathered.
    fn flush_corked(&self) -> Result<(), Error> {
        self.on_connection(|c| {
            let out = std::mem::take(&mut c.corked);
            if out.is_empty() {
                return Ok(());
            }
            c.writer.write_all(&out)
        })
    }

    /// Runs a write on the current connection; one that fails drops the
    /// connection (the reader thread then reconnects).
    fn on_connection(
        &self,
        write: impl FnOnce(&mut Connection) -> std::io::Result<()>,
    ) -> Result<(), Error> {
        let mut conn = lock(&self.conn);
        let Some(c) = conn.as_mut() else {
            return Err(Error::NotConnected);
        };
        if let Err(e) = write(c) {
            let _ = c.writer.shutdown(Shutdown::Both);
            *conn = None;
            return Err(io_err(e));
        }
        Ok(())
    }

    /// Before this thread blocks on a reply: send what it gathered.
    fn flush_before_wait(&self) {
        if CORKED.with(std::cell::Cell::get) {
            let _ = self.flush_corked();
        }
    }

    fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Result<(), Error> {
        let mut op = Vec::with_capacity(payload.len() + 256);
        let size = encode_publish(subject, reply, headers, payload, &mut op)?;
        let limit = self.max_payload.load(Ordering::SeqCst);
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        self.write(&op)
    }

    fn fail_pending(&self, error: Error) {
        for (_, tx) in lock(&self.pending).drain() {
            let _ = tx.try_send(Err(error.clone()));
        }
    }

    /// Delivers one MSG/HMSG to its request or subscription.
    fn dispatch(&self, msg: Message) {
        if msg.sid == self.inbox_sid {
            let id = msg
                .subject
                .strip_prefix(&self.inbox_prefix)
                .and_then(|s| s.strip_prefix('.'))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(tx) = id.and_then(|id| lock(&self.pending).remove(&id)) {
                let _ = tx.try_send(Ok(msg));
            }
            return;
        }
        let mut subs = lock(&self.subs);
        let sid = msg.sid;
        let Some(entry) = subs.get(&sid) else {
            return; // UNSUB raced with delivery.
        };
        match entry.sender.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                log::error!(
                    "NATS subscription {sid} on {:?} is {} messages behind: dropping it (slow consumer)",
                    entry.subject,
                    self.options.subscription_capacity
                );
                entry.slow.store(true, Ordering::SeqCst);
                subs.remove(&sid);
                drop(subs);
                let mut op = Vec::new();
                encode_unsub(sid, None, &mut op);
                let _ = self.write(&op);
            }
            Err(TrySendError::Disconnected(_)) => {
                subs.remove(&sid);
            }
        }
    }

    /// Sleeps up to `d`, returning early on close.
    fn pause(&self, d: Duration) {
        let guard = lock(&self.wake.0);
        if !self.closed.load(Ordering::SeqCst) {
            let _ = self.wake.1.wait_timeout(guard, d);
        }
    }

    /// Tries every server, starting after `from`, with backoff between full
    /// rounds. None when closed or out of rounds.
    fn reconnect(&self, from: usize) -> Option<(usize, Handshake)> {
        let mut wait = self.options.reconnect_initial_wait;
        let mut round = 0u32;
        loop {
            let servers = lock(&self.servers).clone();
            for k in 1..=servers.len() {
                if self.closed.load(Ordering::SeqCst) {
                    return None;
                }
                let i = (from + k) % servers.len();
                match handshake(&servers[i], &self.options) {
                    Ok(h) => return Some((i, h)),
                    Err(e) => log::debug!("NATS reconnect to {} failed: {e}", servers[i].0),
                }
            }
            round += 1;
            if self
                .options
                .max_reconnect_rounds
                .is_some_and(|m| round >= m)
            {
                log::error!("NATS: giving up after {round} reconnect rounds");
                return None;
            }
            self.pause(wait);
            wait = (wait * 2).min(self.options.reconnect_max_wait);
        }
    }

    /// Drops the live connection and fails whatever waited on it.
    fn disconnect(&self, why: &Error) {
        if let Some(c) = lock(&self.conn).take() {
            let _ = c.writer.shutdown(Shutdown::Both);
        }
        if !self.closed.load(Ordering::SeqCst) {
            log::warn!("NATS connection lost: {why}; reconnecting");
        }
        self.fail_pending(Error::Disconnected);
    }
}

/// Serves one connection until it fails; returns the reason.
fn serve_connection(
    shared: &Shared,
    stream: &mut TcpStream,
    parser: &mut Parser,
    mut ops: Vec<ServerOp>,
) -> Error {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pings_out = 0u32;
    let mut next_ping = Instant::now() + shared.options.ping_interval;
    loop {
        for op in ops.drain(..) {
            match op {
                ServerOp::Msg(m) => shared.dispatch(m),
                ServerOp::Ping => {
                    if let Err(e) = shared.write(PONG) {
                        return e;
                    }
                }
                ServerOp::Pong => pings_out = 0,
                ServerOp::Ok => {}
                ServerOp::Info(info) => {
                    parser.set_max_payload(info.max_payload);
                    if info.max_payload > 0 {
                        shared.max_payload.store(info.max_payload, Ordering::SeqCst);
                    }
                    shared.learn_servers(&info);
                }
                ServerOp::Err(text) => {
                    log::error!("NATS server error: {text}");
                    if is_auth_error(&text) {
                        return Error::Authorization(text);
                    }
                }
            }
        }
        if shared.closed.load(Ordering::SeqCst) {
            return Error::Closed;
        }
        if lock(&shared.conn).is_none() {
            return Error::Io("write side failed".into());
        }
        let now = Instant::now();
        if now >= next_ping {
            if pings_out >= shared.options.max_pings_out {
                return Error::Io(format!("{pings_out} PINGs unanswered: connection is stale"));
            }
            if let Err(e) = shared.write(PING) {
                return e;
            }
            pings_out += 1;
            next_ping = now + shared.options.ping_interval;
        }
        if let Err(e) = read_ops(stream, parser, &mut buf, &mut ops) {
            return e;
        }
    }
}

fn reader_loop(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    mut parser: Parser,
    early_ops: Vec<ServerOp>,
    mut index: usize,
) {
    let mut ops = early_ops;
    loop {
        let why = serve_connection(&shared, &mut stream, &mut parser, std::mem::take(&mut ops));
        shared.disconnect(&why);
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let Some((i, h)) = shared.reconnect(index) else {
                shared.closed.store(true, Ordering::SeqCst);
                shared.fail_pending(Error::Closed);
                lock(&shared.subs).clear();
                return;
            };
            index = i;
            match shared.install(h.stream, &h.info) {
                Ok(s) => {
                    stream = s;
                    parser = h.parser;
                    ops = h.early_ops;
                    shared.reconnects.fetch_add(1, Ordering::SeqCst);
                    log::info!("NATS reconnected to {}", h.info.server_name);
                    break;
                }
                Err(e) => log::warn!("NATS reconnect could not resubscribe: {e}"),
            }
        }
    }
}

/// A request sent by `NatsClient::request_start` whose single reply has not
/// been collected yet. Dropping it forgets the request (a late reply is ignored).
pub struct PendingReply {
    shared: Arc<Shared>,
    id: u64,
    receiver: Receiver<Result<Message, Error>>,
}

impl PendingReply {
    /// True once the reply (or the connection's loss) has arrived: `wait`
    /// then returns at once.
    pub fn is_ready(&self) -> bool {
        !self.receiver.is_empty()
    }

    /// The channel the reply arrives on, to wait for several things at once
    /// (`crossbeam_channel::Select`); take the reply with `wait`.
    pub fn receiver(&self) -> &Receiver<Result<Message, Error>> {
        &self.receiver
    }

    /// Waits up to `timeout` for the reply. A 503 status reply is `Error::NoResponders`.
    pub fn wait(self, timeout: Duration) -> Result<Message, Error> {
        self.shared.flush_before_wait();
        let result = match self.receiver.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected),
        };
        let msg = result?;
        if msg.headers.as_ref().is_some_and(Headers::is_no_responders) {
            return Err(Error::NoResponders);
        }
        Ok(msg)
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.id);
    }
}

/// A subscription's receiving end. Dropping it unsubscribes.
pub struct Subscription {
    shared: Arc<Shared>,
    sid: u64,
    receiver: Receiver<Message>,
    slow: Arc<AtomicBool>,
}

impl Subscription {
    /// The next message, waiting up to `timeout`. `Error::SlowConsumer` once
    /// a dropped slow subscription is drained; `Error::Closed` when the client closed.
    pub fn next_timeout(&self, timeout: Duration) -> Result<Message, Error> {
        self.shared.flush_before_wait();
        match self.receiver.recv_timeout(timeout) {
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(self.ended()),
        }
    }

    /// The next message if one is buffered.
    pub fn try_next(&self) -> Result<Option<Message>, Error> {
        match self.receiver.try_recv() {
            Ok(m) => Ok(Some(m)),
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(self.ended()),
        }
    }

    /// The channel, for `crossbeam_channel::select!` across subscriptions.
    pub fn receiver(&self) -> &Receiver<Message> {
        &self.receiver
    }

    fn ended(&self) -> Error {
        if self.slow.load(Ordering::SeqCst) {
            Error::SlowConsumer
        } else {
            Error::Closed
        }
    }

    pub fn sid(&self) -> u64 {
        self.sid
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if lock(&self.shared.subs).remove(&self.sid).is_some() {
            let mut op = Vec::new();
            encode_unsub(self.sid, None, &mut op);
            let _ = self.shared.write(&op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_lists_and_credentials() {
        let mut o = Options::default();
        let s = parse_urls("nats://u:p@127.0.0.1:4222, nats://h2:5000,h3", &mut o).unwrap();
        assert_eq!(
            s,
            vec![
                ServerAddr("127.0.0.1:4222".into()),
                ServerAddr("h2:5000".into()),
                ServerAddr("h3:4222".into())
            ]
        );
        assert_eq!(o.user.as_deref(), Some("u"));
        assert_eq!(o.pass.as_deref(), Some("p"));
        let mut o = Options::default();
        parse_urls("nats://sekrit@h:1", &mut o).unwrap();
        assert_eq!(o.token.as_deref(), Some("sekrit"));
        assert!(parse_urls(" , ", &mut Options::default()).is_err());
    }

    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A scripted server: accepts one connection, sends INFO, answers the
    /// handshake's PING, then hands the socket to `script`.
    fn fake_server(
        script: impl FnOnce(BufReader<TcpStream>, TcpStream) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"INFO {\"server_id\":\"fake\",\"max_payload\":1024,\"headers\":true}\r\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                if line.trim() == "PING" {
                    break;
                }
                line.clear();
            }
            script(r, s);
            // Keep the listener (so reconnects hang in the handshake, bounded).
            std::thread::sleep(Duration::from_millis(500));
            drop(listener);
        });
        (url, t)
    }

    fn fast_options() -> Options {
        Options {
            connect_timeout: Duration::from_millis(300),
            ping_interval: Duration::from_millis(100),
            max_pings_out: 2,
            max_reconnect_rounds: Some(1),
            reconnect_initial_wait: Duration::from_millis(10),
            ..Options::default()
        }
    }

    #[test]
    fn authorization_violation_fails_connect() {
        let (url, t) = fake_server(|_, mut s| {
            s.write_all(b"-ERR 'Authorization Violation'\r\n").unwrap();
        });
        match NatsClient::connect(&url, fast_options()) {
            Err(Error::Authorization(text)) => assert!(text.contains("Authorization")),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("connected despite -ERR"),
        }
        t.join().unwrap();
    }

    #[test]
    fn silent_server_is_stale_and_fails_pending_requests() {
        let (url, t) = fake_server(|mut r, mut s| {
            s.write_all(b"PONG\r\n").unwrap();
            // Read everything, answer nothing (no PONG to our PINGs).
            let mut line = String::new();
            let until = Instant::now() + Duration::from_secs(3);
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            while Instant::now() < until {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    _ => continue,
                }
            }
        });
        let client = NatsClient::connect(&url, fast_options()).unwrap();
        assert_eq!(client.server_info().max_payload, 1024);
        assert!(matches!(
            client.publish("x", None, &[0u8; 1025]),
            Err(Error::PayloadTooLarge {
                size: 1025,
                limit: 1024
            })
        ));
        let started = Instant::now();
        let err = client
            .request("svc", None, b"", Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err, Error::Disconnected);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        client.close();
        t.join().unwrap();
    }

    #[test]
    fn full_subscription_is_dropped_as_slow_consumer() {
        let (url, t) = fake_server(|mut r, mut s| {
            s.write_all(b"PONG\r\n").unwrap();
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                if line.starts_with("SUB slow ") {
                    break;
                }
            }
            let sid = line.trim().rsplit(' ').next().unwrap().to_string();
            for i in 0..5 {
                s.write_all(format!("MSG slow {sid} 1\r\n{i}\r\n").as_bytes())
                    .unwrap();
            }
            // Expect our UNSUB for it.
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 {
                    panic!("no UNSUB");
                }
                if line.trim() == format!("UNSUB {sid}") {
                    return;
                }
            }
        });
        let client = NatsClient::connect(
            &url,
            Options {
                subscription_capacity: 2,
                ..fast_options()
            },
        )
        .unwrap();
        let sub = client.subscribe("slow").unwrap();
        t.join().unwrap();
        assert_eq!(
            sub.next_timeout(Duration::from_secs(1)).unwrap().payload,
            b"0"
        );
        assert_eq!(
            sub.next_timeout(Duration::from_secs(1)).unwrap().payload,
            b"1"
        );
        assert_eq!(
            sub.next_timeout(Duration::from_secs(1)).unwrap_err(),
            Error::SlowConsumer
        );
    }

    #[test]
    fn unreachable_server_fails_connect() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let o = Options {
            connect_timeout: Duration::from_millis(300),
            ..Options::default()
        };
        match NatsClient::connect(&format!("nats://127.0.0.1:{port}"), o) {
            Err(Error::Connect(_)) => {}
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
