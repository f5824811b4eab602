//! A million parked polls, simulated (issue 14.4): one process here may open 20,000 files, so
//! a million parked polls cannot be shown with sockets. This bench drives the hub itself: it
//! registers N channels, parks N polls on them (the same `Hub::poll` and the same
//! `ParkedPoll`, each awaited by a task of its own whose future is as large as the fast
//! path's connection future, with plain bytes standing in for the socket), and measures
//! memory per parked poll, one publish waking N, one batch waking N topics, and the expiry
//! sweep, on a tokio runtime of 1 and of 2 worker threads.
//!
//! `cargo bench --bench million`; knobs `NUDGE_BENCH_N` (default 1,000,000),
//! `NUDGE_BENCH_QUICK=1` (N = 10,000, also the default under `cargo test --all-targets`),
//! `NUDGE_BENCH_TIMEOUT_S` (per run, default 150). See `benches/README.md`.
//!
//! Each (scenario, threads) pair runs in a child process of its own (this same binary, told
//! which by `NUDGE_MILLION_RUN`), so that memory freed by one run cannot be reused, and so
//! hidden, by the next; the parent prints the table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nudge::hub::{Answer, Caps, Hub, HubConfig, Limits, ParkedPoll, PollStart, Publish};
use nudge::hub::{PollRequest, Registration};
use nudge::id::ChannelId;
use nudge::metrics::Metrics;
use tokio::sync::Notify;
use tokio::time::Instant;

// The binary's allocator: the bytes per poll are the ones a node pays.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes in the stand-in task's future besides its own state, so that it is as large as
/// `FastPath::serve`'s future (both sizes are printed; the bench says when they differ).
const PAD: usize = 48;

/// The scenarios, each run on 1 and on 2 worker threads.
const SCENARIOS: [(&str, &str); 2] = [
    ("hot", "one topic, a channel per poll: one publish wakes N"),
    (
        "topics",
        "a topic and a channel per poll: one batch of N publishes",
    ),
];

fn main() {
    match std::env::var("NUDGE_MILLION_RUN") {
        Ok(run) => child(&run),
        Err(_) => parent(),
    }
}

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn polls() -> usize {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this without it, as a
    // smoke test that should not take a minute.
    let quick = std::env::var("NUDGE_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench");
    let default = if quick { 10_000 } else { 1_000_000 };
    knob("NUDGE_BENCH_N", default) as usize
}

// ---- parent: a child per run, then the table ----

fn parent() {
    let n = polls();
    let timeout = Duration::from_secs(knob("NUDGE_BENCH_TIMEOUT_S", 150));
    let real = output_size(nudge::http::fast::FastPath::serve);
    let stand_in = size_of_val(&parked_task(
        Arc::new(Shared::new(0)),
        None::<ParkedPoll>,
        0,
    ));
    println!("# million: N = {n}, runs of 1 and 2 worker threads, a process each");
    println!(
        "# task future: stand-in {stand_in} B, the fast path's FastPath::serve {real} B{}",
        if stand_in.abs_diff(real) > 16 {
            "  (DIFFERENT: adjust PAD)"
        } else {
            ""
        }
    );
    let started = std::time::Instant::now();
    // Per scenario: its title, its values for 1 and 2 threads, and the rows' order.
    type Columns = [BTreeMap<String, String>; 2];
    let mut results: Vec<(&str, Columns, Vec<String>)> = Vec::new();
    for (scenario, title) in SCENARIOS {
        let mut cols: Columns = Default::default();
        let mut order = Vec::new();
        for (i, threads) in [1, 2].into_iter().enumerate() {
            let (values, keys) = run_child(scenario, threads, n, timeout);
            if order.is_empty() {
                order = keys;
            }
            cols[i] = values;
        }
        results.push((title, cols, order));
    }
    println!();
    println!("| measurement (N = {n}) | 1 thread | 2 threads |");
    println!("|---|--:|--:|");
    for (title, cols, order) in &results {
        println!("| **{title}** | | |");
        for key in order {
            let cell = |c: &BTreeMap<String, String>| c.get(key).cloned().unwrap_or("—".into());
            println!("| {key} | {} | {} |", cell(&cols[0]), cell(&cols[1]));
        }
    }
    println!(
        "\n# {:.1} s in all; userspace only: no socket, no tokio I/O registration",
        started.elapsed().as_secs_f64()
    );
}

/// Runs one (scenario, threads) in a child process, killed at `timeout`; its `@key=value`
/// lines, and their order.
fn run_child(
    scenario: &str,
    threads: usize,
    n: usize,
    timeout: Duration,
) -> (BTreeMap<String, String>, Vec<String>) {
    eprintln!("# run: {scenario}, {threads} thread(s), N = {n}");
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("NUDGE_MILLION_RUN", format!("{scenario}:{threads}:{n}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts the run");
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut values = BTreeMap::new();
        let mut order = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((k, v)) = line.strip_prefix('@').and_then(|l| l.split_once('=')) {
                order.push(k.to_owned());
                values.insert(k.to_owned(), v.to_owned());
            } else {
                println!("{line}");
            }
        }
        (values, order)
    });
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().expect("child status") {
            Some(status) if status.success() => break,
            Some(status) => panic!("run {scenario}:{threads} failed: {status}"),
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("run {scenario}:{threads} took more than {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    reader.join().expect("reader")
}

/// The size of the future an async fn of three arguments returns, without calling it.
fn output_size<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
    size_of::<F>()
}

// ---- child: one run ----

/// What the parked tasks share: when each got its answer, and counts to wait on.
struct Shared {
    origin: Instant,
    /// Nanoseconds from `origin` to the moment each poll's task had its answer.
    answered_at: Vec<AtomicU64>,
    started: AtomicUsize,
    all_started: Notify,
    answered: AtomicUsize,
    all_answered: Notify,
    not_new_change: AtomicUsize,
}

impl Shared {
    fn new(n: usize) -> Shared {
        Shared {
            origin: Instant::now(),
            answered_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            started: AtomicUsize::new(0),
            all_started: Notify::new(),
            answered: AtomicUsize::new(0),
            all_answered: Notify::new(),
            not_new_change: AtomicUsize::new(0),
        }
    }
}

/// The parked state of a fast-path connection without its socket: awaits the answer with
/// `ParkedPoll::poll_answer`, as `wait_parked` does (the hub's park timer holds the
/// deadline, one 24-byte entry a poll, measured with the rest of the hub), holding
/// `PAD` bytes in place of the connection's other state (the `TcpStream`, the drain watcher,
/// the framing). What it leaves out: the socket's `poll_peek`, tokio's I/O registration
/// (about 255 B) and the kernel's socket.
#[expect(
    clippy::manual_async_fn,
    reason = "shaped like FastPath::serve_from, whose async fn would keep its arguments twice"
)]
fn parked_task(
    shared: Arc<Shared>,
    parked: Option<ParkedPoll>,
    slot: usize,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let stand_in = [slot as u8; PAD];
        let Some(mut parked) = parked else { return };
        let answer = {
            let mut first = true;
            std::future::poll_fn(|cx| {
                if std::mem::take(&mut first)
                    && shared.started.fetch_add(1, Ordering::AcqRel) + 1 == total(&shared)
                {
                    shared.all_started.notify_one();
                }
                parked.poll_answer(cx)
            })
            .await
        };
        let at = shared.origin.elapsed().as_nanos() as u64;
        std::hint::black_box(&stand_in);
        shared.answered_at[slot].store(at, Ordering::Relaxed);
        if answer != Answer::NewChange {
            shared.not_new_change.fetch_add(1, Ordering::Relaxed);
        }
        if shared.answered.fetch_add(1, Ordering::AcqRel) + 1 == total(&shared) {
            shared.all_answered.notify_one();
        }
        drop(parked);
    }
}

fn total(shared: &Shared) -> usize {
    shared.answered_at.len()
}

/// Resident memory now: (VmRSS, PSS) in bytes.
fn memory() -> (u64, u64) {
    let m = nudge_testkit::memory::memory(std::process::id()).unwrap_or_default();
    (m.rss_kb * 1024, m.pss_kb * 1024)
}

fn report(key: &str, value: String) {
    println!("@{key}={value}");
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn per_poll(after: u64, before: u64, n: usize) -> String {
    format!("{:.0} B", (after as f64 - before as f64) / n as f64)
}

fn child(run: &str) {
    let mut parts = run.split(':');
    let scenario = parts.next().unwrap_or_default().to_owned();
    let threads: usize = parts.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let n: usize = parts.next().and_then(|t| t.parse().ok()).unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    // The driver runs on a worker, as a publish does in the node: with one thread the woken
    // tasks wait for it like they would for the publishing request.
    runtime
        .block_on(runtime.spawn(drive(scenario, n)))
        .expect("the run");
}

/// Waits for `notify` (one permit from the last task), failing after `limit`.
async fn wait_for(notify: &Notify, what: &str, limit: Duration) {
    if tokio::time::timeout(limit, notify.notified())
        .await
        .is_err()
    {
        panic!("{what}: not done after {limit:?}");
    }
}

async fn drive(scenario: String, n: usize) {
    let limit = Duration::from_secs(60);
    let ttl = Duration::from_secs(60);
    let limits = Limits {
        ttl,
        // Parks of ~9-10 minutes: none times out during a run.
        retry_timeout: Duration::from_secs(600),
        max_retries: 10,
    };
    let config = HubConfig {
        limits,
        max_polls_per_channel: 4,
        max_parked: n + 1,
    };
    let caps = Caps {
        max_channels: n + 1,
        max_topic_bytes: 1 << 36,
    };
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new(), false));
    let hub = Hub::with_caps(config, caps, metrics);
    let shared = Arc::new(Shared::new(n));
    let topic = |i: usize| match scenario.as_str() {
        "hot" => "hot".to_owned(),
        _ => format!("topic-{i:07}"),
    };

    // The bench's own list of ids is written through before the baseline, so that its pages
    // are not counted as the hub's.
    let mut ids: Vec<Option<ChannelId>> = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(None);
    }
    let m0 = memory();
    let t = Instant::now();
    for (i, slot) in ids.iter_mut().enumerate() {
        let reg = Registration {
            topics: vec![topic(i)],
            ..Default::default()
        };
        *slot = Some(hub.register(reg).expect("registers").id);
    }
    let register = t.elapsed();
    let m1 = memory();

    let t = Instant::now();
    for (slot, id) in ids.iter().enumerate() {
        let id = id.expect("registered").to_string();
        match hub.poll(&id, PollRequest::default()) {
            PollStart::Park(parked) => {
                tokio::spawn(parked_task(shared.clone(), Some(parked), slot));
            }
            _ => panic!("poll {slot} did not park"),
        }
    }
    wait_for(&shared.all_started, "parking", limit).await;
    let park = t.elapsed();
    let m2 = memory();
    assert_eq!(hub.counts().parked, n);

    report(
        "userspace per channel, registered (VmRSS)",
        per_poll(m1.0, m0.0, n),
    );
    report("userspace per parked poll (VmRSS)", per_poll(m2.0, m1.0, n));
    report("  same from PSS", per_poll(m2.1, m1.1, n));
    report("channel + parked poll (VmRSS)", per_poll(m2.0, m0.0, n));
    report("time to register N", ms(register));
    report(
        "time to park N (poll, spawn, first poll of each task)",
        ms(park),
    );

    let t = Instant::now();
    let expired = hub.sweep(Instant::now());
    report(
        "sweep, N channels all parked (nothing expires)",
        ms(t.elapsed()),
    );
    assert_eq!(expired, 0);

    // The batch is built before the clock starts.
    let batch: Vec<Publish> = match scenario.as_str() {
        "hot" => vec![Publish {
            topic: "hot".into(),
            position: None,
            stream_type: None,
        }],
        _ => (0..n)
            .map(|i| Publish {
                topic: topic(i),
                position: None,
                stream_type: None,
            })
            .collect(),
    };
    let start = shared.origin.elapsed().as_nanos() as u64;
    let t = Instant::now();
    let woken = hub.publish(&batch, "bench").woken;
    let call = t.elapsed();
    wait_for(&shared.all_answered, "the wake", limit).await;
    let last = t.elapsed();
    assert_eq!(woken, n, "every parked poll woken");
    assert_eq!(shared.not_new_change.load(Ordering::Relaxed), 0);
    let mut lat: Vec<u64> = shared
        .answered_at
        .iter()
        .map(|a| a.load(Ordering::Relaxed).saturating_sub(start))
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| Duration::from_nanos(lat[((lat.len() - 1) as f64 * p) as usize]);
    let what = if batch.len() == 1 {
        "one publish"
    } else {
        "the batch"
    };
    report(&format!("{what}: the publish call"), ms(call));
    report(
        &format!("{what}: every task has its answer (wake p50 / p99 / max)"),
        format!("{} / {} / {}", ms(pct(0.5)), ms(pct(0.99)), ms(last)),
    );

    let t = Instant::now();
    let expired = hub.sweep(Instant::now());
    report("sweep, N channels idle (nothing expires)", ms(t.elapsed()));
    assert_eq!(expired, 0);
    let t = Instant::now();
    let expired = hub.sweep(Instant::now() + ttl + Duration::from_secs(1));
    report("sweep, N channels all expired", ms(t.elapsed()));
    assert_eq!(expired, n);
}
