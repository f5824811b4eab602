//! The reader every node runs on the stream: one connection of its own
//! ([`resp`](super::resp)), `XREAD BLOCK` from the entry after the last one applied, each
//! entry applied in order.
//!
//! # What an interruption cost
//! Whenever the reader (re)connects it asks Redis three things before reading on from its
//! last entry `L`: the stream's epoch (a random value nodes keep at `<stream>:epoch`, gone
//! with the data on a restart without persistence or a `FLUSHALL`), the stream's
//! `XINFO` (its last id and the largest id ever deleted from it), and whether `L` itself
//! is still there. Then:
//!
//! | Redis says | the node |
//! |---|---|
//! | another epoch, or no stream | **reset**: wakes all, reads the new stream from its start |
//! | last id < `L` | **diverged** (a failover to a replica that had not received what this node applied): wakes all, reads on from the last id |
//! | `L` missing and never deleted | **diverged** the same way, and reads on from `L` |
//! | an id > `L` was deleted | **trimmed**: wakes all, applies what is left after `L` |
//! | otherwise | **replayed**: reads on from `L`; nothing else is touched |
//!
//! "Wakes all" is [`Hub::mark_all_pending`](crate::hub::Hub::mark_all_pending) at
//! `--gap-wake-rate`. The first connection of a node that has no position starts at the
//! stream's end: it had nothing to miss (channels registered before it are marked pending,
//! uncounted, as they were registered while the node could not hear the bus).
//!
//! # A wedged connection
//! Every read blocks at most [`BLOCK`] in Redis, so a healthy connection answers at least
//! that often; a reply that has not come [`STALL_GRACE`] later (a paused server, a stalled
//! socket, a lost reply) ends the connection, counts `nudge_bus_stalls_total`, and the node
//! is not ready until it has reconnected and replayed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::cursor::{Resumed, StreamInfo};
use super::entry_id::EntryId;
use super::message::{self, Message};
use super::resp::{Conn, Entry};
use super::{Bus, BusError};
use crate::metrics::gap;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long one `XREAD` waits in Redis for a new entry.
const BLOCK: Duration = Duration::from_secs(2);
/// A reply later than `BLOCK` plus this means the connection is wedged: noticed within
/// 5 s, well inside the 10 s an operator is promised.
const STALL_GRACE: Duration = Duration::from_secs(3);
/// Entries one read takes at most: 4,096 rather than 512 applied 6–35 % more publishes a
/// second in `scripts/bus-throughput.sh` (entries are ~50 bytes; a reply of 4,096 is
/// ~200 KB). Under that load a read brings ~2,500 (`INFO commandstats`): Redis's cost is
/// per entry then, not per read.
const READ_COUNT: usize = 4096;
/// A read that brought at least this many entries (but not a full `READ_COUNT`) is
/// followed by the next [`GATHER`] after its reply came (applying it included): see
/// [`read`].
const GATHER_FROM: usize = 16;
const GATHER: Duration = Duration::from_millis(1);
/// Refused entries are logged at most this often.
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);
/// While Redis stays down, one warning per this many failed attempts (the rest at debug).
const WARN_EVERY_ATTEMPTS: u32 = 30;

pub(super) async fn run(bus: Arc<Bus>) {
    let mut stop = bus.stop.subscribe();
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP);
    while !*stop.borrow_and_update() {
        let connected = tokio::select! {
            c = connect_and_resume(&bus) => c,
            _ = stop.changed() => break,
        };
        match connected {
            Ok((conn, resumed, replay_until)) => {
                backoff.reset();
                // Its connection most likely died with the reader's.
                bus.publisher.reset().await;
                bus.set_connected(true);
                after_resume(&bus, resumed);
                let why = read(&bus, conn, replay_until, &mut stop).await;
                bus.set_connected(false);
                match why {
                    Some(why) => {
                        warn!(reason = %why, "bus reader lost; not ready until it is back")
                    }
                    None => break,
                }
            }
            Err(e) if backoff.attempts().is_multiple_of(WARN_EVERY_ATTEMPTS) => {
                warn!(error = %e, attempts = backoff.attempts() + 1, "cannot read the bus")
            }
            Err(e) => debug!(error = %e, attempts = backoff.attempts() + 1, "cannot read the bus"),
        }
        tokio::select! {
            _ = sleep(backoff.next_delay()) => {}
            _ = stop.changed() => break,
        }
    }
    bus.stopped.send_replace(true);
    info!(position = ?bus.position(), "bus reader stopped");
}

/// Connects, works out what the interruption cost, and sets the cursor to read on from.
/// Returns the connection, how it resumed, and the stream's last id at that moment
/// (entries up to it that are read now were missed: they count as replayed).
async fn connect_and_resume(bus: &Bus) -> Result<(Conn, Resumed, EntryId), BusError> {
    let mut conn = bus
        .target
        .connect_reader("reader", BLOCK + STALL_GRACE)
        .await?;
    let stream = bus.config.stream.as_str();
    let epoch = epoch(&mut conn, stream).await?;
    let info = stream_info(&mut conn, stream).await?;
    let known = bus.cursor.lock().clone();
    let last_present = match (known.needs_presence(), &info) {
        (Some(last), Some(_)) => entry_exists(&mut conn, stream, last).await?,
        _ => false,
    };
    let (cursor, resumed) = known.resume(&epoch, info.as_ref(), last_present);
    *bus.cursor.lock() = cursor;
    let replay_until = match (resumed, &info) {
        (Resumed::Gap(_), Some(info)) => info.last_generated,
        _ => EntryId::ZERO,
    };
    Ok((conn, resumed, replay_until))
}

/// Counts the gap, and wakes everything when it cannot be replayed.
fn after_resume(bus: &Bus, resumed: Resumed) {
    let position = bus.position();
    let wake_all = match resumed {
        Resumed::Fresh => {
            info!(stream = %bus.config.stream, node = %bus.node_id, ?position, "bus reader started at the stream's end");
            bus.hub.counts().channels > 0
        }
        Resumed::Gap(pair) => {
            bus.hub.metrics().count_gap(pair);
            let (repair, cause) = pair;
            if pair == gap::REPLAYED {
                info!(?position, "bus reader back: reading on from its last entry");
            } else {
                warn!(
                    repair,
                    cause,
                    ?position,
                    "bus reader back, but what it missed cannot be replayed: every channel is marked pending"
                );
            }
            pair != gap::REPLAYED
        }
    };
    if wake_all {
        let hub = bus.hub.clone();
        let rate = bus.config.gap_wake_rate;
        tokio::spawn(async move {
            let channels = hub.mark_all_pending(rate).await;
            info!(channels, "every channel marked pending");
        });
    }
}

/// Reads and applies entries until the connection is lost (returns why) or the bus is
/// stopped (returns `None`).
///
/// The next read is sent, from the last id of a reply, *before* that reply is applied when
/// it need not wait (a full reply: more are waiting; a light load: the next entry should
/// wake at once): Redis then gathers and encodes the next entries while this node applies
/// these. Entries are still applied one reply at a time, in order, each once: the next
/// reply is read only after this one is applied, and a lost connection reads on from the
/// cursor (the last entry applied).
async fn read(
    bus: &Bus,
    mut conn: Conn,
    replay_until: EntryId,
    stop: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut complaints = Complaints::default();
    let mut from = bus.cursor.lock().last.unwrap_or(EntryId::ZERO);
    if let Err(e) = conn.send(&xread(bus, from)).await {
        return Some(e.to_string());
    }
    loop {
        let reply = tokio::select! {
            r = conn.receive_entries() => r,
            _ = stop.changed() => return None,
        };
        let arrived = Instant::now();
        let entries = match reply {
            Ok(entries) => entries,
            Err(e) if e.is_timeout() => {
                bus.hub.metrics().bus_stalls_total.inc();
                return Some(format!(
                    "no reply within {:?}: the connection is wedged",
                    BLOCK + STALL_GRACE
                ));
            }
            Err(e) => return Some(e.to_string()),
        };
        if let Some((last, _)) = entries.last() {
            from = *last;
        }
        // Under a heavy load, let entries gather before the next read: a read per handful
        // of entries made Redis the limit once. A light load (a few entries a read) is
        // read at once, so no wake-up waits.
        let gather = (GATHER_FROM..READ_COUNT).contains(&entries.len());
        if !gather && let Err(e) = conn.send(&xread(bus, from)).await {
            return Some(e.to_string());
        }
        apply_all(bus, &entries, replay_until, &mut complaints);
        if gather {
            tokio::select! {
                _ = tokio::time::sleep_until(arrived + GATHER) => {}
                _ = stop.changed() => return None,
            }
            if let Err(e) = conn.send(&xread(bus, from)).await {
                return Some(e.to_string());
            }
        }
    }
}

/// `XREAD` of the entries after `from`.
fn xread(bus: &Bus, from: EntryId) -> redis::Cmd {
    let mut xread = redis::cmd("XREAD");
    xread
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&bus.config.stream)
        .arg(from.to_string());
    xread
}

/// Applies a reply's entries in order, then moves the cursor past them. A run of
/// publishes goes to the hub as one batch (one call: one clock reading, one metrics
/// update; at 300,000 entries a second that per-call cost was a tenth of a node's CPU), a
/// revocation after the publishes before it. Nothing here awaits, so at every await point
/// of the reader (where a drain or an upgrade stops it) the hub and the cursor agree.
fn apply_all(bus: &Bus, entries: &[Entry], replay_until: EntryId, complaints: &mut Complaints) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let metrics = bus.hub.metrics();
    let mut publishes = Vec::new();
    for (id, fields) in entries {
        metrics
            .bus_lag_seconds
            .observe(now_ms.saturating_sub(id.ms) as f64 / 1000.0);
        let Some(payload) = message::payload(fields) else {
            complaints.complain(*id, "the entry has no field m", 0);
            continue;
        };
        match message::decode(payload) {
            Ok(Message::Publish(batch)) => publishes.extend(batch),
            Ok(Message::Revoke { origin, .. }) if origin.as_deref() == Some(bus.node_id()) => {
                // Applied when it was posted here.
            }
            Ok(revoke @ Message::Revoke { .. }) => {
                publish_all(bus, &mut publishes);
                let filter = revoke.revoke_filter().expect("a revoke");
                let revoked = bus.hub.revoke(&filter);
                debug!(revoked, %id, "revocation from the bus applied");
            }
            Err(why) => complaints.complain(*id, &why, payload.len()),
        }
    }
    publish_all(bus, &mut publishes);
    let replayed = entries.iter().filter(|(id, _)| *id <= replay_until).count();
    if replayed > 0 {
        metrics.bus_entries_replayed_total.inc_by(replayed as u64);
    }
    let mut cursor = bus.cursor.lock();
    for (id, _) in entries {
        cursor.applied(*id);
    }
}

/// Applies the publishes gathered so far, and empties the list.
fn publish_all(bus: &Bus, publishes: &mut Vec<crate::hub::Publish>) {
    if !publishes.is_empty() {
        bus.hub.publish(publishes, "bus");
        publishes.clear();
    }
}

/// The stream's epoch, set by the first node that finds none.
async fn epoch(conn: &mut Conn, stream: &str) -> Result<String, BusError> {
    let key = format!("{stream}:epoch");
    let mut fresh = [0u8; 8];
    getrandom::fill(&mut fresh).expect("the OS random source is available");
    // SET NX GET (Redis 7): sets ours if there is none, and returns what was there.
    let fresh = format!("{:016x}", u64::from_le_bytes(fresh));
    let old: Option<String> = conn
        .query(redis::cmd("SET").arg(&key).arg(&fresh).arg("NX").arg("GET"))
        .await?;
    Ok(old.unwrap_or(fresh))
}

/// `XINFO STREAM`; `None` when there is no stream.
async fn stream_info(conn: &mut Conn, stream: &str) -> Result<Option<StreamInfo>, BusError> {
    let reply: redis::RedisResult<Value> = conn
        .query(redis::cmd("XINFO").arg("STREAM").arg(stream))
        .await;
    let fields = match reply {
        Ok(Value::Array(fields)) => fields,
        Ok(Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        Ok(other) => return Err(BusError::Protocol(format!("XINFO STREAM: {other:?}"))),
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut info = StreamInfo {
        length: 0,
        last_generated: EntryId::ZERO,
        entries_added: 0,
        first_entry: None,
        max_deleted: EntryId::ZERO,
    };
    let (mut has_last, mut has_added) = (false, false);
    for pair in fields.chunks(2) {
        let (Some(name), Some(value)) = (pair.first().and_then(text), pair.get(1)) else {
            continue;
        };
        let id = |v: &Value| text(v).and_then(|t| t.parse::<EntryId>().ok());
        let number = || match value {
            Value::Int(n) => u64::try_from(*n).ok(),
            other => text(other).and_then(|t| t.parse().ok()),
        };
        match name.as_str() {
            "length" => info.length = number().unwrap_or(0),
            "last-generated-id" => {
                info.last_generated = id(value).unwrap_or(EntryId::ZERO);
                has_last = true;
            }
            "entries-added" => {
                info.entries_added = number().unwrap_or(0);
                has_added = true;
            }
            "max-deleted-entry-id" => info.max_deleted = id(value).unwrap_or(EntryId::ZERO),
            "first-entry" => {
                info.first_entry = match value {
                    Value::Array(entry) => entry.first().and_then(id),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    if !(has_last && has_added) {
        return Err(BusError::Protocol(
            "XINFO STREAM without last-generated-id or entries-added: Redis 7 or later is needed"
                .into(),
        ));
    }
    Ok(Some(info))
}

async fn entry_exists(conn: &mut Conn, stream: &str, id: EntryId) -> Result<bool, BusError> {
    let found: Vec<Value> = conn
        .query(
            redis::cmd("XRANGE")
                .arg(stream)
                .arg(id.to_string())
                .arg(id.to_string()),
        )
        .await?;
    Ok(!found.is_empty())
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Rate-limits the warning about refused entries.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    fn complain(&mut self, id: EntryId, why: &str, bytes: usize) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < COMPLAIN_EVERY) {
            self.suppressed += 1;
            return;
        }
        warn!(
            error = why,
            %id,
            bytes,
            suppressed = self.suppressed,
            "bus entry refused"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}
