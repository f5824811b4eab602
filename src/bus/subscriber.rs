//! The subscription every node holds on the bus channel. One at a time: a new connection
//! is made only once the old one is gone, which is what makes each message arrive once.
//!
//! A lost subscription (the stream ends, or a ping goes unanswered) turns the node not
//! ready; it reconnects with a capped, jittered backoff. Every successful subscription after
//! the first is a *gap*: the node marks every live channel pending, spread over
//! [`GAP_SPREAD`], and counts `nudge_bus_gaps_total`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::message::{self, Message};
use super::{Bus, BusError};

/// The first reconnect delay, and the cap the doubling stops at.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Connecting and subscribing must be done within this.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A quiet subscription is pinged this often; a ping unanswered for `PING_TIMEOUT` means
/// the connection is dead even if no FIN or RST ever came (a partition, a hung Redis).
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// After a gap, the wake-ups of every parked poll are spread over this window, so that
/// their clients do not all call the main API in the same instant.
const GAP_SPREAD: Duration = Duration::from_secs(2);
/// Refused bus messages are logged at most this often (a misbehaving publisher must not
/// flood the log).
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);
/// While Redis stays down, one warning per this many failed attempts (the rest at debug).
const WARN_EVERY_ATTEMPTS: u32 = 30;

pub(super) async fn run(bus: Arc<Bus>) {
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP);
    let mut subscribed_before = false;
    loop {
        match subscribe(&bus).await {
            Ok((sink, stream)) => {
                backoff.reset();
                // Its connection most likely died with the subscription's.
                bus.publisher.reset().await;
                bus.set_connected(true);
                info!(channel = %bus.channel, node = %bus.node_id, gap = subscribed_before, "bus subscribed");
                mark_after_gap(&bus, subscribed_before);
                subscribed_before = true;
                let why = pump(&bus, sink, stream).await;
                bus.set_connected(false);
                warn!(reason = %why, "bus subscription lost; not ready until it is back");
            }
            Err(e) if backoff.attempts().is_multiple_of(WARN_EVERY_ATTEMPTS) => {
                warn!(error = %e, attempts = backoff.attempts() + 1, "cannot subscribe to the bus")
            }
            Err(e) => {
                debug!(error = %e, attempts = backoff.attempts() + 1, "cannot subscribe to the bus")
            }
        }
        sleep(backoff.next_delay()).await;
    }
}

async fn subscribe(bus: &Bus) -> Result<(PubSubSink, PubSubStream), BusError> {
    let connect = async {
        let (mut sink, stream) = bus.client.get_async_pubsub().await?.split();
        sink.subscribe(&bus.channel).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    Ok(timeout(SUBSCRIBE_TIMEOUT, connect)
        .await
        .map_err(|_| BusError::Timeout)??)
}

/// After a gap nobody can know what was missed: every live channel is marked pending.
/// On the first subscription only channels registered before it (while the node was not
/// ready) can have missed anything; they are marked too, but that is no gap.
fn mark_after_gap(bus: &Bus, gap: bool) {
    if gap {
        bus.hub.metrics().bus_gaps_total.inc();
    } else if bus.hub.counts().channels == 0 {
        return;
    }
    let hub = bus.hub.clone();
    tokio::spawn(async move {
        let channels = hub.mark_all_pending(GAP_SPREAD).await;
        info!(
            channels,
            gap, "bus resubscribed: every channel marked pending"
        );
    });
}

type Ping = Pin<Box<dyn Future<Output = Result<redis::RedisResult<redis::Value>, ()>> + Send>>;

/// Applies messages until the subscription is lost; returns why.
async fn pump(bus: &Bus, sink: PubSubSink, mut stream: PubSubStream) -> String {
    let mut complaints = Complaints::default();
    let mut next_ping = Instant::now() + PING_EVERY;
    let mut ping: Option<Ping> = None;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => apply(bus, msg.get_payload_bytes(), &mut complaints),
                None => return "connection closed".into(),
            },
            _ = sleep_until(next_ping), if ping.is_none() => {
                let mut sink = sink.clone();
                ping = Some(Box::pin(async move {
                    timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await.map_err(|_| ())
                }));
            }
            answer = async { ping.as_mut().expect("guarded by is_some").await }, if ping.is_some() => {
                ping = None;
                next_ping = Instant::now() + PING_EVERY;
                match answer {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("ping failed: {e}"),
                    Err(()) => return format!("no answer to a ping within {PING_TIMEOUT:?}"),
                }
            }
        }
    }
}

/// Applies one bus message on this node.
fn apply(bus: &Bus, payload: &[u8], complaints: &mut Complaints) {
    match message::decode(payload) {
        Ok(Message::Publish(batch)) => {
            bus.hub.publish(&batch, "bus");
        }
        Ok(Message::Revoke { origin, .. }) if origin.as_deref() == Some(bus.node_id()) => {
            // Applied when it was posted here.
        }
        Ok(revoke @ Message::Revoke { .. }) => {
            let filter = revoke.revoke_filter().expect("a revoke");
            let revoked = bus.hub.revoke(&filter);
            debug!(revoked, "revocation from the bus applied");
        }
        Err(why) => complaints.complain(&why, payload.len()),
    }
}

/// Rate-limits the warning about refused bus messages.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    fn complain(&mut self, why: &str, bytes: usize) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < COMPLAIN_EVERY) {
            self.suppressed += 1;
            return;
        }
        warn!(
            error = why,
            bytes,
            suppressed = self.suppressed,
            "bus message refused"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}
