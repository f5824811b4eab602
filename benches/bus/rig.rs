//! The processes of one measured run, started fresh for it: a `redis-server` of the bench's
//! own (the test kit's `RedisServer`) and one or two nudge nodes (the test kit's `Node`),
//! on free loopback ports. Dropped, everything is killed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nudge_testkit::node::{FREE_PORTS, Node, Options};
use nudge_testkit::raw::Client;
use nudge_testkit::redis::RedisServer;
use tokio::time::Instant;

use crate::resp::Redis;

/// How a publish travels to the parked poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// One node, no `--redis-url`: the publish is posted to the node the poll is parked on.
    NoBus,
    /// Two nodes on one Redis: the publish is posted to node A's internal API, which
    /// `XADD`s it; node B's reader gets it from its `XREAD BLOCK` and wakes the poll.
    BusViaNode,
    /// The same two nodes, the publish `XADD`ed into Redis by the bench, as a main API may.
    BusViaXadd,
    /// No nudge at all: the bench's own `XADD` wakes the bench's own `XREAD BLOCK`. The
    /// least any reader of a Redis stream can take on this machine: a reference for the
    /// rows above, not a target.
    RedisAlone,
}

impl Setup {
    pub const ALL: [Setup; 4] = [
        Setup::NoBus,
        Setup::BusViaNode,
        Setup::BusViaXadd,
        Setup::RedisAlone,
    ];

    /// The knob's name (`NUDGE_BENCH_SETUPS`).
    pub fn key(self) -> &'static str {
        match self {
            Setup::NoBus => "nobus",
            Setup::BusViaNode => "bus-node",
            Setup::BusViaXadd => "bus-xadd",
            Setup::RedisAlone => "redis",
        }
    }

    /// The table's name.
    pub fn label(self) -> &'static str {
        match self {
            Setup::NoBus => "1 node, no bus",
            Setup::BusViaNode => "2 nodes + Redis, publish to node A",
            Setup::BusViaXadd => "2 nodes + Redis, XADD by the bench",
            Setup::RedisAlone => "Redis alone: XADD wakes an XREAD BLOCK",
        }
    }

    pub fn parse(key: &str) -> Option<Setup> {
        Setup::ALL.into_iter().find(|s| s.key() == key)
    }

    pub fn nodes(self) -> usize {
        match self {
            Setup::NoBus => 1,
            Setup::BusViaNode | Setup::BusViaXadd => 2,
            Setup::RedisAlone => 0,
        }
    }

    pub fn has_redis(self) -> bool {
        self != Setup::NoBus
    }
}

/// The running processes of one run.
pub struct Rig {
    pub redis: Option<RedisServer>,
    /// Node A (publishes are posted here), then node B (polls park here); one node without
    /// a bus is both.
    pub nodes: Vec<Node>,
}

impl Rig {
    pub async fn start(setup: Setup, nudge: &Path, redis_server: &Path) -> Result<Rig, String> {
        let redis = if setup.has_redis() {
            Some(RedisServer::start(redis_server).await?)
        } else {
            None
        };
        let mut nodes = Vec::new();
        for _ in 0..setup.nodes() {
            let mut command = Command::new(nudge);
            command
                .args(FREE_PORTS)
                // Nothing times out during a run, and several runs' channels fit.
                .args(["--retry-timeout", "600s", "--ttl", "30m"])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1");
            if let Some(redis) = &redis {
                command.args(["--redis-url", &redis.url()]);
            }
            let options = Options {
                within: Duration::from_secs(10),
                keep: 50,
                log_file: None,
            };
            nodes.push(Node::spawn(command, options)?);
        }
        let rig = Rig { redis, nodes };
        for node in &rig.nodes {
            wait_ready(node).await?;
        }
        Ok(rig)
    }

    /// Where publishes are posted.
    pub fn node_a(&self) -> Option<&Node> {
        self.nodes.first()
    }

    /// Where polls park.
    pub fn node_b(&self) -> Option<&Node> {
        self.nodes.last()
    }

    pub fn redis_addr(&self) -> Option<SocketAddr> {
        let port = self.redis.as_ref()?.port();
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The last log lines of every node, for an error message.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let logs = node.logs();
            let tail = &logs[logs.len().saturating_sub(5)..];
            out.push_str(&format!("\n  node {}: {}", i + 1, tail.join("\n    ")));
        }
        out
    }
}

/// Waits until `GET /readyz` is 200: with a bus, its reader is connected and reading.
async fn wait_ready(node: &Node) -> Result<(), String> {
    let mut client = Client::new(node.internal);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::from("not asked yet");
    while Instant::now() < deadline {
        match client.request("GET", "/readyz", None, b"").await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("status {}: {}", r.status, r.body_text()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "node {} not ready within 10 s ({last})",
        node.internal
    ))
}

/// Waits until `count` connections block in Redis (the nodes' readers in `XREAD BLOCK`, or
/// the bench's own), so that a round never begins while a reader is between two reads.
pub async fn wait_blocked(
    control: &mut Redis,
    count: u64,
    deadline: Instant,
) -> Result<(), String> {
    let mut last = 0;
    while Instant::now() < deadline {
        last = control
            .blocked_clients()
            .await
            .map_err(|e| format!("INFO clients: {e}"))?;
        if last >= count {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err(format!(
        "{count} connection(s) were not blocked in Redis in time (last: {last})"
    ))
}
