//! Memory of channel ids that were answered `max_retries` (SPEC §3, "channels that are not
//! live"): for 60 s after that first answer, further polls of the id are held 1–3 s and
//! answered `reconnect`, so SDKs that ignore `max_retries` do not loop hot. Bounded: the
//! oldest ids are forgotten first. Ids are remembered by a keyed hash of their text, so
//! malformed ids (which are also just "unknown") cost the same few bytes. The key is a
//! random seed that travels with the memory ([`NotLiveState`]) to the process that takes
//! over, or that restores the node's state: the hashes mean nothing without it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// How long an id is remembered after its first `max_retries` answer.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// The memory as it travels: the seed of its hashes, and each remembered id's hash with
/// how long ago it was first answered `max_retries` (oldest first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotLiveState {
    /// The key the hashes were made with.
    pub seed: u64,
    /// `(hash, age in ms)`, oldest first.
    pub ids: Vec<(u64, u64)>,
}

pub(crate) struct NotLive {
    seed: u64,
    first_answer: HashMap<u64, Instant>,
    /// Oldest first; an entry may be stale (the id was forgotten and seen again), and is
    /// then skipped by comparing its time with the map's.
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    /// Polls of each id held right now: capped per id like parked polls per channel, so
    /// that one made-up id cannot take the held polls' whole share of the node.
    holding: HashMap<u64, usize>,
}

/// What to do with a poll of an id that is not live.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotLiveAnswer {
    /// First poll (or the memory lapsed): answer `max_retries` now.
    MaxRetries,
    /// Seen within the memory: hold, then answer `reconnect`.
    Hold,
}

impl NotLive {
    pub fn new(capacity: usize) -> NotLive {
        NotLive {
            seed: RandomState::new().hash_one(0u8),
            first_answer: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            holding: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.first_answer.len()
    }

    /// `id_text`'s hash under this memory's seed (SipHash of the seed, then the text).
    fn key(&self, id_text: &str) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.seed.hash(&mut hasher);
        id_text.hash(&mut hasher);
        hasher.finish()
    }

    /// What is remembered now, for the next process.
    pub fn export(&self, now: Instant) -> NotLiveState {
        let ids = self
            .order
            .iter()
            .filter(|(key, at)| self.first_answer.get(key) == Some(at))
            .map(|&(key, at)| (key, now.saturating_duration_since(at)))
            .filter(|(_, age)| *age < REMEMBER_FOR)
            .map(|(key, age)| (key, age.as_millis() as u64))
            .collect();
        NotLiveState {
            seed: self.seed,
            ids,
        }
    }

    /// Takes over a memory exported `elapsed` ago (by another process), when this one has
    /// remembered nothing yet: its seed, and its ids that are not older than 60 s by now.
    /// Returns how many were taken.
    pub fn import(&mut self, state: &NotLiveState, elapsed: Duration, now: Instant) -> usize {
        if !self.first_answer.is_empty() || state.ids.is_empty() {
            return 0;
        }
        self.seed = state.seed;
        for &(key, age_ms) in &state.ids {
            let age = Duration::from_millis(age_ms).saturating_add(elapsed);
            if age < REMEMBER_FOR {
                self.insert(key, now.checked_sub(age).unwrap_or(now));
            }
        }
        self.first_answer.len()
    }

    pub fn poll(&mut self, id_text: &str, now: Instant) -> NotLiveAnswer {
        let key = self.key(id_text);
        match self.first_answer.get(&key) {
            Some(&at) if now.saturating_duration_since(at) < REMEMBER_FOR => NotLiveAnswer::Hold,
            _ => {
                self.insert(key, now);
                NotLiveAnswer::MaxRetries
            }
        }
    }

    /// Takes one of `per_id` places to hold a poll of `id_text`; `None` when they are all
    /// taken. The key it returns gives the place back ([`NotLive::release`]).
    pub fn try_hold(&mut self, id_text: &str, per_id: usize) -> Option<u64> {
        let key = self.key(id_text);
        let held = self.holding.entry(key).or_insert(0);
        if *held >= per_id {
            return None;
        }
        *held += 1;
        Some(key)
    }

    /// Gives back a place taken by [`NotLive::try_hold`].
    pub fn release(&mut self, key: u64) {
        if let std::collections::hash_map::Entry::Occupied(mut held) = self.holding.entry(key) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
    }

    /// Records that `id_text` was just answered `max_retries` (retired, revoked, deleted).
    pub fn remember(&mut self, id_text: &str, now: Instant) {
        let key = self.key(id_text);
        self.insert(key, now);
    }

    fn insert(&mut self, key: u64, now: Instant) {
        self.first_answer.insert(key, now);
        self.order.push_back((key, now));
        while self.first_answer.len() > self.capacity {
            self.pop_oldest();
        }
        // Stale order entries are bounded too: never more than twice the live ones.
        while self.order.len() > 2 * self.capacity.max(1) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && self.first_answer.get(&key) == Some(&at)
        {
            self.first_answer.remove(&key);
        }
    }

    pub fn sweep(&mut self, now: Instant) {
        while let Some(&(_, at)) = self.order.front() {
            if now.saturating_duration_since(at) < REMEMBER_FOR {
                break;
            }
            self.pop_oldest();
        }
        super::shrink_if_sparse(&mut self.first_answer);
        super::shrink_if_sparse(&mut self.holding);
        if self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_poll_is_max_retries_then_held_for_60s_then_forgotten() {
        let mut nl = NotLive::new(8);
        let t0 = Instant::now();
        assert_eq!(nl.poll("x", t0), NotLiveAnswer::MaxRetries);
        assert_eq!(
            nl.poll("x", t0 + Duration::from_secs(59)),
            NotLiveAnswer::Hold
        );
        assert_eq!(
            nl.poll("x", t0 + Duration::from_secs(61)),
            NotLiveAnswer::MaxRetries
        );
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let mut nl = NotLive::new(3);
        let t0 = Instant::now();
        for id in ["a", "b", "c", "d"] {
            nl.poll(id, t0);
        }
        assert_eq!(nl.len(), 3);
        assert_eq!(
            nl.poll("a", t0),
            NotLiveAnswer::MaxRetries,
            "a was forgotten"
        );
        assert_eq!(nl.poll("d", t0), NotLiveAnswer::Hold);
        for i in 0..1000 {
            nl.poll("d", t0 + Duration::from_secs(61 * i));
        }
        assert!(nl.order.len() <= 6);
    }

    #[test]
    fn the_memory_moves_to_another_process_with_its_seed_and_ages() {
        let mut old = NotLive::new(8);
        let t0 = Instant::now();
        old.remember("gone-long-ago", t0);
        old.remember("gone", t0 + Duration::from_secs(40));
        let state = old.export(t0 + Duration::from_secs(50));
        assert_eq!(state.ids.len(), 2);
        let mut new = NotLive::new(8);
        assert_ne!(new.seed, old.seed);
        // Taken over 5 s later: 55 s and 15 s old.
        let now = t0 + Duration::from_secs(60);
        assert_eq!(new.import(&state, Duration::from_secs(5), now), 2);
        assert_eq!(new.poll("gone", now), NotLiveAnswer::Hold);
        assert_eq!(new.poll("gone-long-ago", now), NotLiveAnswer::Hold);
        assert_eq!(
            new.poll("gone-long-ago", now + Duration::from_secs(6)),
            NotLiveAnswer::MaxRetries,
            "its 60 s count from its first answer in the old process"
        );
        // Taken over too late for the oldest, and never into a memory already in use.
        let mut late = NotLive::new(8);
        assert_eq!(late.import(&state, Duration::from_secs(15), now), 1);
        let mut busy = NotLive::new(8);
        busy.remember("other", now);
        assert_eq!(busy.import(&state, Duration::ZERO, now), 0);
        assert_eq!(busy.poll("gone", now), NotLiveAnswer::MaxRetries);
    }

    #[test]
    fn sweep_forgets_after_60s() {
        let mut nl = NotLive::new(8);
        let t0 = Instant::now();
        nl.remember("x", t0);
        nl.sweep(t0 + Duration::from_secs(60));
        assert_eq!(nl.len(), 0);
    }

    #[test]
    fn sweep_gives_memory_back_after_a_burst() {
        let mut nl = NotLive::new(1 << 16);
        let t0 = Instant::now();
        for i in 0..50_000 {
            nl.remember(&i.to_string(), t0);
        }
        nl.sweep(t0 + Duration::from_secs(60));
        assert!(
            nl.first_answer.capacity() < 1000,
            "{}",
            nl.first_answer.capacity()
        );
        assert!(nl.order.capacity() < 1000, "{}", nl.order.capacity());
    }
}
