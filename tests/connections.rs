//! Hostile clients cannot exhaust the broker's connections (issue 10): idle
//! connections are closed, a full server makes room by closing the
//! longest-idle one, one peer IP cannot take every slot, running out of file
//! descriptors does not stop accepting for good, and closed connections
//! leave no timers behind.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use sluice::proto;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

/// A bare HTTP/2 client over a blocking socket: it does the handshake and
/// then only answers SETTINGS and PINGs; it never opens a stream.
struct RawPeer {
    sock: TcpStream,
}

/// What a raw peer saw before its connection ended.
#[derive(Debug)]
struct Ending {
    /// The error code of the last GOAWAY received.
    goaway: Option<u32>,
    /// When the server closed the socket (None: still open at the limit).
    closed_at: Option<Instant>,
}

impl RawPeer {
    /// Connects and sends the client preface and an empty SETTINGS.
    fn connect(port: u16) -> RawPeer {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.write_all(PREFACE).unwrap();
        write_frame(&mut sock, SETTINGS, 0, &[]);
        RawPeer { sock }
    }

    /// Waits for the server's first frame (its SETTINGS): the server has
    /// accepted this connection and is serving it.
    fn served(&mut self, limit: Duration) -> bool {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut header = [0u8; 9];
        self.sock.read_exact(&mut header).is_ok() && header[3] == SETTINGS
    }

    /// Plays a well-behaved idle peer (acks SETTINGS, answers PINGs) until
    /// the server closes the connection or `limit` passes.
    fn idle_until_closed(&mut self, limit: Duration) -> Ending {
        let deadline = Instant::now() + limit;
        let mut goaway = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ending {
                    goaway,
                    closed_at: None,
                };
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let Some((kind, flags, payload)) = read_frame(&mut self.sock) else {
                return Ending {
                    goaway,
                    closed_at: Some(Instant::now()),
                };
            };
            match kind {
                SETTINGS if flags & ACK == 0 => write_frame(&mut self.sock, SETTINGS, ACK, &[]),
                PING if flags & ACK == 0 => write_frame(&mut self.sock, PING, ACK, &payload),
                GOAWAY if payload.len() >= 8 => {
                    goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]))
                }
                _ => {}
            }
        }
    }

    /// True if the server closes the socket within `limit`.
    fn closed_within(&mut self, limit: Duration) -> bool {
        closed_within(&mut self.sock, limit)
    }
}

fn write_frame(sock: &mut TcpStream, kind: u8, flags: u8, payload: &[u8]) {
    let len = payload.len() as u32;
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    // The server may already have closed: that shows up on the next read.
    let _ = sock.write_all(&frame);
}

/// One frame (type, flags, payload); None on EOF, reset or timeout.
fn read_frame(sock: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    sock.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload).ok()?;
    Some((header[3], header[4], payload))
}

/// True if the peer closes (EOF or reset) within `limit`; data is skipped.
fn closed_within(sock: &mut TcpStream, limit: Duration) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
    false
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn an_idle_connection_gets_goaway_and_one_with_a_stream_is_kept() {
    let server = Server::start_with(&[
        "--max-connection-idle",
        "1s",
        "--log-level",
        "info,sluice=debug",
    ]);
    let mut subscriber = server.client().await;
    let mut sub = subscriber
        .subscribe("t", "g", proto::InitialPosition::Latest)
        .await;
    sub.send(credit(1)).await;
    let stream_opened = Instant::now();

    let port = server.port;
    let (ending, idle_for) = tokio::task::spawn_blocking(move || {
        let mut peer = RawPeer::connect(port);
        let start = Instant::now();
        let ending = peer.idle_until_closed(Duration::from_secs(5));
        let idle_for = ending.closed_at.map(|at| at - start);
        (ending, idle_for)
    })
    .await
    .unwrap();
    assert_eq!(ending.goaway, Some(0), "GOAWAY (NO_ERROR): {ending:?}");
    let idle_for = idle_for.expect("the idle connection was closed");
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for <= Duration::from_millis(2500),
        "closed after {idle_for:?}"
    );

    // The subscriber's connection, idle but for its stream, outlives two
    // idle periods and still delivers.
    let wait = Duration::from_millis(2500).saturating_sub(stream_opened.elapsed());
    tokio::time::sleep(wait).await;
    let log = server.log_text();
    assert_eq!(count(&log, "sending GOAWAY"), 1, "{log}");
    let mut publisher = server.client().await;
    publisher.publish("t", b"still here").await.unwrap();
    assert_eq!(
        sub.delivery(Duration::from_secs(5)).await.payload.as_ref(),
        b"still here"
    );
}

#[tokio::test]
async fn an_idle_peer_that_ignores_goaway_is_dropped() {
    let server = Server::start_with(&["--max-connection-idle", "1s", "--keepalive-timeout", "1s"]);
    let port = server.port;
    let (closed, took) = tokio::task::spawn_blocking(move || {
        // Handshakes, then never reads: the GOAWAY's PING goes unanswered.
        let mut mute = RawPeer::connect(port);
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let closed = mute.closed_within(Duration::from_secs(3));
        (closed, start.elapsed())
    })
    .await
    .unwrap();
    assert!(closed, "still open after {took:?}");
    assert!(took < Duration::from_millis(3500), "closed after {took:?}");
}

#[tokio::test]
async fn a_full_server_closes_the_longest_idle_connection_to_admit_a_new_one() {
    let server = Server::start_with(&["--max-connections", "5"]);
    let port = server.port;
    let mut idle = tokio::task::spawn_blocking(move || {
        let mut peers = Vec::new();
        for _ in 0..5 {
            let mut p = RawPeer::connect(port);
            assert!(p.served(Duration::from_secs(5)), "idle peer not served");
            peers.push(p);
        }
        peers
    })
    .await
    .unwrap();

    let mut c = tokio::time::timeout(Duration::from_secs(5), server.client())
        .await
        .expect("a new client is admitted");
    c.publish("t", b"admitted").await.unwrap();

    // Exactly one idle peer made room: the oldest.
    let closed = tokio::task::spawn_blocking(move || {
        idle.iter_mut()
            .map(|p| p.closed_within(Duration::from_millis(300)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(closed, [true, false, false, false, false]);
}

#[tokio::test]
async fn connections_past_the_per_ip_limit_are_refused() {
    let server = Server::start_with(&["--max-connections-per-ip", "3"]);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = server.client().await;
        c.publish("t", format!("{i}").as_bytes()).await.unwrap();
        clients.push(c);
    }
    let port = server.port;
    let refused = tokio::task::spawn_blocking(move || {
        let mut fourth = RawPeer::connect(port);
        fourth.closed_within(Duration::from_secs(2))
    })
    .await
    .unwrap();
    assert!(refused, "the 4th connection from 127.0.0.1 is closed");
    for c in &mut clients {
        c.publish("t", b"still served").await.unwrap();
    }
    let log = server.log_text();
    assert_eq!(
        count(&log, "--max-connections-per-ip (3) reached"),
        1,
        "{log}"
    );

    // A slot given back is usable again (once the server has seen the close).
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = server.client().await;
        match again.publish("t", b"again").await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no connection admitted after one closed: {e:?}"),
        }
    }
}

#[tokio::test]
async fn accept_recovers_after_running_out_of_file_descriptors() {
    let server = Server::start();
    let mut warm = server.client().await;
    warm.publish("t", b"warm").await.unwrap();
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Leave the daemon 8 spare descriptors.
    let pid = server.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (null old-limit pointer).
    let rc = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &limit as *const libc::rlimit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    // Far more connections than it has descriptors for; then all gone.
    let port = server.port;
    tokio::task::spawn_blocking(move || {
        let flood: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        drop(flood);
    })
    .await
    .unwrap();

    let start = Instant::now();
    let published = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = server.client().await;
        c.publish("t", b"after EMFILE").await
    })
    .await;
    let log = server.log_text();
    assert!(
        matches!(published, Ok(Ok(_))),
        "{published:?} after {:?}\n{log}",
        start.elapsed()
    );
    assert!(count(&log, "accept failed") >= 1, "{log}");
}

#[tokio::test]
async fn closed_connections_leave_no_timers_behind() {
    let server = Server::start_with(&["--log-level", "info,sluice=debug"]);
    let port = server.port;
    tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            let mut p = RawPeer::connect(port);
            assert!(p.served(Duration::from_secs(5)));
        }
    })
    .await
    .unwrap();
    // Each close logs how many timers are still pending.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = server.log_text();
        if count(&log, ": closed (") >= 50 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pending: Vec<usize> = log
        .lines()
        .filter_map(|l| {
            l.split(" timers pending")
                .next()?
                .rsplit(", ")
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(pending.len(), 50, "{log}");
    // Connections overlap a little as they close, but their checks go with them.
    assert!(pending.iter().all(|&n| n <= 5), "{pending:?}");
}
