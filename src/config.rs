//! Command line and environment: `sluice [serve] [FLAGS]`. Every flag has an
//! environment variable (`--data-dir` ↔ `SLUICE_DATA_DIR`); a flag wins over
//! its variable, which wins over the default. Bad input is one line naming
//! the flag (the caller exits 2).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// `--store`: which store sits behind the storage boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// SQLite in `--data-dir` (the default).
    Sqlite,
    /// A NATS JetStream cluster: this daemon is a stateless gateway.
    JetStream(JetStreamConfig),
}

/// `nats://[USER:PASS@]HOST:PORT[,HOST:PORT…]`.
#[derive(Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// Seed servers, `(host, port)`; a host may be a bracketed IPv6 address.
    pub servers: Vec<(String, u16)>,
    /// `(user, password)` from the URL.
    pub credentials: Option<(String, String)>,
}

/// The URL without its password, for messages and `Debug`.
impl std::fmt::Display for JetStreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nats://")?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:***@")?;
        }
        for (i, (host, port)) in self.servers.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{host}:{port}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for JetStreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JetStreamConfig({self})")
    }
}

/// Parses `--store`: `sqlite`, or `nats://[USER:PASS@]HOST:PORT[,HOST:PORT…]`.
pub fn parse_store(v: &str) -> Result<StoreConfig, String> {
    let bad = |why: &str| {
        format!(
            "invalid value {v:?} for --store: {why} (expected sqlite or \
             nats://[USER:PASS@]HOST:PORT[,HOST:PORT...])"
        )
    };
    if v == "sqlite" {
        return Ok(StoreConfig::Sqlite);
    }
    let Some(rest) = v.strip_prefix("nats://") else {
        return Err(bad("unknown store"));
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((creds, hosts)) => {
            let (user, pass) = creds
                .split_once(':')
                .ok_or_else(|| bad("credentials must be USER:PASS"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            (Some((user.to_string(), pass.to_string())), hosts)
        }
        None => (None, rest),
    };
    let mut servers = Vec::new();
    for server in hosts.split(',') {
        let (host, port) = server
            .rsplit_once(':')
            .ok_or_else(|| bad("each server needs HOST:PORT"))?;
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("bad host"));
        }
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("bad port")),
        };
        servers.push((host.to_string(), port));
    }
    Ok(StoreConfig::JetStream(JetStreamConfig {
        servers,
        credentials,
    }))
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub store: StoreConfig,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_level: Option<String>,
    pub max_message_bytes: usize,
    pub max_batch_messages: usize,
    pub max_inflight_bytes: usize,
    pub message_timeout: Duration,
    pub max_topics: usize,
    pub max_groups_per_topic: usize,
    pub commit_max_messages: usize,
    pub commit_max_bytes: usize,
    pub writer_queue: usize,
    pub heartbeat_interval: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_connection_idle: Duration,
    pub max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
    pub max_db_bytes: Option<u64>,
    pub otel_endpoint: Option<String>,
    pub otel_interval: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub retention_max_age: Option<Duration>,
    pub retention_max_messages: Option<u64>,
    pub retention_max_bytes: Option<u64>,
    /// `--dedup-window`: how long an idempotency key is remembered per topic.
    pub dedup_window: Duration,
    /// `--dedup-max-keys`: most idempotency keys remembered (SQLite store).
    pub dedup_max_keys: u64,
    /// `--nats-token`: a token for NATS servers that want one.
    pub nats_token: Option<String>,
    /// `--nats-replicas`: replica count of every stream and bucket Sluice creates.
    pub nats_replicas: usize,
    /// `--nats-lease`: how long a gateway that stopped renewing keeps the
    /// consumer groups it served.
    pub nats_lease: Duration,
    /// `--nats-prefix`: namespaces the stream, subjects and buckets.
    pub nats_prefix: String,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            store: StoreConfig::Sqlite,
            host: "127.0.0.1".into(),
            port: 50051,
            data_dir: PathBuf::from("./sluice-data"),
            log_level: None,
            max_message_bytes: 4 << 20,
            max_batch_messages: 10_000,
            max_inflight_bytes: 64 << 20,
            message_timeout: Duration::from_secs(30),
            max_topics: 10_000,
            max_groups_per_topic: 1_000,
            commit_max_messages: 10_000,
            commit_max_bytes: 16 << 20,
            writer_queue: 4096,
            heartbeat_interval: Duration::from_secs(5),
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_connection_idle: Duration::from_secs(300),
            max_concurrent_streams: 256,
            shutdown_grace: Duration::from_secs(5),
            max_db_bytes: None,
            otel_endpoint: None,
            otel_interval: None,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            retention_max_age: None,
            retention_max_messages: None,
            dedup_window: Duration::from_secs(120),
            dedup_max_keys: 1_000_000,
            retention_max_bytes: None,
            nats_token: None,
            nats_replicas: 3,
            nats_lease: Duration::from_secs(10),
            nats_prefix: "sluice".into(),
        }
    }
}

#[derive(Debug)]
pub enum Command {
    Serve(Box<ServeConfig>),
    Help,
    Version,
}

pub const USAGE: &str = "\
sluice — a durable, gRPC-native message broker

USAGE:
    sluice [serve] [OPTIONS]

OPTIONS (each also read from the environment variable shown):
    --store STORE                where messages are stored: sqlite (in --data-dir), or a NATS
                                 JetStream cluster nats://[USER:PASS@]HOST:PORT[,HOST:PORT...]
                                 [SLUICE_STORE] (default sqlite)
    --nats-token TOKEN           token for NATS servers that require one [SLUICE_NATS_TOKEN]
    --nats-replicas N            replicas of every stream and bucket Sluice creates in JetStream
                                 (1 for a single NATS server, at most 5) [SLUICE_NATS_REPLICAS] (default 3)
    --nats-prefix NAME           names Sluice's stream, subjects and buckets, so deployments can share
                                 one NATS account ([A-Za-z0-9-]) [SLUICE_NATS_PREFIX] (default sluice)
    --nats-lease DUR             how long a gateway that died keeps its consumer groups' leases
                                 (2s to 10m; the same on every gateway) [SLUICE_NATS_LEASE] (default 10s)
    --host HOST                  address to listen on [SLUICE_HOST] (default 127.0.0.1)
    --port PORT                  TCP port, 0 picks a free one [SLUICE_PORT] (default 50051)
    --data-dir DIR               where the database lives [SLUICE_DATA_DIR] (default ./sluice-data)
    --log-level LEVEL            error|warn|info|debug|trace or an env_logger filter
                                 [SLUICE_LOG_LEVEL, else RUST_LOG] (default info)
    --max-message-bytes N        largest gRPC message accepted [SLUICE_MAX_MESSAGE_BYTES] (default 4194304)
    --max-batch-messages N       most messages in one BatchPublish call; larger calls fail INVALID_ARGUMENT
                                 before anything is stored, so every reply fits a client's default
                                 4 MiB limit (at most 65536) [SLUICE_MAX_BATCH_MESSAGES] (default 10000)
    --max-inflight-bytes SIZE    request bytes held in incomplete messages across all calls; past it,
                                 HTTP/2 window is withheld so senders wait [SLUICE_MAX_INFLIGHT_BYTES]
                                 (default 64MiB)
    --message-timeout DUR        a request message must complete within this once it started, or its
                                 call ends DEADLINE_EXCEEDED [SLUICE_MESSAGE_TIMEOUT] (default 30s)
    --max-topics N               topics that may exist; creating one more fails RESOURCE_EXHAUSTED
                                 [SLUICE_MAX_TOPICS] (default 10000)
    --max-groups-per-topic N     consumer groups one topic may have; one more fails RESOURCE_EXHAUSTED
                                 [SLUICE_MAX_GROUPS_PER_TOPIC] (default 1000)
    --commit-max-messages N      most messages in one group commit [SLUICE_COMMIT_MAX_MESSAGES] (default 10000)
    --commit-max-bytes N         most payload bytes in one group commit [SLUICE_COMMIT_MAX_BYTES] (default 16777216)
    --writer-queue N             requests queued for the writer before publishers are held back
                                 [SLUICE_WRITER_QUEUE] (default 4096)
    --heartbeat-interval DUR     heartbeat on idle Subscribe streams, 0 disables [SLUICE_HEARTBEAT_INTERVAL] (default 5s)
    --max-connections N          connections served at once; when full, the connection idle longest
                                 (no open stream) is closed to admit a new one, else the new one is
                                 refused [SLUICE_MAX_CONNECTIONS] (default 1024)
    --max-connections-per-ip N   connections served at once from one peer IP address (IPv6: one /64);
                                 more are refused [SLUICE_MAX_CONNECTIONS_PER_IP] (default 256)
    --max-connection-idle DUR    send GOAWAY to a connection that has had no open stream this long
                                 [SLUICE_MAX_CONNECTION_IDLE] (default 5m)
    --max-concurrent-streams N   HTTP/2 streams per connection [SLUICE_MAX_CONCURRENT_STREAMS] (default 256)
    --shutdown-grace DUR         how long SIGTERM waits for in-flight calls [SLUICE_SHUTDOWN_GRACE] (default 5s)
    --max-db-bytes SIZE          cap the database size; publishes past it fail UNAVAILABLE
                                 [SLUICE_MAX_DB_BYTES] (default: no cap)
    --otel-endpoint URL          OTLP/HTTP collector base URL, e.g. http://127.0.0.1:4318; empty
                                 disables [SLUICE_OTEL_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT] (default off)
    --otel-interval DUR          metric export interval [SLUICE_OTEL_INTERVAL, else
                                 OTEL_METRIC_EXPORT_INTERVAL in ms] (default 10s)
    --keepalive-interval DUR     ping each connection this often [SLUICE_KEEPALIVE_INTERVAL] (default 60s)
    --keepalive-timeout DUR      drop a peer that does not answer a ping (or finish its HTTP/2
                                 handshake) within this [SLUICE_KEEPALIVE_TIMEOUT] (default 20s)
    --retention-max-age DUR      delete messages older than this, per topic [SLUICE_RETENTION_MAX_AGE] (default off)
    --retention-max-messages N   keep at most N messages per topic [SLUICE_RETENTION_MAX_MESSAGES] (default off)
    --retention-max-bytes SIZE   keep at most SIZE payload bytes per topic, e.g. 512MiB
                                 [SLUICE_RETENTION_MAX_BYTES] (default off)
    --dedup-window DUR           how long a publish's idempotency key is remembered, per topic
                                 [SLUICE_DEDUP_WINDOW] (default 2m)
    --dedup-max-keys N           most idempotency keys remembered; past it the oldest are forgotten
                                 before their window ends [SLUICE_DEDUP_MAX_KEYS] (default 1000000)
    -h, --help                   print this help
    -V, --version                print the version

DUR is a number with a unit: ms, s, m, h or d (e.g. 500ms, 5s, 7d).
";

/// Parses a size such as `1048576`, `64KiB`, `512MiB`, `2GiB` (also K, M, G, KB, MB, GB as
/// binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1048576, 64KiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size like 1048576, 64KiB or 2GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration such as `500ms`, `5s`, `10m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 10m, 1h or 7d"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        "" if n == 0 => 0,
        _ => {
            return Err(format!(
                "{s:?} is not a duration like 500ms, 5s, 10m, 1h or 7d"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| {
        format!("invalid value {v:?} for {flag}: expected a non-negative whole number")
    })
}

fn positive(flag: &str, v: &str) -> Result<usize, String> {
    match number::<usize>(flag, v)? {
        0 => Err(format!(
            "invalid value {v:?} for {flag}: must be at least 1"
        )),
        n => Ok(n),
    }
}

/// Applies one setting given by name (flag without dashes).
fn apply(cfg: &mut ServeConfig, name: &str, v: &str) -> Result<(), String> {
    let flag = format!("--{name}");
    match name {
        "store" => cfg.store = parse_store(v)?,
        "host" => {
            if v.is_empty() {
                return Err("invalid value \"\" for --host".into());
            }
            cfg.host = v.into()
        }
        "port" => cfg.port = number(&flag, v)?,
        "data-dir" => {
            if v.is_empty() {
                return Err("invalid value \"\" for --data-dir".into());
            }
            cfg.data_dir = v.into()
        }
        "log-level" => cfg.log_level = Some(v.into()),
        "max-message-bytes" => cfg.max_message_bytes = positive(&flag, v)?,
        "max-batch-messages" => {
            let n = positive(&flag, v)?;
            if n > MAX_BATCH_MESSAGES {
                return Err(format!(
                    "invalid value {v:?} for {flag}: at most {MAX_BATCH_MESSAGES}, so a reply fits 4 MiB"
                ));
            }
            cfg.max_batch_messages = n;
        }
        "max-inflight-bytes" => {
            let n = parse_size(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if n < 64 << 10 {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be at least 64KiB"
                ));
            }
            cfg.max_inflight_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        "message-timeout" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if d.is_zero() {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be more than 0"
                ));
            }
            cfg.message_timeout = d;
        }
        "max-topics" => cfg.max_topics = positive(&flag, v)?,
        "max-groups-per-topic" => cfg.max_groups_per_topic = positive(&flag, v)?,
        "commit-max-messages" => cfg.commit_max_messages = positive(&flag, v)?,
        "commit-max-bytes" => cfg.commit_max_bytes = positive(&flag, v)?,
        "writer-queue" => cfg.writer_queue = positive(&flag, v)?,
        "heartbeat-interval" => {
            cfg.heartbeat_interval =
                parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?
        }
        "max-connections" => cfg.max_connections = positive(&flag, v)?,
        "max-connections-per-ip" => cfg.max_connections_per_ip = positive(&flag, v)?,
        "max-connection-idle" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if d.is_zero() {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be more than 0"
                ));
            }
            cfg.max_connection_idle = d;
        }
        "max-concurrent-streams" => {
            cfg.max_concurrent_streams =
                u32::try_from(positive(&flag, v)?).map_err(|_| format!("{flag} is too large"))?
        }
        "shutdown-grace" => {
            cfg.shutdown_grace =
                parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?
        }
        "keepalive-interval" | "keepalive-timeout" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if d.is_zero() {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be more than 0"
                ));
            }
            if name == "keepalive-interval" {
                cfg.keepalive_interval = d;
            } else {
                cfg.keepalive_timeout = d;
            }
        }
        "retention-max-age" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            cfg.retention_max_age = (!d.is_zero()).then_some(d);
        }
        "retention-max-messages" => {
            cfg.retention_max_messages = Some(positive(&flag, v)? as u64);
        }
        "dedup-window" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if d.is_zero() {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be more than 0"
                ));
            }
            cfg.dedup_window = d;
        }
        "dedup-max-keys" => cfg.dedup_max_keys = positive(&flag, v)? as u64,
        "otel-endpoint" => cfg.otel_endpoint = Some(v.to_string()),
        "otel-interval" => {
            let d = parse_duration(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if d.is_zero() {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be more than 0"
                ));
            }
            cfg.otel_interval = Some(d);
        }
        "max-db-bytes" => {
            let n = parse_size(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if n < 64 << 10 {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be at least 64KiB"
                ));
            }
            cfg.max_db_bytes = Some(n);
        }
        "retention-max-bytes" => {
            let n = parse_size(v).map_err(|e| format!("invalid value for {flag}: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "invalid value {v:?} for {flag}: must be at least 1"
                ));
            }
            cfg.retention_max_bytes = Some(n);
        }
        "nats-token" => cfg.nats_token = (!v.is_empty()).then(|| v.to_string()),
        "nats-replicas" => {
            let n = positive(&flag, v)?;
            if n > 5 {
                return Err(format!("invalid value {v:?} for {flag}: at most 5"));
            }
            cfg.nats_replicas = n;
        }
        "nats-lease" => {
            let d =
                parse_duration(v).map_err(|e| format!("invalid value {v:?} for {flag}: {e}"))?;
            if d < Duration::from_secs(2) || d > Duration::from_secs(600) {
                return Err(format!("invalid value {v:?} for {flag}: 2s to 10m"));
            }
            cfg.nats_lease = d;
        }
        "nats-prefix" => {
            let ok = !v.is_empty()
                && v.len() <= 32
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(format!(
                    "invalid value {v:?} for {flag}: 1 to 32 characters of [A-Za-z0-9-]"
                ));
            }
            cfg.nats_prefix = v.to_string();
        }
        _ => return Err(format!("unknown option --{name}")),
    }
    Ok(())
}

/// A BatchPublish reply spends at most 64 bytes per message (id, sequence,
/// timestamp), so this many fit a client's default 4 MiB receive limit.
pub const MAX_BATCH_MESSAGES: usize = 65_536;

const SETTINGS: &[&str] = &[
    "store",
    "host",
    "port",
    "data-dir",
    "log-level",
    "max-message-bytes",
    "max-batch-messages",
    "max-inflight-bytes",
    "message-timeout",
    "max-topics",
    "max-groups-per-topic",
    "commit-max-messages",
    "commit-max-bytes",
    "writer-queue",
    "heartbeat-interval",
    "max-connections",
    "max-connections-per-ip",
    "max-connection-idle",
    "max-concurrent-streams",
    "shutdown-grace",
    "max-db-bytes",
    "otel-endpoint",
    "otel-interval",
    "keepalive-interval",
    "keepalive-timeout",
    "retention-max-age",
    "retention-max-messages",
    "retention-max-bytes",
    "dedup-window",
    "dedup-max-keys",
    "nats-token",
    "nats-replicas",
    "nats-prefix",
    "nats-lease",
];

fn env_name(setting: &str) -> String {
    format!("SLUICE_{}", setting.replace('-', "_").to_uppercase())
}

/// Parses the arguments (without the program name) and the environment.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut cfg = ServeConfig::default();
    for name in SETTINGS {
        if let Some(v) = env(&env_name(name)) {
            apply(&mut cfg, name, &v).map_err(|e| format!("{e} (from {})", env_name(name)))?;
        }
    }
    let mut parser = lexopt::Parser::from_args(args);
    let mut seen_command = false;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long(name) if SETTINGS.contains(&name) => {
                let name = name.to_string();
                let v = parser.value().map_err(|e| e.to_string())?;
                let v = v
                    .into_string()
                    .map_err(|_| format!("invalid value for --{name}: not UTF-8"))?;
                apply(&mut cfg, &name, &v)?;
            }
            Value(v) if !seen_command && v == "serve" => seen_command = true,
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Command::Serve(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn serve(a: &[&str], env: &[(&str, &str)]) -> Result<ServeConfig, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(args(a), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Command::Serve(c) => Ok(*c),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn defaults_are_safe() {
        let c = serve(&[], &[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 50051));
        assert_eq!(c.max_message_bytes, 4 << 20);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.max_connection_idle, Duration::from_secs(300));
    }

    #[test]
    fn connection_limits_parse() {
        let c = serve(
            &["--max-connection-idle", "1s"],
            &[("SLUICE_MAX_CONNECTIONS_PER_IP", "3")],
        )
        .unwrap();
        assert_eq!(c.max_connection_idle, Duration::from_secs(1));
        assert_eq!(c.max_connections_per_ip, 3);
        assert!(serve(&["--max-connection-idle", "0"], &[])
            .unwrap_err()
            .contains("--max-connection-idle"));
        assert!(serve(&["--max-connections-per-ip", "0"], &[])
            .unwrap_err()
            .contains("--max-connections-per-ip"));
    }

    #[test]
    fn flags_beat_env_which_beats_defaults() {
        let c = serve(
            &["serve", "--port", "7000"],
            &[("SLUICE_PORT", "6000"), ("SLUICE_DATA_DIR", "/d")],
        )
        .unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        let c = serve(&["--heartbeat-interval=250ms"], &[]).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
    }

    #[test]
    fn bad_input_names_the_flag() {
        assert!(serve(&["--port", "x"], &[]).unwrap_err().contains("--port"));
        assert!(serve(&["--bogus"], &[]).unwrap_err().contains("bogus"));
        assert!(serve(&[], &[("SLUICE_PORT", "99999")])
            .unwrap_err()
            .contains("SLUICE_PORT"));
        assert!(serve(&["--shutdown-grace", "5 parsecs"], &[])
            .unwrap_err()
            .contains("--shutdown-grace"));
        assert!(serve(&["serve", "serve"], &[]).is_err());
    }

    #[test]
    fn retention_is_off_by_default_and_parses() {
        let c = serve(&[], &[]).unwrap();
        assert_eq!(
            (
                c.retention_max_age,
                c.retention_max_messages,
                c.retention_max_bytes
            ),
            (None, None, None)
        );
        let c = serve(
            &["--retention-max-age", "7d", "--retention-max-bytes", "2GiB"],
            &[("SLUICE_RETENTION_MAX_MESSAGES", "1000")],
        )
        .unwrap();
        assert_eq!(c.retention_max_age, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.retention_max_bytes, Some(2 << 30));
        assert_eq!(c.retention_max_messages, Some(1000));
        assert!(serve(&["--retention-max-bytes", "lots"], &[])
            .unwrap_err()
            .contains("--retention-max-bytes"));
    }

    #[test]
    fn store_defaults_to_sqlite_and_parses_nats_urls() {
        assert_eq!(serve(&[], &[]).unwrap().store, StoreConfig::Sqlite);
        assert_eq!(
            serve(&["--store", "sqlite"], &[]).unwrap().store,
            StoreConfig::Sqlite
        );
        let c = serve(&[], &[("SLUICE_STORE", "nats://n1:4222,n2:4223")]).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::JetStream(JetStreamConfig {
                servers: vec![("n1".into(), 4222), ("n2".into(), 4223)],
                credentials: None,
            })
        );
        let c = serve(&["--store", "nats://sluice:s3:cr@t@[::1]:4222"], &[]).unwrap();
        let StoreConfig::JetStream(js) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(js.servers, vec![("[::1]".to_string(), 4222)]);
        assert_eq!(
            js.credentials,
            Some(("sluice".to_string(), "s3:cr@t".to_string()))
        );
        // The password never shows in messages or debug output.
        assert_eq!(js.to_string(), "nats://sluice:***@[::1]:4222");
        assert!(!format!("{c:?}").contains("s3:cr@t"));
        // A flag beats the variable.
        let c = serve(
            &["--store", "sqlite"],
            &[("SLUICE_STORE", "nats://n1:4222")],
        )
        .unwrap();
        assert_eq!(c.store, StoreConfig::Sqlite);
    }

    #[test]
    fn nats_flags_parse_and_refuse_bad_values() {
        let c = serve(&[], &[]).unwrap();
        assert_eq!(
            (c.nats_replicas, c.nats_prefix.as_str(), c.nats_token),
            (3, "sluice", None)
        );
        let c = serve(
            &[
                "--nats-replicas",
                "1",
                "--nats-prefix",
                "blue-2",
                "--nats-token",
                "t0k",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.nats_replicas, 1);
        assert_eq!(c.nats_prefix, "blue-2");
        assert_eq!(c.nats_token.as_deref(), Some("t0k"));
        assert_eq!(c.nats_lease, Duration::from_secs(10));
        let c = serve(&["--nats-lease", "30s"], &[]).unwrap();
        assert_eq!(c.nats_lease, Duration::from_secs(30));
        for (flag, v) in [
            ("--nats-replicas", "0"),
            ("--nats-replicas", "6"),
            ("--nats-prefix", "a.b"),
            ("--nats-prefix", "a_b"),
            ("--nats-prefix", ""),
            ("--nats-lease", "1s"),
            ("--nats-lease", "11m"),
            ("--nats-lease", "soon"),
        ] {
            let e = serve(&[flag, v], &[]).unwrap_err();
            assert!(e.contains(flag), "{flag} {v:?}: {e}");
        }
    }

    #[test]
    fn bad_store_values_name_the_flag() {
        for v in [
            "",
            "SQLite",
            "postgres://db:5432",
            "nats://",
            "nats://n1",
            "nats://n1:0",
            "nats://n1:65536",
            "nats://n1:4222,",
            "nats://:4222",
            "nats://user@n1:4222",
            "nats://:pw@n1:4222",
            "nats://n1:4222/path",
        ] {
            let e = serve(&["--store", v], &[]).unwrap_err();
            assert!(e.contains("--store"), "{v:?}: {e}");
        }
        assert!(serve(&[], &[("SLUICE_STORE", "bogus")])
            .unwrap_err()
            .contains("SLUICE_STORE"));
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }
}
