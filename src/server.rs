//! Listeners, connections and the drain. `Server::bind` binds both listeners (port 0 picks
//! a free port) and logs each bound address on its own line; `Server::run` serves until the
//! shutdown future resolves, then drains (SPEC §6):
//! `/readyz` turns 503 → the public listener stops accepting → every public connection is
//! told to close (idle keep-alive ones close at once, the others after their answer, with
//! `Connection: close`) → every parked poll is answered `reconnect`, spread over the drain
//! period → the last connections close → return.
//!
//! hyper's graceful shutdown only waits for the request in flight, and a parked poll *is*
//! a request in flight: that is why the hub answers every parked poll, and only then do we
//! wait for the connections to be gone.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::bus::Bus;
use crate::config::Config;
use crate::http::fast::FastPath;
use crate::http::internal::{self, InternalState};
use crate::http::subscribe::{self, Cors, PublicState};
use crate::http::watched::Watched;
use crate::hub::{Hub, HubConfig};
use crate::metrics::Metrics;

/// Largest request head (line + headers) hyper buffers; past it hyper answers 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How often expired channels and old positions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// After the drain, how long connections get to finish before we stop waiting.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Open files kept back from `--max-parked` for the internal listener, Redis, logs.
const FD_RESERVE: u64 = 256;
/// Accept backlog asked of the kernel (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

pub struct Server {
    config: Config,
    public: TcpListener,
    internal: TcpListener,
    tls: Option<TlsAcceptor>,
    hub: Arc<Hub>,
    bus: Option<Arc<Bus>>,
    public_state: Arc<PublicState>,
    internal_state: Arc<InternalState>,
}

impl Server {
    /// Binds both listeners and builds the hub. Logs `listening public=ADDR` and
    /// `listening internal=ADDR`.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::acceptor)
            .transpose()
            .map_err(StartError::Config)?;
        let public = bind(config.listen)?;
        let internal = bind(config.internal_listen)?;
        let public_addr = public
            .local_addr()
            .expect("a bound listener has an address");
        let internal_addr = internal
            .local_addr()
            .expect("a bound listener has an address");

        let metrics = Arc::new(Metrics::new(Registry::new(), config.redis_url.is_some()));
        let fd_allows = default_max_parked();
        let max_parked = config.max_parked.unwrap_or(fd_allows);
        if max_parked > fd_allows {
            warn!(
                max_parked,
                open_files_allow = fd_allows,
                "--max-parked is above what the open-files limit allows: accepts will fail first"
            );
        }
        let hub = Hub::with_caps(
            HubConfig {
                limits: config.limits,
                max_polls_per_channel: config.max_polls_per_channel,
                max_parked,
            },
            config.caps,
            metrics,
        );
        let bus = config
            .redis_url
            .as_deref()
            .map(|url| Bus::new(url, &config.redis_channel, hub.clone()))
            .transpose()
            .map_err(StartError::Config)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{public_addr}"));
        let public_state = Arc::new(PublicState {
            hub: hub.clone(),
            cors: Cors::new(config.cors_origins.clone()),
        });
        let internal_state = Arc::new(InternalState {
            hub: hub.clone(),
            public_url: public_url.clone(),
            token: config.internal_token.clone(),
            ready: Default::default(),
            bus: bus.clone(),
            body_timeout: config.header_read_timeout,
        });
        info!(public = %public_addr, "listening");
        info!(internal = %internal_addr, "listening");
        info!(%public_url, max_parked, tls = tls.is_some(), bus = bus.is_some(), "configured");
        Ok(Server {
            config,
            public,
            internal,
            tls,
            hub,
            bus,
            public_state,
            internal_state,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("bound")
    }

    pub fn internal_addr(&self) -> SocketAddr {
        self.internal.local_addr().expect("bound")
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The publish bus, when `--redis-url` is set.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.as_ref()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Server {
            config,
            public,
            internal,
            tls,
            hub,
            bus,
            public_state,
            internal_state,
        } = self;
        let sweeper = tokio::spawn(hub.clone().sweeper(SWEEP_EVERY));
        // With a bus, `/readyz` stays 503 until its first subscription is up.
        let bus_task = bus.map(|bus| tokio::spawn(bus.run()));

        let (stop_public, stop_public_rx) = watch::channel(false);
        let (close_public, close_public_rx) = watch::channel(false);
        let (stop_internal, stop_internal_rx) = watch::channel(false);
        let public_conns = Arc::new(Connections::default());
        let internal_conns = Arc::new(Connections::default());

        let builder = http1_builder(config.header_read_timeout);
        // TLS connections are decrypted by rustls, so hyper serves them all.
        let fast = match (&tls, config.fast_path) {
            (None, true) => Some(Arc::new(
                FastPath::new(
                    public_state.clone(),
                    builder.clone(),
                    config.header_read_timeout,
                )
                .await,
            )),
            _ => None,
        };
        let public_task = {
            let conns = public_conns.clone();
            let builder = builder.clone();
            let metrics = hub.metrics().clone();
            let timeout = config.header_read_timeout;
            accept_loop(public, stop_public_rx, move |stream| {
                let guard = (conns.open(), OpenConnection::count(&metrics));
                let close = close_public_rx.clone();
                // One spawn per kind of connection: a task is as large as its future's largest
                // state, and a parked poll on the fast path must not pay for a TLS handshake.
                match (&tls, &fast) {
                    (None, Some(fast)) => {
                        // Not wrapped in another future: every byte of this task is paid
                        // once per parked poll.
                        tokio::spawn(fast.clone().serve(stream, close, guard));
                    }
                    (None, None) => {
                        let (stream, client) = Watched::new(stream, Vec::new());
                        let (builder, service) = (
                            builder.clone(),
                            subscribe::service(public_state.clone(), client),
                        );
                        tokio::spawn(async move {
                            serve(&builder, TokioIo::new(stream), service, close).await;
                            drop(guard);
                        });
                    }
                    (Some(tls), _) => {
                        // The watch sits under TLS: it sees the client's FIN or RST, and the
                        // bytes it reads meanwhile are decrypted later, in order.
                        let (stream, client) = Watched::new(stream, Vec::new());
                        let (builder, service) = (
                            builder.clone(),
                            subscribe::service(public_state.clone(), client),
                        );
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(timeout, tls.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    serve(&builder, TokioIo::new(stream), service, close).await
                                }
                                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                                Err(_) => debug!("TLS handshake timed out"),
                            }
                            drop(guard);
                        });
                    }
                }
            })
        };
        let readiness = internal_state.clone();
        let internal_task = {
            let conns = internal_conns.clone();
            let close = stop_internal_rx.clone();
            accept_loop(internal, stop_internal_rx, move |stream| {
                let state = internal_state.clone();
                let guard = conns.open();
                let close = close.clone();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(internal::handle(req, &state).await) }
                    });
                    serve(&builder, TokioIo::new(stream), service, close).await;
                    drop(guard);
                });
            })
        };
        let public_task = tokio::spawn(public_task);
        let internal_task = tokio::spawn(internal_task);
        // Listening on both: ready (until the drain begins).
        readiness
            .ready
            .store(true, std::sync::atomic::Ordering::Release);

        shutdown.await;
        info!(drain_period = ?config.drain_period, "draining");
        hub.begin_drain();
        let _ = stop_public.send(true);
        let _ = public_task.await;
        // Close keep-alive connections now, not after the spread: an idle one would
        // otherwise bring a poll that is answered `reconnect` at once, and its client would
        // come straight back on the same connection, round and round, instead of going to
        // another node. Connections with a parked poll stay until their answer.
        let _ = close_public.send(true);
        let answered = hub.drain(config.drain_period).await;
        info!(
            answered,
            "parked polls answered; waiting for connections to close"
        );
        if tokio::time::timeout(CLOSE_GRACE, public_conns.all_closed())
            .await
            .is_err()
        {
            warn!(
                open = public_conns.count(),
                "connections still open after the drain; leaving them"
            );
        }
        let _ = stop_internal.send(true);
        let _ = internal_task.await;
        let _ = tokio::time::timeout(CLOSE_GRACE, internal_conns.all_closed()).await;
        sweeper.abort();
        if let Some(task) = bus_task {
            task.abort();
        }
        info!("drained");
        Ok(())
    }
}

fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    // Without a timer, hyper silently ignores header_read_timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // max_buf_size alone is no limit on the head: hyper checks it only between reads,
        // and a big head that arrives in a few large reads gets parsed whole. This is the
        // exact check (431, then close).
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

pub(crate) async fn serve<I, S>(
    builder: &http1::Builder,
    io: I,
    service: S,
    mut close: watch::Receiver<bool>,
) where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<crate::http::Body>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                debug!(error = %e, "connection ended with an error");
            }
        }
        _ = became_true(&mut close) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
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
                        _ = became_true(&mut stop) => break,
                    }
                }
            },
            _ = became_true(&mut stop) => break,
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
        if self.since_warning > 0 || self.last_warning.is_some() {
            info!(
                failures_since_warning = self.since_warning,
                "accepting again"
            );
        }
        *self = AcceptFailures {
            last_warning: self.last_warning,
            ..AcceptFailures::default()
        };
    }
}

/// Resolves once the flag is (or was already) set, or its sender is gone.
pub(crate) async fn became_true(flag: &mut watch::Receiver<bool>) {
    while !*flag.borrow_and_update() {
        if flag.changed().await.is_err() {
            return;
        }
    }
}

/// Holds `nudge_open_connections` up while a public connection is open.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn count(metrics: &Metrics) -> OpenConnection {
        metrics.open_connections.inc();
        OpenConnection(metrics.open_connections.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts open connections so the drain can wait for the last one.
#[derive(Default)]
struct Connections {
    open: AtomicUsize,
    closed: Notify,
}

struct ConnectionGuard(Arc<Connections>);

impl Connections {
    fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }
    fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// Binds with a deep accept backlog: a burst of reconnects after a drain or a deploy should
/// queue in the kernel (up to `net.core.somaxconn`), not be refused. tokio's default is 1024.
fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
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
fn default_max_parked() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    soft.saturating_sub(FD_RESERVE).max(1) as usize
}

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
pub fn raise_open_files_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}
