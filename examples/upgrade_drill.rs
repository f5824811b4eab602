//! The upgrade-in-place drill (issue 13.5), on the real binary: N parked fast-path polls,
//! `SIGUSR2`, then one publish. Reports whether every poll was answered `new_change` once,
//! by the new process, with no early answer, no connection error, and no refused connection
//! for a client connecting in a loop throughout; how long the handover took; and the new
//! process's memory per parked poll.
//!
//! ```text
//! cargo build --release && cargo run --release --example upgrade_drill -- --polls 15000
//! ```
//! `--bin PATH` picks the binary (default `target/release/nudge`). Both this process and the
//! node hold one descriptor per poll: the open-files limit must allow N plus a few hundred.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nudge_testkit::Node;
use nudge_testkit::node::{FREE_PORTS, Options};
use nudge_testkit::raw::{self, Client, Conn};

const POLLS_PER_CHANNEL: usize = 4;

#[tokio::main]
async fn main() {
    let mut polls = 15_000usize;
    let mut bin = PathBuf::from("target/release/nudge");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--polls" => polls = args.next().and_then(|n| n.parse().ok()).expect("--polls N"),
            "--bin" => bin = args.next().expect("--bin PATH").into(),
            other => panic!("unknown argument {other}"),
        }
    }
    let bin = std::fs::canonicalize(&bin).expect("the nudge binary (cargo build --release)");
    let dir = std::env::temp_dir().join(format!("nudge-upgrade-drill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("nudge");
    let _ = std::fs::remove_file(&exe);
    std::os::unix::fs::symlink(&bin, &exe).unwrap();
    let pid_file = dir.join("nudge.pid");
    let mut command = Command::new(&exe);
    command
        .args(FREE_PORTS)
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--retry-timeout", "10m", "--ttl", "20m"])
        .env("RUST_LOG", "info");
    let mut node = Node::spawn(command, Options::default()).unwrap_or_else(|e| panic!("{e}"));
    let old_pid = node.pid();
    let baseline_kb = nudge_testkit::memory::memory(old_pid).unwrap().rss_kb;

    // Channels on one topic, POLLS_PER_CHANNEL polls each.
    let mut api = Client::new(node.internal);
    let channels = polls.div_ceil(POLLS_PER_CHANNEL);
    let mut ids = Vec::with_capacity(channels);
    for _ in 0..channels {
        let res = api
            .request(
                "POST",
                "/v1/channels",
                Some("application/json"),
                br#"{"topics":["drill"]}"#,
            )
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        ids.push(body["channel"].as_str().unwrap().to_owned());
    }
    let mut conns = Vec::with_capacity(polls);
    for i in 0..polls {
        let mut conn = Conn::connect(node.public).await.expect("connect");
        let id = &ids[i / POLLS_PER_CHANNEL];
        conn.send(raw::get(&format!("/subscribe?channel={id}"), "").as_bytes())
            .await
            .unwrap();
        conns.push(conn);
    }
    wait_parked(&mut api, polls).await;

    // A client connecting in a loop throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let connecting = tokio::spawn(connect_loop(node.public, stop.clone()));

    let started = Instant::now();
    assert!(node.signal("USR2"));
    let status = node
        .exited(Duration::from_secs(60))
        .await
        .expect("the old process exits");
    let handover = started.elapsed();
    let new_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let guard = KillOnDrop(new_pid);
    let early = conns.iter_mut().filter_map(|c| c.try_complete()).count();
    let logged = node
        .logs()
        .into_iter()
        .find(|l| l.contains("connections handed over"))
        .unwrap_or_default();

    // The new process holds them all: publish once and read every answer.
    let mut api = Client::new(node.internal);
    let parked_after = parked_within(&mut api, polls, Duration::from_secs(10)).await;
    let new_kb = nudge_testkit::memory::memory(new_pid).unwrap().rss_kb;
    let published = Instant::now();
    api.request(
        "POST",
        "/v1/publish",
        Some("application/json"),
        br#"{"topic":"drill"}"#,
    )
    .await
    .unwrap();
    let (mut new_change, mut other, mut errors) = (0, 0, 0);
    for conn in &mut conns {
        match tokio::time::timeout(Duration::from_secs(30), conn.read_response()).await {
            Ok(Ok(r)) if r.body_text() == r#"{"message":"new_change"}"# => new_change += 1,
            Ok(Ok(_)) => other += 1,
            _ => errors += 1,
        }
    }
    let answered_in = published.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (refused, connected) = connecting.await.unwrap();
    let per_poll = (new_kb.saturating_sub(baseline_kb) * 1024) as f64 / polls as f64;

    println!("upgrade drill: {polls} parked fast-path polls, SIGUSR2, one publish");
    println!("  old pid {old_pid} exited {status}; new pid {new_pid}");
    println!("  handover (SIGUSR2 to the old process's exit): {handover:?}");
    println!("  old process's log: {logged}");
    println!("  early answers: {early}; parked on the new process: {parked_after}");
    println!(
        "  new_change: {new_change}  other answers: {other}  errors: {errors}  (in {answered_in:?})"
    );
    println!("  connect loop: {connected} connected, {refused} refused");
    println!(
        "  new process RSS {new_kb} KiB, baseline {baseline_kb} KiB: {per_poll:.0} B per parked poll"
    );
    println!(
        "{}",
        serde_json::json!({
            "polls": polls, "handover_ms": handover.as_millis() as u64, "early": early, "parked_after": parked_after,
            "new_change": new_change, "other": other, "errors": errors,
            "refused": refused, "connected": connected, "bytes_per_poll": per_poll.round(),
        })
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    let ok = status.success()
        && early == 0
        && new_change == polls
        && other == 0
        && errors == 0
        && refused == 0;
    std::process::exit(if ok { 0 } else { 1 });
}

async fn wait_parked(api: &mut Client, polls: usize) {
    let parked = parked_within(api, polls, Duration::from_secs(120)).await;
    assert_eq!(parked, polls, "only {parked} of {polls} polls parked");
}

/// The parked polls once there are `polls` of them, or at `within`.
async fn parked_within(api: &mut Client, polls: usize, within: Duration) -> usize {
    let until = Instant::now() + within;
    loop {
        let res = api.request("GET", "/metrics", None, b"").await.unwrap();
        let parked = res
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("nudge_parked_polls "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if parked as usize >= polls || Instant::now() >= until {
            return parked as usize;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect_loop(addr: SocketAddr, stop: Arc<AtomicBool>) -> (usize, usize) {
    let (mut refused, mut connected) = (0, 0);
    let until = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => connected += 1,
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (refused, connected)
}

/// The new process is not our child: kill it at the end, whatever happened.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        nudge_testkit::node::signal(&[self.0], "TERM");
    }
}
