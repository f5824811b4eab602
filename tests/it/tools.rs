//! What the operations tests need around nudge: temporary directories, external tools
//! (`promtool`, `prometheus`), and a real Prometheus server run for one test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::{eventually, http_client};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nudge-it-{}-{what}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An external tool on `PATH`. `scripts/test.sh` installs them and sets
/// `NUDGE_REQUIRE_TOOLS=1`, so there a missing tool fails the test; a bare `cargo test`
/// on a machine without them skips the check and says so.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("NUDGE_REQUIRE_TOOLS").is_none(),
            "{name} is required (NUDGE_REQUIRE_TOOLS is set) but not on PATH"
        );
        eprintln!("SKIPPED: {name} is not installed (scripts/test.sh installs it)");
    }
    found
}

pub use nudge_testkit::free_port;

/// A real Prometheus server on a free loopback port, stopped (and its data removed) on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts `binary` scraping `target` (host:port) every second with the bearer token in
    /// `token_file`.
    pub fn start(binary: &Path, target: &str, token_file: &Path) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.write(
            "prometheus.yml",
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: nudge\n    authorization:\n      \
                 credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
                token_file.display()
            ),
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            addr,
            http: http_client(Duration::from_secs(5)),
            _dir: dir,
        }
    }

    /// The value of an instant query that returns one series, or `None` (no such series
    /// yet, or Prometheus not up yet).
    pub async fn query_one(&self, query: &str) -> Option<String> {
        let res = self
            .http
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?;
        let body: Value = res.json().await.ok()?;
        let result = body["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str().map(str::to_owned),
            _ => None,
        }
    }

    /// Waits until `query` has the one value `want`.
    pub async fn wait_for(&self, query: &str, want: &str, within: Duration) {
        let me = self;
        eventually(
            &format!("Prometheus: {query} == {want}"),
            within,
            || async move { me.query_one(query).await.as_deref() == Some(want) },
        )
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM, then wait for it to go (bounded); SIGKILL if it lingers.
        nudge_testkit::signal(&[self.child.id()], "TERM");
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
