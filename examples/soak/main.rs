//! # nudge-soak: a churn soak of the real `nudge` binary
//!
//! ```sh
//! cargo build --release --bin nudge --example soak
//! # by hand (the README, section "Reliability", has its latest figures):
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
//! with `--drills` it runs the fault drills: at 20 % of the run Redis is killed (SIGKILL) and
//! restarted a second later; at 60 % the second node is drained with SIGTERM (it must exit
//! 0) and started again, while its clients go back to the main API for a URL on the other.
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
//! `tracker` asks every node, through probe channels polled with `stream_position`). A change
//! published around a gap in the bus (from 1 s before Redis is killed until the nodes' 2 s
//! gap spread after the last one resubscribed is over) is due `--deadline` after that
//! spread: until a node has resubscribed it cannot know of the change, and until its
//! spread is over a parked poll may be out of its channel's list, waiting for its spread
//! `new_change` (README, "When something dies").
//!
//! An obligation not discharged within `--deadline` (2 s) is **lost**. The clock runs from
//! `s` and stops while the client deliberately pauses between polls (a paused client is not
//! polling, so nothing can reach it); it does not stop for anything nudge does. Obligations
//! still open when a client leaves are dropped (counted), unless already overdue.

mod checker;
mod http;
mod node;

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

use checker::{Book, Kind, Ledger, Published};
use http::Conn;
use node::Node;

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
    /// Fault drills (needs `--nodes 2`): Redis killed and restarted at 20 % of the run, the
    /// second node drained with SIGTERM and restarted at 60 % while its clients move.
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

/// Resolves once the flag is set.
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

enum Life {
    /// Polls until the end, leaving and coming back now and then.
    Resident,
    /// Arrives with the burst, stays this long, and leaves for good.
    Visitor(Duration),
}

/// How a client that gives up on a parked poll leaves (issue 11.1): with nothing, or with
/// bytes queued behind the poll, or having announced a body it never finished; by FIN or RST.
#[derive(Clone, Copy)]
struct Leaving {
    trailer: &'static [u8],
    /// The poll announced `Content-Length: 2` and sent one byte: its connection is never
    /// reused, even when the answer came first.
    partial_body: bool,
    reset: bool,
}

impl Leaving {
    const PLAIN: Leaving = Leaving {
        trailer: b"",
        partial_body: false,
        reset: false,
    };

    fn pick(rng: &mut fastrand::Rng) -> Leaving {
        const TRAILERS: [&[u8]; 4] = [
            b"",
            b"\r\n",
            b"x",
            b"GET /subscribe?channel=pipelined HTTP/1.1\r\nHost: soak\r\n\r\n",
        ];
        Leaving {
            trailer: TRAILERS[rng.usize(..TRAILERS.len())],
            partial_body: rng.u8(..) < 40,
            reset: rng.bool(),
        }
    }
}

enum PollEnd {
    Answer(String),
    Status(u16),
    Cancelled,
    Transport,
    Stop,
}

async fn client(ctx: Arc<Ctx>, slot: usize, life: Life, mut rng: fastrand::Rng) {
    let a = &ctx.args;
    let kind = ctx.ledger.kind(slot);
    let park_max = a.retry_timeout;
    let arrived = Instant::now();
    let mut first_poll = true;
    'life: loop {
        ctx.ledger.start_incarnation(slot, ctx.head());
        let Some(mut channel) = ctx.register_retrying(slot).await else {
            break 'life;
        };
        let mut conn: Option<Conn> = None;
        loop {
            if *ctx.stop_clients.borrow() {
                break 'life;
            }
            let position = match kind {
                Kind::Cursor => format!("&stream_position={}", ctx.ledger.cursor(slot)),
                Kind::Mark if rng.bool() => "&stream_position=now".to_owned(),
                Kind::Mark => String::new(),
            };
            let cancel_after =
                (rng.f64() < a.cancel_prob).then(|| park_max.mul_f64(0.05 + 0.9 * rng.f64()));
            // Half the clients that will give up leave with bytes behind their poll.
            let leaving = match cancel_after {
                Some(_) if rng.bool() => Leaving::pick(&mut rng),
                _ => Leaving::PLAIN,
            };
            let body = if leaving.partial_body {
                "Content-Length: 2\r\n\r\na"
            } else {
                "\r\n"
            };
            let request = format!(
                "GET {}{position} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer soak-api-token-{slot}\r\nUser-Agent: nudge-soak\r\n{body}",
                channel.target, channel.node.public
            );
            let (end, sent) = poll_once(
                &ctx,
                &mut conn,
                channel.node.public,
                &request,
                cancel_after.map(|after| (after, leaving)),
            )
            .await;
            if first_poll {
                first_poll = false;
                if matches!(life, Life::Visitor(_)) {
                    ctx.figures.burst_parked.fetch_add(1, Ordering::Relaxed);
                }
            }
            match end {
                PollEnd::Stop => break 'life,
                PollEnd::Answer(m) if m == "new_change" => {
                    inc(&ctx.figures.new_change);
                    ctx.ledger.new_change(slot, ctx.head());
                }
                PollEnd::Answer(m) if m == "reconnect" => inc(&ctx.figures.reconnect),
                PollEnd::Answer(m) if m == "max_retries" => {
                    inc(&ctx.figures.max_retries);
                    ctx.ledger.max_retries(slot, sent, channel.node.internal);
                    match ctx.register_retrying(slot).await {
                        Some(c) => {
                            // The new channel may live on another node: so must the socket.
                            if c.node.public != channel.node.public {
                                conn = None;
                            }
                            channel = c;
                        }
                        None => break 'life,
                    }
                }
                PollEnd::Answer(m) => ctx.protocol_error(format!("poll answered {m:?}")),
                PollEnd::Status(429) => {
                    inc(&ctx.figures.too_many_polls);
                    sleep(Duration::from_millis(50)).await;
                }
                PollEnd::Status(503) => {
                    inc(&ctx.figures.over_capacity);
                    sleep(Duration::from_millis(200)).await;
                }
                PollEnd::Status(s) => ctx.protocol_error(format!("poll answered status {s}")),
                PollEnd::Cancelled => {
                    inc(&ctx.figures.cancelled);
                    ctx.ledger.cancelled(slot);
                }
                PollEnd::Transport => {
                    ctx.ledger.cancelled(slot);
                    if ctx.node_current(&channel.node) {
                        inc(&ctx.figures.transport_errors);
                        sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if !ctx.node_current(&channel.node) {
                // Its node is draining or gone: back to the main API for a URL elsewhere.
                inc(&ctx.figures.moved);
                ctx.ledger.node_lost(slot);
                drop(conn.take());
                match ctx.register_retrying(slot).await {
                    Some(c) => channel = c,
                    None => break 'life,
                }
            }
            match life {
                Life::Visitor(stay) if arrived.elapsed() > stay => break 'life,
                Life::Resident if rng.f64() < a.leave_prob => {
                    // Away for longer than ttl: the channel must expire meanwhile.
                    ctx.ledger.leave(slot);
                    inc(&ctx.figures.leaves);
                    drop(conn.take());
                    let away = a.ttl + Duration::from_millis(2500 + rng.u64(0..1000));
                    tokio::select! {
                        _ = sleep(away) => {}
                        _ = stopped(ctx.stop_clients.clone()) => return,
                    }
                    check_expired(&ctx, &channel).await;
                    continue 'life;
                }
                _ => {}
            }
            if rng.f64() < a.pause_prob {
                let pause = a.pause_max.mul_f64(rng.f64());
                ctx.ledger.pause_begin(slot);
                tokio::select! {
                    _ = sleep(pause) => {}
                    _ = stopped(ctx.stop_clients.clone()) => {}
                }
                ctx.ledger.pause_end(slot);
            }
        }
    }
    ctx.ledger.leave(slot);
}

/// Sends one poll and waits for its end. Returns the end and when the request was written.
async fn poll_once(
    ctx: &Ctx,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    request: &str,
    cancel: Option<(Duration, Leaving)>,
) -> (PollEnd, Instant) {
    let (cancel_after, leaving) = cancel.unzip();
    let leaving = leaving.unwrap_or(Leaving::PLAIN);
    let mut c = match conn.take() {
        Some(c) => c,
        None => match Conn::connect(addr).await {
            Ok(c) => c,
            Err(_) => return (PollEnd::Transport, Instant::now()),
        },
    };
    if c.send(request.as_bytes()).await.is_err() {
        return (PollEnd::Transport, Instant::now());
    }
    let sent = Instant::now();
    inc(&ctx.figures.polls);
    let cancel = sleep(cancel_after.unwrap_or(Duration::from_secs(3600)));
    let res = tokio::select! {
        res = c.read_response() => Some(res),
        _ = cancel => None,
        _ = stopped(ctx.stop_clients.clone()) => return (PollEnd::Stop, sent),
    };
    let res = match res {
        Some(Ok(r)) => r,
        Some(Err(_)) => return (PollEnd::Transport, sent),
        None => match c.try_complete() {
            // The answer was already here: it was delivered, not cancelled.
            Some(r) => {
                inc(&ctx.figures.answered_at_cancel);
                r
            }
            None => {
                if !leaving.trailer.is_empty() || leaving.partial_body || leaving.reset {
                    inc(&ctx.figures.left_with_bytes_or_reset);
                }
                c.leave(leaving.trailer, leaving.reset).await;
                return (PollEnd::Cancelled, sent);
            }
        },
    };
    if !res.close && !leaving.partial_body {
        *conn = Some(c);
    }
    if res.status != 200 {
        return (PollEnd::Status(res.status), sent);
    }
    match http::message(&res.body) {
        Some(m) => (PollEnd::Answer(m), sent),
        None => {
            ctx.protocol_error(format!(
                "unparsable answer {:?}",
                String::from_utf8_lossy(&res.body)
            ));
            (PollEnd::Status(0), sent)
        }
    }
}

/// After a client's absence longer than ttl, its old channel must be gone.
async fn check_expired(ctx: &Ctx, channel: &Registered) {
    let url = format!(
        "http://{}/v1/channels/{}",
        channel.node.internal, channel.id
    );
    match ctx.http.get(url).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => inc(&ctx.figures.expired_on_time),
        Ok(_) => inc(&ctx.figures.expiry_late),
        Err(_) => {} // its node is gone (drills): nothing to check
    }
}

/// The main API's publisher: appends to its log, then publishes to nudge.
async fn publisher(ctx: Arc<Ctx>, mut rng: fastrand::Rng) {
    let a = &ctx.args;
    let hot = hot_topics(a.topics);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.publish_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !ctx.stop_publisher.load(Ordering::Acquire) {
        tick.tick().await;
        n += 1;
        let entries = if rng.f64() < 0.8 { 1 } else { rng.usize(2..=4) };
        let mut batch = Vec::with_capacity(entries);
        for _ in 0..entries {
            let topic = if rng.bool() || hot == a.topics {
                rng.usize(0..hot)
            } else {
                rng.usize(hot..a.topics)
            } as u32;
            let stream_type = match rng.u8(0..10) {
                0..5 => None,
                5..8 => Some("changes"),
                _ => Some("admin_logs"),
            };
            let position = ctx.head.fetch_add(1, Ordering::AcqRel) + 1;
            batch.push((topic, position, stream_type));
        }
        let object = |&(t, p, st): &(u32, u64, Option<&str>)| {
            let mut o = json!({ "topic": topic_name(t), "position": p });
            if let Some(st) = st {
                o["stream_type"] = json!(st);
            }
            o
        };
        let (content_type, body) = if entries == 1 {
            ("application/json", object(&batch[0]).to_string())
        } else if n.is_multiple_of(2) {
            (
                "application/json",
                Value::Array(batch.iter().map(object).collect()).to_string(),
            )
        } else {
            (
                "application/x-ndjson",
                batch
                    .iter()
                    .map(|e| object(e).to_string() + "\n")
                    .collect::<String>(),
            )
        };
        for attempt in 0..400 {
            let Some(node) = ctx.pick_node(n as usize + attempt) else {
                inc(&ctx.figures.publish_retries);
                sleep(Duration::from_millis(50)).await;
                continue;
            };
            let sent = Instant::now();
            let res = ctx
                .http
                .post(format!("http://{}/v1/publish", node.internal))
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await;
            match res {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    let answered = Instant::now();
                    inc(&ctx.figures.publish_requests);
                    for &(topic, position, stream_type) in &batch {
                        ctx.published.fetch_max(position, Ordering::AcqRel);
                        inc(&ctx.figures.publishes);
                        ctx.ledger.published(&Published {
                            topic,
                            position,
                            stream_type,
                            sent,
                            answered,
                        });
                    }
                    break;
                }
                Ok(r) if r.status().is_client_error() => {
                    ctx.protocol_error(format!("publish answered {}", r.status()));
                    break;
                }
                _ => {
                    inc(&ctx.figures.publish_retries);
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// With a bus, finds out when each node has applied the publishes answered so far, for the
/// checker's `max_retries` rule. The publisher is sequential and its positions grow, so Redis
/// hands every node the publishes in position order: a node that has applied position p has
/// applied every publish before it. To ask, the tracker holds probe channels on every node,
/// bound to all the topics between them, and polls them with `dont_block=true` and
/// `stream_position=p-1`: `new_change` means a topic's newest position there is at least p
/// (SPEC §3). The one other way to get `new_change`, the unpositioned mark a gap in the bus
/// sets on every channel, is cleared by the tracker's next poll; answers to polls sent
/// around the gap are not used.
async fn tracker(ctx: Arc<Ctx>) {
    // Per node process: its probe channels' targets, and the newest position confirmed.
    let mut probes: std::collections::HashMap<SocketAddr, (Vec<String>, u64)> =
        std::collections::HashMap::new();
    let topics: Vec<String> = (0..ctx.args.topics as u32).map(topic_name).collect();
    // A client of its own: its pooled connections to the public listeners close with it
    // when the tracker is stopped, so that the leak check does not wait for them.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let published = ctx.published.load(Ordering::Acquire);
        let nodes: Vec<NodeAddrs> = ctx
            .nodes
            .read()
            .iter()
            .filter(|n| n.up && n.bus_ok)
            .map(|n| n.addrs)
            .collect();
        for node in nodes {
            let (targets, confirmed) = probes.entry(node.internal).or_default();
            if published <= *confirmed {
                continue;
            }
            if targets.is_empty() {
                match register_probes(&ctx, &http, node, &topics).await {
                    Ok(t) => *targets = t,
                    Err(_) => continue,
                }
            }
            let sent = Instant::now();
            let (mut seen, mut lost) = (false, false);
            for target in targets.iter() {
                let url = format!(
                    "http://{}{target}&dont_block=true&stream_position={}",
                    node.public,
                    published - 1
                );
                let answer = match http.get(url).send().await {
                    Ok(r) => r.json::<Value>().await.ok(),
                    Err(_) => None,
                };
                match answer.as_ref().and_then(|a| a["message"].as_str()) {
                    Some("new_change") => seen = true,
                    Some("no_change") => {}
                    // Expired or gone (a drill): new probes next time.
                    _ => lost = true,
                }
            }
            if lost {
                targets.clear();
            }
            if seen && !ctx.ledger.in_bus_gap(sent) {
                *confirmed = published;
                ctx.ledger.applied(node.internal, published, Instant::now());
            }
        }
    }
}

/// Registers the tracker's probe channels on a node: every topic, at most 64 per channel.
async fn register_probes(
    ctx: &Ctx,
    http: &reqwest::Client,
    node: NodeAddrs,
    topics: &[String],
) -> Result<Vec<String>, String> {
    let mut targets = Vec::new();
    for chunk in topics.chunks(64) {
        let res = http
            .post(format!("http://{}/v1/channels", node.internal))
            .json(&json!({ "topics": chunk, "subject": "soak:tracker" }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = res.json().await.map_err(|e| e.to_string())?;
        targets.push(ctx.registered_channel(&body)?.1);
    }
    Ok(targets)
}

/// A `redis-server` of the soak's own, on a loopback port, storing nothing.
async fn start_redis(bin: &str, port: u16) -> Result<tokio::process::Child, String> {
    let child = tokio::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {bin}: {e}"))?;
    let until = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > until {
            return Err(format!("{bin} is not listening on port {port} after 10 s"));
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

fn signal(pid: Option<u32>, sig: &str) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status();
    }
}

/// Redis killed (SIGKILL) and restarted on the same port a second later. The main API takes
/// no node as ready until its bus is back (`nudge_bus_connected` 1).
async fn redis_drill(
    ctx: Arc<Ctx>,
    mut redis: tokio::process::Child,
    bin: String,
    port: u16,
) -> Option<tokio::process::Child> {
    ctx.ledger.bus_gap_begin();
    for n in ctx.nodes.write().iter_mut() {
        n.bus_ok = false;
    }
    let killed = Instant::now();
    signal(redis.id(), "-KILL");
    let _ = redis.wait().await;
    sleep(Duration::from_secs(1)).await;
    let redis = match start_redis(&bin, port).await {
        Ok(r) => r,
        Err(e) => {
            ctx.drill_failures.lock().push(format!("redis drill: {e}"));
            return None;
        }
    };
    let restarted = killed.elapsed();
    let until = Instant::now() + Duration::from_secs(30);
    let mut back = Vec::new();
    loop {
        let addrs: Vec<(usize, NodeAddrs, bool)> = ctx
            .nodes
            .read()
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.addrs, n.bus_ok))
            .collect();
        let mut all = true;
        for (i, a, ok) in addrs {
            if ok {
                continue;
            }
            let url = format!("http://{}/metrics", a.internal);
            let connected = match ctx.http.get(url).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == "nudge_bus_connected 1"),
                Err(_) => false,
            };
            if connected {
                ctx.nodes.write()[i].bus_ok = true;
                back.push(format!("node {i} {:.2}s", killed.elapsed().as_secs_f64()));
            } else {
                all = false;
            }
        }
        if all {
            break;
        }
        if Instant::now() > until {
            ctx.drill_failures
                .lock()
                .push("redis drill: a node did not resubscribe within 30 s".to_owned());
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    ctx.ledger.bus_gap_end();
    ctx.drill_notes.lock().push(format!(
        "redis killed and restarted after {:.2}s; resubscribed: {}",
        restarted.as_secs_f64(),
        back.join(", ")
    ));
    Some(redis)
}

/// Node `index` is drained with SIGTERM while the main API sends its clients elsewhere, then
/// started again (new process, new ports) and taken back into rotation.
async fn drain_drill(
    ctx: Arc<Ctx>,
    mut node: Node,
    index: usize,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
) -> Node {
    let old_epoch = {
        let mut nodes = ctx.nodes.write();
        nodes[index].up = false;
        nodes[index].addrs.epoch
    };
    let started = Instant::now();
    node.sigterm();
    let exit = node.wait_exit(Duration::from_secs(20)).await;
    let drained = started.elapsed();
    if !exit.is_some_and(|s| s.success()) {
        ctx.drill_failures
            .lock()
            .push(format!("drain drill: {} exited {exit:?}", node.name));
    }
    let name = format!("{}-restarted", node.name);
    match Node::start(&name, &bin, &args, log, &ctx.http).await {
        Ok(new) => {
            ctx.nodes.write()[index] = NodeSlot {
                addrs: NodeAddrs {
                    public: new.public,
                    internal: new.internal,
                    index,
                    epoch: old_epoch + 1,
                },
                up: true,
                bus_ok: true,
            };
            ctx.drill_notes.lock().push(format!(
                "{} drained and exited 0 in {:.2}s; restarted and ready {:.2}s after the SIGTERM",
                node.name,
                drained.as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
            new
        }
        Err(e) => {
            ctx.drill_failures.lock().push(format!("drain drill: {e}"));
            node
        }
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
    let mut redis_port = 0;
    if args.nodes == 2 {
        redis_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        redis = Some(start_redis(&args.redis_server, redis_port).await?);
        node_args.extend([
            "--redis-url".to_owned(),
            format!("redis://127.0.0.1:{redis_port}"),
        ]);
    }
    let mut node = Node::start(
        "node-a",
        &bin,
        &node_args,
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
    let mut redis_task = None;
    let mut drain_task = None;
    while Instant::now() < end {
        sleep(Duration::from_millis(100)).await;
        ctx.ledger.scan();
        if args.drills && redis_task.is_none() && Instant::now() >= redis_drill_at {
            eprintln!("soak: drill: Redis killed and restarted");
            let r = redis.take().expect("started with --nodes 2");
            redis_task = Some(tokio::spawn(redis_drill(
                ctx.clone(),
                r,
                args.redis_server.clone(),
                redis_port,
            )));
        }
        if args.drills && drain_task.is_none() && Instant::now() >= drain_drill_at {
            eprintln!("soak: drill: node-b drained with SIGTERM and restarted");
            let b = other.take().expect("started with --nodes 2");
            drain_task = Some(tokio::spawn(drain_drill(
                ctx.clone(),
                b,
                1,
                bin.clone(),
                node_args.clone(),
                log_dir.join("node-b-restarted.log"),
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
    if let Some(t) = redis_task {
        match tokio::time::timeout(Duration::from_secs(60), t).await {
            Ok(Ok(r)) => redis = r,
            _ => ctx
                .drill_failures
                .lock()
                .push("redis drill did not finish".to_owned()),
        }
    }
    if let Some(t) = drain_task {
        match tokio::time::timeout(Duration::from_secs(60), t).await {
            Ok(Ok(b)) => other = Some(b),
            _ => ctx
                .drill_failures
                .lock()
                .push("drain drill did not finish".to_owned()),
        }
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
    if let Some(mut r) = redis {
        signal(r.id(), "-TERM");
        let _ = tokio::time::timeout(Duration::from_secs(10), r.wait()).await;
    }
    let ids = ctx.ids.lock().clone();
    let ids_logged: usize = std::fs::read_dir(&log_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| ids_in_log(&e.path(), &ids))
                .sum()
        })
        .unwrap_or(0);

    // The report.
    let f = &ctx.figures;
    let c = &ctx.ledger.counts;
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let lost = g(&c.lost);
    let node_polls: f64 = node_metrics
        .iter()
        .filter(|(k, _)| k.starts_with("nudge_polls_total"))
        .map(|(_, v)| v)
        .sum();
    let percentiles = ctx.ledger.latency_percentiles();
    println!(
        "nudge-soak: {} clients (+{} burst), {} topics ({hot} hot), {:.0}s, ttl {:?}, retry_timeout {:?}, max_retries {}, seed {seed}",
        args.clients,
        args.burst,
        args.topics,
        soak_time.as_secs_f64(),
        args.ttl,
        args.retry_timeout,
        args.max_retries
    );
    println!(
        "  polls        {:>9}  (nudge's running processes counted {node_polls}): new_change {}, reconnect {}, max_retries {}, cancelled mid-park {} ({} of them leaving bytes queued or by RST; +{} answered just before), 429 {}, 503 {}",
        g(&f.polls),
        g(&f.new_change),
        g(&f.reconnect),
        g(&f.max_retries),
        g(&f.cancelled),
        g(&f.left_with_bytes_or_reset),
        g(&f.answered_at_cancel),
        g(&f.too_many_polls),
        g(&f.over_capacity)
    );
    println!(
        "  publishes    {:>9}  in {} requests (retried {})",
        g(&f.publishes),
        g(&f.publish_requests),
        g(&f.publish_retries)
    );
    println!(
        "  wakes        {:>9}  (new_change answers received)",
        g(&f.new_change)
    );
    println!(
        "  obligations  {:>9}: woken {}, covered by an earlier fetch {}; excused: cancel {}, retirement race {}, node gone {}; dropped when leaving {}",
        g(&c.obligations),
        g(&c.woken),
        g(&c.covered_early),
        g(&c.excused_cancel),
        g(&c.excused_retire),
        g(&c.excused_node),
        g(&c.dropped_at_leave)
    );
    if args.nodes > 1 {
        println!(
            "  bus tracker  {:>9} times a node was seen to have applied the newest publish",
            g(&c.applied_seen)
        );
    }
    if let Some([p50, p90, p99, p999, max]) = percentiles {
        println!(
            "  latency      p50 {} p90 {} p99 {} p99.9 {} max {}  (publish sent -> new_change received, pauses excluded)",
            fmt_ms(p50),
            fmt_ms(p90),
            fmt_ms(p99),
            fmt_ms(p999),
            fmt_ms(max)
        );
    }
    println!(
        "  churn        registrations {}, leaves {} (old channel expired on return: {}, still there: {})",
        g(&f.registrations),
        g(&f.leaves),
        g(&f.expired_on_time),
        g(&f.expiry_late)
    );
    if args.burst > 0 {
        match burst_ready {
            Some(d) => println!(
                "  burst        {} clients registered and polling within {:.2}s",
                args.burst,
                d.as_secs_f64()
            ),
            None => println!(
                "  burst        {} clients: not all polling by the end",
                args.burst
            ),
        }
    }
    match drained {
        Some(d) => println!(
            "  leak check   channels, parked polls, topics, connections all 0 {:.1}s after the last client left",
            d.as_secs_f64()
        ),
        None => println!(
            "  leak check   FAILED: {gauges:?} = {last:?} after {:?}",
            args.ttl * 2 + Duration::from_secs(5)
        ),
    }
    println!(
        "  memory       rss baseline {:.1} MiB, peak {:.1} MiB, {:.1} MiB {:.0}s after the leak check (allowed {:.1} MiB)",
        mib(rss_baseline),
        mib(rss_peak),
        mib(rss_after),
        rss_took.as_secs_f64(),
        mib(rss_baseline + rss_allowance)
    );
    println!("  ids in log   {ids_logged} of {} channel ids", ids.len());
    println!(
        "  shutdown     SIGTERM to {}: {}",
        std::iter::once(&node)
            .chain(other.as_ref())
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        exit.map_or("did not exit".to_owned(), |s| s.to_string())
    );
    for note in ctx.drill_notes.lock().iter() {
        println!("  drill        {note}");
    }
    if args.drills {
        println!(
            "  drills       {} obligations published around the bus gap (due 2 s after the nodes' 2 s gap spread), slowest {:.2}s; {} clients moved off the drained node",
            g(&c.gap_obligations),
            ctx.ledger.gap_latency_max().as_secs_f64(),
            g(&f.moved)
        );
    }
    if g(&f.transport_errors) + g(&f.protocol_errors) > 0 {
        println!(
            "  errors       transport {}, protocol {}",
            g(&f.transport_errors),
            g(&f.protocol_errors)
        );
        for s in ctx.protocol_samples.lock().iter() {
            println!("    {s}");
        }
    }
    for s in ctx.ledger.lost_samples() {
        println!("    LOST {s}");
    }
    if lost > 0 {
        println!(
            "  of the lost  {} arrived late (the latest {:.2}s after the publish), {} never did",
            g(&c.late),
            ctx.ledger.late_max().as_secs_f64(),
            g(&c.never)
        );
    }
    println!("lost: {lost}");

    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} changes lost"));
    }
    if !left {
        failures.push("clients did not stop".to_owned());
    }
    if drained.is_none() {
        failures.push("gauges did not return to 0".to_owned());
    }
    if !rss_ok {
        failures.push("resident memory did not return near its baseline".to_owned());
    }
    if ids_logged > 0 {
        failures.push("channel ids in nudge's log".to_owned());
    }
    if !exit.is_some_and(|s| s.success()) {
        failures.push("nudge did not exit 0 on SIGTERM".to_owned());
    }
    if g(&f.protocol_errors) > 0 || g(&f.transport_errors) > 0 {
        failures.push("transport or protocol errors".to_owned());
    }
    if g(&f.expiry_late) > 0 {
        failures.push("channels outlived their ttl".to_owned());
    }
    if g(&f.polls) == 0 || g(&f.publishes) == 0 || g(&c.woken) == 0 {
        failures.push("nothing happened".to_owned());
    }
    failures.extend(ctx.drill_failures.lock().iter().cloned());
    if let Some(path) = &args.report {
        let report = json!({
            "clients": args.clients, "burst": args.burst, "topics": args.topics,
            "seconds": soak_time.as_secs_f64(), "seed": seed,
            "polls": g(&f.polls), "node_polls": node_polls, "publishes": g(&f.publishes),
            "wakes": g(&f.new_change), "obligations": g(&c.obligations), "woken": g(&c.woken),
            "lost": lost,
            "latency_ms": percentiles.map(|p| p.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>()),
            "rss_mib": [mib(rss_baseline), mib(rss_peak), mib(rss_after)],
            "failures": failures,
        });
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        );
    }
    if failures.is_empty() {
        println!("verdict: ok");
        Ok(true)
    } else {
        println!("verdict: FAILED: {}", failures.join("; "));
        Ok(false)
    }
}
