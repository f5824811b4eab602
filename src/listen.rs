//! Listening and accepting: binding with a deep backlog, the accept loop and its backoff
//! when the open-files limit is reached, and the open-files limit itself.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn};

use crate::drain::Watcher;

/// Open files kept back from `--max-parked` for the internal listener, Redis, logs.
const FD_RESERVE: u64 = 256;
/// Accept backlog asked of the kernel (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 65_535;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A bad file or setting found at start: the process exits
    /// [`EXIT_CONFIG`](crate::config::EXIT_CONFIG).
    #[error("{0}")]
    Config(String),
    /// A listener's address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the OS refused it (in use, not permitted, no such address).
        source: io::Error,
    },
}

/// Accepts connections until `stop` is signalled; a failed accept (EMFILE) makes it
/// back off and warn, not end.
/// The listener is shared: stopping the loop leaves it open (an upgrade in place hands it
/// on, or accepts on it again).
pub(crate) async fn accept_loop(
    listener: std::sync::Arc<TcpListener>,
    mut stop: Watcher,
    on_connection: impl Fn(TcpStream),
) {
    let mut failing = AcceptFailures::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failing.recovered();
                    let _ = stream.set_nodelay(true);
                    on_connection(stream);
                }
                Err(e) => {
                    // EMFILE and friends: the pending connection stays in the backlog, so
                    // accepting again at once would spin. Wait, longer each time, while the
                    // connections already open (parked polls among them) go on as they were.
                    let pause = failing.failed(&e, listener.local_addr().ok());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.signaled() => break,
                    }
                }
            },
            _ = stop.signaled() => break,
        }
    }
}

/// The accept loop's backoff and its log: one warning per [`ACCEPT_WARN_EVERY`], saying how
/// many accepts failed since the last one, instead of a line per failure.
#[derive(Default)]
struct AcceptFailures {
    pause: Duration,
    since_warning: u64,
    last_warning: Option<tokio::time::Instant>,
}

/// First and longest wait after a failed accept.
const ACCEPT_PAUSE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

impl AcceptFailures {
    fn failed(&mut self, error: &io::Error, listener: Option<SocketAddr>) -> Duration {
        self.since_warning += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_WARN_EVERY)
        {
            warn!(
                %error,
                listener = ?listener,
                failures = self.since_warning,
                "accept failed; backing off (raise the open-files limit or lower --max-parked)"
            );
            self.last_warning = Some(now);
            self.since_warning = 0;
        }
        self.pause = (self.pause * 2).clamp(ACCEPT_PAUSE.0, ACCEPT_PAUSE.1);
        self.pause
    }

    fn recovered(&mut self) {
        if self.pause.is_zero() {
            return;
        }
        // A pause means an accept failed, and the first failure always warns: say it ended.
        info!(
            failures_since_warning = self.since_warning,
            "accepting again"
        );
        *self = AcceptFailures {
            last_warning: self.last_warning,
            ..AcceptFailures::default()
        };
    }
}

/// Binds with a deep accept backlog: a burst of reconnects after a drain or a deploy should
/// queue in the kernel (up to `net.core.somaxconn`), not be refused. tokio's default is 1024.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// The open-files limit minus a reserve: each parked poll holds one socket.
pub fn default_max_parked() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    soft.saturating_sub(FD_RESERVE).max(1) as usize
}

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
pub fn raise_open_files_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}
