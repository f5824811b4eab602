//! The `nudge` binary itself: flags, environment, bound addresses in the log, exit codes.

use std::process::Command;
use std::time::Duration;

use nudge_testkit::Node;
use tokio::time::Instant;

use crate::support::{body_json, body_text, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_nudge");

/// A running `nudge` on free loopback ports, with the addresses it logged.
fn start(args: &[&str], env: &[(&str, &str)]) -> Node {
    Node::start(BIN, args, env)
}

/// Waits for the exit; returns the exit code.
fn wait_exit(node: &mut Node, within: Duration) -> i32 {
    let status = node
        .wait_exit(within)
        .unwrap_or_else(|| panic!("nudge did not exit within {within:?}"));
    status.code().expect("exited, not killed")
}

#[tokio::test]
async fn starts_on_free_ports_serves_and_exits_0_on_sigterm() {
    let mut node = start(
        &["--drain-period", "1s"],
        &[("NUDGE_RETRY_TIMEOUT", "30s"), ("NUDGE_TTL", "3m")],
    );
    let http = reqwest::Client::new();
    let res = http
        .get(format!("http://{}/healthz", node.internal))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The environment twins of the flags took effect.
    let reg = body_json(
        http.post(format!("http://{}/v1/channels", node.internal))
            .header("content-type", "application/json")
            .body(r#"{"topics":["t"]}"#),
    )
    .await;
    assert_eq!(reg["entries"][0]["retry_timeout"], 30);
    assert_eq!(reg["entries"][0]["ttl"], "3");
    let url = reg["entries"][0]["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("http://{}/subscribe?channel=", node.public)));
    let poll = tokio::spawn({
        let http = http.clone();
        async move { body_text(http.get(url)).await }
    });
    // Parked: visible in the node's own gauge.
    let metrics = format!("http://{}/metrics", node.internal);
    eventually("the poll parked", Duration::from_secs(5), || async {
        let m = body_text(http.get(&metrics)).await;
        m.lines().any(|l| l == "nudge_parked_polls 1")
    })
    .await;
    let start = Instant::now();
    assert!(node.signal("TERM"));
    assert_eq!(poll.await.unwrap(), r#"{"message":"reconnect"}"#);
    assert_eq!(wait_exit(&mut node, Duration::from_secs(10)), 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        start.elapsed()
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_flag() {
    for (args, flag) in [
        (vec!["--ttl", "soon"], "--ttl"),
        (vec!["--retry-timeout", "0s"], "--retry-timeout"),
        (
            vec!["--max-polls-per-channel", "0"],
            "--max-polls-per-channel",
        ),
        (vec!["--listen", "nowhere"], "--listen"),
        (
            vec!["--internal-listen", "0.0.0.0:0"],
            "--internal-token-file",
        ),
        (vec!["--public-url", "example.com"], "--public-url"),
        (vec!["--log-format", "xml"], "--log-format"),
        (vec!["--worker-threads", "0"], "--worker-threads"),
        (vec!["--redis-url", "rediss://redis.internal"], "rediss://"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .env("NUDGE_MAX_RETRIES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-retries"));
}

#[test]
fn help_lists_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--internal-listen",
        "--public-url",
        "--ttl",
        "--retry-timeout",
        "--max-retries",
        "--max-parked",
        "--max-polls-per-channel",
        "--max-channels",
        "--max-topic-bytes",
        "--pid-file",
        "--drain-period",
        "--header-read-timeout",
        "--redis-url",
        "--redis-stream",
        "--redis-sentinel",
        "--redis-master-name",
        "--bus-retention",
        "--bus-max-entries",
        "--gap-wake-rate",
        "--state-dir",
        "--state-interval",
        "--internal-token-file",
        "--cors-origin",
        "--log-format",
        "--tls-cert",
        "--tls-key",
        "--fast-path",
        "--worker-threads",
        "NUDGE_MAX_PARKED",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}
