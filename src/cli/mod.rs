//! The client commands of the `sluice` binary: `publish`, `subscribe`,
//! `topics`, `stats`. They speak gRPC to a running broker through
//! [`client::BlockingClient`] (mio + h2, no async runtime). Errors print the
//! gRPC status and message and exit 1; usage errors exit 2.

pub mod client;
pub mod data_dir;
pub mod format;

use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::time::Duration;

use prost::Message;

use self::client::BlockingClient;
use crate::grpc::Status;
use crate::proto::{self, subscribe_downstream, subscribe_upstream};

pub const COMMANDS: &[&str] = &["publish", "subscribe", "topics", "stats"];

pub const USAGE: &str = "\
Client commands (talk to a running broker):
    sluice publish TOPIC [DATA | -] [--attr K=V]... [--whole] [--idempotency-key K]
        DATA as one message; without DATA (or with -) each line of stdin is a
        message, or all of stdin is one message with --whole; with a key, a
        message already stored under it is not stored again (prints duplicate)
    sluice subscribe TOPIC [--group G] [--from earliest|latest|SEQ] [--credits N]
                           [--browse] [--count N] [--json]
        prints one message per line (the payload, or JSON), acking as it prints
    sluice topics
    sluice stats [TOPIC]... [--json]
        one line per topic and per consumer group, or one JSON object per topic
    Each takes --addr HOST:PORT [SLUICE_ADDR] (default 127.0.0.1:50051).
";

/// Usage problems (exit 2) versus call failures (exit 1).
enum Failure {
    Usage(String),
    Call(Status),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Call(s)
    }
}

impl From<lexopt::Error> for Failure {
    fn from(e: lexopt::Error) -> Self {
        Failure::Usage(e.to_string())
    }
}

fn text(v: OsString, what: &str) -> Result<String, Failure> {
    v.into_string()
        .map_err(|_| Failure::Usage(format!("{what} is not UTF-8")))
}

fn number(v: OsString, flag: &str) -> Result<u64, Failure> {
    let s = text(v, flag)?;
    s.parse()
        .map_err(|_| Failure::Usage(format!("invalid value {s:?} for {flag}")))
}

/// Runs a client command; returns the process exit code.
pub fn run(command: &str, args: Vec<OsString>) -> i32 {
    let result = match command {
        "publish" => publish(args),
        "subscribe" => subscribe(args),
        "topics" => topics(args),
        "stats" => stats(args),
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    };
    match result {
        Ok(()) => 0,
        Err(Failure::Usage(e)) => {
            eprintln!("sluice {command}: {e}");
            eprintln!("Try 'sluice --help'.");
            2
        }
        Err(Failure::Call(s)) => {
            eprintln!(
                "sluice {command}: {} ({}): {}",
                format::code_name(s.code),
                s.code as u8,
                s.message
            );
            1
        }
    }
}

fn default_addr() -> String {
    std::env::var("SLUICE_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into())
}

fn connect(addr: &str) -> Result<BlockingClient, Failure> {
    Ok(BlockingClient::connect(addr, Duration::from_secs(5))?)
}

fn path(method: &str) -> String {
    format!("/sluice.v1.Sluice/{method}")
}

fn publish(args: Vec<OsString>) -> Result<(), Failure> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let (mut topic, mut data, mut attrs, mut whole, mut addr) =
        (None, None, Vec::new(), false, default_addr());
    let mut key = String::new();
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => addr = text(p.value()?, "--addr")?,
            Long("attr") => {
                let kv = text(p.value()?, "--attr")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--attr wants K=V, got {kv:?}")))?;
                attrs.push((k.to_string(), v.to_string()));
            }
            Long("whole") => whole = true,
            Long("idempotency-key") => key = text(p.value()?, "--idempotency-key")?,
            Value(v) if topic.is_none() => topic = Some(text(v, "TOPIC")?),
            Value(v) if data.is_none() => data = Some(v),
            other => return Err(other.unexpected().into()),
        }
    }
    let topic = topic.ok_or_else(|| Failure::Usage("missing TOPIC".into()))?;
    let attributes: std::collections::HashMap<String, String> = attrs.into_iter().collect();
    let from_stdin = data.as_ref().is_none_or(|d| d == "-");
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    if !from_stdin {
        payloads.push(data.map(|d| d.into_encoded_bytes()).unwrap_or_default());
    } else if whole {
        let mut all = Vec::new();
        std::io::stdin()
            .read_to_end(&mut all)
            .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
        payloads.push(all);
    }
    if !key.is_empty() && payloads.is_empty() {
        return Err(Failure::Usage(
            "--idempotency-key names one message: give DATA or --whole".into(),
        ));
    }
    let mut client = connect(&addr)?;
    if !payloads.is_empty() {
        let r: proto::PublishResponse = client.unary(
            &path("Publish"),
            &proto::PublishRequest {
                topic,
                payload: payloads.remove(0).into(),
                attributes,
                idempotency_key: key,
            },
        )?;
        if r.duplicate {
            println!("{} {} duplicate", r.sequence, r.message_id);
        } else {
            println!("{} {}", r.sequence, r.message_id);
        }
        return Ok(());
    }
    // One message per line, sent in batches.
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().split(b'\n');
    let mut total = 0u64;
    loop {
        let mut batch = Vec::new();
        for line in lines.by_ref().take(1000) {
            let mut line = line.map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            batch.push(proto::BatchMessage {
                payload: line.into(),
                attributes: attributes.clone(),
                idempotency_key: String::new(),
            });
        }
        if batch.is_empty() {
            break;
        }
        let r: proto::BatchPublishResponse = client.unary(
            &path("BatchPublish"),
            &proto::BatchPublishRequest {
                topic: topic.clone(),
                messages: batch,
            },
        )?;
        for res in &r.results {
            println!("{} {}", res.sequence, res.message_id);
        }
        total += r.results.len() as u64;
    }
    eprintln!("published {total} messages to {topic}");
    Ok(())
}

fn subscribe(args: Vec<OsString>) -> Result<(), Failure> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut topic = None;
    let mut group = String::new();
    let mut from = proto::InitialPosition::Latest;
    let mut offset = 0;
    let (mut credits, mut browse, mut count, mut json, mut addr) =
        (100u64, false, None, false, default_addr());
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => addr = text(p.value()?, "--addr")?,
            Long("group") => group = text(p.value()?, "--group")?,
            Long("from") => match text(p.value()?, "--from")?.as_str() {
                "earliest" => from = proto::InitialPosition::Earliest,
                "latest" => from = proto::InitialPosition::Latest,
                seq => {
                    offset = seq.parse().map_err(|_| {
                        Failure::Usage(format!(
                            "--from wants earliest, latest or a sequence, got {seq:?}"
                        ))
                    })?;
                    from = proto::InitialPosition::Offset;
                }
            },
            Long("credits") => {
                credits = number(p.value()?, "--credits")?.clamp(1, u64::from(u32::MAX))
            }
            Long("browse") => browse = true,
            Long("count") => count = Some(number(p.value()?, "--count")?),
            Long("json") => json = true,
            Value(v) if topic.is_none() => topic = Some(text(v, "TOPIC")?),
            other => return Err(other.unexpected().into()),
        }
    }
    let topic = topic.ok_or_else(|| Failure::Usage("missing TOPIC".into()))?;
    if count == Some(0) {
        return Ok(());
    }
    let window = count.map_or(credits, |c| c.min(credits)) as u32;
    let mut client = connect(&addr)?;
    let up = |r| proto::SubscribeUpstream { request: Some(r) };
    let init = up(subscribe_upstream::Request::Init(proto::SubscriptionInit {
        topic,
        consumer_group: group,
        consumer_id: format!("sluice-cli-{}", std::process::id()),
        initial_position: from as i32,
        offset,
        mode: if browse {
            proto::SubscriptionMode::Browse
        } else {
            proto::SubscriptionMode::ConsumerGroup
        } as i32,
        ..Default::default()
    }));
    let mut stream = client.open(
        &path("Subscribe"),
        Some(crate::grpc::encode_message(&init)),
        false,
    )?;
    client.send(
        &mut stream,
        &up(subscribe_upstream::Request::Credit(proto::CreditGrant {
            credits: window,
        })),
    )?;
    let stdout = std::io::stdout();
    let limit = count.unwrap_or(u64::MAX);
    let (mut printed, mut granted) = (0u64, u64::from(window));
    while printed < limit {
        let Some(body) = client.next(&mut stream)? else {
            return Ok(());
        };
        let msg = proto::SubscribeDownstream::decode(body)
            .map_err(|e| Status::internal(format!("bad message from server: {e}")))?;
        match msg.response {
            Some(subscribe_downstream::Response::Delivery(d)) => {
                let mut out = stdout.lock();
                let line = if json {
                    format::delivery_json(&d).into_bytes()
                } else {
                    d.payload.to_vec()
                };
                let _ = out.write_all(&line);
                let _ = out.write_all(b"\n");
                let _ = out.flush();
                printed += 1;
                if !browse {
                    let ack = subscribe_upstream::Request::Ack(proto::Ack {
                        message_id: d.message_id,
                    });
                    client.send(&mut stream, &up(ack))?;
                }
                // Keep the window topped up, never granting past --count.
                let outstanding = granted - printed;
                if outstanding < u64::from(window).div_ceil(2) && granted < limit {
                    let more = (u64::from(window) - outstanding).min(limit - granted) as u32;
                    let grant =
                        subscribe_upstream::Request::Credit(proto::CreditGrant { credits: more });
                    client.send(&mut stream, &up(grant))?;
                    granted += u64::from(more);
                }
            }
            Some(subscribe_downstream::Response::Error(e)) => {
                return Err(Status::new(
                    crate::grpc::Code::Aborted,
                    format!("{}: {}", e.code, e.message),
                )
                .into());
            }
            _ => {}
        }
    }
    // Done, with no credit left: close our side so the broker reads every
    // ack and ends the stream; wait briefly for that.
    stream
        .send
        .send_data(bytes::Bytes::new(), true)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match client.next(&mut stream) {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    Ok(())
}

fn topics(args: Vec<OsString>) -> Result<(), Failure> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut addr = default_addr();
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => addr = text(p.value()?, "--addr")?,
            other => return Err(other.unexpected().into()),
        }
    }
    let mut client = connect(&addr)?;
    let r: proto::ListTopicsResponse =
        client.unary(&path("ListTopics"), &proto::ListTopicsRequest {})?;
    for t in r.topics {
        println!("{}\t{}", t.name, format::time(t.created_at));
    }
    Ok(())
}

fn stats(args: Vec<OsString>) -> Result<(), Failure> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let (mut addr, mut topics, mut json) = (default_addr(), Vec::new(), false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("addr") => addr = text(p.value()?, "--addr")?,
            Long("json") => json = true,
            Value(v) => topics.push(text(v, "TOPIC")?),
            other => return Err(other.unexpected().into()),
        }
    }
    let mut client = connect(&addr)?;
    let r: proto::GetTopicStatsResponse = client.unary(
        &path("GetTopicStats"),
        &proto::GetTopicStatsRequest { topics },
    )?;
    for s in r.stats {
        if json {
            println!("{}", format::topic_stats_json(&s));
            continue;
        }
        println!(
            "{}\tmessages={}\tfirst={} ({})\tlast={} ({})\tcreated={}",
            s.topic,
            s.total_messages,
            s.first_sequence,
            format::time(s.first_message_timestamp),
            s.last_sequence,
            format::time(s.last_message_timestamp),
            format::time(s.created_at)
        );
        for g in s.consumer_groups {
            println!(
                "  group {}\tcursor={}\tpending={}\tlast_ack={}",
                g.group_name,
                g.cursor_sequence,
                g.pending_count,
                format::time(g.last_ack_timestamp)
            );
        }
    }
    Ok(())
}
