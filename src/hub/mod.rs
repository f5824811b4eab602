//! The hub: channels, topics, parked polls, expiry. It knows nothing of HTTP: a transport
//! asks [`Hub::poll`] and gets either an answer at once or a [`ParkedPoll`] to await, so the
//! hyper path and a buffer-less fast path park on the same thing.
//!
//! # Locks
//! Channels live in shards (`Mutex<HashMap>` indexed by the id's random bits); topics in a
//! separate sharded index (`topics.rs`). At most one shard lock is held at a time, never
//! across an `.await`, and never while answering a poll: waiters are taken out under the
//! lock and answered after it is released.
//!
//! # No lost wake-up
//! A parked poll is a [`Waiter`] in its channel's list. Whoever removes a waiter from the
//! list answers it: a publish (`new_change`), its own deadline (`reconnect`), a revoke or a
//! delete (`max_retries`), the drain (`reconnect`). A publish that finds no waiter sets the
//! channel's pending mark under the same lock a poll checks it under. If a `new_change` is
//! sent to a poll whose client has gone, either the sender sees the failure or the poll's
//! guard finds the undelivered answer; whichever it is puts the pending mark back.

mod channel;
mod not_live;
mod topics;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, Sleep, sleep_until};

pub use channel::Limits;
use channel::{Channel, Pending, Waiter};
use not_live::{NotLive, NotLiveAnswer};
use topics::Topics;

use crate::id::{ChannelId, IdHasher};
use crate::metrics::{Metrics, outcome};

const CHANNEL_SHARDS: usize = 64;
const TOPIC_SHARDS: usize = 64;
/// Bound on remembered not-live ids (SPEC §3).
pub const NOT_LIVE_CAPACITY: usize = 65_536;
/// Bound on topics remembered only for their latest position.
pub const POSITION_CAPACITY: usize = 1 << 20;
pub const MAX_TOPICS_PER_CHANNEL: usize = 64;
pub const MAX_TOPIC_LEN: usize = 256;

/// The answers a poll can get (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    NewChange,
    Reconnect,
    MaxRetries,
    NoChange,
}

impl Answer {
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::NewChange => "new_change",
            Answer::Reconnect => "reconnect",
            Answer::MaxRetries => "max_retries",
            Answer::NoChange => "no_change",
        }
    }
}

/// What a parked poll receives: its answer and, for a `new_change`, the clock of the publish
/// that woke it.
pub(crate) struct Delivery {
    answer: Answer,
    fanout: Option<Arc<FanoutClock>>,
}

impl From<Answer> for Delivery {
    fn from(answer: Answer) -> Delivery {
        Delivery {
            answer,
            fanout: None,
        }
    }
}

/// Times one publish's fan-out for `nudge_fanout_seconds` (SPEC §6: "from a publish's arrival
/// to its last answered poll"). Every poll the publish wakes holds a clone; the last clone
/// to go observes the histogram. A poll lets go of it when its task has the answer in hand
/// and returns it to be written, so the time includes the wake-ups and the scheduling of
/// every woken poll, not only the loop that sends to them (which is far shorter).
struct FanoutClock {
    arrived: Instant,
    histogram: Histogram,
    /// Set when a poll took its answer: a publish whose woken clients had all gone
    /// answered nobody, and observes nothing.
    answered: AtomicBool,
}

impl Drop for FanoutClock {
    fn drop(&mut self) {
        if self.answered.load(Ordering::Relaxed) {
            self.histogram.observe(self.arrived.elapsed().as_secs_f64());
        }
    }
}

/// The node-wide settings the hub enforces.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Channel defaults, and the maxima a registration may ask for.
    pub limits: Limits,
    pub max_polls_per_channel: usize,
    pub max_parked: usize,
}

/// Node-wide caps on what registrations may hold (issue 11.4): a main API that registers in
/// a loop gets `503 too_many_channels` instead of taking the node's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Live channels on the node.
    pub max_channels: usize,
    /// Bytes of the distinct topic names bound by live channels (a name shared by many
    /// channels counts once). Names remembered only for a position get half of it again.
    pub max_topic_bytes: usize,
}

impl Caps {
    /// Derived from the memory the node may use (the smaller of RAM and the cgroup's limit):
    /// a channel takes about 0.5 KiB and a topic name about 2.5 times its length once indexed
    /// (both measured; a remembered position's name about twice), so at these caps channels
    /// take at most ~1/8 of memory, bound names ~1/6 and remembered positions ~1/16. Raised
    /// to a floor that any machine holds.
    pub fn for_memory(bytes: u64) -> Caps {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        Caps {
            max_channels: (bytes / 4 / 1024).max(10_000),
            max_topic_bytes: (bytes / 16).max(16 << 20),
        }
    }

    /// [`Caps::for_memory`] of this node's memory; 1 GiB when it cannot be read.
    pub fn for_this_node() -> Caps {
        Caps::for_memory(node_memory().unwrap_or(1 << 30))
    }

    /// Bytes of topic names remembered only for their latest position.
    pub fn position_bytes(&self) -> usize {
        self.max_topic_bytes / 2
    }
}

/// The memory this process may use: RAM, or less if a cgroup (v2 or v1) limits it.
fn node_memory() -> Option<u64> {
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    .min();
    match (ram, cgroup) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// What a poll asks besides its channel.
#[derive(Clone, Copy, Debug, Default)]
pub struct PollRequest {
    pub stream_position: Option<u64>,
    pub dont_block: bool,
}

/// How a poll starts.
pub enum PollStart {
    /// Answer at once.
    Answer(Answer),
    /// A channel that is not live, seen again: hold the poll, then answer `reconnect`.
    Hold(HeldPoll),
    /// Parked: await [`ParkedPoll::wait`].
    Park(ParkedPoll),
    /// Over the per-channel parked limit (`429 too_many_polls`).
    TooManyPolls,
    /// Over the node's parked limit (`503 over_capacity`).
    OverCapacity,
}

/// A channel registration, already decoded (validation happens in [`Hub::register`]).
#[derive(Clone, Debug, Default)]
pub struct Registration {
    pub topics: Vec<String>,
    pub subject: Option<String>,
    pub stream_type: Option<String>,
    pub ttl: Option<Duration>,
    pub retry_timeout: Option<Duration>,
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Registered {
    pub id: ChannelId,
    pub limits: Limits,
    /// `None` for `all`.
    pub stream_type: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("topics must hold 1 to {MAX_TOPICS_PER_CHANNEL} topics")]
    TopicCount,
    #[error("a topic is 1 to {MAX_TOPIC_LEN} bytes of visible ASCII (0x21-0x7E)")]
    BadTopic,
    #[error("subject must be 1 to 256 bytes")]
    BadSubject,
    #[error("stream_type must be 1 to 64 bytes of visible ASCII")]
    BadStreamType,
    #[error("{0} must be at least 1 second")]
    TooShort(&'static str),
    /// Past `--max-channels` or `--max-topic-bytes`: retry after `retry_after`.
    #[error("this node holds as many {what} as it may ({limit}); retry later or elsewhere")]
    TooManyChannels {
        what: &'static str,
        limit: usize,
        retry_after: Duration,
    },
}

/// One publish (SPEC §4): wakes the channels on `topic` that want its `stream_type`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_type: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PublishReport {
    pub published: usize,
    pub woken: usize,
}

/// Which channels a revocation removes: those matching every filter given.
#[derive(Clone, Debug, Default)]
pub struct RevokeFilter {
    pub subject: Option<String>,
    pub topic: Option<String>,
}

/// What `GET /v1/channels/{id}` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelInfo {
    pub channel: String,
    pub topics: Vec<String>,
    pub subject: Option<String>,
    pub stream_type: String,
    pub ttl_seconds: u64,
    pub retry_timeout_seconds: u64,
    pub max_retries: u32,
    pub retries_used: u32,
    pub parked_polls: usize,
    pub pending: bool,
    /// Seconds until the channel expires; `null` while a poll keeps it alive.
    pub expires_in_seconds: Option<f64>,
}

/// Counts for tests and operators (the same figures as the gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounts {
    pub channels: usize,
    pub parked: usize,
    pub held: usize,
    pub topics: usize,
    pub not_live: usize,
}

type ChannelShard = HashMap<ChannelId, Channel, IdHasher>;

pub struct Hub {
    config: HubConfig,
    caps: Caps,
    /// Live channels, reserved before a channel is inserted so the cap is never passed.
    live: AtomicUsize,
    /// The earliest expiry of an idle channel the last sweep saw: the `Retry-After` of a
    /// refused registration.
    next_expiry: Mutex<Option<Instant>>,
    channels: Box<[Mutex<ChannelShard>]>,
    topics: Topics,
    not_live: Mutex<NotLive>,
    metrics: Arc<Metrics>,
    next_key: AtomicU64,
    /// Polls of not-live ids being held (they count toward `max_parked`).
    held: AtomicI64,
    draining: AtomicBool,
    drain_started: Notify,
}

impl Hub {
    /// A hub with the caps derived from this node's memory ([`Caps::for_this_node`]).
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Arc<Hub> {
        Hub::with_caps(config, Caps::for_this_node(), metrics)
    }

    pub fn with_caps(config: HubConfig, caps: Caps, metrics: Arc<Metrics>) -> Arc<Hub> {
        // The defaults are derived from the machine: say what they came to.
        tracing::info!(
            max_channels = caps.max_channels,
            max_topic_bytes = caps.max_topic_bytes,
            "channel caps"
        );
        Arc::new(Hub {
            topics: Topics::new(
                TOPIC_SHARDS,
                config.limits.ttl,
                POSITION_CAPACITY,
                caps.position_bytes(),
                metrics.positions_refused_total.clone(),
            ),
            config,
            caps,
            live: AtomicUsize::new(0),
            next_expiry: Mutex::new(None),
            channels: (0..CHANNEL_SHARDS).map(|_| Mutex::default()).collect(),
            not_live: Mutex::new(NotLive::new(NOT_LIVE_CAPACITY)),
            metrics,
            next_key: AtomicU64::new(0),
            held: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            drain_started: Notify::new(),
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn shard(&self, id: ChannelId) -> &Mutex<ChannelShard> {
        &self.channels[id.shard(CHANNEL_SHARDS - 1)]
    }

    pub fn counts(&self) -> HubCounts {
        HubCounts {
            channels: self.metrics.channels.get() as usize,
            parked: self.metrics.parked_polls.get() as usize,
            held: self.held.load(Ordering::Relaxed) as usize,
            topics: self.topics.len(),
            not_live: self.not_live.lock().len(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    // ---- registration -------------------------------------------------------------------

    /// Registers a channel. Limits above the node's are clamped to the node's.
    pub fn register(&self, reg: Registration) -> Result<Registered, RegisterError> {
        let mut topics = reg.topics;
        topics.sort();
        topics.dedup();
        if topics.is_empty() || topics.len() > MAX_TOPICS_PER_CHANNEL {
            return Err(RegisterError::TopicCount);
        }
        if !topics.iter().all(|t| is_visible_ascii(t, MAX_TOPIC_LEN)) {
            return Err(RegisterError::BadTopic);
        }
        if reg
            .subject
            .as_ref()
            .is_some_and(|s| s.is_empty() || s.len() > 256)
        {
            return Err(RegisterError::BadSubject);
        }
        let stream_type = match reg.stream_type {
            None => None,
            Some(t) if t == "all" => None,
            Some(t) if is_visible_ascii(&t, 64) => Some(t),
            Some(_) => return Err(RegisterError::BadStreamType),
        };
        let node = self.config.limits;
        let clamp = |asked: Option<Duration>, max: Duration, name| match asked {
            Some(d) if d < Duration::from_secs(1) => Err(RegisterError::TooShort(name)),
            Some(d) => Ok(d.min(max)),
            None => Ok(max),
        };
        let limits = Limits {
            ttl: clamp(reg.ttl, node.ttl, "ttl")?,
            retry_timeout: clamp(reg.retry_timeout, node.retry_timeout, "retry_timeout")?,
            max_retries: reg
                .max_retries
                .map_or(node.max_retries, |m| m.min(node.max_retries)),
        };

        // Reserve the channel's place first: concurrent registrations never pass the cap.
        if self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.caps.max_channels).then_some(n + 1)
            })
            .is_err()
        {
            return Err(self.refuse("channels", self.caps.max_channels));
        }
        let id = ChannelId::random();
        let mut added = 0;
        let names: Arc<[Arc<str>]> = topics
            .iter()
            .map(|t| {
                let (name, new_bytes) = self.topics.attach(t, id);
                added += new_bytes;
                name
            })
            .collect();
        // Names already bound by other channels cost nothing more: only a registration that
        // brings new bytes past the cap is refused, and undone.
        if added > 0 && self.topics.bound_bytes() > self.caps.max_topic_bytes {
            let now = Instant::now();
            for t in names.iter() {
                self.topics.detach(t, id, now);
            }
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse("topic bytes", self.caps.max_topic_bytes));
        }
        let channel = Channel {
            topics: names,
            subject: reg.subject.map(Arc::from),
            stream_type: stream_type.as_deref().map(Box::from),
            limits,
            reconnects: 0,
            pending: Pending::default(),
            waiters: Vec::new(),
            idle_deadline: Some(Instant::now() + limits.ttl),
        };
        self.shard(id).lock().insert(id, channel);
        self.metrics.channels.inc();
        self.set_topic_gauges();
        Ok(Registered {
            id,
            limits,
            stream_type,
        })
    }

    /// Counts a refused registration and says when to retry: when the earliest idle channel
    /// expires (as the last sweep saw it, plus the sweep's second), between 1 s and 60 s.
    fn refuse(&self, what: &'static str, limit: usize) -> RegisterError {
        self.metrics.registrations_refused_total.inc();
        let now = Instant::now();
        let retry_after = match *self.next_expiry.lock() {
            Some(at) => at.saturating_duration_since(now) + Duration::from_secs(1),
            None => Duration::from_secs(5),
        };
        RegisterError::TooManyChannels {
            what,
            limit,
            retry_after: retry_after.clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    fn set_topic_gauges(&self) {
        self.metrics.topics.set(self.topics.len() as i64);
        self.metrics
            .topic_bytes
            .set(self.topics.bound_bytes() as i64);
    }

    pub fn channel_info(&self, id_text: &str) -> Option<ChannelInfo> {
        let id = ChannelId::parse(id_text)?;
        let shard = self.shard(id).lock();
        let ch = shard.get(&id)?;
        let now = Instant::now();
        Some(ChannelInfo {
            channel: id.to_string(),
            topics: ch.topics.iter().map(|t| t.to_string()).collect(),
            subject: ch.subject.as_deref().map(str::to_owned),
            stream_type: ch.stream_type.as_deref().unwrap_or("all").to_owned(),
            ttl_seconds: ch.limits.ttl.as_secs(),
            retry_timeout_seconds: ch.limits.retry_timeout.as_secs(),
            max_retries: ch.limits.max_retries,
            retries_used: ch.reconnects,
            parked_polls: ch.waiters.len(),
            pending: ch.pending.is_set(),
            expires_in_seconds: ch
                .idle_deadline
                .map(|d| d.saturating_duration_since(now).as_secs_f64()),
        })
    }

    // ---- polls --------------------------------------------------------------------------

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
        let occupied = self.metrics.parked_polls.get() + self.held.load(Ordering::Relaxed);
        if occupied >= self.config.max_parked as i64 {
            self.metrics.count_outcome(outcome::OVER_CAPACITY);
            return PollStart::OverCapacity;
        }
        let (tx, rx) = oneshot::channel();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        ch.waiters.push(Waiter { key, tx });
        ch.idle_deadline = None;
        let deadline = Instant::now() + park_time(ch.limits.retry_timeout);
        self.metrics.parked_polls.inc();
        PollStart::Park(ParkedPoll {
            hub: self.clone(),
            id,
            key,
            deadline,
            rx,
            expired: false,
            settled: false,
        })
    }

    fn answer_now(&self, answer: Answer) -> PollStart {
        self.metrics.count_answer(answer);
        PollStart::Answer(answer)
    }

    fn poll_not_live(self: &Arc<Self>, id_text: &str) -> PollStart {
        let verdict = self.not_live.lock().poll(id_text, Instant::now());
        match verdict {
            NotLiveAnswer::MaxRetries => self.answer_now(Answer::MaxRetries),
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
                let occupied = self.metrics.parked_polls.get() + self.held.load(Ordering::Relaxed);
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

    /// A parked poll reached its deadline: if its waiter is still listed, take it and answer
    /// `reconnect` (counted against the budget). `None` if someone else took it: their
    /// answer is on its way.
    fn expire_poll(&self, id: ChannelId, key: u64) -> Option<Answer> {
        let mut shard = self.shard(id).lock();
        let ch = shard.get_mut(&id)?;
        ch.take_waiter(key)?;
        ch.reconnects = ch.reconnects.saturating_add(1);
        ch.touch_if_idle(Instant::now());
        self.metrics.parked_polls.dec();
        Some(Answer::Reconnect)
    }

    /// A parked poll was dropped unanswered (its client went away).
    fn abandon_poll(&self, id: ChannelId, key: u64, rx: &mut oneshot::Receiver<Delivery>) {
        let mut shard = self.shard(id).lock();
        if let Some(ch) = shard.get_mut(&id)
            && ch.take_waiter(key).is_some()
        {
            ch.touch_if_idle(Instant::now());
            self.metrics.parked_polls.dec();
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

    // ---- publishes ----------------------------------------------------------------------

    /// Applies publishes: wakes the parked polls of every channel they concern, and marks
    /// the others pending. `source` labels `nudge_publishes_total`.
    pub fn publish(&self, batch: &[Publish], source: &str) -> PublishReport {
        let arrived = Instant::now();
        let mut ids = Vec::new();
        // (channel, the publish's position, the waiter's sender, the publish's clock)
        type Wake = (
            ChannelId,
            Option<u64>,
            oneshot::Sender<Delivery>,
            Arc<FanoutClock>,
        );
        let mut wake: Vec<Wake> = Vec::new();
        for p in batch {
            ids.clear();
            // One clock per publish, made when it first wakes a poll.
            let mut clock: Option<Arc<FanoutClock>> = None;
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
                        Arc::new(FanoutClock {
                            arrived,
                            histogram: self.metrics.fanout_seconds.clone(),
                            answered: AtomicBool::new(false),
                        })
                    });
                    wake.extend(
                        ch.waiters
                            .drain(..)
                            .map(|w| (id, p.position, w.tx, clock.clone())),
                    );
                    ch.touch_if_idle(arrived);
                    self.metrics.parked_polls.sub(n);
                }
            }
        }
        self.set_topic_gauges();
        // No lock held from here on.
        let mut woken = 0;
        for (id, position, tx, clock) in wake {
            let delivery = Delivery {
                answer: Answer::NewChange,
                fanout: Some(clock),
            };
            if tx.send(delivery).is_ok() {
                woken += 1;
            } else if let Some(ch) = self.shard(id).lock().get_mut(&id) {
                // The client left between parking and now: keep the change for its next poll.
                ch.pending.mark(position);
            }
        }
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

    /// Marks every live channel pending and answers its parked polls `new_change`, spread
    /// over `spread`: after a gap in the bus nobody can know what was missed.
    pub async fn mark_all_pending(&self, spread: Duration) -> usize {
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
                    self.metrics.parked_polls.sub(n);
                }
            }
        }
        let gone = answer_spread(wake, Answer::NewChange, spread).await;
        // Polls whose clients left while waiting for their turn: keep the change for the
        // next poll, as a publish does.
        for id in gone {
            if let Some(ch) = self.shard(id).lock().get_mut(&id) {
                ch.pending.mark(None);
            }
        }
        channels
    }

    // ---- removal ------------------------------------------------------------------------

    /// Deletes one channel; its parked polls are answered `max_retries`.
    pub fn delete(&self, id_text: &str) -> bool {
        let Some(id) = ChannelId::parse(id_text) else {
            return false;
        };
        let removed = self.shard(id).lock().remove(&id);
        match removed {
            Some(ch) => {
                self.retire(id, ch);
                true
            }
            None => false,
        }
    }

    /// Removes every channel matching the filter (all given fields must match); their parked
    /// polls are answered `max_retries`. Returns how many were removed.
    pub fn revoke(&self, filter: &RevokeFilter) -> usize {
        let subject_matches = |ch: &Channel| {
            filter
                .subject
                .as_deref()
                .is_none_or(|s| ch.subject.as_deref() == Some(s))
        };
        let mut removed = Vec::new();
        match &filter.topic {
            Some(topic) => {
                for id in self.topics.channels_of(topic) {
                    let mut shard = self.shard(id).lock();
                    if shard.get(&id).is_some_and(subject_matches) {
                        removed.push((id, shard.remove(&id).expect("present")));
                    }
                }
            }
            None if filter.subject.is_some() => {
                for shard in self.channels.iter() {
                    let mut shard = shard.lock();
                    removed.extend(shard.extract_if(|_, ch| subject_matches(ch)));
                }
            }
            None => {}
        }
        let n = removed.len();
        for (id, ch) in removed {
            self.retire(id, ch);
        }
        n
    }

    /// Finishes a removed channel: answers its polls `max_retries` and frees its topics.
    fn retire(&self, id: ChannelId, mut ch: Channel) {
        if !ch.waiters.is_empty() {
            self.metrics.parked_polls.sub(ch.waiters.len() as i64);
            self.not_live
                .lock()
                .remember(&id.to_string(), Instant::now());
            for w in ch.waiters.drain(..) {
                let _ = w.tx.send(Answer::MaxRetries.into());
            }
        }
        self.forget(id, &ch);
    }

    /// Detaches a removed channel from its topics and the gauges.
    fn forget(&self, id: ChannelId, ch: &Channel) {
        let now = Instant::now();
        for t in ch.topics.iter() {
            self.topics.detach(t, id, now);
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.metrics.channels.dec();
        self.set_topic_gauges();
    }

    // ---- housekeeping -------------------------------------------------------------------

    /// Removes expired channels, old positions and old not-live ids. Returns the number of
    /// channels expired.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        let mut next_expiry: Option<Instant> = None;
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            expired.extend(shard.extract_if(|_, ch| match ch.idle_deadline {
                Some(d) if d <= now => true,
                Some(d) => {
                    next_expiry = Some(next_expiry.map_or(d, |e| e.min(d)));
                    false
                }
                None => false,
            }));
            shrink_if_sparse(&mut shard);
        }
        *self.next_expiry.lock() = next_expiry;
        let n = expired.len();
        for (id, ch) in expired {
            self.forget(id, &ch);
        }
        self.topics.sweep(now);
        self.set_topic_gauges();
        self.not_live.lock().sweep(now);
        n
    }

    /// Runs [`Hub::sweep`] every `every` until the future is dropped.
    pub async fn sweeper(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }

    /// Turns the node to draining: `/readyz` answers 503 and new polls get `reconnect`.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain_started.notify_waiters();
    }

    /// Starts the drain: from now on polls are answered `reconnect` at once, and every poll
    /// parked now is answered `reconnect`, spread evenly over `period`.
    pub async fn drain(&self, period: Duration) -> usize {
        self.begin_drain();
        let now = Instant::now();
        let mut answers = Vec::new();
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            for (id, ch) in shard.iter_mut() {
                if !ch.waiters.is_empty() {
                    self.metrics.parked_polls.sub(ch.waiters.len() as i64);
                    answers.extend(ch.waiters.drain(..).map(|w| (*id, w.tx)));
                    ch.touch_if_idle(now);
                }
            }
        }
        let n = answers.len();
        answer_spread(answers, Answer::Reconnect, period).await;
        n
    }
}

/// Answers `senders` with `answer`, the i-th at `i / n` of `spread` from now. Returns the
/// channels of the polls whose clients had gone by their turn (the answer reached nobody).
async fn answer_spread(
    senders: Vec<(ChannelId, oneshot::Sender<Delivery>)>,
    answer: Answer,
    spread: Duration,
) -> Vec<ChannelId> {
    let n = senders.len();
    let start = Instant::now();
    let mut gone = Vec::new();
    for (i, (id, tx)) in senders.into_iter().enumerate() {
        let at = start + spread.mul_f64(i as f64 / n as f64);
        // Timers have millisecond resolution: don't sleep for less.
        if at > Instant::now() + Duration::from_millis(2) {
            sleep_until(at).await;
        }
        if tx.send(answer.into()).is_err() {
            gone.push(id);
        }
    }
    gone
}

/// Gives memory back after a burst: a HashMap keeps its largest capacity once emptied, so
/// the sweep halves the slack of a map that is less than a quarter full.
pub(crate) fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// [`shrink_if_sparse`] for a set (a topic's channels).
pub(crate) fn shrink_set_if_sparse<K: Eq + std::hash::Hash, S: std::hash::BuildHasher>(
    set: &mut std::collections::HashSet<K, S>,
) {
    if set.len() < set.capacity() / 4 {
        set.shrink_to(set.len() * 2);
    }
}

/// How many held polls of not-live ids the node takes at once: 1/8 of `max_parked` (at
/// least 1), so that made-up ids cannot crowd out polls of real channels.
pub fn held_share(max_parked: usize) -> usize {
    (max_parked / 8).max(1)
}

/// The time a poll stays parked (SPEC §3): `retry_timeout` minus a grace of
/// `min(10 s, retry_timeout / 10)`, minus a random jitter of up to 10 % of that.
pub fn park_time(retry_timeout: Duration) -> Duration {
    let grace = (retry_timeout / 10).min(Duration::from_secs(10));
    let base = retry_timeout - grace;
    base - base.mul_f64(fastrand::f64() * 0.1)
}

fn is_visible_ascii(s: &str, max_len: usize) -> bool {
    !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A parked poll. Await [`ParkedPoll::wait`]; dropping it (the client went away) removes it
/// from its channel, and keeps any `new_change` that raced with the drop pending.
pub struct ParkedPoll {
    hub: Arc<Hub>,
    id: ChannelId,
    key: u64,
    deadline: Instant,
    rx: oneshot::Receiver<Delivery>,
    /// Its deadline passed but someone else had taken its waiter: their answer is coming.
    expired: bool,
    settled: bool,
}

impl ParkedPoll {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waits for the answer: a publish, a revoke, the drain, or the park time running out.
    pub async fn wait(mut self) -> Answer {
        let mut park_time = std::pin::pin!(sleep_until(self.deadline));
        std::future::poll_fn(|cx| self.poll_answer(park_time.as_mut(), cx)).await
    }

    /// The poll-based core of [`ParkedPoll::wait`], for a transport that drives its own
    /// future and would rather not hold a nested one per parked poll (the fast path).
    /// `park_time` must be a `Sleep` until [`ParkedPoll::deadline`], polled only here.
    pub fn poll_answer(
        &mut self,
        park_time: Pin<&mut Sleep>,
        cx: &mut Context<'_>,
    ) -> Poll<Answer> {
        let gone = || Delivery::from(Answer::Reconnect);
        if let Poll::Ready(sent) = Pin::new(&mut self.rx).poll(cx) {
            return Poll::Ready(self.settle(sent.unwrap_or_else(|_| gone())));
        }
        if !self.expired && park_time.poll(cx).is_ready() {
            match self.hub.expire_poll(self.id, self.key) {
                Some(answer) => return Poll::Ready(self.settle(answer.into())),
                // Taken by someone else between the deadline and the lock: their answer is
                // being sent right now (no lock is held while sending). `rx` was polled
                // above, so this task is woken when it arrives.
                None => self.expired = true,
            }
        }
        Poll::Pending
    }

    /// The answer this poll got could not be written: its client is known to be gone. A
    /// `new_change` goes back to the channel as its pending mark, for the client's next poll.
    pub fn undelivered(&self, answer: Answer) {
        if answer != Answer::NewChange {
            return;
        }
        if let Some(ch) = self.hub.shard(self.id).lock().get_mut(&self.id) {
            ch.pending.mark(None);
        }
    }

    fn settle(&mut self, delivery: Delivery) -> Answer {
        self.settled = true;
        self.hub.metrics.count_answer(delivery.answer);
        if let Some(clock) = &delivery.fanout {
            clock.answered.store(true, Ordering::Relaxed);
        }
        // Dropping `delivery` here releases this poll's hold on the publish's fan-out clock.
        delivery.answer
    }
}

impl Drop for ParkedPoll {
    fn drop(&mut self) {
        if !self.settled {
            self.hub.abandon_poll(self.id, self.key, &mut self.rx);
        }
    }
}

/// A poll of a channel that is not live, held 1–3 s before `reconnect` (SPEC §3).
pub struct HeldPoll {
    hub: Arc<Hub>,
    until: Instant,
    /// Its place among the id's held polls.
    key: u64,
}

impl HeldPoll {
    pub async fn wait(self) -> Answer {
        let drain = self.hub.drain_started.notified();
        tokio::pin!(drain);
        drain.as_mut().enable();
        if !self.hub.is_draining() {
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
