//! The publish bus between nodes (SPEC §5, issue 12): one Redis stream (`--redis-stream`,
//! default `nudge:publish`) that every publish and revocation is appended to, and that
//! every node reads from the entry after the last one it applied.
//!
//! - [`message`]: what an entry holds (field `m`: a publish as `POST /v1/publish` takes it,
//!   or a revocation envelope) and how it is told apart.
//! - `reader`: the one reader every node runs; after any interruption it works out what it
//!   missed (replayable, or not: trimmed, reset, diverged) and reads on.
//! - `publisher`: the connection this node appends and trims on.
//! - `redis_target`: `--redis-url`, or the primary that `--redis-sentinel` names.
//! - [`entry_id`]: stream entry ids, ordered.
//! - `backoff`: capped, jittered reconnect delays.
//!
//! # Exactly once per node
//! A publish posted to a node's internal API is *not* applied there: it is appended to the
//! stream, and every node, the one it was posted to included, applies it when its reader
//! gets to it. A node reads entries in id order and remembers the last one it applied;
//! every read asks for the entries after that one, so each entry is applied once per node,
//! however often the connection breaks. A revocation is applied at once where it was posted
//! (it must never wait for the bus) and its entry names that node, which skips it.
//!
//! # Gaps
//! A reader that reconnects reads on from its last entry: what it missed is *replayed*, and
//! nothing else is touched. Only when that is impossible — the next entry was trimmed away,
//! the stream was reset, or Redis lacks entries this node applied — does the node mark every
//! channel pending, waking parked polls at `--gap-wake-rate` a second. Each case is told by
//! what Redis says (see `reader`), never guessed, and counted in `nudge_bus_gaps_total`.
//!
//! No lock is held across an `.await` here except the publisher's async mutex, which only
//! serialises connecting and is never taken by the hub.

mod backoff;
mod cursor;
pub mod entry_id;
pub mod message;
mod publisher;
mod reader;
mod redis_target;
mod resp;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::hub::{Hub, Publish, RevokeFilter};
use cursor::Cursor;
use entry_id::EntryId;
use publisher::Publisher;
use redis_target::Target;
pub use redis_target::{RedisConfig, check_url};

/// `--redis-*` and `--bus-*`: what a node needs to run the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusConfig {
    /// Which Redis.
    pub redis: RedisConfig,
    /// `--redis-stream`: the stream's key.
    pub stream: String,
    /// `--bus-retention`: entries older than this are trimmed.
    pub retention: Duration,
    /// `--bus-max-entries`: at most about this many entries are kept.
    pub max_entries: u64,
    /// `--gap-wake-rate`: parked polls woken a second after a gap that cannot be replayed.
    pub gap_wake_rate: u32,
}

/// Why a publish or a revocation could not go on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No sentinel named a reachable primary.
    #[error("no primary: {0}")]
    NoPrimary(String),
    /// Redis answered something this node cannot read.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A node's side of the bus: its reader's state and its writing connection.
pub struct Bus {
    hub: Arc<Hub>,
    target: Target,
    config: BusConfig,
    /// Names this node in revocation entries and in `CLIENT LIST`. Random per process.
    node_id: String,
    publisher: Publisher,
    connected: AtomicBool,
    cursor: Mutex<Cursor>,
    /// Set by [`Bus::stop`]; the reader stops between entries.
    stop: watch::Sender<bool>,
    /// Set by the reader once it has stopped.
    stopped: watch::Sender<bool>,
}

impl Bus {
    /// Makes the bus (no I/O yet: [`Bus::run`] connects). The configuration was checked
    /// with the rest, by `config`.
    pub fn new(config: BusConfig, hub: Arc<Hub>) -> Result<Arc<Bus>, String> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the OS random source is available");
        let node_id = format!("{:016x}", u64::from_le_bytes(id));
        Ok(Arc::new(Bus {
            hub,
            target: Target::new(&config.redis, &node_id)?,
            config,
            node_id,
            publisher: Publisher::new(),
            connected: AtomicBool::new(false),
            cursor: Mutex::new(Cursor::default()),
            stop: watch::Sender::new(false),
            stopped: watch::Sender::new(false),
        }))
    }

    /// This node's id in revocation entries.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// True while the reader is connected and reading: the node is ready.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.hub.metrics().bus_connected.set(i64::from(up));
    }

    /// Where this node is in the stream, as text that [`Bus::resume_from`] takes back:
    /// `<last entry id>/<entries added up to it>@<stream epoch>`. `None` before the
    /// reader's first connection.
    pub fn position(&self) -> Option<String> {
        self.cursor.lock().position()
    }

    /// Before [`Bus::run`]: read on from the entry after this position (one that
    /// [`Bus::position`] gave, in this process or an earlier one) instead of the stream's
    /// end, so that what was missed meanwhile is replayed — or, if it cannot be, every
    /// channel is marked pending.
    pub fn resume_from(&self, position: &str) -> Result<(), String> {
        *self.cursor.lock() = Cursor::from_position(position)?;
        Ok(())
    }

    /// Stops the reader after the entry it is applying, and returns the position it
    /// stopped at: the old process of an upgrade hands it to the new one.
    pub async fn stop(&self) -> Option<String> {
        self.stop.send_replace(true);
        let mut stopped = self.stopped.subscribe();
        // The reader may never have run (no `run` yet): then there is nothing to wait for.
        if self.stop.receiver_count() > 0 {
            let _ = stopped.wait_for(|s| *s).await;
        }
        self.position()
    }

    /// After [`Bus::stop`], lets [`Bus::run`] run again from where it stopped: an upgrade in
    /// place that was abandoned takes its bus back.
    pub fn restart(&self) {
        self.stopped.send_replace(false);
        self.stop.send_replace(false);
    }

    /// Appends a publish to the stream; it is applied here when the reader gets to it,
    /// like everywhere. Returns the entry's id.
    pub async fn publish(&self, batch: &[Publish]) -> Result<EntryId, BusError> {
        self.append(&message::encode_publish(batch)).await
    }

    /// Tells the other nodes about a revocation this node has already applied.
    pub async fn revoke(&self, filter: &RevokeFilter) -> Result<EntryId, BusError> {
        self.append(&message::encode_revoke(filter, &self.node_id))
            .await
    }

    async fn append(&self, payload: &[u8]) -> Result<EntryId, BusError> {
        self.publisher
            .append(&self.target, &self.config.stream, payload)
            .await
    }

    /// Reads the stream, reconnecting after every loss, and trims it, until the future is
    /// dropped or [`Bus::stop`] is called.
    pub async fn run(self: Arc<Self>) {
        tokio::select! {
            _ = reader::run(self.clone()) => {}
            _ = self.trim_forever() => {}
        }
    }

    /// Every node trims: a main API that appends without trimming must not grow Redis
    /// forever, and trimming twice costs nothing.
    async fn trim_forever(&self) {
        const TRIM_EVERY: Duration = Duration::from_secs(10);
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            match self
                .publisher
                .trim(
                    &self.target,
                    &self.config.stream,
                    self.config.retention,
                    self.config.max_entries,
                )
                .await
            {
                Ok(n) if n > 0 => tracing::debug!(trimmed = n, "bus stream trimmed"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "bus stream not trimmed this time"),
            }
        }
    }
}
