//! A real process that logs the addresses it bound (`listening public=ADDR`, `listening
//! internal=ADDR`, in text or JSON): nudge itself, or the bench's floor. Its stderr is read to
//! the end on a thread of its own, so the pipe never fills and blocks it; the lines are kept
//! for assertions and error messages, and optionally copied to a file.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, LineWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The flags that put both of nudge's listeners on free loopback ports.
pub const FREE_PORTS: [&str; 4] = [
    "--listen",
    "127.0.0.1:0",
    "--internal-listen",
    "127.0.0.1:0",
];

/// How often a wait looks again.
const TICK: Duration = Duration::from_millis(10);

/// How [`Node::spawn`] waits and what it keeps.
pub struct Options {
    /// How long to wait for both `listening` lines.
    pub within: Duration,
    /// How many of the last log lines to keep in memory (`usize::MAX`: every one).
    pub keep: usize,
    /// Where to copy every log line as well (a long run keeps only a tail in memory).
    pub log_file: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            within: Duration::from_secs(30),
            keep: usize::MAX,
            log_file: None,
        }
    }
}

/// A running process with the addresses it logged; killed on drop if still running, so a
/// failed test or run leaves nothing behind.
pub struct Node {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Node {
    /// `program ARGS` on free loopback ports with `RUST_LOG=info` (unless `env` says
    /// otherwise); panics if it does not log both addresses within 30 s.
    pub fn start(program: impl AsRef<OsStr>, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(program);
        command
            .args(args)
            .args(FREE_PORTS)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Node::spawn(command, Options::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `command` as given (stdin and stdout null, stderr read here) and waits for both
    /// addresses; on failure it is killed and the error carries its log.
    pub fn spawn(mut command: Command, options: Options) -> Result<Node, String> {
        let name = command.get_program().to_string_lossy().into_owned();
        let mut file = match &options.log_file {
            Some(path) => Some(LineWriter::new(
                File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
            )),
            None => None,
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (found_tx, found_rx) = mpsc::channel();
        {
            let (log, keep) = (log.clone(), options.keep.max(1));
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(file) = &mut file {
                        let _ = writeln!(file, "{line}");
                    }
                    for role in ["public", "internal"] {
                        if let Some(addr) = listening_address(&line, role) {
                            let _ = found_tx.send((role, addr));
                        }
                    }
                    let mut log = log.lock().expect("log");
                    if log.len() == keep {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        let (mut public, mut internal) = (None, None);
        let deadline = Instant::now() + options.within;
        while public.is_none() || internal.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match found_rx.recv_timeout(left) {
                Ok(("public", addr)) => public = Some(addr),
                Ok((_, addr)) => internal = Some(addr),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log: Vec<String> = log.lock().expect("log").iter().cloned().collect();
                    return Err(format!(
                        "{name} did not log both listening addresses within {:?}; its log:\n  {}",
                        options.within,
                        log.join("\n  ")
                    ));
                }
            }
        }
        Ok(Node {
            public: public.expect("found"),
            internal: internal.expect("found"),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log lines kept so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().expect("log").iter().cloned().collect()
    }

    /// Waits until a log line contains `needle`; panics with the log at the deadline.
    pub fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.logs().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.logs()
            );
            std::thread::sleep(TICK);
        }
    }

    /// Sends `SIG<name>` (`TERM`, `INT`, `KILL`, …); false if that failed.
    pub fn signal(&self, name: &str) -> bool {
        signal(&[self.pid()], name)
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// One look at the exit: `Some` once waiting is over (the exit status, or `None` when
    /// `deadline` has passed first).
    fn exit_by(&mut self, deadline: Instant) -> Option<Option<ExitStatus>> {
        match self.try_exit() {
            Some(status) => Some(Some(status)),
            None => (Instant::now() >= deadline).then_some(None),
        }
    }

    /// Waits for the exit, blocking the thread, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.exit_by(deadline) {
                Some(end) => return end,
                None => std::thread::sleep(TICK),
            }
        }
    }

    /// Waits for the exit without blocking the runtime, up to `within`.
    pub async fn exited(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.exit_by(deadline) {
                Some(end) => return end,
                None => tokio::time::sleep(TICK).await,
            }
        }
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory of the process, from `/proc`.
    pub fn rss_bytes(&self) -> Option<u64> {
        crate::memory::rss_bytes(self.pid())
    }

    /// The word after `prefix` (`message field=`) in the first log line kept that has it: a
    /// field of a line nudge logs, such as `connections handed over moved=`. Lines of a
    /// process that took over in an upgrade in place are here too (same stderr pipe).
    pub fn log_field(&self, prefix: &str) -> Option<String> {
        self.logs().iter().find_map(|l| {
            Some(
                l.split(prefix)
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_owned(),
            )
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            self.kill();
        }
    }
}

/// Sends `SIG<name>` to every pid in `pids` with kill(1): the one place the tests, the soak
/// and the bench signal a process, and no `unsafe` for it. False if that failed.
pub fn signal(pids: &[u32], name: &str) -> bool {
    if pids.is_empty() {
        return true;
    }
    Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `pid` is a live process: not gone, and not a zombie waiting for its reaper (a
/// process that took over in an upgrade in place is not our child, and may linger as one).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// The address after `role=` in a `listening` line: `listening public=ADDR` in text,
/// `{"message":"listening","public":"ADDR",…}` in JSON.
pub fn listening_address(line: &str, role: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["message"] != "listening" {
            return None;
        }
        return v[role].as_str()?.parse().ok();
    }
    if !line.contains("listening") {
        return None;
    }
    let key = format!("{role}=");
    let at = line.find(&key)? + key.len();
    let value: String = line[at..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
        .collect();
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::listening_address;

    #[test]
    fn listening_lines_in_text_and_json() {
        let text = "2026-01-01T00:00:00Z  INFO nudge::server: listening public=127.0.0.1:8080";
        assert_eq!(
            listening_address(text, "public"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(listening_address(text, "internal"), None);
        let json = r#"{"message":"listening","internal":"127.0.0.1:9090","level":"INFO"}"#;
        assert_eq!(
            listening_address(json, "internal"),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            listening_address(
                r#"{"message":"configured","public":"127.0.0.1:1"}"#,
                "public"
            ),
            None
        );
    }
}
