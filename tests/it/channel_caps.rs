//! Node-wide caps on what registrations may hold, and memory given back after a burst
//! (issue 11.4): a buggy main API cannot grow a node without bound.

use std::time::Duration;

use nudge_testkit::Node;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{TestServer, eventually, metric_sample};

/// `POST /v1/channels` expecting `503 too_many_channels`; returns its `Retry-After`.
async fn refused(s: &TestServer, body: Value) -> u64 {
    let res = s
        .http
        .post(s.internal_url("/v1/channels"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = res
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "too_many_channels", "{body}");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    retry_after
}

/// Past `--max-channels` a registration is answered 503 with `Retry-After`; parked polls and
/// publishes go on; the cap lifts when a channel is deleted or expires.
#[tokio::test]
async fn past_max_channels_registration_is_refused_until_a_channel_goes() {
    let s = TestServer::with(|c| c.caps.max_channels = 3).await;
    let a = s.register_topic("t").await;
    let b = s.register_topic("t").await;
    let short = s.register(json!({"topics": ["u"], "ttl": 2})).await;
    // Once the sweep has seen the short channel, Retry-After is when it expires (plus the
    // sweep's second); before, a fixed 5 s.
    eventually(
        "Retry-After names the 2 s channel's expiry",
        Duration::from_secs(3),
        || async { refused(&s, json!({"topics": ["t"]})).await <= 3 },
    )
    .await;
    assert!(s.metric("nudge_registrations_refused_total").await >= 1.0);
    assert_eq!(s.metric("nudge_channels").await, 3.0, "nothing half-made");

    // Polls and publishes on the channels already there are unaffected.
    let poll = s.spawn_poll(&a.url);
    s.wait_parked(1).await;
    assert_eq!(s.publish(json!({"topic": "t"})).await, (1, 1));
    assert_eq!(poll.await.unwrap(), "new_change");
    assert_eq!(s.message(&b.url, "&dont_block=true").await, "new_change");

    // The short channel expires: room for one.
    let hub = s.hub.clone();
    eventually("the 2 s channel expires", Duration::from_secs(5), || {
        let hub = hub.clone();
        async move { hub.counts().channels == 2 }
    })
    .await;
    assert_eq!(s.message(&short.url, "").await, "max_retries");
    let c = s.register_topic("t").await;
    refused(&s, json!({"topics": ["t"]})).await;

    // A deletion makes room too.
    let res = s
        .http
        .delete(s.internal_url(&format!("/v1/channels/{}", c.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    s.register_topic("t").await;
    s.stop().await;
}

/// Concurrent registrations never pass `--max-channels`: each reserves its place before it
/// is made, so 40 at once on a cap of 5 make exactly 5 channels and 35 refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_never_pass_the_cap() {
    let s = TestServer::with(|c| c.caps.max_channels = 5).await;
    let url = s.internal_url("/v1/channels");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (http, url) = (s.http.clone(), url.clone());
            tokio::spawn(async move {
                let body = json!({ "topics": [format!("t{i}")] });
                http.post(url).json(&body).send().await.unwrap().status()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            status => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
        }
    }
    assert_eq!(created, 5);
    assert_eq!(s.metric("nudge_channels").await, 5.0);
    assert_eq!(
        s.metric("nudge_topics").await,
        5.0,
        "no refused topic left behind"
    );
    assert_eq!(s.metric("nudge_registrations_refused_total").await, 35.0);
    s.stop().await;
}

/// `--max-topic-bytes` counts the distinct names bound by live channels: a name many
/// channels share costs once, a registration that would pass the cap is refused whole, and
/// the room comes back when the channels holding a name go.
#[tokio::test]
async fn past_max_topic_bytes_registration_is_refused_until_names_are_freed() {
    let s = TestServer::with(|c| c.caps.max_topic_bytes = 1024).await;
    let name = |c: char| c.to_string().repeat(256);
    let shared = [name('a'), name('b'), name('c')];
    let first = s.register(json!({ "topics": shared })).await;
    for _ in 0..10 {
        s.register(json!({ "topics": shared })).await;
    }
    assert_eq!(
        s.metric("nudge_topic_bytes").await,
        768.0,
        "shared names count once"
    );
    let d = s.register(json!({ "topics": [name('d')] })).await;
    assert_eq!(
        s.metric("nudge_topic_bytes").await,
        1024.0,
        "exactly at the cap"
    );

    // One new byte, even next to names already held, is past the cap.
    refused(&s, json!({ "topics": [name('a'), "e"] })).await;
    assert_eq!(s.metric("nudge_registrations_refused_total").await, 1.0);
    assert_eq!(s.metric("nudge_channels").await, 12.0, "nothing half-made");
    assert_eq!(
        s.metric("nudge_topics").await,
        4.0,
        "\"e\" was not left behind"
    );
    assert_eq!(s.metric("nudge_topic_bytes").await, 1024.0);
    // Names already held still register.
    s.register(json!({ "topics": [name('b')] })).await;

    // Publishes and polls are unaffected.
    let poll = s.spawn_poll(&first.url);
    s.wait_parked(1).await;
    s.publish(json!({"topic": name('a')})).await;
    assert_eq!(poll.await.unwrap(), "new_change");

    // Revoking the only channel on `d` frees its 256 bytes.
    assert_eq!(s.revoke(json!({ "topic": name('d') })).await, 1);
    assert_eq!(s.message(&d.url, "").await, "max_retries");
    assert_eq!(s.metric("nudge_topic_bytes").await, 768.0);
    s.register(json!({ "topics": [name('e')] })).await;
    s.stop().await;
}

/// Positions of topics nobody listens to are remembered within a byte budget (half of
/// `--max-topic-bytes`), not only a count: past it they are refused and counted.
#[tokio::test]
async fn remembered_positions_are_bounded_by_bytes() {
    let s = TestServer::with(|c| c.caps.max_topic_bytes = 1024).await;
    for c in ['x', 'y', 'z'] {
        let topic = c.to_string().repeat(200);
        s.publish(json!({"topic": topic, "position": 7})).await;
    }
    assert_eq!(
        s.metric("nudge_topics").await,
        2.0,
        "400 of 512 bytes; 600 is past"
    );
    assert_eq!(s.metric("nudge_positions_refused_total").await, 1.0);
    // A channel on a remembered topic still sees the position it missed.
    let ch = s.register(json!({"topics": ["x".repeat(200)]})).await;
    assert_eq!(s.message(&ch.url, "&stream_position=3").await, "new_change");
    s.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_nudge");

/// A sample of the node's `/metrics`.
async fn metric(node: &Node, http: &reqwest::Client, sample: &str) -> f64 {
    let url = format!("http://{}/metrics", node.internal);
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    metric_sample(&text, sample)
}

/// The node's resident memory.
fn rss(node: &Node) -> u64 {
    node.rss_bytes().expect("the node's /proc entry")
}

/// A burst of registrations with a short ttl grows the node by tens of MB; once they have
/// expired and the gauges are back to 0, resident memory comes back near its baseline: the
/// sweep shrinks the channel and topic tables the burst grew, and the allocator hands the
/// freed pages back to the OS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_returns_near_baseline_after_a_registration_burst_expires() {
    const CHANNELS: usize = 20_000;
    const TOPICS: usize = 8;
    const CONNECTIONS: usize = 4;
    const MIB: f64 = (1 << 20) as f64;
    // Longer than the burst takes on a loaded CI machine (16 s seen with a debug build),
    // so that the peak holds every channel.
    const TTL_SECONDS: u64 = 25;
    // The caps through a flag and an environment twin, far above what the burst needs.
    let node = Node::start(
        BIN,
        &["--max-topic-bytes", "1GiB"],
        &[("NUDGE_MAX_CHANNELS", "1000000")],
    );
    // A connection per scrape: one left idle through the burst may be closed under it.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!(metric(&node, &http, "nudge_channels").await, 0.0);
    let baseline = rss(&node);

    let started = Instant::now();
    let url = format!("http://{}/v1/channels", node.internal);
    let mut workers = Vec::new();
    for w in 0..CONNECTIONS {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            // One keep-alive connection per worker.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            for i in (w..CHANNELS).step_by(CONNECTIONS) {
                let topics: Vec<String> = (0..TOPICS)
                    .map(|t| format!("{i:08}-{t}-{}", "x".repeat(180)))
                    .collect();
                let res = http
                    .post(&url)
                    .json(&json!({"topics": topics, "ttl": TTL_SECONDS}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::CREATED);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let peak = rss(&node);
    eprintln!(
        "burst of {CHANNELS} registrations in {:?}: rss {:.1} MiB -> {:.1} MiB",
        started.elapsed(),
        baseline as f64 / MIB,
        peak as f64 / MIB
    );
    assert!(
        peak > baseline + (40 << 20),
        "the burst grew the node (else this test proves nothing)"
    );

    eventually("every channel expired", Duration::from_secs(60), || async {
        metric(&node, &http, "nudge_channels").await == 0.0
            && metric(&node, &http, "nudge_topics").await == 0.0
            && metric(&node, &http, "nudge_topic_bytes").await == 0.0
    })
    .await;
    let near = baseline + (10 << 20);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let rss = rss(&node);
        if rss <= near {
            eprintln!(
                "rss back to {:.1} MiB after {:?}",
                rss as f64 / MIB,
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resident memory stayed at {:.1} MiB (baseline {:.1} MiB, peak {:.1} MiB)",
            rss as f64 / MIB,
            baseline as f64 / MIB,
            peak as f64 / MIB
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
