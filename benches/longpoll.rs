//! nudge vs Nchan, side by side: what a parked long-poll costs and how fast one publish wakes
//! many of them. `cargo bench --bench longpoll`; see `benches/README.md` for what is measured,
//! how, and the knobs.
//!
//! The tour:
//! - `procfs`: resident memory, CPU ticks, children, kernel socket and slab memory.
//! - `http`: a minimal HTTP/1.1 client over raw TCP (a socket and a small buffer per poll).
//! - `load`: parking N polls at a bounded connect rate from several 127.0.0.x sources; closed
//!   loops of requests and of short connections.
//! - `nchan`: finding or installing nginx + Nchan, and its configuration under a temp prefix.
//! - `server`: start, count, register, publish, stop — for nudge and for Nchan alike.
//! - `floor`: the floor, a bare tokio long-poll server every figure is also held against.
//! - `runs`: one measured run on a fresh server.
//! - `report`: medians, the Markdown table, the targets, the JSON.
//! - `svg`: the pictures of wake times and memory per poll, written next to the JSON.
//!
//! Each measurement is repeated, alternating the servers (the order rotates each repeat), and
//! the report gives medians. Every wait is on something observable, with a deadline.

#[path = "longpoll/floor.rs"]
mod floor;
#[path = "longpoll/http.rs"]
mod http;
#[path = "longpoll/load.rs"]
mod load;
#[path = "longpoll/nchan.rs"]
mod nchan;
#[path = "longpoll/procfs.rs"]
mod procfs;
#[path = "longpoll/report.rs"]
mod report;
#[path = "longpoll/runs.rs"]
mod runs;
#[path = "longpoll/server.rs"]
mod server;
#[path = "longpoll/stats.rs"]
mod stats;
#[path = "longpoll/svg.rs"]
mod svg;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nudge_testkit::settings::{env, env_list, env_number};
use serde_json::json;

use crate::load::Pace;
use crate::runs::{ParkRun, RateRun, RunSettings};
use crate::server::{Binaries, Kind, Scenario};

/// How much to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `cargo bench --bench longpoll`: every N, every server, repeated.
    Full,
    /// `NUDGE_BENCH_QUICK=1`: small N, one repeat, nudge and Nchan with one worker; < 1 minute.
    Quick,
    /// Run without `--bench`, as `cargo test --all-targets` does: a few seconds against nudge
    /// alone, no JSON written, so that the tests catch a bench that no longer runs.
    Test,
}

impl Mode {
    /// The value for this mode, of the full, quick and test defaults.
    fn pick<T>(self, full: T, quick: T, test: T) -> T {
        match self {
            Mode::Full => full,
            Mode::Quick => quick,
            Mode::Test => test,
        }
    }

    fn name(self) -> &'static str {
        self.pick("full", "quick", "test")
    }
}

/// The bench's knobs, all from `NUDGE_BENCH_*` environment variables.
struct Settings {
    mode: Mode,
    ns: Vec<usize>,
    repeat: usize,
    servers: Vec<Kind>,
    scenarios: Vec<Scenario>,
    rates: bool,
    client_threads: usize,
    nchan_install: bool,
    json_path: Option<PathBuf>,
    /// Where the pictures go: `NUDGE_BENCH_SVG_DIR`, else the JSON's directory.
    svg_dir: Option<PathBuf>,
    run: RunSettings,
}

impl Settings {
    fn from_env() -> Settings {
        // cargo passes `--bench` to a bench it runs for `cargo bench`, and not under `cargo test`.
        let benching = std::env::args().any(|arg| arg == "--bench");
        let mode = if env("NUDGE_BENCH_QUICK").is_some_and(|v| v != "0") {
            Mode::Quick
        } else if benching {
            Mode::Full
        } else {
            Mode::Test
        };
        let mut ns: Vec<usize> = env_list(
            "NUDGE_BENCH_N",
            mode.pick("1000,5000,18000", "200,1000", "50,100"),
        )
        .iter()
        .map(|n| {
            n.parse().ok().filter(|&n| n > 0).unwrap_or_else(|| {
                eprintln!("bench: NUDGE_BENCH_N holds {n}, not a positive number");
                std::process::exit(64)
            })
        })
        .collect();
        ns.sort_unstable();
        ns.dedup();
        let servers = env_list(
            "NUDGE_BENCH_SERVERS",
            mode.pick(
                "nudge,nudge1t,floor,nchan1,nchan2",
                "nudge,nudge1t,floor,nchan1",
                "nudge",
            ),
        )
        .iter()
        .map(|s| match s.as_str() {
            "nudge" => Kind::Nudge,
            "nudge1t" | "nudge-1t" => Kind::NudgeOneThread,
            "floor" => Kind::Floor,
            other => match other
                .strip_prefix("nchan")
                .map(|w| w.trim_end_matches('w').parse::<u32>())
            {
                Some(Ok(workers)) if workers >= 1 => Kind::Nchan { workers },
                _ => {
                    eprintln!(
                        "bench: NUDGE_BENCH_SERVERS: {other} is none of nudge, nudge1t, floor, nchan1, nchan2, …"
                    );
                    std::process::exit(64)
                }
            },
        })
        .collect();
        let scenarios = env_list("NUDGE_BENCH_SCENARIOS", "one_topic,one_topic_channel_each,n_topics")
            .iter()
            .map(|s| {
                Scenario::parse(s).unwrap_or_else(|| {
                    eprintln!("bench: NUDGE_BENCH_SCENARIOS: {s} is none of one_topic, one_topic_channel_each, n_topics");
                    std::process::exit(64)
                })
            })
            .collect();
        let nudge = env("NUDGE_BENCH_NUDGE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nudge")));
        let json_path = env("NUDGE_BENCH_JSON").map(PathBuf::from);
        let json_path = match mode {
            Mode::Test => json_path,
            Mode::Full | Mode::Quick => json_path.or_else(|| Some(default_json_path())),
        };
        let svg_dir = env("NUDGE_BENCH_SVG_DIR").map(PathBuf::from).or_else(|| {
            let dir = json_path.as_ref()?.parent()?;
            Some(if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir.to_path_buf()
            })
        });
        Settings {
            mode,
            ns,
            repeat: env_number("NUDGE_BENCH_REPEAT", mode.pick(3, 1, 1)).max(1),
            servers,
            scenarios,
            rates: env_number("NUDGE_BENCH_RATES", 1u8) != 0,
            client_threads: env_number("NUDGE_BENCH_CLIENT_THREADS", 1usize).max(1),
            nchan_install: env_number("NUDGE_BENCH_NCHAN_INSTALL", 1u8) != 0,
            json_path,
            svg_dir,
            run: RunSettings {
                binaries: Binaries { nudge, nchan: None },
                pace: Pace {
                    sources: env_number("NUDGE_BENCH_SOURCES", 16usize).clamp(1, 250),
                    connect_rate: env_number("NUDGE_BENCH_CONNECT_RATE", 8000.0f64).max(1.0),
                    connect_window: env_number("NUDGE_BENCH_CONNECT_WINDOW", 256usize).max(1),
                },
                cpu_window: Duration::from_secs_f64(
                    env_number("NUDGE_BENCH_CPU_WINDOW", mode.pick(3.0f64, 1.0, 0.2)).max(0.1),
                ),
                throughput_count: env_number(
                    "NUDGE_BENCH_PUBLISHES",
                    mode.pick(20000usize, 2000, 200),
                )
                .max(1),
                batch_size: env_number("NUDGE_BENCH_BATCH", 100usize).max(1),
                accept_count: env_number(
                    "NUDGE_BENCH_CONNECTIONS",
                    mode.pick(10000usize, 1000, 100),
                )
                .max(1),
            },
        }
    }
}

/// `target/bench/longpoll.json`, found from the bench executable (`target/<profile>/deps/…`),
/// so that `CARGO_TARGET_DIR` is followed too.
fn default_json_path() -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("longpoll.json")
}

/// The command line that reproduces this run: the knobs that were set, then cargo's command.
fn command_line() -> String {
    let mut knobs: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("NUDGE_BENCH_"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    knobs.sort();
    knobs.push("cargo bench --bench longpoll".to_owned());
    knobs.join(" ")
}

fn main() {
    // The floor runs as this executable, in a process of its own (see `floor`).
    if std::env::var_os(floor::SERVE_ENV).is_some() {
        floor::serve();
    }
    let mut settings = Settings::from_env();
    // 18,000 client sockets need more than a default soft limit of 1,024 open files; the hard
    // limit (20,000 here) is enough, since the server under test is another process.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < settings.ns.last().copied().unwrap_or(0) + 100 => {
            eprintln!(
                "bench: warning: open-file limit {limit} is below the largest N plus a margin"
            );
        }
        Ok(_) => {}
        Err(error) => eprintln!("bench: warning: cannot raise the open-file limit: {error}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(&mut settings));
    std::process::exit(code);
}

async fn run(settings: &mut Settings) -> i32 {
    // The pictures are checked on made-up runs before anything is measured, so that a broken
    // picture fails fast (and fails `cargo test --all-targets`).
    if let Err(error) = svg::self_check() {
        eprintln!("bench: {error}");
        return 1;
    }
    let started = Instant::now();
    let load_before = procfs::load_average();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if load_before > 0.5 * cores {
        eprintln!(
            "bench: warning: load average {load_before:.1} on {cores} cores: something else is \
             running, and timings will show it"
        );
    }
    let mut errors: Vec<String> = Vec::new();
    let mut nginx_version = None;
    if settings.servers.iter().any(|k| k.is_nchan()) {
        match nchan::find_or_install(settings.nchan_install) {
            Ok(install) => {
                nginx_version = Some(nchan::version(&install));
                settings.run.binaries.nchan = Some(install);
            }
            Err(error) => {
                eprintln!("bench: Nchan left out: {error}");
                errors.push(format!("nchan: {error}"));
                settings.servers.retain(|k| !k.is_nchan());
            }
        }
    }
    let names: Vec<String> = settings.servers.iter().map(|k| k.name()).collect();
    eprintln!(
        "bench: servers {}; N = {:?}; {} repeat(s); scenarios {}",
        names.join(", "),
        settings.ns,
        settings.repeat,
        settings
            .scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // A server that fails to start is left out of the runs that follow, so that a missing
    // nudge build still gives Nchan's numbers (and the other way round).
    let mut broken: Vec<Kind> = Vec::new();
    let mut park: Vec<ParkRun> = Vec::new();
    let n_max = settings.ns.last().copied().unwrap_or(0);
    for &scenario in &settings.scenarios {
        for &n in &settings.ns {
            for repeat in 0..settings.repeat {
                for kind in rotated(&settings.servers, repeat) {
                    if broken.contains(&kind) {
                        continue;
                    }
                    let label =
                        format!("{} {} N={n} #{}", kind.name(), scenario.name(), repeat + 1);
                    let clock = Instant::now();
                    match runs::park_run(kind, scenario, n, repeat, n == n_max, &settings.run).await
                    {
                        Ok(result) => {
                            let wake = result.wake.as_ref();
                            eprintln!(
                                "bench: {label}: {:.0} B/poll, parked in {:.1} s, wake p99 {:.1} ms ({:.1} s)",
                                result.pss_bytes_per_poll(),
                                result.park_seconds,
                                wake.map_or(f64::NAN, |w| w.p99_ms),
                                clock.elapsed().as_secs_f64()
                            );
                            park.push(result);
                        }
                        Err(error) => {
                            eprintln!("bench: {label}: FAILED: {error}");
                            errors.push(format!("{label}: {error}"));
                            if error.contains("did not log")
                                || error.contains("did not come up")
                                || error.contains("cannot start")
                            {
                                broken.push(kind);
                            }
                        }
                    }
                }
            }
        }
    }
    let mut rate: Vec<RateRun> = Vec::new();
    if settings.rates {
        for repeat in 0..settings.repeat {
            for kind in rotated(&settings.servers, repeat) {
                // The floor parks and wakes; it has no publish path worth a rate.
                if broken.contains(&kind) || kind == Kind::Floor {
                    continue;
                }
                let label = format!("{} rates #{}", kind.name(), repeat + 1);
                match runs::rate_run(kind, repeat, &settings.run).await {
                    Ok(result) => {
                        eprintln!(
                            "bench: {label}: {:.0} connections/s, {:.0} publishes/s",
                            result.connections_per_second, result.publishes_per_second
                        );
                        rate.push(result);
                    }
                    Err(error) => {
                        eprintln!("bench: {label}: FAILED: {error}");
                        errors.push(format!("{label}: {error}"));
                    }
                }
            }
        }
    }

    let results = report::Results {
        servers: &names,
        scenarios: &settings.scenarios,
        ns: &settings.ns,
        park: &park,
        rate: &rate,
    };
    let load_after = procfs::load_average();
    let (cores, cpu, kernel) = procfs::machine();
    let command = command_line();
    let elapsed = started.elapsed().as_secs_f64();
    let targets = results.targets();

    println!();
    println!(
        "nudge vs Nchan: long-poll benchmark ({})",
        settings.mode.name()
    );
    println!("command: {command}");
    println!(
        "machine: {cores} cores, {cpu}, Linux {kernel}; {}; {} repeat(s), medians; {elapsed:.0} s; \
         load average {load_before:.2} before, {load_after:.2} after",
        nginx_version.as_deref().unwrap_or("no nginx"),
        settings.repeat
    );
    println!();
    println!("{}", results.table());
    println!();
    println!("{}", report::NOTES);
    if !targets.is_empty() {
        let reference = names.iter().find(|s| s.starts_with("nchan"));
        println!();
        println!("targets (against {}):", reference.map_or("Nchan", |s| s));
        for (text, ok) in &targets {
            // An indented line explains the target above it.
            if let Some(note) = text.strip_prefix("  ") {
                println!("            {note}");
                continue;
            }
            let mark = match ok {
                Some(true) => "met    ",
                Some(false) => "NOT MET",
                None => "n/a    ",
            };
            println!("  [{mark}] {text}");
        }
    }
    if !errors.is_empty() {
        println!();
        println!("errors:");
        for error in &errors {
            println!("  {}", error.lines().next().unwrap_or_default());
        }
    }

    let document = json!({
        "command": command,
        "machine": {
            "cores": cores,
            "cpu": cpu,
            "kernel": kernel,
            "nginx": nginx_version,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "settings": {
            "mode": settings.mode.name(),
            "n": settings.ns,
            "repeat": settings.repeat,
            "servers": names,
            "scenarios": settings.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "connect_rate": settings.run.pace.connect_rate,
            "connect_window": settings.run.pace.connect_window,
            "sources": settings.run.pace.sources,
            "cpu_window_seconds": settings.run.cpu_window.as_secs_f64(),
            "client_threads": settings.client_threads,
        },
        "elapsed_seconds": elapsed,
        "summary": results.summary_json(),
        "targets": targets.iter().map(|(text, ok)| json!({ "target": text, "met": ok })).collect::<Vec<_>>(),
        "park_runs": park,
        "rate_runs": rate,
        "errors": errors,
    });
    if let Some(path) = &settings.json_path {
        let text = serde_json::to_string_pretty(&document).expect("json");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, text));
        match written {
            Ok(()) => println!("\nJSON: {}", path.display()),
            Err(error) => eprintln!("bench: cannot write {}: {error}", path.display()),
        }
    }
    let mut pictures_ok = true;
    if let Some(dir) = &settings.svg_dir {
        for (name, svg) in [
            ("longpoll-wake.svg", svg::wake(&results)),
            ("longpoll-memory.svg", svg::memory(&results)),
        ] {
            let path = dir.join(name);
            if let Err(error) = svg::check(&svg, &names) {
                eprintln!("bench: {} is not well-formed: {error}", path.display());
                pictures_ok = false;
            }
            let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, svg));
            match written {
                Ok(()) => println!("SVG: {}", path.display()),
                Err(error) => eprintln!("bench: cannot write {}: {error}", path.display()),
            }
        }
    }
    // A nudge run that failed fails the bench (the CI smoke test relies on it); Nchan's
    // problems are reported but do not. A malformed picture fails it too.
    if !pictures_ok
        || errors.iter().any(|e| e.starts_with("nudge"))
        || (park.is_empty() && rate.is_empty())
    {
        1
    } else {
        0
    }
}

/// The servers in the order for repeat `r`: rotated by one each repeat, so that no server
/// always runs first (or right after the same other one).
fn rotated(servers: &[Kind], r: usize) -> Vec<Kind> {
    let mut order = servers.to_vec();
    if !order.is_empty() {
        let len = order.len();
        order.rotate_left(r % len);
    }
    order
}
