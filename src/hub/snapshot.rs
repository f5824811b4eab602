//! The hub's state as plain data, to carry it across a process: written to `--state-dir`
//! so that a node that crashed comes back knowing its channels, and handed to the new
//! process of an upgrade. Parked polls are not in it (their sockets are gone after a crash;
//! an upgrade moves them itself).
//!
//! Times are wall-clock (milliseconds since the UNIX epoch), since a monotonic `Instant`
//! means nothing in another process. The encoding lives in `wire::snapshot`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::channel::{Channel, Pending};
use super::{Hub, Limits, NotLiveState};
use crate::id::ChannelId;

/// Everything a hub must know to carry on: its live channels, the topics' positions and
/// the ids it answers as not live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubState {
    /// When it was taken.
    pub taken_at_ms: u64,
    /// Every live channel.
    pub channels: Vec<ChannelState>,
    /// The newest position of each topic that has one (bound or remembered).
    pub positions: Vec<(String, u64)>,
    /// The ids answered `max_retries` in the last 60 s (hashed).
    pub not_live: NotLiveState,
}

/// One channel, as [`HubState`] carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelState {
    /// The id, in its text form.
    pub id: String,
    /// Bound topics.
    pub topics: Vec<String>,
    /// The subject it was registered with.
    pub subject: Option<String>,
    /// Its `stream_type` filter; `None` is `all`.
    pub stream_type: Option<String>,
    /// Its limits.
    pub ttl: Duration,
    /// Its limits.
    pub retry_timeout: Duration,
    /// Its limits.
    pub max_retries: u32,
    /// `reconnect` answers given so far.
    pub reconnects: u32,
    /// Its pending mark: set, set by a publish without a position, newest position.
    pub pending: (bool, bool, u64),
    /// When it expires without a poll; [`PARKED`] for a channel with parked polls, which
    /// has no expiry: it gets its full `ttl` from the moment it is restored (its polls
    /// ended with the process that held them; the file may be up to a minute older than
    /// that, see `state_dir`).
    pub expires_at_ms: u64,
}

/// [`ChannelState::expires_at_ms`] of a channel that had parked polls.
pub const PARKED: u64 = u64::MAX;

/// What [`Hub::restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Channels restored.
    pub channels: usize,
    /// Channels left out: expired, malformed, already here, or past `--max-channels`.
    pub skipped: usize,
    /// Topic positions restored.
    pub positions: usize,
    /// Not-live ids remembered.
    pub not_live: usize,
}

/// Milliseconds since the UNIX epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Hub {
    /// Takes the hub's state, one shard lock at a time (a consistent picture of each
    /// channel, not of the whole hub: see `bus` for the order that keeps it exact).
    pub fn snapshot(&self) -> HubState {
        let (now, now_ms) = (Instant::now(), now_ms());
        let mut channels = Vec::with_capacity(self.counts().channels);
        for shard in self.channels.iter() {
            let shard = shard.lock();
            for (id, ch) in shard.iter() {
                let expires_at_ms = ch.idle_deadline.map_or(PARKED, |at| {
                    now_ms + at.saturating_duration_since(now).as_millis() as u64
                });
                channels.push(ChannelState {
                    id: id.to_string(),
                    topics: ch.topics.iter().map(|t| t.to_string()).collect(),
                    subject: ch.subject().map(str::to_owned),
                    stream_type: ch.stream_type().map(str::to_owned),
                    ttl: ch.limits.ttl,
                    retry_timeout: ch.limits.retry_timeout,
                    max_retries: ch.limits.max_retries,
                    reconnects: ch.reconnects,
                    pending: ch.pending.parts(),
                    expires_at_ms,
                });
            }
        }
        HubState {
            taken_at_ms: now_ms,
            channels,
            positions: self
                .topics
                .positions(now)
                .into_iter()
                .map(|(t, p)| (t.to_string(), p))
                .collect(),
            not_live: self.not_live.lock().export(now),
        }
    }

    /// Puts a state back: the channels whose ttl has not run out (marked pending when
    /// `mark_pending`: a node that cannot replay what it missed must assume a change), and
    /// the topics' positions. Channels already here are left as they are.
    pub fn restore(&self, state: &HubState, mark_pending: bool) -> Restored {
        let (now, now_ms) = (Instant::now(), now_ms());
        let mut done = Restored::default();
        // Channels first: a position then lands on a topic its channels already bind.
        for c in &state.channels {
            match self.restore_channel(c, mark_pending, now, now_ms) {
                true => done.channels += 1,
                false => done.skipped += 1,
            }
        }
        for (topic, position) in &state.positions {
            self.topics
                .publish(topic, Some(*position), now, &mut Vec::new());
            done.positions += 1;
        }
        // Their 60 s run on from their first answer, across the time the node was down.
        let elapsed = Duration::from_millis(now_ms.saturating_sub(state.taken_at_ms));
        done.not_live = self.not_live.lock().import(&state.not_live, elapsed, now);
        self.set_topic_gauges();
        self.note_change();
        done
    }

    fn restore_channel(
        &self,
        c: &ChannelState,
        mark_pending: bool,
        now: Instant,
        now_ms: u64,
    ) -> bool {
        let Some(id) = ChannelId::parse(&c.id) else {
            return false;
        };
        if c.expires_at_ms <= now_ms || c.topics.is_empty() {
            return false;
        }
        if self.shard(id).lock().contains_key(&id) {
            return false;
        }
        let node = self.config.limits;
        let limits = Limits {
            ttl: c.ttl.min(node.ttl).max(Duration::from_secs(1)),
            retry_timeout: c
                .retry_timeout
                .min(node.retry_timeout)
                .max(Duration::from_secs(1)),
            max_retries: c.max_retries.min(node.max_retries),
        };
        // Within the caps as a registration is: a node restarted with lower ones restores
        // what fits.
        let Ok(topics) = self.admit(&c.topics, id) else {
            return false;
        };
        let mut pending = Pending::from_parts(c.pending);
        if mark_pending {
            pending.mark(None);
        }
        // `PARKED` comes out as the full ttl.
        let expires_in = Duration::from_millis(c.expires_at_ms - now_ms).min(limits.ttl);
        let mut channel = Channel::new(
            topics,
            c.subject.as_deref(),
            c.stream_type.as_deref(),
            limits,
            now,
        );
        channel.reconnects = c.reconnects;
        channel.pending = pending;
        channel.idle_deadline = Some(now + expires_in);
        self.shard(id).lock().insert(id, Box::new(channel));
        self.metrics.channels.inc();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::{HubConfig, Registration};
    use crate::metrics::Metrics;

    fn hub() -> Arc<Hub> {
        Hub::new(
            HubConfig {
                limits: Limits {
                    ttl: Duration::from_secs(60),
                    retry_timeout: Duration::from_secs(50),
                    max_retries: 5,
                },
                max_polls_per_channel: 4,
                max_parked: 100,
            },
            Arc::new(Metrics::new(prometheus::Registry::new(), false)),
        )
    }

    #[test]
    fn a_state_comes_back_whole_in_another_hub() {
        let a = hub();
        let id = a
            .register(Registration {
                topics: vec!["user:1".into(), "box:2".into()],
                subject: Some("user:1".into()),
                stream_type: Some("changes".into()),
                max_retries: Some(3),
                ..Default::default()
            })
            .unwrap()
            .id;
        a.publish(
            &[crate::hub::Publish {
                topic: "box:2".into(),
                position: Some(7),
                stream_type: None,
            }],
            "api",
        );
        a.publish(
            &[crate::hub::Publish {
                topic: "nobody".into(),
                position: Some(9),
                stream_type: None,
            }],
            "api",
        );
        let state = a.snapshot();
        let b = hub();
        assert_eq!(
            b.restore(&state, false),
            Restored {
                channels: 1,
                skipped: 0,
                positions: 2,
                not_live: 0,
            }
        );
        let info = b.channel_info(&id.to_string()).unwrap();
        assert_eq!(info.topics, ["box:2", "user:1"]);
        assert_eq!(info.subject.as_deref(), Some("user:1"));
        assert_eq!(info.stream_type, "changes");
        assert_eq!(info.max_retries, 3);
        assert!(info.pending, "the publish on box:2 left its mark");
        // Taking it again in the new hub gives the same channels and positions.
        let again = b.snapshot();
        assert_eq!(again.channels.len(), 1);
        let mut positions = again.positions.clone();
        positions.sort();
        assert_eq!(
            positions,
            [("box:2".to_owned(), 7), ("nobody".to_owned(), 9)]
        );
        // Restoring twice changes nothing.
        assert_eq!(b.restore(&state, false).channels, 0);
    }

    #[test]
    fn a_hub_says_whether_anything_a_snapshot_holds_has_changed() {
        let a = hub();
        assert!(a.take_changed(), "a new hub has never been written");
        assert!(!a.take_changed(), "taking it clears it");
        let id = a
            .register(Registration {
                topics: vec!["t".into()],
                ..Default::default()
            })
            .unwrap()
            .id
            .to_string();
        assert!(a.take_changed(), "a registration");
        assert!(a.channel_info(&id).is_some());
        let _ = a.snapshot();
        assert!(!a.take_changed(), "reading changes nothing");
        a.publish(
            &[crate::hub::Publish {
                topic: "t".into(),
                position: None,
                stream_type: None,
            }],
            "api",
        );
        assert!(a.take_changed(), "a publish marks the channel");
        let answered = a.poll(
            &id,
            crate::hub::PollRequest {
                dont_block: true,
                ..Default::default()
            },
        );
        assert!(matches!(answered, crate::hub::PollStart::Answer(_)));
        assert!(a.take_changed(), "a poll clears the mark");
        assert!(a.delete(&id));
        assert!(a.take_changed(), "a deletion");
        let b = hub();
        b.take_changed();
        b.restore(&a.snapshot(), false);
        assert!(b.take_changed(), "a restore");
    }

    #[test]
    fn a_channel_parked_at_the_snapshot_gets_its_full_ttl_from_the_restore() {
        let a = hub();
        let id = a
            .register(Registration {
                topics: vec!["t".into()],
                ttl: Some(Duration::from_secs(30)),
                ..Default::default()
            })
            .unwrap()
            .id
            .to_string();
        let parked = a.poll(&id, crate::hub::PollRequest::default());
        assert!(matches!(parked, crate::hub::PollStart::Park(_)));
        let mut state = a.snapshot();
        assert_eq!(state.channels[0].expires_at_ms, PARKED);
        // However old the file: the poll ended with the process that held it.
        state.taken_at_ms -= 3_600_000;
        let b = hub();
        assert_eq!(b.restore(&state, true).channels, 1);
        let left = b.channel_info(&id).unwrap().expires_in_seconds.unwrap();
        assert!((29.0..=30.0).contains(&left), "{left}");
        drop(parked);
    }

    /// A hub holding three channels of a topic each (`topic-0` … `topic-2`), and an empty
    /// one like it with these caps.
    fn three_channels_and_a_small_hub(caps: crate::hub::Caps) -> (Arc<Hub>, Arc<Hub>) {
        let a = hub();
        for n in 0..3 {
            a.register(Registration {
                topics: vec![format!("topic-{n}")],
                ..Default::default()
            })
            .unwrap();
        }
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new(), false));
        let small = Hub::with_caps(a.config().clone(), caps, metrics);
        (a, small)
    }

    #[test]
    fn a_restore_stays_within_max_topic_bytes() {
        // Room for the names of two channels ("topic-N" is 7 bytes), not three.
        let (a, small) = three_channels_and_a_small_hub(crate::hub::Caps {
            max_channels: 100,
            max_topic_bytes: 14,
        });
        let done = small.restore(&a.snapshot(), true);
        assert_eq!((done.channels, done.skipped), (2, 1));
        assert_eq!(small.counts().channels, 2);
        assert_eq!(
            small.counts().topics,
            2,
            "the skipped channel's topic is not kept"
        );
        // A channel on a topic already bound still fits; a new name does not.
        let bound = small.snapshot().channels[0].topics[0].clone();
        assert!(
            small
                .register(Registration {
                    topics: vec![bound],
                    ..Default::default()
                })
                .is_ok()
        );
        assert!(
            small
                .register(Registration {
                    topics: vec!["topic-x".into()],
                    ..Default::default()
                })
                .is_err()
        );
    }

    #[test]
    fn a_restore_stops_at_max_channels() {
        let (a, small) = three_channels_and_a_small_hub(crate::hub::Caps {
            max_channels: 2,
            max_topic_bytes: 1 << 20,
        });
        let done = small.restore(&a.snapshot(), true);
        assert_eq!((done.channels, done.skipped), (2, 1));
        assert_eq!(small.counts().channels, 2);
        // The cap holds for registrations after it too.
        assert!(
            small
                .register(Registration {
                    topics: vec!["more".into()],
                    ..Default::default()
                })
                .is_err()
        );
    }

    #[test]
    fn expired_channels_stay_out_and_unknown_ones_are_marked_pending_on_request() {
        let a = hub();
        let id = a
            .register(Registration {
                topics: vec!["t".into()],
                ..Default::default()
            })
            .unwrap()
            .id;
        let mut state = a.snapshot();
        let mut expired = state.channels[0].clone();
        expired.id = ChannelId::random().to_string();
        expired.expires_at_ms = now_ms() - 1;
        let mut malformed = state.channels[0].clone();
        malformed.id = "not an id".into();
        state.channels.extend([expired, malformed]);
        let b = hub();
        let done = b.restore(&state, true);
        assert_eq!((done.channels, done.skipped), (1, 2));
        assert!(b.channel_info(&id.to_string()).unwrap().pending);
    }
}
