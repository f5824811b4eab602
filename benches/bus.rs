//! What the Redis-stream bus adds to publish → wake (issue 12, item 7: at most 1 ms at p50
//! on loopback over a node without a bus). `cargo bench --bench bus`; see `benches/README.md`
//! for what is measured, how, and the knobs.
//!
//! The tour:
//! - `rig`: the setups, and their processes (Redis, one or two nudge nodes) started fresh.
//! - `resp`: just enough of Redis's protocol to `XADD` and `XREAD` with exact times.
//! - `rounds`: one measured run: warm-up, then rounds of park → publish → answers read.
//! - `report`: percentiles pooled over repeats, the table, the target, the breakdown.
//!
//! Each (setup, number of polls) runs on fresh processes, repeated with the setups'
//! order rotated each repeat. Every wait is on something observable, with a deadline.

#[allow(dead_code, unused_imports)] // the bench uses two of its readers
#[path = "longpoll/procfs.rs"]
mod procfs;
#[path = "bus/report.rs"]
mod report;
#[path = "bus/resp.rs"]
mod resp;
#[path = "bus/rig.rs"]
mod rig;
#[path = "bus/rounds.rs"]
mod rounds;
#[allow(dead_code)] // the median is the long-poll bench's
#[path = "longpoll/stats.rs"]
mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nudge_testkit::settings::{env, env_list, env_number};
use serde_json::json;

use crate::rig::Setup;
use crate::rounds::Run;

/// The bench's knobs, all from `NUDGE_BENCH_*` environment variables.
pub struct Settings {
    /// `full`, `quick` or `test` (no `--bench`: as `cargo test --all-targets` runs it).
    mode: &'static str,
    pub rounds: usize,
    pub warmup: usize,
    repeat: usize,
    polls: Vec<usize>,
    setups: Vec<Setup>,
    /// How long one run (one setup, one number of polls, one repeat) may take.
    pub run_limit: Duration,
    pub nudge: PathBuf,
    pub redis_server: PathBuf,
    json_path: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        // cargo passes `--bench` to a bench it runs for `cargo bench`, and not under `cargo test`.
        let benching = std::env::args().any(|arg| arg == "--bench");
        let mode = if env("NUDGE_BENCH_QUICK").is_some_and(|v| v != "0") {
            "quick"
        } else if benching {
            "full"
        } else {
            "test"
        };
        let pick = |full: usize, quick: usize, test: usize| match mode {
            "full" => full,
            "quick" => quick,
            _ => test,
        };
        let polls: Vec<usize> = env_list("NUDGE_BENCH_POLLS", "1,100")
            .iter()
            .map(|n| {
                n.parse()
                    .ok()
                    .filter(|&n| (1..=1000).contains(&n))
                    .unwrap_or_else(|| {
                        eprintln!(
                            "bench: NUDGE_BENCH_POLLS holds {n}, not a number from 1 to 1000"
                        );
                        std::process::exit(64)
                    })
            })
            .collect();
        let setups = env_list("NUDGE_BENCH_SETUPS", "nobus,bus-node,bus-xadd,redis")
            .iter()
            .map(|s| {
                Setup::parse(s).unwrap_or_else(|| {
                    eprintln!(
                        "bench: NUDGE_BENCH_SETUPS: {s} is none of nobus, bus-node, bus-xadd, redis"
                    );
                    std::process::exit(64)
                })
            })
            .collect();
        let json_path = env("NUDGE_BENCH_JSON").map(PathBuf::from);
        let json_path = match mode {
            "test" => json_path,
            _ => json_path.or_else(|| Some(default_json_path())),
        };
        Settings {
            mode,
            rounds: env_number("NUDGE_BENCH_ROUNDS", pick(300, 100, 5)).max(1),
            warmup: env_number("NUDGE_BENCH_WARMUP", pick(30, 10, 2)),
            repeat: env_number("NUDGE_BENCH_REPEAT", pick(3, 1, 1)).max(1),
            polls,
            setups,
            run_limit: Duration::from_secs(env_number("NUDGE_BENCH_TIMEOUT_S", 60u64).max(1)),
            nudge: env("NUDGE_BENCH_NUDGE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nudge"))),
            redis_server: env("NUDGE_BENCH_REDIS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("redis-server")),
            json_path,
        }
    }
}

/// `target/bench/bus.json`, found from the bench executable (`target/<profile>/deps/…`).
fn default_json_path() -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("bus.json")
}

/// The command line that reproduces this run: the knobs that were set, then cargo's command.
fn command_line() -> String {
    let mut knobs: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("NUDGE_BENCH_"))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    knobs.sort();
    knobs.push("cargo bench --bench bus".to_owned());
    knobs.join(" ")
}

fn main() {
    let settings = Settings::from_env();
    // One thread: the bench's tasks (a poll's read, the publish) never wait for another
    // thread to be scheduled, and the other core is left to the processes under test.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    std::process::exit(runtime.block_on(run(&settings)));
}

async fn run(settings: &Settings) -> i32 {
    if let Err(error) = resp::self_check() {
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
    eprintln!(
        "bench: {} mode; setups {}; polls {:?}; {} warm-up + {} rounds; {} repeat(s)",
        settings.mode,
        settings
            .setups
            .iter()
            .map(|s| s.key())
            .collect::<Vec<_>>()
            .join(", "),
        settings.polls,
        settings.warmup,
        settings.rounds,
        settings.repeat
    );

    let mut runs: Vec<Run> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for repeat in 0..settings.repeat {
        for (i, &polls) in rotated(&settings.polls, repeat).iter().enumerate() {
            // The setups rotate with the repeat and the position, so none always runs first.
            for setup in rotated(&settings.setups, repeat + i) {
                // Redis alone parks no poll: it runs once per repeat.
                if setup == Setup::RedisAlone && polls != settings.polls[0] {
                    continue;
                }
                let label = format!("{} polls={polls} #{}", setup.key(), repeat + 1);
                let clock = Instant::now();
                match rounds::run(setup, polls, repeat, settings).await {
                    Ok(run) => {
                        let mut wake = run.wake.clone();
                        wake.sort_unstable();
                        eprintln!(
                            "bench: {label}: {} rounds, p50 {:.3} ms, p99 {:.3} ms, load {:.2}→{:.2} ({:.1} s){}",
                            wake.len(),
                            stats::ms(stats::quantile(&wake, 0.5)),
                            stats::ms(stats::quantile(&wake, 0.99)),
                            run.load_before,
                            run.load_after,
                            clock.elapsed().as_secs_f64(),
                            if run.cut_short {
                                ", cut short by NUDGE_BENCH_TIMEOUT_S"
                            } else {
                                ""
                            }
                        );
                        runs.push(run);
                    }
                    Err(error) => {
                        eprintln!("bench: {label}: FAILED: {error}");
                        errors.push(format!("{label}: {error}"));
                    }
                }
            }
        }
    }

    let rows = report::rows(&runs, &settings.setups, &settings.polls);
    let (targets, met) = report::targets(&rows, &settings.polls);
    let load_after = procfs::load_average();
    let (cores, cpu, kernel) = procfs::machine();
    let elapsed = started.elapsed().as_secs_f64();
    let command = command_line();
    println!();
    println!("publish → wake through the bus ({})", settings.mode);
    println!("command: {command}");
    println!(
        "machine: {cores} cores, {cpu}, Linux {kernel}; {} warm-up + {} rounds × {} repeat(s), \
         pooled; {elapsed:.0} s; load average {load_before:.2} before, {load_after:.2} after",
        settings.warmup, settings.rounds, settings.repeat
    );
    println!();
    println!("{}", report::table(&rows));
    println!("{targets}");
    match met {
        Some(true) => println!("target met: the bus adds at most 1 ms at p50"),
        Some(false) => println!("target NOT MET: the bus adds more than 1 ms at p50"),
        None => println!("target: nothing to compare (a no-bus and a bus setup are both needed)"),
    }
    if let Some(breakdown) = report::breakdown(&rows, settings.polls[0]) {
        println!();
        println!("where the time goes, {} poll(s), p50:", settings.polls[0]);
        for line in breakdown.lines() {
            println!("  {line}");
        }
    }
    if !errors.is_empty() {
        println!();
        println!("errors:");
        for error in &errors {
            println!("  {}", error.lines().next().unwrap_or_default());
        }
    }
    if let Some(path) = &settings.json_path {
        let document = json!({
            "command": command,
            "machine": { "cores": cores, "cpu": cpu, "kernel": kernel,
                         "load_average_before": load_before, "load_average_after": load_after },
            "settings": { "mode": settings.mode, "rounds": settings.rounds,
                          "warmup": settings.warmup, "repeat": settings.repeat,
                          "polls": settings.polls,
                          "setups": settings.setups.iter().map(|s| s.key()).collect::<Vec<_>>() },
            "elapsed_seconds": elapsed,
            "target_met": met,
            "runs": runs,
            "errors": errors,
        });
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
    // A run that failed fails the bench (so `cargo test --all-targets` notices); a target
    // not met does not: it is a finding, not a breakage.
    if errors.is_empty() && !runs.is_empty() {
        0
    } else {
        1
    }
}

/// `items` rotated left by `r`, so that no item always comes first.
fn rotated<T: Copy>(items: &[T], r: usize) -> Vec<T> {
    let mut order = items.to_vec();
    if !order.is_empty() {
        let len = order.len();
        order.rotate_left(r % len);
    }
    order
}
