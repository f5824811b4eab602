//! The two servers under test, behind one interface: start a fresh process, say which pids to
//! measure, register what a scenario needs, count parked polls, publish, stop.
//!
//! - **nudge**: the release binary cargo built for this bench, on port 0; its bound addresses are
//!   read from its `listening public=…` / `listening internal=…` log lines. Parked polls are counted
//!   by its `nudge_parked_polls` gauge.
//! - **Nchan**: Debian's nginx with `libnginx-mod-nchan`, configured by [`crate::nchan`] under a
//!   temporary prefix. Parked polls are counted by `nchan_stub_status`'s `subscribers` line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nudge_testkit::node::{FREE_PORTS, Options};
use nudge_testkit::signal;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::http::Connection;
use crate::nchan::{self, NchanInstall};
use crate::procfs;

/// Which server, and for Nchan how many nginx workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nudge,
    /// nudge on one tokio worker thread (`--worker-threads 1`), to show what the second
    /// core buys a wake-up (issue 14.3).
    NudgeOneThread,
    /// The floor (`floor.rs`): driven through the same internal API as nudge.
    Floor,
    Nchan {
        workers: u32,
    },
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Nudge => "nudge".to_owned(),
            Kind::NudgeOneThread => "nudge-1t".to_owned(),
            Kind::Floor => "floor".to_owned(),
            Kind::Nchan { workers } => format!("nchan-{workers}w"),
        }
    }

    /// nudge, on any number of threads.
    pub fn is_nudge(self) -> bool {
        matches!(self, Kind::Nudge | Kind::NudgeOneThread)
    }

    pub fn is_nchan(self) -> bool {
        matches!(self, Kind::Nchan { .. })
    }
}

/// How the parked polls are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// N polls woken by one publish to one topic. nudge: all N on one channel.
    /// Nchan: N subscribers of one channel.
    OneTopic,
    /// N polls woken by one publish to one topic, each poll on a channel of its own.
    /// nudge: N channels bound to the topic. Nchan: each subscriber multiplexes its own channel
    /// and the shared one (`nchan_channel_id $arg_channel $arg_own`), the Nchan way to give every
    /// client a private channel that a shared publish still reaches.
    OneTopicChannelEach,
    /// N topics with one poll each, woken by N publishes (one batch request for nudge, which
    /// takes arrays; N requests for Nchan, which takes one message per request).
    NTopics,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::OneTopic => "one_topic",
            Scenario::OneTopicChannelEach => "one_topic_channel_each",
            Scenario::NTopics => "n_topics",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        [
            Scenario::OneTopic,
            Scenario::OneTopicChannelEach,
            Scenario::NTopics,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// The topic the fan-out scenarios publish to.
pub const FAN_TOPIC: &str = "fan";

/// The topic of the warm-up polls, apart from every measured one.
pub const WARM_TOPIC: &str = "warm";

/// The body Nchan is given to publish: its long-poll subscribers answer with the message itself,
/// so this makes their answer the same JSON that nudge answers.
const NCHAN_MESSAGE: &[u8] = br#"{"message":"new_change"}"#;

/// Control requests run over this many keep-alive connections at once (registrations, Nchan's
/// one-request-per-message publishes).
const CONTROL_CONNECTIONS: usize = 8;

/// A server's process: nudge or the floor, which log their addresses, or nginx's master.
enum Process {
    Logged(nudge_testkit::Node),
    Nginx(Child),
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Process::Logged(node) => node.pid(),
            Process::Nginx(child) => child.id(),
        }
    }

    fn exited(&mut self) -> bool {
        match self {
            Process::Logged(node) => node.try_exit().is_some(),
            Process::Nginx(child) => matches!(child.try_wait(), Ok(Some(_))),
        }
    }
}

/// A running server process (or nginx master with its workers).
pub struct Server {
    pub kind: Kind,
    process: Process,
    /// Where clients poll.
    pub public: SocketAddr,
    /// Where registrations, publishes and counters go.
    pub internal: SocketAddr,
    control: Connection,
    /// Nchan's temporary prefix, removed on stop.
    prefix: Option<PathBuf>,
}

/// What starting a server needs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub nudge: PathBuf,
    pub nchan: Option<NchanInstall>,
}

impl Server {
    pub async fn start(kind: Kind, binaries: &Binaries) -> Result<Server, String> {
        match kind {
            Kind::Nudge => Server::start_nudge(&binaries.nudge, kind, &[]).await,
            Kind::NudgeOneThread => {
                Server::start_nudge(&binaries.nudge, kind, &["--worker-threads", "1"]).await
            }
            Kind::Floor => Server::start_floor().await,
            Kind::Nchan { workers } => {
                let install = binaries.nchan.as_ref().ok_or("Nchan is not installed")?;
                Server::start_nchan(install, workers).await
            }
        }
    }

    async fn start_floor() -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| format!("the bench's own path: {e}"))?;
        let mut command = Command::new(exe);
        command.env(crate::floor::SERVE_ENV, "1");
        Server::start_logging(Kind::Floor, command).await
    }

    async fn start_nudge(binary: &PathBuf, kind: Kind, extra: &[&str]) -> Result<Server, String> {
        let mut command = Command::new(binary);
        command
            .args(FREE_PORTS)
            .args([
                "--max-parked",
                "30000",
                "--retry-timeout",
                "600s",
                "--ttl",
                "30m",
                "--max-polls-per-channel",
                "100000",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        Server::start_logging(kind, command).await
    }

    /// Starts nudge or the floor, which both log `listening public=ADDR` and
    /// `listening internal=ADDR` on stderr.
    async fn start_logging(kind: Kind, command: Command) -> Result<Server, String> {
        let options = Options {
            within: Duration::from_secs(10),
            keep: 20,
            log_file: None,
        };
        let node = nudge_testkit::Node::spawn(command, options)
            .map_err(|e| format!("{}: {e}", kind.name()))?;
        Ok(Server {
            kind,
            public: node.public,
            internal: node.internal,
            control: Connection::new(node.internal),
            process: Process::Logged(node),
            prefix: None,
        })
    }

    async fn start_nchan(install: &NchanInstall, workers: u32) -> Result<Server, String> {
        let setup = nchan::prepare(install, workers)?;
        let child = Command::new(&install.nginx)
            .arg("-p")
            .arg(&setup.prefix)
            .arg("-c")
            .arg(setup.prefix.join("nginx.conf"))
            .arg("-e")
            .arg(setup.prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", install.nginx.display()))?;
        let mut server = Server {
            kind: Kind::Nchan { workers },
            process: Process::Nginx(child),
            public: setup.public,
            internal: setup.internal,
            control: Connection::new(setup.internal),
            prefix: Some(setup.prefix),
        };
        // Ready when its status location answers and all its workers exist.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let workers_up = procfs::children(server.process.pid()).len() >= workers as usize;
            if workers_up && server.parked().await.is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline || server.process.exited() {
                let log = server.prefix.as_ref().map(|p| p.join("error.log"));
                let log = log
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                server.stop().await;
                return Err(format!(
                    "nginx with Nchan did not come up within 10 s:\n{log}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every pid whose memory and CPU count: nudge's one process, or nginx's master and workers.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.process.pid();
        let mut pids = vec![master];
        if self.kind.is_nchan() {
            pids.extend(procfs::children(master));
        }
        pids
    }

    /// Polls parked right now, as the server itself counts them.
    pub async fn parked(&mut self) -> Result<usize, String> {
        let (path, name) = match self.kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => ("/metrics", "nudge_parked_polls"),
            Kind::Nchan { .. } => ("/status", "subscribers:"),
        };
        let text = self.get_text(path).await?;
        metric(&text, name)
            .map(|value| value as usize)
            .ok_or_else(|| format!("GET {path}: no `{name}` line"))
    }

    /// nudge's `nudge_fanout_seconds` histogram, as (sum, count); `None` for Nchan, which has no
    /// such measure, or when nudge does not export it.
    pub async fn fanout_histogram(&mut self) -> Option<(f64, f64)> {
        if !self.kind.is_nudge() {
            return None;
        }
        let text = self.get_text("/metrics").await.ok()?;
        Some((
            metric(&text, "nudge_fanout_seconds_sum")?,
            metric(&text, "nudge_fanout_seconds_count")?,
        ))
    }

    async fn get_text(&mut self, path: &str) -> Result<String, String> {
        let response = self
            .control
            .request("GET", path, None, b"")
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if response.status != 200 {
            return Err(format!("GET {path}: status {}", response.status));
        }
        Ok(response.body_text())
    }

    /// Waits until the server counts `n` parked polls, checking every 10 ms until `deadline`.
    pub async fn wait_parked(&mut self, n: usize, deadline: Instant) -> Result<(), String> {
        let mut last = Err("not asked yet".to_owned());
        while Instant::now() < deadline {
            last = self.parked().await;
            if matches!(last, Ok(count) if count >= n) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "{} parked polls were not counted in time (last: {last:?})",
            n
        ))
    }

    /// Waits until the server counts at most `n` parked polls (the warm-up ones gone).
    pub async fn wait_parked_at_most(&mut self, n: usize, deadline: Instant) -> Result<(), String> {
        let mut last = Err("not asked yet".to_owned());
        while Instant::now() < deadline {
            last = self.parked().await;
            if matches!(last, Ok(count) if count <= n) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "parked polls did not fall to {n} in time (last: {last:?})"
        ))
    }

    /// The subscribe path of the warm-up polls (one channel on [`WARM_TOPIC`]).
    pub async fn warm_paths(&mut self) -> Result<Arc<Vec<String>>, String> {
        let paths = match self.kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => {
                self.register(|_| WARM_TOPIC.to_owned(), 1).await?
            }
            Kind::Nchan { .. } => vec![format!("/sub?channel={WARM_TOPIC}")],
        };
        Ok(Arc::new(paths))
    }

    /// The subscribe paths for `n` polls in `scenario` (poll `i` uses `paths[i % len]`),
    /// registering nudge's channels on the way.
    pub async fn subscribe_paths(
        &mut self,
        scenario: Scenario,
        n: usize,
    ) -> Result<Arc<Vec<String>>, String> {
        let paths = match (self.kind, scenario) {
            (Kind::Nudge | Kind::NudgeOneThread | Kind::Floor, Scenario::OneTopic) => {
                self.register(|_| FAN_TOPIC.to_owned(), 1).await?
            }
            (Kind::Nudge | Kind::NudgeOneThread | Kind::Floor, Scenario::OneTopicChannelEach) => {
                self.register(|_| FAN_TOPIC.to_owned(), n).await?
            }
            (Kind::Nudge | Kind::NudgeOneThread | Kind::Floor, Scenario::NTopics) => {
                self.register(topic_name, n).await?
            }
            (Kind::Nchan { .. }, Scenario::OneTopic) => vec![format!("/sub?channel={FAN_TOPIC}")],
            (Kind::Nchan { .. }, Scenario::OneTopicChannelEach) => (0..n)
                .map(|i| format!("/sub_multi?channel={FAN_TOPIC}&own=c{i}"))
                .collect(),
            (Kind::Nchan { .. }, Scenario::NTopics) => (0..n)
                .map(|i| format!("/sub?channel={}", topic_name(i)))
                .collect(),
        };
        Ok(Arc::new(paths))
    }

    /// Registers `n` nudge channels, channel `i` on topic `topic(i)`, over several connections;
    /// returns their subscribe paths in order.
    async fn register(
        &mut self,
        topic: impl Fn(usize) -> String,
        n: usize,
    ) -> Result<Vec<String>, String> {
        let bodies: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"topics":["{}"]}}"#, topic(i)))
            .collect();
        let answers =
            parallel_requests(self.internal, "/v1/channels", "application/json", bodies).await?;
        answers
            .into_iter()
            .map(|(status, body)| {
                if status != 201 {
                    return Err(format!("POST /v1/channels: status {status}: {body}"));
                }
                subscribe_path(&body).ok_or_else(|| format!("no entries[0].url in {body}"))
            })
            .collect()
    }

    /// One publish to `topic`; returns when the server has answered it.
    pub async fn publish(&mut self, topic: &str) -> Result<(), String> {
        let (path, content_type, body) = match self.kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => (
                "/v1/publish".to_owned(),
                "application/json",
                format!(r#"{{"topic":"{topic}"}}"#).into_bytes(),
            ),
            Kind::Nchan { .. } => (
                format!("/pub?channel={topic}"),
                "application/json",
                NCHAN_MESSAGE.to_vec(),
            ),
        };
        let response = self
            .control
            .request("POST", &path, Some(content_type), &body)
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        if !(200..300).contains(&response.status) {
            return Err(format!(
                "POST {path}: status {}: {}",
                response.status,
                response.body_text()
            ));
        }
        Ok(())
    }

    /// Publishes to every topic in `topics`: nudge takes them as NDJSON batches (one request
    /// while the body stays under its 1 MiB limit); Nchan takes one request per message, sent
    /// over several keep-alive connections at once.
    pub async fn publish_many(&mut self, topics: &[String]) -> Result<(), String> {
        match self.kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => {
                let mut lines = topics.iter().map(|t| format!("{{\"topic\":\"{t}\"}}\n"));
                let mut body = String::new();
                loop {
                    let line = lines.next();
                    let full = line
                        .as_ref()
                        .is_some_and(|l| body.len() + l.len() > 900 * 1024);
                    if (line.is_none() || full) && !body.is_empty() {
                        let response = self
                            .control
                            .request(
                                "POST",
                                "/v1/publish",
                                Some("application/x-ndjson"),
                                body.as_bytes(),
                            )
                            .await
                            .map_err(|e| format!("POST /v1/publish: {e}"))?;
                        if response.status != 200 {
                            return Err(format!("POST /v1/publish: status {}", response.status));
                        }
                        body.clear();
                    }
                    match line {
                        Some(line) => body.push_str(&line),
                        None => return Ok(()),
                    }
                }
            }
            Kind::Nchan { .. } => {
                let mut workers = JoinSet::new();
                for k in 0..CONTROL_CONNECTIONS {
                    let mine: Vec<String> = topics
                        .iter()
                        .skip(k)
                        .step_by(CONTROL_CONNECTIONS)
                        .cloned()
                        .collect();
                    let mut connection = Connection::new(self.internal);
                    workers.spawn(async move {
                        for topic in mine {
                            let path = format!("/pub?channel={topic}");
                            let response = connection
                                .request("POST", &path, Some("application/json"), NCHAN_MESSAGE)
                                .await
                                .map_err(|e| format!("POST {path}: {e}"))?;
                            if !(200..300).contains(&response.status) {
                                return Err(format!("POST {path}: status {}", response.status));
                            }
                        }
                        Ok(())
                    });
                }
                while let Some(done) = workers.join_next().await {
                    done.map_err(|e| e.to_string())??;
                }
                Ok(())
            }
        }
    }

    /// The request the publish-throughput loop sends for publish `i` (to one of 1,000 topics,
    /// none with a poll parked).
    pub fn throughput_request(kind: Kind, i: usize) -> crate::load::Request {
        let topic = format!("idle{}", i % 1000);
        match kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => (
                "/v1/publish".to_owned(),
                Some("application/json"),
                format!(r#"{{"topic":"{topic}"}}"#).into_bytes(),
            ),
            Kind::Nchan { .. } => (
                format!("/pub?channel={topic}"),
                Some("application/json"),
                NCHAN_MESSAGE.to_vec(),
            ),
        }
    }

    /// nudge only: a batch of `size` publishes (batch `i`) as NDJSON.
    pub fn throughput_batch(i: usize, size: usize) -> crate::load::Request {
        let body: String = (0..size)
            .map(|k| format!("{{\"topic\":\"idle{}\"}}\n", (i * size + k) % 1000))
            .collect();
        (
            "/v1/publish".to_owned(),
            Some("application/x-ndjson"),
            body.into_bytes(),
        )
    }

    /// Prepares what the connection-rate loop needs and returns the path it requests: a request
    /// that the server answers at once. nudge: a `dont_block=true` poll of a registered channel
    /// (`no_change`). Nchan: a subscriber asking for the oldest message of a channel that holds
    /// one (`nchan_subscriber_first_message oldest`), answered with it at once.
    pub async fn immediate_path(&mut self) -> Result<String, String> {
        match self.kind {
            Kind::Nudge | Kind::NudgeOneThread | Kind::Floor => {
                let path = self.register(|_| "accept".to_owned(), 1).await?.remove(0);
                Ok(format!("{path}&dont_block=true"))
            }
            Kind::Nchan { .. } => {
                self.publish("accept").await?;
                Ok("/sub_now?channel=accept".to_owned())
            }
        }
    }

    /// Stops the server and waits for every one of its processes to be gone.
    pub async fn stop(mut self) {
        let pids = self.pids();
        match &mut self.process {
            // nudge holds nothing worth a graceful drain here; its clients are already gone.
            Process::Logged(node) => node.kill(),
            // SIGTERM is nginx's fast shutdown. Its workers do not die with a killed master, so
            // the master must be asked, and the workers checked.
            Process::Nginx(_) => {
                signal(&pids[..1], "TERM");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let master_done = self.process.exited();
            if master_done && !pids[1..].iter().any(|&pid| procfs::alive(pid)) {
                break;
            }
            if Instant::now() >= deadline {
                signal(&pids, "KILL");
                if let Process::Nginx(child) = &mut self.process {
                    let _ = child.wait();
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(prefix) = self.prefix.take() {
            let _ = std::fs::remove_dir_all(prefix);
        }
    }

    /// nudge's last log lines, for reports of a failure.
    pub fn log_tail(&self) -> String {
        match &self.process {
            Process::Logged(node) => node.logs().join("\n"),
            Process::Nginx(_) => String::new(),
        }
    }
}

/// Topic `i` of the N-topics scenario.
pub fn topic_name(i: usize) -> String {
    format!("t{i}")
}

/// The value of `name` in Prometheus text (`name 12`, `name{a="b"} 12`: summed over label sets)
/// or in Nchan's status text (`subscribers: 12`).
fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => &labelled[labelled.find('}')? + 1..],
                None => rest,
            };
            // The name must end here: `nudge_parked_polls_x` is another metric.
            if !rest.starts_with(' ') && !name.ends_with(':') {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The path and query of `entries[0].url` in a registration answer.
fn subscribe_path(body: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let url = json.get("entries")?.get(0)?.get("url")?.as_str()?;
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let at = after_scheme.find('/')?;
    Some(after_scheme[at..].to_owned())
}

/// POSTs every body to `path`, over several keep-alive connections at once; returns each
/// answer's status and body, in the order of `bodies`.
async fn parallel_requests(
    target: SocketAddr,
    path: &'static str,
    content_type: &'static str,
    bodies: Vec<String>,
) -> Result<Vec<(u16, String)>, String> {
    let bodies = Arc::new(bodies);
    let mut workers = JoinSet::new();
    let connections = CONTROL_CONNECTIONS.min(bodies.len()).max(1);
    for k in 0..connections {
        let bodies = bodies.clone();
        workers.spawn(async move {
            let mut connection = Connection::new(target);
            let mut answers = Vec::new();
            for i in (k..bodies.len()).step_by(connections) {
                let response = connection
                    .request("POST", path, Some(content_type), bodies[i].as_bytes())
                    .await
                    .map_err(|e| format!("POST {path}: {e}"))?;
                answers.push((i, response.status, response.body_text()));
            }
            Ok::<_, String>(answers)
        });
    }
    let mut all = vec![(0, String::new()); bodies.len()];
    while let Some(done) = workers.join_next().await {
        for (i, status, body) in done.map_err(|e| e.to_string())?? {
            all[i] = (status, body);
        }
    }
    Ok(all)
}
