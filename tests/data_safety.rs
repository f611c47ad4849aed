//! Data safety (issue 9): one daemon per data dir, capped batches, loud
//! storage failure, writes drained at shutdown, sequences never reused after
//! a lost tail, damaged pages, read-only files, bounded logs, check and
//! backup. Each test starts the real daemon and counts what it finds.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::uri::PathAndQuery;
use sluice::proto::{self, health};
use tonic::{Code, Request};
use tonic_prost::ProstCodec;

/// Runs `sluice serve` expecting it to exit by itself within 10 s (else it
/// is killed); (exit code, stderr).
fn serve_expecting_exit(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    run_bounded(Command::new(BIN).args(&all).envs(envs.iter().copied()))
}

/// `program prefix... args...`, bounded like `serve_expecting_exit`.
fn serve_as(program: &str, prefix: &[&str], args: &[&str]) -> (Option<i32>, String) {
    run_bounded(Command::new(program).args(prefix).args(args))
}

fn run_bounded(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "still running after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("sluice.db")).unwrap()
}

fn stored_cursor(dir: &Path, topic: &str, group: &str) -> Option<u64> {
    db(dir)
        .query_row(
            "SELECT c.seq FROM cursors c JOIN topics t ON t.id = c.topic_id WHERE t.name = ?1 AND c.grp = ?2",
            [topic, group],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|s| s as u64)
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_or_port_exits_before_touching_the_database() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"one").await.unwrap();
    let canonical = server.dir.canonicalize().unwrap();

    // The same dir, by its own path and through a symlink.
    let link = server.dir.with_extension("via-link");
    std::os::unix::fs::symlink(&server.dir, &link).unwrap();
    for dir in [server.dir.clone(), link.clone()] {
        let (code, err) =
            serve_expecting_exit(&["--port", "0", "--data-dir", dir.to_str().unwrap()], &[]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(&canonical.display().to_string()), "{err}");
        assert!(err.contains(&format!("pid {}", server.pid())), "{err}");
    }
    let _ = std::fs::remove_file(&link);

    // The same port, another dir: nothing is created in that dir.
    let other = tempfile::tempdir().unwrap();
    let (code, err) = serve_expecting_exit(
        &[
            "--port",
            &server.port.to_string(),
            "--data-dir",
            other.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!other.path().join("sluice.db").exists());

    // The first daemon still serves, its sequences unshared.
    let r = c.publish("t", b"two").await.unwrap();
    assert_eq!(r.sequence, 2);
}

#[tokio::test]
async fn batch_publish_over_the_cap_is_refused_before_anything_is_stored() {
    let _heavy = serial().await;
    let server = Server::start();
    let mut c = server.client().await;
    let one = [b"x".as_slice(); 10_001];
    let err = c.batch_publish("big", &one).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("--max-batch-messages"), "{err:?}");
    assert!(c.list_topics().await.unwrap().topics.is_empty());
    // The largest accepted batch gets a reply a default client can receive.
    let r = c.batch_publish("big", &one[..10_000]).await.unwrap();
    assert_eq!(r.results.len(), 10_000);
    assert_eq!(r.results.last().unwrap().sequence, 10_000);

    let small = Server::start_with(&["--max-batch-messages", "5"]);
    let mut c = small.client().await;
    let err = c.batch_publish("b", &one[..6]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        c.batch_publish("b", &one[..5]).await.unwrap().results.len(),
        5
    );
}

#[tokio::test]
async fn a_dead_writer_fails_calls_unavailable_reports_not_serving_and_exits_non_zero() {
    // The writer thread panics on its third batch.
    let mut server = Server::start_with_env(&[], &[("SLUICE_FAILPOINT", "writer-panic:3")]);
    let mut c = server.client().await;
    let mut watch = c.health_watch().await;
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1); // SERVING
    c.publish("t", b"1").await.unwrap();
    c.publish("t", b"2").await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), c.publish("t", b"3"))
        .await
        .expect("the call is answered, not parked forever")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("storage"), "{err:?}");
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("health changes at once");
    assert_eq!(next.unwrap().unwrap().status, 2, "NOT_SERVING");
    let code = server.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    let log = server.log_text();
    assert_eq!(log.matches("storage failed").count(), 1, "{log}");
    // What was acknowledged is there after a restart.
    server.spawn(0);
    let mut c = server.client().await;
    let r = c.publish("t", b"4").await.unwrap();
    assert!(r.sequence > 2);
}

#[tokio::test]
async fn a_dead_reader_ends_streams_unavailable_and_exits_non_zero() {
    let mut server = Server::start_with_env(&[], &[("SLUICE_FAILPOINT", "reader-panic:1")]);
    let mut c = server.client().await;
    let payloads: Vec<Vec<u8>> = (0..3000).map(|i| format!("m{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    c.batch_publish("t", &refs).await.unwrap();
    // Older than the in-memory tail: the first read goes to the reader.
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    let end = loop {
        match sub.next_within(Duration::from_secs(5)).await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => break s,
            None => panic!("the stream neither failed nor ended"),
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let code = server.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_right_after_acks_keeps_every_acked_cursor_on_disk() {
    let _heavy = serial().await;
    for round in 0..3 {
        // A short grace: the reactor stops while the writer still has a queue.
        let mut server = Server::start_with(&["--shutdown-grace", "10ms"]);
        let mut c = server.client().await;
        for i in 0..100 {
            c.publish("t", format!("{i}").as_bytes()).await.unwrap();
        }
        let mut sub = c
            .subscribe("t", "g", proto::InitialPosition::Earliest)
            .await;
        sub.send(credit(100)).await;
        let mut last = None;
        for _ in 0..100 {
            last = Some(sub.delivery(Duration::from_secs(5)).await);
        }
        let last = last.unwrap();
        // Publishers queue large batches so the writer has a backlog when the
        // ack's cursor write arrives; they vanish at the signal.
        let mut flood = Vec::new();
        for _ in 0..6 {
            let url = server.url();
            flood.push(tokio::spawn(async move {
                let mut p = Client::connect(&url).await;
                let body = vec![7u8; 2048];
                let batch: Vec<&[u8]> = (0..1700).map(|_| body.as_slice()).collect();
                while p.batch_publish("flood", &batch).await.is_ok() {}
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        sub.send(ack(&last.message_id)).await;
        // The broker has taken the ack (stats read its memory)...
        wait_for_cursor(&mut c, "t", "g", last.sequence).await;
        // ...and stops at once.
        server.signal(15);
        assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
        for f in &flood {
            f.abort();
        }
        assert_eq!(
            stored_cursor(&server.dir, "t", "g"),
            Some(last.sequence),
            "round {round}: the acked cursor was not committed before exit"
        );
    }
}

/// A BROWSE subscription of `topic` from its first message.
fn browse_from_earliest(topic: &str) -> proto::SubscribeUpstream {
    proto::SubscribeUpstream {
        request: Some(proto::subscribe_upstream::Request::Init(
            proto::SubscriptionInit {
                topic: topic.into(),
                initial_position: proto::InitialPosition::Earliest as i32,
                mode: proto::SubscriptionMode::Browse as i32,
                ..Default::default()
            },
        )),
    }
}

/// Waits until the broker's memory holds `seq` as the group's cursor.
async fn wait_for_cursor(c: &mut Client, topic: &str, group: &str, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats: proto::GetTopicStatsResponse = c
            .unary(
                "GetTopicStats",
                proto::GetTopicStatsRequest {
                    topics: vec![topic.into()],
                },
            )
            .await
            .unwrap();
        let cursor = stats.stats[0]
            .consumer_groups
            .iter()
            .find(|g| g.group_name == group)
            .map(|g| g.cursor_sequence);
        if cursor == Some(seq) {
            return;
        }
        assert!(Instant::now() < deadline, "ack never applied: {cursor:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_database_that_lost_its_tail_never_reuses_sequences_and_says_so() {
    let mut server = Server::start();
    let mut c = server.client().await;
    for i in 0..50 {
        c.publish("t", format!("{i}").as_bytes()).await.unwrap();
    }
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(50)).await;
    let mut last = None;
    for _ in 0..50 {
        last = Some(sub.delivery(Duration::from_secs(5)).await);
    }
    let last = last.unwrap();
    assert_eq!(last.sequence, 50);
    sub.send(ack(&last.message_id)).await;
    wait_for_cursor(&mut c, "t", "g", 50).await;
    server.signal(15);
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(stored_cursor(&server.dir, "t", "g"), Some(50));

    // The database loses its last 20 messages (as a damaged WAL would).
    db(&server.dir)
        .execute("DELETE FROM messages WHERE seq > 30", [])
        .unwrap();
    let status = Command::new(BIN)
        .args(["check", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1), "check sees the lost tail");

    server.spawn(0);
    let log = server.log_text();
    assert_eq!(log.matches("lost its tail").count(), 1, "{log}");
    assert!(log.contains("ERROR"), "{log}");
    let mut c = server.client().await;
    let r = c.publish("t", b"after").await.unwrap();
    assert!(r.sequence > 50, "sequence {} reused", r.sequence);
    // The group whose cursor was at 50 receives the new message.
    let mut sub = c
        .subscribe("t", "g", proto::InitialPosition::Earliest)
        .await;
    sub.send(credit(10)).await;
    let d = sub.delivery(Duration::from_secs(5)).await;
    assert_eq!(d.sequence, r.sequence);
}

#[tokio::test]
async fn sequences_stay_above_everything_acked_across_sigkills() {
    let mut server = Server::start();
    let mut highest = 0;
    for _ in 0..3 {
        let mut c = server.client().await;
        for _ in 0..20 {
            let r = c.publish("t", b"x").await.unwrap();
            assert!(r.sequence > highest, "{} after {highest}", r.sequence);
            highest = r.sequence;
        }
        server.kill9();
        server.spawn(0);
    }
    let out = Command::new(BIN)
        .args(["check", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test]
async fn damaged_pages_end_the_stream_with_data_loss_once_and_check_finds_them() {
    let _heavy = serial().await;
    let mut server = Server::start();
    let mut c = server.client().await;
    let body = vec![5u8; 1000];
    let batch: Vec<&[u8]> = (0..1000).map(|_| body.as_slice()).collect();
    for _ in 0..4 {
        c.batch_publish("t", &batch).await.unwrap();
    }
    server.signal(15);
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    let healthy = Command::new(BIN)
        .args(["check", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(healthy.status.code(), Some(0), "{healthy:?}");

    // 4 KiB of garbage in the middle of the database file.
    let path = server.dir.join("sluice.db");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = (bytes.len() / 2) & !4095;
    for (i, b) in bytes[mid..mid + 4096].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let damaged = Command::new(BIN)
        .args(["check", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(damaged.status.code(), Some(1), "{damaged:?}");
    assert!(String::from_utf8_lossy(&damaged.stdout).contains("damaged"));

    server.spawn(0);
    let mut c = server.client().await;
    let mut sub = c.subscribe_with(browse_from_earliest("t")).await.unwrap();
    sub.send(credit(10_000)).await;
    let started = Instant::now();
    let mut delivered = 0;
    let end = loop {
        match sub.next_within(Duration::from_secs(5)).await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(s)) => break s,
            None => panic!("no error after {delivered} deliveries: the stream stalled"),
        }
    };
    // SQLite reports the scribbled page as corruption: DATA_LOSS.
    assert_eq!(end.code(), Code::DataLoss, "{end:?}");
    assert!(delivered < 4000, "{delivered}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A damaged database makes health say so.
    {
        let mut grpc = c.grpc.clone();
        grpc.ready().await.unwrap();
        let health = grpc
            .unary(
                Request::new(health::HealthCheckRequest {
                    service: String::new(),
                }),
                PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
                ProstCodec::<health::HealthCheckRequest, health::HealthCheckResponse>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(health.status, 2, "NOT_SERVING");
    }
    // Clients retrying meanwhile do not make the log grow.
    for _ in 0..20 {
        let mut again = c.subscribe_with(browse_from_earliest("t")).await.unwrap();
        again.send(credit(10_000)).await;
        while let Some(Ok(_)) = again.next_within(Duration::from_secs(5)).await {}
    }
    eprintln!(
        "stream ended with {:?} after {delivered} deliveries",
        end.code()
    );
    let log = server.log_text();
    let errors = log.lines().filter(|l| l.contains("ERROR")).count();
    assert!(errors <= 5, "{errors} ERROR lines:\n{log}");
}

#[tokio::test]
async fn a_read_only_database_is_refused_at_start() {
    let server = Server::start();
    let mut c = server.client().await;
    c.publish("t", b"x").await.unwrap();
    drop(c);
    let dir = server.dir.clone();
    let mut server = server;
    server.signal(15);
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    // A writable dir for an unprivileged user, read-only database files.
    let run_as_nobody = unsafe_is_root();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if run_as_nobody {
            Command::new("chown")
                .arg("65534:65534")
                .arg(&p)
                .status()
                .unwrap();
        }
        let ro = p.to_string_lossy().contains("sluice.db");
        let mode = if ro { "0400" } else { "0600" };
        Command::new("chmod").arg(mode).arg(&p).status().unwrap();
    }
    if run_as_nobody {
        Command::new("chown")
            .arg("65534:65534")
            .arg(&dir)
            .status()
            .unwrap();
        Command::new("chmod")
            .arg("0755")
            .arg(dir.parent().unwrap())
            .status()
            .unwrap();
    }
    let dir_s = dir.to_str().unwrap().to_string();
    let (code, err) = if run_as_nobody {
        serve_as(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "serve",
            ],
            &["--port", "0", "--data-dir", &dir_s],
        )
    } else {
        serve_expecting_exit(&["--port", "0", "--data-dir", &dir_s], &[])
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not writable") || err.contains("readonly"),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test]
async fn the_size_cap_counts_the_wal_says_it_was_reached_and_logs_once() {
    let server = Server::start_with(&["--max-db-bytes", "1MiB"]);
    let mut c = server.client().await;
    let payload = vec![9u8; 16 * 1024];
    let mut refused = 0;
    let mut first_err = None;
    for _ in 0..400 {
        match c.publish("fill", &payload).await {
            Ok(_) => assert_eq!(refused, 0, "accepted after a refusal"),
            Err(e) => {
                refused += 1;
                first_err.get_or_insert(e);
            }
        }
    }
    let err = first_err.expect("the cap never bit");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("--max-db-bytes"), "{err:?}");
    assert!(refused > 300, "{refused}");
    let size = |n: &str| std::fs::metadata(server.dir.join(n)).map_or(0, |m| m.len());
    let used = size("sluice.db") + size("sluice.db-wal");
    assert!(
        used <= (1 << 20) + (1 << 18),
        "database and WAL hold {used} bytes"
    );
    let log = server.log_text();
    let lines = log.lines().filter(|l| l.contains("commit of")).count();
    assert!(
        lines <= 3,
        "{lines} commit-failure lines for {refused} refusals:\n{log}"
    );
}

#[tokio::test]
async fn backup_under_load_holds_everything_acked_before_it_started() {
    let _heavy = serial().await;
    let server = Server::start();
    let mut c = server.client().await;
    let body = vec![3u8; 256];
    let batch: Vec<&[u8]> = (0..100).map(|_| body.as_slice()).collect();
    let mut acked = 0;
    for _ in 0..50 {
        acked = c
            .batch_publish("t", &batch)
            .await
            .unwrap()
            .results
            .last()
            .unwrap()
            .sequence;
    }
    // Publishers keep going while the backup runs; their latency is measured.
    let url = server.url();
    let load = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        let mut worst = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            let t = Instant::now();
            p.publish("t", b"during").await.unwrap();
            worst = worst.max(t.elapsed());
        }
        worst
    });
    let to = server.dir.with_extension("backup.db");
    let _ = std::fs::remove_file(&to);
    let dir = server.dir.to_str().unwrap().to_string();
    let to_s = to.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["backup", "--data-dir", &dir, "--to", &to_s])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let worst = load.await.unwrap();
    // Restore: the copy as sluice.db in an empty dir, a daemon on it.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&to, restored.path().join("sluice.db")).unwrap();
    let _ = std::fs::remove_file(&to);
    let count: i64 = rusqlite::Connection::open(restored.path().join("sluice.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM messages WHERE seq <= ?1",
            [acked as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(count as u64, acked);
    let mut copy = Server::start_with(&[]);
    copy.kill9();
    copy.dir = restored.path().to_path_buf();
    copy.spawn(0);
    let mut rc = copy.client().await;
    let r = rc.publish("t", b"on the copy").await.unwrap();
    assert!(r.sequence > acked);
    eprintln!("worst publish latency during the backup: {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
}
