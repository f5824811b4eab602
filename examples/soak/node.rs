//! One real `nudge` process: started on free loopback ports (it logs the addresses it bound),
//! its stderr kept in a log file, its metrics and resident memory read from outside.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

pub struct Node {
    pub name: String,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub pid: u32,
    child: Child,
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
        let mut child = Command::new(bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("nudge exited at once")?;
        let stderr = child.stderr.take().expect("piped");
        let (addrs_tx, addrs_rx) = oneshot::channel();
        let log_path = log.clone();
        // Copies stderr to the log file for as long as the process lives, and reports the
        // two bound addresses as soon as both lines have been seen.
        tokio::spawn(async move {
            let mut file = match tokio::fs::File::create(&log_path).await {
                Ok(f) => f,
                Err(_) => return,
            };
            let mut lines = BufReader::new(stderr).lines();
            let (mut public, mut internal) = (None, None);
            let mut addrs_tx = Some(addrs_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if public.is_none() {
                    public = address_after(&line, "public=");
                }
                if internal.is_none() {
                    internal = address_after(&line, "internal=");
                }
                if let (Some(p), Some(i)) = (public, internal)
                    && let Some(tx) = addrs_tx.take()
                {
                    let _ = tx.send((p, i));
                }
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
            }
            let _ = file.flush().await;
        });
        let (public, internal) = timeout(Duration::from_secs(20), addrs_rx)
            .await
            .map_err(|_| format!("{name}: no `listening` lines within 20 s"))?
            .map_err(|_| format!("{name}: exited before listening (see {})", log.display()))?;
        let node = Node {
            name: name.to_owned(),
            public,
            internal,
            pid,
            child,
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
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
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

    /// Sends SIGTERM (through `kill(1)`: no `unsafe` here).
    pub fn sigterm(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        timeout(limit, self.child.wait()).await.ok()?.ok()
    }
}

fn address_after(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}
