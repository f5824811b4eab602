//! Prometheus metrics. One `Metrics` is registered into a `Registry` that is passed in, not
//! a global, so every test server gets its own. Labels are low-cardinality: never a channel
//! or a topic.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::answer::Answer;

/// Every metric of a node, registered into its own [`Registry`].
pub struct Metrics {
    registry: Registry,
    /// `nudge_parked_polls`: polls parked on channels now.
    pub parked_polls: IntGauge,
    /// `nudge_channels`: live channels.
    pub channels: IntGauge,
    /// `nudge_topics`: topics with channels, and remembered positions.
    pub topics: IntGauge,
    /// Bytes of the distinct topic names bound by live channels (`--max-topic-bytes`).
    pub topic_bytes: IntGauge,
    /// Registrations refused `too_many_channels` (either cap: the gauges tell which).
    pub registrations_refused_total: IntCounter,
    /// Positions of topics nobody listens to that were not remembered (count or bytes full).
    pub positions_refused_total: IntCounter,
    /// `nudge_open_connections`: open connections on the public listener.
    pub open_connections: IntGauge,
    /// `nudge_polls_total{outcome}`: polls answered, by answer or refusal.
    pub polls_total: IntCounterVec,
    /// `nudge_publishes_total{source}`: publishes applied, from the API or the bus.
    pub publishes_total: IntCounterVec,
    /// `nudge_wakeups_total`: parked polls woken by a publish.
    pub wakeups_total: IntCounter,
    /// `nudge_bus_gaps_total{repair,cause}`: interruptions of the bus reader, by how they
    /// were repaired (`replayed`, `woke_all`) and why (`reconnect`, `trimmed`, `reset`,
    /// `diverged`); see [`gap`].
    pub bus_gaps_total: IntCounterVec,
    /// `nudge_bus_entries_replayed_total`: stream entries applied late, after a gap.
    pub bus_entries_replayed_total: IntCounter,
    /// `nudge_bus_lag_seconds`: from an entry's Redis timestamp to its application here.
    pub bus_lag_seconds: Histogram,
    /// `nudge_bus_stalls_total`: the reader's connection was open but gave no reply in time.
    pub bus_stalls_total: IntCounter,
    /// Registered only when a bus is configured: a node without one has nothing to be
    /// disconnected from, and must not trip a "bus down" alert.
    pub bus_connected: IntGauge,
    /// `nudge_state_snapshots_total`: snapshots written to `--state-dir`.
    pub state_snapshots_total: IntCounter,
    /// `nudge_state_snapshot_failures_total`: snapshots that could not be written.
    pub state_snapshot_failures_total: IntCounter,
    /// `nudge_state_snapshot_seconds`: how long the last one took to take and write.
    pub state_snapshot_seconds: Gauge,
    /// `nudge_state_snapshot_bytes`: the last one's size.
    pub state_snapshot_bytes: IntGauge,
    /// `nudge_state_snapshot_channels`: channels in the last one, what a restart now
    /// would bring back.
    pub state_snapshot_channels: IntGauge,
    /// `nudge_state_restored_channels`: channels restored from `--state-dir` at start.
    pub state_restored_channels: IntGauge,
    /// `nudge_fanout_seconds`: from a publish's arrival to its last answer handed over.
    pub fanout_seconds: Histogram,
    /// Requests on the public listener by who parsed them: `fast` or `hyper`.
    pub public_requests_total: IntCounterVec,
    /// `nudge_upgrade_connections_total{outcome}`: public connections at an upgrade in
    /// place, `moved` to the new process or `drained` (answered as in a drain: TLS, hyper).
    pub upgrade_connections_total: IntCounterVec,
    /// `nudge_upgrades_total{outcome}`: upgrades in place begun here, by outcome
    /// (`handed_over`, `abandoned`: the new binary failed and this process kept serving).
    pub upgrades_total: IntCounterVec,
    /// `polls_total` for new_change, reconnect, max_retries, no_change, in that order.
    answers: [IntCounter; 4],
    /// `nudge_polls_parked_total{path}` for the fast path and hyper, in that order.
    parked_on: [IntCounter; 2],
}

/// Which path a poll parked on: a poll parked on hyper costs several times the memory of
/// one on the fast path, so operators should see when clients end up there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkedOn {
    /// The buffer-less fast path.
    Fast,
    /// hyper: the fast path is off, or the request was not one it serves.
    Hyper,
}

/// The label pairs of `nudge_bus_gaps_total`: `(repair, cause)`.
pub mod gap {
    /// The reader reconnected and read on from its last entry: nothing was lost.
    pub const REPLAYED: (&str, &str) = ("replayed", "reconnect");
    /// Entries after the node's last one were trimmed away before it could read them.
    pub const TRIMMED: (&str, &str) = ("woke_all", "trimmed");
    /// The stream is not the one the node was reading (Redis restarted empty, `FLUSHALL`).
    pub const RESET: (&str, &str) = ("woke_all", "reset");
    /// Redis no longer holds entries the node applied (a failover to a replica that had
    /// not received them, or a restore from an older snapshot).
    pub const DIVERGED: (&str, &str) = ("woke_all", "diverged");
    /// Every pair, so that each has a sample from the start.
    pub const ALL: [(&str, &str); 4] = [REPLAYED, TRIMMED, RESET, DIVERGED];
}

/// Outcomes counted in `nudge_polls_total{outcome}` besides the four answers.
pub mod outcome {
    /// Refused: the channel's parked limit was reached (429).
    pub const TOO_MANY_POLLS: &str = "too_many_polls";
    /// Refused: the node's parked limit was reached (503).
    pub const OVER_CAPACITY: &str = "over_capacity";
    /// Refused: a malformed query (400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The client went away while parked.
    pub const GONE: &str = "gone";
}

impl Metrics {
    /// Registers every metric into `registry`; `nudge_bus_connected` only `with_bus`.
    pub fn new(registry: Registry, with_bus: bool) -> Metrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).unwrap());
        let polls_total = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("nudge_polls_total", "Polls answered, by outcome."),
                &["outcome"],
            )
            .unwrap(),
        );
        let polls_parked_total = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "nudge_polls_parked_total",
                    "Polls parked, by the path that parked them (fast, hyper).",
                ),
                &["path"],
            )
            .unwrap(),
        );
        let m = Metrics {
            parked_on: ["fast", "hyper"].map(|p| polls_parked_total.with_label_values(&[p])),
            parked_polls: gauge("nudge_parked_polls", "Polls parked on channels right now."),
            channels: gauge("nudge_channels", "Live channels on this node."),
            topics: gauge(
                "nudge_topics",
                "Topic entries: topics with channels, and remembered positions.",
            ),
            topic_bytes: gauge(
                "nudge_topic_bytes",
                "Bytes of the distinct topic names bound by live channels.",
            ),
            registrations_refused_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_registrations_refused_total",
                    "Registrations refused too_many_channels: --max-channels or --max-topic-bytes reached.",
                )
                .unwrap(),
            ),
            positions_refused_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_positions_refused_total",
                    "Positions of topics nobody listens to not remembered: the count or bytes of remembered positions was full.",
                )
                .unwrap(),
            ),
            open_connections: gauge(
                "nudge_open_connections",
                "Open connections on the public listener.",
            ),
            bus_connected: {
                let g = IntGauge::new(
                    "nudge_bus_connected",
                    "1 while the publish bus reader is connected and reading.",
                )
                .unwrap();
                if with_bus {
                    registry.register(Box::new(g.clone())).expect("metric names are unique");
                }
                g
            },
            upgrade_connections_total: {
                let c = reg(
                    &registry,
                    IntCounterVec::new(
                        Opts::new(
                            "nudge_upgrade_connections_total",
                            "Public connections at an upgrade in place, by outcome (moved to the new process, drained).",
                        ),
                        &["outcome"],
                    )
                    .unwrap(),
                );
                for o in ["moved", "drained"] {
                    c.with_label_values(&[o]);
                }
                c
            },
            upgrades_total: {
                let c = reg(
                    &registry,
                    IntCounterVec::new(
                        Opts::new(
                            "nudge_upgrades_total",
                            "Upgrades in place begun on this node, by outcome (handed_over, abandoned).",
                        ),
                        &["outcome"],
                    )
                    .unwrap(),
                );
                for r in ["handed_over", "abandoned"] {
                    c.with_label_values(&[r]);
                }
                c
            },
            answers: Answer::ALL.map(|a| polls_total.with_label_values(&[a.as_str()])),
            polls_total,
            publishes_total: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "nudge_publishes_total",
                        "Publishes applied on this node, by source (api, bus).",
                    ),
                    &["source"],
                )
                .unwrap(),
            ),
            wakeups_total: reg(
                &registry,
                IntCounter::new("nudge_wakeups_total", "Parked polls woken by a publish.").unwrap(),
            ),
            bus_gaps_total: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "nudge_bus_gaps_total",
                        "Interruptions of the bus reader, by repair (replayed, woke_all) and cause (reconnect, trimmed, reset, diverged).",
                    ),
                    &["repair", "cause"],
                )
                .unwrap(),
            ),
            bus_entries_replayed_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_bus_entries_replayed_total",
                    "Bus stream entries applied after a gap, read on from the node's last entry.",
                )
                .unwrap(),
            ),
            bus_lag_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nudge_bus_lag_seconds",
                        "From a bus entry's Redis timestamp to its application on this node.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ]),
                )
                .unwrap(),
            ),
            bus_stalls_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_bus_stalls_total",
                    "Times the bus reader's connection was open but gave no reply in time.",
                )
                .unwrap(),
            ),
            state_snapshots_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_state_snapshots_total",
                    "Snapshots of the node's state written to --state-dir.",
                )
                .unwrap(),
            ),
            state_snapshot_failures_total: reg(
                &registry,
                IntCounter::new(
                    "nudge_state_snapshot_failures_total",
                    "Snapshots of the node's state that could not be written to --state-dir.",
                )
                .unwrap(),
            ),
            state_snapshot_seconds: reg(
                &registry,
                Gauge::new(
                    "nudge_state_snapshot_seconds",
                    "How long the last snapshot took to take and write.",
                )
                .unwrap(),
            ),
            state_snapshot_bytes: gauge(
                "nudge_state_snapshot_bytes",
                "The size of the last snapshot written to --state-dir.",
            ),
            state_snapshot_channels: gauge(
                "nudge_state_snapshot_channels",
                "Channels in the last snapshot written to --state-dir: what a restart would restore.",
            ),
            state_restored_channels: gauge(
                "nudge_state_restored_channels",
                "Channels restored from --state-dir when the node started.",
            ),
            fanout_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nudge_fanout_seconds",
                        "From a publish's arrival to the last of its answers handed to a connection.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .unwrap(),
            ),
            public_requests_total: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "nudge_public_requests_total",
                        "Requests on the public listener, by the path that served them (fast, hyper).",
                    ),
                    &["path"],
                )
                .unwrap(),
            ),
            registry,
        };
        for p in ["fast", "hyper"] {
            m.public_requests_total.with_label_values(&[p]);
        }
        for s in ["api", "bus"] {
            m.publishes_total.with_label_values(&[s]);
        }
        for (repair, cause) in gap::ALL {
            m.bus_gaps_total.with_label_values(&[repair, cause]);
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        m
    }

    /// Counts an answer. Every answered poll comes here, so the four answer counters are
    /// looked up once at start, not per answer (`with_label_values` hashes and locks).
    pub fn count_answer(&self, answer: Answer) {
        self.answers[answer.index()].inc();
    }

    /// Counts a poll that parked, by path.
    pub fn count_parked(&self, on: ParkedOn) {
        self.parked_on[on as usize].inc();
    }

    /// Counts a gap in the bus reader (a pair of [`gap`]).
    pub fn count_gap(&self, (repair, cause): (&str, &str)) {
        self.bus_gaps_total
            .with_label_values(&[repair, cause])
            .inc();
    }

    /// Counts a poll outcome that is not an answer (see [`outcome`]).
    pub fn count_outcome(&self, outcome: &str) {
        self.polls_total.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}
