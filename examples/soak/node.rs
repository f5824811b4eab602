//! One real `nudge` process (the test kit's [`nudge_testkit::Node`]): started on free loopback
//! ports, its stderr copied to a log file, taken as up once `/readyz` answers 200; its metrics
//! and resident memory read from outside.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nudge_testkit::node::{FREE_PORTS, Options};
use tokio::time::Instant;

pub struct Node {
    pub name: String,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    process: nudge_testkit::Node,
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
        let mut command = std::process::Command::new(bin);
        command.args(FREE_PORTS).args(args).env("RUST_LOG", "info");
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

    /// Resident memory of the process, from `/proc`.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.process.rss_bytes()
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
        self.process.signal("TERM");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.exited(limit).await
    }
}
