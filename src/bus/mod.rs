//! The publish bus between nodes (SPEC §5): Redis pub/sub on one Redis channel
//! (`--redis-channel`, default `nudge:publish`), through the `redis` crate.
//!
//! - [`message`]: what a bus message is (a publish as `POST /v1/publish` takes it, or a
//!   revocation envelope) and how it is told apart.
//! - `subscriber`: the one subscription every node holds, its reconnects with backoff,
//!   its liveness pings, and what a gap in it costs (every channel marked pending).
//! - `publisher`: the connection this node `PUBLISH`es on.
//! - `backoff`: capped, jittered reconnect delays.
//!
//! # Exactly once per node
//! A publish posted to a node's internal API is *not* applied there: it goes into Redis,
//! and every node, the one it was posted to included, applies it when the subscription
//! hands it back. Redis delivers a message once per subscription, and a node holds exactly
//! one subscription at a time (a new one only after the old one is gone), so each publish
//! is applied once on each node that was subscribed when it was published. A revocation is
//! applied at once where it was posted (it must never wait for the bus) and travels in an
//! envelope naming that node, which skips it when it comes back.
//!
//! # Gaps
//! While the subscription is down, `/readyz` answers 503, publishes posted here answer
//! `503 bus_unavailable`, and `nudge_bus_connected` is 0. Publishes sent into Redis by
//! others meanwhile are lost to this node, so once it has resubscribed it marks every live
//! channel pending (spread over a short window) and counts `nudge_bus_gaps_total`.
//! Revocations missed in a gap cannot be replayed: the main API's authorization when a
//! client re-registers is the backstop.
//!
//! No lock is held across an `.await` here except the publisher's async mutex, which only
//! serialises connecting and is never taken by the hub.

mod backoff;
pub mod message;
mod publisher;
mod subscriber;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::hub::{Hub, Publish, RevokeFilter};
use publisher::Publisher;

/// Why a publish or a revocation could not go on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The subscription is down: a publish is applied here only when it comes back,
    /// so none is sent.
    #[error("the bus subscription is down")]
    NotConnected,
    /// Redis did not connect or answer within the publisher's timeout.
    #[error("Redis did not answer in time")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A node's side of the bus: its subscription's state and its publishing connection.
pub struct Bus {
    hub: Arc<Hub>,
    client: redis::Client,
    channel: String,
    /// Names this node in revocation envelopes. Random per process: a restarted node is a
    /// new node (its channels are gone anyway).
    node_id: String,
    publisher: Publisher,
    connected: AtomicBool,
}

/// Checks a `--redis-url` as the client will read it (host, port, database, and whether
/// this build can speak its scheme: `rediss://` needs TLS, which it leaves out). The
/// error never repeats the URL, which may hold a password.
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("--redis-url: {e}"))
}

impl Bus {
    /// Makes the client (no I/O yet: [`Bus::run`] connects). The URL was checked with the
    /// rest of the configuration, by [`check_url`].
    pub fn new(url: &str, channel: &str, hub: Arc<Hub>) -> Result<Arc<Bus>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("--redis-url: {e}"))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the OS random source is available");
        Ok(Arc::new(Bus {
            hub,
            publisher: Publisher::new(client.clone(), channel.to_owned()),
            client,
            channel: channel.to_owned(),
            node_id: format!("{:016x}", u64::from_le_bytes(id)),
            connected: AtomicBool::new(false),
        }))
    }

    /// This node's id in revocation envelopes.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// True while the subscription is up: the node is ready and takes publishes.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.hub.metrics().bus_connected.set(i64::from(up));
    }

    /// Puts a publish on the bus (it is applied here when it comes back, like everywhere).
    /// Returns how many subscribers, nodes and others, Redis handed it to.
    pub async fn publish(&self, batch: &[Publish]) -> Result<u64, BusError> {
        if !self.is_connected() {
            return Err(BusError::NotConnected);
        }
        self.publisher
            .publish(&message::encode_publish(batch))
            .await
    }

    /// Tells the other nodes about a revocation this node has already applied.
    pub async fn revoke(&self, filter: &RevokeFilter) -> Result<u64, BusError> {
        if !self.is_connected() {
            return Err(BusError::NotConnected);
        }
        self.publisher
            .publish(&message::encode_revoke(filter, &self.node_id))
            .await
    }

    /// Holds the subscription, reconnecting after every loss, until the future is dropped.
    pub async fn run(self: Arc<Self>) {
        subscriber::run(self).await
    }
}
