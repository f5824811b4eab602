//! Many nodes on one bus (SPEC §5, issue 12): a Redis stream, against a real `redis-server`
//! that each test starts on a free loopback port (no persistence, its own temp dir) and
//! kills at the end. Publishes cross nodes, a main API appends straight into Redis, each
//! entry is applied exactly once per node, revocations, and every kind of gap: the
//! connection cut or stalled (through the test kit's proxy, while Redis itself stays up and
//! takes entries), Redis paused, Redis restarted empty, entries trimmed away, a history
//! that diverged; then a node restarted, and readiness at start-up.

use std::time::Duration;

use nudge_testkit::free_port;
use nudge_testkit::proxy::Proxy;
use nudge_testkit::redis::RedisServer;
use nudge_testkit::sentinel::Sentinels;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, eventually, refused};

/// A `redis-server` of our own on 127.0.0.1 (the test kit's), killed (and its directory
/// removed) on drop.
struct Redis(RedisServer);

impl Redis {
    /// Starts one on a free port.
    async fn start() -> Redis {
        Redis(
            RedisServer::start("redis-server")
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// A server that is not started yet: [`Redis::restart`] starts it.
    fn on(port: u16) -> Redis {
        Redis(RedisServer::on("redis-server", port))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    /// Starts it again on the same port: empty, as it keeps nothing on disk.
    async fn restart(&mut self) {
        let port = self.0.port();
        assert!(
            self.0.launch().await.unwrap_or_else(|e| panic!("{e}")),
            "redis-server restarts on port {port}"
        );
    }

    /// SIGKILL: no goodbye to anyone, as in a crash.
    fn kill(&mut self) {
        self.0.kill();
    }

    /// Sends a signal to the server (`STOP`, `CONT`); false if that failed.
    fn signal(&self, signal: &str) -> bool {
        self.0.signal(signal)
    }

    /// Any command, as a main API or an operator would send it.
    async fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `XADD stream * m payload`, as a main API would; returns the entry's id.
    async fn append(&self, stream: &str, payload: &str) -> String {
        match self.cmd(&["XADD", stream, "*", "m", payload]).await {
            redis::Value::BulkString(id) => String::from_utf8(id).unwrap(),
            other => panic!("XADD answered {other:?}"),
        }
    }

    async fn xlen(&self, stream: &str) -> i64 {
        match self.cmd(&["XLEN", stream]).await {
            redis::Value::Int(n) => n,
            other => panic!("XLEN answered {other:?}"),
        }
    }
}

/// Two nodes on the bus, both ready.
async fn two_nodes(redis: &Redis) -> (TestServer, TestServer) {
    let a = TestServer::with_redis(&redis.url()).await;
    let b = TestServer::with_redis(&redis.url()).await;
    a.wait_ready().await;
    b.wait_ready().await;
    (a, b)
}

/// A POST to the internal listener: status, JSON body, `Retry-After`.
async fn post(s: &TestServer, path: &str, body: Value) -> (StatusCode, Value, Option<String>) {
    let res = s.post_json(path, &body).await;
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap(), retry_after)
}

async fn bus_publishes(s: &TestServer) -> f64 {
    s.metric(r#"nudge_publishes_total{source="bus"}"#).await
}

async fn api_publishes(s: &TestServer) -> f64 {
    s.metric(r#"nudge_publishes_total{source="api"}"#).await
}

/// Waits until `s` has applied at least `n` publishes from the bus.
async fn wait_bus_publishes(s: &TestServer, n: f64) {
    eventually(
        &format!("{n} publishes applied from the bus"),
        Duration::from_secs(10),
        || async { bus_publishes(s).await >= n },
    )
    .await;
}

async fn channel_exists(s: &TestServer, id: &str) -> bool {
    let res = s
        .http
        .get(s.internal_url(&format!("/v1/channels/{id}")))
        .send()
        .await
        .unwrap();
    res.status() == StatusCode::OK
}

/// `nudge_bus_gaps_total` for one repair and cause.
async fn gaps(s: &TestServer, repair: &str, cause: &str) -> f64 {
    s.metric(&format!(
        r#"nudge_bus_gaps_total{{cause="{cause}",repair="{repair}"}}"#
    ))
    .await
}

/// Every gap, whatever its kind.
async fn all_gaps(s: &TestServer) -> f64 {
    let mut n = 0.0;
    for (repair, cause) in [
        ("replayed", "reconnect"),
        ("woke_all", "trimmed"),
        ("woke_all", "reset"),
        ("woke_all", "diverged"),
    ] {
        n += gaps(s, repair, cause).await;
    }
    n
}

/// Waits until the node has lost its bus (`/readyz` 503, `nudge_bus_connected` 0).
async fn wait_not_ready(node: &TestServer, within: Duration) {
    eventually("/readyz answers 503", within, || async {
        node.readyz().await == (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready".into()))
    })
    .await;
    assert_eq!(node.metric("nudge_bus_connected").await, 0.0);
}

#[tokio::test]
async fn a_publish_posted_to_one_node_wakes_a_poll_parked_on_another() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let ch = b.register_topic("user:42").await;
    let poll = b.spawn_poll(&ch.url);
    b.wait_parked(1).await;

    let (status, body, _) = post(&a, "/v1/publish", json!({ "topic": "user:42" })).await;
    assert_eq!(status, StatusCode::OK);
    // Appended to the stream; nothing woken yet where it was posted.
    assert_eq!(
        (body["published"].as_u64(), body["woken"].as_u64()),
        (Some(1), Some(0))
    );
    let entry = body["entry"].as_str().expect("the entry's id");
    assert!(
        entry.parse::<nudge::bus::entry_id::EntryId>().is_ok(),
        "{entry}"
    );
    assert_eq!(poll.await.unwrap(), "new_change");

    // Applied from the bus on both nodes, never straight from the API.
    wait_bus_publishes(&a, 1.0).await;
    wait_bus_publishes(&b, 1.0).await;
    assert_eq!(api_publishes(&a).await, 0.0);
    assert_eq!(a.metric("nudge_bus_connected").await, 1.0);
    assert_eq!(all_gaps(&a).await, 0.0);
    assert!(a.metric("nudge_bus_lag_seconds_count").await >= 1.0);
}

#[tokio::test]
async fn what_the_main_api_appends_straight_into_redis_reaches_every_node() {
    let redis = Redis::start().await;
    // A stream of our own, to exercise --redis-stream.
    let flags = [
        "--redis-url",
        &redis.url(),
        "--redis-stream",
        "app:realtime",
    ];
    let a = TestServer::with_flags(&flags).await;
    let b = TestServer::with_flags(&flags).await;
    a.wait_ready().await;
    b.wait_ready().await;

    // One object.
    let (on_a, on_b) = (
        a.register_topic("box:1").await,
        b.register_topic("box:1").await,
    );
    let (poll_a, poll_b) = (a.spawn_poll(&on_a.url), b.spawn_poll(&on_b.url));
    a.wait_parked(1).await;
    b.wait_parked(1).await;
    redis.append("app:realtime", r#"{"topic":"box:1"}"#).await;
    assert_eq!(poll_a.await.unwrap(), "new_change");
    assert_eq!(poll_b.await.unwrap(), "new_change");

    // An array, and NDJSON (told by its lines: Redis has no content type): each entry counts.
    let x = b.register_topic("x").await;
    let y = b.register(json!({ "topics": ["y"] })).await;
    redis
        .append("app:realtime", r#"[{"topic":"x"},{"topic":"nobody"}]"#)
        .await;
    redis
        .append(
            "app:realtime",
            "{\"topic\":\"y\",\"position\":5}\n{\"topic\":\"z\",\"stream_type\":\"changes\"}\n",
        )
        .await;
    wait_bus_publishes(&b, 5.0).await;
    assert_eq!(b.message(&x.url, "&dont_block=true").await, "new_change");
    assert_eq!(b.message(&y.url, "&stream_position=4").await, "new_change");

    // A bad entry is refused (all or nothing), one without field m is skipped, and the
    // reader carries on.
    redis
        .append("app:realtime", r#"{"topic":"x","oops":1}"#)
        .await;
    redis.append("app:realtime", "not json").await;
    redis
        .cmd(&["XADD", "app:realtime", "*", "message", r#"{"topic":"x"}"#])
        .await;
    redis.append("app:realtime", r#"{"topic":"x"}"#).await;
    wait_bus_publishes(&b, 6.0).await;
    assert_eq!(bus_publishes(&b).await, 6.0);
    assert_eq!(b.readyz().await.0, StatusCode::OK);

    // The main API may revoke through Redis too: no origin, so every node applies it.
    let s_a = a
        .register(json!({ "topics": ["t"], "subject": "user:9" }))
        .await;
    let s_b = b
        .register(json!({ "topics": ["t"], "subject": "user:9" }))
        .await;
    let poll_b = b.spawn_poll(&s_b.url);
    b.wait_parked(1).await;
    redis
        .append("app:realtime", r#"{"revoke":{"subject":"user:9"}}"#)
        .await;
    assert_eq!(poll_b.await.unwrap(), "max_retries");
    eventually("revoked on A too", Duration::from_secs(10), || async {
        !channel_exists(&a, &s_a.id).await
    })
    .await;
}

#[tokio::test]
async fn each_publish_is_applied_exactly_once_on_every_node() {
    const SINGLES: usize = 20;
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    for i in 0..SINGLES {
        let (status, _, _) = post(&a, "/v1/publish", json!({ "topic": format!("t:{i}") })).await;
        assert_eq!(status, StatusCode::OK);
    }
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({ "topic": format!("u:{i}") }))
        .collect();
    let (status, body, _) = post(&a, "/v1/publish", Value::Array(batch)).await;
    assert_eq!(
        (status, body["published"].as_u64()),
        (StatusCode::OK, Some(5))
    );
    let n = (SINGLES + 5) as f64;

    // A last entry after all of them: a node reads in order, so once it has applied it, it
    // has applied everything before it, and any duplicate would already show.
    redis.append("nudge:publish", r#"{"topic":"last"}"#).await;
    for node in [&a, &b] {
        wait_bus_publishes(node, n + 1.0).await;
        assert_eq!(bus_publishes(node).await, n + 1.0);
        assert_eq!(api_publishes(node).await, 0.0);
    }
}

#[tokio::test]
async fn exactly_once_while_the_reader_connection_is_killed_again_and_again() {
    const ROUNDS: usize = 8;
    const PER_ROUND: usize = 25;
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            redis
                .append("nudge:publish", &format!(r#"{{"topic":"r{round}:{i}"}}"#))
                .await;
            if i == PER_ROUND / 2 {
                // Every node connection killed mid-stream, as a failing network would;
                // the readers come back and read on.
                redis
                    .cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
                    .await;
            }
        }
    }
    let n = (ROUNDS * PER_ROUND) as f64;
    for node in [&a, &b] {
        wait_bus_publishes(node, n).await;
        node.wait_ready().await;
        assert_eq!(bus_publishes(node).await, n, "no entry applied twice");
        assert!(gaps(node, "replayed", "reconnect").await >= 1.0);
        assert_eq!(
            gaps(node, "woke_all", "trimmed").await
                + gaps(node, "woke_all", "reset").await
                + gaps(node, "woke_all", "diverged").await,
            0.0
        );
    }
}

#[tokio::test]
async fn a_revocation_posted_to_one_node_is_applied_on_every_node() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let user = json!({ "topics": ["t"], "subject": "user:7" });
    let (on_a, on_b) = (
        a.register(user.clone()).await,
        b.register(user.clone()).await,
    );
    let other = b
        .register(json!({ "topics": ["t"], "subject": "user:8" }))
        .await;
    let (poll_a, poll_b) = (a.spawn_poll(&on_a.url), b.spawn_poll(&on_b.url));
    a.wait_parked(1).await;
    b.wait_parked(1).await;

    let (status, body, _) = post(&a, "/v1/revoke", json!({ "subject": "user:7" })).await;
    assert_eq!(status, StatusCode::OK);
    // The count is this node's: it applied it at once.
    assert_eq!(body, json!({ "revoked": 1 }));
    assert!(!channel_exists(&a, &on_a.id).await);
    assert_eq!(poll_a.await.unwrap(), "max_retries");
    assert_eq!(poll_b.await.unwrap(), "max_retries");
    assert!(!channel_exists(&b, &on_b.id).await);
    assert!(channel_exists(&b, &other.id).await);
}

#[tokio::test]
async fn a_node_skips_its_own_revocation_when_the_bus_hands_it_back() {
    // Deterministic version of "the origin does not apply it twice": an envelope naming A
    // as its origin, appended while A has a matching channel, must leave that channel
    // alone and still revoke B's.
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let user = json!({ "topics": ["t"], "subject": "user:5" });
    let (on_a, on_b) = (a.register(user.clone()).await, b.register(user).await);
    let origin = a.bus.as_ref().unwrap().node_id().to_owned();
    let envelope = json!({ "revoke": { "subject": "user:5" }, "origin": origin });
    redis.append("nudge:publish", &envelope.to_string()).await;
    eventually(
        "B applied the revocation",
        Duration::from_secs(10),
        || async { !channel_exists(&b, &on_b.id).await },
    )
    .await;
    // A barrier after the envelope: once A has applied it, A has seen the envelope too.
    redis
        .append("nudge:publish", r#"{"topic":"barrier"}"#)
        .await;
    wait_bus_publishes(&a, 1.0).await;
    assert!(channel_exists(&a, &on_a.id).await);
}

/// A node whose way to Redis goes through a proxy that the test cuts or stalls, while the
/// main API (the test) goes on appending straight into Redis.
async fn node_behind(proxy: &Proxy, extra: &[&str]) -> TestServer {
    let url = proxy.url();
    let mut flags = vec!["--redis-url", url.as_str()];
    flags.extend_from_slice(extra);
    let node = TestServer::with_flags(&flags).await;
    node.wait_ready().await;
    node
}

#[tokio::test]
async fn a_cut_connection_is_replayed_and_wakes_exactly_what_it_missed() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(redis.port()).await;
    let node = node_behind(&proxy, &[]).await;
    let hit = node.register_topic("user:1").await;
    let quiet = node.register_topic("user:2").await;
    let later = node.register_topic("user:3").await;
    let doomed = node
        .register(json!({ "topics": ["user:4"], "subject": "s:4" }))
        .await;
    let (poll_hit, poll_quiet) = (node.spawn_poll(&hit.url), node.spawn_poll(&quiet.url));
    let poll_doomed = node.spawn_poll(&doomed.url);
    node.wait_parked(3).await;

    proxy.cut();
    wait_not_ready(&node, Duration::from_secs(10)).await;
    // Meanwhile the main API goes on: a publish for a parked poll, one for an idle channel
    // (with a position), one for nobody here, and a revocation.
    redis.append("nudge:publish", r#"{"topic":"user:1"}"#).await;
    redis
        .append("nudge:publish", r#"{"topic":"user:3","position":9}"#)
        .await;
    redis
        .append("nudge:publish", r#"{"topic":"elsewhere"}"#)
        .await;
    redis
        .append("nudge:publish", r#"{"revoke":{"subject":"s:4"}}"#)
        .await;
    // Nothing reached the node yet.
    assert!(!poll_hit.is_finished() && !poll_doomed.is_finished());

    proxy.mend();
    node.wait_ready().await;
    assert_eq!(poll_hit.await.unwrap(), "new_change");
    assert_eq!(poll_doomed.await.unwrap(), "max_retries");
    assert!(!channel_exists(&node, &doomed.id).await);
    // The idle channel got its change and its position; the quiet one nothing.
    assert_eq!(
        node.message(&later.url, "&stream_position=8").await,
        "new_change"
    );
    assert_eq!(gaps(&node, "replayed", "reconnect").await, 1.0);
    assert_eq!(all_gaps(&node).await, 1.0, "nothing woke all");
    assert_eq!(node.metric("nudge_bus_entries_replayed_total").await, 4.0);
    // A barrier: once it is applied, anything that would have woken the quiet poll has.
    redis
        .append("nudge:publish", r#"{"topic":"barrier"}"#)
        .await;
    wait_bus_publishes(&node, 4.0).await;
    assert!(
        !poll_quiet.is_finished(),
        "a channel of another topic was woken"
    );
    assert_eq!(node.hub.counts().parked, 1);
}

#[tokio::test]
async fn a_stalled_connection_is_caught_within_10_s_and_replayed() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(redis.port()).await;
    let node = node_behind(&proxy, &[]).await;
    let ch = node.register_topic("user:1").await;
    let poll = node.spawn_poll(&ch.url);
    node.wait_parked(1).await;

    // The connection stays open but nothing goes through, and the stream moves on.
    proxy.stall();
    redis.append("nudge:publish", r#"{"topic":"user:1"}"#).await;
    let stalled = tokio::time::Instant::now();
    wait_not_ready(&node, Duration::from_secs(10)).await;
    assert!(stalled.elapsed() <= Duration::from_secs(10));
    assert!(node.metric("nudge_bus_stalls_total").await >= 1.0);
    assert!(!poll.is_finished());

    proxy.mend();
    assert_eq!(poll.await.unwrap(), "new_change");
    node.wait_ready().await;
    assert!(gaps(&node, "replayed", "reconnect").await >= 1.0);
    assert_eq!(
        all_gaps(&node).await,
        gaps(&node, "replayed", "reconnect").await,
        "nothing woke all"
    );
}

#[tokio::test]
async fn a_paused_redis_is_caught_and_nothing_is_lost() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let ch = b.register_topic("user:1").await;
    // A quiet but healthy reader is not mistaken for a stalled one: its reads return every
    // 2 s with nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(b.metric("nudge_bus_stalls_total").await, 0.0);
    assert_eq!(b.readyz().await.0, StatusCode::OK);

    assert!(redis.signal("STOP"));
    let resume = ContOnDrop(&redis);
    for node in [&a, &b] {
        wait_not_ready(node, Duration::from_secs(10)).await;
    }
    drop(resume);
    for node in [&a, &b] {
        node.wait_ready().await;
        assert_eq!(
            all_gaps(node).await,
            gaps(node, "replayed", "reconnect").await
        );
    }
    let poll = b.spawn_poll(&ch.url);
    b.wait_parked(1).await;
    let (status, _, _) = post(&a, "/v1/publish", json!({ "topic": "user:1" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(poll.await.unwrap(), "new_change");
}

const SPREAD_POLLS: usize = 10;

#[tokio::test]
async fn redis_restarted_empty_wakes_all_at_the_gap_wake_rate() {
    let mut redis = Redis::start().await;
    let url = redis.url();
    // 10 polls a second: the 11 parked polls take about a second.
    let flags = ["--redis-url", url.as_str(), "--gap-wake-rate", "10"];
    let a = TestServer::with_flags(&flags).await;
    let b = TestServer::with_flags(&flags).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let (on_a, on_b) = (a.register_topic("t").await, b.register_topic("t").await);
    let (poll_a, poll_b) = (a.spawn_poll(&on_a.url), b.spawn_poll(&on_b.url));
    let mut spread = Vec::new();
    for i in 0..SPREAD_POLLS {
        let ch = a.register_topic(&format!("s:{i}")).await;
        let poll = a.spawn_poll(&ch.url);
        spread.push(tokio::spawn(async move {
            let answer = poll.await.unwrap();
            (answer, tokio::time::Instant::now())
        }));
    }
    a.wait_parked(1 + SPREAD_POLLS).await;
    b.wait_parked(1).await;
    let doomed = a
        .register(json!({ "topics": ["d"], "subject": "user:3" }))
        .await;

    redis.kill();
    for node in [&a, &b] {
        wait_not_ready(node, Duration::from_secs(10)).await;
    }
    // A publish is refused, not lost silently.
    let (status, body, retry_after) = post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "bus_unavailable");
    assert_eq!(retry_after.as_deref(), Some("5"));
    // A revocation still applies here at once, and says the other nodes were not told.
    let (status, body, _) = post(&a, "/v1/revoke", json!({ "subject": "user:3" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "bus_unavailable");
    assert!(body["message"].as_str().unwrap().contains("revoked 1"));
    assert!(!channel_exists(&a, &doomed.id).await);
    // The parked polls wait for the bus: nothing has been answered.
    assert_eq!(
        (a.hub.counts().parked, b.hub.counts().parked),
        (1 + SPREAD_POLLS, 1)
    );

    redis.restart().await;
    // The stream is gone with Redis's memory: nobody can replay it, every poll is answered.
    assert_eq!(poll_a.await.unwrap(), "new_change");
    assert_eq!(poll_b.await.unwrap(), "new_change");
    let mut answered = Vec::new();
    for poll in spread {
        let (answer, at) = poll.await.unwrap();
        assert_eq!(answer, "new_change");
        answered.push(at);
    }
    let (first, last) = (
        answered.iter().min().unwrap(),
        answered.iter().max().unwrap(),
    );
    assert!(
        *last - *first >= Duration::from_millis(700),
        "gap wake-ups at 10/s spread over only {:?}",
        *last - *first
    );
    for node in [&a, &b] {
        node.wait_ready().await;
        assert_eq!(gaps(node, "woke_all", "reset").await, 1.0);
        assert_eq!(all_gaps(node).await, 1.0);
    }
    // And the bus works again, writer connection included.
    let poll_b = b.spawn_poll(&on_b.url);
    b.wait_parked(1).await;
    let (status, _, _) = post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(poll_b.await.unwrap(), "new_change");
}

#[tokio::test]
async fn a_flushall_is_a_reset_and_what_came_after_it_is_applied() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(redis.port()).await;
    let node = node_behind(&proxy, &[]).await;
    let quiet = node.register_topic("quiet").await;
    let after = node.register_topic("after").await;
    proxy.cut();
    wait_not_ready(&node, Duration::from_secs(10)).await;
    redis.cmd(&["FLUSHALL"]).await;
    redis
        .append("nudge:publish", r#"{"topic":"after","position":3}"#)
        .await;
    proxy.mend();
    node.wait_ready().await;
    assert_eq!(gaps(&node, "woke_all", "reset").await, 1.0);
    // Woken (pending) because nobody knows what the flush took; the entry after it applied.
    assert_eq!(
        node.message(&quiet.url, "&dont_block=true").await,
        "new_change"
    );
    wait_bus_publishes(&node, 1.0).await;
    assert_eq!(
        node.message(&after.url, "&stream_position=2").await,
        "new_change"
    );
}

#[tokio::test]
async fn entries_trimmed_away_before_they_were_read_wake_all() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(redis.port()).await;
    let node = node_behind(&proxy, &[]).await;
    let ch = node.register_topic("other").await;
    let poll = node.spawn_poll(&ch.url);
    node.wait_parked(1).await;
    proxy.cut();
    wait_not_ready(&node, Duration::from_secs(10)).await;
    for i in 0..5 {
        redis
            .append("nudge:publish", &format!(r#"{{"topic":"gone:{i}"}}"#))
            .await;
    }
    // Exact trimming: every entry the node had not read is gone.
    redis.cmd(&["XTRIM", "nudge:publish", "MAXLEN", "0"]).await;
    proxy.mend();
    // The node cannot know what the trimmed entries said: it wakes its poll.
    assert_eq!(poll.await.unwrap(), "new_change");
    node.wait_ready().await;
    assert_eq!(gaps(&node, "woke_all", "trimmed").await, 1.0);
    assert_eq!(all_gaps(&node).await, 1.0);
}

#[tokio::test]
async fn a_history_that_lost_what_the_node_applied_is_told_apart() {
    // What a failover to a replica that had not received the last entries looks like from
    // the node: the epoch is the same, but entries it applied are not there.
    let redis = Redis::start().await;
    let proxy = Proxy::start(redis.port()).await;
    let node = node_behind(&proxy, &[]).await;
    let ch = node.register_topic("t").await;
    let first = redis.append("nudge:publish", r#"{"topic":"x"}"#).await;
    redis.append("nudge:publish", r#"{"topic":"x"}"#).await;
    wait_bus_publishes(&node, 2.0).await;
    proxy.cut();
    wait_not_ready(&node, Duration::from_secs(10)).await;
    // The "new primary" holds only the first entry.
    redis.cmd(&["DEL", "nudge:publish"]).await;
    redis
        .cmd(&["XADD", "nudge:publish", &first, "m", r#"{"topic":"x"}"#])
        .await;
    proxy.mend();
    node.wait_ready().await;
    assert_eq!(gaps(&node, "woke_all", "diverged").await, 1.0);
    assert_eq!(
        node.message(&ch.url, "&dont_block=true").await,
        "new_change"
    );
    // And it reads on: a new entry is applied once.
    let poll = node.spawn_poll(&ch.url);
    node.wait_parked(1).await;
    redis.append("nudge:publish", r#"{"topic":"t"}"#).await;
    assert_eq!(poll.await.unwrap(), "new_change");
    assert_eq!(bus_publishes(&node).await, 3.0);
}

#[tokio::test]
async fn the_nodes_trim_the_stream_by_age_and_by_length() {
    let redis = Redis::start().await;
    // By age: entries from 1970 are far older than a retention of 1 s.
    for ms in 1..=500 {
        redis
            .cmd(&["XADD", "old", &format!("{ms}-0"), "m", r#"{"topic":"x"}"#])
            .await;
    }
    // By length: 3,000 fresh entries against a cap of 1,000.
    for _ in 0..3000 {
        redis.append("long", r#"{"topic":"x"}"#).await;
    }
    let url = redis.url();
    let _by_age = TestServer::with_flags(&[
        "--redis-url",
        &url,
        "--redis-stream",
        "old",
        "--bus-retention",
        "1s",
    ])
    .await;
    let _by_length = TestServer::with_flags(&[
        "--redis-url",
        &url,
        "--redis-stream",
        "long",
        "--bus-max-entries",
        "1000",
    ])
    .await;
    // Trimming is approximate (whole nodes of 100 entries) and runs every 10 s.
    eventually("both streams trimmed", Duration::from_secs(25), || async {
        redis.xlen("old").await < 100 && redis.xlen("long").await <= 1100
    })
    .await;
}

/// The reader has a connection of its own (not the `redis` crate's): it authenticates and
/// selects the URL's database as the crate does, over TCP and over a Unix socket.
#[tokio::test]
async fn the_reader_uses_the_urls_password_and_database_over_tcp_and_a_unix_socket() {
    let server = RedisServer::on("redis-server", free_port());
    let socket = server.dir().join("redis.sock");
    let mut server = server.with_args(&["--unixsocket", socket.to_str().unwrap()]);
    assert!(server.launch().await.unwrap_or_else(|e| panic!("{e}")));
    // Set after the start: the kit's readiness check is a PING without a password.
    let open = redis::Client::open(server.url()).unwrap();
    let mut conn = open.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("secret")
        .query_async(&mut conn)
        .await
        .unwrap();
    let tcp = format!("redis://:secret@127.0.0.1:{}/3", server.port());
    let unix = format!("unix://{}?db=3&pass=secret", socket.display());
    let a = TestServer::with_redis(&tcp).await;
    let b = TestServer::with_redis(&unix).await;
    a.wait_ready().await;
    b.wait_ready().await;

    let client = redis::Client::open(tcp.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg("nudge:publish")
        .arg("*")
        .arg("m")
        .arg(r#"{"topic":"t"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_bus_publishes(&a, 1.0).await;
    wait_bus_publishes(&b, 1.0).await;
    // Database 3 it is: database 0 has no stream.
    let open = redis::Client::open(format!("redis://:secret@127.0.0.1:{}/0", server.port()));
    let mut conn = open
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let len: i64 = redis::cmd("XLEN")
        .arg("nudge:publish")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0);
}

#[tokio::test]
async fn the_readers_and_writers_are_named_in_client_list() {
    let redis = Redis::start().await;
    let (a, _b) = two_nodes(&redis).await;
    post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    let redis::Value::BulkString(list) = redis.cmd(&["CLIENT", "LIST"]).await else {
        panic!("CLIENT LIST is text");
    };
    let list = String::from_utf8(list).unwrap();
    let id = a.bus.as_ref().unwrap().node_id();
    for role in ["reader", "writer"] {
        let suffix = format!(":{id}:{role}");
        assert!(
            list.lines().any(|l| l
                .split(' ')
                .any(|f| f.starts_with("name=nudge:") && f.ends_with(&suffix))),
            "no {role} of node {id} in\n{list}"
        );
    }
}

#[tokio::test]
async fn a_restarted_node_has_forgotten_its_channels() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let ch = b.register_topic("t").await;
    let poll = b.spawn_poll(&ch.url);
    b.wait_parked(1).await;
    let public = b.public;
    b.stop().await;
    assert_eq!(poll.await.unwrap(), "reconnect");
    // Published while it was away: a new node starts at the stream's end.
    post(&a, "/v1/publish", json!({ "topic": "t" })).await;

    // The same node (same public address, the one in the channel URL) comes back empty.
    let b = TestServer::with_flags(&["--redis-url", &redis.url(), "--listen", &public.to_string()])
        .await;
    b.wait_ready().await;
    assert_eq!(b.message(&ch.url, "").await, "max_retries");
    // A first read is no gap, and the entry before it is not applied.
    assert_eq!(all_gaps(&b).await, 0.0);
    assert_eq!(bus_publishes(&b).await, 0.0);
    // Its new channels get publishes from the other node.
    let fresh = b.register_topic("t").await;
    let poll = b.spawn_poll(&fresh.url);
    b.wait_parked(1).await;
    post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(poll.await.unwrap(), "new_change");
}

#[tokio::test]
async fn a_node_resumed_from_a_position_replays_what_came_after_it() {
    // What a restore from --state-dir or an upgrade does: the new bus reads on from the
    // position the old one had.
    let redis = Redis::start().await;
    let (a, _) = two_nodes(&redis).await;
    post(&a, "/v1/publish", json!({ "topic": "before" })).await;
    wait_bus_publishes(&a, 1.0).await;
    let position = a.bus.as_ref().unwrap().stop().await.expect("a position");
    assert!(!a.bus.as_ref().unwrap().is_connected());
    redis.append("nudge:publish", r#"{"topic":"missed"}"#).await;

    let hub = nudge::hub::Hub::new(
        nudge::hub::HubConfig {
            limits: nudge::Config::for_tests().limits,
            max_polls_per_channel: 4,
            max_parked: 100,
        },
        std::sync::Arc::new(nudge::metrics::Metrics::new(
            prometheus::Registry::new(),
            true,
        )),
    );
    let config = nudge::Config::for_tests_with(&["--redis-url", &redis.url()])
        .bus
        .unwrap();
    let bus = nudge::bus::Bus::new(config, hub.clone()).unwrap();
    bus.resume_from(&position).unwrap();
    let ch = hub
        .register(nudge::hub::Registration {
            topics: vec!["missed".into()],
            ..Default::default()
        })
        .unwrap();
    let task = tokio::spawn(bus.clone().run());
    eventually(
        "the missed entry replayed",
        Duration::from_secs(10),
        || async { hub.metrics().bus_entries_replayed_total.get() == 1 },
    )
    .await;
    assert_eq!(
        hub.metrics()
            .bus_gaps_total
            .with_label_values(&["replayed", "reconnect"])
            .get(),
        1
    );
    let _ = ch;
    task.abort();
}

#[tokio::test]
async fn a_node_is_not_ready_until_its_first_read() {
    let mut redis = Redis::on(free_port());
    let node = TestServer::with_redis(&redis.url()).await;
    assert_eq!(
        node.readyz().await,
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready".into()))
    );
    assert_eq!(node.metric("nudge_bus_connected").await, 0.0);
    let (status, body, _) = post(&node, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("bus_unavailable"))
    );
    // Registering works meanwhile; such a channel may miss what is published before the
    // reader is up, so it is marked pending then (no gap is counted).
    let early = node.register_topic("t").await;

    redis.restart().await;
    node.wait_ready().await;
    assert_eq!(node.metric("nudge_bus_connected").await, 1.0);
    assert_eq!(all_gaps(&node).await, 0.0);
    assert_eq!(node.spawn_poll(&early.url).await.unwrap(), "new_change");
}

/// Resumes a stopped Redis even when the test fails, so that killing it works.
struct ContOnDrop<'a>(&'a Redis);

impl Drop for ContOnDrop<'_> {
    fn drop(&mut self) {
        // Not asserted: this may run while a failed test unwinds.
        self.0.signal("CONT");
    }
}

#[test]
fn bad_bus_flags_exit_64_naming_the_flag() {
    for (flags, named) in [
        (&["--redis-url", "redis://"][..], "--redis-url"),
        (
            &["--redis-url", "redis://127.0.0.1:6379/notadb"],
            "--redis-url",
        ),
        (&["--redis-channel", "x"], "--redis-stream"),
        (
            &["--redis-sentinel", "127.0.0.1:26379"],
            "--redis-master-name",
        ),
        (&["--redis-master-name", "m"], "--redis-sentinel"),
        (
            &["--redis-sentinel", "nohost", "--redis-master-name", "m"],
            "host:port",
        ),
        (
            &["--redis-url", "redis://127.0.0.1", "--gap-wake-rate", "0"],
            "--gap-wake-rate",
        ),
        (
            &[
                "--redis-url",
                "redis://127.0.0.1",
                "--bus-max-entries",
                "10",
            ],
            "--bus-max-entries",
        ),
    ] {
        let stderr = refused(flags);
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
        // Nothing was bound: config errors come before the listeners.
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

#[tokio::test]
async fn a_sentinel_failover_under_load_loses_nothing_the_new_primary_holds() {
    const TOPICS: usize = 20;
    let mut set = Sentinels::start("nudge-it")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sentinels = set.sentinel_addrs();
    let flags = [
        "--redis-sentinel",
        &sentinels,
        "--redis-master-name",
        "nudge-it",
    ];
    let a = TestServer::with_flags(&flags).await;
    let b = TestServer::with_flags(&flags).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut channels = Vec::new();
    for t in 0..TOPICS {
        channels.push(b.register_topic(&format!("t:{t}")).await);
    }

    // The main API publishes through node A without pause, positions growing, while the
    // primary is killed under it; a publish refused during the failover is simply skipped.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, internal) = (stop.clone(), a.internal_url("/v1/publish"));
        let http = a.http.clone();
        async move {
            let (mut acked, mut refused) = (0u64, 0u64);
            for k in 1u64..=20_000 {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let body = json!({ "topic": format!("t:{}", k as usize % TOPICS), "position": k });
                match http.post(&internal).json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::OK => acked += 1,
                    _ => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, refused)
        }
    });
    wait_bus_publishes(&b, 200.0).await;
    set.wait_in_sync(Duration::from_secs(10)).await.unwrap();
    let old = set.primary_port().await.unwrap();
    set.kill(old);
    let new = set
        .wait_failover(old, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for node in [&a, &b] {
        node.wait_ready().await;
    }
    // Some load on the new primary too, then stop.
    let after = bus_publishes(&b).await + 200.0;
    wait_bus_publishes(&b, after).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (acked, refused) = load.await.unwrap();
    assert!(acked > 400, "acked {acked}, refused {refused}");

    // Everything the new primary holds reached node B: for each topic, the newest position
    // in the new primary's stream is known to B's channel. (A first poll takes any pending
    // mark a wake-all left; the second answers from the topic's position alone.)
    let barrier: String = nudge_testkit::sentinel::query(
        new,
        &["XADD", "nudge:publish", "*", "m", r#"{"topic":"barrier"}"#],
    )
    .await
    .unwrap();
    let entries = nudge_testkit::sentinel::query::<Vec<(String, Vec<String>)>>(
        new,
        &["XRANGE", "nudge:publish", "-", &barrier],
    )
    .await
    .unwrap();
    eventually("B applied the barrier", Duration::from_secs(10), || async {
        b.bus
            .as_ref()
            .unwrap()
            .position()
            .is_some_and(|p| p.starts_with(&barrier))
    })
    .await;
    let mut newest = [0u64; TOPICS];
    for (_, fields) in &entries {
        let Some(m) = fields.chunks(2).find(|f| f[0] == "m").map(|f| &f[1]) else {
            continue;
        };
        let Ok(Value::Array(batch)) = serde_json::from_str::<Value>(m) else {
            continue;
        };
        for p in batch {
            if let (Some(topic), Some(position)) = (p["topic"].as_str(), p["position"].as_u64()) {
                let t: usize = topic.trim_start_matches("t:").parse().unwrap();
                newest[t] = newest[t].max(position);
            }
        }
    }
    assert!(
        newest.iter().all(|&p| p > 0),
        "every topic published on the new primary"
    );
    for (t, ch) in channels.iter().enumerate() {
        b.message(&ch.url, "&dont_block=true").await;
        let below = format!("&dont_block=true&stream_position={}", newest[t] - 1);
        assert_eq!(
            b.message(&ch.url, &below).await,
            "new_change",
            "topic t:{t}: position {} not applied on B",
            newest[t]
        );
    }
    // The epoch came over with the data: a failover is never mistaken for a reset.
    for node in [&a, &b] {
        assert_eq!(gaps(node, "woke_all", "reset").await, 0.0);
        assert!(all_gaps(node).await >= 1.0);
        assert_eq!(node.metric("nudge_bus_connected").await, 1.0);
    }
}
