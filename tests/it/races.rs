//! No lost wake-up (SPEC §3): a publish racing with a poll that arrives, parks, times out
//! or disconnects must answer that poll or leave the channel's pending mark.
//!
//! The check is the guarantee a client sees: in rounds, a publisher publishes once and
//! then waits until its client has received `new_change` from a poll that ended after the
//! publish began. A round that waits longer than the deadline is a lost change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nudge::hub::{Answer, Hub, Limits, PollRequest, PollStart, Publish, Registration};
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::support::{self, TestServer};

/// Sets the flag when dropped, so that pollers stop even when their publisher panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A hub of its own, with parks of `retry_timeout` and a budget that never runs out.
fn test_hub(retry_timeout: Duration) -> Arc<Hub> {
    let limits = Limits {
        ttl: Duration::from_secs(60),
        retry_timeout,
        max_retries: u32::MAX - 1,
    };
    support::hub(limits, 10_000).0
}

/// When a client last received `new_change`.
#[derive(Default)]
struct Seen(Mutex<Option<Instant>>);

impl Seen {
    fn record(&self) {
        *self.0.lock() = Some(Instant::now());
    }
    fn since(&self, t: Instant) -> bool {
        self.0.lock().is_some_and(|seen| seen >= t)
    }
}

async fn wait_seen(seen: &Seen, published: Instant, what: &str) {
    // A lost change never arrives; 5 s only keeps a very loaded machine from looking like one.
    let deadline = published + Duration::from_secs(5);
    while !seen.since(published) {
        assert!(Instant::now() < deadline, "lost change: {what}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Straight on the hub, on a multi-threaded runtime: polls park, time out after ~20 ms,
/// and are cancelled at random moments (as a disconnect does), while publishes race them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hub_no_publish_is_lost_under_racing_polls_timeouts_and_disconnects() {
    const CHANNELS: usize = 8;
    const ROUNDS: usize = 400;
    let hub = test_hub(Duration::from_millis(20));
    let cancelled = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CHANNELS {
        let topic = format!("t{c}");
        let id = hub
            .register(Registration {
                topics: vec![topic.clone()],
                ..Default::default()
            })
            .unwrap()
            .id
            .to_string();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Two pollers per channel: several polls parked on one channel at once.
        for _ in 0..2 {
            let (hub, id, seen, stop, cancelled) = (
                hub.clone(),
                id.clone(),
                seen.clone(),
                stop.clone(),
                cancelled.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match hub.poll(&id, PollRequest::default()) {
                        PollStart::Answer(Answer::NewChange) => seen.record(),
                        PollStart::Answer(_) => {}
                        PollStart::Park(parked) => {
                            let cancel_after = Duration::from_micros(fastrand::u64(0..30_000));
                            tokio::select! {
                                answer = parked.wait() => if answer == Answer::NewChange { seen.record() },
                                _ = tokio::time::sleep(cancel_after) => { cancelled.fetch_add(1, Ordering::Relaxed); }
                            }
                        }
                        PollStart::TooManyPolls | PollStart::OverCapacity | PollStart::Hold(_)
                        | PollStart::Moving => {
                            panic!("unexpected start")
                        }
                    }
                    if fastrand::bool() {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            let _stop = StopOnDrop(stop);
            for round in 0..ROUNDS {
                if fastrand::u8(..) < 64 {
                    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3_000))).await;
                }
                let published = Instant::now();
                hub.publish(
                    &[Publish {
                        topic: topic.clone(),
                        position: None,
                        stream_type: None,
                    }],
                    "api",
                );
                wait_seen(&seen, published, &format!("channel {c}, round {round}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        cancelled.load(Ordering::Relaxed) > 100,
        "disconnects did race the publishes"
    );
    // Nothing left behind.
    assert_eq!(hub.counts().parked, 0);
}

/// Over real sockets through hyper: clients poll with several polls per channel, parks
/// time out (1 s), publishes arrive at random moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_no_publish_is_lost_under_racing_polls_and_timeouts() {
    const CHANNELS: usize = 6;
    const ROUNDS: usize = 150;
    let s = Arc::new(TestServer::with(|c| c.limits.retry_timeout = Duration::from_secs(1)).await);
    let mut tasks = Vec::new();
    for c in 0..CHANNELS {
        let topic = format!("t{c}");
        let ch = s.register_topic(&topic).await;
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        for poller in 0..2 {
            let (s, url, seen, stop) = (s.clone(), ch.url.clone(), seen.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // One poller sometimes asks without blocking: a third way in.
                    let extra = if poller == 1 && fastrand::bool() {
                        "&dont_block=true"
                    } else {
                        ""
                    };
                    if s.message(&url, extra).await == "new_change" {
                        seen.record();
                    }
                }
            }));
        }
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let _stop = StopOnDrop(stop);
            for round in 0..ROUNDS {
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..5_000))).await;
                let published = Instant::now();
                s.publish(json!({"topic": topic})).await;
                wait_seen(&seen, published, &format!("channel {c}, round {round}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A client that closes its parked poll just before a publish arrives must find the change
/// on its next poll: the node sees the close and the publish at nearly the same moment, and
/// whichever it handles first, the `new_change` must not go into the closed socket and be
/// forgotten. Both paths, many rounds (the race is lost in a fraction of them at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_published_right_after_a_client_closes_its_poll_waits_for_its_next_poll() {
    const ROUNDS: usize = 150;
    for fast_path in [true, false] {
        let s = TestServer::with(|c| c.fast_path = fast_path).await;
        let ch = s.register_topic("closing").await;
        let path = ch.url.trim_start_matches(&format!("http://{}", s.public));
        for round in 0..ROUNDS {
            let mut conn = tokio::net::TcpStream::connect(s.public).await.unwrap();
            conn.write_all(crate::raw::get(path, "").as_bytes())
                .await
                .unwrap();
            s.wait_parked(1).await;
            drop(conn);
            s.publish(json!({"topic": "closing"})).await;
            let what = format!("fast_path {fast_path}, round {round}: new_change on the next poll");
            s.wait_new_change(&ch.url, &what).await;
            s.wait_parked(0).await;
        }
        s.stop().await;
    }
}

/// After a gap in the bus every parked poll is answered `new_change`, spread over a window.
/// A client that leaves while its poll waits for its turn must find the change on its next
/// poll: the spread's answer reaches nobody, so the channel keeps it pending.
#[tokio::test]
async fn hub_a_poll_dropped_during_the_gap_spread_leaves_the_channel_pending() {
    let hub = test_hub(Duration::from_secs(60));
    let mut ids = Vec::new();
    let mut parked = Vec::new();
    for c in 0..4 {
        let id = hub
            .register(Registration {
                topics: vec![format!("gap{c}")],
                ..Default::default()
            })
            .unwrap()
            .id
            .to_string();
        match hub.poll(&id, PollRequest::default()) {
            PollStart::Park(p) => parked.push(p),
            _ => panic!("a fresh channel parks its first poll"),
        }
        ids.push(id);
    }
    let spread = tokio::spawn({
        let hub = hub.clone();
        // 4 polls at 6 a second: 600 ms.
        async move { hub.mark_all_pending(6).await }
    });
    let taken = hub.clone();
    crate::support::eventually(
        "the spread took every waiter",
        Duration::from_secs(5),
        || {
            let hub = taken.clone();
            async move { hub.counts().parked == 0 }
        },
    )
    .await;
    // Every client leaves before (most of) the spread's answers are sent.
    drop(parked);
    assert_eq!(spread.await.unwrap(), 4);
    for id in &ids {
        let next = PollRequest {
            dont_block: true,
            ..Default::default()
        };
        assert!(
            matches!(hub.poll(id, next), PollStart::Answer(Answer::NewChange)),
            "the gap's change waits for the next poll of every channel"
        );
    }
}
