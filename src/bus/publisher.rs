//! The connection this node writes to the stream on: `XADD`s of publishes and revocations,
//! and the periodic `XTRIM`s that keep the stream within `--bus-retention` and
//! `--bus-max-entries`. One multiplexed connection (concurrent writes are pipelined on
//! it), made on first use and thrown away on any error, so the next write makes a fresh one
//! (after a failover: on the new primary). A write is never retried within a request: an
//! `XADD` that failed may still have been added, and every entry is applied once.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::BusError;
use super::entry_id::EntryId;
use super::redis_target::Target;

/// How long connecting, and each command, may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Publisher {
    /// An async mutex, held across the connect only, so that a burst of writes after a
    /// reset makes one connection rather than one each. Never held across a command.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Publisher {
    pub(super) fn new() -> Publisher {
        Publisher {
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Appends one entry whose field `m` holds `payload`; returns its id.
    pub(super) async fn append(
        &self,
        target: &Target,
        stream: &str,
        payload: &[u8],
    ) -> Result<EntryId, BusError> {
        let mut conn = self.connection(target).await?;
        let added = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(super::message::FIELD)
            .arg(payload)
            .query_async::<String>(&mut conn)
            .await;
        match added {
            Ok(id) => id.parse().map_err(BusError::Protocol),
            Err(e) => {
                self.reset().await;
                Err(e.into())
            }
        }
    }

    /// Trims entries older than `retention` (by Redis's own clock) and all but the newest
    /// `max_entries`. Approximate (`~`): Redis trims whole nodes of its radix tree, which
    /// costs next to nothing, so a few more entries than asked may stay.
    pub(super) async fn trim(
        &self,
        target: &Target,
        stream: &str,
        retention: Duration,
        max_entries: u64,
    ) -> Result<u64, BusError> {
        let mut conn = self.connection(target).await?;
        let trimmed = async {
            let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
            let now_ms = secs * 1000 + micros / 1000;
            let min_ms = now_ms.saturating_sub(retention.as_millis() as u64);
            let by_age: u64 = redis::cmd("XTRIM")
                .arg(stream)
                .arg("MINID")
                .arg("~")
                .arg(min_ms)
                .query_async(&mut conn)
                .await?;
            let by_length: u64 = redis::cmd("XTRIM")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(max_entries)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(by_age + by_length)
        }
        .await;
        if trimmed.is_err() {
            self.reset().await;
        }
        Ok(trimmed?)
    }

    /// Forgets the connection: the next write makes a new one.
    pub(super) async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    async fn connection(&self, target: &Target) -> Result<MultiplexedConnection, BusError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = target.connect("writer", TIMEOUT).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}
