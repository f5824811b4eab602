//! Park deadlines: when each parked poll is answered `reconnect`.
//!
//! Kept per channel shard in coarse ticks ([`TICK`]) and expired by one thread per hub
//! (`nudge-park-timer`), instead of a tokio `Sleep` in every parked poll: a `Sleep` is a
//! timer entry of ~100 bytes pinned in the poll's task for as long as it is parked, which
//! was most of what nudge's parked poll held beyond the floor's (`benches/longpoll`), while
//! an entry here is 24 bytes, in a list shared by every poll due in the same tick.
//!
//! A poll answered before its deadline (a publish, the drain, its client leaving) leaves
//! its entry behind: taking it out would mean finding it. The entry is looked up when its
//! tick comes and skipped if its waiter is gone; and so that a busy node's stale entries
//! cannot pile up for a whole park time, the lists are compacted whenever the stale entries
//! outnumber the parked polls (amortised: one lookup per poll answered early). Counting the
//! stale ones costs nothing: every entry but the stale ones is a parked poll, which the hub
//! counts anyway, so a node that only parks (a million polls arriving) never compacts.
//!
//! Lock order: a shard's deadlines are locked while holding the same shard's channel lock,
//! or alone (to count them), never the other way round: they add no lock order of their own.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{ChannelShard, Hub};
use crate::id::ChannelId;

/// The deadlines' resolution: a poll is answered at most this long after its park time,
/// which stays inside `retry_timeout` (SPEC §3: the grace is at least 100 ms, as
/// `retry_timeout` is at least 1 s).
pub const TICK: Duration = Duration::from_millis(50);

const TICK_NANOS: u64 = TICK.as_nanos() as u64;

/// Longest the park timer sleeps: shorter than the shortest park time (0.81 s, at a
/// `retry_timeout` of 1 s), so that a poll parked while it sleeps is never late, and often
/// enough that stale entries are compacted soon. A node whose polls are all due later
/// wakes twice a second, not twenty times.
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// Stale entries a hub may hold beyond as many as it has parked polls before its lists are
/// compacted: small numbers are left alone.
pub const COMPACT_SLACK: usize = 16_384;

/// The park deadlines of one channel shard.
#[derive(Default)]
pub(super) struct Deadlines {
    /// Tick → the polls due in it, as (channel, waiter key).
    due: BTreeMap<u64, Vec<(ChannelId, u64)>>,
    entries: usize,
}

impl Deadlines {
    /// Notes that waiter `key` of channel `id` is due at `tick`.
    pub fn insert(&mut self, tick: u64, id: ChannelId, key: u64) {
        self.due.entry(tick).or_default().push((id, key));
        self.entries += 1;
    }

    /// The earliest tick it holds.
    pub fn first_tick(&self) -> Option<u64> {
        self.due.first_key_value().map(|(tick, _)| *tick)
    }

    /// Takes every entry due at or before `tick`.
    pub fn take_due(&mut self, tick: u64) -> Vec<Vec<(ChannelId, u64)>> {
        if self
            .due
            .first_key_value()
            .is_none_or(|(first, _)| *first > tick)
        {
            return Vec::new();
        }
        let later = self.due.split_off(&(tick + 1));
        let due: Vec<_> = std::mem::replace(&mut self.due, later)
            .into_values()
            .collect();
        self.entries -= due.iter().map(Vec::len).sum::<usize>();
        due
    }

    /// Drops the entries whose poll is no longer parked.
    pub fn compact(&mut self, shard: &ChannelShard) {
        self.due.retain(|_, list| {
            list.retain(|(id, key)| shard.get(id).is_some_and(|ch| ch.has_waiter(*key)));
            list.shrink_to_fit();
            !list.is_empty()
        });
        self.entries = self.due.values().map(Vec::len).sum();
    }

    /// How many entries it holds, stale ones included.
    pub fn len(&self) -> usize {
        self.entries
    }
}

impl Hub {
    /// The tick a deadline falls in, rounded up: a poll is never answered before its park
    /// time.
    pub(super) fn tick_of(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.origin);
        (since.as_nanos() as u64).div_ceil(TICK_NANOS)
    }

    /// Wakes the park timer if it sleeps past `tick`: a deadline sooner than its next wake
    /// (a poll handed over by an upgrade near the end of its park time; the shortest park
    /// times are longer than its longest sleep). While it scans it counts as sleeping
    /// forever, so that a deadline filed behind its scan wakes it again at once.
    pub(super) fn wake_park_timer_for(&self, tick: u64) {
        if tick <= self.timer_planned.load(Ordering::Acquire)
            && let Some(timer) = self.park_timer.get()
        {
            timer.unpark();
        }
    }

    /// The last tick that has begun by `at` (its entries are due).
    fn tick_reached(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64 / TICK_NANOS
    }

    /// Answers `reconnect` to every parked poll whose deadline has passed by `now`, counted
    /// against its channel's budget. Returns when the next entry is due, if any.
    fn expire_due(&self, now: Instant) -> Option<Instant> {
        let tick = self.tick_reached(now);
        let mut next: Option<u64> = None;
        // Entries as the last pass left them, less the parked polls: the stale ones (those
        // filed since are parked polls too, and not counted on either side).
        let parked = self.parked.load(Ordering::Relaxed).max(0) as usize;
        let stale = self
            .deadline_total
            .load(Ordering::Relaxed)
            .saturating_sub(parked);
        let compact = stale > parked + COMPACT_SLACK;
        let mut total = 0;
        for (shard, deadlines) in self.channels.iter().zip(self.deadlines.iter()) {
            let mut expired = Vec::new();
            {
                let mut shard = shard.lock();
                let mut deadlines = deadlines.lock();
                for (id, key) in deadlines.take_due(tick).into_iter().flatten() {
                    let Some(ch) = shard.get_mut(&id) else {
                        continue;
                    };
                    let Some(waiter) = ch.take_waiter(key) else {
                        continue;
                    };
                    ch.reconnects = ch.reconnects.saturating_add(1);
                    ch.touch_if_idle(now);
                    expired.push(waiter.tx);
                }
                if compact {
                    deadlines.compact(&shard);
                }
                total += deadlines.len();
                if let Some(first) = deadlines.first_tick() {
                    next = Some(next.map_or(first, |n| n.min(first)));
                }
            }
            if expired.is_empty() {
                continue;
            }
            self.note_change();
            self.count_parked(-(expired.len() as i64));
            // A poll whose client left meanwhile finds its waiter taken and drops this.
            for tx in expired {
                let _ = tx.send(super::Answer::Reconnect.into());
            }
        }
        self.deadline_total.store(total, Ordering::Relaxed);
        next.map(|tick| self.origin + Duration::from_nanos(TICK_NANOS * tick))
    }

    /// Entries in the park deadlines, stale ones included (for tests and the benchmark).
    pub fn deadline_entries(&self) -> usize {
        self.deadlines.iter().map(|d| d.lock().len()).sum()
    }
}

/// Runs [`Hub::expire_due`] on a thread of its own for as long as the hub lives, when the
/// next entry is due (or a sooner one is filed) and at least every [`MAX_SLEEP`]. Not a
/// tokio task: a hub is also built outside a runtime (benchmarks, tests), and expiring is
/// short work under shard locks, never an `.await`. It keeps real time: under tokio's
/// paused test clock a parked poll is answered `reconnect` when real time reaches its
/// deadline, not paused time.
pub(super) fn spawn_park_timer(hub: Weak<Hub>) -> std::thread::Thread {
    std::thread::Builder::new()
        .name("nudge-park-timer".into())
        .spawn(move || {
            let mut wake = Instant::now() + TICK;
            loop {
                // Woken early by `Hub::wake_park_timer_for` (or spuriously): it just scans.
                std::thread::park_timeout(wake.saturating_duration_since(Instant::now()));
                let Some(hub) = hub.upgrade() else { break };
                hub.timer_planned.store(u64::MAX, Ordering::Release);
                let now = Instant::now();
                let next = hub.expire_due(now);
                let latest = now + MAX_SLEEP;
                wake = next.map_or(latest, |next| next.min(latest));
                hub.timer_planned
                    .store(hub.tick_reached(wake), Ordering::Release);
            }
        })
        .expect("the park timer thread starts")
        .thread()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_is_due_and_leaves_the_rest() {
        let ids: Vec<ChannelId> = (0..4).map(|_| ChannelId::random()).collect();
        let id = |n: usize| ids[n];
        let mut d = Deadlines::default();
        d.insert(5, id(1), 1);
        d.insert(7, id(2), 2);
        d.insert(5, id(3), 3);
        assert!(d.take_due(4).is_empty());
        let due: Vec<_> = d.take_due(6).into_iter().flatten().collect();
        assert_eq!(due, vec![(id(1), 1), (id(3), 3)]);
        assert_eq!(d.len(), 1);
        let due: Vec<_> = d.take_due(100).into_iter().flatten().collect();
        assert_eq!(due, vec![(id(2), 2)]);
        assert_eq!(d.len(), 0);
    }
}
