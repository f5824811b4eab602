//! The hub: channels, topics, parked polls, expiry. It knows nothing of HTTP: a transport
//! asks [`Hub::poll`] and gets either an answer at once or a [`ParkedPoll`] to await, so the
//! hyper path and a buffer-less fast path park on the same thing.
//!
//! Here: the types, building the hub, its counts and the drain. Beside it: `poll.rs`
//! (starting polls, and the parked and held polls transports await), `publish.rs` (waking
//! channels), `registry.rs` (registering, reading, removing, the sweep), and the state they
//! share: `channel.rs`, `topics.rs`, `not_live.rs`.
//!
//! # Locks
//! Channels live in shards (`Mutex<HashMap>` indexed by the id's random bits); topics in a
//! separate sharded index (`topics.rs`). At most one shard lock is held at a time, never
//! across an `.await`, and never while answering a poll: waiters are taken out under the
//! lock and answered after it is released.
//!
//! # No lost wake-up
//! A parked poll is a `Waiter` (`channel.rs`) in its channel's list. Whoever removes a
//! waiter from the list answers it: a publish (`new_change`), the park timer at its
//! deadline (`reconnect`, `deadlines.rs`), a revoke or a delete (`max_retries`), the drain
//! (`reconnect`). A publish that finds no waiter sets the channel's pending mark under the
//! same lock a poll checks it under. If a `new_change` is sent to a poll whose client has
//! gone, either the sender sees the failure or the poll's guard finds the undelivered
//! answer; whichever it is puts the pending mark back.

mod channel;
mod deadlines;
mod handover;
mod not_live;
mod poll;
mod publish;
mod registry;
mod snapshot;
mod topics;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::Histogram;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, sleep_until};

use channel::Channel;
pub use channel::Limits;
pub use deadlines::COMPACT_SLACK;
use not_live::NotLive;
use topics::Topics;

pub use handover::{Detached, HandoverToken};
pub use not_live::NotLiveState;
pub use poll::{HeldPoll, Outcome, ParkedPoll};
pub use registry::Sweeper;
pub use snapshot::{ChannelState, HubState, PARKED, Restored, now_ms};

pub use crate::answer::Answer;
use crate::id::{ChannelId, IdHasher};
use crate::metrics::Metrics;

const CHANNEL_SHARDS: usize = 64;
const TOPIC_SHARDS: usize = 64;
/// Bound on remembered not-live ids (SPEC §3).
pub const NOT_LIVE_CAPACITY: usize = 65_536;
/// Bound on topics remembered only for their latest position.
pub const POSITION_CAPACITY: usize = 1 << 20;
/// Most topics one channel may be bound to.
pub const MAX_TOPICS_PER_CHANNEL: usize = 64;
/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Longest `stream_type`, in bytes.
pub const MAX_STREAM_TYPE_LEN: usize = 64;

/// What a parked poll receives: its answer and, for a `new_change`, the clock of the publish
/// that woke it.
pub(crate) struct Delivery {
    answer: Answer,
    rider: Option<Arc<Rider>>,
}

/// What rides along with an answer, shared by every poll one event answered: one pointer in
/// the delivery either way, so that a parked poll's channel stays as small as it was.
pub(crate) enum Rider {
    /// The clock of the publish that woke the poll.
    Fanout(FanoutClock),
    /// Not an answer: the poll is being handed to another process (`handover.rs`).
    Handover {
        /// Kept for its drop: see `handover::Tally`.
        _tally: handover::Tally,
    },
}

impl From<Answer> for Delivery {
    fn from(answer: Answer) -> Delivery {
        Delivery {
            answer,
            rider: None,
        }
    }
}

/// Times one publish's fan-out for `nudge_fanout_seconds` (SPEC §6: "from a publish's arrival
/// to its last answered poll"). Every poll the publish wakes holds a clone; the last clone
/// to go observes the histogram. A poll lets go of it when its task has the answer in hand
/// and returns it to be written, so the time includes the wake-ups and the scheduling of
/// every woken poll, not only the loop that sends to them (which is far shorter).
pub(crate) struct FanoutClock {
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
    /// `--max-polls-per-channel`: past it a poll is answered 429.
    pub max_polls_per_channel: usize,
    /// `--max-parked`: parked and held polls on the node; past it a poll is answered 503.
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
    /// The client's newest seen position: a newer one on a topic answers `new_change` at once.
    pub stream_position: Option<u64>,
    /// Answer at once (`new_change` or `no_change`) instead of parking.
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
    /// The node is handing its polls to another process (an upgrade in place): the poll
    /// was not started, and nothing of the hub was changed by it. A transport that can
    /// move the connection moves it with the request; one that cannot answers `reconnect`.
    Moving,
}

/// A channel registration, already decoded (validation happens in [`Hub::register`]).
#[derive(Clone, Debug, Default)]
pub struct Registration {
    /// Topics whose publishes wake the channel.
    pub topics: Vec<String>,
    /// Who the channel is for, so that a revocation by subject finds it.
    pub subject: Option<String>,
    /// Only publishes of this `stream_type` wake it; `None` for all.
    pub stream_type: Option<String>,
    /// `None`: the node's `--ttl`; more is clamped to it.
    pub ttl: Option<Duration>,
    /// `None`: the node's `--retry-timeout`; more is clamped to it.
    pub retry_timeout: Option<Duration>,
    /// `None`: the node's `--max-retries`; more is clamped to it.
    pub max_retries: Option<u32>,
}

/// A registered channel: what the main API hands on to its client.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The new channel's id, a bearer credential.
    pub id: ChannelId,
    /// The limits after clamping to the node's.
    pub limits: Limits,
    /// `None` for `all`.
    pub stream_type: Option<String>,
}

/// Why a registration was refused (`400 bad_request`, or `503 too_many_channels`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// No topics, or more than [`MAX_TOPICS_PER_CHANNEL`].
    #[error("topics must hold 1 to {MAX_TOPICS_PER_CHANNEL} topics")]
    TopicCount,
    /// A topic empty, too long, or not visible ASCII.
    #[error("a topic is 1 to {MAX_TOPIC_LEN} bytes of visible ASCII (0x21-0x7E)")]
    BadTopic,
    /// A subject empty or longer than 256 bytes.
    #[error("subject must be 1 to 256 bytes")]
    BadSubject,
    /// A stream type empty, too long, or not visible ASCII.
    #[error("stream_type must be 1 to 64 bytes of visible ASCII")]
    BadStreamType,
    /// The named duration (`ttl`, `retry_timeout`) is under a second.
    #[error("{0} must be at least 1 second")]
    TooShort(&'static str),
    /// Past `--max-channels` or `--max-topic-bytes`: retry after `retry_after`.
    #[error("this node holds as many {what} as it may ({limit}); retry later or elsewhere")]
    TooManyChannels {
        /// Which cap: channels or topic bytes.
        what: &'static str,
        /// The cap's value.
        limit: usize,
        /// How long until an idle channel expires and makes room (`Retry-After`).
        retry_after: Duration,
    },
}

/// One publish (SPEC §4): wakes the channels on `topic` that want its `stream_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// The topic whose channels are woken.
    pub topic: String,
    /// The change's position in the topic's stream, which a poll's `stream_position` is
    /// compared with.
    pub position: Option<u64>,
    /// Wakes only channels of this `stream_type` and those of `all`; `None` wakes every
    /// one.
    pub stream_type: Option<String>,
}

/// What `POST /v1/publish` answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Publishes applied.
    pub published: usize,
    /// Parked polls they woke on this node.
    pub woken: usize,
}

/// Which channels a revocation removes: those matching every filter given.
#[derive(Clone, Debug, Default)]
pub struct RevokeFilter {
    /// Only channels registered with this subject.
    pub subject: Option<String>,
    /// Only channels bound to this topic.
    pub topic: Option<String>,
}

/// What `GET /v1/channels/{id}` shows.
#[derive(Clone, Debug)]
pub struct ChannelInfo {
    /// The channel's id.
    pub channel: String,
    /// Its topics.
    pub topics: Vec<String>,
    /// Its subject, if registered with one.
    pub subject: Option<String>,
    /// Its stream type, or `all`.
    pub stream_type: String,
    /// Its ttl after clamping.
    pub ttl_seconds: u64,
    /// Its retry timeout after clamping.
    pub retry_timeout_seconds: u64,
    /// Its `reconnect` allowance after clamping.
    pub max_retries: u32,
    /// `reconnect` answers it has given so far.
    pub retries_used: u32,
    /// Polls parked on it now.
    pub parked_polls: usize,
    /// A change is waiting: the next poll is answered `new_change` at once.
    pub pending: bool,
    /// Seconds until the channel expires; `null` while a poll keeps it alive.
    pub expires_in_seconds: Option<f64>,
}

/// Counts for tests and operators (the same figures as the gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounts {
    /// Live channels (`nudge_channels`).
    pub channels: usize,
    /// Parked polls (`nudge_parked_polls`).
    pub parked: usize,
    /// Held polls of not-live ids.
    pub held: usize,
    /// Topic entries (`nudge_topics`).
    pub topics: usize,
    /// Not-live ids remembered.
    pub not_live: usize,
}

type ChannelShard = HashMap<ChannelId, Box<Channel>, IdHasher>;

/// All of a node's state: channels, topics, parked polls. Shared as `Arc<Hub>`.
pub struct Hub {
    config: HubConfig,
    caps: Caps,
    /// Live channels, reserved before a channel is inserted so the cap is never passed.
    live: AtomicUsize,
    /// The earliest expiry of an idle channel the last sweep saw: the `Retry-After` of a
    /// refused registration.
    next_expiry: Mutex<Option<Instant>>,
    channels: Box<[Mutex<ChannelShard>]>,
    /// The park deadlines of each channel shard, same index (`deadlines.rs`).
    deadlines: Box<[Mutex<deadlines::Deadlines>]>,
    /// Where the deadlines' ticks count from.
    origin: Instant,
    /// Entries in the deadlines after the park timer's last pass.
    deadline_total: AtomicUsize,
    /// The park timer's thread and the tick it sleeps until (`u64::MAX` while it scans):
    /// a deadline filed for that tick or earlier wakes it.
    park_timer: std::sync::OnceLock<std::thread::Thread>,
    timer_planned: AtomicU64,
    topics: Topics,
    not_live: Mutex<NotLive>,
    metrics: Arc<Metrics>,
    next_key: AtomicU64,
    /// Polls of not-live ids being held (they count toward `max_parked`).
    held: AtomicI64,
    /// Parked polls: the hub's own count, which `nudge_parked_polls` mirrors.
    parked: AtomicI64,
    draining: AtomicBool,
    drain_started: Notify,
    /// Set while parked polls are being handed to another process (`handover.rs`).
    moving: AtomicBool,
    /// Something a snapshot holds has changed since [`Hub::take_changed`] last looked: so
    /// that `--state-dir` writes nothing while a node is idle.
    changed: AtomicBool,
}

impl Hub {
    /// A hub with the caps derived from this node's memory ([`Caps::for_this_node`]).
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Arc<Hub> {
        Hub::with_caps(config, Caps::for_this_node(), metrics)
    }

    /// A hub with the given caps, for tests and for `--max-channels`/`--max-topic-bytes`.
    pub fn with_caps(config: HubConfig, caps: Caps, metrics: Arc<Metrics>) -> Arc<Hub> {
        // The defaults are derived from the machine: say what they came to.
        tracing::info!(
            max_channels = caps.max_channels,
            max_topic_bytes = caps.max_topic_bytes,
            "channel caps"
        );
        let hub = Arc::new(Hub {
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
            deadlines: (0..CHANNEL_SHARDS).map(|_| Mutex::default()).collect(),
            origin: Instant::now(),
            deadline_total: AtomicUsize::new(0),
            park_timer: std::sync::OnceLock::new(),
            timer_planned: AtomicU64::new(u64::MAX),
            not_live: Mutex::new(NotLive::new(NOT_LIVE_CAPACITY)),
            metrics,
            next_key: AtomicU64::new(0),
            held: AtomicI64::new(0),
            parked: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            drain_started: Notify::new(),
            moving: AtomicBool::new(false),
            changed: AtomicBool::new(true),
        });
        let timer = deadlines::spawn_park_timer(Arc::downgrade(&hub));
        let _ = hub.park_timer.set(timer);
        hub
    }

    /// The settings it was built with.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The channel caps in force (logged at start: they may come from the machine).
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// The metrics it updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn shard(&self, id: ChannelId) -> &Mutex<ChannelShard> {
        &self.channels[id.shard(CHANNEL_SHARDS - 1)]
    }

    /// The park deadlines of `id`'s shard: lock only while holding [`Hub::shard`]'s lock.
    fn deadlines_of(&self, id: ChannelId) -> &Mutex<deadlines::Deadlines> {
        &self.deadlines[id.shard(CHANNEL_SHARDS - 1)]
    }

    /// Notes that the state a snapshot holds has changed. Called while holding the lock of
    /// the shard that changed, or after the change: a snapshot that [`Hub::take_changed`]
    /// cleared the flag for either saw the change or leaves the flag set for the next one.
    /// A load first, so that the hot path (every poll) writes the shared line only once per
    /// snapshot.
    fn note_change(&self) {
        if !self.changed.load(Ordering::Acquire) {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Whether the state a snapshot holds may have changed since the previous call (true
    /// the first time), clearing the flag: call it *before* [`Hub::snapshot`].
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::AcqRel)
    }

    /// Keeps the parked count and its gauge together.
    fn count_parked(&self, delta: i64) {
        self.parked.fetch_add(delta, Ordering::Relaxed);
        self.metrics.parked_polls.add(delta);
    }

    /// Its counts now; each is read on its own, so they may be a moment apart.
    pub fn counts(&self) -> HubCounts {
        HubCounts {
            channels: self.live.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed) as usize,
            held: self.held.load(Ordering::Relaxed) as usize,
            topics: self.topics.len(),
            not_live: self.not_live.lock().len(),
        }
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
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
                    self.count_parked(-(ch.waiters.len() as i64));
                    answers.extend(ch.waiters.drain(..).map(|w| (*id, w.tx)));
                    ch.touch_if_idle(now);
                }
            }
        }
        let n = answers.len();
        self.note_change();
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

/// Whether `s` is 1 to `max_len` bytes of visible ASCII (0x21-0x7E): no spaces, no controls.
pub(crate) fn is_visible_ascii(s: &str, max_len: usize) -> bool {
    !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}
