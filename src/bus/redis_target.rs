//! Where the bus's Redis is: one `--redis-url`, or the primary that `--redis-sentinel`'s
//! sentinels name for `--redis-master-name`. Every connection is asked for afresh, so a
//! reconnect after a failover lands on the new primary.
//!
//! Connections are named (`CLIENT SETNAME nudge:<host>:<node>:<role>`) so that an
//! operator can tell a tier's readers and writers apart in `CLIENT LIST`.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use super::BusError;
use super::resp::Conn;

/// How long a TCP connect and the handshake may take, to Redis or to a sentinel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis the bus talks to, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisConfig {
    /// `--redis-url`.
    Url(String),
    /// `--redis-sentinel` and `--redis-master-name`; `--redis-url`, when given too, lends
    /// its user, password and database to the primary (its host is not used).
    Sentinel {
        /// `host:port` of each sentinel, asked in turn.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the primary under.
        master_name: String,
        /// `--redis-url`, for credentials and database.
        url: Option<String>,
    },
}

/// Checks a `--redis-url` as the client will read it (host, port, database, and whether
/// this build can speak its scheme). The error never repeats the URL, which may hold a
/// password.
pub fn check_url(url: &str) -> Result<(), String> {
    Client::open(url)
        .map(drop)
        .map_err(|e| format!("--redis-url: {e}"))
}

/// Resolves and opens connections to the primary.
pub(super) struct Target {
    kind: Kind,
    /// `nudge:<host>:<node>`, completed with the connection's role.
    name_prefix: String,
}

enum Kind {
    Fixed(Client),
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
        base: ConnectionInfo,
    },
}

impl Target {
    pub(super) fn new(config: &RedisConfig, node_id: &str) -> Result<Target, String> {
        let kind = match config {
            RedisConfig::Url(url) => {
                Kind::Fixed(Client::open(url.as_str()).map_err(|e| format!("--redis-url: {e}"))?)
            }
            RedisConfig::Sentinel {
                sentinels,
                master_name,
                url,
            } => Kind::Sentinel {
                sentinels: sentinels.clone(),
                master_name: master_name.clone(),
                base: url
                    .as_deref()
                    .unwrap_or("redis://127.0.0.1")
                    .into_connection_info()
                    .map_err(|e| format!("--redis-url: {e}"))?,
            },
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().replace(|c: char| !c.is_ascii_graphic(), "_"))
            .unwrap_or_else(|_| "host".into());
        Ok(Target {
            kind,
            name_prefix: format!("nudge:{host}:{node_id}"),
        })
    }

    /// A connection to the primary, named for `role`, whose every reply must come within
    /// `response_timeout` (the reader's blocking reads included: that is how a wedged
    /// connection is caught).
    pub(super) async fn connect(
        &self,
        role: &str,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, BusError> {
        let config = config(response_timeout);
        let mut conn = match &self.kind {
            Kind::Fixed(client) => {
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
            Kind::Sentinel {
                sentinels,
                master_name,
                base,
            } => {
                via_sentinels(sentinels, master_name, |sentinel| async {
                    let (info, named) =
                        primary_named_by(sentinel, master_name, base, &config).await?;
                    let mut primary = Client::open(info)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    let role: Vec<redis::Value> =
                        redis::cmd("ROLE").query_async(&mut primary).await?;
                    check_primary(&role, sentinel, &named)?;
                    Ok(primary)
                })
                .await?
            }
        };
        self.name_command(role).query_async::<()>(&mut conn).await?;
        Ok(conn)
    }

    /// The reader's connection to the primary ([`Conn`]: its `XREAD` replies are read
    /// without the `redis` crate's parser), named for `role`, with the same timeouts and
    /// the same check that a sentinel's answer is a primary as [`Target::connect`].
    pub(super) async fn connect_reader(
        &self,
        role: &str,
        response_timeout: Duration,
    ) -> Result<Conn, BusError> {
        let mut conn = match &self.kind {
            Kind::Fixed(client) => {
                Conn::open(
                    client.get_connection_info(),
                    CONNECT_TIMEOUT,
                    response_timeout,
                )
                .await?
            }
            Kind::Sentinel {
                sentinels,
                master_name,
                base,
            } => {
                let config = config(response_timeout);
                via_sentinels(sentinels, master_name, |sentinel| async {
                    let (info, named) =
                        primary_named_by(sentinel, master_name, base, &config).await?;
                    let mut primary = Conn::open(&info, CONNECT_TIMEOUT, response_timeout).await?;
                    let role: Vec<redis::Value> = primary.query(&redis::cmd("ROLE")).await?;
                    check_primary(&role, sentinel, &named)?;
                    Ok(primary)
                })
                .await?
            }
        };
        conn.query::<()>(&self.name_command(role)).await?;
        Ok(conn)
    }

    /// `CLIENT SETNAME` for a connection of `role`, so that operators can tell this node's
    /// connections apart in `CLIENT LIST`.
    fn name_command(&self, role: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("SETNAME")
            .arg(format!("{}:{role}", self.name_prefix));
        cmd
    }
}

/// The connection settings of every connection to Redis or a sentinel.
fn config(response_timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
}

/// Asks each sentinel in turn (`open`: where is the primary, and connect to it), and keeps
/// the first connection whose server says it is a primary (a sentinel may not have seen a
/// failover yet); the last refusal otherwise.
async fn via_sentinels<'a, C, Open, Opened>(
    sentinels: &'a [String],
    master_name: &str,
    mut open: Open,
) -> Result<C, BusError>
where
    Open: FnMut(&'a str) -> Opened,
    Opened: Future<Output = Result<C, BusError>>,
{
    let mut last = BusError::NoPrimary(format!("no sentinel named a primary for {master_name:?}"));
    for sentinel in sentinels {
        match open(sentinel).await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Where `sentinel` says the primary is: its connection info (`base`'s credentials and
/// database) and its `host:port`.
async fn primary_named_by(
    sentinel: &str,
    master_name: &str,
    base: &ConnectionInfo,
    config: &AsyncConnectionConfig,
) -> Result<(ConnectionInfo, String), BusError> {
    let client = Client::open(format!("redis://{sentinel}"))?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(config)
        .await?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master_name)
        .query_async(&mut conn)
        .await?;
    let Some((host, port)) = addr else {
        return Err(BusError::NoPrimary(format!(
            "sentinel {sentinel} does not monitor {master_name:?}"
        )));
    };
    let info = base
        .clone()
        .set_addr(ConnectionAddr::Tcp(host.clone(), port));
    Ok((info, format!("{host}:{port}")))
}

/// A `ROLE` reply that is not a primary's: the sentinel has not seen the failover yet.
fn check_primary(role: &[redis::Value], sentinel: &str, named: &str) -> Result<(), BusError> {
    match role.first() {
        Some(redis::Value::BulkString(r)) if r == b"master" => Ok(()),
        _ => Err(BusError::NoPrimary(format!(
            "sentinel {sentinel} names {named}, which is not a primary (yet)"
        ))),
    }
}
