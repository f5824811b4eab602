//! Redis Sentinel on loopback, for real: a primary, a replica and three sentinels
//! (`redis-server <conf> --sentinel`, the same binary Debian's `redis-sentinel` runs), each
//! in its own directory, all killed on drop. Failovers are fast: a primary is down after
//! 1 s without answers, and two sentinels must agree.

use std::time::Duration;

use tokio::time::Instant;

use crate::redis::RedisServer;

/// A primary, a replica and three sentinels watching them under one name.
pub struct Sentinels {
    /// The name the sentinels monitor the primary under (`--redis-master-name`).
    pub name: String,
    servers: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl Sentinels {
    /// Starts them all and waits until every sentinel knows the replica and the other
    /// sentinels, so that a failover can happen.
    pub async fn start(name: &str) -> Result<Sentinels, String> {
        let primary = RedisServer::start("redis-server").await?;
        let replica_port = crate::free_port();
        let mut replica = RedisServer::on("redis-server", replica_port).with_args(&[
            "--replicaof",
            "127.0.0.1",
            &primary.port().to_string(),
        ]);
        if !replica.launch().await? {
            return Err(format!("replica: port {replica_port} was taken"));
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = crate::free_port();
            let mut sentinel = RedisServer::on("redis-server", port)
                .with_config(&format!(
                    "sentinel monitor {name} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 5000\n\
                     sentinel parallel-syncs {name} 1\n",
                    primary.port()
                ))
                .with_args(&["--sentinel"]);
            if !sentinel.launch().await? {
                return Err(format!("sentinel: port {port} was taken"));
            }
            sentinels.push(sentinel);
        }
        let set = Sentinels {
            name: name.to_owned(),
            servers: vec![primary, replica],
            sentinels,
        };
        set.wait_until(
            "every sentinel knows the replica and two other sentinels",
            Duration::from_secs(20),
            || async {
                for s in &set.sentinels {
                    let Ok(info) =
                        query::<Vec<redis::Value>>(s.port(), &["SENTINEL", "MASTER", &set.name])
                            .await
                    else {
                        return false;
                    };
                    let field = |name: &str| {
                        info.chunks(2).find_map(|kv| match kv {
                            [redis::Value::BulkString(k), redis::Value::BulkString(v)]
                                if k == name.as_bytes() =>
                            {
                                String::from_utf8(v.clone()).ok()
                            }
                            _ => None,
                        })
                    };
                    if field("num-slaves").as_deref() != Some("1")
                        || field("num-other-sentinels").as_deref() != Some("2")
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await?;
        Ok(set)
    }

    /// `host:port` of every sentinel, comma-separated, as `--redis-sentinel` takes them.
    pub fn sentinel_addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary, as the first sentinel that answers names it.
    pub async fn primary_port(&self) -> Result<u16, String> {
        for s in &self.sentinels {
            if let Ok(Some((_, port))) = query::<Option<(String, u16)>>(
                s.port(),
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name],
            )
            .await
            {
                return Ok(port);
            }
        }
        Err("no sentinel named a primary".into())
    }

    /// Waits until the running replica is linked to the primary and at most 16 KiB of the
    /// replication stream behind it (under load it is never exactly level).
    pub async fn wait_in_sync(&self, within: Duration) -> Result<(), String> {
        let primary = self.primary_port().await?;
        self.wait_until("the replica in sync with the primary", within, || async {
            let replication = |port: u16| async move {
                let info = query::<String>(port, &["INFO", "REPLICATION"]).await.ok()?;
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .map(|v| v.trim().to_owned())
                };
                Some((
                    field("master_link_status"),
                    field("master_repl_offset")?.parse::<u64>().ok()?,
                ))
            };
            let Some((_, want)) = replication(primary).await else {
                return false;
            };
            for s in self
                .servers
                .iter()
                .filter(|s| s.pid().is_some() && s.port() != primary)
            {
                match replication(s.port()).await {
                    Some((Some(link), have))
                        if link == "up" && want.saturating_sub(have) <= 16 * 1024 => {}
                    _ => return false,
                }
            }
            true
        })
        .await
    }

    /// SIGKILLs the server on `port` (a primary dies without a word).
    pub fn kill(&mut self, port: u16) {
        for s in self.servers.iter_mut().filter(|s| s.port() == port) {
            s.kill();
        }
    }

    /// Waits until the sentinels name a primary other than `old` and that server says
    /// `ROLE master`; returns its port.
    pub async fn wait_failover(&self, old: u16, within: Duration) -> Result<u16, String> {
        let until = Instant::now() + within;
        loop {
            if let Ok(port) = self.primary_port().await
                && port != old
                && matches!(
                    query::<Vec<redis::Value>>(port, &["ROLE"]).await.as_deref(),
                    Ok([redis::Value::BulkString(r), ..]) if r == b"master"
                )
            {
                return Ok(port);
            }
            if Instant::now() > until {
                return Err(format!(
                    "the sentinels promoted no replica within {within:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until<F, Fut>(
        &self,
        what: &str,
        within: Duration,
        mut check: F,
    ) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let until = Instant::now() + within;
        loop {
            if check().await {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(format!("{what}: not within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One command to the server on `port`, on a connection of its own.
pub async fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
}
