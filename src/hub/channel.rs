//! One channel's state. Plain data: every method here runs under its shard's lock, and
//! none of them blocks, allocates much, or answers a poll (answers are sent after the
//! lock is released, see `hub/mod.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Delivery;

/// The limits a channel enforces: the node's defaults, lowered per channel on registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time a channel lives without a parked poll.
    pub ttl: Duration,
    /// Longest time a poll stays parked (less a grace, see [`park_time`](super::park_time)).
    pub retry_timeout: Duration,
    /// `reconnect` answers beyond the first before the channel answers `max_retries`.
    pub max_retries: u32,
}

/// A parked poll as the channel sees it: 16 bytes. `key` tells the poll's own guard which
/// waiter is its own; `tx` delivers the answer.
pub(crate) struct Waiter {
    pub key: u64,
    pub tx: oneshot::Sender<Delivery>,
}

/// Whether a change is waiting for the next poll, and what positions set it, so that a poll
/// carrying a newer `stream_position` can drop a mark it has already seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    set: bool,
    /// Set by at least one publish without a position: never dropped by a position.
    unpositioned: bool,
    max_position: u64,
}

impl Pending {
    pub fn mark(&mut self, position: Option<u64>) {
        self.set = true;
        match position {
            Some(p) => self.max_position = self.max_position.max(p),
            None => self.unpositioned = true,
        }
    }
    pub fn is_set(&self) -> bool {
        self.set
    }
    pub fn clear(&mut self) {
        *self = Pending::default();
    }
    /// `(set, unpositioned, max_position)`, for a snapshot.
    pub fn parts(&self) -> (bool, bool, u64) {
        (self.set, self.unpositioned, self.max_position)
    }
    /// Back from [`Pending::parts`].
    pub fn from_parts((set, unpositioned, max_position): (bool, bool, u64)) -> Pending {
        Pending {
            set,
            unpositioned: set && unpositioned,
            max_position: if set { max_position } else { 0 },
        }
    }
    /// Drops a mark set only by positions the client has already seen (`<= seen`).
    pub fn drop_if_seen(&mut self, seen: u64) {
        if self.set && !self.unpositioned && self.max_position <= seen {
            self.clear();
        }
    }
}

/// What few channels carry (a subject, a `stream_type` filter), behind one pointer so that
/// a channel without them pays 8 bytes, not 32: a channel is 128 bytes, one allocator size
/// class (boxed in its shard's map) below the 160 it would take otherwise.
struct Extras {
    subject: Option<Arc<str>>,
    /// `None` means `all`.
    stream_type: Option<Box<str>>,
}

pub(crate) struct Channel {
    pub topics: Arc<[Arc<str>]>,
    extras: Option<Box<Extras>>,
    pub limits: Limits,
    /// `reconnect` answers given so far; the budget is `1 + max_retries`.
    pub reconnects: u32,
    pub pending: Pending,
    pub waiters: Vec<Waiter>,
    /// When the channel expires for want of polls; `None` while a poll is parked.
    pub idle_deadline: Option<Instant>,
}

impl Channel {
    /// A channel with no poll yet, whose ttl clock runs from `now`.
    pub fn new(
        topics: Arc<[Arc<str>]>,
        subject: Option<&str>,
        stream_type: Option<&str>,
        limits: Limits,
        now: Instant,
    ) -> Channel {
        let extras = (subject.is_some() || stream_type.is_some()).then(|| {
            Box::new(Extras {
                subject: subject.map(Arc::from),
                stream_type: stream_type.map(Box::from),
            })
        });
        Channel {
            topics,
            extras,
            limits,
            reconnects: 0,
            pending: Pending::default(),
            waiters: Vec::new(),
            idle_deadline: Some(now + limits.ttl),
        }
    }

    /// The subject it was registered for, if any.
    pub fn subject(&self) -> Option<&str> {
        self.extras.as_ref()?.subject.as_deref()
    }

    /// Its `stream_type` filter; `None` means `all`.
    pub fn stream_type(&self) -> Option<&str> {
        self.extras.as_ref()?.stream_type.as_deref()
    }

    /// Whether a publish with this `stream_type` concerns the channel.
    pub fn wants(&self, stream_type: Option<&str>) -> bool {
        match (self.stream_type(), stream_type) {
            (None, _) | (_, None) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
        }
    }

    pub fn budget_spent(&self) -> bool {
        u64::from(self.reconnects) > u64::from(self.limits.max_retries)
    }

    /// Called whenever the last parked poll leaves: the ttl clock starts again. A list of
    /// waiters grown past the usual few (a large `--max-polls-per-channel`) is freed too.
    pub fn touch_if_idle(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            self.idle_deadline = Some(now + self.limits.ttl);
            if self.waiters.capacity() > 4 {
                self.waiters = Vec::new();
            }
        }
    }

    /// Removes the waiter with `key`, if it is still here.
    pub fn take_waiter(&mut self, key: u64) -> Option<Waiter> {
        let at = self.waiter_at(key)?;
        Some(self.waiters.swap_remove(at))
    }

    /// Whether the waiter with `key` is still here.
    pub fn has_waiter(&self, key: u64) -> bool {
        self.waiter_at(key).is_some()
    }

    fn waiter_at(&self, key: u64) -> Option<usize> {
        self.waiters.iter().position(|w| w.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_fits_the_allocators_128_byte_class() {
        // Boxed in its shard's map: above 128 bytes it would take a 160-byte slot.
        assert!(size_of::<Channel>() <= 128, "{}", size_of::<Channel>());
    }

    #[test]
    fn a_list_of_waiters_grown_by_a_burst_is_freed_when_the_last_leaves() {
        let limits = Limits {
            ttl: Duration::from_secs(60),
            retry_timeout: Duration::from_secs(60),
            max_retries: 10,
        };
        let mut ch = Channel::new(Arc::from(Vec::new()), None, None, limits, Instant::now());
        ch.idle_deadline = None;
        for key in 0..100 {
            ch.waiters.push(Waiter {
                key,
                tx: oneshot::channel().0,
            });
        }
        ch.waiters.clear();
        ch.touch_if_idle(Instant::now());
        assert_eq!(ch.waiters.capacity(), 0);
        assert!(ch.idle_deadline.is_some());
    }

    #[test]
    fn a_mark_set_by_seen_positions_is_dropped_but_not_an_unpositioned_one() {
        let mut p = Pending::default();
        p.mark(Some(5));
        p.mark(Some(7));
        p.drop_if_seen(6);
        assert!(p.is_set(), "7 was not seen yet");
        p.drop_if_seen(7);
        assert!(!p.is_set());

        p.mark(Some(3));
        p.mark(None);
        p.drop_if_seen(100);
        assert!(
            p.is_set(),
            "a publish without position can't be proven seen"
        );
    }
}
