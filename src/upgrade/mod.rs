//! The upgrade in place (`SIGUSR2`): a running node starts the binary at the path it was
//! started from, with the same arguments and environment, and hands it its listening
//! sockets, its fast-path connections (parked polls with their channel and deadline) and
//! its hub's state; it exits 0 once the new process has taken over. docs/design.md
//! ("Upgrading in place") tells the whole story; here is the protocol.
//!
//! The old process makes a private directory (mode 0700) with a Unix socket in it and
//! starts the new one with [`UPGRADE_FROM_ENV`] naming the socket. Over it:
//! 1. new → old: `hello` (its pid), sent once its flags are read and checked, before it
//!    binds anything. Until then the old one serves as usual.
//! 2. The old one stops accepting (the listening sockets stay open: connection attempts
//!    wait in the backlog), lets its internal requests finish and takes their connections
//!    off hyper (they move too: closing them would race a request being sent), stops its
//!    bus reader, takes every fast-path connection off the fast path, and snapshots its
//!    hub.
//! 3. old → new: a header (the listeners' roles, each connection's state, the bus
//!    position, the snapshot's length), the snapshot, then the descriptors,
//!    [`fds::MAX_FDS_PER_MESSAGE`] a message. The old one keeps its own copies.
//! 4. new → old: `restored` (hub restored, pid file rewritten; nothing read or written on
//!    any client socket yet).
//! 5. old → new: `commit`. Only now does the new one serve; the old one answers what could
//!    not move (as in a drain) and exits 0.
//!
//! Until `commit` is sent the old process can go back: it kills the new one, waits for it,
//! and serves its listeners and its connections again (a bad binary changes nothing). The
//! whole exchange has a deadline (`--upgrade-timeout`).

mod fds;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bus::Bus;
use crate::http::conn::Between;
use crate::http::fast::{Moved, MovedState};
use crate::http::subscribe::SubscribeQuery;
use crate::hub::Hub;
use std::sync::Arc;

/// The environment variable that tells a starting node to take over from another.
pub const UPGRADE_FROM_ENV: &str = "NUDGE_UPGRADE_FROM";
/// Largest frame accepted (the hub's snapshot is the big one).
const MAX_FRAME: usize = 1 << 30;
/// Version of the exchange: an old and a new binary that differ here refuse each other.
const PROTOCOL: u32 = 1;

/// How this process was started, captured at start: the binary's path resolved against the
/// working directory and `PATH` as they were then, and the arguments.
#[derive(Clone, Debug)]
pub struct Start {
    /// The binary to start: the path it was started from, not `/proc/self/exe` (which, once
    /// a deploy has replaced the file, still names the old one).
    pub exe: PathBuf,
    /// The arguments after the program name.
    pub args: Vec<OsString>,
}

static START: OnceLock<Start> = OnceLock::new();

/// Remembers how this process was started; call first thing in `main`.
pub fn remember_start() {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let exe = resolve_exe(
        Path::new(&argv0),
        std::env::current_dir().ok().as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
    .or_else(|| std::env::current_exe().ok())
    .unwrap_or_else(|| PathBuf::from(&argv0));
    let _ = START.set(Start {
        exe,
        args: args.collect(),
    });
}

/// How this process was started ([`remember_start`]).
pub fn start() -> Option<&'static Start> {
    START.get()
}

/// `argv0` as the shell found it: a path with a slash is taken relative to `cwd`; a bare
/// name is looked up in `path`. Symlinks are kept, so a deploy that repoints one is seen.
pub fn resolve_exe(
    argv0: &Path,
    cwd: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.components().count() > 1 || argv0.is_absolute() {
        return Some(match cwd {
            Some(cwd) if argv0.is_relative() => cwd.join(argv0),
            _ => argv0.to_owned(),
        });
    }
    std::env::split_paths(path?)
        .map(|dir| match cwd {
            Some(cwd) if dir.is_relative() => cwd.join(dir).join(argv0),
            _ => dir.join(argv0),
        })
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Which listener a descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `--listen`.
    Public,
    /// `--internal-listen`.
    Internal,
}

/// A moved connection's state as it travels (deadlines as time left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WireConn {
    /// Between requests.
    Idle,
    /// Its poll read, not started.
    Pending {
        /// The channel id as the client sent it.
        channel: String,
        /// `stream_position=`.
        stream_position: Option<u64>,
        /// `dont_block=true`.
        dont_block: bool,
        /// `Connection: close`.
        close: bool,
        /// The `Origin` to echo.
        origin: Option<Vec<u8>>,
    },
    /// An internal API connection between requests (hyper's, not the fast path's).
    Internal {
        /// What hyper had read of the next request.
        read_ahead: Vec<u8>,
    },
    /// Parked.
    Parked {
        /// The channel id.
        channel: String,
        /// Milliseconds of park time left when the header was written.
        left_ms: u64,
        /// `Connection: close`.
        close: bool,
        /// The `Origin` to echo.
        origin: Option<Vec<u8>>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Frame {
    Hello {
        protocol: u32,
        pid: u32,
        /// It serves internal connections handed over ([`WireConn::Internal`]). Absent
        /// (false) from a binary older than that: the old process closes them instead.
        #[serde(default)]
        takes_internal: bool,
    },
    Header {
        listeners: Vec<Role>,
        conns: Vec<WireConn>,
        bus_position: Option<String>,
        hub_bytes: u64,
    },
    Restored {
        pid: u32,
    },
    Commit,
}

fn write_frame(socket: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    socket.write_all(&(bytes.len() as u64).to_le_bytes())?;
    socket.write_all(bytes)
}

fn read_frame(socket: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    socket.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    let mut bytes = vec![0; len];
    socket.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn send(socket: &mut UnixStream, frame: &Frame) -> io::Result<()> {
    write_frame(
        socket,
        &serde_json::to_vec(frame).map_err(io::Error::other)?,
    )
}

fn recv(socket: &mut UnixStream) -> io::Result<Frame> {
    serde_json::from_slice(&read_frame(socket)?).map_err(io::Error::other)
}

/// The old process's side: a new process started and (after [`Upgrade::hello`]) ready.
pub struct Upgrade {
    child: tokio::process::Child,
    dir: PathBuf,
    listener: Option<tokio::net::UnixListener>,
    socket: Option<UnixStream>,
    deadline: Instant,
    takes_internal: bool,
}

/// What the old process hands over, besides the connections' descriptors.
pub struct Outgoing {
    /// The listeners, in order.
    pub listeners: Vec<(Role, RawFd)>,
    /// Each connection's descriptor (kept open by the caller until the exchange ends) and
    /// state.
    pub conns: Vec<(RawFd, WireConn)>,
    /// The bus reader's position, when there is a bus.
    pub bus_position: Option<String>,
    /// The hub's snapshot.
    pub hub: Vec<u8>,
}

impl Upgrade {
    /// Starts the binary this process was started from, with the same arguments and
    /// environment and [`UPGRADE_FROM_ENV`] naming a fresh socket; `timeout` bounds the
    /// whole exchange.
    pub fn spawn(timeout: Duration) -> Result<Upgrade, String> {
        let start = start().ok_or("the start-up path was not recorded")?;
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!(
            "nudge-upgrade-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(random)
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        let path = dir.join("handover.sock");
        let cleanup = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| cleanup(format!("cannot listen on {}: {e}", path.display())))?;
        let child = tokio::process::Command::new(&start.exe)
            .args(&start.args)
            .env(UPGRADE_FROM_ENV, &path)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| cleanup(format!("cannot start {}: {e}", start.exe.display())))?;
        tracing::info!(exe = %start.exe.display(), pid = child.id(), "upgrade: new process started");
        Ok(Upgrade {
            child,
            dir,
            listener: Some(listener),
            socket: None,
            deadline: Instant::now() + timeout,
            takes_internal: false,
        })
    }

    /// The new process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the new process takes internal connections (known after `hello`).
    pub fn takes_internal(&self) -> bool {
        self.takes_internal
    }

    /// Waits for the new process to connect and say `hello`: it has read and checked its
    /// flags. Fails if it exits first, or at the deadline.
    pub async fn hello(&mut self) -> Result<(), String> {
        let listener = self.listener.take().expect("hello once");
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| format!("accept: {e}"))?.0,
            status = self.child.wait() => return Err(match status {
                Ok(s) => format!("the new process exited ({s}) before it connected"),
                Err(e) => format!("the new process is gone: {e}"),
            }),
            _ = tokio::time::sleep_until(self.deadline) => {
                return Err("the new process did not connect in time".into())
            }
        };
        let socket = accepted.into_std().map_err(|e| e.to_string())?;
        socket.set_nonblocking(false).map_err(|e| e.to_string())?;
        let (socket, frame) = self.blocking(socket, recv).await?;
        self.socket = Some(socket);
        match frame {
            Frame::Hello {
                protocol,
                takes_internal,
                ..
            } if protocol == PROTOCOL => {
                self.takes_internal = takes_internal;
                Ok(())
            }
            Frame::Hello { protocol, .. } => Err(format!(
                "the new binary speaks handover protocol {protocol}, this one {PROTOCOL}"
            )),
            other => Err(format!("expected hello, got {other:?}")),
        }
    }

    /// Sends everything, waits for `restored`, sends `commit`. After `Ok` the new process
    /// serves; after `Err` call [`Upgrade::abandon`].
    pub async fn hand_over(&mut self, out: Outgoing) -> Result<(), String> {
        let socket = self.socket.take().ok_or("no hello")?;
        let (socket, frame) = self
            .blocking(socket, move |socket| -> io::Result<Frame> {
                let header = Frame::Header {
                    listeners: out.listeners.iter().map(|(r, _)| *r).collect(),
                    conns: out.conns.iter().map(|(_, c)| c.clone()).collect(),
                    bus_position: out.bus_position.clone(),
                    hub_bytes: out.hub.len() as u64,
                };
                send(socket, &header)?;
                write_frame(socket, &out.hub)?;
                let fds: Vec<RawFd> = out
                    .listeners
                    .iter()
                    .map(|(_, fd)| *fd)
                    .chain(out.conns.iter().map(|(fd, _)| *fd))
                    .collect();
                for chunk in fds.chunks(fds::MAX_FDS_PER_MESSAGE) {
                    fds::send(socket, chunk)?;
                }
                recv(socket)
            })
            .await?;
        match frame {
            Frame::Restored { pid } => {
                self.socket = Some(socket);
                let socket = self.socket.as_mut().expect("just set");
                send(socket, &Frame::Commit).map_err(|e| format!("commit: {e}"))?;
                tracing::info!(pid, "upgrade: the new process has taken over");
                Ok(())
            }
            other => Err(format!("expected restored, got {other:?}")),
        }
    }

    /// Runs one blocking step of the exchange with the time left as its socket timeout.
    async fn blocking<T: Send + 'static>(
        &mut self,
        mut socket: UnixStream,
        step: impl FnOnce(&mut UnixStream) -> io::Result<T> + Send + 'static,
    ) -> Result<(UnixStream, T), String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the deadline passed".into());
        }
        socket
            .set_read_timeout(Some(left))
            .and_then(|()| socket.set_write_timeout(Some(left)))
            .map_err(|e| e.to_string())?;
        let task = tokio::task::spawn_blocking(move || {
            let result = step(&mut socket);
            (socket, result)
        });
        tokio::select! {
            joined = task => match joined {
                Ok((socket, Ok(value))) => Ok((socket, value)),
                Ok((_, Err(e))) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    Err("the new process did not answer in time".into())
                }
                Ok((_, Err(e))) => Err(format!("the new process broke off: {e}")),
                Err(e) => Err(e.to_string()),
            },
            status = self.child.wait() => Err(match status {
                Ok(s) => format!("the new process exited ({s})"),
                Err(e) => format!("the new process is gone: {e}"),
            }),
        }
    }

    /// The new process failed: kill it (it has served nothing) and wait for it to be gone.
    pub async fn abandon(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The new process's side: what it received.
pub struct Inherited {
    /// The listeners with their roles.
    pub listeners: Vec<(Role, OwnedFd)>,
    /// The connections with their states; park deadlines are already turned back into
    /// instants.
    pub conns: Vec<(OwnedFd, WireConn, Instant)>,
    /// The old process's bus position.
    pub bus_position: Option<String>,
    /// The hub's snapshot.
    pub hub: Vec<u8>,
    socket: UnixStream,
}

/// Connects to the old process at `path`, says hello, and receives everything. Blocking:
/// called at start, before anything is bound.
pub fn inherit(path: &Path) -> Result<Inherited, String> {
    let mut socket = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let fail = |e: io::Error| format!("handover: {e}");
    send(
        &mut socket,
        &Frame::Hello {
            protocol: PROTOCOL,
            pid: std::process::id(),
            takes_internal: true,
        },
    )
    .map_err(fail)?;
    let (roles, wire, bus_position, hub_bytes) = match recv(&mut socket).map_err(fail)? {
        Frame::Header {
            listeners,
            conns,
            bus_position,
            hub_bytes,
        } => (listeners, conns, bus_position, hub_bytes),
        other => return Err(format!("handover: expected a header, got {other:?}")),
    };
    let received_at = Instant::now();
    let hub = read_frame(&mut socket).map_err(fail)?;
    if hub.len() as u64 != hub_bytes {
        return Err("handover: the hub snapshot is not the announced size".into());
    }
    let total = roles.len() + wire.len();
    let mut fds = Vec::with_capacity(total);
    while fds.len() < total {
        fds.extend(fds::recv(&socket).map_err(fail)?);
    }
    if fds.len() != total {
        return Err(format!("handover: {} descriptors for {total}", fds.len()));
    }
    let conn_fds = fds.split_off(roles.len());
    Ok(Inherited {
        listeners: roles.into_iter().zip(fds).collect(),
        conns: conn_fds
            .into_iter()
            .zip(wire)
            .map(|(fd, conn)| {
                let deadline = match &conn {
                    WireConn::Parked { left_ms, .. } => {
                        received_at + Duration::from_millis(*left_ms)
                    }
                    _ => received_at,
                };
                (fd, conn, deadline)
            })
            .collect(),
        bus_position,
        hub,
        socket,
    })
}

/// Said by the new process once it is ready to serve: waits for the old one's `commit` (or
/// its end: a process that is gone serves nothing either). An error means the old process
/// took everything back; the new one must exit without touching a client socket.
pub fn take_over(mut socket: UnixStream) -> Result<(), String> {
    send(
        &mut socket,
        &Frame::Restored {
            pid: std::process::id(),
        },
    )
    .map_err(|e| format!("handover: {e}"))?;
    match recv(&mut socket) {
        Ok(Frame::Commit) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        Ok(other) => Err(format!("handover: expected commit, got {other:?}")),
        Err(e) => Err(format!("handover: {e}")),
    }
}

impl Inherited {
    /// The socket to the old process, for [`take_over`].
    pub fn into_socket(self) -> UnixStream {
        self.socket
    }

    /// Splits off everything but the socket.
    pub fn split(self) -> (Received, UnixStream) {
        (
            Received {
                listeners: self.listeners,
                conns: self.conns,
                bus_position: self.bus_position,
                hub: self.hub,
            },
            self.socket,
        )
    }
}

/// [`Inherited`] without its socket.
pub struct Received {
    /// The listeners with their roles.
    pub listeners: Vec<(Role, OwnedFd)>,
    /// The connections, their states and park deadlines.
    pub conns: Vec<(OwnedFd, WireConn, Instant)>,
    /// The old process's bus position.
    pub bus_position: Option<String>,
    /// The hub's snapshot.
    pub hub: Vec<u8>,
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`, `Type=notify`) `state`, e.g.
/// `READY=1` or `MAINPID=<pid>`. Nothing when not under systemd.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// The raw number of a descriptor, for [`Outgoing`].
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// A moved connection's state as it travels.
pub fn to_wire(state: &MovedState) -> WireConn {
    match state {
        MovedState::Idle => WireConn::Idle,
        MovedState::Pending {
            query,
            close,
            origin,
        } => WireConn::Pending {
            channel: query.channel.clone(),
            stream_position: query.stream_position,
            dont_block: query.dont_block,
            close: *close,
            origin: origin.clone(),
        },
        MovedState::Parked {
            channel,
            deadline,
            close,
            origin,
        } => WireConn::Parked {
            channel: channel.clone(),
            left_ms: deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            close: *close,
            origin: origin.clone(),
        },
    }
}

/// What the new process serves with, made from what it received.
pub struct Restored {
    /// `--listen`'s socket.
    pub public: tokio::net::TcpListener,
    /// `--internal-listen`'s socket.
    pub internal: tokio::net::TcpListener,
    /// The fast-path connections, to adopt once the old process has said `commit`.
    pub conns: Vec<Moved>,
    /// The internal API's connections, to serve once it has.
    pub internal_conns: Vec<Between>,
}

/// Restores the hub's state and the bus position, and turns the descriptors into sockets.
/// Reads and writes no client socket.
pub fn restore(received: Received, hub: &Arc<Hub>, bus: Option<&Bus>) -> Result<Restored, String> {
    let resumed = match (bus, &received.bus_position) {
        (Some(bus), Some(position)) => match bus.resume_from(position) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the old process's bus position is unusable: every channel is marked pending");
                false
            }
        },
        // No bus: nothing to replay, nothing missed.
        (None, _) => true,
        // A bus that had not read yet: from the stream's end, as a new node would.
        (Some(_), None) => true,
    };
    restore_hub(hub, &received.hub, resumed)?;
    let (mut public, mut internal) = (None, None);
    for (role, fd) in received.listeners {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        match role {
            Role::Public => public = Some(listener),
            Role::Internal => internal = Some(listener),
        }
    }
    let mut conns = Vec::with_capacity(received.conns.len());
    let mut internal_conns = Vec::new();
    for (fd, wire, deadline) in received.conns {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
        let state = match wire {
            WireConn::Internal { read_ahead } => {
                internal_conns.push(Between { stream, read_ahead });
                continue;
            }
            WireConn::Idle => MovedState::Idle,
            WireConn::Pending {
                channel,
                stream_position,
                dont_block,
                close,
                origin,
            } => MovedState::Pending {
                query: SubscribeQuery {
                    channel,
                    stream_position,
                    dont_block,
                },
                close,
                origin,
            },
            WireConn::Parked {
                channel,
                close,
                origin,
                ..
            } => MovedState::Parked {
                channel,
                deadline,
                close,
                origin,
            },
        };
        conns.push(Moved { stream, state });
    }
    Ok(Restored {
        public: public.ok_or("no public listener handed over")?,
        internal: internal.ok_or("no internal listener handed over")?,
        conns,
        internal_conns,
    })
}

/// The hub's state for the new process, in the `--state-dir` format (`wire::snapshot`;
/// the bus position travels in the header). Taken after the detach: see `hub::handover`.
pub fn snapshot(hub: &Hub) -> Vec<u8> {
    crate::wire::snapshot::encode(&crate::wire::snapshot::Snapshot {
        hub: hub.snapshot(),
        bus_position: None,
    })
}

/// Puts the old process's hub state into `hub`. Nothing is marked pending: without a bus
/// every publish was applied by the old process before the snapshot or waits for this one;
/// with a bus this one reads on from the old one's position. Only a position the bus
/// refuses makes every channel pending, as after any gap that cannot be replayed.
fn restore_hub(hub: &Hub, bytes: &[u8], resumed: bool) -> Result<(), String> {
    let snapshot = crate::wire::snapshot::decode(bytes).map_err(|e| format!("hub state: {e}"))?;
    let done = hub.restore(&snapshot.hub, !resumed);
    tracing::info!(
        channels = done.channels,
        skipped = done.skipped,
        positions = done.positions,
        not_live = done.not_live,
        "hub state taken over"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_found_as_the_shell_found_it() {
        let cwd = Path::new("/srv/app");
        assert_eq!(
            resolve_exe(Path::new("bin/nudge"), Some(cwd), None),
            Some(PathBuf::from("/srv/app/bin/nudge"))
        );
        assert_eq!(
            resolve_exe(Path::new("/usr/bin/nudge"), Some(cwd), None),
            Some(PathBuf::from("/usr/bin/nudge"))
        );
        // A bare name: the first executable of that name on PATH.
        let found = resolve_exe(
            Path::new("sh"),
            Some(cwd),
            Some("/nonexistent:/bin".as_ref()),
        );
        assert_eq!(found, Some(PathBuf::from("/bin/sh")));
        assert_eq!(
            resolve_exe(
                Path::new("no-such-binary-here"),
                None,
                Some("/bin".as_ref())
            ),
            None
        );
    }
}
