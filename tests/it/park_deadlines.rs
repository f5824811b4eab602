//! Park deadlines (`hub/deadlines.rs`): the hub's park timer answers `reconnect` at a poll's
//! deadline, and the entry a poll answered early leaves behind neither touches a later poll
//! of the same channel nor piles up on a busy node.

use std::sync::Arc;
use std::time::Duration;

use nudge::hub::{Answer, Hub, Limits, ParkedPoll, PollRequest, PollStart, Publish, Registration};
use tokio::time::Instant;

use crate::support;

fn hub(retry_timeout: Duration) -> Arc<Hub> {
    let limits = Limits {
        ttl: Duration::from_secs(600),
        retry_timeout,
        max_retries: 10,
    };
    support::hub(limits, 100_000).0
}

fn register(hub: &Hub, topic: &str) -> String {
    hub.register(Registration {
        topics: vec![topic.into()],
        ..Default::default()
    })
    .unwrap()
    .id
    .to_string()
}

fn park(hub: &Arc<Hub>, id: &str) -> ParkedPoll {
    match hub.poll(id, PollRequest::default()) {
        PollStart::Park(p) => p,
        _ => panic!("parks"),
    }
}

fn publish(hub: &Hub, topic: &str) -> usize {
    let publish = [Publish {
        topic: topic.into(),
        position: None,
        stream_type: None,
    }];
    hub.publish(&publish, "api").woken
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_parked_poll_is_answered_reconnect_at_its_deadline_and_counted() {
    let hub = hub(Duration::from_secs(1));
    let id = register(&hub, "t");
    let start = Instant::now();
    let parked = park(&hub, &id);
    let deadline = parked.deadline();
    assert_eq!(parked.wait().await, Answer::Reconnect);
    let answered = Instant::now();
    assert!(answered >= deadline, "answered before its deadline");
    assert!(
        answered - start < Duration::from_secs(1),
        "parked longer than retry_timeout: {:?}",
        answered - start
    );
    let info = hub.channel_info(&id).unwrap();
    assert_eq!(info.retries_used, 1);
    assert_eq!(info.parked_polls, 0);
    assert_eq!(hub.counts().parked, 0);
}

/// A poll answered `new_change` leaves its deadline behind; the next poll of the channel
/// (parked at once, on the same channel) is not answered when that old deadline comes, and
/// the budget is untouched.
#[tokio::test]
async fn an_early_answer_leaves_a_deadline_that_touches_no_later_poll() {
    let hub = hub(Duration::from_secs(1));
    let id = register(&hub, "t");
    let first = park(&hub, &id);
    let first_deadline = first.deadline();
    assert_eq!(publish(&hub, "t"), 1);
    assert_eq!(first.wait().await, Answer::NewChange);
    // Parked 0.3 s before the first one's deadline, the second one's (0.81-0.9 s later) is
    // at least half a second after it, whatever the jitter.
    tokio::time::sleep_until(first_deadline - Duration::from_millis(300)).await;
    let second = park(&hub, &id);
    assert!(second.deadline() > first_deadline + Duration::from_millis(500));
    assert_eq!(
        hub.deadline_entries(),
        2,
        "the first poll's entry is still there"
    );
    // The first poll's tick comes and goes: its entry is taken and skipped.
    wait_until("the stale entry's tick", Duration::from_secs(3), || {
        hub.deadline_entries() == 1
    })
    .await;
    let info = hub.channel_info(&id).unwrap();
    assert_eq!(info.parked_polls, 1, "the second poll is still parked");
    assert_eq!(info.retries_used, 0);
    // It ends at its own deadline.
    assert_eq!(second.wait().await, Answer::Reconnect);
    assert_eq!(hub.channel_info(&id).unwrap().retries_used, 1);
}

/// A poll handed over by an upgrade near the end of its park time is re-parked with a
/// deadline sooner than the park timer's next wake-up (it sleeps up to half a second when
/// nothing is due): filing it wakes the timer, so the poll is answered on time, not up to
/// half a second late (past `retry_timeout`).
#[tokio::test]
async fn a_deadline_sooner_than_the_timers_next_wake_is_kept() {
    let hub = hub(Duration::from_secs(60));
    let ids: Vec<String> = (0..10).map(|_| register(&hub, "t")).collect();
    let mut late = Vec::new();
    for id in &ids {
        // At a different moment of the timer's sleep each time.
        tokio::time::sleep(Duration::from_millis(70)).await;
        let deadline = Instant::now() + Duration::from_millis(60);
        let parked = match hub.repark(id, deadline) {
            PollStart::Park(p) => p,
            _ => panic!("parks"),
        };
        assert_eq!(parked.wait().await, Answer::Reconnect);
        late.push(Instant::now().saturating_duration_since(deadline));
    }
    // One 50 ms tick and some scheduling; without the wake-up, up to 500 ms.
    assert!(
        late.iter().all(|l| *l < Duration::from_millis(200)),
        "answered this late after their deadlines: {late:?}"
    );
}

/// A busy node answers most of its polls long before their deadlines: their entries must
/// not pile up for a whole park time (here 54 s of 200,000 answered polls).
#[tokio::test]
async fn stale_deadlines_of_a_busy_node_stay_bounded() {
    const CHANNELS: usize = 1_000;
    const ROUNDS: usize = 200;
    let hub = hub(Duration::from_secs(60));
    let ids: Vec<String> = (0..CHANNELS).map(|_| register(&hub, "hot")).collect();
    let mut peak = 0;
    for _ in 0..ROUNDS {
        let parked: Vec<ParkedPoll> = ids.iter().map(|id| park(&hub, id)).collect();
        assert_eq!(publish(&hub, "hot"), CHANNELS);
        for p in parked {
            assert_eq!(p.wait().await, Answer::NewChange);
        }
        peak = peak.max(hub.deadline_entries());
        tokio::task::yield_now().await;
    }
    // The lists are compacted once the stale entries outnumber the parked polls by more
    // than a slack: nowhere near the 200,000 entries added.
    let bound = nudge::hub::COMPACT_SLACK + 2 * CHANNELS;
    wait_until("stale entries compacted", Duration::from_secs(5), || {
        hub.deadline_entries() <= bound
    })
    .await;
    assert!(
        hub.deadline_entries() < ROUNDS * CHANNELS / 4,
        "peak {peak}, now {}",
        hub.deadline_entries()
    );
    // And the channels are as they were: nothing parked, nothing used, nothing pending.
    assert_eq!(hub.counts().parked, 0);
    let info = hub.channel_info(&ids[0]).unwrap();
    assert_eq!((info.retries_used, info.pending), (0, false));
}
