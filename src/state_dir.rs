//! `--state-dir`: a node keeps a snapshot of its hub (channels, topic positions) and its bus
//! position in one file there, so that after a crash it comes back knowing every channel
//! and its clients re-poll the same URL without going back to the main API (issue 13.4).
//!
//! - Written every `--state-interval` by a thread of its own (never a tokio worker), and
//!   never more often than ten times what the last write took, so that even a million
//!   channels cost at most a tenth of a core; and once more at the end of a drain. Only
//!   when something changed ([`Hub::take_changed`], or a new bus position): an idle node
//!   does not rewrite (and sync) the same file every 2 s. Nothing in the file goes stale
//!   by itself: expiries are wall-clock times, and a channel with a parked poll is written
//!   without one (it gets its ttl when restored).
//! - Atomic: written to `nudge.state.tmp` (mode 0600: channel ids are credentials), synced,
//!   renamed over `nudge.state`, and the directory synced. A crash leaves the old file or
//!   the new one, never half of one.
//! - Read at start: a missing file is a first start; a truncated, foreign, altered or
//!   older-format file is ignored with a warning — never a crash, never a wrong answer.
//!
//! The bus position is read *before* the hub's state: replaying from it can repeat an entry
//! already in the state (one spurious `new_change`), never skip one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::bus::Bus;
use crate::hub::Hub;
use crate::wire::snapshot::{self, Snapshot};

const FILE: &str = "nudge.state";
const TMP: &str = "nudge.state.tmp";

/// The state directory of a node.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Checks `--state-dir` at configuration time: it exists (or can be made, mode 0700)
    /// and this process can write there.
    pub fn open(dir: &Path) -> Result<StateDir, String> {
        let fail = |e: io::Error| format!("--state-dir {}: {e}", dir.display());
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(fail)?;
            set_mode(dir, 0o700).map_err(fail)?;
        }
        let probe = dir.join(".nudge-write-probe");
        File::create(&probe).map_err(fail)?;
        let _ = fs::remove_file(&probe);
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// The snapshot file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The snapshot left by the previous process, if there is a usable one.
    pub fn load(&self) -> Option<Snapshot> {
        let path = self.file();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                info!(path = %path.display(), "no state to restore: a first start");
                return None;
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "state not read; starting empty");
                return None;
            }
        };
        match snapshot::decode(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(path = %path.display(), error = %e, bytes = bytes.len(), "state ignored; starting empty");
                None
            }
        }
    }

    /// Writes a snapshot atomically.
    pub fn write(&self, snapshot: &Snapshot) -> io::Result<usize> {
        let bytes = snapshot::encode(snapshot);
        let tmp = self.dir.join(TMP);
        let mut file = options().open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.file())?;
        File::open(&self.dir)?.sync_all()?;
        Ok(bytes.len())
    }

    /// Takes the node's state now (bus position first) and writes it; records the metrics.
    pub fn save(&self, hub: &Hub, bus: Option<&Bus>) -> io::Result<()> {
        self.save_at(hub, bus.and_then(Bus::position))
    }

    /// [`StateDir::save`] with the bus position already read (before the hub's state).
    fn save_at(&self, hub: &Hub, bus_position: Option<String>) -> io::Result<()> {
        let started = Instant::now();
        let snapshot = Snapshot {
            hub: hub.snapshot(),
            bus_position,
        };
        let m = hub.metrics();
        let bytes = self.write(&snapshot).inspect_err(|_| {
            m.state_snapshot_failures_total.inc();
        })?;
        m.state_snapshots_total.inc();
        m.state_snapshot_seconds
            .set(started.elapsed().as_secs_f64());
        m.state_snapshot_bytes.set(bytes as i64);
        m.state_snapshot_channels
            .set(snapshot.hub.channels.len() as i64);
        debug!(channels = snapshot.hub.channels.len(), bytes, took = ?started.elapsed(), "state written");
        Ok(())
    }

    /// Writes the state every `every` (at least ten times the last write's duration apart)
    /// on a thread of its own, until the returned [`Saver`] is dropped; a tick at which
    /// nothing changed (no registration, poll, publish, expiry, nor a new bus position)
    /// writes nothing.
    pub fn spawn_saver(&self, hub: Arc<Hub>, bus: Option<Arc<Bus>>, every: Duration) -> Saver {
        let (stop, stopped) = mpsc::channel::<()>();
        let dir = self.clone();
        let thread = std::thread::Builder::new()
            .name("nudge-state".into())
            .spawn(move || {
                let mut wait = every;
                let mut failing = false;
                // The bus position the last good write held.
                let mut written: Option<Option<String>> = None;
                loop {
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    // Both read before the hub's state (see the module's doc).
                    let position = bus.as_deref().and_then(Bus::position);
                    let changed = hub.take_changed();
                    let due = changed
                        || failing
                        || written.as_ref().is_none_or(|pos| *pos != position);
                    if !due {
                        wait = every;
                        continue;
                    }
                    let started = Instant::now();
                    match dir.save_at(&hub, position.clone()) {
                        Ok(()) => {
                            if failing {
                                info!("state written again");
                                failing = false;
                            }
                            written = Some(position);
                        }
                        Err(e) => {
                            if !failing {
                                warn!(error = %e, dir = %dir.dir.display(), "state not written; will retry");
                            }
                            failing = true;
                        }
                    }
                    wait = every.max(started.elapsed() * 10);
                }
            })
            .expect("a thread can be spawned at start");
        Saver {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// The state-writing thread; stops (and is joined) when dropped.
pub struct Saver {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Saver {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(unix)]
fn options() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(0o600);
    o
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}
