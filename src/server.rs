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
use crate::http::conn::{Between, Handoff, http1_builder, serve, serve_movable};
use crate::http::fast::{FastPath, Moved};
use crate::http::internal::{self, InternalState};
use crate::http::subscribe::{self, Cors, PublicState};
use crate::http::watched::Watched;
use crate::hub::{Hub, HubConfig};
use crate::listen::{accept_loop, bind, default_max_parked};
use crate::metrics::Metrics;
use crate::signal::Upgrades;
use crate::state_dir::StateDir;
use crate::upgrade::{Outgoing, Received, Role, Upgrade, WireConn, raw};

pub use crate::listen::{StartError, raise_open_files_limit};

/// How often expired channels and old positions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// After the drain, how long connections get to finish before we stop waiting.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A bound node: both listeners, the hub and the bus; [`Server::run`] serves until shutdown.
pub struct Server {
    config: Config,
    public: Arc<TcpListener>,
    internal: Arc<TcpListener>,
    tls: Option<TlsAcceptor>,
    hub: Arc<Hub>,
    bus: Option<Arc<Bus>>,
    public_state: Arc<PublicState>,
    internal_state: Arc<InternalState>,
    /// Connections handed over by the process this one took over from: the fast path's,
    /// and the internal API's.
    adopted: Vec<Moved>,
    adopted_internal: Vec<Between>,
    /// `SIGUSR2`, when this node upgrades in place (`main` installs it).
    upgrades: Option<Upgrades>,
}

impl Server {
    /// Binds both listeners and builds the hub. Logs `listening public=ADDR` and
    /// `listening internal=ADDR`.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        Server::build(config, None).await
    }

    /// Builds a node from what an older process handed over (an upgrade in place): its
    /// listeners, its connections, its hub's state and its bus position. Binds nothing.
    pub async fn inherit(config: Config, received: Received) -> Result<Server, StartError> {
        Server::build(config, Some(received)).await
    }

    async fn build(config: Config, received: Option<Received>) -> Result<Server, StartError> {
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
        let (mut adopted, mut adopted_internal) = (Vec::new(), Vec::new());
        let (public, internal) = match received {
            None => {
                if let Some(dir) = &config.state_dir {
                    restore(dir, &hub, bus.as_deref());
                }
                (bind(config.listen)?, bind(config.internal_listen)?)
            }
            Some(received) => {
                let inherited = crate::upgrade::restore(received, &hub, bus.as_deref())
                    .map_err(StartError::Config)?;
                adopted = inherited.conns;
                adopted_internal = inherited.internal_conns;
                (inherited.public, inherited.internal)
            }
        };
        let (public, internal) = (Arc::new(public), Arc::new(internal));
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
            adopted,
            adopted_internal,
            upgrades: None,
        })
    }

    /// Upgrades in place at every `SIGUSR2` (see [`crate::upgrade`]).
    pub fn with_upgrades(mut self, upgrades: Upgrades) -> Server {
        self.upgrades = Some(upgrades);
        self
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

    /// Serves until `shutdown` resolves, then drains and returns. With
    /// [`Server::with_upgrades`], a `SIGUSR2` hands everything to a new process and returns
    /// once it has taken over (or, if it fails, goes on serving as before).
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
            adopted,
            adopted_internal,
            mut upgrades,
        } = self;
        let sweeper = hub.spawn_sweeper(SWEEP_EVERY);
        let saver = config
            .state_dir
            .as_ref()
            .map(|dir| dir.spawn_saver(hub.clone(), bus.clone(), config.state_interval));
        // With a bus, `/readyz` stays 503 until its first read is done.
        let mut bus_task = bus.clone().map(|bus| tokio::spawn(bus.run()));

        // Public connections live across accept rounds (an upgrade that fails stops and
        // restarts accepting, never the connections).
        let public_conns = Arc::new(Drain::new(Some(hub.metrics().open_connections.clone())));
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
        if !adopted.is_empty() {
            info!(
                connections = adopted.len(),
                "serving the connections handed over"
            );
        }
        for moved in adopted {
            match &fast {
                Some(fast) => fast.adopt(moved, public_conns.watcher()),
                // This binary has no fast path (TLS, or --fast-path false): the connection
                // is closed, and its client comes back.
                None => drop(moved),
            }
        }
        let acceptor = Acceptor {
            public,
            internal,
            tls,
            fast,
            builder: builder.clone(),
            public_state,
            internal_api: Arc::new(InternalApi {
                builder,
                state: internal_state,
                handoff: Handoff::default(),
            }),
            public_conns,
            header_read_timeout: config.header_read_timeout,
        };
        let mut round = acceptor.start(adopted_internal);
        crate::upgrade::notify_systemd("READY=1");
        tokio::pin!(shutdown);
        loop {
            let upgrade = async {
                match &mut upgrades {
                    Some(u) => u.requested().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = upgrade => {}
            }
            match upgrade_in_place(&config, &acceptor, round, &hub, bus.as_ref()).await {
                Upgraded::HandedOver => {
                    // The state directory is the new process's now: no more snapshots
                    // from here, and none at the end (its next one is newer).
                    drop(saver);
                    hub.metrics()
                        .upgrades_total
                        .with_label_values(&["handed_over"])
                        .inc();
                    // What could not move (hyper's connections, TLS) is answered and closed
                    // as in a drain.
                    let conns = &acceptor.public_conns;
                    hub.begin_drain();
                    conns.signal();
                    hub.metrics()
                        .upgrade_connections_total
                        .with_label_values(&["drained"])
                        .inc_by(conns.open() as u64);
                    hub.drain(Duration::ZERO).await;
                    if tokio::time::timeout(CLOSE_GRACE, conns.all_gone())
                        .await
                        .is_err()
                    {
                        warn!(
                            open = conns.open(),
                            "connections still open after the handover; leaving them"
                        );
                    }
                    drop(sweeper);
                    info!("handed over to the new process; exiting");
                    return Ok(());
                }
                Upgraded::No { why, then } => {
                    hub.metrics()
                        .upgrades_total
                        .with_label_values(&["abandoned"])
                        .inc();
                    warn!(reason = %why, "upgrade abandoned; this process goes on serving");
                    round = match then {
                        Resume::Kept(round) => round,
                        Resume::Restart(internal) => {
                            if let Some(bus) = &bus {
                                bus.restart();
                                bus_task = Some(tokio::spawn(bus.clone().run()));
                            }
                            acceptor.start(internal)
                        }
                    };
                }
            }
        }

        let Acceptor {
            public,
            internal,
            public_conns,
            ..
        } = acceptor;
        info!(drain_period = ?config.drain_period, "draining");
        hub.begin_drain();
        round.public_accept.signal();
        let _ = round.public_task.await;
        // Closed: new connections are refused, and the load balancer sends them elsewhere.
        drop(public);
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
        round.internal_accept.signal();
        let _ = round.internal_task.await;
        drop(internal);
        round.internal_conns.signal();
        let _ = tokio::time::timeout(CLOSE_GRACE, round.internal_conns.all_gone()).await;
        drop(sweeper);
        if let Some(task) = bus_task {
            task.abort();
        }
        info!("drained");
        Ok(())
    }
}

/// What the accept loops need, kept for as many rounds of accepting as there are.
struct Acceptor {
    public: Arc<TcpListener>,
    internal: Arc<TcpListener>,
    tls: Option<TlsAcceptor>,
    fast: Option<Arc<FastPath>>,
    builder: hyper::server::conn::http1::Builder,
    public_state: Arc<PublicState>,
    internal_api: Arc<InternalApi>,
    public_conns: Arc<Drain>,
    header_read_timeout: Duration,
}

/// One round of accepting on both listeners.
struct Round {
    public_accept: Drain,
    internal_accept: Drain,
    internal_conns: Arc<Drain>,
    public_task: tokio::task::JoinHandle<()>,
    internal_task: tokio::task::JoinHandle<()>,
}

impl Round {
    /// Stops both accept loops (the listeners stay open: connections wait in the backlog).
    async fn stop_accepting(&mut self) {
        self.public_accept.signal();
        self.internal_accept.signal();
        let _ = (&mut self.public_task).await;
        let _ = (&mut self.internal_task).await;
    }
}

impl Acceptor {
    /// Starts accepting, and serves `internal` (internal API connections handed over, or
    /// taken back from an upgrade that was abandoned) in this round.
    fn start(&self, internal: Vec<Between>) -> Round {
        let public_accept = Drain::new(None);
        let internal_accept = Drain::new(None);
        let internal_conns = Arc::new(Drain::new(None));
        let public_task = {
            let conns = self.public_conns.clone();
            let (builder, tls, fast, public_state) = (
                self.builder.clone(),
                self.tls.clone(),
                self.fast.clone(),
                self.public_state.clone(),
            );
            let timeout = self.header_read_timeout;
            accept_loop(
                self.public.clone(),
                public_accept.watcher(),
                move |stream| {
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
                },
            )
        };
        let internal_task = {
            let (conns, api) = (internal_conns.clone(), self.internal_api.clone());
            accept_loop(
                self.internal.clone(),
                internal_accept.watcher(),
                move |stream| {
                    let between = Between {
                        stream,
                        read_ahead: Vec::new(),
                    };
                    api.spawn(between, conns.watcher());
                },
            )
        };
        // Listening on both: ready (until the drain begins).
        self.internal_api
            .state
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        for between in internal {
            self.internal_api.spawn(between, internal_conns.watcher());
        }
        Round {
            public_accept,
            internal_accept,
            internal_conns,
            public_task: tokio::spawn(public_task),
            internal_task: tokio::spawn(internal_task),
        }
    }
}

/// The internal API's connections: accepted or handed over, served by hyper, and handed
/// on between requests at an upgrade ([`Handoff`]).
struct InternalApi {
    builder: hyper::server::conn::http1::Builder,
    state: Arc<InternalState>,
    handoff: Handoff,
}

impl InternalApi {
    fn spawn(self: &Arc<Self>, between: Between, drain: crate::drain::Watcher) {
        let api = self.clone();
        tokio::spawn(async move {
            // No client watch: nothing parks here; the prefix is what was read ahead.
            let (io, _) = Watched::new(between.stream, between.read_ahead);
            let state = api.state.clone();
            // Boxed: hyper hands a connection back (`into_parts`) only with an `Unpin` future.
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                Box::pin(async move { Ok::<_, Infallible>(internal::handle(req, &state).await) })
            });
            serve_movable(&api.builder, io, service, drain, &api.handoff).await;
        });
    }
}

/// How an upgrade in place ended.
enum Upgraded {
    /// The new process serves; this one answers what could not move and exits.
    HandedOver,
    /// This process goes on serving: why, and from where.
    No { why: String, then: Resume },
}

/// Where an abandoned upgrade leaves this process.
enum Resume {
    /// Accepting was never stopped: the round goes on.
    Kept(Round),
    /// Accepting, the connections and the bus start again; these internal connections,
    /// taken off hyper for the handover, are served again.
    Restart(Vec<Between>),
}

/// How long the fast path's connections get to report for the move (an answer being
/// written, a head half read); the rest stay and are drained.
const MOVE_GRACE: Duration = Duration::from_secs(2);

/// The old process's side of the upgrade in place (`crate::upgrade` has the protocol). The
/// point of no return is `commit`: before it, everything can go back.
async fn upgrade_in_place(
    config: &Config,
    acceptor: &Acceptor,
    mut round: Round,
    hub: &Arc<Hub>,
    bus: Option<&Arc<Bus>>,
) -> Upgraded {
    let mut upgrade = match Upgrade::spawn(config.upgrade_timeout) {
        Ok(u) => u,
        Err(why) => {
            return Upgraded::No {
                why,
                then: Resume::Kept(round),
            };
        }
    };
    // Serving as usual until the new process has read its flags and connected.
    if let Err(why) = upgrade.hello().await {
        upgrade.abandon().await;
        return Upgraded::No {
            why,
            then: Resume::Kept(round),
        };
    }
    let started = tokio::time::Instant::now();
    round.stop_accepting().await;
    // Every publish is applied by exactly one process: the internal requests in flight
    // finish here before the snapshot; the ones after wait in the backlog, or on their
    // connection, for the new one.
    let handoff = &acceptor.internal_api.handoff;
    let mut between = upgrade.takes_internal().then(|| handoff.begin());
    round.internal_conns.signal();
    let finished = tokio::time::timeout(CLOSE_GRACE, round.internal_conns.all_gone()).await;
    handoff.end();
    let mut internal = Vec::new();
    while let Some(Ok(conn)) = between.as_mut().map(|rx| rx.try_recv()) {
        internal.push(conn);
    }
    if finished.is_err() {
        upgrade.abandon().await;
        return Upgraded::No {
            why: "internal requests still in flight".into(),
            then: Resume::Restart(internal),
        };
    }
    // The bus reader stops after the entry it is applying; the new one reads on from here
    // (its position before the snapshot, as docs/design.md's ordering rule asks).
    let bus_position = match bus {
        Some(bus) => bus.stop().await,
        None => None,
    };
    // The collector first: a parked poll reports to it as soon as the hub detaches it.
    let mut moving = acceptor.fast.as_ref().map(|fast| fast.begin_moving());
    let detached = hub.detach_parked();
    let mut collected = Vec::new();
    if let (Some(fast), Some(moving)) = (&acceptor.fast, &mut moving) {
        let reported = async {
            detached.dealt_with().await;
            fast.all_reported().await;
        };
        if tokio::time::timeout(MOVE_GRACE, reported).await.is_err() {
            debug!(
                left = fast.connections(),
                "fast-path connections not moved in time; they are drained"
            );
        }
        fast.end_moving();
        while let Ok(moved) = moving.try_recv() {
            collected.push(moved);
        }
    }
    let out = Outgoing {
        listeners: vec![
            (Role::Public, raw(&*acceptor.public)),
            (Role::Internal, raw(&*acceptor.internal)),
        ],
        conns: collected
            .iter()
            .map(|m| (raw(&m.stream), crate::upgrade::to_wire(&m.state)))
            .chain(internal.iter().map(|b| {
                let read_ahead = b.read_ahead.clone();
                (raw(&b.stream), WireConn::Internal { read_ahead })
            }))
            .collect(),
        bus_position: bus_position.clone(),
        hub: crate::upgrade::snapshot(hub),
    };
    let moved = collected.len() + internal.len();
    match upgrade.hand_over(out).await {
        Ok(()) => {
            if let Some(pid) = upgrade.pid() {
                crate::upgrade::notify_systemd(&format!("MAINPID={pid}"));
            }
            hub.metrics()
                .upgrade_connections_total
                .with_label_values(&["moved"])
                .inc_by(moved as u64);
            info!(moved, took = ?started.elapsed(), "connections handed over");
            Upgraded::HandedOver
        }
        Err(why) => {
            upgrade.abandon().await;
            if let Some(path) = &config.pid_file
                && let Err(e) = crate::pid_file::PidFile::rewrite(path)
            {
                warn!(error = %e, "--pid-file not rewritten");
            }
            // Nothing was served by the new process: every connection is as it was here.
            hub.end_moving();
            if let Some(fast) = &acceptor.fast {
                for moved in collected {
                    fast.adopt(moved, acceptor.public_conns.watcher());
                }
            }
            // The bus reader's cursor is where it stopped: `Bus::restart` reads on from it.
            Upgraded::No {
                why,
                then: Resume::Restart(internal),
            }
        }
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
        not_live = done.not_live,
        age_ms = crate::hub::now_ms().saturating_sub(snapshot.hub.taken_at_ms),
        bus_position = ?snapshot.bus_position.filter(|_| resumed),
        "state restored"
    );
}
