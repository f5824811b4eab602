//! One measurement run each: a fresh server process, measured, then stopped.
//!
//! - [`park_run`]: park N polls in one scenario; resident and kernel memory above the process's
//!   own baseline; CPU over a quiet window (largest N only); then the wake-up of all N polls.
//! - [`rate_run`]: connection rate (short connections answered at once) and publish throughput
//!   with no poll parked.
//!
//! Each run waits on what it can observe (the server's own count of parked polls, every answer
//! received) with a deadline, never on a fixed sleep; the only timed wait is the CPU window,
//! which is the measurement itself.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::load::{self, LoopResult, Pace, Parked};
use crate::procfs::{self, KernelMemory, Memory};
use crate::server::{Binaries, FAN_TOPIC, Kind, Scenario, Server};
use crate::stats::{self, ms};

/// What one park run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ParkRun {
    pub server: String,
    pub scenario: &'static str,
    pub n: usize,
    pub repeat: usize,
    /// Resident memory (summed over the server's processes, kB) after warm-up, before anything
    /// for this run was registered or parked.
    pub base_rss_kb: u64,
    pub base_pss_kb: u64,
    /// The same with all N polls parked.
    pub parked_rss_kb: u64,
    pub parked_pss_kb: u64,
    /// Kernel: TCP buffer pages (`/proc/net/sockstat` mem) and slab kB, system-wide, before and
    /// with all N parked. Both ends of each loopback connection are in these.
    pub kernel_base: KernelMemory,
    pub kernel_parked: KernelMemory,
    /// CPU the server used while all N were parked and nothing else happened, in % of one core
    /// (largest N only).
    pub cpu_parked_percent: Option<f64>,
    pub cpu_window_seconds: Option<f64>,
    /// From the first connect until the server counted all N parked.
    pub park_seconds: f64,
    /// The wake-up of all N.
    pub wake: Option<Wake>,
}

/// Times from the start of the publish (the first byte written) to each poll's complete answer.
#[derive(Clone, Debug, Serialize)]
pub struct Wake {
    pub answered: usize,
    /// Answers that were not `200` with `new_change`, plus polls with no answer in time.
    pub wrong: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// When the publisher had its answer (for Nchan's N publishes: the last of them).
    pub publish_answered_ms: f64,
    /// CPU the server used from the publish until the last answer arrived.
    pub server_cpu_ms: f64,
    /// CPU the bench itself (the client side) used meanwhile.
    pub client_cpu_ms: f64,
    /// nudge's own `nudge_fanout_seconds` for this wake-up (mean over its publishes: one
    /// publish in the one-topic scenarios), from a publish's arrival to its last answered poll.
    pub server_fanout_ms: Option<f64>,
    /// The 0th to 100th percentile of the answer times (101 values; the 0th is the first
    /// answer): the distribution the wake picture draws, where all N times would swell the JSON.
    pub percentiles_ms: Vec<f64>,
}

impl ParkRun {
    /// Userspace bytes per parked poll above the process's own baseline (PSS).
    pub fn pss_bytes_per_poll(&self) -> f64 {
        (self.parked_pss_kb as f64 - self.base_pss_kb as f64) * 1024.0 / self.n as f64
    }
    pub fn slab_bytes_per_poll(&self) -> f64 {
        (self.kernel_parked.slab_kb as f64 - self.kernel_base.slab_kb as f64) * 1024.0
            / self.n as f64
    }
    pub fn tcp_mem_bytes_per_poll(&self) -> f64 {
        (self.kernel_parked.tcp_mem_pages as f64 - self.kernel_base.tcp_mem_pages as f64)
            * procfs::PAGE_BYTES as f64
            / self.n as f64
    }
}

/// What one rate run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RateRun {
    pub server: String,
    pub repeat: usize,
    /// Short connections per second: connect, one request answered at once, close.
    pub connections_per_second: f64,
    pub connection_errors: usize,
    /// Publishes per second, one per request, no poll parked.
    pub publishes_per_second: f64,
    pub publish_errors: usize,
    /// nudge only: publishes per second in NDJSON batches.
    pub batched_publishes_per_second: Option<f64>,
    pub batch_size: Option<usize>,
}

/// What the runs share.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub binaries: Binaries,
    pub pace: Pace,
    pub cpu_window: Duration,
    pub throughput_count: usize,
    pub batch_size: usize,
    pub accept_count: usize,
}

/// A few polls parked and woken before anything is measured, so that code paths, allocator
/// arenas and the first entries of the server's tables are in place in the baseline.
async fn warm_up(server: &mut Server, pace: Pace) -> Result<(), String> {
    const WARM: usize = 16;
    let paths = server.warm_paths().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut parked = Parked::open(server.public, paths, WARM, pace, deadline).await;
    server.wait_parked(WARM, deadline).await?;
    server.publish(crate::server::WARM_TOPIC).await?;
    let answered = parked.collect(deadline).await;
    parked.close().await;
    if answered < WARM {
        return Err(format!("warm-up: {answered} of {WARM} polls answered"));
    }
    // Until the server has forgotten them, the warm-up polls would still be counted.
    server
        .wait_parked_at_most(0, Instant::now() + Duration::from_secs(10))
        .await
}

/// Parks `n` polls in `scenario` on a fresh server and measures it; `measure_cpu` adds the quiet
/// CPU window.
pub async fn park_run(
    kind: Kind,
    scenario: Scenario,
    n: usize,
    repeat: usize,
    measure_cpu: bool,
    settings: &RunSettings,
) -> Result<ParkRun, String> {
    let mut server = Server::start(kind, &settings.binaries).await?;
    let result = park_run_on(&mut server, scenario, n, repeat, measure_cpu, settings).await;
    let result = result.map_err(|e| match kind {
        Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => {
            format!("{e}\n  {}'s log ends:\n{}", kind.name(), server.log_tail())
        }
        Kind::Nchan { .. } => e,
    });
    server.stop().await;
    result
}

async fn park_run_on(
    server: &mut Server,
    scenario: Scenario,
    n: usize,
    repeat: usize,
    measure_cpu: bool,
    settings: &RunSettings,
) -> Result<ParkRun, String> {
    let pace = settings.pace;
    warm_up(server, pace).await?;
    let pids = server.pids();
    let base = procfs::memory_of(&pids).map_err(|e| e.to_string())?;
    let kernel_base = procfs::kernel_memory().map_err(|e| e.to_string())?;

    let paths = server.subscribe_paths(scenario, n).await?;
    // Time enough to connect at the pace set, and then some.
    let park_deadline =
        Instant::now() + Duration::from_secs_f64(30.0 + 2.0 * n as f64 / pace.connect_rate);
    let start = Instant::now();
    let mut parked = Parked::open(server.public, paths, n, pace, park_deadline).await;
    if parked.failed() > 0 || parked.sent() < n {
        let (sent, failed) = (parked.sent(), parked.failed());
        let failure = first_failure(&mut parked);
        parked.close().await;
        return Err(format!(
            "{sent} of {n} polls sent in time, {failed} failed before sending; first: {failure}"
        ));
    }
    let counted = server.wait_parked(n, park_deadline).await;
    let park_seconds = start.elapsed().as_secs_f64();
    let early = parked.drain();
    if let Err(error) = counted {
        let failure = first_failure(&mut parked);
        parked.close().await;
        return Err(format!("{error}; {early} answered early, first: {failure}"));
    }
    if early > 0 {
        let failure = first_failure(&mut parked);
        parked.close().await;
        return Err(format!(
            "{early} of {n} polls were answered before the publish: {failure}"
        ));
    }

    let memory: Memory = procfs::memory_of(&pids).map_err(|e| e.to_string())?;
    let kernel = procfs::kernel_memory().map_err(|e| e.to_string())?;
    let (cpu_parked_percent, cpu_window_seconds) = if measure_cpu {
        let before = procfs::cpu_ns_of(&pids).map_err(|e| e.to_string())?;
        let window_start = Instant::now();
        tokio::time::sleep(settings.cpu_window).await;
        let after = procfs::cpu_ns_of(&pids).map_err(|e| e.to_string())?;
        let seconds = window_start.elapsed().as_secs_f64();
        let busy = after.saturating_sub(before) as f64 / 1e9;
        (Some(100.0 * busy / seconds), Some(seconds))
    } else {
        (None, None)
    };

    // The wake-up: the clock starts just before the publish request is written. The CPU both
    // sides use meanwhile says where the time went (on two cores the client's share is real).
    let fanout_before = server.fanout_histogram().await;
    let me = [std::process::id()];
    let server_cpu_before = procfs::cpu_ns_of(&pids).map_err(|e| e.to_string())?;
    let client_cpu_before = procfs::cpu_ns_of(&me).map_err(|e| e.to_string())?;
    let wake_deadline = Instant::now() + Duration::from_secs_f64(30.0 + n as f64 / 1000.0);
    let published_at = Instant::now();
    match scenario {
        Scenario::OneTopic | Scenario::OneTopicChannelEach => server.publish(FAN_TOPIC).await?,
        Scenario::NTopics => {
            let topics: Vec<String> = (0..n).map(crate::server::topic_name).collect();
            server.publish_many(&topics).await?
        }
    }
    let publish_answered = published_at.elapsed();
    parked.collect(wake_deadline).await;
    let server_cpu_ms = procfs::cpu_ns_of(&pids)
        .map_err(|e| e.to_string())?
        .saturating_sub(server_cpu_before) as f64
        / 1e6;
    let client_cpu_ms = procfs::cpu_ns_of(&me)
        .map_err(|e| e.to_string())?
        .saturating_sub(client_cpu_before) as f64
        / 1e6;
    let server_fanout_ms = match (fanout_before, server.fanout_histogram().await) {
        (Some((sum0, count0)), Some((sum1, count1))) if count1 > count0 => {
            Some(1000.0 * (sum1 - sum0) / (count1 - count0))
        }
        _ => None,
    };
    let mut times = Vec::with_capacity(n);
    let mut wrong = n.saturating_sub(parked.received.len());
    let mut first_wrong = None;
    for outcome in &parked.received {
        match &outcome.result {
            Ok(response)
                if response.status == 200
                    && response.body.windows(10).any(|w| w == b"new_change") =>
            {
                times.push(outcome.at.saturating_duration_since(published_at));
            }
            other => {
                wrong += 1;
                first_wrong.get_or_insert_with(|| describe(other));
            }
        }
    }
    parked.close().await;
    if let Some(first) = first_wrong {
        eprintln!("bench:   {wrong} of {n} polls not answered new_change; first: {first}");
    }
    times.sort_unstable();
    let wake = Wake {
        answered: times.len(),
        wrong,
        p50_ms: ms(stats::quantile(&times, 0.50)),
        p99_ms: ms(stats::quantile(&times, 0.99)),
        max_ms: ms(times.last().copied().unwrap_or_default()),
        publish_answered_ms: ms(publish_answered),
        server_cpu_ms,
        client_cpu_ms,
        server_fanout_ms,
        percentiles_ms: (0..=100)
            .map(|p| match p {
                0 => ms(times.first().copied().unwrap_or_default()),
                p => ms(stats::quantile(&times, p as f64 / 100.0)),
            })
            .collect(),
    };
    Ok(ParkRun {
        server: server.kind.name(),
        scenario: scenario.name(),
        n,
        repeat,
        base_rss_kb: base.rss_kb,
        base_pss_kb: base.pss_kb,
        parked_rss_kb: memory.rss_kb,
        parked_pss_kb: memory.pss_kb,
        kernel_base,
        kernel_parked: kernel,
        cpu_parked_percent,
        cpu_window_seconds,
        park_seconds,
        wake: Some(wake),
    })
}

fn describe(result: &Result<crate::http::Response, String>) -> String {
    match result {
        Ok(response) => format!("status {} {}", response.status, response.body_text()),
        Err(error) => error.clone(),
    }
}

fn first_failure(parked: &mut Parked) -> String {
    parked.drain();
    parked
        .received
        .first()
        .map(|outcome| format!("poll {}: {}", outcome.index, describe(&outcome.result)))
        .unwrap_or_else(|| "none seen".to_owned())
}

/// Connection rate and publish throughput on a fresh server.
pub async fn rate_run(
    kind: Kind,
    repeat: usize,
    settings: &RunSettings,
) -> Result<RateRun, String> {
    let mut server = Server::start(kind, &settings.binaries).await?;
    let result = rate_run_on(&mut server, repeat, settings).await;
    server.stop().await;
    result
}

async fn rate_run_on(
    server: &mut Server,
    repeat: usize,
    settings: &RunSettings,
) -> Result<RateRun, String> {
    warm_up(server, settings.pace).await?;
    let kind = server.kind;
    let limit = || Instant::now() + Duration::from_secs(60);

    let path = server.immediate_path().await?;
    let connections: LoopResult = load::connection_loop(
        server.public,
        path,
        settings.accept_count,
        32,
        settings.pace.sources,
        limit(),
    )
    .await;

    let make = Arc::new(move |i| Server::throughput_request(kind, i));
    let publishes = load::request_loop(
        server.internal,
        make,
        settings.throughput_count,
        16,
        limit(),
    )
    .await;

    let batched = if kind.is_nudge() {
        let size = settings.batch_size;
        let batches = settings.throughput_count.div_ceil(size);
        let make = Arc::new(move |i| Server::throughput_batch(i, size));
        let result = load::request_loop(server.internal, make, batches, 4, limit()).await;
        Some(result.per_second() * size as f64)
    } else {
        None
    };
    Ok(RateRun {
        server: kind.name(),
        repeat,
        connections_per_second: connections.per_second(),
        connection_errors: connections.errors,
        publishes_per_second: publishes.per_second(),
        publish_errors: publishes.errors,
        batched_publishes_per_second: batched,
        batch_size: kind.is_nudge().then_some(settings.batch_size),
    })
}
