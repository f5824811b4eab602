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
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::bus::Bus;
use crate::config::Config;
use crate::drain::Drain;
use crate::http::conn::{http1_builder, serve};
use crate::http::fast::FastPath;
use crate::http::internal::{self, InternalState};
use crate::http::subscribe::{self, Cors, PublicState};
use crate::http::watched::Watched;
use crate::hub::{Hub, HubConfig};
use crate::listen::{accept_loop, bind, default_max_parked};
use crate::metrics::Metrics;
use crate::state_dir::StateDir;

pub use crate::listen::{StartError, raise_open_files_limit};

/// How often expired channels and old positions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// After the drain, how long connections get to finish before we stop waiting.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A bound node: both listeners, the hub and the bus; [`Server::run`] serves until shutdown.
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
        // Everything that can fail but binding comes first: a bad file or Redis URL never
        // leaves a port bound.
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::acceptor)
            .transpose()
            .map_err(StartError::Config)?;
        let metrics = Arc::new(Metrics::new(Registry::new(), config.bus.is_some()));
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
            .bus
            .clone()
            .map(|bus| Bus::new(bus, hub.clone()))
            .transpose()
            .map_err(StartError::Config)?;
        if let Some(dir) = &config.state_dir {
            restore(dir, &hub, bus.as_deref());
        }
        let public = bind(config.listen)?;
        let internal = bind(config.internal_listen)?;
        let public_addr = public
            .local_addr()
            .expect("a bound listener has an address");
        let internal_addr = internal
            .local_addr()
            .expect("a bound listener has an address");
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

    /// The public listener's bound address (the port, when `--listen` asked for 0).
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("bound")
    }

    /// The internal listener's bound address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal.local_addr().expect("bound")
    }

    /// The node's hub, for tests and embedders to inspect.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The publish bus, when `--redis-url` is set.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.as_ref()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        // Moved out field by field: the accept loops' closures take what they need.
        let (config, hub) = (self.config, self.hub);
        let (tls, public_state, internal_state) =
            (self.tls, self.public_state, self.internal_state);
        let sweeper = hub.spawn_sweeper(SWEEP_EVERY);
        let bus = self.bus;
        let saver = config
            .state_dir
            .as_ref()
            .map(|dir| dir.spawn_saver(hub.clone(), bus.clone(), config.state_interval));
        // With a bus, `/readyz` stays 503 until its first read is done.
        let bus_task = bus.clone().map(|bus| tokio::spawn(bus.run()));

        // Three drains, in the order they begin: accepting public connections, the public
        // connections themselves, and the internal listener with its connections.
        let public_accept = Drain::new(None);
        let public_conns = Arc::new(Drain::new(Some(hub.metrics().open_connections.clone())));
        let internal_drain = Arc::new(Drain::new(None));

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
            let timeout = config.header_read_timeout;
            accept_loop(self.public, public_accept.watcher(), move |stream| {
                let drain = conns.watcher();
                // One spawn per kind of connection: a task is as large as its future's largest
                // state, and a parked poll on the fast path must not pay for a TLS handshake.
                match (&tls, &fast) {
                    (None, Some(fast)) => {
                        // Not wrapped in another future: every byte of this task is paid
                        // once per parked poll.
                        tokio::spawn(fast.clone().serve(stream, drain));
                    }
                    (None, None) => {
                        let (stream, client) = Watched::new(stream, Vec::new());
                        let (builder, service) = (
                            builder.clone(),
                            subscribe::service(public_state.clone(), client),
                        );
                        tokio::spawn(async move {
                            serve(&builder, TokioIo::new(stream), service, drain).await;
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
                                    serve(&builder, TokioIo::new(stream), service, drain).await
                                }
                                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                                Err(_) => debug!("TLS handshake timed out"),
                            }
                        });
                    }
                }
            })
        };
        let readiness = internal_state.clone();
        let internal_task = {
            let conns = internal_drain.clone();
            accept_loop(self.internal, internal_drain.watcher(), move |stream| {
                let state = internal_state.clone();
                let drain = conns.watcher();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(internal::handle(req, &state).await) }
                    });
                    serve(&builder, TokioIo::new(stream), service, drain).await;
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
        public_accept.signal();
        let _ = public_task.await;
        // Close keep-alive connections now, not after the spread: an idle one would
        // otherwise bring a poll that is answered `reconnect` at once, and its client would
        // come straight back on the same connection, round and round, instead of going to
        // another node. Connections with a parked poll stay until their answer.
        public_conns.signal();
        let answered = hub.drain(config.drain_period).await;
        info!(
            answered,
            "parked polls answered; waiting for connections to close"
        );
        // The state as the drain left it: every channel, none with a parked poll.
        drop(saver);
        if let Some(dir) = &config.state_dir {
            let (dir, hub, bus) = (dir.clone(), hub.clone(), bus.clone());
            match tokio::task::spawn_blocking(move || dir.save(&hub, bus.as_deref())).await {
                Ok(Ok(())) => info!("state written for the next start"),
                Ok(Err(e)) => warn!(error = %e, "state not written at the drain"),
                Err(e) => warn!(error = %e, "state not written at the drain"),
            }
        }
        if tokio::time::timeout(CLOSE_GRACE, public_conns.all_gone())
            .await
            .is_err()
        {
            warn!(
                open = public_conns.open(),
                "connections still open after the drain; leaving them"
            );
        }
        internal_drain.signal();
        let _ = internal_task.await;
        let _ = tokio::time::timeout(CLOSE_GRACE, internal_drain.all_gone()).await;
        drop(sweeper);
        if let Some(task) = bus_task {
            task.abort();
        }
        info!("drained");
        Ok(())
    }
}

/// Restores what the previous process of this node left in `--state-dir`: its channels
/// (those whose ttl has not run out) and, with a bus, the position to read on from. Without
/// one (or without a usable position) every restored channel is marked pending: nobody
/// knows what was published while the node was down.
fn restore(dir: &StateDir, hub: &Hub, bus: Option<&Bus>) {
    let Some(snapshot) = dir.load() else {
        return;
    };
    let resumed = match (bus, &snapshot.bus_position) {
        (Some(bus), Some(position)) => match bus.resume_from(position) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "the state's bus position is unusable: restored channels are marked pending");
                false
            }
        },
        _ => false,
    };
    let done = hub.restore(&snapshot.hub, !resumed);
    hub.metrics()
        .state_restored_channels
        .set(done.channels as i64);
    info!(
        channels = done.channels,
        skipped = done.skipped,
        positions = done.positions,
        age_ms = crate::hub::now_ms().saturating_sub(snapshot.hub.taken_at_ms),
        bus_position = ?snapshot.bus_position.filter(|_| resumed),
        "state restored"
    );
}
