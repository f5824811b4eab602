//! Publishing: waking the parked polls of every channel on a topic, and marking every
//! channel pending when a bus gap cannot be replayed.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Answer, Delivery, FanoutClock, Hub, Publish, PublishReport, Rider, answer_spread};
use crate::id::ChannelId;

/// A poll a publish woke: its channel, the publish's position, the waiter's sender, the
/// publish's clock.
type Wake = (
    ChannelId,
    Option<u64>,
    oneshot::Sender<Delivery>,
    Arc<Rider>,
);

impl Hub {
    /// Applies publishes: wakes the parked polls of every channel they concern, and marks
    /// the others pending. `source` labels `nudge_publishes_total`.
    ///
    /// The polls one publish woke are answered before the next publish of a batch is
    /// applied, so that other workers write those answers while this one goes on through
    /// the batch (with 18,000 topics in one batch, answering all at the end held every
    /// answer back by the whole batch's time).
    pub fn publish(&self, batch: &[Publish], source: &str) -> PublishReport {
        let arrived = Instant::now();
        let mut ids = Vec::new();
        let mut wake: Vec<Wake> = Vec::new();
        let mut woken = 0;
        for p in batch {
            ids.clear();
            // One clock per publish, made when it first wakes a poll.
            let mut clock: Option<Arc<Rider>> = None;
            self.topics.publish(&p.topic, p.position, arrived, &mut ids);
            for &id in &ids {
                let mut shard = self.shard(id).lock();
                let Some(ch) = shard.get_mut(&id) else {
                    continue;
                };
                if !ch.wants(p.stream_type.as_deref()) {
                    continue;
                }
                if ch.waiters.is_empty() {
                    ch.pending.mark(p.position);
                } else {
                    let n = ch.waiters.len() as i64;
                    let clock = clock.get_or_insert_with(|| {
                        Arc::new(Rider::Fanout(FanoutClock {
                            arrived,
                            histogram: self.metrics.fanout_seconds.clone(),
                            answered: AtomicBool::new(false),
                        }))
                    });
                    wake.extend(
                        ch.waiters
                            .drain(..)
                            .map(|w| (id, p.position, w.tx, clock.clone())),
                    );
                    ch.touch_if_idle(arrived);
                    self.count_parked(-n);
                }
            }
            woken += self.answer_woken(&mut wake);
        }
        self.set_topic_gauges();
        // Marks, positions (a bus entry also moves the node's bus position).
        self.note_change();
        self.metrics
            .publishes_total
            .with_label_values(&[source])
            .inc_by(batch.len() as u64);
        self.metrics.wakeups_total.inc_by(woken as u64);
        // nudge_fanout_seconds is observed by the last woken poll (see FanoutClock).
        PublishReport {
            published: batch.len(),
            woken,
        }
    }

    /// Answers `new_change` to the polls a publish took off their channels, with no lock
    /// held. Returns how many took it.
    fn answer_woken(&self, wake: &mut Vec<Wake>) -> usize {
        let mut woken = 0;
        for (id, position, tx, clock) in wake.drain(..) {
            let delivery = Delivery {
                answer: Answer::NewChange,
                rider: Some(clock),
            };
            if tx.send(delivery).is_ok() {
                woken += 1;
            } else if let Some(ch) = self.shard(id).lock().get_mut(&id) {
                // The client left between parking and now: keep the change for its next poll.
                ch.pending.mark(position);
            }
        }
        woken
    }

    /// Answers every parked poll `new_change`, `rate` of them a second, and marks every
    /// channel without one pending: after a gap in the bus that cannot be replayed nobody
    /// knows what was missed. A pending mark costs the main API nothing until its client
    /// polls again; an answered poll makes its client fetch at once, hence the rate.
    /// Returns the number of live channels.
    pub async fn mark_all_pending(&self, rate: u32) -> usize {
        let now = Instant::now();
        let mut wake = Vec::new();
        let mut channels = 0;
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            for (id, ch) in shard.iter_mut() {
                channels += 1;
                if ch.waiters.is_empty() {
                    ch.pending.mark(None);
                } else {
                    let n = ch.waiters.len() as i64;
                    wake.extend(ch.waiters.drain(..).map(|w| (*id, w.tx)));
                    ch.touch_if_idle(now);
                    self.count_parked(-n);
                }
            }
        }
        self.note_change();
        let spread = Duration::from_secs_f64(wake.len() as f64 / f64::from(rate.max(1)));
        let gone = answer_spread(wake, Answer::NewChange, spread).await;
        // Polls whose clients left while waiting for their turn: keep the change for the
        // next poll, as a publish does.
        for id in gone {
            if let Some(ch) = self.shard(id).lock().get_mut(&id) {
                ch.pending.mark(None);
                self.note_change();
            }
        }
        channels
    }
}
