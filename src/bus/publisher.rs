//! The connection this node `PUBLISH`es on: one multiplexed connection (concurrent
//! publishes are pipelined on it), made on first use and thrown away on any error, so the
//! next publish makes a fresh one. It is never retried within a request: a `PUBLISH` that
//! failed may still have been delivered, and the bus promises each publish once per node.
//!
//! The subscriber also throws it away whenever it resubscribes, so that a connection that
//! died with the Redis the subscription lost is not handed the first publish after recovery.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

use super::BusError;

/// How long connecting to Redis, and each `PUBLISH`, may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct Publisher {
    client: Client,
    channel: String,
    /// An async mutex, held across the connect only, so that a burst of publishes after a
    /// reset makes one connection rather than one each. Never held across a `PUBLISH`.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Publisher {
    pub fn new(client: Client, channel: String) -> Publisher {
        Publisher {
            client,
            channel,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Publishes one message; returns how many subscribers Redis handed it to.
    pub async fn publish(&self, payload: &[u8]) -> Result<u64, BusError> {
        let mut conn = self.connection().await?;
        let sent = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .query_async::<u64>(&mut conn)
            .await;
        if sent.is_err() {
            self.reset().await;
        }
        Ok(sent?)
    }

    /// Forgets the connection: the next publish makes a new one.
    pub async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BusError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}
