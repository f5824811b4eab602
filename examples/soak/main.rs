//! # nudge-soak: a churn soak of the real `nudge` binary
//!
//! ```sh
//! cargo build --release --bin nudge --example soak
//! # by hand (docs/reliability.md, "The churn soak", has its latest figures):
//! target/release/examples/soak --duration 150s --clients 600 --burst 2000 --topics 200 --nodes 2 --drills
//! # scripts/test.sh, on the debug build:
//! target/debug/examples/soak --duration 40s --clients 300 --burst 500 --topics 100 --nodes 2 --drills
//! ```
//!
//! It starts `nudge` (next to this program in `target/<profile>/`, or `--nudge PATH`) on free
//! loopback ports, then plays every role around it over real sockets:
//! - **the main API**: an event log (one global position counter, like Box's
//!   `stream_position`), channel registration on nudge's internal listener, and publishes
//!   with positions over many topics (a few hot, most quiet; single objects, arrays and
//!   NDJSON; some with a `stream_type`). It registers and publishes only on ready nodes;
//! - **clients** (`--clients`, plus a `--burst` arriving all at once at 40 % of the run)
//!   that register, long-poll with raw HTTP/1.1 on keep-alive connections, drop a poll
//!   mid-park now and then (closing the socket), pause at random between polls, re-register
//!   on `max_retries`, and now and then leave for longer than `ttl` and come back;
//! - **a checker** that holds every publish against every client it concerns.
//!
//! With `--nodes 2` it also starts a `redis-server` of its own as the bus of two nodes, and
//! with `--drills` it runs the fault drills: from 20 % of the run the bus is interrupted three
//! ways — every node's Redis connection killed, Redis paused for 6 s (both replayed: nothing
//! is excused for them), Redis killed and restarted empty (a reset: every node wakes all) —;
//! at 60 % the second node is drained with SIGTERM (it must exit 0) and started again, while
//! its clients go back to the main API for a URL on the other; at 75 % the first node is
//! upgraded in place (`SIGUSR2`: its clients keep their connections and notice nothing); at
//! 85 % the second node is killed (SIGKILL) and started again on its addresses with its
//! `--state-dir`, while its clients keep polling their URLs (connections it cut or refused
//! meanwhile are counted apart, not as errors). Neither of the last two is excused anything.
//!
//! Small `--ttl`, `--retry-timeout` and `--max-retries` make reconnects, retirements and
//! expiries happen all the time. At the end every client leaves, and the run checks that
//! `nudge_channels`, `nudge_parked_polls`, `nudge_topics` and `nudge_open_connections` return
//! to 0 on every node once `ttl` has passed, that resident memory comes back near its
//! baseline, that no channel id appears in any node's log, and that SIGTERM exits 0. It
//! prints polls, publishes, wakes, the latency distribution and `lost: N`, and exits 1 on
//! any failure.
//!
//! ## The checker's rule
//! Two kinds of clients, as in the wild:
//! - **Cursor clients** poll with `stream_position` = the log position of their last fetch
//!   from the main API. They fetch when they start (before registering) and after every
//!   `new_change`; on `max_retries` they re-register and keep their cursor.
//! - **Mark clients** poll without a position: only the channel's pending mark can carry a
//!   change across the gap between two polls.
//!
//! A publish of an entry on topic T at log position p is *sent* at `s` and *answered* at `a`.
//! (The entry is appended to the log before `s`.) For every client following T whose
//! `stream_type` filter the entry passes, it creates an obligation:
//! - cursor client: if p is above the cursor the client started this life with. It is
//!   discharged by the client's first fetch whose log head is ≥ p. Fetches happen only at
//!   start and right after a `new_change`, so a discharge after `s` *is* a `new_change`
//!   received after the publish began (typically by a poll parked at `s`, or by the next
//!   poll, which nudge must answer at once because of the pending mark or because the
//!   topic's position is above the poll's `stream_position`). A fetch before `s` that
//!   already saw p discharges it too: the data was fetched, and SPEC §3 lets nudge drop a
//!   mark set only by positions the poll has seen ("covered early"). Nothing is excused for
//!   cursor clients: a cancelled poll, a retired or expired channel, a node restart are all
//!   healed by the position on the next poll.
//! - mark client: only if its current channel's registration answer arrived before `s`
//!   (the channel was live). It is discharged by a `new_change` answer received after `s`,
//!   on whatever poll (a poll in flight at `s` counts). Excused, and counted apart:
//!   - the client cancelled a poll (or lost its connection) after `s`: nudge may have
//!     written the answer to that socket before it saw it close, which is transport-level,
//!     not a nudge loss. A change published after the cancel must still come;
//!   - the channel answered `max_retries` to a poll sent before `a`: the publish raced the
//!     retirement. But if `a` came before that poll was sent, the change was pending when
//!     the poll arrived and must have won over the spent budget: that is a loss at once
//!     (unless it was published around a bus gap, see below: a channel retired during the
//!     gap is not live when the gap ends, and only live channels are marked);
//!   - the client's node was drained (drills only).
//!
//! With a bus, a publish answered `200` is in Redis, not yet applied on the nodes, and a
//! busy node may apply it long after: the `max_retries` case above counts a loss only when
//! the client's node had *said* it had applied the change before the poll was sent (the
//! `tracker` asks every node, through probe channels polled with `stream_position`). Gaps that
//! the nodes replay (connections killed, Redis paused) get no allowance at all: a change
//! published during one is due `--deadline` after its publish was answered, like any other
//! (a publish sent while Redis is paused waits for it and is answered when it is back). Only the reset
//! drill (Redis restarted empty: the stream is gone and every node wakes all) has a window:
//! a change published from 1 s before Redis is killed until 2 s after the last node is back
//! is due `--deadline` after that: until a node is back it cannot know of the change, and
//! while it wakes all a parked poll may be out of its channel's list, waiting for its turn
//! (docs/scaling-out.md, "When something dies").
//!
//! **Spurious wake-ups** are counted too: a `new_change` received by a client when no
//! publish on any of its topics was sent since its previous `new_change` (or the start of
//! its life), less 2 s (a publish sent just before an answer may reach the channel after it,
//! and leave its mark). Outside the reset drill's window there should be none: a replayed
//! gap touches only the channels its entries concern.
//!
//! The report splits obligations, losses, spurious wake-ups and what the reset window
//! excused (`excused`: obligations that only that window kept from being lost) by **phase**:
//! the drill that was on when the publish was sent or the answer came (`kill`, `pause`,
//! `reset`, `drain`, joined by `+` when a short run overlaps them), or `no drill`.
//!
//! An obligation not discharged within `--deadline` (2 s) is **lost**. The clock runs from
//! the publish's answer and stops while the client deliberately pauses between polls (a
//! paused client is not polling, so nothing can reach it); it does not stop for anything
//! nudge does. Obligations
//! still open when a client leaves are dropped (counted), unless already overdue.
//!
//! ## The tour
//! - `node`: one `nudge` process (the test kit's launcher), its log file, metrics and memory.
//! - `client`: a client's life over raw HTTP/1.1 (the test kit's client).
//! - `publish`: the main API's publisher, and the bus tracker.
//! - `checker`: the ledger of obligations and the rule above.
//! - `drills`: the bus drills (connections killed, Redis paused, Redis restarted empty); a
//!   node drained and restarted; a node upgraded in place; a node crashed and restored.
//! - `report`: the figures, the JSON report and the verdict.
//! - here: the flags, the shared state, and the run from start to verdict.

mod checker;
mod client;
mod drills;
mod node;
mod publish;
mod report;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

use checker::{Book, Kind, Ledger};
use client::{Life, client};
use drills::{bus_drills, crash_drill, drain_drill, upgrade_drill};
use node::Node;
use nudge_testkit::redis::RedisServer;
use publish::{publisher, tracker};
use report::{Outcome, report};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "soak",
    about = "Churn soak of the real nudge binary (see the source header)."
)]
struct Args {
    /// How long clients poll and the publisher publishes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Clients polling from the start.
    #[arg(long, default_value_t = 300)]
    clients: usize,
    /// Clients arriving all at once at 40 % of the run (0: no burst).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Topics; one in twenty is hot.
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Publish requests per second.
    #[arg(long, default_value_t = 30.0)]
    publish_rate: f64,
    /// nudge's `--ttl`.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// nudge's `--retry-timeout`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_timeout: Duration,
    /// nudge's `--max-retries`.
    #[arg(long, default_value_t = 2)]
    max_retries: u32,
    /// A change must reach each client within this (pauses excluded).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Chance that a poll is dropped by its client mid-park.
    #[arg(long, default_value_t = 0.1)]
    cancel_prob: f64,
    /// Chance of a pause after an answer.
    #[arg(long, default_value_t = 0.3)]
    pause_prob: f64,
    /// Longest pause between two polls (keep it under `--ttl`).
    #[arg(long, default_value = "800ms", value_parser = humantime::parse_duration)]
    pause_max: Duration,
    /// Chance, after an answer, that a client leaves for longer than `ttl` and comes back.
    #[arg(long, default_value_t = 0.003)]
    leave_prob: f64,
    /// Nodes sharing one Redis bus (1 or 2; 2 starts a `redis-server` of its own).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Fault drills (needs `--nodes 2`): the bus drills from 20 % of the run (connections
    /// killed, Redis paused, Redis restarted empty), the second node drained with SIGTERM and
    /// restarted at 60 % while its clients move, the first upgraded in place at 75 %, the
    /// second killed and restored from its state directory at 85 %.
    #[arg(long)]
    drills: bool,
    /// The Redis server binary for `--nodes 2`.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// The nudge binary [default: `nudge` next to this program's profile directory].
    #[arg(long)]
    nudge: Option<PathBuf>,
    /// Where nudge's logs go [default: a fresh directory under the system temp dir].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Wait at least this long after the leak check before the last memory sample (lets the node's
    /// 60 s memory of retired ids run out, and an allocator return what it keeps).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    rss_settle: Duration,
    /// Seed of the clients' choices (timing still varies from run to run).
    #[arg(long)]
    seed: Option<u64>,
}

/// Where a client's channel lives: a node slot, and which process in it (a restarted node
/// is a new process with new ports and none of the old channels).
#[derive(Clone, Copy)]
struct NodeAddrs {
    public: SocketAddr,
    internal: SocketAddr,
    index: usize,
    epoch: u64,
}

/// The main API's view of a node.
struct NodeSlot {
    addrs: NodeAddrs,
    /// Not draining: the main API sends new clients and publishes here.
    up: bool,
    /// Its bus subscription is up (`/readyz` would say 200).
    bus_ok: bool,
    /// Killed by the crash drill and coming back on the same addresses: until this instant
    /// (unset while it is down), a broken connection to it is the crash's doing.
    crash_cut_until: Option<Option<Instant>>,
}

#[derive(Default)]
struct Figures {
    polls: AtomicU64,
    new_change: AtomicU64,
    reconnect: AtomicU64,
    max_retries: AtomicU64,
    cancelled: AtomicU64,
    answered_at_cancel: AtomicU64,
    /// Cancelled polls whose client left with bytes queued behind them, or by RST.
    left_with_bytes_or_reset: AtomicU64,
    too_many_polls: AtomicU64,
    over_capacity: AtomicU64,
    transport_errors: AtomicU64,
    /// Clients that went back to the main API because their node drained.
    moved: AtomicU64,
    /// Polls whose connection the crash drill cut or refused (retried on the same URL).
    cut_by_crash: AtomicU64,
    protocol_errors: AtomicU64,
    registrations: AtomicU64,
    leaves: AtomicU64,
    expired_on_time: AtomicU64,
    expiry_late: AtomicU64,
    publish_requests: AtomicU64,
    publishes: AtomicU64,
    publish_retries: AtomicU64,
    burst_parked: AtomicUsize,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Ctx {
    args: Args,
    http: reqwest::Client,
    nodes: RwLock<Vec<NodeSlot>>,
    ledger: Ledger,
    /// The main API's event log: its latest position.
    head: AtomicU64,
    /// The newest position a publish answered `200` carried.
    published: AtomicU64,
    figures: Figures,
    /// Every channel id handed out, to look for in nudge's logs.
    ids: Mutex<HashSet<String>>,
    protocol_samples: Mutex<Vec<String>>,
    stop_clients: watch::Receiver<bool>,
    stop_publisher: AtomicBool,
    /// What the drills saw, for the report; and what went wrong in them.
    drill_notes: Mutex<Vec<String>>,
    drill_failures: Mutex<Vec<String>>,
}

fn topic_name(t: u32) -> String {
    format!("soak:t{t}")
}

fn hot_topics(topics: usize) -> usize {
    (topics / 20).max(1)
}

/// A registered channel, as the main API hands it to its client.
struct Registered {
    id: String,
    /// `/subscribe?channel=…&stream_type=…`
    target: String,
    node: NodeAddrs,
}

impl Ctx {
    fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn protocol_error(&self, what: String) {
        inc(&self.figures.protocol_errors);
        let mut samples = self.protocol_samples.lock();
        if samples.len() < 20 {
            samples.push(what);
        }
    }

    /// A node for new work: the preferred one if it is up and ready, else any that is.
    fn pick_node(&self, prefer: usize) -> Option<NodeAddrs> {
        let nodes = self.nodes.read();
        let ok = |n: &NodeSlot| n.up && n.bus_ok;
        let preferred = &nodes[prefer % nodes.len()];
        if ok(preferred) {
            return Some(preferred.addrs);
        }
        nodes.iter().find(|n| ok(n)).map(|n| n.addrs)
    }

    /// Whether a broken connection to this node is the crash drill's doing.
    fn cut_by_crash(&self, addrs: &NodeAddrs) -> bool {
        match self.nodes.read()[addrs.index].crash_cut_until {
            Some(None) => true,
            Some(Some(until)) => Instant::now() < until,
            None => false,
        }
    }

    /// Whether the node a channel lives on is still there and not draining.
    fn node_current(&self, addrs: &NodeAddrs) -> bool {
        let nodes = self.nodes.read();
        let n = &nodes[addrs.index];
        n.addrs.epoch == addrs.epoch && n.up
    }

    /// The main API registers a channel for client `slot` on a node.
    async fn register(&self, slot: usize) -> Result<Registered, String> {
        let (topics, stream_type) = self.ledger.topics(slot);
        let node = self.pick_node(slot).ok_or("no ready node")?;
        let body = json!({
            "topics": topics.iter().map(|&t| topic_name(t)).collect::<Vec<_>>(),
            "subject": format!("soak:{slot}"),
            "stream_type": stream_type.unwrap_or("all"),
        });
        let res = self
            .http
            .post(format!("http://{}/v1/channels", node.internal))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("register: {e}"))?;
        if res.status() != reqwest::StatusCode::CREATED {
            return Err(format!("register: status {}", res.status()));
        }
        let body: Value = res.json().await.map_err(|e| format!("register: {e}"))?;
        let (id, target) = self.registered_channel(&body)?;
        inc(&self.figures.registrations);
        Ok(Registered { id, target, node })
    }

    /// Reads a `201` registration answer: the channel id (remembered, to look for in the
    /// logs) and the `/subscribe?…` target of its URL.
    fn registered_channel(&self, body: &Value) -> Result<(String, String), String> {
        let id = body["channel"].as_str().ok_or("no channel")?.to_owned();
        let url = body["entries"][0]["url"].as_str().ok_or("no url")?;
        let target = url[url.find("/subscribe").ok_or("odd url")?..].to_owned();
        self.ids.lock().insert(id.clone());
        Ok((id, target))
    }

    /// Registers, retrying for up to 30 s (a burst, or no node ready during a drill).
    async fn register_retrying(&self, slot: usize) -> Option<Registered> {
        for attempt in 0..300 {
            if *self.stop_clients.borrow() {
                return None;
            }
            match self.register(slot).await {
                Ok(r) => {
                    self.ledger.registered(slot);
                    return Some(r);
                }
                Err(e) if attempt == 299 => self.protocol_error(e),
                Err(_) => sleep(Duration::from_millis(100)).await,
            }
        }
        None
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// Channel ids (22 characters of base64url) that appear in a log file.
fn ids_in_log(log: &std::path::Path, ids: &HashSet<String>) -> usize {
    let Ok(text) = std::fs::read_to_string(log) else {
        return 0;
    };
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|w| w.len() == 22 && ids.contains(*w))
        .count()
}

/// What a drill's task gave back, waiting up to 60 s for it; a failure named after `drill`
/// when it did not finish.
async fn finish<T>(ctx: &Ctx, task: Option<tokio::task::JoinHandle<T>>, drill: &str) -> Option<T> {
    let outcome = tokio::time::timeout(Duration::from_secs(60), task?).await;
    match outcome {
        Ok(Ok(value)) => Some(value),
        _ => {
            ctx.drill_failures
                .lock()
                .push(format!("{drill} did not finish"));
            None
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    // Thousands of sockets: raise our own soft open-files limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let bin = match &args.nudge {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .and_then(|examples| examples.parent())
            .ok_or("cannot find the profile directory")?
            .join("nudge"),
    };
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --bin nudge), or pass --nudge",
            bin.display()
        ));
    }
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("nudge-soak-{}", std::process::id())));
    std::fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())?;

    let node_args: Vec<String> = [
        "--ttl".to_owned(),
        humantime::format_duration(args.ttl).to_string(),
        "--retry-timeout".to_owned(),
        humantime::format_duration(args.retry_timeout).to_string(),
        "--max-retries".to_owned(),
        args.max_retries.to_string(),
        "--drain-period".to_owned(),
        "1s".to_owned(),
    ]
    .into();
    if args.drills && args.nodes != 2 {
        return Err("--drills needs --nodes 2".to_owned());
    }
    if !(1..=2).contains(&args.nodes) {
        return Err("--nodes is 1 or 2".to_owned());
    }
    let mut node_args = node_args;
    let mut redis = None;
    if args.nodes == 2 {
        let r = RedisServer::start(&args.redis_server).await?;
        node_args.extend(["--redis-url".to_owned(), r.url()]);
        redis = Some(r);
    }
    // node-a can be upgraded in place (the upgrade drill follows it through its pid file);
    // node-b, once restarted by the drain drill, keeps a state directory for the crash drill.
    let pid_file = log_dir.join("node-a.pid");
    let node_a_args: Vec<String> = node_args
        .iter()
        .cloned()
        .chain(["--pid-file".to_owned(), pid_file.display().to_string()])
        .collect();
    let node_b_restart_args: Vec<String> = node_args
        .iter()
        .cloned()
        .chain([
            "--state-dir".to_owned(),
            log_dir.join("node-b-state").display().to_string(),
            "--state-interval".to_owned(),
            "200ms".to_owned(),
        ])
        .collect();
    let mut node = Node::start(
        "node-a",
        &bin,
        &node_a_args,
        log_dir.join("node-a.log"),
        &http,
    )
    .await?;
    let rss_baseline = node.rss_bytes().unwrap_or(0);
    let mut other = match args.nodes {
        2 => Some(
            Node::start(
                "node-b",
                &bin,
                &node_args,
                log_dir.join("node-b.log"),
                &http,
            )
            .await?,
        ),
        _ => None,
    };

    // Clients: their kind, filter and topics are fixed per slot.
    let hot = hot_topics(args.topics);
    let total_clients = args.clients + args.burst;
    let books = (0..total_clients)
        .map(|slot| {
            let kind = if slot % 3 == 2 {
                Kind::Mark
            } else {
                Kind::Cursor
            };
            let stream_type = (rng.u8(0..5) == 0).then_some("changes");
            let mut topics = Vec::new();
            if rng.bool() {
                topics.push(rng.usize(0..hot) as u32);
            }
            let quiet = rng.usize(1..=2);
            for _ in 0..quiet {
                let t = if hot < args.topics {
                    rng.usize(hot..args.topics)
                } else {
                    rng.usize(0..hot)
                } as u32;
                if !topics.contains(&t) {
                    topics.push(t);
                }
            }
            Book::new(kind, stream_type, topics)
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        ledger: Ledger::new(books, args.topics, args.deadline, args.nodes > 1),
        nodes: RwLock::new(
            std::iter::once(&node)
                .chain(other.as_ref())
                .enumerate()
                .map(|(index, n)| NodeSlot {
                    addrs: NodeAddrs {
                        public: n.public,
                        internal: n.internal,
                        index,
                        epoch: 0,
                    },
                    up: true,
                    bus_ok: true,
                    crash_cut_until: None,
                })
                .collect(),
        ),
        drill_notes: Mutex::new(Vec::new()),
        drill_failures: Mutex::new(Vec::new()),
        http: http.clone(),
        head: AtomicU64::new(0),
        published: AtomicU64::new(0),
        figures: Figures::default(),
        ids: Mutex::new(HashSet::new()),
        protocol_samples: Mutex::new(Vec::new()),
        stop_clients: stop_rx,
        stop_publisher: AtomicBool::new(false),
        args: args.clone(),
    });
    eprintln!(
        "soak: nudge {} public={} internal={}; {} clients (+{} burst), {} topics ({} hot), {:?}, seed {seed}; logs in {}",
        bin.display(),
        node.public,
        node.internal,
        args.clients,
        args.burst,
        args.topics,
        hot,
        args.duration,
        log_dir.display()
    );

    let started = Instant::now();
    let mut clients = JoinSet::new();
    for slot in 0..args.clients {
        let rng =
            fastrand::Rng::with_seed(seed ^ (slot as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        clients.spawn(client(ctx.clone(), slot, Life::Resident, rng));
    }
    let publisher_task = tokio::spawn(publisher(ctx.clone(), fastrand::Rng::with_seed(seed ^ 1)));
    let tracker_task = (args.nodes > 1).then(|| tokio::spawn(tracker(ctx.clone())));

    // The run: scan the ledger, sample memory, fire the burst at 40 %.
    let burst_at = started + args.duration.mul_f64(0.4);
    let mut burst_fired = args.burst == 0;
    let mut burst_ready: Option<Duration> = None;
    let mut rss_peak = rss_baseline;
    let end = started + args.duration;
    let mut ticks = 0u64;
    let redis_drill_at = started + args.duration.mul_f64(0.2);
    let drain_drill_at = started + args.duration.mul_f64(0.6);
    let upgrade_drill_at = started + args.duration.mul_f64(0.75);
    let crash_drill_at = started + args.duration.mul_f64(0.85);
    let mut redis_task = None;
    let mut drain_task = None;
    let mut drain_started = false;
    let mut upgraded = false;
    let mut crash_task = None;
    while Instant::now() < end {
        sleep(Duration::from_millis(100)).await;
        ctx.ledger.scan();
        if args.drills && redis_task.is_none() && Instant::now() >= redis_drill_at {
            eprintln!(
                "soak: drills: Redis connections killed, Redis paused, Redis restarted empty"
            );
            let r = redis.take().expect("started with --nodes 2");
            redis_task = Some(tokio::spawn(bus_drills(ctx.clone(), r)));
        }
        if args.drills && !drain_started && Instant::now() >= drain_drill_at {
            drain_started = true;
            eprintln!("soak: drill: node-b drained with SIGTERM and restarted");
            let b = other.take().expect("started with --nodes 2");
            drain_task = Some(tokio::spawn(drain_drill(
                ctx.clone(),
                b,
                1,
                bin.clone(),
                node_b_restart_args.clone(),
                log_dir.join("node-b-restarted.log"),
            )));
        }
        if args.drills && !upgraded && Instant::now() >= upgrade_drill_at {
            upgraded = true;
            eprintln!("soak: drill: node-a upgraded in place with SIGUSR2");
            upgrade_drill(&ctx, &mut node, &pid_file).await;
        }
        if crash_task.is_none()
            && Instant::now() >= crash_drill_at
            && drain_task.as_ref().is_some_and(|t| t.is_finished())
        {
            eprintln!("soak: drill: node-b killed with SIGKILL and started again with its state");
            let b = drain_task.take().expect("finished").await;
            crash_task = Some(tokio::spawn(crash_drill(
                ctx.clone(),
                b.map_err(|e| e.to_string())?,
                1,
                bin.clone(),
                node_b_restart_args.clone(),
                log_dir.join("node-b-after-crash.log"),
            )));
        }
        ticks += 1;
        if ticks.is_multiple_of(10) {
            rss_peak = rss_peak.max(node.rss_bytes().unwrap_or(0));
        }
        if !burst_fired && Instant::now() >= burst_at {
            burst_fired = true;
            eprintln!("soak: burst of {} clients", args.burst);
            for slot in args.clients..total_clients {
                let mut rng = fastrand::Rng::with_seed(
                    seed ^ (slot as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let stay = Duration::from_millis(rng.u64(3000..8000));
                clients.spawn(client(ctx.clone(), slot, Life::Visitor(stay), rng));
            }
        }
        if burst_fired
            && burst_ready.is_none()
            && args.burst > 0
            && ctx.figures.burst_parked.load(Ordering::Relaxed) == args.burst
        {
            burst_ready = Some(burst_at.elapsed());
        }
    }

    // Stop publishing; let the last obligations settle; then every client leaves.
    ctx.stop_publisher.store(true, Ordering::Release);
    let _ = publisher_task.await;
    if let Some(tracker) = tracker_task {
        tracker.abort();
    }
    let settle_until = Instant::now() + args.deadline + args.pause_max + Duration::from_secs(2);
    while ctx.ledger.scan() > 0 && Instant::now() < settle_until {
        sleep(Duration::from_millis(50)).await;
    }
    ctx.ledger.scan();
    let _ = stop_tx.send(true);
    let left = tokio::time::timeout(Duration::from_secs(20), async {
        while clients.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let soak_time = started.elapsed();
    if let Some(r) = finish(&ctx, redis_task, "bus drills").await {
        redis = r;
    }
    if let Some(b) = finish(&ctx, drain_task, "drain drill").await {
        other = Some(b);
    }
    let crashed = crash_task.is_some();
    if let Some(b) = finish(&ctx, crash_task, "crash drill").await {
        other = Some(b);
    }
    if args.drills && !(upgraded && crashed) {
        ctx.drill_failures
            .lock()
            .push("a drill did not run (the run is too short for all of them)".to_owned());
    }

    // Leak check: everything returns to 0 once ttl has passed.
    let leak_started = Instant::now();
    let leak_deadline = leak_started + args.ttl * 2 + Duration::from_secs(5);
    let gauges = [
        "nudge_channels",
        "nudge_parked_polls",
        "nudge_topics",
        "nudge_open_connections",
    ];
    let mut last = Default::default();
    let drained = loop {
        let mut values = vec![0.0; gauges.len()];
        for n in std::iter::once(&node).chain(other.as_ref()) {
            let m = n.metrics(&http).await.unwrap_or_default();
            for (v, g) in values.iter_mut().zip(gauges) {
                *v += *m.get(g).unwrap_or(&-1.0);
            }
        }
        if values.iter().all(|&v| v == 0.0) {
            break Some(leak_started.elapsed());
        }
        last = values;
        if Instant::now() > leak_deadline {
            break None;
        }
        sleep(Duration::from_millis(200)).await;
    };
    let mut node_metrics = node.metrics(&http).await.unwrap_or_default();
    if let Some(b) = &other {
        for (k, v) in b.metrics(&http).await.unwrap_or_default() {
            *node_metrics.entry(k).or_default() += v;
        }
    }
    // "Near its baseline": within 10 % of what the run added (at least 8 MiB, for the
    // allocator's own bookkeeping and the node's 60 s memory of retired ids). The allocator
    // hands freed pages back within seconds (jemalloc's decay), so wait up to 30 s for it.
    let rss_allowance = (rss_peak.saturating_sub(rss_baseline) / 10).max(8 << 20);
    let rss_wait_started = Instant::now();
    let rss_wait_until = rss_wait_started + Duration::from_secs(30).max(args.rss_settle);
    let (rss_after, rss_took) = loop {
        let rss = node.rss_bytes().unwrap_or(0);
        let waited = rss_wait_started.elapsed();
        if (rss <= rss_baseline + rss_allowance && waited >= args.rss_settle)
            || Instant::now() >= rss_wait_until
        {
            break (rss, waited);
        }
        sleep(Duration::from_secs(1)).await;
    };
    let rss_ok = rss_after <= rss_baseline + rss_allowance;

    // Shutdown: SIGTERM drains and exits 0.
    node.sigterm();
    if let Some(b) = &other {
        b.sigterm();
    }
    let mut exit = node.wait_exit(Duration::from_secs(15)).await;
    if let Some(b) = other.as_mut() {
        let e = b.wait_exit(Duration::from_secs(15)).await;
        if !e.is_some_and(|e| e.success()) {
            exit = e;
        }
    }
    // The bus outlives the nodes; it goes with them now.
    drop(redis);
    let ids = ctx.ids.lock().clone();
    let ids_logged: usize = std::fs::read_dir(&log_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| ids_in_log(&e.path(), &ids))
                .sum()
        })
        .unwrap_or(0);

    let outcome = Outcome {
        seed,
        burst_ready,
        soak_time,
        left,
        node_metrics,
        gauges,
        last,
        drained,
        rss_baseline,
        rss_peak,
        rss_after,
        rss_allowance,
        rss_took,
        rss_ok,
        shut_down: std::iter::once(&node)
            .chain(other.as_ref())
            .map(|n| n.name.clone())
            .collect(),
        exit,
        ids_logged,
        ids: ids.len(),
    };
    Ok(report(&ctx, outcome))
}
