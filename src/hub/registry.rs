//! The registry: registering channels and their caps, reading one, removing them (delete,
//! revoke, retire), and the sweep that expires them and gives memory back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use tokio::time::Instant;

use super::channel::Channel;
use super::{
    Answer, ChannelInfo, Hub, Limits, MAX_STREAM_TYPE_LEN, MAX_TOPIC_LEN, MAX_TOPICS_PER_CHANNEL,
    RegisterError, Registered, Registration, RevokeFilter, is_visible_ascii, shrink_if_sparse,
};
use crate::id::ChannelId;

impl Hub {
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
            Some(t) if is_visible_ascii(&t, MAX_STREAM_TYPE_LEN) => Some(t),
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

        let id = ChannelId::random();
        let names = match self.admit(&topics, id) {
            Ok(names) => names,
            Err(cap) => return Err(self.refuse(cap.name(), cap.limit(&self.caps))),
        };
        let channel = Channel::new(
            names,
            reg.subject.as_deref(),
            stream_type.as_deref(),
            limits,
            Instant::now(),
        );
        self.shard(id).lock().insert(id, Box::new(channel));
        self.note_change();
        self.metrics.channels.inc();
        self.set_topic_gauges();
        Ok(Registered {
            id,
            limits,
            stream_type,
        })
    }

    /// Counts a refused registration and says when to retry: when the earliest idle channel
    /// expires (as the last sweep saw it, plus the sweep's second; 5 s if it saw none),
    /// between 1 s and 60 s.
    pub(super) fn refuse(&self, what: &'static str, limit: usize) -> RegisterError {
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

    pub(super) fn set_topic_gauges(&self) {
        self.metrics.topics.set(self.topics.len() as i64);
        self.metrics
            .topic_bytes
            .set(self.topics.bound_bytes() as i64);
    }

    /// What `GET /v1/channels/{id}` shows; `None` for an unknown or malformed id.
    pub fn channel_info(&self, id_text: &str) -> Option<ChannelInfo> {
        let id = ChannelId::parse(id_text)?;
        let shard = self.shard(id).lock();
        let ch = shard.get(&id)?;
        let now = Instant::now();
        Some(ChannelInfo {
            channel: id.to_string(),
            topics: ch.topics.iter().map(|t| t.to_string()).collect(),
            subject: ch.subject().map(str::to_owned),
            stream_type: ch.stream_type().unwrap_or("all").to_owned(),
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
                .is_none_or(|s| ch.subject() == Some(s))
        };
        let mut removed = Vec::new();
        match &filter.topic {
            Some(topic) => {
                for id in self.topics.channels_of(topic) {
                    let mut shard = self.shard(id).lock();
                    if shard.get(&id).is_some_and(|ch| subject_matches(ch)) {
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
    pub(super) fn retire(&self, id: ChannelId, mut ch: Box<Channel>) {
        if !ch.waiters.is_empty() {
            self.count_parked(-(ch.waiters.len() as i64));
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
    pub(super) fn forget(&self, id: ChannelId, ch: &Channel) {
        let now = Instant::now();
        for t in ch.topics.iter() {
            self.topics.detach(t, id, now);
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.note_change();
        self.metrics.channels.dec();
        self.set_topic_gauges();
    }

    /// Takes a place for channel `id` among the live ones and binds it to `topics`, within
    /// the node's caps, or takes nothing and names the cap it would pass: `--max-channels`
    /// (the place is reserved first, so concurrent registrations never pass it), or
    /// `--max-topic-bytes` (names already bound by other channels cost nothing more). For a
    /// registration and for a channel restored from a snapshot.
    pub(super) fn admit<T: AsRef<str>>(
        &self,
        topics: &[T],
        id: ChannelId,
    ) -> Result<Arc<[Arc<str>]>, Cap> {
        if self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.caps.max_channels).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Cap::Channels);
        }
        let mut added = 0;
        let names: Arc<[Arc<str>]> = topics
            .iter()
            .map(|t| {
                let (name, new_bytes) = self.topics.attach(t.as_ref(), id);
                added += new_bytes;
                name
            })
            .collect();
        if added > 0 && self.topics.bound_bytes() > self.caps.max_topic_bytes {
            let now = Instant::now();
            for t in names.iter() {
                self.topics.detach(t, id, now);
            }
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(Cap::TopicBytes);
        }
        Ok(names)
    }

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

    /// Runs [`Hub::sweep`] every `every` on a thread of its own (`nudge-sweep`) until the
    /// returned [`Sweeper`] is dropped. Not on a tokio worker: a sweep in which a million
    /// channels expire takes about a second (`benches/million.rs`), and the workers must go
    /// on serving connections meanwhile.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> Sweeper {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let hub = self.clone();
        let thread = std::thread::Builder::new()
            .name("nudge-sweep".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    hub.sweep(Instant::now());
                }
            })
            .expect("the sweep thread starts");
        Sweeper {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// The sweep thread of [`Hub::spawn_sweeper`]: dropping it stops the thread and waits for
/// the sweep in progress, if any.
pub struct Sweeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The cap a channel would pass ([`Hub::admit`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Cap {
    Channels,
    TopicBytes,
}

impl Cap {
    /// As the error body says it.
    fn name(self) -> &'static str {
        match self {
            Cap::Channels => "channels",
            Cap::TopicBytes => "topic bytes",
        }
    }

    fn limit(self, caps: &super::Caps) -> usize {
        match self {
            Cap::Channels => caps.max_channels,
            Cap::TopicBytes => caps.max_topic_bytes,
        }
    }
}
