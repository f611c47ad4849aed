//! The CLI as a user runs it, against a real broker: publish from stdin,
//! subscribe --count, topics, stats, and errors.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;

fn sluice(server: &Server, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("SLUICE_ADDR", format!("127.0.0.1:{}", server.port))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    if let Err(e) = child.stdin.take().expect("stdin").write_all(stdin) {
        // The CLI may exit (a usage error) before it reads its input.
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing the CLI's stdin: {e}"
        );
    }
    child.wait_with_output().expect("cli output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn publish_from_stdin_then_subscribe_with_count() {
    let server = Server::start();
    let p = sluice(
        &server,
        &["publish", "orders", "-", "--attr", "source=cli"],
        b"first\nsecond\nthird\n",
    );
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    assert_eq!(
        stdout(&p).lines().count(),
        3,
        "one line per published message"
    );

    let s = sluice(
        &server,
        &[
            "subscribe",
            "orders",
            "--group",
            "g",
            "--from",
            "earliest",
            "--count",
            "2",
        ],
        b"",
    );
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert_eq!(stdout(&s), "first\nsecond\n");
    // It acked as it printed: the group resumes after "second".
    let s = sluice(
        &server,
        &[
            "subscribe",
            "orders",
            "--group",
            "g",
            "--count",
            "1",
            "--json",
        ],
        b"",
    );
    assert!(s.status.success());
    let line = stdout(&s);
    assert!(line.contains(r#""payload":"third""#), "{line}");
    assert!(line.contains(r#""source":"cli""#), "{line}");
    // BROWSE from a sequence, no acks.
    let s = sluice(
        &server,
        &[
            "subscribe",
            "orders",
            "--browse",
            "--from",
            "1",
            "--count",
            "3",
            "--credits",
            "1",
        ],
        b"",
    );
    assert_eq!(stdout(&s), "first\nsecond\nthird\n");
}

#[test]
fn publish_data_argument_and_whole_stdin() {
    let server = Server::start();
    let p = sluice(&server, &["publish", "t", "hello world"], b"");
    assert!(p.status.success());
    let p = sluice(
        &server,
        &["publish", "t", "--whole"],
        b"line one\nline two\n",
    );
    assert!(p.status.success());
    let s = sluice(
        &server,
        &[
            "subscribe",
            "t",
            "--from",
            "earliest",
            "--count",
            "2",
            "--json",
        ],
        b"",
    );
    let out = stdout(&s);
    assert!(out.contains(r#""payload":"hello world""#), "{out}");
    assert!(out.contains(r#""payload":"line one\nline two\n""#), "{out}");
}

#[test]
fn publish_with_an_idempotency_key_prints_duplicate_for_a_repeat() {
    let server = Server::start();
    let first = sluice(
        &server,
        &["publish", "t", "one", "--idempotency-key", "k1"],
        b"",
    );
    assert!(first.status.success(), "{first:?}");
    let first = stdout(&first);
    assert!(!first.contains("duplicate"), "{first}");
    let again = sluice(
        &server,
        &["publish", "t", "two", "--idempotency-key", "k1"],
        b"",
    );
    assert!(again.status.success());
    let again = stdout(&again);
    // Same sequence and id as the first, marked duplicate.
    assert_eq!(again.trim(), format!("{} duplicate", first.trim()));
    // A key names one message: lines from stdin are refused (usage, exit 2).
    let lines = sluice(
        &server,
        &["publish", "t", "--idempotency-key", "k2"],
        b"a\nb\n",
    );
    assert_eq!(lines.status.code(), Some(2));
}

/// The CLI may refuse its arguments before reading any input; more input
/// than a pipe holds then meets a closed pipe (once seen in CI with a few
/// bytes, when the CLI won the race).
#[test]
fn a_usage_error_with_input_waiting_exits_2() {
    let server = Server::start();
    let input = vec![b'x'; 4 << 20];
    let out = sluice(&server, &["publish", "t", "--idempotency-key", "k"], &input);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn topics_and_stats() {
    let server = Server::start();
    sluice(&server, &["publish", "beta", "x"], b"");
    sluice(&server, &["publish", "alpha", "y"], b"");
    sluice(&server, &["publish", "alpha", "z"], b"");
    let t = sluice(&server, &["topics"], b"");
    assert!(t.status.success());
    let names: Vec<String> = stdout(&t)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let s = sluice(&server, &["stats", "alpha"], b"");
    assert!(s.status.success());
    assert!(
        stdout(&s).starts_with("alpha\tmessages=2\t"),
        "{}",
        stdout(&s)
    );
}

#[test]
fn json_output_parses_and_carries_binary_payloads_as_base64() {
    let server = Server::start();
    let p = sluice(&server, &["publish", "bin", "--whole"], &[0xff, 0xfe, b'"']);
    assert!(p.status.success());
    let p = sluice(
        &server,
        &[
            "publish",
            "bin",
            "tab\there \"quoted\" é",
            "--attr",
            "k=a\"b",
        ],
        b"",
    );
    assert!(p.status.success());
    let s = sluice(
        &server,
        &[
            "subscribe",
            "bin",
            "--group",
            "g",
            "--from",
            "earliest",
            "--count",
            "2",
            "--json",
        ],
        b"",
    );
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let lines: Vec<serde_json::Value> = stdout(&s)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["payload_base64"], "//4i");
    assert!(lines[0].get("payload").is_none());
    assert_eq!(lines[1]["payload"], "tab\there \"quoted\" é");
    assert_eq!(lines[1]["attributes"]["k"], "a\"b");
    assert_eq!(lines[1]["delivery_count"], 1);
    let last_seq = lines[1]["sequence"].as_u64().unwrap();

    let st = sluice(&server, &["stats", "bin", "--json"], b"");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = stdout(&st);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["topic"], "bin");
    assert_eq!(v["total_messages"], 2);
    assert_eq!(v["last_sequence"], last_seq);
    assert!(v["created_at"].as_i64().unwrap() > 0);
    let groups = v["consumer_groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["group_name"], "g");
    assert_eq!(groups[0]["cursor_sequence"], last_seq);
    assert_eq!(groups[0]["pending_count"], 0);
}

#[test]
fn errors_print_the_status_and_exit_non_zero() {
    let server = Server::start();
    let bad = sluice(&server, &["publish", "no spaces allowed", "x"], b"");
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("[A-Za-z0-9._-]"),
        "{err}"
    );
    let missing = sluice(&server, &["stats", "nope"], b"");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
    let usage = sluice(&server, &["subscribe"], b"");
    assert_eq!(usage.status.code(), Some(2));
    let down = Command::new(BIN)
        .args(["topics", "--addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("UNAVAILABLE"));
}

#[test]
fn daemon_flags_help_version_and_bad_values() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = stdout(&help);
    for flag in [
        "--host",
        "--port",
        "--data-dir",
        "--log-level",
        "--max-message-bytes",
        "--max-connections-per-ip",
        "SLUICE_MAX_CONNECTIONS_PER_IP",
        "--max-connection-idle",
        "SLUICE_MAX_CONNECTION_IDLE",
        "--max-batch-messages",
        "--max-inflight-bytes",
        "--message-timeout",
        "--max-topics",
        "--max-groups-per-topic",
        "--store",
        "SLUICE_STORE",
        "sluice check",
        "sluice backup",
        "SLUICE_PORT",
        "publish",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}");
    }
    let v = Command::new(BIN).arg("--version").output().unwrap();
    assert!(v.status.success() && stdout(&v).starts_with("sluice "));
    for bad in [
        &["--port", "not-a-port"][..],
        &["serve", "--bogus"][..],
        &["--heartbeat-interval", "5 parsecs"][..],
        &["--max-connection-idle", "0"][..],
        &["--max-connections-per-ip", "none"][..],
        &["--max-batch-messages", "70000"][..],
        &["--store", "mysql://x"][..],
    ] {
        let o = Command::new(BIN).args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.lines()
                .next()
                .unwrap()
                .contains(bad[bad.len() - 2].trim_start_matches("serve"))
                || err.contains("bogus"),
            "{err}"
        );
    }
    let o = Command::new(BIN)
        .env("SLUICE_PORT", "99999")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("SLUICE_PORT"));
}

/// The daemon's option lines in `--help`: each description starts in the
/// same column, and so does every continuation line below it.
#[test]
fn help_option_descriptions_share_one_column() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = stdout(&help);
    let options: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("OPTIONS"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let mut columns = Vec::new();
    for line in &options {
        let indent = line.len() - line.trim_start().len();
        let column = if line.trim_start().starts_with('-') {
            // The flag and its value name, then at least two spaces.
            let gap = line[indent..]
                .find("  ")
                .unwrap_or_else(|| panic!("no description after the flag: {line:?}"));
            let rest = &line[indent + gap..];
            indent + gap + (rest.len() - rest.trim_start().len())
        } else {
            indent
        };
        columns.push((column, *line));
    }
    let flags = options
        .iter()
        .filter(|l| l.trim_start().starts_with('-'))
        .count();
    assert!(flags >= 30, "found only {flags} option lines:\n{text}");
    for flag in ["--max-db-bytes SIZE", "--otel-endpoint URL", "-h, --help"] {
        assert!(
            options.iter().any(|l| l.trim_start().starts_with(flag)),
            "{flag} is an option line"
        );
    }
    let first = columns[0].0;
    let off: Vec<String> = columns
        .iter()
        .filter(|(c, _)| *c != first)
        .map(|(c, l)| format!("column {c}: {l}"))
        .collect();
    assert!(
        off.is_empty(),
        "descriptions start in column {first}, except:\n{}",
        off.join("\n")
    );
}

#[test]
fn an_unreachable_nats_store_fails_at_start_and_leaves_the_data_dir_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let o = Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--store",
            // Nothing listens on port 1.
            "nats://u:secret@127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot connect to NATS at nats://u:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("secret"), "the password is masked: {err}");
    assert!(!dir.exists());
}
