//! One measured run: fresh processes for one setup and one number of polls, a warm-up, then
//! rounds of park → publish → every answer read.
//!
//! A round, with nudge: each poll's connection sends its `GET /subscribe` (a task per poll,
//! which notes the moment its whole answer has been read); the bench waits until node B
//! counts them all parked (`nudge_parked_polls`) and, with a bus, until both nodes' readers
//! block in Redis (`blocked_clients`), so that no round starts while a reader is between two
//! reads; then the clock starts, the publish's first byte is written, and the round's time is
//! the last `new_change` fully read. Every wait is on one of those observations, with a
//! deadline; the run as a whole stops at its own deadline, keeping the rounds it finished.

use std::io;
use std::time::Duration;

use nudge_testkit::raw::{Client, Conn, Response, get, request_bytes};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use crate::Settings;
use crate::resp::{self, Redis, Reply};
use crate::rig::{Rig, Setup, wait_blocked};

/// The stream nudge reads by default (`--redis-stream`), where a main API appends.
const STREAM: &[u8] = b"nudge:publish";

/// How long one round may take, from its first poll sent to its last answer read.
const ROUND_LIMIT: Duration = Duration::from_secs(5);

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Run {
    pub setup: &'static str,
    pub polls: usize,
    pub repeat: usize,
    /// Per measured round: from the publish's first byte to the last poll's whole answer.
    #[serde(serialize_with = "as_ms")]
    pub wake: Vec<Duration>,
    /// Per measured round: from the publish's first byte to its own answer (nudge's
    /// `200`, or Redis's entry id).
    #[serde(serialize_with = "as_ms")]
    pub answered: Vec<Duration>,
    /// The run's deadline came before all its rounds.
    pub cut_short: bool,
    pub load_before: f64,
    pub load_after: f64,
}

fn as_ms<S: serde::Serializer>(values: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(values.iter().map(|d| d.as_secs_f64() * 1000.0))
}

/// How the bench sends the publish.
enum Publisher {
    /// `POST /v1/publish` on a keep-alive connection to a node's internal listener.
    Http(Conn, Vec<u8>),
    /// `XADD nudge:publish * m {…}` on a connection to Redis.
    Xadd(Redis, Vec<u8>),
}

impl Publisher {
    /// Writes the publish; the clock started just before.
    async fn send(&mut self) -> io::Result<()> {
        match self {
            Publisher::Http(conn, bytes) => conn.send(bytes).await,
            Publisher::Xadd(redis, bytes) => redis.send(bytes).await,
        }
    }

    /// Reads its answer and checks it.
    async fn answer(&mut self) -> Result<(), String> {
        match self {
            Publisher::Http(conn, _) => {
                let r = conn
                    .read_response()
                    .await
                    .map_err(|e| format!("POST /v1/publish: {e}"))?;
                if r.status != 200 {
                    return Err(format!(
                        "POST /v1/publish: status {}: {}",
                        r.status,
                        r.body_text()
                    ));
                }
                Ok(())
            }
            Publisher::Xadd(redis, _) => match redis.reply().await {
                Ok(Reply::Bulk(Some(_))) => Ok(()),
                Ok(other) => Err(format!("XADD answered {other:?}")),
                Err(e) => Err(format!("XADD: {e}")),
            },
        }
    }
}

/// What is parked and answered each round: a poll on node B, or the bench's own `XREAD`.
struct Waiter {
    target: std::net::SocketAddr,
    conn: Waiting,
    request: Vec<u8>,
}

enum Waiting {
    Poll(Conn),
    Xread(Redis),
}

impl Waiter {
    /// Sends its request and reads the answer; returns itself and when the answer was read.
    async fn wait(mut self) -> (Waiter, Result<Instant, String>) {
        let result = match &mut self.conn {
            Waiting::Poll(conn) => poll_once(conn, &self.request).await,
            Waiting::Xread(redis) => xread_once(redis, &self.request).await,
        };
        (self, result)
    }

    /// A poll connection the node closed is opened again, between rounds.
    async fn reopen(&mut self) -> Result<(), String> {
        if let Waiting::Poll(conn) = &mut self.conn {
            *conn = Conn::connect(self.target)
                .await
                .map_err(|e| format!("connect to {}: {e}", self.target))?;
        }
        Ok(())
    }
}

async fn poll_once(conn: &mut Conn, request: &[u8]) -> Result<Instant, String> {
    conn.send(request).await.map_err(|e| format!("poll: {e}"))?;
    let r: Response = conn
        .read_response()
        .await
        .map_err(|e| format!("poll: {e}"))?;
    let read_at = Instant::now();
    if r.status != 200 || !r.body_text().contains("new_change") {
        return Err(format!(
            "poll answered {} {} instead of new_change",
            r.status,
            r.body_text()
        ));
    }
    if r.closes() {
        return Err("closed".to_owned());
    }
    Ok(read_at)
}

async fn xread_once(redis: &mut Redis, request: &[u8]) -> Result<Instant, String> {
    redis
        .send(request)
        .await
        .map_err(|e| format!("XREAD: {e}"))?;
    let reply = redis.reply().await.map_err(|e| format!("XREAD: {e}"))?;
    let read_at = Instant::now();
    match reply {
        Reply::Array(Some(streams)) if !streams.is_empty() => Ok(read_at),
        other => Err(format!("XREAD answered {other:?}")),
    }
}

/// Runs `setup` with `polls` parked polls (one channel each, all on one topic) on fresh
/// processes: `settings.warmup` rounds, then up to `settings.rounds` measured ones.
pub async fn run(
    setup: Setup,
    polls: usize,
    repeat: usize,
    settings: &Settings,
) -> Result<Run, String> {
    let load_before = crate::procfs::load_average();
    let rig = Rig::start(setup, &settings.nudge, &settings.redis_server).await?;
    let result = measure(&rig, setup, polls, settings).await;
    let load_after = crate::procfs::load_average();
    let (wake, answered, cut_short) = result.map_err(|e| format!("{e}{}", rig.log_tail()))?;
    Ok(Run {
        setup: setup.key(),
        polls,
        repeat,
        wake,
        answered,
        cut_short,
        load_before,
        load_after,
    })
}

type Measured = (Vec<Duration>, Vec<Duration>, bool);

async fn measure(
    rig: &Rig,
    setup: Setup,
    polls: usize,
    settings: &Settings,
) -> Result<Measured, String> {
    let topic = format!("bench:{polls}");
    let publish_json = format!(r#"{{"topic":"{topic}"}}"#);
    let mut redis_control = match rig.redis_addr() {
        Some(addr) => Some(
            Redis::connect(addr)
                .await
                .map_err(|e| format!("connect to Redis: {e}"))?,
        ),
        None => None,
    };
    let mut metrics = rig.node_b().map(|b| Client::new(b.internal));

    let (mut waiters, mut publisher, blocked) = match setup {
        Setup::RedisAlone => {
            let addr = rig.redis_addr().ok_or("no Redis")?;
            let connect = || async {
                Redis::connect(addr)
                    .await
                    .map_err(|e| format!("connect to Redis: {e}"))
            };
            let xread = resp::command(&[b"XREAD", b"BLOCK", b"10000", b"STREAMS", STREAM, b"$"]);
            let waiter = Waiter {
                target: addr,
                conn: Waiting::Xread(connect().await?),
                request: xread,
            };
            let xadd = resp::command(&[b"XADD", STREAM, b"*", b"m", publish_json.as_bytes()]);
            (vec![waiter], Publisher::Xadd(connect().await?, xadd), 1)
        }
        _ => {
            let (a, b) = (
                rig.node_a().ok_or("no node")?,
                rig.node_b().ok_or("no node")?,
            );
            let mut register = Client::new(b.internal);
            let mut waiters = Vec::with_capacity(polls);
            for _ in 0..polls {
                let path = register_channel(&mut register, &topic).await?;
                let conn = Conn::connect(b.public)
                    .await
                    .map_err(|e| format!("connect to {}: {e}", b.public))?;
                waiters.push(Waiter {
                    target: b.public,
                    conn: Waiting::Poll(conn),
                    request: get(&path, "").into_bytes(),
                });
            }
            let publisher = if setup == Setup::BusViaXadd {
                let addr = rig.redis_addr().ok_or("no Redis")?;
                let redis = Redis::connect(addr)
                    .await
                    .map_err(|e| format!("connect to Redis: {e}"))?;
                let xadd = resp::command(&[b"XADD", STREAM, b"*", b"m", publish_json.as_bytes()]);
                Publisher::Xadd(redis, xadd)
            } else {
                let conn = Conn::connect(a.internal)
                    .await
                    .map_err(|e| format!("connect to {}: {e}", a.internal))?;
                let bytes = request_bytes(
                    "POST",
                    "/v1/publish",
                    Some("application/json"),
                    publish_json.as_bytes(),
                );
                Publisher::Http(conn, bytes)
            };
            (
                waiters,
                publisher,
                setup.nodes() as u64 * u64::from(setup.has_redis()),
            )
        }
    };

    let run_deadline = Instant::now() + settings.run_limit;
    let (mut wake, mut answered) = (Vec::new(), Vec::new());
    let mut cut_short = false;
    for round in 0..settings.warmup + settings.rounds {
        if Instant::now() >= run_deadline {
            cut_short = true;
            break;
        }
        let round_deadline = Instant::now() + ROUND_LIMIT;
        let mut parked = JoinSet::new();
        for waiter in waiters.drain(..) {
            parked.spawn(waiter.wait());
        }
        // Everything parked, every reader blocked: only then does the clock start.
        if let Some(metrics) = &mut metrics {
            wait_parked(metrics, polls, round_deadline).await?;
        }
        if let Some(control) = &mut redis_control {
            wait_blocked(control, blocked, round_deadline).await?;
        }
        let start = Instant::now();
        publisher
            .send()
            .await
            .map_err(|e| format!("publish: {e}"))?;
        timeout_at(round_deadline, publisher.answer())
            .await
            .map_err(|_| "the publish had no answer within 5 s".to_owned())??;
        let answer = start.elapsed();
        let mut last = start;
        let mut failure = None;
        while let Some(joined) = timeout_at(round_deadline, parked.join_next())
            .await
            .map_err(|_| format!("round {round}: not every poll was answered within 5 s"))?
        {
            let (mut waiter, result) = joined.map_err(|e| format!("a poll task: {e}"))?;
            match result {
                Ok(at) => last = last.max(at),
                Err(e) if e == "closed" => waiter.reopen().await?,
                Err(e) => failure = Some(e),
            }
            waiters.push(waiter);
        }
        if let Some(e) = failure {
            return Err(format!("round {round}: {e}"));
        }
        if round >= settings.warmup {
            wake.push(last - start);
            answered.push(answer);
        }
    }
    Ok((wake, answered, cut_short))
}

/// Registers one channel on `topic`; returns its subscribe path.
async fn register_channel(client: &mut Client, topic: &str) -> Result<String, String> {
    let body = format!(r#"{{"topics":["{topic}"]}}"#);
    let r = client
        .request(
            "POST",
            "/v1/channels",
            Some("application/json"),
            body.as_bytes(),
        )
        .await
        .map_err(|e| format!("POST /v1/channels: {e}"))?;
    if r.status != 201 {
        return Err(format!(
            "POST /v1/channels: status {}: {}",
            r.status,
            r.body_text()
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("POST /v1/channels: {e}"))?;
    let url = json["entries"][0]["url"]
        .as_str()
        .ok_or_else(|| format!("no entries[0].url in {}", r.body_text()))?;
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let at = after_scheme
        .find('/')
        .ok_or_else(|| format!("no path in {url}"))?;
    Ok(after_scheme[at..].to_owned())
}

/// Waits until node B counts `n` parked polls.
async fn wait_parked(metrics: &mut Client, n: usize, deadline: Instant) -> Result<(), String> {
    let mut last = None;
    while Instant::now() < deadline {
        let r = metrics
            .request("GET", "/metrics", None, b"")
            .await
            .map_err(|e| format!("GET /metrics: {e}"))?;
        last = metric(&r.body_text(), "nudge_parked_polls");
        if last.is_some_and(|v| v as usize >= n) {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err(format!(
        "{n} polls were not counted parked in time (last: {last:?})"
    ))
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
