//! `--state-dir` (issue 13.4) on the real binary: a node killed with SIGKILL and started
//! again on the same address knows its channels, so their clients re-poll the same URL and
//! are served without going back to the main API; without a bus every restored channel is
//! pending, with one only what the bus says it missed is; the drain writes a last snapshot;
//! expired channels stay gone; and a missing, empty, foreign, truncated, altered or
//! other-version file is ignored with a warning.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use nudge_testkit::Node;
use nudge_testkit::node::Options;
use nudge_testkit::redis::RedisServer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{eventually, http_client, metric_sample, secs};
use crate::tools::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_nudge");

/// A node on a fixed public address (the one its channel URLs name), so that a restart
/// answers the same URLs.
struct Restartable {
    public: SocketAddr,
    args: Vec<String>,
    node: Option<Node>,
    internal: SocketAddr,
    http: reqwest::Client,
}

impl Restartable {
    fn new(state_dir: &TempDir, extra: &[&str]) -> Restartable {
        let public: SocketAddr = format!("127.0.0.1:{}", nudge_testkit::free_port())
            .parse()
            .unwrap();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            public.to_string(),
            "--internal-listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state_dir.path().to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = Restartable {
            public,
            args,
            node: None,
            internal: public,
            http: http_client(Duration::from_secs(30)),
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let mut command = Command::new(BIN);
        command.args(&self.args).env("RUST_LOG", "info");
        let node = Node::spawn(command, Options::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(node.public, self.public);
        self.internal = node.internal;
        // A fresh client: pooled connections to the previous process are dead.
        self.http = http_client(Duration::from_secs(30));
        self.node = Some(node);
    }

    fn node(&mut self) -> &mut Node {
        self.node.as_mut().expect("running")
    }

    /// SIGKILL: no drain, no last snapshot.
    fn crash(&mut self) {
        self.node().kill();
        self.node = None;
    }

    fn logs(&self) -> Vec<String> {
        self.node.as_ref().expect("running").logs()
    }

    fn log_with(&self, needle: &str) -> String {
        self.logs()
            .into_iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?}: {:?}", self.logs()))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let res = self
            .http
            .post(format!("http://{}{path}", self.internal))
            .json(&body)
            .send()
            .await
            .unwrap();
        (res.status(), res.json().await.unwrap())
    }

    /// Registers a channel; returns its poll URL.
    async fn register(&self, body: Value) -> String {
        let (status, body) = self.post("/v1/channels", body).await;
        assert_eq!(status, StatusCode::CREATED);
        body["entries"][0]["url"].as_str().unwrap().to_owned()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.internal))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_sample(&text, name)
    }

    /// Waits until more than `n` snapshots have been written since the start.
    async fn wait_snapshots_past(&self, n: f64) {
        eventually("snapshots written", secs(10.0), || async {
            self.metric("nudge_state_snapshots_total").await > n
        })
        .await;
    }

    /// Waits until the state file holds the channels of these poll URLs (a count of
    /// snapshots would not do: one may have been taken just before a registration, and
    /// the node writes nothing more while nothing changes).
    async fn wait_written(&self, dir: &TempDir, urls: &[&str]) {
        let file = dir.path().join("nudge.state");
        eventually("the state file holds the channels", secs(10.0), || async {
            let Ok(bytes) = std::fs::read(&file) else {
                return false;
            };
            let Ok(snapshot) = nudge::wire::snapshot::decode(&bytes) else {
                return false;
            };
            urls.iter().all(|url| {
                snapshot
                    .hub
                    .channels
                    .iter()
                    .any(|c| url.contains(&format!("channel={}&", c.id)))
            })
        })
        .await;
    }

    /// One poll's `message` (`extra` appended to the URL).
    async fn poll(&self, url: &str, extra: &str) -> String {
        let res = self.http.get(format!("{url}{extra}")).send().await.unwrap();
        let body: Value = res.json().await.unwrap();
        body["message"].as_str().unwrap().to_owned()
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.kill();
        }
    }
}

#[tokio::test]
async fn a_crashed_node_comes_back_knowing_its_channels() {
    let dir = TempDir::new("state");
    let mut node = Restartable::new(&dir, &["--state-interval", "200ms"]);
    let url = node
        .register(json!({ "topics": ["user:1"], "subject": "user:1" }))
        .await;
    node.wait_written(&dir, &[&url]).await;
    let file = dir.path().join("nudge.state");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        "channel ids are credentials: the file is the node's alone"
    );

    node.crash();
    node.start();
    let restored = node.log_with("state restored");
    assert!(restored.contains("channels=1"), "{restored}");
    assert_eq!(node.metric("nudge_state_restored_channels").await, 1.0);
    // Without a bus the node cannot know what it missed: the change is assumed.
    assert_eq!(node.poll(&url, "").await, "new_change");
    // And it is a channel like any other: it parks, and a publish wakes it.
    let parked = tokio::spawn({
        let (http, url) = (node.http.clone(), url.clone());
        async move {
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            body["message"].as_str().unwrap().to_owned()
        }
    });
    eventually("the poll parked", secs(10.0), || async {
        node.metric("nudge_parked_polls").await == 1.0
    })
    .await;
    assert_eq!(
        node.post("/v1/publish", json!({ "topic": "user:1" }))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(parked.await.unwrap(), "new_change");
    // A revocation still finds it by its subject.
    let (_, body) = node
        .post("/v1/revoke", json!({ "subject": "user:1" }))
        .await;
    assert_eq!(body["revoked"], 1);
}

#[tokio::test]
async fn an_idle_node_writes_its_state_only_when_something_changed() {
    let dir = TempDir::new("state-idle");
    let node = Restartable::new(&dir, &["--state-interval", "100ms"]);
    // The first tick writes (a new node has never been written), then nothing changes.
    node.wait_snapshots_past(0.0).await;
    let idle = node.metric("nudge_state_snapshots_total").await;
    let watched = std::time::Instant::now();
    eventually("twenty ticks of an idle node", secs(5.0), || async {
        watched.elapsed() > Duration::from_secs(2)
    })
    .await;
    assert_eq!(
        node.metric("nudge_state_snapshots_total").await,
        idle,
        "nothing changed: nothing written"
    );
    // A registration is a change: written at the next tick.
    let url = node.register(json!({ "topics": ["t"] })).await;
    node.wait_written(&dir, &[&url]).await;
    // Counted once the file is in place: a moment after it can be read.
    node.wait_snapshots_past(idle).await;
    // And so is a poll (its ttl clock, its mark).
    let after = node.metric("nudge_state_snapshots_total").await;
    assert_eq!(node.poll(&url, "&dont_block=true").await, "no_change");
    node.wait_snapshots_past(after).await;
}

/// A state directory that goes away (a volume unmounted, a cleanup run too wide): every
/// failed write is counted (the alert `NudgeStateNotWritten` reads the counter), the node
/// goes on serving, and writes again once the directory is back. Root ignores file modes,
/// so removing the directory is the way to make a write fail here.
#[tokio::test]
async fn a_state_that_cannot_be_written_is_counted_and_written_once_it_can() {
    let dir = TempDir::new("state-gone");
    let node = Restartable::new(&dir, &["--state-interval", "100ms"]);
    let url = node.register(json!({ "topics": ["t"] })).await;
    node.wait_written(&dir, &[&url]).await;
    assert_eq!(
        node.metric("nudge_state_snapshot_failures_total").await,
        0.0
    );

    std::fs::remove_dir_all(dir.path()).unwrap();
    let later = node.register(json!({ "topics": ["u"] })).await;
    eventually("failed writes counted", secs(10.0), || async {
        node.metric("nudge_state_snapshot_failures_total").await >= 2.0
    })
    .await;
    node.log_with("state not written; will retry");
    // Still serving.
    assert_eq!(node.poll(&later, "&dont_block=true").await, "no_change");

    std::fs::create_dir(dir.path()).unwrap();
    node.wait_written(&dir, &[&url, &later]).await;
    eventually("written again", secs(10.0), || async {
        node.logs()
            .iter()
            .any(|l| l.contains("state written again"))
    })
    .await;
}

#[tokio::test]
async fn the_drain_writes_the_last_state_and_expired_channels_stay_gone() {
    let dir = TempDir::new("state-drain");
    // Snapshots an hour apart: only the drain's can hold these channels.
    let mut node = Restartable::new(&dir, &["--state-interval", "1h"]);
    let kept = node.register(json!({ "topics": ["t"] })).await;
    let short = node.register(json!({ "topics": ["t"], "ttl": 1 })).await;
    node.node().signal("TERM");
    assert!(
        node.node()
            .wait_exit(secs(15.0))
            .is_some_and(|s| s.success())
    );
    node.node = None;
    assert!(dir.path().join("nudge.state").exists());
    // Past the short channel's ttl.
    let written = std::time::Instant::now();
    eventually("the 1 s ttl ran out", secs(5.0), || async {
        written.elapsed() > Duration::from_millis(1500)
    })
    .await;
    node.start();
    let restored = node.log_with("state restored");
    assert!(
        restored.contains("channels=1") && restored.contains("skipped=1"),
        "{restored}"
    );
    assert_eq!(node.poll(&kept, "&dont_block=true").await, "new_change");
    assert_eq!(node.poll(&short, "").await, "max_retries");
}

#[tokio::test]
async fn a_state_file_that_is_not_a_good_one_is_ignored_with_a_warning() {
    let dir = TempDir::new("state-bad");
    // A good file to spoil.
    let mut node = Restartable::new(&dir, &["--state-interval", "200ms"]);
    let url = node.register(json!({ "topics": ["t"] })).await;
    node.wait_written(&dir, &[&url]).await;
    node.crash();
    let good = std::fs::read(dir.path().join("nudge.state")).unwrap();
    let mut altered = good.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x01;
    let mut other_version = good.clone();
    other_version[8] = 99;
    for (what, bytes, says) in [
        ("empty", Vec::new(), "not a nudge state file"),
        (
            "foreign",
            b"{\"channels\":[]}".to_vec(),
            "not a nudge state file",
        ),
        (
            "truncated",
            good[..good.len() * 2 / 3].to_vec(),
            "truncated",
        ),
        ("altered", altered, "checksum"),
        ("another version", other_version, "format version 99"),
    ] {
        std::fs::write(dir.path().join("nudge.state"), &bytes).unwrap();
        node.start();
        let warning = node.log_with("state ignored");
        assert!(warning.contains(says), "{what}: {warning}");
        // It serves: the old channel is unknown, a new one works.
        assert_eq!(node.poll(&url, "").await, "max_retries", "{what}");
        let fresh = node.register(json!({ "topics": ["t"] })).await;
        assert_eq!(
            node.poll(&fresh, "&dont_block=true").await,
            "no_change",
            "{what}"
        );
        node.crash();
    }
}

#[tokio::test]
async fn with_a_bus_a_restored_node_replays_what_it_missed_and_nothing_else() {
    let redis = RedisServer::start("redis-server")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("state-bus");
    let url = redis.url();
    let mut node = Restartable::new(&dir, &["--state-interval", "200ms", "--redis-url", &url]);
    eventually("the bus is up", secs(10.0), || async {
        node.metric("nudge_bus_connected").await == 1.0
    })
    .await;
    let hit = node.register(json!({ "topics": ["user:1"] })).await;
    let quiet = node.register(json!({ "topics": ["user:2"] })).await;
    node.wait_written(&dir, &[&hit, &quiet]).await;
    node.crash();
    // While the node is down the main API appends a change for one of the two.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg("nudge:publish")
        .arg("*")
        .arg("m")
        .arg(r#"{"topic":"user:1"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();

    node.start();
    eventually("the bus is back", secs(10.0), || async {
        node.metric("nudge_bus_connected").await == 1.0
    })
    .await;
    assert!(node.log_with("state restored").contains("channels=2"));
    eventually("the missed entry replayed", secs(10.0), || async {
        node.metric("nudge_bus_entries_replayed_total").await == 1.0
    })
    .await;
    assert_eq!(node.poll(&hit, "&dont_block=true").await, "new_change");
    assert_eq!(
        node.poll(&quiet, "&dont_block=true").await,
        "no_change",
        "nothing else is woken"
    );
    assert_eq!(
        node.metric(r#"nudge_bus_gaps_total{cause="reconnect",repair="replayed"}"#)
            .await,
        1.0
    );
}

#[test]
fn a_state_dir_that_cannot_be_used_exits_64_naming_the_flag() {
    let file = TempDir::new("state-file");
    let not_a_dir = file.write("plain", "x");
    let out = Command::new(BIN)
        .args(["--state-dir", not_a_dir.to_str().unwrap()])
        .args(nudge_testkit::node::FREE_PORTS)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-dir"));
}
