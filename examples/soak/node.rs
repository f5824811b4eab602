//! One real `nudge` process (the test kit's [`nudge_testkit::Node`]): started on free loopback
//! ports (or given ones, to come back where it was), its stderr copied to a log file, taken as
//! up once `/readyz` answers 200; its metrics and resident memory read from outside. After an
//! upgrade in place it follows the process that took over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nudge_testkit::node::{FREE_PORTS, Options, alive};
use tokio::time::Instant;

pub struct Node {
    pub name: String,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    process: nudge_testkit::Node,
    /// The process that took over in an upgrade in place (not our child: it is followed by
    /// its pid; its stderr is the same pipe, so the log goes on).
    successor: Option<u32>,
}

impl Node {
    /// Starts `bin` with `args` (plus port-0 listeners) and waits until it is ready.
    pub async fn start(
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        http: &reqwest::Client,
    ) -> Result<Node, String> {
        Node::start_on(name, bin, &FREE_PORTS.map(str::to_owned), args, log, http).await
    }

    /// Starts `bin` with `args` on the addresses `old` had (a restart after a crash, which
    /// its clients reach at the URLs they have) and waits until it is ready.
    pub async fn restart(
        old: &Node,
        name: &str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
        http: &reqwest::Client,
    ) -> Result<Node, String> {
        let at = [
            "--listen".to_owned(),
            old.public.to_string(),
            "--internal-listen".to_owned(),
            old.internal.to_string(),
        ];
        Node::start_on(name, bin, &at, args, log, http).await
    }

    async fn start_on(
        name: &str,
        bin: &Path,
        listen: &[String],
        args: &[String],
        log: PathBuf,
        http: &reqwest::Client,
    ) -> Result<Node, String> {
        let mut command = std::process::Command::new(bin);
        command.args(listen).args(args).env("RUST_LOG", "info");
        let options = Options {
            within: Duration::from_secs(20),
            keep: 20,
            log_file: Some(log),
        };
        // Waiting for the `listening` lines blocks a thread: not one of the runtime's, which
        // serve the clients while a drill restarts a node.
        let process =
            tokio::task::spawn_blocking(move || nudge_testkit::Node::spawn(command, options))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{name}: {e}"))?;
        let node = Node {
            name: name.to_owned(),
            public: process.public,
            internal: process.internal,
            process,
            successor: None,
        };
        let ready = node.internal_url("/readyz");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(node);
            }
            if Instant::now() > until {
                return Err(format!("{name}: not ready within 20 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    /// The process serving now.
    pub fn pid(&self) -> u32 {
        self.successor.unwrap_or_else(|| self.process.pid())
    }

    /// From now on, `pid` (which took over in an upgrade in place) is this node.
    pub fn follow(&mut self, pid: u32) {
        self.successor = Some(pid);
    }

    /// The value after `prefix` (`message field=`) in the first log line kept that has it,
    /// or `?`; the successor's lines included.
    pub fn log_field(&self, prefix: &str) -> String {
        self.process
            .log_field(prefix)
            .unwrap_or_else(|| "?".to_owned())
    }

    /// Resident memory of the process, from `/proc`.
    pub fn rss_bytes(&self) -> Option<u64> {
        nudge_testkit::memory::rss_bytes(self.pid())
    }

    /// Every unlabelled sample of `GET /metrics`, and labelled ones under their full name.
    pub async fn metrics(&self, http: &reqwest::Client) -> Result<HashMap<String, f64>, String> {
        let text = http
            .get(self.internal_url("/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect())
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn signal(&self, name: &str) -> bool {
        nudge_testkit::signal(&[self.pid()], name)
    }

    /// Waits for the process to exit, up to `limit`. A successor is not our child: its exit
    /// status cannot be read, so it is taken as a success once it is gone (its log says how
    /// it ended).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let Some(pid) = self.successor else {
            return self.process.exited(limit).await;
        };
        let until = Instant::now() + limit;
        while alive(pid) {
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(ExitStatus::default())
    }

    /// SIGKILL (a crash), and waits for it to be gone.
    pub fn kill(&mut self) {
        match self.successor {
            Some(pid) => {
                nudge_testkit::signal(&[pid], "KILL");
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while alive(pid) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            None => self.process.kill(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.successor.filter(|&pid| alive(pid)) {
            nudge_testkit::signal(&[pid], "KILL");
        }
    }
}
