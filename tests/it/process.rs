//! Operations on the real `nudge` binary (SPEC §6, issue 4): the drain on SIGTERM and SIGINT
//! (answers spread over `--drain-period`, `/readyz` 503, no new connections, keep-alive
//! connections closed, exit 0), `--max-parked` derived from the open-files limit, slow
//! senders cut by `--header-read-timeout`, JSON logs, and logs that never carry a secret.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use nudge_testkit::Node;
use nudge_testkit::node::{FREE_PORTS, Options};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::raw;
use crate::support::{body_text, eventually, http_client, metric_sample, refused, secs, status};
use crate::tools::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_nudge");

/// A running `nudge` binary on free loopback ports, with every log line it wrote.
struct Nudge {
    node: Node,
    public: SocketAddr,
    internal: SocketAddr,
    http: reqwest::Client,
    token: Option<String>,
}

impl Nudge {
    /// `nudge ARGS --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0`, `RUST_LOG=info`
    /// unless `env` says otherwise.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Nudge {
        Nudge::from(Node::start(BIN, args, env))
    }

    /// Starts the binary through `bash -c SCRIPT`, where the script ends in
    /// `exec "$0" "$@"` (e.g. to set resource limits first).
    fn start_via_shell(script: &str, args: &[&str]) -> Nudge {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", script, BIN])
            .args(args)
            .args(FREE_PORTS)
            .env("RUST_LOG", "info");
        Nudge::from(Node::spawn(cmd, Options::default()).unwrap_or_else(|e| panic!("{e}")))
    }

    fn from(node: Node) -> Nudge {
        Nudge {
            public: node.public,
            internal: node.internal,
            node,
            http: http_client(Duration::from_secs(30)),
            token: None,
        }
    }

    fn logs(&self) -> Vec<String> {
        self.node.logs()
    }

    /// Waits until a log line contains `needle`.
    fn wait_log(&self, needle: &str, within: Duration) {
        self.node.wait_log(needle, within);
    }

    fn signal(&self, name: &str) {
        assert!(self.node.signal(name), "kill -{name}");
    }

    /// Waits for the exit; returns the exit code.
    fn wait_exit(&mut self, within: Duration) -> i32 {
        let status = self.node.wait_exit(within).unwrap_or_else(|| {
            panic!(
                "nudge did not exit within {within:?}; logs: {:?}",
                self.logs()
            )
        });
        status.code().expect("exited, not killed by a signal")
    }

    fn internal_req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("http://{}{path}", self.internal));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Registers a channel on `topic`; returns its id and the path of its URL.
    async fn register(&self, topic: &str) -> (String, String) {
        let body = self
            .post("/v1/channels", format!(r#"{{"topics":["{topic}"]}}"#), 201)
            .await;
        let url = body["entries"][0]["url"].as_str().unwrap();
        let path = url
            .strip_prefix(&format!("http://{}", self.public))
            .unwrap();
        (
            body["channel"].as_str().unwrap().to_owned(),
            path.to_owned(),
        )
    }

    async fn publish(&self, topic: &str) {
        self.post("/v1/publish", format!(r#"{{"topic":"{topic}"}}"#), 200)
            .await;
    }

    /// POSTs `body` to an internal route, expects `status`, returns the JSON answer.
    async fn post(&self, path: &str, body: String, status: u16) -> Value {
        let res = self
            .internal_req(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "POST {path}");
        res.json().await.unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = body_text(self.internal_req(reqwest::Method::GET, "/metrics")).await;
        metric_sample(&text, name)
    }

    async fn wait_parked(&self, n: usize) {
        eventually(&format!("{n} polls parked"), secs(10.0), || async move {
            self.metric("nudge_parked_polls").await == n as f64
        })
        .await;
    }

    /// Starts a poll on its own connection; resolves to the answer and when it came.
    fn spawn_poll(&self, path: &str) -> tokio::task::JoinHandle<(raw::Response, Instant, bool)> {
        let (addr, request) = (self.public, raw::get(path, ""));
        tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let res = raw::exchange(&mut conn, &request, secs(60.0))
                .await
                .unwrap();
            let at = Instant::now();
            let closed = raw::closed_within(&mut conn, secs(2.0)).await;
            (res, at, closed)
        })
    }
}

// ---- the drain --------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_drains_parked_polls_spread_over_the_period_then_exits_0() {
    drain_on_sigterm("true").await;
}

#[tokio::test]
async fn sigterm_drains_the_same_way_on_the_hyper_path() {
    drain_on_sigterm("false").await;
}

async fn drain_on_sigterm(fast_path: &str) {
    const POLLS: usize = 20;
    let period = secs(2.0);
    let mut node = Nudge::start(&["--drain-period", "2s", "--fast-path", fast_path], &[]);
    let mut polls = Vec::new();
    // Five channels of four polls (the default per-channel limit).
    for i in 0..5 {
        let (_, path) = node.register(&format!("t{i}")).await;
        for _ in 0..POLLS / 5 {
            polls.push(node.spawn_poll(&path));
        }
    }
    // An idle keep-alive connection: one request answered, then nothing.
    let (_, path) = node.register("idle").await;
    let mut idle = TcpStream::connect(node.public).await.unwrap();
    let res = raw::poll_now(&mut idle, &path).await.unwrap();
    assert_eq!(res.text(), r#"{"message":"no_change"}"#);
    node.wait_parked(POLLS).await;
    assert_eq!(
        node.metric("nudge_open_connections").await,
        POLLS as f64 + 1.0
    );

    let sent = Instant::now();
    node.signal("TERM");

    // At once: /readyz turns 503, the public listener refuses new connections, and idle
    // keep-alive connections are closed.
    let readyz = format!("http://{}/readyz", node.internal);
    eventually("/readyz answers 503", secs(1.0), || async {
        node.http.get(&readyz).send().await.unwrap().status() == 503
    })
    .await;
    let not_ready = sent.elapsed();
    eventually("new connections are refused", secs(1.0), || async {
        TcpStream::connect(node.public).await.is_err()
    })
    .await;
    let refused = sent.elapsed();
    assert!(
        raw::closed_within(&mut idle, secs(1.0)).await,
        "the idle keep-alive connection was not closed"
    );
    let idle_closed = sent.elapsed();

    let mut answered = Vec::new();
    for p in polls {
        let (res, at, closed) = p.await.unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), r#"{"message":"reconnect"}"#);
        assert_eq!(res.header("connection"), Some("close"));
        assert!(closed, "the connection closes after its answer");
        answered.push(at.duration_since(sent));
    }
    let code = node.wait_exit(secs(10.0));
    let total = sent.elapsed();
    answered.sort();
    let (first, last) = (answered[0], answered[POLLS - 1]);
    let report = format!(
        "fast path {fast_path}: readyz 503 after {not_ready:?}, refused after {refused:?}, idle closed after \
         {idle_closed:?}; answers {answered:?}; exit {code} after {total:?}"
    );
    assert_eq!(code, 0, "{report}");
    // All of that happened while the drain was still answering polls.
    assert!(
        idle_closed < last && not_ready < last && refused < last,
        "{report}"
    );
    // Spread: from about 0 to about (n-1)/n of the period (1.9 s), evenly.
    assert!(first < secs(0.5), "{report}");
    assert!(last - first >= period.mul_f64(0.75), "{report}");
    assert!(last < period + secs(1.0), "{report}");
    let most_in_250ms = answered
        .iter()
        .map(|&t| {
            answered
                .iter()
                .filter(|&&u| u >= t && u < t + secs(0.25))
                .count()
        })
        .max()
        .unwrap();
    assert!(most_in_250ms <= 5, "a bunch of {most_in_250ms}: {report}");
    assert!(total < period + secs(2.0), "{report}");
    let logs = node.logs().join("\n");
    assert!(
        logs.contains("SIGTERM") && logs.contains("drained"),
        "{logs}"
    );
}

#[tokio::test]
async fn sigint_drains_the_same_way() {
    let mut node = Nudge::start(&["--drain-period", "1s"], &[]);
    let (_, path) = node.register("t").await;
    let polls: Vec<_> = (0..3).map(|_| node.spawn_poll(&path)).collect();
    node.wait_parked(3).await;
    let sent = Instant::now();
    node.signal("INT");
    for p in polls {
        let (res, _, _) = p.await.unwrap();
        assert_eq!(res.text(), r#"{"message":"reconnect"}"#);
    }
    assert_eq!(node.wait_exit(secs(10.0)), 0);
    assert!(sent.elapsed() < secs(3.0), "{:?}", sent.elapsed());
    assert!(node.logs().join("\n").contains("SIGINT"));
}

#[tokio::test]
async fn with_nothing_parked_the_drain_exits_at_once() {
    let mut node = Nudge::start(&["--drain-period", "10s"], &[]);
    let sent = Instant::now();
    node.signal("TERM");
    assert_eq!(node.wait_exit(secs(10.0)), 0);
    assert!(sent.elapsed() < secs(2.0), "{:?}", sent.elapsed());
}

/// `--pid-file` (and its environment twin) holds the process id while the node runs, from
/// before its `listening` lines, and is gone after the drain; a directory that cannot hold
/// it stops the start with exit 64.
#[tokio::test]
async fn the_pid_file_follows_the_process() {
    let dir = TempDir::new("pid");
    let path = dir.path().join("nudge.pid");
    let path_text = path.to_str().unwrap();
    for (args, env) in [
        (vec!["--pid-file", path_text], vec![]),
        (vec![], vec![("NUDGE_PID_FILE", path_text)]),
    ] {
        let mut node = Nudge::start(&args, &env);
        let written = std::fs::read_to_string(&path).expect("written before `listening`");
        assert_eq!(written, format!("{}\n", node.node.pid()));
        node.signal("TERM");
        assert_eq!(node.wait_exit(secs(10.0)), 0);
        assert!(!path.exists(), "removed at exit");
    }
    let out = Command::new(BIN)
        .args(["--pid-file", "/nonexistent-dir/nudge.pid"])
        .args(FREE_PORTS)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pid-file"));
}

/// `--worker-threads N` runs N threads serving connections (what `top -H` shows an
/// operator as `nudge-worker`), and the node serves as usual on them.
#[tokio::test]
async fn worker_threads_sets_how_many_threads_serve() {
    for threads in [1usize, 3] {
        let mut node = Nudge::start(&["--worker-threads", &threads.to_string()], &[]);
        let (_, path) = node.register("t").await;
        let mut conn = TcpStream::connect(node.public).await.unwrap();
        let res = raw::poll_now(&mut conn, &path).await.unwrap();
        assert_eq!(res.text(), r#"{"message":"no_change"}"#);
        let tasks = std::fs::read_dir(format!("/proc/{}/task", node.node.pid())).unwrap();
        let workers = tasks
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim() == "nudge-worker")
            .count();
        assert_eq!(workers, threads, "--worker-threads {threads}");
        node.signal("TERM");
        assert_eq!(node.wait_exit(secs(10.0)), 0);
    }
}

// ---- limits -----------------------------------------------------------------------------

/// nudge raises its soft open-files limit to the hard one, and `--max-parked` defaults to
/// that minus a reserve of 256: with soft 300 and hard 400, 144 polls park and the 145th
/// is `503 over_capacity` (had the soft limit not been raised, it would be 44).
#[tokio::test]
async fn max_parked_defaults_to_the_raised_open_files_limit_minus_a_reserve() {
    const DERIVED: usize = 400 - 256;
    // This test holds that many connections itself.
    nudge::server::raise_open_files_limit();
    let mut node = Nudge::start_via_shell(
        r#"ulimit -Sn 300 && ulimit -Hn 400 && exec "$0" "$@""#,
        &["--max-polls-per-channel", "1000", "--drain-period", "1s"],
    );
    node.wait_log("configured", secs(5.0));
    let logs = node.logs().join("\n");
    assert!(
        logs.contains(&format!("max_parked={DERIVED}")),
        "the derived limit is logged: {logs}"
    );
    let (_, path) = node.register("t").await;
    let mut conns = Vec::new();
    for _ in 0..DERIVED {
        let mut conn = TcpStream::connect(node.public).await.unwrap();
        conn.write_all(raw::get(&path, "").as_bytes())
            .await
            .unwrap();
        conns.push(conn);
    }
    node.wait_parked(DERIVED).await;
    let mut one_more = TcpStream::connect(node.public).await.unwrap();
    let res = raw::exchange(&mut one_more, &raw::get(&path, ""), secs(5.0))
        .await
        .unwrap();
    assert_eq!(res.status, 503);
    assert_eq!(res.header("retry-after"), Some("5"));
    let body: Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(body["code"], "over_capacity");

    node.signal("TERM");
    for conn in &mut conns {
        let res = raw::read_response(conn, secs(10.0)).await.unwrap();
        assert_eq!(res.text(), r#"{"message":"reconnect"}"#);
    }
    assert_eq!(node.wait_exit(secs(10.0)), 0);
}

#[tokio::test]
async fn slow_senders_and_idle_connections_are_cut_by_the_header_read_timeout() {
    for fast_path in ["true", "false"] {
        cut_by_header_read_timeout(fast_path).await;
    }
}

async fn cut_by_header_read_timeout(fast_path: &str) {
    let mut node = Nudge::start(
        &["--header-read-timeout", "1s", "--fast-path", fast_path],
        &[],
    );
    let (_, path) = node.register("t").await;
    let start = Instant::now();

    // Connected, silent.
    let mut silent = TcpStream::connect(node.public).await.unwrap();
    // Sends its request head one byte every 100 ms: 4 s for the whole head.
    let drip = TcpStream::connect(node.public).await.unwrap();
    let (mut drip_read, mut drip_write) = drip.into_split();
    let dripper = tokio::spawn(async move {
        for b in b"GET /subscribe?channel=AAAAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\n" {
            if drip_write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Answered once, then idle on keep-alive.
    let mut idle = TcpStream::connect(node.public).await.unwrap();
    let res = raw::poll_now(&mut idle, &path).await.unwrap();
    assert_eq!(res.status, 200);

    let (silent_cut, drip_cut, idle_cut) = tokio::join!(
        async {
            assert!(raw::closed_within(&mut silent, secs(5.0)).await);
            start.elapsed()
        },
        async {
            assert!(raw::closed_within(&mut drip_read, secs(5.0)).await);
            start.elapsed()
        },
        async {
            assert!(raw::closed_within(&mut idle, secs(5.0)).await);
            start.elapsed()
        },
    );
    dripper.abort();
    for (what, took) in [
        ("silent", silent_cut),
        ("drip", drip_cut),
        ("idle", idle_cut),
    ] {
        assert!(
            took >= secs(0.9) && took < secs(3.0),
            "fast path {fast_path}: {what} cut after {took:?}"
        );
    }
    // A prompt client is served as ever.
    let mut prompt = TcpStream::connect(node.public).await.unwrap();
    let res = raw::poll_now(&mut prompt, &path).await.unwrap();
    assert_eq!(res.text(), r#"{"message":"no_change"}"#);
    node.signal("TERM");
    assert_eq!(node.wait_exit(secs(10.0)), 0);
}

// ---- logs and secrets -------------------------------------------------------------------

const TOKEN: &str = "internal-token-never-logged-7f3a";
const CLIENT_AUTH: &str = "Bearer client-api-secret-never-logged";
const WRONG: &str = "Bearer wrong-token-never-logged";
const FAKE_ID: &str = "a-secret-looking-channel-value";

/// Runs nudge at `RUST_LOG=trace` through a channel's life with every secret in play, then
/// returns its logs, the channel id, and its short hash.
async fn a_life_at_trace(format: &str) -> (Vec<String>, String, String) {
    let dir = TempDir::new("logs");
    let token_file = dir.write("token", format!("{TOKEN}\n"));
    let mut node = Nudge::start(
        &[
            "--log-format",
            format,
            "--internal-token-file",
            token_file.to_str().unwrap(),
            "--drain-period",
            "1s",
        ],
        &[("RUST_LOG", "trace")],
    );
    node.token = Some(TOKEN.to_owned());
    let (id, path) = node.register("user:1").await;
    let with_auth = |p: &str| raw::get(p, &format!("Authorization: {CLIENT_AUTH}\r\n"));

    let mut conn = TcpStream::connect(node.public).await.unwrap();
    conn.write_all(with_auth(&path).as_bytes()).await.unwrap();
    node.wait_parked(1).await;
    node.publish("user:1").await;
    let res = raw::read_response(&mut conn, secs(10.0)).await.unwrap();
    assert_eq!(res.text(), r#"{"message":"new_change"}"#);
    for p in [
        format!("{path}&dont_block=true"),
        format!("/subscribe?channel={FAKE_ID}"),
    ] {
        raw::exchange(&mut conn, &with_auth(&p), secs(10.0))
            .await
            .unwrap();
    }
    let channel = format!("/v1/channels/{id}");
    let get = node.internal_req(reqwest::Method::GET, &channel);
    assert_eq!(status(get).await, 200);
    let metrics = node.http.get(format!("http://{}/metrics", node.internal));
    assert_eq!(status(metrics.header("authorization", WRONG)).await, 401);
    let delete = node.internal_req(reqwest::Method::DELETE, &channel);
    assert_eq!(status(delete).await, 204);
    let res = raw::exchange(&mut conn, &with_auth(&path), secs(10.0))
        .await
        .unwrap();
    assert_eq!(res.text(), r#"{"message":"max_retries"}"#);

    node.signal("TERM");
    assert_eq!(node.wait_exit(secs(10.0)), 0);
    let short = nudge::id::ChannelId::parse(&id).unwrap().short();
    (node.logs(), id, short)
}

fn assert_no_secret(logs: &[String], id: &str) {
    for line in logs {
        for secret in [TOKEN, CLIENT_AUTH, "client-api-secret", WRONG, FAKE_ID, id] {
            assert!(!line.contains(secret), "{secret:?} logged: {line}");
        }
    }
}

#[tokio::test]
async fn json_logs_are_json_lines_without_secrets_even_at_trace() {
    let (logs, id, short) = a_life_at_trace("json").await;
    assert!(logs.len() > 10, "trace logs something: {logs:?}");
    let mut listening = 0;
    for line in &logs {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v.get(key).is_some(), "no {key}: {line}");
        }
        if v["message"] == "listening" {
            listening += 1;
        }
    }
    assert_eq!(listening, 2, "one line per bound address");
    assert!(
        logs.iter()
            .any(|l| l.contains(r#""max_parked""#) && l.contains(r#""message":"configured""#))
    );
    for what in ["channel registered", "poll", "delete"] {
        assert!(
            logs.iter().any(|l| l.contains(&short) && l.contains(what)),
            "a debug line names the channel of {what:?} by its short hash {short}"
        );
    }
    assert_no_secret(&logs, &id);
}

#[tokio::test]
async fn text_logs_carry_no_secret_even_at_trace() {
    let (logs, id, short) = a_life_at_trace("text").await;
    assert!(logs.iter().any(|l| l.contains(&short)));
    assert_eq!(
        logs.iter().filter(|l| l.contains(" listening ")).count(),
        2,
        "{logs:?}"
    );
    assert_no_secret(&logs, &id);
}

#[test]
fn a_bad_token_file_is_refused_with_exit_64() {
    let dir = TempDir::new("badtoken");
    let short = dir.write("short", "too-short\n");
    let missing = dir.path().join("missing");
    for (file, says) in [
        (short.to_str().unwrap(), "at least 16"),
        (missing.to_str().unwrap(), "--internal-token-file"),
    ] {
        let stderr = refused(&["--internal-token-file", file]);
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("too-short"), "the token is not echoed");
    }
}

#[test]
fn unreadable_tls_files_are_refused_with_exit_64() {
    let dir = TempDir::new("badtls");
    let not_pem = dir.write("cert.pem", "this is not a certificate\n");
    let key = dir.write("key.pem", "nor is this a key\n");
    for args in [
        vec![
            "--tls-cert",
            not_pem.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        vec!["--tls-cert", not_pem.to_str().unwrap()],
    ] {
        assert!(refused(&args).contains("--tls-"));
    }
}
