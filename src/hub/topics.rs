//! The topic index: which channels listen on a topic, and the topic's latest published
//! position. Sharded by topic name; a shard lock is never held together with a channel
//! shard lock (callers copy what they need out and release it).
//!
//! A topic entry lives while a channel is bound to it, and a published position is
//! remembered for at least `remember_for` (the node's ttl) after the publish, channels or
//! not, so that a channel registered just after a publish still sees it. Entries kept only
//! for a position are bounded by `position_capacity` and their names by `position_bytes`;
//! past either, new positions of topics nobody listens to are not remembered (counted in
//! `positions_refused`). Bytes of names bound by channels are counted for `--max-topic-bytes`.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::id::{ChannelId, IdHasher};

#[derive(Default)]
struct Topic {
    channels: HashSet<ChannelId, IdHasher>,
    position: Option<u64>,
    last_publish: Option<Instant>,
}

type TopicShard = HashMap<Arc<str>, Topic>;

pub(crate) struct Topics {
    shards: Box<[Mutex<TopicShard>]>,
    hasher: RandomState,
    remember_for: Duration,
    position_capacity: usize,
    position_bytes_cap: usize,
    count: AtomicUsize,
    /// Entries that exist only to remember a position, and the bytes of their names.
    position_only: AtomicUsize,
    position_bytes: AtomicUsize,
    /// Bytes of the names of entries bound by at least one channel.
    bound_bytes: AtomicUsize,
    positions_refused: IntCounter,
}

impl Topics {
    pub fn new(
        shards: usize,
        remember_for: Duration,
        position_capacity: usize,
        position_bytes_cap: usize,
        positions_refused: IntCounter,
    ) -> Topics {
        Topics {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            remember_for,
            position_capacity,
            position_bytes_cap,
            count: AtomicUsize::new(0),
            position_only: AtomicUsize::new(0),
            position_bytes: AtomicUsize::new(0),
            bound_bytes: AtomicUsize::new(0),
            positions_refused,
        }
    }

    /// Bytes of the distinct topic names bound by channels.
    pub fn bound_bytes(&self) -> usize {
        self.bound_bytes.load(Ordering::Relaxed)
    }

    fn add_position_only(&self, name_len: usize) {
        self.position_only.fetch_add(1, Ordering::Relaxed);
        self.position_bytes.fetch_add(name_len, Ordering::Relaxed);
    }

    fn sub_position_only(&self, entries: usize, bytes: usize) {
        self.position_only.fetch_sub(entries, Ordering::Relaxed);
        self.position_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn shard(&self, topic: &str) -> &Mutex<TopicShard> {
        let index = self.hasher.hash_one(topic) as usize & (self.shards.len() - 1);
        &self.shards[index]
    }

    /// Number of topic entries (bound to channels or remembering a position).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Binds a channel to a topic; returns the shared name to keep in the channel, and the
    /// bytes it added to [`Topics::bound_bytes`] (0 if another channel already bound it).
    pub fn attach(&self, topic: &str, id: ChannelId) -> (Arc<str>, usize) {
        let mut shard = self.shard(topic).lock();
        let mut added = 0;
        if let Some(name) = shard.get_key_value(topic).map(|(name, _)| name.clone()) {
            let entry = shard.get_mut(topic).expect("found above");
            if entry.channels.is_empty() {
                self.sub_position_only(1, topic.len());
                added = topic.len();
                self.bound_bytes.fetch_add(added, Ordering::Relaxed);
            }
            entry.channels.insert(id);
            return (name, added);
        }
        let name: Arc<str> = Arc::from(topic);
        let mut entry = Topic::default();
        entry.channels.insert(id);
        shard.insert(name.clone(), entry);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bound_bytes.fetch_add(topic.len(), Ordering::Relaxed);
        (name, topic.len())
    }

    /// Unbinds a channel; the entry goes when nothing keeps it.
    pub fn detach(&self, topic: &str, id: ChannelId, now: Instant) {
        let mut shard = self.shard(topic).lock();
        let Some(entry) = shard.get_mut(topic) else {
            return;
        };
        entry.channels.remove(&id);
        // A topic many channels left keeps its largest table otherwise.
        super::shrink_set_if_sparse(&mut entry.channels);
        if entry.channels.is_empty() {
            self.bound_bytes.fetch_sub(topic.len(), Ordering::Relaxed);
            if self.keeps_position(entry, now) {
                self.add_position_only(topic.len());
            } else {
                shard.remove(topic);
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn keeps_position(&self, entry: &Topic, now: Instant) -> bool {
        entry.position.is_some()
            && entry
                .last_publish
                .is_some_and(|at| now.saturating_duration_since(at) < self.remember_for)
    }

    /// Records a publish and appends the channels it concerns to `out`.
    pub fn publish(
        &self,
        topic: &str,
        position: Option<u64>,
        now: Instant,
        out: &mut Vec<ChannelId>,
    ) {
        let mut shard = self.shard(topic).lock();
        if let Some(entry) = shard.get_mut(topic) {
            if let Some(p) = position {
                entry.position = Some(entry.position.map_or(p, |old| old.max(p)));
                entry.last_publish = Some(now);
            }
            out.extend(entry.channels.iter().copied());
            return;
        }
        // Nobody listens: only a position is worth remembering.
        let Some(p) = position else { return };
        if self.position_only.load(Ordering::Relaxed) >= self.position_capacity
            || self.position_bytes.load(Ordering::Relaxed) + topic.len() > self.position_bytes_cap
        {
            self.positions_refused.inc();
            return;
        }
        let entry = Topic {
            channels: HashSet::default(),
            position: Some(p),
            last_publish: Some(now),
        };
        shard.insert(Arc::from(topic), entry);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.add_position_only(topic.len());
    }

    /// The newest position published on any of `topics`.
    pub fn newest_position(&self, topics: &[Arc<str>]) -> Option<u64> {
        topics
            .iter()
            .filter_map(|t| self.shard(t).lock().get(&**t).and_then(|e| e.position))
            .max()
    }

    /// Every topic's newest position that is still worth knowing (bound to a channel, or
    /// remembered), for a snapshot.
    pub fn positions(&self, now: Instant) -> Vec<(Arc<str>, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, e) in shard.lock().iter() {
                if let Some(p) = e.position
                    && (!e.channels.is_empty() || self.keeps_position(e, now))
                {
                    out.push((name.clone(), p));
                }
            }
        }
        out
    }

    /// Channels bound to `topic`.
    pub fn channels_of(&self, topic: &str) -> Vec<ChannelId> {
        self.shard(topic)
            .lock()
            .get(topic)
            .map(|e| e.channels.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets positions older than `remember_for` on topics nobody listens to.
    pub fn sweep(&self, now: Instant) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let (mut removed, mut bytes) = (0, 0);
            shard.retain(|name, e| {
                let keep = !e.channels.is_empty() || self.keeps_position(e, now);
                if !keep {
                    removed += 1;
                    bytes += name.len();
                }
                keep
            });
            super::shrink_if_sparse(&mut shard);
            if removed > 0 {
                self.count.fetch_sub(removed, Ordering::Relaxed);
                self.sub_position_only(removed, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        let refused = IntCounter::new("refused", "positions refused").unwrap();
        Topics::new(4, Duration::from_secs(60), 1 << 20, 1000, refused)
    }

    #[test]
    fn a_topic_many_channels_left_gives_its_table_back() {
        let t = topics();
        let ids: Vec<ChannelId> = (0..10_000).map(|_| ChannelId::random()).collect();
        for &id in &ids {
            t.attach("popular", id);
        }
        let now = Instant::now();
        for &id in &ids[1..] {
            t.detach("popular", id, now);
        }
        let shard = t.shard("popular").lock();
        assert!(shard["popular"].channels.capacity() < 16);
        assert_eq!(t.bound_bytes(), "popular".len(), "a name counts once");
    }

    #[test]
    fn positions_are_refused_past_the_byte_budget_and_their_bytes_come_back() {
        let t = topics();
        let now = Instant::now();
        let mut out = Vec::new();
        for name in ["a".repeat(400), "b".repeat(400), "c".repeat(400)] {
            t.publish(&name, Some(1), now, &mut out);
        }
        assert_eq!((t.len(), t.positions_refused.get()), (2, 1));
        t.sweep(now + Duration::from_secs(61));
        assert_eq!(t.len(), 0);
        t.publish(&"c".repeat(400), Some(1), now, &mut out);
        assert_eq!(t.len(), 1, "the swept names' bytes were given back");
    }
}
