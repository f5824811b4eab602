//! Handing parked polls to another process (the upgrade in place, `crate::upgrade`).
//!
//! [`Hub::detach_parked`] first sets the `moving` flag, then takes every waiter out of every
//! channel, one shard lock at a time, and sends each a delivery that is not an answer: the
//! poll's transport gets [`Outcome::Handover`](super::Outcome::Handover) and moves its
//! connection, or (hyper) answers `reconnect` as in a drain. A poll looks at the flag under
//! its shard's lock before it changes anything, so a poll either parks before that shard is
//! swept (and is swept) or finds the flag and gets [`PollStart::Moving`]: none is left
//! parked behind, and none consumes a pending mark after the sweep, so a snapshot taken
//! once the sweep is over is the state the other process must carry on from.
//!
//! If the other process fails, [`Hub::end_moving`] clears the flag and the transport parks
//! its polls again with [`Hub::repark`], each with the deadline it had.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{Answer, Delivery, Hub, Rider};

/// Held (through the [`Rider`]) by every handover delivery: when the last is dropped, every
/// detached poll has been dealt with by its transport.
pub(crate) struct Tally {
    _all_dealt_with: oneshot::Sender<()>,
}

/// A poll taken off its channel to be handed over. Drop it once the connection is moved
/// (or closed): [`Detached::dealt_with`] waits for every token.
pub struct HandoverToken {
    _rider: Arc<Rider>,
}

impl HandoverToken {
    pub(super) fn new(rider: Arc<Rider>) -> HandoverToken {
        HandoverToken { _rider: rider }
    }

    /// The transport could not move this poll and answers it instead (as in a drain).
    pub(crate) fn not_moved(self) {}
}

/// What [`Hub::detach_parked`] did.
pub struct Detached {
    /// Parked polls taken off their channels.
    pub polls: usize,
    dealt_with: oneshot::Receiver<()>,
}

impl Detached {
    /// Resolves once every detached poll's transport has moved it or answered it (or the
    /// client had gone).
    pub async fn dealt_with(self) {
        // Never sent: the sender's drop (the last token's) is the signal.
        let _ = self.dealt_with.await;
    }
}

impl Hub {
    /// Whether polls are being handed to another process.
    pub fn is_moving(&self) -> bool {
        self.moving.load(Ordering::Acquire)
    }

    /// Takes every parked poll off its channel, unanswered, for its transport to hand to
    /// another process; from now on polls get [`PollStart::Moving`](super::PollStart) and
    /// held polls of not-live ids are answered `reconnect` at once.
    pub fn detach_parked(&self) -> Detached {
        self.moving.store(true, Ordering::SeqCst);
        // Held polls of not-live ids end now (`reconnect`), as in a drain: they cannot move.
        self.drain_started.notify_waiters();
        let (tx, rx) = oneshot::channel();
        let rider = Arc::new(Rider::Handover {
            _tally: Tally {
                _all_dealt_with: tx,
            },
        });
        let mut detached = Vec::new();
        let now = tokio::time::Instant::now();
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            for ch in shard.values_mut() {
                if !ch.waiters.is_empty() {
                    self.count_parked(-(ch.waiters.len() as i64));
                    detached.extend(ch.waiters.drain(..).map(|w| w.tx));
                    // Its ttl runs from here, as after any poll: a channel whose client
                    // leaves during the handover still expires (`repark` stops the clock).
                    ch.touch_if_idle(now);
                }
            }
        }
        // The detached channels' ttl clocks started: a snapshot must see it.
        self.note_change();
        // Sent with no lock held. A poll whose client has gone drops its receiver, and the
        // delivery with it.
        let polls = detached.len();
        for tx in detached {
            let _ = tx.send(Delivery {
                answer: Answer::Reconnect,
                rider: Some(rider.clone()),
            });
        }
        drop(rider);
        Detached {
            polls,
            dealt_with: rx,
        }
    }

    /// The handover was abandoned: polls start and park here again as before.
    pub fn end_moving(&self) {
        self.moving.store(false, Ordering::SeqCst);
    }
}
