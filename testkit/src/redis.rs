//! A `redis-server` of the caller's own on 127.0.0.1: no persistence, its own directory,
//! killed (and the directory removed) on drop. Killed and started again on the same port, it
//! is the bus outage that the tests and the soak's drill put nudge through.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Says how to get the server when it is not installed.
pub const INSTALL_HINT: &str = "a real redis-server is needed: run `bash scripts/test.sh`, \
     which installs it (Debian package redis-server), or `apt-get install redis-server`";

pub struct RedisServer {
    program: PathBuf,
    port: u16,
    dir: PathBuf,
    /// A config file given first (a sentinel needs one it can rewrite).
    config: Option<PathBuf>,
    /// Arguments after the kit's own (`--replicaof`, `--sentinel`).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `program` (usually `redis-server`) on a free port. Another process may take the
    /// port between the probe and Redis's bind, so it tries up to 5 ports.
    pub async fn start(program: impl Into<PathBuf>) -> Result<RedisServer, String> {
        let program = program.into();
        for _ in 0..5 {
            let mut redis = RedisServer::on(program.clone(), crate::free_port());
            if redis.launch().await? {
                return Ok(redis);
            }
        }
        Err(format!(
            "{} did not start on any of 5 free ports",
            program.display()
        ))
    }

    /// A server on `port` that is not started yet: [`RedisServer::launch`] starts it.
    pub fn on(program: impl Into<PathBuf>, port: u16) -> RedisServer {
        let dir =
            std::env::temp_dir().join(format!("nudge-testkit-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        RedisServer {
            program: program.into(),
            port,
            dir,
            config: None,
            extra: Vec::new(),
            child: None,
        }
    }

    /// With `contents` written to a config file in its own directory and given first.
    pub fn with_config(mut self, contents: &str) -> RedisServer {
        let path = self.dir.join("redis.conf");
        std::fs::write(&path, contents).expect("the server's own directory is writable");
        self.config = Some(path);
        self
    }

    /// With more arguments after the kit's own.
    pub fn with_args(mut self, args: &[&str]) -> RedisServer {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Its directory, for logs and config files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server (again) on its port and waits until it answers `PING`: `Ok(false)`
    /// if it exited instead (the port was taken), an error if it cannot run or does not
    /// answer within 10 s.
    pub async fn launch(&mut self) -> Result<bool, String> {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new(&self.program);
        command.args(&self.config);
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => INSTALL_HINT.to_owned(),
                _ => format!("cannot run {}: {e}", self.program.display()),
            })?;
        let child = self.child.insert(child);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                eprintln!("redis-server on port {} exited: {status}", self.port);
                return Ok(false);
            }
            if pong(self.port).await {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no goodbye to the subscribers, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `SIG<name>` (`STOP`, `CONT`); false if that failed or it is not running.
    pub fn signal(&self, name: &str) -> bool {
        self.pid()
            .is_some_and(|pid| crate::node::signal(&[pid], name))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a Redis on `port` answers an inline `PING` with `+PONG`.
async fn pong(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    let read = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await;
    matches!(read, Ok(Ok(_))) && &answer == b"+PONG\r\n"
}
