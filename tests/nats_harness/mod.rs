//! Real `nats-server` processes for the NATS client tests: one JetStream
//! node, or a three-node JetStream cluster, each on free loopback ports with
//! a temporary store directory, killed (SIGKILL) on drop. A missing
//! `nats-server` binary fails the test with instructions; it never skips.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::nats::jetstream::{JetStream, StreamConfig};
use sluice::nats::{NatsClient, Options};

/// `$NATS_SERVER`, else `nats-server` on PATH, else the Debian package's path.
pub fn nats_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/usr/bin"]) {
        let candidate = PathBuf::from(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "nats-server not found (needed by the NATS client tests): install it \
         (`make deps` does, on Debian as root: apt-get install nats-server) \
         or set NATS_SERVER=/path/to/nats-server"
    );
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// One nats-server process.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    /// (cluster name, peers' cluster ports) for a clustered node.
    cluster: Option<(String, Vec<u16>)>,
    child: Option<Child>,
    _store: tempfile::TempDir,
}

impl Node {
    fn spawn(name: &str, port: u16, cluster: Option<(&str, u16, &[u16])>) -> Node {
        let store = tempfile::tempdir().expect("temp store dir");
        // As the README's config: room for Sluice's default 4 MiB messages.
        std::fs::write(store.path().join("nats.conf"), "max_payload: 8MB\n")
            .expect("write nats.conf");
        let mut node = Node {
            name: name.to_string(),
            port,
            cluster_port: cluster.map_or(0, |c| c.1),
            cluster: cluster.map(|(n, _, peers)| (n.to_string(), peers.to_vec())),
            child: None,
            _store: store,
        };
        node.launch();
        node
    }

    /// Starts the process (again: same ports, same store directory).
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.name);
        let binary = nats_server_binary();
        let store = self._store.path();
        let mut cmd = Command::new(&binary);
        cmd.arg("-c").arg(store.join("nats.conf"));
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-n",
            &self.name,
        ])
        .arg("-sd")
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("NATS_SERVER_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        if let Some((cluster_name, peers)) = &self.cluster {
            let routes: Vec<String> = peers
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args([
                "--cluster_name",
                cluster_name,
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_port),
                "--routes",
                &routes.join(","),
            ]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): the NATS client tests need nats-server \
                 (`make deps` installs it on Debian as root)",
                binary.display()
            )
        });
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait for the process to go.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options with short timeouts so tests stay bounded.
pub fn test_options() -> Options {
    Options {
        connect_timeout: Duration::from_millis(500),
        ping_interval: Duration::from_millis(500),
        max_pings_out: 2,
        reconnect_initial_wait: Duration::from_millis(50),
        reconnect_max_wait: Duration::from_millis(500),
        ..Options::default()
    }
}

/// Retries `f` until it returns Some, panicking with `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects and waits until `$JS.API.INFO` answers.
pub fn connect_ready(url: &str, limit: Duration) -> Arc<NatsClient> {
    wait_for(limit, &format!("JetStream at {url}"), || {
        let c = Arc::new(NatsClient::connect(url, test_options()).ok()?);
        JetStream::new(Arc::clone(&c), Duration::from_secs(1))
            .account_info()
            .ok()?;
        Some(c)
    })
}

/// One JetStream-enabled node.
pub struct SingleNode {
    pub node: Node,
}

impl SingleNode {
    pub fn start() -> (SingleNode, Arc<NatsClient>) {
        let node = Node::spawn("solo", free_port(), None);
        let client = connect_ready(&node.url(), Duration::from_secs(10));
        (SingleNode { node }, client)
    }
}

/// Three JetStream nodes routed into one cluster.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts the nodes and waits until an R3 stream can be created (the
    /// JetStream meta group has a leader and every peer is known). The
    /// free ports are picked before the nodes bind them, so another process
    /// can take one meanwhile and leave a node out: a cluster that does not
    /// form in time is started again on new ports (three tries).
    pub fn start(cluster_name: &str) -> Cluster {
        for attempt in 1..=3 {
            if let Some(cluster) = Self::try_start(cluster_name) {
                return cluster;
            }
            eprintln!("cluster {cluster_name} did not form (try {attempt}); starting it again");
        }
        panic!("cluster {cluster_name} did not form in three tries: no R3 stream creatable");
    }

    fn try_start(cluster_name: &str) -> Option<Cluster> {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes: Vec<Node> = (0..3)
            .map(|i| {
                let peers: Vec<u16> = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect();
                Node::spawn(
                    &format!("{cluster_name}-n{i}"),
                    ports[i],
                    Some((cluster_name, cluster_ports[i], &peers)),
                )
            })
            .collect();
        let cluster = Cluster { nodes };
        let client = connect_ready(&cluster.url(), Duration::from_secs(15));
        let js = JetStream::new(client, Duration::from_secs(2));
        let probe = StreamConfig::new("READY_PROBE", vec!["ready.probe".into()]).replicas(3);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if js.create_or_verify_stream(&probe).is_ok() {
                return Some(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Every live node's URL, as one server list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node started with `-n name` (INFO's server_name).
    pub fn node_named(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node with that name")
    }
}
