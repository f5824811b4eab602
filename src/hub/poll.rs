//! Polls: starting one (answer now, park, or hold a not-live id), and the parked and held
//! polls a transport awaits.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use super::channel::{Channel, Waiter};
use super::not_live::NotLiveAnswer;
use super::{
    Answer, Delivery, HandoverToken, Hub, PollRequest, PollStart, Rider, held_share, park_time,
};
use crate::id::ChannelId;
use crate::metrics::outcome;

impl Hub {
    /// Starts a poll of the channel named `id_text` (SPEC §3, order of precedence).
    pub fn poll(self: &Arc<Self>, id_text: &str, req: PollRequest) -> PollStart {
        let Some(id) = ChannelId::parse(id_text) else {
            return self.poll_not_live(id_text);
        };
        // Positions live in the topic index, which is never locked together with a channel
        // shard: read them first. A publish landing in between still finds the poll parked
        // or leaves the pending mark, so nothing is lost by the gap.
        let newest = match req.stream_position {
            None => None,
            Some(_) => {
                let topics = match self.shard(id).lock().get(&id) {
                    Some(ch) => ch.topics.clone(),
                    None => return self.poll_not_live(id_text),
                };
                self.topics.newest_position(&topics)
            }
        };

        let mut shard = self.shard(id).lock();
        let Some(ch) = shard.get_mut(&id) else {
            drop(shard);
            return self.poll_not_live(id_text);
        };
        // Looked at under the shard lock, before anything is changed: `Hub::detach_parked`
        // sets the flag and then sweeps each shard under its lock, so a poll either parks
        // before the sweep (and is swept) or sees the flag (see `handover.rs`).
        if self.is_moving() {
            return PollStart::Moving;
        }
        // Every way on from here changes the channel (its mark, its ttl clock, a waiter).
        self.note_change();
        // A poll answered at once ends now: the ttl clock starts again from here (SPEC §3,
        // "from the end of its last poll"), unless another poll is parked and holds it.
        if let Some(seen) = req.stream_position {
            if newest.is_some_and(|n| n > seen) {
                ch.pending.clear();
                ch.touch_if_idle(Instant::now());
                return self.answer_now(Answer::NewChange);
            }
            ch.pending.drop_if_seen(seen);
        }
        if ch.pending.is_set() {
            ch.pending.clear();
            ch.touch_if_idle(Instant::now());
            return self.answer_now(Answer::NewChange);
        }
        if req.dont_block {
            ch.touch_if_idle(Instant::now());
            return self.answer_now(Answer::NoChange);
        }
        if ch.budget_spent() {
            let retired = shard.remove(&id).expect("present above");
            drop(shard);
            self.forget(id, &retired);
            self.not_live.lock().remember(id_text, Instant::now());
            return self.answer_now(Answer::MaxRetries);
        }
        if self.is_draining() {
            return self.answer_now(Answer::Reconnect);
        }
        if ch.waiters.len() >= self.config.max_polls_per_channel {
            self.metrics.count_outcome(outcome::TOO_MANY_POLLS);
            return PollStart::TooManyPolls;
        }
        let occupied = self.parked.load(Ordering::Relaxed) + self.held.load(Ordering::Relaxed);
        if occupied >= self.config.max_parked as i64 {
            self.metrics.count_outcome(outcome::OVER_CAPACITY);
            return PollStart::OverCapacity;
        }
        let deadline = Instant::now() + park_time(ch.limits.retry_timeout);
        PollStart::Park(self.park_waiter(ch, id, deadline))
    }

    /// Parks a waiter on `ch` (under its shard's lock) until `deadline`, and counts it.
    fn park_waiter(
        self: &Arc<Self>,
        ch: &mut Channel,
        id: ChannelId,
        deadline: Instant,
    ) -> ParkedPoll {
        let (tx, rx) = oneshot::channel();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        // Most channels have one poll at a time: room for one, not the four a first push
        // makes (48 B a parked poll); a second poll grows it as usual.
        if ch.waiters.capacity() == 0 {
            ch.waiters.reserve_exact(1);
        }
        ch.waiters.push(Waiter { key, tx });
        ch.idle_deadline = None;
        // Lock order: the channel's shard (held by the caller), then its deadlines.
        let tick = self.tick_of(deadline);
        self.deadlines_of(id).lock().insert(tick, id, key);
        self.wake_park_timer_for(tick);
        self.count_parked(1);
        ParkedPoll {
            hub: self.clone(),
            id,
            key,
            deadline,
            rx,
            settled: false,
        }
    }

    /// Parks a poll that another process had parked and handed over (an upgrade in place),
    /// with the deadline it had there: not a new poll, so no cap is checked and nothing is
    /// counted but the parked poll itself. A change that is pending by now (a bus replay)
    /// answers it at once; a channel this hub does not know answers `reconnect`, as a poll
    /// of a channel that expired while parked would be.
    pub fn repark(self: &Arc<Self>, id_text: &str, deadline: Instant) -> PollStart {
        let Some(id) = ChannelId::parse(id_text) else {
            return self.answer_now(Answer::Reconnect);
        };
        let mut shard = self.shard(id).lock();
        let Some(ch) = shard.get_mut(&id) else {
            return self.answer_now(Answer::Reconnect);
        };
        self.note_change();
        if ch.pending.is_set() {
            ch.pending.clear();
            ch.touch_if_idle(Instant::now());
            return self.answer_now(Answer::NewChange);
        }
        PollStart::Park(self.park_waiter(ch, id, deadline))
    }

    pub(super) fn answer_now(&self, answer: Answer) -> PollStart {
        self.metrics.count_answer(answer);
        PollStart::Answer(answer)
    }

    pub(super) fn poll_not_live(self: &Arc<Self>, id_text: &str) -> PollStart {
        // The not-live ids are handed over too: leave them as they are.
        if self.is_moving() {
            return PollStart::Moving;
        }
        let verdict = self.not_live.lock().poll(id_text, Instant::now());
        match verdict {
            NotLiveAnswer::MaxRetries => {
                // Newly remembered: the next snapshot carries it.
                self.note_change();
                self.answer_now(Answer::MaxRetries)
            }
            NotLiveAnswer::Hold if self.is_draining() => self.answer_now(Answer::Reconnect),
            NotLiveAnswer::Hold => {
                // Holding needs no id at all, so held polls are capped per id like parked
                // ones per channel, and may take only a share of `max_parked` together (real
                // channels always find room); past either, the id is answered `max_retries`
                // at once, which tells an SDK to stop, not to loop.
                let per_id = self.config.max_polls_per_channel;
                let Some(key) = self.not_live.lock().try_hold(id_text, per_id) else {
                    return self.answer_now(Answer::MaxRetries);
                };
                let release = || self.not_live.lock().release(key);
                let share = held_share(self.config.max_parked) as i64;
                if self
                    .held
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                        (h < share).then_some(h + 1)
                    })
                    .is_err()
                {
                    release();
                    return self.answer_now(Answer::MaxRetries);
                }
                let occupied =
                    self.parked.load(Ordering::Relaxed) + self.held.load(Ordering::Relaxed);
                if occupied > self.config.max_parked as i64 {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    release();
                    self.metrics.count_outcome(outcome::OVER_CAPACITY);
                    return PollStart::OverCapacity;
                }
                let hold = Duration::from_millis(fastrand::u64(1000..=3000));
                PollStart::Hold(HeldPoll {
                    hub: self.clone(),
                    until: Instant::now() + hold,
                    key,
                })
            }
        }
    }

    /// A parked poll was dropped unanswered (its client went away).
    pub(super) fn abandon_poll(
        &self,
        id: ChannelId,
        key: u64,
        rx: &mut oneshot::Receiver<Delivery>,
    ) {
        let mut shard = self.shard(id).lock();
        self.note_change();
        if let Some(ch) = shard.get_mut(&id)
            && ch.take_waiter(key).is_some()
        {
            ch.touch_if_idle(Instant::now());
            self.count_parked(-1);
            self.metrics.count_outcome(outcome::GONE);
            return;
        }
        // Someone took the waiter. Close the receiver so a later send fails (and its sender
        // restores the mark); an answer that already arrived was never delivered.
        rx.close();
        if let Ok(Delivery {
            answer: Answer::NewChange,
            ..
        }) = rx.try_recv()
            && let Some(ch) = shard.get_mut(&id)
        {
            ch.pending.mark(None);
        }
        self.metrics.count_outcome(outcome::GONE);
    }
}

/// A parked poll. Await [`ParkedPoll::wait`]; dropping it (the client went away) removes it
/// from its channel, and keeps any `new_change` that raced with the drop pending.
pub struct ParkedPoll {
    hub: Arc<Hub>,
    id: ChannelId,
    key: u64,
    deadline: Instant,
    rx: oneshot::Receiver<Delivery>,
    settled: bool,
}

impl ParkedPoll {
    /// When the park time runs out (the hub answers `reconnect` then; kept for a handover).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The channel it is parked on.
    pub fn channel(&self) -> ChannelId {
        self.id
    }

    /// Waits for the answer: a publish, a revoke, the drain, or the park time running out.
    /// A poll being handed to another process is answered `reconnect` here, as in a drain:
    /// only a transport that can move its connection ([`ParkedPoll::poll_outcome`]) moves.
    pub async fn wait(mut self) -> Answer {
        std::future::poll_fn(|cx| self.poll_answer(cx)).await
    }

    /// The poll-based core of [`ParkedPoll::wait`], for a transport that drives its own
    /// future and would rather not hold a nested one per parked poll (the fast path). No
    /// timer here: the hub's park timer answers `reconnect` at the deadline.
    pub fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Answer> {
        self.poll_outcome(cx).map(|outcome| match outcome {
            Outcome::Answer(answer) => answer,
            Outcome::Handover(token) => {
                token.not_moved();
                self.hub.metrics.count_answer(Answer::Reconnect);
                Answer::Reconnect
            }
        })
    }

    /// [`ParkedPoll::poll_answer`] for a transport that can move its connection to another
    /// process: a poll being handed over comes out as [`Outcome::Handover`], unanswered.
    pub fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let gone = || Delivery::from(Answer::Reconnect);
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|sent| self.settle(sent.unwrap_or_else(|_| gone())))
    }

    /// The answer this poll got could not be written: its client is known to be gone. A
    /// `new_change` goes back to the channel as its pending mark, for the client's next poll.
    pub fn undelivered(&self, answer: Answer) {
        if answer != Answer::NewChange {
            return;
        }
        if let Some(ch) = self.hub.shard(self.id).lock().get_mut(&self.id) {
            ch.pending.mark(None);
            self.hub.note_change();
        }
    }

    fn settle(&mut self, delivery: Delivery) -> Outcome {
        self.settled = true;
        match delivery.rider {
            Some(rider) if matches!(*rider, Rider::Handover { .. }) => {
                return Outcome::Handover(HandoverToken::new(rider));
            }
            Some(rider) => {
                if let Rider::Fanout(clock) = &*rider {
                    clock.answered.store(true, Ordering::Relaxed);
                }
                // Dropping it here releases this poll's hold on the publish's fan-out clock.
            }
            None => {}
        }
        self.hub.metrics.count_answer(delivery.answer);
        Outcome::Answer(delivery.answer)
    }
}

impl Drop for ParkedPoll {
    fn drop(&mut self) {
        if !self.settled {
            self.hub.abandon_poll(self.id, self.key, &mut self.rx);
        }
    }
}

/// How a parked poll ended, for a transport that can move connections.
pub enum Outcome {
    /// Answered.
    Answer(Answer),
    /// Taken off its channel, unanswered, to be handed to another process: the transport
    /// moves the connection and then drops the token (see [`crate::hub::Detached`]).
    Handover(HandoverToken),
}

/// A poll of a channel that is not live, held 1–3 s before `reconnect` (SPEC §3).
pub struct HeldPoll {
    hub: Arc<Hub>,
    until: Instant,
    /// Its place among the id's held polls.
    key: u64,
}

impl HeldPoll {
    /// Waits until its hold time is over or the drain begins, then answers `reconnect`.
    pub async fn wait(self) -> Answer {
        let drain = self.hub.drain_started.notified();
        tokio::pin!(drain);
        drain.as_mut().enable();
        if !self.hub.is_draining() && !self.hub.is_moving() {
            tokio::select! {
                _ = sleep_until(self.until) => {}
                _ = drain => {}
            }
        }
        self.hub.metrics.count_answer(Answer::Reconnect);
        Answer::Reconnect
    }
}

impl Drop for HeldPoll {
    fn drop(&mut self) {
        self.hub.held.fetch_sub(1, Ordering::Relaxed);
        self.hub.not_live.lock().release(self.key);
    }
}
