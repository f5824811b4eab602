//! Channel semantics (SPEC §3), over real sockets, with short durations.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{TestServer, eventually, secs};

#[tokio::test]
async fn a_publish_with_no_poll_parked_is_kept_for_the_next_poll() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    assert_eq!(s.publish(json!({"topic": "t"})).await, (1, 0));
    let start = Instant::now();
    assert_eq!(s.message(&ch.url, "").await, "new_change");
    assert!(start.elapsed() < secs(1.0), "answered at once");
    // The mark is spent: the next poll parks.
    let poll = s.spawn_poll(&ch.url);
    s.wait_parked(1).await;
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(poll.await.unwrap(), "new_change");
}

#[tokio::test]
async fn polls_parked_together_return_at_different_times() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(3.0)).await;
    let start = Instant::now();
    let mut polls = Vec::new();
    for i in 0..8 {
        let ch = s.register_topic(&format!("t{i}")).await;
        let (http, url) = (s.http.clone(), ch.url.clone());
        polls.push(tokio::spawn(async move {
            http.get(url).send().await.unwrap().text().await.unwrap();
            start.elapsed()
        }));
    }
    let mut ends = Vec::new();
    for p in polls {
        ends.push(p.await.unwrap());
    }
    ends.sort();
    // Park time 2.7 s minus up to 0.27 s of jitter.
    assert!(ends[0] >= secs(2.4) && ends[7] < secs(3.0), "{ends:?}");
    assert!(
        ends[7] - ends[0] > Duration::from_millis(20),
        "jitter spreads them: {ends:?}"
    );
}

#[tokio::test]
async fn the_reconnect_budget_is_one_plus_max_retries_then_max_retries_and_gone() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(1.0)).await;
    let ch = s.register(json!({"topics": ["t"], "max_retries": 1})).await;
    assert_eq!(s.message(&ch.url, "").await, "reconnect");
    assert_eq!(s.message(&ch.url, "").await, "reconnect");
    assert_eq!(s.message(&ch.url, "").await, "max_retries");
    let res = s
        .http
        .get(s.internal_url(&format!("/v1/channels/{}", ch.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "the retired channel is removed");
    assert_eq!(s.hub.counts().channels, 0);
    assert_eq!(s.hub.counts().topics, 0);
}

#[tokio::test]
async fn changes_do_not_count_and_win_over_a_spent_budget() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(1.0)).await;
    let ch = s.register(json!({"topics": ["t"], "max_retries": 0})).await;
    // new_change answers do not use the budget.
    for _ in 0..3 {
        s.publish(json!({"topic": "t"})).await;
        assert_eq!(s.message(&ch.url, "").await, "new_change");
    }
    assert_eq!(s.message(&ch.url, "").await, "reconnect");
    // The budget (1 + 0) is spent; a pending change still wins.
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(s.message(&ch.url, "").await, "new_change");
    assert_eq!(s.message(&ch.url, "").await, "max_retries");
}

#[tokio::test]
async fn every_parked_poll_of_a_channel_counts_its_reconnect() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(1.0)).await;
    let ch = s.register(json!({"topics": ["t"], "max_retries": 1})).await;
    let a = s.spawn_poll(&ch.url);
    let b = s.spawn_poll(&ch.url);
    assert_eq!(a.await.unwrap(), "reconnect");
    assert_eq!(b.await.unwrap(), "reconnect");
    assert_eq!(s.message(&ch.url, "").await, "max_retries");
}

#[tokio::test]
async fn a_channel_that_is_not_live_answers_max_retries_then_holds_and_reconnects() {
    let s = TestServer::start().await;
    let url = s.public_url("/subscribe?channel=AAAAAAAAAAAAAAAAAAAAAA");
    let start = Instant::now();
    assert_eq!(s.message(&url, "").await, "max_retries");
    assert!(start.elapsed() < secs(0.5));
    for _ in 0..2 {
        let start = Instant::now();
        assert_eq!(s.message(&url, "").await, "reconnect");
        let held = start.elapsed();
        assert!(held >= secs(0.99) && held < secs(3.5), "held {held:?}");
    }
}

#[tokio::test]
async fn an_idle_channel_expires_after_its_ttl_and_frees_everything() {
    let s = TestServer::with(|c| c.limits.ttl = secs(1.0)).await;
    let ch = s.register(json!({"topics": ["a", "b"]})).await;
    assert_eq!(s.hub.counts().channels, 1);
    assert_eq!(s.hub.counts().topics, 2);
    let hub = s.hub.clone();
    eventually("the channel expires", secs(4.0), || {
        let hub = hub.clone();
        async move { hub.counts().channels == 0 }
    })
    .await;
    assert_eq!(s.hub.counts().topics, 0, "its topics are freed too");
    assert_eq!(s.metric("nudge_channels").await, 0.0);
    assert_eq!(s.metric("nudge_topics").await, 0.0);
    assert_eq!(s.message(&ch.url, "").await, "max_retries");
}

#[tokio::test]
async fn a_parked_poll_keeps_its_channel_alive_past_the_ttl() {
    let s = TestServer::with(|c| {
        c.limits.ttl = secs(1.0);
        c.limits.retry_timeout = secs(3.0);
    })
    .await;
    let ch = s.register_topic("t").await;
    // Parked for ~2.5 s, well past the 1 s ttl.
    assert_eq!(s.message(&ch.url, "").await, "reconnect");
    // The ttl counts again from the end of that poll: still live now.
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(s.message(&ch.url, "").await, "new_change");
}

/// The ttl counts from the end of the last poll, and a poll answered at once ends at once:
/// a client whose polls never park (`dont_block`, or a change waiting every time) keeps
/// its channel alive for as long as it keeps polling within the ttl.
#[tokio::test]
async fn polls_answered_at_once_keep_their_channel_alive_too() {
    let s = TestServer::with(|c| c.limits.ttl = secs(1.0)).await;
    let ch = s.register_topic("t").await;
    let start = std::time::Instant::now();
    while start.elapsed() < secs(3.0) {
        tokio::time::sleep(secs(0.3)).await;
        assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");
        tokio::time::sleep(secs(0.3)).await;
        s.publish(json!({"topic": "t"})).await;
        assert_eq!(s.message(&ch.url, "").await, "new_change");
    }
    // Once the client stops, the channel expires as usual.
    let hub = s.hub.clone();
    eventually("the channel expires", secs(4.0), || {
        let hub = hub.clone();
        async move { hub.counts().channels == 0 }
    })
    .await;
}

#[tokio::test]
async fn a_newer_stream_position_answers_at_once_even_for_a_channel_registered_later() {
    let s = TestServer::start().await;
    s.publish(json!({"topic": "box:1", "position": 10})).await;
    // Registered after the publish: no pending mark, but the position is remembered.
    let ch = s.register_topic("box:1").await;
    assert_eq!(s.message(&ch.url, "&stream_position=9").await, "new_change");
    assert_eq!(
        s.message(&ch.url, "&stream_position=10&dont_block=true")
            .await,
        "no_change"
    );
    assert_eq!(
        s.message(&ch.url, "&stream_position=now&dont_block=true")
            .await,
        "no_change"
    );
}

#[tokio::test]
async fn a_pending_mark_set_only_by_seen_positions_is_dropped() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    s.publish(json!({"topic": "t", "position": 7})).await;
    // The client already has 8: no need to wake it.
    assert_eq!(
        s.message(&ch.url, "&stream_position=8&dont_block=true")
            .await,
        "no_change"
    );
    assert_eq!(
        s.message(&ch.url, "&dont_block=true").await,
        "no_change",
        "the mark is gone"
    );
    // A publish without a position can't be proven seen.
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(
        s.message(&ch.url, "&stream_position=8&dont_block=true")
            .await,
        "new_change"
    );
}

#[tokio::test]
async fn a_publish_wakes_parked_polls_whatever_their_position() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let poll = s.spawn_poll(&format!("{}&stream_position=100", ch.url));
    s.wait_parked(1).await;
    s.publish(json!({"topic": "t", "position": 5})).await;
    assert_eq!(poll.await.unwrap(), "new_change");
}

#[tokio::test]
async fn stream_type_filters_publishes() {
    let s = TestServer::start().await;
    let changes = s
        .register(json!({"topics": ["t"], "stream_type": "changes"}))
        .await;
    let all = s.register(json!({"topics": ["t"]})).await;
    assert!(changes.url.ends_with("&stream_type=changes"));
    assert!(all.url.ends_with("&stream_type=all"));

    s.publish(json!({"topic": "t", "stream_type": "tree"}))
        .await;
    assert_eq!(
        s.message(&changes.url, "&dont_block=true").await,
        "no_change"
    );
    assert_eq!(s.message(&all.url, "&dont_block=true").await, "new_change");

    s.publish(json!({"topic": "t", "stream_type": "changes"}))
        .await;
    assert_eq!(
        s.message(&changes.url, "&dont_block=true").await,
        "new_change"
    );
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(
        s.message(&changes.url, "&dont_block=true").await,
        "new_change"
    );
}

#[tokio::test]
async fn one_publish_wakes_every_channel_on_the_topic_and_only_those() {
    let s = TestServer::start().await;
    let on: Vec<_> = futures_join(&s, &["user:1", "user:1", "user:1"]).await;
    let other = s.register_topic("user:2").await;
    let multi = s.register(json!({"topics": ["user:2", "user:1"]})).await;
    let polls: Vec<_> = on
        .iter()
        .chain([&multi])
        .map(|c| s.spawn_poll(&c.url))
        .collect();
    let other_poll = s.spawn_poll(&other.url);
    s.wait_parked(5).await;
    assert_eq!(s.publish(json!({"topic": "user:1"})).await, (1, 4));
    for p in polls {
        assert_eq!(p.await.unwrap(), "new_change");
    }
    assert_eq!(s.hub.counts().parked, 1, "user:2's poll is still parked");
    other_poll.abort();
}

async fn futures_join(s: &TestServer, topics: &[&str]) -> Vec<crate::support::Channel> {
    let mut out = Vec::new();
    for t in topics {
        out.push(s.register_topic(t).await);
    }
    out
}

#[tokio::test]
async fn revoke_and_delete_answer_parked_polls_max_retries() {
    let s = TestServer::start().await;
    let alice = s
        .register(json!({"topics": ["box:1"], "subject": "user:alice"}))
        .await;
    let bob = s
        .register(json!({"topics": ["box:1"], "subject": "user:bob"}))
        .await;
    let bob2 = s
        .register(json!({"topics": ["box:2"], "subject": "user:bob"}))
        .await;
    let carol = s
        .register(json!({"topics": ["box:3"], "subject": "user:carol"}))
        .await;
    let polls: Vec<_> = [&alice, &bob, &bob2, &carol]
        .iter()
        .map(|c| s.spawn_poll(&c.url))
        .collect();
    s.wait_parked(4).await;

    // Both filters: only bob's channel on box:1.
    assert_eq!(
        s.revoke(json!({"subject": "user:bob", "topic": "box:1"}))
            .await,
        1
    );
    let mut polls = polls.into_iter();
    let (pa, pb, pb2, pc) = (
        polls.next().unwrap(),
        polls.next().unwrap(),
        polls.next().unwrap(),
        polls.next().unwrap(),
    );
    assert_eq!(pb.await.unwrap(), "max_retries");
    // By subject: bob's other channel.
    assert_eq!(s.revoke(json!({"subject": "user:bob"})).await, 1);
    assert_eq!(pb2.await.unwrap(), "max_retries");
    // By topic.
    assert_eq!(s.revoke(json!({"topic": "box:1"})).await, 1);
    assert_eq!(pa.await.unwrap(), "max_retries");
    // Delete.
    let res = s
        .http
        .delete(s.internal_url(&format!("/v1/channels/{}", carol.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(pc.await.unwrap(), "max_retries");

    assert_eq!(s.hub.counts().channels, 0);
    assert_eq!(s.hub.counts().parked, 0);
    assert_eq!(s.hub.counts().topics, 0);
    // A revoked channel's next poll is held, then reconnect (its first max_retries was given).
    let start = Instant::now();
    assert_eq!(s.message(&bob.url, "").await, "reconnect");
    assert!(start.elapsed() >= secs(0.99));
}

#[tokio::test]
async fn the_drain_answers_every_parked_poll_reconnect() {
    let s = TestServer::start().await;
    let mut polls = Vec::new();
    for i in 0..5 {
        let ch = s.register_topic(&format!("t{i}")).await;
        polls.push(s.spawn_poll(&ch.url));
    }
    s.wait_parked(5).await;
    let hub = s.hub.clone();
    s.stop().await;
    for p in polls {
        assert_eq!(p.await.unwrap(), "reconnect");
    }
    assert_eq!(hub.counts().parked, 0);
}

/// During a drain every answer closes its connection, so a client that re-polls at once
/// (as Box's Python SDKs do on `reconnect`) reaches another node instead of looping here.
#[tokio::test]
async fn the_drain_closes_kept_alive_connections_after_their_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for fast_path in [true, false] {
        let s = TestServer::with(|c| {
            c.fast_path = fast_path;
            c.drain_period = secs(3.0);
        })
        .await;
        let ch = s.register_topic("t").await;
        let path = format!("/subscribe?channel={}", ch.id);
        // One connection that already had an answer and sits idle, one with a poll parked.
        let mut idle = tokio::net::TcpStream::connect(s.public).await.unwrap();
        idle.write_all(
            format!("GET {path}&dont_block=true HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut parked = tokio::net::TcpStream::connect(s.public).await.unwrap();
        parked
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        s.wait_parked(1).await;
        // Ten more, so that the drain really takes most of its 3 s.
        let mut others = Vec::new();
        for i in 0..10 {
            let other = s.register_topic(&format!("o{i}")).await;
            others.push(s.spawn_poll(&other.url));
        }
        s.wait_parked(11).await;
        let mut first = [0u8; 1024];
        let n = idle.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).ends_with(r#"{"message":"no_change"}"#));

        let started = Instant::now();
        let stopping = tokio::spawn(s.stop());
        let read_all = |mut conn: tokio::net::TcpStream| async move {
            let mut all = Vec::new();
            tokio::time::timeout(secs(5.0), conn.read_to_end(&mut all))
                .await
                .expect("closed")
                .unwrap();
            String::from_utf8(all).unwrap()
        };
        assert_eq!(
            read_all(idle).await,
            "",
            "fast_path={fast_path}: the idle connection is closed"
        );
        // Closed at the start of the 3 s drain, not at its end.
        assert!(
            started.elapsed() < secs(1.5),
            "fast_path={fast_path}: the idle connection closed after {:?}",
            started.elapsed()
        );
        let answer = read_all(parked).await;
        assert!(
            answer.contains("connection: close\r\n"),
            "fast_path={fast_path}: {answer}"
        );
        assert!(
            answer.ends_with(r#"{"message":"reconnect"}"#),
            "fast_path={fast_path}: {answer}"
        );
        stopping.await.unwrap();
        for other in others {
            assert_eq!(other.await.unwrap(), "reconnect");
        }
    }
}
