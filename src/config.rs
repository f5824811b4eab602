//! Command-line flags (each with a `NUDGE_*` environment twin) and their validation. All
//! of it happens before any port is bound: a bad value exits with code 64 and a message
//! that names the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::bus::{BusConfig, RedisConfig};
use crate::hub::{Caps, Limits};
use crate::wire::parse_duration;

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;
/// Far above any machine nudge runs on; a typo of a larger number is refused.
const MAX_WORKER_THREADS: usize = 1024;

/// The flags as clap parses them; [`Config::from_args`] validates them.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "nudge",
    version,
    about = "A long-poll realtime server: parks client polls and wakes them when the main API publishes a change."
)]
pub struct Args {
    /// Public listener: serves only `GET /subscribe`.
    #[arg(long, env = "NUDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Internal listener: the main API's and operators' routes.
    #[arg(long, env = "NUDGE_INTERNAL_LISTEN", default_value = "127.0.0.1:8081")]
    pub internal_listen: SocketAddr,
    /// Base of the channel URLs handed to clients [default: http://<listen>].
    #[arg(long, env = "NUDGE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Channel lifetime without a parked poll: default and maximum.
    #[arg(long, env = "NUDGE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub ttl: Duration,
    /// No poll is parked longer than this: default and maximum.
    #[arg(long, env = "NUDGE_RETRY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub retry_timeout: Duration,
    /// `reconnect` answers a channel gives beyond its first: default and maximum.
    #[arg(long, env = "NUDGE_MAX_RETRIES", default_value_t = 10)]
    pub max_retries: u32,
    /// Parked polls (and held polls) on the node [default: open-files limit minus a reserve].
    #[arg(long, env = "NUDGE_MAX_PARKED")]
    pub max_parked: Option<usize>,
    /// Live channels on the node; one more registration is answered 503 too_many_channels
    /// [default: a quarter of the node's memory / 1 KiB].
    #[arg(long, env = "NUDGE_MAX_CHANNELS")]
    pub max_channels: Option<usize>,
    /// Bytes of distinct topic names bound by live channels (`64MiB`, `1GB` or plain bytes);
    /// past it a registration is answered 503 too_many_channels [default: memory / 16].
    #[arg(long, env = "NUDGE_MAX_TOPIC_BYTES", value_parser = parse_size)]
    pub max_topic_bytes: Option<usize>,
    /// Polls parked on one channel at once; one more is answered 429.
    #[arg(long, env = "NUDGE_MAX_POLLS_PER_CHANNEL", default_value_t = 4)]
    pub max_polls_per_channel: usize,
    /// On SIGTERM/SIGINT, parked polls are answered `reconnect` spread over this period.
    #[arg(long, env = "NUDGE_DRAIN_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub drain_period: Duration,
    /// A client must send its request head within this time.
    #[arg(long, env = "NUDGE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Redis URL of the publish bus shared by several nodes (e.g. redis://127.0.0.1:6379).
    #[arg(long, env = "NUDGE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Sentinels that know the bus's Redis primary (host:port, comma-separated); with
    /// --redis-master-name. --redis-url, if given too, lends its password and database.
    #[arg(long, env = "NUDGE_REDIS_SENTINEL", value_delimiter = ',')]
    pub redis_sentinel: Vec<String>,
    /// The name the sentinels monitor the bus's primary under.
    #[arg(long, env = "NUDGE_REDIS_MASTER_NAME")]
    pub redis_master_name: Option<String>,
    /// Redis stream (key) of the publish bus.
    #[arg(long, env = "NUDGE_REDIS_STREAM", default_value = "nudge:publish")]
    pub redis_stream: String,
    /// Replaced by --redis-stream (the bus is a stream now, not pub/sub): refused.
    #[arg(long, env = "NUDGE_REDIS_CHANNEL", hide = true)]
    pub redis_channel: Option<String>,
    /// Bus entries older than this are trimmed from the stream: a node that was cut off for
    /// longer cannot replay what it missed, and marks every channel pending.
    #[arg(long, env = "NUDGE_BUS_RETENTION", default_value = "10m", value_parser = parse_duration)]
    pub bus_retention: Duration,
    /// At most about this many entries are kept in the stream, however young.
    #[arg(long, env = "NUDGE_BUS_MAX_ENTRIES", default_value_t = 1_000_000)]
    pub bus_max_entries: u64,
    /// After a bus gap that cannot be replayed, parked polls are woken at this many a
    /// second, so that their clients do not call the main API all at once.
    #[arg(long, env = "NUDGE_GAP_WAKE_RATE", default_value_t = 1000)]
    pub gap_wake_rate: u32,
    /// Keep a snapshot of the node's channels and bus position in this directory, and
    /// restore it at start: a node that crashed comes back knowing every channel.
    #[arg(long, env = "NUDGE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often the snapshot in --state-dir is written if anything changed (at most; a
    /// large one waits ten times what it took to write).
    #[arg(long, env = "NUDGE_STATE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub state_interval: Duration,
    /// File holding the bearer token of the internal listener.
    #[arg(long, env = "NUDGE_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,
    /// Origins allowed to long-poll from a browser (repeat, or comma-separate; `*` for any).
    #[arg(long, env = "NUDGE_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Log format.
    #[arg(long, env = "NUDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve plain `GET /subscribe` polls on the buffer-less fast path (hyper serves the
    /// rest); `false` sends everything through hyper.
    #[arg(long, env = "NUDGE_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,
    /// Threads serving connections [default: one per CPU core]. A sidecar may want fewer,
    /// so that it never takes CPU its main API needs.
    #[arg(long, env = "NUDGE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// File to write the process id to at start (removed at exit), so that supervisors and
    /// scripts can follow the node.
    #[arg(long, env = "NUDGE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// On SIGUSR2 (upgrade in place), how long the new binary has to start and take over;
    /// past it this process kills it and keeps serving.
    #[arg(long, env = "NUDGE_UPGRADE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub upgrade_timeout: Duration,
    /// PEM certificate chain: the public listener then speaks HTTPS.
    #[arg(long, env = "NUDGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "NUDGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// How log lines are written to stderr (`--log-format`): `text`, human-readable lines
/// (coloured on a terminal), or `json`, one flattened JSON object per line for collectors.
// Not one doc line per variant: clap prints those in `--help`, changing its layout.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--internal-listen`.
    pub internal_listen: SocketAddr,
    /// `None`: derived from the bound public address.
    pub public_url: Option<String>,
    /// `--ttl`, `--retry-timeout`, `--max-retries`: defaults and maxima per channel.
    pub limits: Limits,
    /// `--max-parked`; `None`: the open-files limit minus a reserve.
    pub max_parked: Option<usize>,
    /// `--max-channels` and `--max-topic-bytes`, defaults resolved from the node's memory.
    pub caps: Caps,
    /// `--max-polls-per-channel`.
    pub max_polls_per_channel: usize,
    /// `--drain-period`.
    pub drain_period: Duration,
    /// `--header-read-timeout`; also bounds how long a body may take.
    pub header_read_timeout: Duration,
    /// `--redis-*` and `--bus-*`; `None`: a single node, no bus.
    pub bus: Option<BusConfig>,
    /// `--state-dir`, checked (it exists or was made, and is writable).
    pub state_dir: Option<crate::state_dir::StateDir>,
    /// `--state-interval`.
    pub state_interval: Duration,
    /// The internal bearer token, read from `--internal-token-file`.
    pub internal_token: Option<Token>,
    /// `--cors-origin`, split at commas.
    pub cors_origins: Vec<String>,
    /// `--log-format`.
    pub log_format: LogFormat,
    /// `--tls-cert` and `--tls-key`: the public listener speaks HTTPS.
    pub tls: Option<TlsFiles>,
    /// `--fast-path`.
    pub fast_path: bool,
    /// `None`: one per core (tokio's default).
    pub worker_threads: Option<usize>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--upgrade-timeout`.
    pub upgrade_timeout: Duration,
}

/// The internal bearer token. Its `Debug` hides it, so that logging a `Config` (or anything
/// holding the token) never writes the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token read from a file or given by a test.
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    /// The token, for a constant-time comparison with a request's.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The PEM files of `--tls-cert` and `--tls-key`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// Private key (`--tls-key`).
    pub key: PathBuf,
}

impl Config {
    /// A configuration for tests and embedding: both listeners on free loopback ports.
    pub fn for_tests() -> Config {
        Config::for_tests_with(&[])
    }

    /// [`Config::for_tests`] with more flags, as on the command line (every other flag at
    /// its default).
    pub fn for_tests_with(flags: &[&str]) -> Config {
        let mut args = vec!["nudge"];
        for listener in ["--listen", "--internal-listen"] {
            if !flags.contains(&listener) {
                args.extend([listener, "127.0.0.1:0"]);
            }
        }
        args.extend_from_slice(flags);
        Config::from_args(Args::parse_from(args)).expect("test flags are valid")
    }

    /// Validates the flags; the error names the flag and the process exits [`EXIT_CONFIG`].
    pub fn from_args(a: Args) -> Result<Config, String> {
        let at_least_1s = |d: Duration, flag: &str| {
            if d < Duration::from_secs(1) {
                Err(format!("--{flag} must be at least 1s"))
            } else {
                Ok(d)
            }
        };
        at_least_1s(a.ttl, "ttl")?;
        at_least_1s(a.retry_timeout, "retry-timeout")?;
        if a.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be more than 0".into());
        }
        if a.max_polls_per_channel == 0 {
            return Err("--max-polls-per-channel must be at least 1".into());
        }
        if a.max_parked == Some(0) {
            return Err("--max-parked must be at least 1".into());
        }
        if a.max_channels == Some(0) {
            return Err("--max-channels must be at least 1".into());
        }
        if a.max_topic_bytes.is_some_and(|b| b < 256) {
            return Err("--max-topic-bytes must be at least 256 (one topic name)".into());
        }
        let derived = Caps::for_this_node();
        let caps = Caps {
            max_channels: a.max_channels.unwrap_or(derived.max_channels),
            max_topic_bytes: a.max_topic_bytes.unwrap_or(derived.max_topic_bytes),
        };
        if a.worker_threads
            .is_some_and(|n| !(1..=MAX_WORKER_THREADS).contains(&n))
        {
            return Err(format!(
                "--worker-threads must be 1 to {MAX_WORKER_THREADS}"
            ));
        }
        if let Some(url) = &a.public_url
            && (!(url.starts_with("http://") || url.starts_with("https://")) || url.contains('?'))
        {
            return Err(format!(
                "--public-url must be an http:// or https:// base URL without a query, got {url:?}"
            ));
        }
        if let Some(url) = &a.redis_url {
            if url.starts_with("rediss://") {
                return Err(
                    "--redis-url: rediss:// (TLS to Redis) is not supported by this build; \
                     reach Redis over a private network, or through a TLS tunnel with redis://"
                        .into(),
                );
            }
            if !["redis://", "unix://"].iter().any(|s| url.starts_with(s)) {
                // Not repeated: the URL may hold a password.
                return Err("--redis-url must start with redis:// or unix://".into());
            }
        }
        if let Some(url) = &a.redis_url {
            crate::bus::check_url(url)?;
        }
        let bus = bus_config(&a)?;
        if a.state_interval < Duration::from_millis(100) {
            return Err("--state-interval must be at least 100ms".into());
        }
        let state_dir = a
            .state_dir
            .as_deref()
            .map(crate::state_dir::StateDir::open)
            .transpose()?;
        let internal_token = match &a.internal_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--internal-token-file {}: {e}", path.display()))?;
                let token = text.trim().to_owned();
                if token.len() < 16 {
                    return Err(format!(
                        "--internal-token-file {}: the token must be at least 16 characters",
                        path.display()
                    ));
                }
                Some(Token::new(token))
            }
        };
        if internal_token.is_none() && !a.internal_listen.ip().is_loopback() {
            return Err(format!(
                "--internal-listen {} is not a loopback address: set --internal-token-file",
                a.internal_listen
            ));
        }
        for origin in &a.cors_origin {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(format!(
                    "--cors-origin {origin:?} must be * or an origin like https://app.example.com"
                ));
            }
        }
        let tls = match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        Ok(Config {
            listen: a.listen,
            internal_listen: a.internal_listen,
            public_url: a.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            limits: Limits {
                ttl: a.ttl,
                retry_timeout: a.retry_timeout,
                max_retries: a.max_retries,
            },
            max_parked: a.max_parked,
            caps,
            max_polls_per_channel: a.max_polls_per_channel,
            drain_period: a.drain_period,
            header_read_timeout: a.header_read_timeout,
            bus,
            state_dir,
            state_interval: a.state_interval,
            internal_token,
            cors_origins: a
                .cors_origin
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_owned())
                .collect(),
            log_format: a.log_format,
            tls,
            fast_path: a.fast_path,
            worker_threads: a.worker_threads,
            pid_file: a.pid_file,
            upgrade_timeout: a.upgrade_timeout,
        })
    }
}

/// The bus's settings, or `None` for a node on its own.
fn bus_config(a: &Args) -> Result<Option<BusConfig>, String> {
    if a.redis_channel.is_some() {
        return Err(
            "--redis-channel (NUDGE_REDIS_CHANNEL) is replaced by --redis-stream: the bus \
             is a Redis stream now, and a main API that published into Redis must XADD instead \
             (docs/scaling-out.md)"
                .into(),
        );
    }
    let redis = match (&a.redis_sentinel[..], &a.redis_master_name) {
        ([], None) => match &a.redis_url {
            None => return Ok(None),
            Some(url) => RedisConfig::Url(url.clone()),
        },
        ([], Some(_)) => return Err("--redis-master-name needs --redis-sentinel".into()),
        (_, None) => return Err("--redis-sentinel needs --redis-master-name".into()),
        (sentinels, Some(name)) => {
            for s in sentinels {
                let port = s.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
                if !matches!(port, Some(Ok(p)) if p > 0) {
                    return Err(format!("--redis-sentinel {s:?} must be host:port"));
                }
            }
            if name.is_empty() {
                return Err("--redis-master-name must not be empty".into());
            }
            RedisConfig::Sentinel {
                sentinels: sentinels.to_vec(),
                master_name: name.clone(),
                url: a.redis_url.clone(),
            }
        }
    };
    if a.redis_stream.is_empty() {
        return Err("--redis-stream must not be empty".into());
    }
    if a.bus_retention < Duration::from_secs(1) {
        return Err("--bus-retention must be at least 1s".into());
    }
    if a.bus_max_entries < 1000 {
        return Err("--bus-max-entries must be at least 1000".into());
    }
    if a.gap_wake_rate == 0 {
        return Err("--gap-wake-rate must be at least 1 (polls a second)".into());
    }
    Ok(Some(BusConfig {
        redis,
        stream: a.redis_stream.clone(),
        retention: a.bus_retention,
        max_entries: a.bus_max_entries,
        gap_wake_rate: a.gap_wake_rate,
    }))
}

/// A size in bytes: plain digits, or a number with `KB`/`MB`/`GB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB` (powers of 1024); case and a space before the unit don't matter.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?}: use bytes, or a number with KB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number of bytes, e.g. 64MiB"))?;
    n.checked_mul(scale)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["nudge"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).map_err(|e| e.to_string())?)
    }

    #[test]
    fn defaults_run_a_loopback_node() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.internal_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.limits.ttl, Duration::from_secs(600));
        assert_eq!(c.limits.retry_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.max_retries, 10);
        assert_eq!(c.max_polls_per_channel, 4);
        assert_eq!(c.drain_period, Duration::from_secs(10));
        assert_eq!(c.bus, None);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let dir = std::env::temp_dir().join(format!("nudge-cfg-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  a-token-that-is-long-enough\n").unwrap();
        let c = parse(&["--internal-token-file", file.to_str().unwrap()]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            c.internal_token.as_ref().unwrap().as_bytes(),
            b"a-token-that-is-long-enough",
            "read and trimmed"
        );
        assert!(!format!("{c:?}").contains("a-token"));
    }

    #[test]
    fn sizes_are_bytes_or_si_or_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64 mib").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("10kb").unwrap(), 10_000);
        for bad in [
            "",
            "MiB",
            "1.5GiB",
            "-1",
            "64 parsecs",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let c = parse(&["--max-channels", "7", "--max-topic-bytes", "1KiB"]).unwrap();
        assert_eq!((c.caps.max_channels, c.caps.max_topic_bytes), (7, 1024));
        let d = parse(&[]).unwrap().caps;
        assert!(
            d.max_channels >= 10_000 && d.max_topic_bytes >= 16 << 20,
            "{d:?}"
        );
        assert!(
            parse(&["--max-channels", "0"])
                .unwrap_err()
                .contains("--max-channels")
        );
        assert!(
            parse(&["--max-topic-bytes", "12"])
                .unwrap_err()
                .contains("--max-topic-bytes")
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flag, value, named) in [
            ("--ttl", "0s", "--ttl"),
            ("--retry-timeout", "abc", "--retry-timeout"),
            ("--max-polls-per-channel", "0", "--max-polls-per-channel"),
            ("--internal-listen", "0.0.0.0:8081", "--internal-token-file"),
            ("--public-url", "ftp://x", "--public-url"),
            ("--worker-threads", "0", "--worker-threads"),
        ] {
            let error = parse(&[flag, value]).unwrap_err();
            assert!(error.contains(named), "{flag} {value}: {error}");
        }
        assert_eq!(
            parse(&["--worker-threads", "1"]).unwrap().worker_threads,
            Some(1)
        );
        let tls = parse(&["--redis-url", "rediss://:secret@redis.internal:6380"]).unwrap_err();
        assert!(
            tls.contains("rediss://") && !tls.contains("secret"),
            "{tls}"
        );
        for url in ["redis://", "redis://127.0.0.1/notadb", "http://:secret@x"] {
            assert!(
                parse(&["--redis-url", url])
                    .unwrap_err()
                    .contains("--redis-url")
            );
            assert!(!parse(&["--redis-url", url]).unwrap_err().contains("secret"));
        }
        assert!(parse(&["--redis-url", "redis://:secret@127.0.0.1:6379/2"]).is_ok());
    }
}
