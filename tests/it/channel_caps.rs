//! Node-wide caps on what registrations may hold, and memory given back after a burst
//! (issue 11.4): a buggy main API cannot grow a node without bound.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, eventually};

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
    assert!(
        s.metric("nudge_registrations_refused_total{cap=\"channels\"}")
            .await
            >= 1.0
    );
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
    assert_eq!(
        s.metric("nudge_registrations_refused_total{cap=\"topic_bytes\"}")
            .await,
        1.0
    );
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
