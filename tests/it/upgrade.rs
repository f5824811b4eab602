//! The upgrade in place on the real binary (issue 13.1, 13.2, 13.5, 13.7): `SIGUSR2` hands
//! the listeners, the parked fast-path polls and the hub to the binary at the path the node
//! was started from; a bad binary there changes nothing.
//!
//! The node is started through a symlink in a temporary directory, as a deploy would have
//! it: repointing the symlink is "deploying" a new binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nudge_testkit::Node;
use nudge_testkit::node::{FREE_PORTS, Options};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::http_client;
use crate::tools::TempDir;
use nudge_testkit::raw;

const BIN: &str = env!("CARGO_BIN_EXE_nudge");

/// A node started from `dir/nudge` (a symlink), with a pid file; follows the upgrades.
struct Deployed {
    dir: TempDir,
    node: Node,
    http: reqwest::Client,
    /// Pids of processes that took over, killed at the end.
    successors: Vec<u32>,
}

impl Deployed {
    fn start(flags: &[&str]) -> Deployed {
        let dir = TempDir::new("upgrade");
        let exe = dir.path().join("nudge");
        std::os::unix::fs::symlink(BIN, &exe).unwrap();
        let pid_file = dir.path().join("nudge.pid");
        let mut command = Command::new(&exe);
        command
            .args(FREE_PORTS)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(flags)
            .env("RUST_LOG", "info");
        let node = Node::spawn(command, Options::default()).unwrap_or_else(|e| panic!("{e}"));
        Deployed {
            dir,
            node,
            http: http_client(Duration::from_secs(30)),
            successors: Vec::new(),
        }
    }

    fn public(&self) -> SocketAddr {
        self.node.public
    }

    fn exe(&self) -> PathBuf {
        self.dir.path().join("nudge")
    }

    /// "Deploys" `target` (a file) as the node's binary.
    fn deploy(&self, target: &Path) {
        let tmp = self.dir.path().join("nudge.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, self.exe()).unwrap();
    }

    /// A script deployed as the binary.
    fn deploy_script(&self, name: &str, body: &str) {
        let path = self.dir.write(name, format!("#!/bin/sh\n{body}\n"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.deploy(&path);
    }

    fn pid_in_file(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("nudge.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let res = self
            .http
            .post(format!("http://{}{path}", self.node.internal))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    async fn register(&self, topic: &str) -> String {
        let body = self
            .post("/v1/channels", json!({ "topics": [topic] }))
            .await;
        body["channel"].as_str().unwrap().to_owned()
    }

    async fn publish(&self, topic: &str) -> Value {
        self.post("/v1/publish", json!({ "topic": topic })).await
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.node.internal))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        crate::support::metric_sample(&text, name)
    }

    /// `SIGUSR2`, then waits for the old process to exit 0 and the pid file to name the new
    /// one; returns the new pid.
    async fn upgrade(&mut self) -> u32 {
        let old = self.node.pid();
        assert!(self.node.signal("USR2"));
        let status = self
            .node
            .exited(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("the old process did not exit: {:?}", self.node.logs()));
        assert!(
            status.success(),
            "old process: {status}; {:?}",
            self.node.logs()
        );
        let new = self
            .pid_in_file()
            .expect("the pid file names the new process");
        assert_ne!(new, old);
        self.successors.push(new);
        new
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        nudge_testkit::node::signal(&self.successors, "KILL");
    }
}

/// `n` raw polls parked on the channels (`per` each), each on its own connection.
async fn park(node: &Deployed, channels: &[String], per: usize) -> Vec<raw::Conn> {
    let mut conns = Vec::new();
    for id in channels {
        for _ in 0..per {
            let mut conn = raw::Conn::connect(node.public()).await.unwrap();
            conn.send(raw::get(&format!("/subscribe?channel={id}"), "").as_bytes())
                .await
                .unwrap();
            conns.push(conn);
        }
    }
    let want = (channels.len() * per) as f64;
    let until = Instant::now() + Duration::from_secs(10);
    while node.metric("nudge_parked_polls").await < want {
        assert!(Instant::now() < until, "polls not parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conns
}

/// No poll has an answer yet.
fn none_answered(conns: &mut [raw::Conn]) -> usize {
    conns.iter_mut().filter_map(|c| c.try_complete()).count()
}

/// Every poll is answered `new_change` within a few seconds.
async fn all_new_change(conns: &mut [raw::Conn]) {
    for (i, conn) in conns.iter_mut().enumerate() {
        let answer = tokio::time::timeout(Duration::from_secs(10), conn.read_response())
            .await
            .unwrap_or_else(|_| panic!("poll {i} not answered"))
            .unwrap_or_else(|e| panic!("poll {i}: {e}"));
        assert_eq!(answer.status, 200, "poll {i}");
        assert_eq!(
            answer.body_text(),
            r#"{"message":"new_change"}"#,
            "poll {i}"
        );
    }
}

/// Connects to `addr` in a loop (bounded) until stopped; counts refusals and successes.
fn connect_loop(addr: SocketAddr) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let (mut refused, mut ok) = (0, 0);
        let until = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed) && Instant::now() < until {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (refused, ok)
    });
    (stop, task)
}

#[tokio::test]
async fn sigusr2_hands_over_listeners_and_parked_polls_to_the_new_binary() {
    let mut node = Deployed::start(&[]);
    let mut channels = Vec::new();
    for _ in 0..50 {
        channels.push(node.register("t").await);
    }
    let mut conns = park(&node, &channels, 4).await;
    let (stop, connecting) = connect_loop(node.public());
    let old = node.node.pid();

    let new = node.upgrade().await;

    assert_eq!(
        none_answered(&mut conns),
        0,
        "a parked poll was answered by the handover"
    );
    node.node
        .wait_log(&format!("pid={new}"), Duration::from_secs(5));
    // The new process holds every poll, and knows every channel.
    assert_eq!(node.metric("nudge_parked_polls").await, 200.0);
    assert_eq!(node.metric("nudge_channels").await, 50.0);
    let report = node.publish("t").await;
    assert_eq!(report["woken"], 200, "{report}");
    all_new_change(&mut conns).await;
    stop.store(true, Ordering::Relaxed);
    let (refused, ok) = connecting.await.unwrap();
    assert_eq!(
        refused, 0,
        "connection attempts refused during the handover"
    );
    assert!(ok > 0);
    // The 200 parked polls, and any connection of the connect loop open and idle then.
    assert!(node.moved() >= 200, "moved={}", node.moved());
    assert_ne!(old, new);
}

#[tokio::test]
async fn a_bad_binary_changes_nothing_and_the_next_good_one_takes_over() {
    let mut node = Deployed::start(&["--upgrade-timeout", "2s"]);
    let channel = node.register("t").await;
    let mut conns = park(&node, std::slice::from_ref(&channel), 4).await;
    let old = node.node.pid();

    // A binary that exits 1 at once, one that never connects, one that is not there.
    node.deploy_script("exits", "exit 1");
    assert!(node.node.signal("USR2"));
    node.node
        .wait_log("upgrade abandoned", Duration::from_secs(10));
    node.deploy_script("hangs", "exec sleep 60");
    assert!(node.node.signal("USR2"));
    let until = Instant::now() + Duration::from_secs(10);
    while node
        .node
        .logs()
        .iter()
        .filter(|l| l.contains("upgrade abandoned"))
        .count()
        < 2
    {
        assert!(Instant::now() < until, "{:?}", node.node.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.deploy(&node.dir.path().join("missing"));
    assert!(node.node.signal("USR2"));
    let until = Instant::now() + Duration::from_secs(10);
    while node
        .node
        .logs()
        .iter()
        .filter(|l| l.contains("upgrade abandoned"))
        .count()
        < 3
    {
        assert!(Instant::now() < until, "{:?}", node.node.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The old process serves on: still running, same pid file, polls still parked and
    // unanswered, and new registrations and polls work.
    assert!(node.node.try_exit().is_none());
    assert_eq!(node.pid_in_file(), Some(old));
    assert_eq!(none_answered(&mut conns), 0);
    assert_eq!(node.metric("nudge_parked_polls").await, 4.0);
    let second = node.register("u").await;
    let mut more = park(&node, std::slice::from_ref(&second), 1).await;
    assert_eq!(
        node.metric("nudge_upgrades_total{outcome=\"abandoned\"}")
            .await,
        3.0
    );

    // The real binary again: it takes over (old exits 0, the pid file names the new one).
    assert_eq!(none_answered(&mut more), 0);
    node.deploy(Path::new(BIN));
    node.upgrade().await;
}

/// A new process that gets past `hello` (the old one has stopped accepting and taken its
/// parked polls off the hub) and then dies, or hangs: the old one takes every connection
/// back, parks its polls again, and serves on; a publish then answers them all, once.
#[tokio::test]
async fn a_new_process_that_fails_after_hello_gives_everything_back() {
    let mut node = Deployed::start(&["--upgrade-timeout", "2s"]);
    let channels = vec![node.register("t").await, node.register("t").await];
    let mut conns = park(&node, &channels, 3).await;
    let old = node.node.pid();
    // An internal keep-alive connection, taken off hyper for the handover each round: the
    // old process serves it again.
    let mut keep = raw::Conn::connect(node.node.internal).await.unwrap();
    assert_eq!(publish_on(&mut keep, "elsewhere").await.status, 200);
    // A "binary" that speaks the first steps of the handover: hello, read the header, then
    // exit 3 (or hang, and be killed at --upgrade-timeout).
    let halfway = |then: &str| {
        format!(
            r#"exec python3 -c '
import json, os, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["NUDGE_UPGRADE_FROM"])
hello = json.dumps({{"kind": "hello", "protocol": 1, "pid": os.getpid(), "takes_internal": True}}).encode()
s.sendall(struct.pack("<Q", len(hello)) + hello)
n = struct.unpack("<Q", s.recv(8, socket.MSG_WAITALL))[0]
s.recv(n, socket.MSG_WAITALL)
{then}'"#
        )
    };
    for (round, then) in [(1, "sys.exit(3)"), (2, "time.sleep(60)")] {
        node.deploy_script(&format!("halfway{round}"), &halfway(then));
        assert!(node.node.signal("USR2"));
        let until = Instant::now() + Duration::from_secs(10);
        while node
            .node
            .logs()
            .iter()
            .filter(|l| l.contains("upgrade abandoned"))
            .count()
            < round
        {
            assert!(Instant::now() < until, "{:?}", node.node.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(node.node.try_exit().is_none());
        assert_eq!(node.pid_in_file(), Some(old));
        let early: Vec<String> = conns
            .iter_mut()
            .filter_map(|c| c.try_complete())
            .map(|r| r.body_text())
            .collect();
        assert!(
            early.is_empty(),
            "round {round}: answered by the failed handover: {early:?} {:?}",
            node.node.logs()
        );
        assert_eq!(
            node.metric("nudge_parked_polls").await,
            6.0,
            "polls not parked again"
        );
        let answer = publish_on(&mut keep, "elsewhere").await;
        assert_eq!(answer.status, 200, "round {round}: {}", answer.text());
    }
    let report = node.publish("t").await;
    assert_eq!(report["woken"], 6, "{report}");
    all_new_change(&mut conns).await;
    // And it still accepts.
    let fresh = node.register("u").await;
    park(&node, std::slice::from_ref(&fresh), 1).await;
}

/// What moves without the hub's state: the listeners (no refusal; the new process serves
/// the internal API and new polls) and every fast-path connection (the old process's log
/// counts them; the new one answers them).
#[tokio::test]
async fn sigusr2_hands_over_the_listeners_and_every_fast_path_connection() {
    let mut node = Deployed::start(&[]);
    let channel = node.register("t").await;
    let mut conns = park(&node, std::slice::from_ref(&channel), 4).await;
    // Idle keep-alive connections move too: one that has had an answer and sends nothing.
    let mut idle = raw::Conn::connect(node.public()).await.unwrap();
    idle.send(
        raw::get(
            "/subscribe?channel=AAAAAAAAAAAAAAAAAAAAAA&dont_block=true",
            "",
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    idle.read_response().await.unwrap();
    let (stop, connecting) = connect_loop(node.public());
    let new = node.upgrade().await;
    node.node
        .wait_log(&format!("taken over pid={new}"), Duration::from_secs(5));
    // The four parked polls and the idle connection (and any connection of the connect
    // loop that was open and idle at that moment).
    let moved = node.moved();
    assert!(moved >= 5, "moved={moved}");
    // The new process serves the internal API and new polls on the inherited listeners,
    // and the idle connection it was handed.
    let fresh = node.register("u").await;
    let mut later = park(&node, std::slice::from_ref(&fresh), 1).await;
    idle.send(raw::get(&format!("/subscribe?channel={fresh}&dont_block=true"), "").as_bytes())
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), idle.read_response())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.body_text(), r#"{"message":"no_change"}"#);
    node.publish("u").await;
    all_new_change(&mut later).await;
    // The moved polls are parked on the new process, which knows their channel.
    assert_eq!(none_answered(&mut conns), 0);
    node.publish("t").await;
    all_new_change(&mut conns).await;
    stop.store(true, Ordering::Relaxed);
    let (refused, ok) = connecting.await.unwrap();
    assert_eq!(
        refused, 0,
        "connection attempts refused during the handover"
    );
    assert!(ok > 0);
}

#[tokio::test]
async fn publishes_registrations_revocations_and_polls_racing_the_handover_lose_nothing() {
    let mut node = Deployed::start(&[]);
    let mut channels = Vec::new();
    for _ in 0..20 {
        channels.push(node.register("race").await);
    }
    let mut conns = park(&node, &channels, 2).await;
    let mut late_channels = Vec::new();
    for _ in 0..10 {
        late_channels.push(node.register("race").await);
    }
    let internal = node.node.internal;
    let public = node.public();
    let stop = Arc::new(AtomicBool::new(false));
    // Clients leaving: ten parked clients close their connections, one every few ms, while
    // the handover runs.
    let leavers: Vec<raw::Conn> = conns.drain(..10).collect();
    let leaving = tokio::spawn(async move {
        for conn in leavers {
            drop(conn);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    // Polls arriving: up to 30 new parked polls, one every few ms, across the handover.
    let arriving = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut late = Vec::new();
            while late.len() < 30 && !stop.load(Ordering::Relaxed) {
                let id = &late_channels[late.len() % late_channels.len()];
                let mut conn = raw::Conn::connect(public).await.unwrap();
                conn.send(raw::get(&format!("/subscribe?channel={id}"), "").as_bytes())
                    .await
                    .unwrap();
                late.push(conn);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            late
        })
    };
    let failures = Arc::new(AtomicUsize::new(0));
    // Registrations and revocations on the internal listener (a pooled keep-alive client,
    // as a main API has), and fresh polls (answered at once with dont_block) on the public
    // one, in bounded loops across the handover: each gets an answer from one process or
    // the other, at the first attempt. Nothing is sent twice: a keep-alive connection that
    // is idle at the handover moves to the new process rather than being closed under a
    // request on its way.
    let mut tasks = Vec::new();
    for worker in 0..3 {
        let (stop, failures) = (stop.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let http = http_client(Duration::from_secs(30));
            let until = Instant::now() + Duration::from_secs(30);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                n += 1;
                let ok = match worker {
                    0 => {
                        let body = json!({ "topics": [format!("other-{n}")], "subject": "s" });
                        post_once(&http, &format!("http://{internal}/v1/channels"), &body).await
                    }
                    1 => {
                        let body = json!({ "subject": "s" });
                        post_once(&http, &format!("http://{internal}/v1/revoke"), &body).await
                    }
                    _ => {
                        let conn = raw::Conn::connect(public).await;
                        match conn {
                            Ok(mut conn) => {
                                let req = raw::get(
                                    "/subscribe?channel=AAAAAAAAAAAAAAAAAAAAAA&dont_block=true",
                                    "",
                                );
                                conn.send(req.as_bytes()).await.is_ok()
                                    && tokio::time::timeout(
                                        Duration::from_secs(10),
                                        conn.read_response(),
                                    )
                                    .await
                                    .is_ok_and(|r| r.is_ok())
                            }
                            Err(_) => false,
                        }
                    }
                };
                if !ok {
                    eprintln!("worker {worker} failed at {n}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    node.upgrade().await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    leaving.await.unwrap();
    let mut late = arriving.await.unwrap();
    assert!(!late.is_empty());
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed across the handover"
    );
    assert_eq!(none_answered(&mut conns), 0);
    // Every poll that arrived during the handover, parked on one process or moved to the
    // new one, is answered by the publish, once; none before it.
    assert_eq!(none_answered(&mut late), 0);
    node.publish("race").await;
    all_new_change(&mut conns).await;
    all_new_change(&mut late).await;
}

/// The hub's side of the handover, racing publishes (bounded rounds): a publish that lands
/// before the sweep answers the poll `new_change` in the old process; one after it finds no
/// waiter and leaves the pending mark that the snapshot carries. Never neither, never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_a_publish_racing_the_detach_is_answered_or_left_pending_never_lost() {
    use nudge::hub::{Outcome, PollRequest, PollStart, Publish, Registration};
    let limits = nudge::hub::Limits {
        ttl: Duration::from_secs(600),
        retry_timeout: Duration::from_secs(60),
        max_retries: 10,
    };
    let (mut answered, mut pending) = (0, 0);
    for _ in 0..300 {
        let (hub, _) = crate::support::hub(limits, 1000);
        let id = hub
            .register(Registration {
                topics: vec!["t".into()],
                ..Default::default()
            })
            .unwrap()
            .id
            .to_string();
        let PollStart::Park(mut parked) = hub.poll(&id, PollRequest::default()) else {
            panic!("parks")
        };
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                hub.publish(
                    &[Publish {
                        topic: "t".into(),
                        position: None,
                        stream_type: None,
                    }],
                    "api",
                )
            })
        };
        let detached = hub.detach_parked();
        publisher.await.unwrap();
        let outcome = std::future::poll_fn(|cx| parked.poll_outcome(cx)).await;
        let info = hub.channel_info(&id).unwrap();
        match outcome {
            Outcome::Answer(answer) => {
                assert_eq!(answer, nudge::hub::Answer::NewChange);
                assert!(!info.pending, "answered and pending: applied twice");
                assert_eq!(detached.polls, 0);
                answered += 1;
            }
            Outcome::Handover(token) => {
                assert!(
                    info.pending,
                    "detached and not pending: the publish is lost"
                );
                assert_eq!(detached.polls, 1);
                drop(token);
                pending += 1;
            }
        }
        // Whatever happened, a poll now is not started (the node is moving).
        assert!(matches!(
            hub.poll(&id, PollRequest::default()),
            PollStart::Moving
        ));
        drop(parked);
    }
    assert_eq!(answered + pending, 300);
}

/// With a bus, the new process reads on from the old one's position: a publish appended
/// while the old one's reader is stopped is applied once, by the new process.
#[tokio::test]
async fn with_a_bus_the_new_process_reads_on_from_the_old_ones_position() {
    let redis = nudge_testkit::redis::RedisServer::start("redis-server")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut node = Deployed::start(&["--redis-url", &redis.url()]);
    node.wait_ready().await;
    let channels = vec![node.register("t").await, node.register("t").await];
    let mut conns = park(&node, &channels, 2).await;
    // Publishes keep coming during the handover: each lands in the stream, and the one
    // process reading at that moment applies it.
    let internal = node.node.internal;
    let publishing = tokio::spawn(async move {
        let http = http_client(Duration::from_secs(30));
        let mut ok = 0;
        for _ in 0..200 {
            let res = http
                .post(format!("http://{internal}/v1/publish"))
                .json(&json!({ "topic": "elsewhere" }))
                .send()
                .await;
            if res.is_ok_and(|r| r.status().is_success()) {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ok
    });
    node.upgrade().await;
    assert_eq!(
        publishing.await.unwrap(),
        200,
        "publishes failed across the handover"
    );
    assert_eq!(none_answered(&mut conns), 0);
    node.wait_ready().await;
    node.publish("t").await;
    all_new_change(&mut conns).await;
}

/// The ids answered `max_retries` move with the hub: a client that ignores `max_retries`
/// and polls again after the upgrade is held and answered `reconnect`, as it was before,
/// not told `max_retries` again as if the id were new.
#[tokio::test]
async fn not_live_ids_are_still_remembered_after_the_handover() {
    let mut node = Deployed::start(&[]);
    let poll = |public| async move {
        let mut conn = raw::Conn::connect(public).await.unwrap();
        conn.send(raw::get("/subscribe?channel=BBBBBBBBBBBBBBBBBBBBBB", "").as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), conn.read_response())
            .await
            .expect("no answer")
            .unwrap();
        answer.body_text()
    };
    assert_eq!(poll(node.public()).await, r#"{"message":"max_retries"}"#);
    assert_eq!(poll(node.public()).await, r#"{"message":"reconnect"}"#);
    node.upgrade().await;
    assert_eq!(
        poll(node.public()).await,
        r#"{"message":"reconnect"}"#,
        "the new process did not know the id was answered max_retries"
    );
    node.node.wait_log("not_live=1", Duration::from_secs(5));
}

/// `POST /v1/publish` of `topic` on `conn`, and its answer (within 10 s).
async fn publish_on(conn: &mut raw::Conn, topic: &str) -> raw::Response {
    let body = json!({ "topic": topic }).to_string();
    let request = raw::request_bytes(
        "POST",
        "/v1/publish",
        Some("application/json"),
        body.as_bytes(),
    );
    conn.send(&request).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), conn.read_response())
        .await
        .expect("no answer")
        .expect("the connection broke")
}

/// POSTs `body` once: whether it was answered with a success.
async fn post_once(http: &reqwest::Client, url: &str, body: &Value) -> bool {
    match http.post(url).json(body).send().await {
        Ok(res) => res.status().is_success(),
        Err(e) => {
            eprintln!("{url}: {e}");
            false
        }
    }
}

/// The internal API's connections between requests move with the handover instead of
/// being closed (closing one races a request on its way, and the main API cannot tell
/// whether its publish was applied): a keep-alive connection that had an answer, one
/// whose next request had begun to arrive, one accepted before its first request, and one
/// whose first request had begun to arrive (and stalls: it does not hold the handover up).
/// Each request is answered by the new process, on its connection, at the first attempt.
#[tokio::test]
async fn internal_connections_between_requests_move_and_their_next_request_is_answered() {
    let mut node = Deployed::start(&[]);
    let channel = node.register("t").await;
    let internal = node.node.internal;
    // Connected first, so that the old process has accepted it by the time the others
    // have had their answers: it has sent nothing, and hyper closes such a connection at
    // once when told to shut down.
    let mut fresh = raw::Conn::connect(internal).await.unwrap();
    let mut first_halfway = raw::Conn::connect(internal).await.unwrap();
    let mut idle = raw::Conn::connect(internal).await.unwrap();
    let mut halfway = raw::Conn::connect(internal).await.unwrap();
    for conn in [&mut idle, &mut halfway] {
        let answer = publish_on(conn, "elsewhere").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(!answer.closes());
    }
    // The next request's head begins to arrive before the signal and ends after it.
    let request = raw::request_bytes(
        "POST",
        "/v1/publish",
        Some("application/json"),
        br#"{"topic":"t"}"#,
    );
    let (head, rest) = request.split_at(20);
    halfway.send(head).await.unwrap();
    first_halfway.send(head).await.unwrap();
    let mut parked = park(&node, std::slice::from_ref(&channel), 1).await;
    node.upgrade().await;
    let rest_of = |mut conn: raw::Conn| async move {
        conn.send(rest).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), conn.read_response())
            .await
            .expect("no answer")
            .expect("the connection broke")
    };
    let answers = [
        ("halfway", rest_of(halfway).await),
        ("first halfway", rest_of(first_halfway).await),
        ("idle", publish_on(&mut idle, "t").await),
        ("fresh", publish_on(&mut fresh, "t").await),
    ];
    for (name, answer) in answers {
        assert_eq!(answer.status, 200, "{name}: {}", answer.text());
        assert!(
            answer.body_text().contains(r#""published":1"#),
            "{name}: {}",
            answer.text()
        );
    }
    // Answered by the new process, which knows the parked poll: the first publish woke it.
    all_new_change(&mut parked).await;
    assert!(node.moved() >= 4, "the four internal connections moved");
}

impl Deployed {
    /// What the old process's log says it moved (it logs it as its handover ends, which
    /// may come after the new process already serves: waited for). The new process's
    /// "serving the connections handed over" has no count.
    fn moved(&self) -> usize {
        const LINE: &str = "connections handed over moved=";
        self.node.wait_log(LINE, Duration::from_secs(10));
        self.node
            .log_field(LINE)
            .and_then(|n| n.parse().ok())
            .expect("the old process logs what it moved")
    }

    async fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let res = self
                .http
                .get(format!("http://{}/readyz", self.node.internal))
                .send()
                .await;
            if res.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < until, "not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
