//! Many nodes on one bus (SPEC §5), against a real `redis-server` that each test starts on
//! a free loopback port (no persistence, its own temp dir) and kills at the end: publishes
//! cross nodes, straight `PUBLISH`es into Redis, exactly once per node, revocations, Redis
//! dying and coming back under parked polls, a node restarted, and readiness at start-up.

use std::time::Duration;

use nudge_testkit::free_port;
use nudge_testkit::redis::RedisServer;

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

    /// Starts it again on the same port.
    async fn restart(&mut self) {
        let port = self.0.port();
        assert!(
            self.0.launch().await.unwrap_or_else(|e| panic!("{e}")),
            "redis-server restarts on port {port}"
        );
    }

    /// SIGKILL: no goodbye to the subscribers, as in a crash.
    fn kill(&mut self) {
        self.0.kill();
    }

    /// Sends a signal to the server (`STOP`, `CONT`); false if that failed.
    fn signal(&self, signal: &str) -> bool {
        self.0.signal(signal)
    }

    /// How many `PING`s the server has answered (its `INFO commandstats`).
    async fn pings_answered(&self) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// `PUBLISH channel payload`, as a main API would; returns the receivers.
    async fn publish(&self, channel: &str, payload: &str) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap()
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

#[tokio::test]
async fn a_publish_posted_to_one_node_wakes_a_poll_parked_on_another() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let ch = b.register_topic("user:42").await;
    let poll = b.spawn_poll(&ch.url);
    b.wait_parked(1).await;

    let (status, body, _) = post(&a, "/v1/publish", json!({ "topic": "user:42" })).await;
    assert_eq!(status, StatusCode::OK);
    // Taken by Redis, handed to both nodes; nothing woken yet where it was posted.
    assert_eq!(
        body,
        json!({ "published": 1, "woken": 0, "subscribers": 2 })
    );
    assert_eq!(poll.await.unwrap(), "new_change");

    // Applied from the bus on both nodes, never straight from the API.
    wait_bus_publishes(&a, 1.0).await;
    wait_bus_publishes(&b, 1.0).await;
    assert_eq!(api_publishes(&a).await, 0.0);
    assert_eq!(a.metric("nudge_bus_connected").await, 1.0);
    assert_eq!(a.metric("nudge_bus_gaps_total").await, 0.0);
}

#[tokio::test]
async fn what_the_main_api_publishes_straight_into_redis_reaches_every_node() {
    let redis = Redis::start().await;
    // A channel name of our own, to exercise --redis-channel.
    let on_bus = |c: &mut nudge::Config| {
        c.redis_url = Some(redis.url());
        c.redis_channel = "app:realtime".into();
    };
    let a = TestServer::with(on_bus).await;
    let b = TestServer::with(on_bus).await;
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
    assert_eq!(
        redis.publish("app:realtime", r#"{"topic":"box:1"}"#).await,
        2
    );
    assert_eq!(poll_a.await.unwrap(), "new_change");
    assert_eq!(poll_b.await.unwrap(), "new_change");

    // An array, and NDJSON (told by its lines: Redis has no content type): each entry counts.
    let x = b.register_topic("x").await;
    let y = b.register(json!({ "topics": ["y"] })).await;
    redis
        .publish("app:realtime", r#"[{"topic":"x"},{"topic":"nobody"}]"#)
        .await;
    redis
        .publish(
            "app:realtime",
            "{\"topic\":\"y\",\"position\":5}\n{\"topic\":\"z\",\"stream_type\":\"changes\"}\n",
        )
        .await;
    wait_bus_publishes(&b, 5.0).await;
    assert_eq!(b.message(&x.url, "&dont_block=true").await, "new_change");
    assert_eq!(b.message(&y.url, "&stream_position=4").await, "new_change");

    // A bad message is refused (all or nothing) and the subscription carries on.
    redis
        .publish("app:realtime", r#"{"topic":"x","oops":1}"#)
        .await;
    redis.publish("app:realtime", "not json").await;
    redis.publish("app:realtime", r#"{"topic":"x"}"#).await;
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
        .publish("app:realtime", r#"{"revoke":{"subject":"user:9"}}"#)
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

    // A last publish straight into Redis after all of them: Redis delivers in order on each
    // subscription, so once a node has applied it, it has seen everything before it, and
    // any duplicate would already show.
    redis.publish("nudge:publish", r#"{"topic":"last"}"#).await;
    for node in [&a, &b] {
        wait_bus_publishes(node, n + 1.0).await;
        assert_eq!(bus_publishes(node).await, n + 1.0);
        assert_eq!(api_publishes(node).await, 0.0);
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
    // as its origin, sent while A has a matching channel, must leave that channel alone
    // and still revoke B's.
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let user = json!({ "topics": ["t"], "subject": "user:5" });
    let (on_a, on_b) = (a.register(user.clone()).await, b.register(user).await);
    let origin = a.bus.as_ref().unwrap().node_id().to_owned();
    let envelope = json!({ "revoke": { "subject": "user:5" }, "origin": origin });
    redis.publish("nudge:publish", &envelope.to_string()).await;
    eventually(
        "B applied the revocation",
        Duration::from_secs(10),
        || async { !channel_exists(&b, &on_b.id).await },
    )
    .await;
    // A barrier after the envelope: once A has applied it, A has seen the envelope too.
    redis
        .publish("nudge:publish", r#"{"topic":"barrier"}"#)
        .await;
    wait_bus_publishes(&a, 1.0).await;
    assert!(channel_exists(&a, &on_a.id).await);
}

const SPREAD_POLLS: usize = 10;

#[tokio::test]
async fn redis_killed_and_restarted_under_parked_polls() {
    let mut redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let (on_a, on_b) = (a.register_topic("t").await, b.register_topic("t").await);
    let (poll_a, poll_b) = (a.spawn_poll(&on_a.url), b.spawn_poll(&on_b.url));
    // More parked polls on A, to see the wake-ups after the gap spread out.
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
        eventually("/readyz answers 503", Duration::from_secs(10), || async {
            node.readyz().await == (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready".into()))
        })
        .await;
        assert_eq!(node.metric("nudge_bus_connected").await, 0.0);
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
    assert!(!poll_a.is_finished() && !poll_b.is_finished());

    redis.restart().await;
    // Whatever was published during the gap is unknown: every parked poll is answered.
    assert_eq!(poll_a.await.unwrap(), "new_change");
    assert_eq!(poll_b.await.unwrap(), "new_change");
    let mut answered = Vec::new();
    for poll in spread {
        let (answer, at) = poll.await.unwrap();
        assert_eq!(answer, "new_change");
        answered.push(at);
    }
    // Spread over the 2 s window, the last of 11 at 10/11 of it: not all at once.
    let (first, last) = (
        answered.iter().min().unwrap(),
        answered.iter().max().unwrap(),
    );
    assert!(
        *last - *first >= Duration::from_secs(1),
        "gap wake-ups spread over only {:?}",
        *last - *first
    );
    for node in [&a, &b] {
        node.wait_ready().await;
        assert_eq!(node.metric("nudge_bus_gaps_total").await, 1.0);
        assert_eq!(node.metric("nudge_bus_connected").await, 1.0);
    }
    // And the bus works again, publisher connection included.
    let poll_b = b.spawn_poll(&on_b.url);
    b.wait_parked(1).await;
    let (status, _, _) = post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(poll_b.await.unwrap(), "new_change");
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

    // The same node (same public address, the one in the channel URL) comes back empty.
    let b = TestServer::with(|c| {
        c.redis_url = Some(redis.url());
        c.listen = public;
    })
    .await;
    b.wait_ready().await;
    assert_eq!(b.message(&ch.url, "").await, "max_retries");
    // A first subscription is no gap.
    assert_eq!(b.metric("nudge_bus_gaps_total").await, 0.0);
    // Its new channels get publishes from the other node.
    let fresh = b.register_topic("t").await;
    let poll = b.spawn_poll(&fresh.url);
    b.wait_parked(1).await;
    post(&a, "/v1/publish", json!({ "topic": "t" })).await;
    assert_eq!(poll.await.unwrap(), "new_change");
}

#[tokio::test]
async fn a_node_is_not_ready_until_its_first_subscription() {
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
    // subscription is up, so it is marked pending then (no gap is counted).
    let early = node.register_topic("t").await;

    redis.restart().await;
    node.wait_ready().await;
    assert_eq!(node.metric("nudge_bus_connected").await, 1.0);
    assert_eq!(node.metric("nudge_bus_gaps_total").await, 0.0);
    assert_eq!(node.spawn_poll(&early.url).await.unwrap(), "new_change");
}

#[tokio::test]
async fn a_hung_redis_is_noticed_by_the_pings() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    // A quiet but healthy subscription is pinged (every 5 s), and the pings do not break it.
    let before = redis.pings_answered().await;
    eventually(
        "both nodes pinged Redis",
        Duration::from_secs(15),
        || async { redis.pings_answered().await >= before + 2 },
    )
    .await;
    for node in [&a, &b] {
        assert_eq!(node.readyz().await.0, StatusCode::OK);
        assert_eq!(node.metric("nudge_bus_gaps_total").await, 0.0);
    }

    // A Redis that stops answering without closing anything (as behind a partition) is
    // noticed by a ping that goes unanswered.
    assert!(redis.signal("STOP"));
    let resume = ContOnDrop(&redis);
    for node in [&a, &b] {
        eventually("/readyz answers 503", Duration::from_secs(15), || async {
            node.readyz().await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
    }
    drop(resume);
    for node in [&a, &b] {
        node.wait_ready().await;
        assert_eq!(node.metric("nudge_bus_gaps_total").await, 1.0);
    }
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
fn a_redis_url_the_client_cannot_use_exits_64_naming_the_flag() {
    for url in ["redis://", "redis://127.0.0.1:6379/notadb"] {
        let stderr = refused(&["--redis-url", url]);
        assert!(stderr.contains("--redis-url"), "{stderr}");
        // Nothing was bound: config errors come before the listeners.
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}
