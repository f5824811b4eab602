//! The checker's ledger: for every publish and every client it concerns, an obligation that
//! the client must discharge within the deadline. The rule is written out in `main.rs`'s
//! header; the code here follows it to the letter.
//!
//! One `Mutex<Book>` per client, never two at once and never across an `.await`: the
//! publisher, the client's own task and the scanner each take it briefly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// After a gap it cannot replay, a node answers its parked polls `new_change` at
/// `--gap-wake-rate` (1,000 a second): the soak's few hundred parked polls within this window
/// (src/bus/reader.rs, docs/scaling-out.md "When something dies").
const GAP_SPREAD: Duration = Duration::from_secs(2);

/// A publish sent this long before a client's previous `new_change` may still be what wakes
/// it next (it reached the channel after that answer, and left its mark).
const SPURIOUS_SLACK: Duration = Duration::from_secs(2);

/// How a client follows changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Polls with `stream_position` = the last position it fetched from the main API.
    Cursor,
    /// Polls without a position: only the channel's pending mark can save a change.
    Mark,
}

struct Obligation {
    topic: u32,
    position: u64,
    /// The publish request was sent and answered (the deadline's clock starts here).
    sent: Instant,
    answered: Instant,
    /// Published around the reset drill's gap: its clock starts when every node is back
    /// and has woken its channels.
    gap: bool,
    /// The client's paused clock when the obligation was recorded.
    paused_at_start: Duration,
    /// The phase of the run the publish was sent in (an index into `Ledger::phases`).
    phase: usize,
}

/// One client's side of the ledger.
pub struct Book {
    pub kind: Kind,
    pub stream_type: Option<&'static str>,
    pub topics: Vec<u32>,
    /// Its incarnation is running: publishes create obligations.
    live: bool,
    /// Cursor clients: the main API position it last fetched, and when.
    cursor: u64,
    last_fetch: Option<Instant>,
    /// Mark clients: when its current channel's registration answer arrived (`None` while it
    /// has none), and the send time of the poll that got `max_retries`.
    channel_since: Option<Instant>,
    last_new_change: Option<Instant>,
    last_cancel: Option<Instant>,
    /// Deliberate pauses between polls, which stop the deadline's clock.
    paused_total: Duration,
    paused_since: Option<Instant>,
    obligations: Vec<Obligation>,
    /// Past the deadline (already counted lost); kept to tell late from never.
    overdue: Vec<Obligation>,
    /// When it last got `new_change`, or started this life: a `new_change` with no publish
    /// on its topics since (less [`SPURIOUS_SLACK`]) is spurious.
    quiet_since: Option<Instant>,
}

impl Book {
    pub fn new(kind: Kind, stream_type: Option<&'static str>, topics: Vec<u32>) -> Book {
        Book {
            kind,
            stream_type,
            topics,
            live: false,
            cursor: 0,
            last_fetch: None,
            channel_since: None,
            last_new_change: None,
            last_cancel: None,
            paused_total: Duration::ZERO,
            paused_since: None,
            obligations: Vec::new(),
            overdue: Vec::new(),
            quiet_since: None,
        }
    }

    fn paused_clock(&self, now: Instant) -> Duration {
        self.paused_total + self.paused_since.map_or(Duration::ZERO, |s| now - s)
    }

    /// Time an obligation has been outstanding, pauses not counted: from the publish's
    /// answer, when the main API knows the change is on its way (a publish sent while Redis
    /// is paused is answered once Redis is back: the main API's call waits, it does not
    /// fail, and the change could not be anywhere before).
    fn elapsed(&self, o: &Obligation, now: Instant) -> Duration {
        let wall = now.saturating_duration_since(o.answered);
        wall.saturating_sub(self.paused_clock(now).saturating_sub(o.paused_at_start))
    }

    fn wants(&self, stream_type: Option<&str>) -> bool {
        match (self.stream_type, stream_type) {
            (None, _) | (_, None) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
        }
    }
}

/// One published entry, as the publisher saw it.
pub struct Published {
    pub topic: u32,
    pub position: u64,
    pub stream_type: Option<&'static str>,
    pub sent: Instant,
    pub answered: Instant,
}

#[derive(Default)]
pub struct Counts {
    pub obligations: AtomicU64,
    /// Of the obligations: published around a gap in the bus.
    pub gap_obligations: AtomicU64,
    /// Discharged by a `new_change` (and the fetch it triggers) after the publish began.
    pub woken: AtomicU64,
    /// Discharged by a fetch made before the publish was sent (the log already had it).
    pub covered_early: AtomicU64,
    pub excused_cancel: AtomicU64,
    pub excused_retire: AtomicU64,
    /// With a bus: how often a node was seen to have applied the newest publish.
    pub applied_seen: AtomicU64,
    pub excused_node: AtomicU64,
    pub dropped_at_leave: AtomicU64,
    /// `new_change` answers with no publish on the client's topics since its previous one:
    /// outside a wake-all's window, and inside it.
    pub spurious: AtomicU64,
    pub spurious_in_wake_all: AtomicU64,
    /// Obligations that the reset drill's window alone kept from being lost: discharged (or
    /// dropped at leave) past `--deadline` after the publish but within the window, or
    /// excused at `max_retries` although the node had applied the change. The rule is to
    /// lose this window (issue 12.8); until then this says what dropping it would cost.
    pub excused_gap: AtomicU64,
    pub lost: AtomicU64,
    /// Of the lost: delivered after the deadline after all, and never delivered.
    pub late: AtomicU64,
    pub never: AtomicU64,
}

pub struct Ledger {
    books: Vec<Mutex<Book>>,
    by_topic: Vec<Vec<usize>>,
    deadline: Duration,
    /// With a bus, a publish answered `200` is in Redis, not yet applied on the nodes: what
    /// each node (by internal address) was seen to have applied, as (when the node said so,
    /// the newest position it had applied then). `None` on one node, which applies a publish
    /// before answering it.
    applied: Option<Mutex<HashMap<SocketAddr, AppliedLog>>>,
    pub counts: Counts,
    latencies_us: Mutex<Vec<u32>>,
    late_max: Mutex<Duration>,
    /// The reset drill's window: from a little before Redis was killed until every node was
    /// back (`None` while still open).
    bus_gap: Mutex<Option<(Instant, Option<Instant>)>>,
    gap_latency_max: Mutex<Duration>,
    lost: Mutex<Vec<String>>,
    /// The drills' phases and what each saw. Taken after a book's lock, never before.
    phases: Mutex<Phases>,
    /// Per topic, when a publish on it was last sent (microseconds since `started`): sent,
    /// not answered, since a publish that timed out may still have reached Redis.
    last_sent: Vec<AtomicU64>,
    started: Instant,
}

/// One node's answers to the tracker: (when it answered, the newest position it had applied).
type AppliedLog = Vec<(Instant, u64)>;

/// A drill's stretch of the run, from when it began until it ended (or `None`: still on).
struct Span {
    name: &'static str,
    start: Instant,
    end: Option<Instant>,
}

/// What happened in one phase of the run: the drills that were on (several may overlap
/// in a short run), or none.
#[derive(Clone, Debug, Default)]
pub struct PhaseCounts {
    /// `+`-joined names of the drills that were on, or `no drill`.
    pub name: String,
    /// Obligations created by a publish sent in the phase.
    pub obligations: u64,
    /// Of those, lost.
    pub lost: u64,
    /// Of those, kept from being lost only by the reset drill's window (`excused_gap`).
    pub excused: u64,
    /// Spurious `new_change` answers received in the phase (inside a wake-all's window too).
    pub spurious: u64,
}

/// The phases, as the drills open and close them; counts per distinct set of drills on.
#[derive(Default)]
struct Phases {
    spans: Vec<Span>,
    counts: Vec<PhaseCounts>,
}

impl Phases {
    /// The index in `counts` of the phase at `t`.
    fn at(&mut self, t: Instant) -> usize {
        let on: Vec<&str> = self
            .spans
            .iter()
            .filter(|s| s.start <= t && s.end.is_none_or(|end| t <= end))
            .map(|s| s.name)
            .collect();
        let name = if on.is_empty() {
            "no drill".to_owned()
        } else {
            on.join("+")
        };
        match self.counts.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.counts.push(PhaseCounts {
                    name,
                    ..PhaseCounts::default()
                });
                self.counts.len() - 1
            }
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Ledger {
    pub fn new(books: Vec<Book>, topics: usize, deadline: Duration, bus: bool) -> Ledger {
        let mut by_topic = vec![Vec::new(); topics];
        for (slot, b) in books.iter().enumerate() {
            for &t in &b.topics {
                by_topic[t as usize].push(slot);
            }
        }
        Ledger {
            books: books.into_iter().map(Mutex::new).collect(),
            by_topic,
            deadline,
            applied: bus.then(Mutex::default),
            counts: Counts::default(),
            latencies_us: Mutex::new(Vec::new()),
            late_max: Mutex::new(Duration::ZERO),
            bus_gap: Mutex::new(None),
            gap_latency_max: Mutex::new(Duration::ZERO),
            lost: Mutex::new(Vec::new()),
            phases: Mutex::new(Phases::default()),
            last_sent: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            started: Instant::now(),
        }
    }

    /// A publish on `topics` is about to be sent.
    pub fn sending(&self, topics: impl IntoIterator<Item = u32>) {
        let now = self.started.elapsed().as_micros() as u64;
        for t in topics {
            self.last_sent[t as usize].fetch_max(now, Ordering::Relaxed);
        }
    }

    /// A publish sent at `sent` falls in the bus gap window, which lasts until the nodes'
    /// gap spread is over: until then a parked poll may be waiting for its spread answer,
    /// out of its channel's waiter list, so a publish marks the channel instead of waking it.
    pub fn in_bus_gap(&self, sent: Instant) -> bool {
        self.bus_gap.lock().is_some_and(|(start, end)| {
            sent >= start && end.is_none_or(|end| sent <= end + GAP_SPREAD)
        })
    }

    /// Node `node` said at `at` that it had applied every publish up to `position`.
    pub fn applied(&self, node: SocketAddr, position: u64, at: Instant) {
        if let Some(applied) = &self.applied {
            bump(&self.counts.applied_seen);
            applied.lock().entry(node).or_default().push((at, position));
        }
    }

    /// Whether `node` had surely applied the publish of `o` before `t`.
    fn applied_before(&self, node: SocketAddr, o: &Obligation, t: Instant) -> bool {
        match &self.applied {
            None => o.answered < t,
            Some(applied) => applied.lock().get(&node).is_some_and(|seen| {
                // Samples are in time order, and positions only grow.
                let before = seen.partition_point(|&(at, _)| at < t);
                before > 0 && seen[before - 1].1 >= o.position
            }),
        }
    }

    /// The bus goes away now (publishes sent up to 1 s before may have been in flight).
    pub fn bus_gap_begin(&self) {
        let start = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        *self.bus_gap.lock() = Some((start, None));
        self.phases.lock().spans.push(Span {
            name: "reset",
            start,
            end: None,
        });
    }

    /// Every node has resubscribed.
    pub fn bus_gap_end(&self) {
        let now = Instant::now();
        if let Some((_, end)) = self.bus_gap.lock().as_mut() {
            *end = Some(now);
        }
        // The window, and so the phase, lasts until the nodes' gap spread is over.
        self.phase_end("reset", now + GAP_SPREAD);
    }

    /// A drill named `name` begins now (its publishes and answers are counted apart).
    pub fn phase_begin(&self, name: &'static str) {
        self.phases.lock().spans.push(Span {
            name,
            start: Instant::now(),
            end: None,
        });
    }

    /// The drill named `name` that is still on ends at `at`.
    pub fn phase_end(&self, name: &'static str, at: Instant) {
        let mut phases = self.phases.lock();
        if let Some(span) = phases
            .spans
            .iter_mut()
            .rev()
            .find(|s| s.name == name && s.end.is_none())
        {
            span.end = Some(at);
        }
    }

    fn phase_at(&self, t: Instant) -> usize {
        self.phases.lock().at(t)
    }

    /// Adds to the counts of phase `phase`.
    fn phase_bump(&self, phase: usize, f: impl FnOnce(&mut PhaseCounts)) {
        if let Some(c) = self.phases.lock().counts.get_mut(phase) {
            f(c);
        }
    }

    /// An obligation of a publish sent in `phase` was created.
    fn obligation(&self, phase: usize) {
        bump(&self.counts.obligations);
        self.phase_bump(phase, |c| c.obligations += 1);
    }

    /// An obligation was kept from being lost by the reset window alone.
    fn excused_gap(&self, o: &Obligation) {
        bump(&self.counts.excused_gap);
        self.phase_bump(o.phase, |c| c.excused += 1);
    }

    /// What each phase saw, in the order the phases first occurred.
    pub fn phase_counts(&self) -> Vec<PhaseCounts> {
        self.phases.lock().counts.clone()
    }

    /// How long an obligation has been running against its deadline, and that deadline.
    fn clock(&self, b: &Book, o: &Obligation, now: Instant) -> (Duration, Duration) {
        if !o.gap {
            return (b.elapsed(o, now), self.deadline);
        }
        // Due `deadline` after the gap spread is over (or after the publish, if later).
        let gap_end = self.bus_gap.lock().and_then(|(_, end)| end);
        match gap_end {
            None => (Duration::ZERO, self.deadline),
            Some(end) => (
                now.saturating_duration_since((end + GAP_SPREAD).max(o.sent)),
                self.deadline,
            ),
        }
    }

    fn overdue(&self, b: &Book, o: &Obligation, now: Instant) -> bool {
        let (elapsed, deadline) = self.clock(b, o, now);
        elapsed > deadline
    }

    pub fn kind(&self, slot: usize) -> Kind {
        self.books[slot].lock().kind
    }

    pub fn topics(&self, slot: usize) -> (Vec<u32>, Option<&'static str>) {
        let b = self.books[slot].lock();
        (b.topics.clone(), b.stream_type)
    }

    pub fn cursor(&self, slot: usize) -> u64 {
        self.books[slot].lock().cursor
    }

    fn discharge(&self, latency: Duration) {
        self.latencies_us
            .lock()
            .push(latency.as_micros().min(u32::MAX as u128) as u32);
    }

    fn record_lost(&self, slot: usize, b: &Book, o: &Obligation, why: &str, now: Instant) {
        bump(&self.counts.lost);
        self.phase_bump(o.phase, |c| c.lost += 1);
        let mut lost = self.lost.lock();
        if lost.len() < 20 {
            lost.push(format!(
                "client {slot} ({:?}) topic t{} position {}: {why} ({:.2}s after the publish, pauses excluded)",
                b.kind,
                o.topic,
                o.position,
                b.elapsed(o, now).as_secs_f64()
            ));
        }
    }

    /// A client (re)starts: it fetches from the main API, whose log head is `head`.
    pub fn start_incarnation(&self, slot: usize, head: u64) {
        let mut b = self.books[slot].lock();
        b.live = true;
        b.cursor = head;
        b.last_fetch = Some(Instant::now());
        b.channel_since = None;
        b.last_new_change = None;
        b.last_cancel = None;
        b.quiet_since = Some(Instant::now());
        b.obligations.clear();
        self.forget_overdue(&mut b);
    }

    fn forget_overdue(&self, b: &mut Book) {
        self.counts
            .never
            .fetch_add(b.overdue.len() as u64, Ordering::Relaxed);
        b.overdue.clear();
    }

    /// Its channel's registration answer arrived.
    pub fn registered(&self, slot: usize) {
        self.books[slot].lock().channel_since = Some(Instant::now());
    }

    /// A publish was answered `200`: record what it owes.
    pub fn published(&self, p: &Published) {
        let phase = self.phase_at(p.sent);
        for &slot in &self.by_topic[p.topic as usize] {
            let mut b = self.books[slot].lock();
            if !b.live || !b.wants(p.stream_type) {
                continue;
            }
            let obligation = Obligation {
                topic: p.topic,
                position: p.position,
                sent: p.sent,
                answered: p.answered,
                gap: self.in_bus_gap(p.sent),
                paused_at_start: b.paused_clock(p.answered),
                phase,
            };
            match b.kind {
                Kind::Cursor => {
                    if b.cursor >= p.position {
                        // Fetched already: before the publish was sent (the node may skip
                        // this wake-up, SPEC §3) or after a new_change that came since.
                        self.obligation(phase);
                        match b.last_fetch {
                            Some(f) if f > p.sent => {
                                bump(&self.counts.woken);
                                self.discharge(f - p.sent);
                            }
                            _ => bump(&self.counts.covered_early),
                        }
                        continue;
                    }
                }
                Kind::Mark => {
                    // The channel must have been live when the publish began.
                    if b.channel_since.is_none_or(|since| since > p.sent) {
                        continue;
                    }
                    self.obligation(phase);
                    if let Some(at) = b.last_new_change.filter(|&at| at > p.sent) {
                        bump(&self.counts.woken);
                        self.discharge(at - p.sent);
                        continue;
                    }
                    if b.last_cancel.is_some_and(|c| c > p.sent) {
                        bump(&self.counts.excused_cancel);
                        continue;
                    }
                    if obligation.gap {
                        bump(&self.counts.gap_obligations);
                    }
                    b.obligations.push(obligation);
                    continue;
                }
            }
            self.obligation(phase);
            if obligation.gap {
                bump(&self.counts.gap_obligations);
            }
            b.obligations.push(obligation);
        }
    }

    /// A poll was answered `new_change`; a cursor client then fetches (log head `head`).
    pub fn new_change(&self, slot: usize, head: u64) {
        let now = Instant::now();
        let mut b = self.books[slot].lock();
        let b = &mut *b;
        if let Some(since) = b.quiet_since.replace(now) {
            let since = since.checked_sub(SPURIOUS_SLACK).unwrap_or(self.started);
            let since = since.saturating_duration_since(self.started).as_micros() as u64;
            let published = b
                .topics
                .iter()
                .any(|&t| self.last_sent[t as usize].load(Ordering::Relaxed) >= since);
            if !published {
                if self.in_bus_gap(now) {
                    bump(&self.counts.spurious_in_wake_all);
                } else {
                    bump(&self.counts.spurious);
                }
                let phase = self.phase_at(now);
                self.phase_bump(phase, |c| c.spurious += 1);
            }
        }
        match b.kind {
            Kind::Cursor => {
                b.cursor = b.cursor.max(head);
                b.last_fetch = Some(now);
            }
            Kind::Mark => b.last_new_change = Some(now),
        }
        let cursor = b.cursor;
        let kind = b.kind;
        let mut kept = Vec::with_capacity(b.obligations.len());
        for o in b.obligations.drain(..) {
            if kind == Kind::Mark || o.position <= cursor {
                bump(&self.counts.woken);
                let latency = now.saturating_duration_since(o.sent).saturating_sub(
                    (b.paused_total + b.paused_since.map_or(Duration::ZERO, |s| now - s))
                        .saturating_sub(o.paused_at_start),
                );
                if o.gap {
                    if latency > self.deadline {
                        self.excused_gap(&o);
                    }
                    let mut max = self.gap_latency_max.lock();
                    *max = (*max).max(latency);
                } else {
                    self.discharge(latency);
                }
            } else {
                kept.push(o);
            }
        }
        b.obligations = kept;
        let mut still = Vec::new();
        for o in std::mem::take(&mut b.overdue) {
            if kind == Kind::Mark || o.position <= cursor {
                bump(&self.counts.late);
                let late = b.elapsed(&o, now);
                let mut max = self.late_max.lock();
                *max = (*max).max(late);
            } else {
                still.push(o);
            }
        }
        b.overdue = still;
    }

    /// The client gave up on a poll (closed its socket mid-park) or lost its connection. For
    /// a mark client, an answer may have been written to that socket: what was published
    /// before now is excused. A cursor client's next poll carries its position: no excuse.
    pub fn cancelled(&self, slot: usize) {
        let mut b = self.books[slot].lock();
        if b.kind == Kind::Mark {
            b.last_cancel = Some(Instant::now());
            let n = b.obligations.len() as u64;
            b.obligations.clear();
            self.counts.excused_cancel.fetch_add(n, Ordering::Relaxed);
            self.forget_overdue(&mut b);
        }
    }

    /// A poll sent at `poll_sent` to `node` was answered `max_retries`. For a mark client, a
    /// change that node had applied before the poll was sent should have won over the spent
    /// budget (SPEC §3 order): it is lost. One that raced the poll, or was published around a
    /// gap in the bus (the node may never have seen it, and the gap marks only channels still
    /// live when it ends), is excused.
    pub fn max_retries(&self, slot: usize, poll_sent: Instant, node: SocketAddr) {
        let now = Instant::now();
        let mut b = self.books[slot].lock();
        if b.kind != Kind::Mark {
            return;
        }
        b.channel_since = None;
        self.forget_overdue(&mut b);
        let obligations = std::mem::take(&mut b.obligations);
        for o in obligations {
            // Around a bus gap a node may never have seen the change; it marks the channels
            // that are still live when it resubscribes, and a retired one is not.
            let applied = self.applied_before(node, &o, poll_sent);
            if o.gap && applied {
                self.excused_gap(&o);
            }
            if !o.gap && applied {
                self.record_lost(
                    slot,
                    &b,
                    &o,
                    "channel answered max_retries with a change pending",
                    now,
                );
                bump(&self.counts.never);
            } else {
                bump(&self.counts.excused_retire);
            }
        }
    }

    /// The client's node went away (drained or killed): a mark client's pending marks
    /// went with it.
    pub fn node_lost(&self, slot: usize) {
        let mut b = self.books[slot].lock();
        if b.kind == Kind::Mark {
            b.channel_since = None;
            let n = b.obligations.len() as u64;
            b.obligations.clear();
            self.counts.excused_node.fetch_add(n, Ordering::Relaxed);
            self.forget_overdue(&mut b);
        }
    }

    pub fn pause_begin(&self, slot: usize) {
        self.books[slot].lock().paused_since = Some(Instant::now());
    }

    pub fn pause_end(&self, slot: usize) {
        let mut b = self.books[slot].lock();
        if let Some(since) = b.paused_since.take() {
            b.paused_total += since.elapsed();
        }
    }

    /// The client leaves: what is overdue is lost, the rest no longer matters.
    pub fn leave(&self, slot: usize) {
        let now = Instant::now();
        let mut b = self.books[slot].lock();
        let obligations = std::mem::take(&mut b.obligations);
        for o in obligations {
            if self.overdue(&b, &o, now) {
                self.record_lost(slot, &b, &o, "no new_change within the deadline", now);
                bump(&self.counts.never);
            } else {
                if o.gap && b.elapsed(&o, now) > self.deadline {
                    self.excused_gap(&o);
                }
                bump(&self.counts.dropped_at_leave);
            }
        }
        self.forget_overdue(&mut b);
        b.live = false;
        if let Some(since) = b.paused_since.take() {
            b.paused_total += now - since;
        }
    }

    /// Marks every obligation past the deadline lost. Returns how many are outstanding.
    pub fn scan(&self) -> usize {
        let now = Instant::now();
        let mut outstanding = 0;
        for (slot, book) in self.books.iter().enumerate() {
            let mut b = book.lock();
            if b.obligations.is_empty() {
                continue;
            }
            let obligations = std::mem::take(&mut b.obligations);
            let mut kept = Vec::with_capacity(obligations.len());
            for o in obligations {
                if self.overdue(&b, &o, now) {
                    self.record_lost(slot, &b, &o, "no new_change within the deadline", now);
                    b.overdue.push(o);
                } else {
                    kept.push(o);
                }
            }
            outstanding += kept.len();
            b.obligations = kept;
        }
        outstanding
    }

    /// The longest a lost change took to arrive after all.
    pub fn late_max(&self) -> Duration {
        *self.late_max.lock()
    }

    /// The longest a change published around the bus gap took to arrive.
    pub fn gap_latency_max(&self) -> Duration {
        *self.gap_latency_max.lock()
    }

    pub fn lost_samples(&self) -> Vec<String> {
        self.lost.lock().clone()
    }

    /// Latency percentiles (p50, p90, p99, p99.9, max) of discharged obligations.
    pub fn latency_percentiles(&self) -> Option<[Duration; 5]> {
        let mut v = self.latencies_us.lock().clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            Duration::from_micros(v[i] as u64)
        };
        Some([at(0.5), at(0.9), at(0.99), at(0.999), at(1.0)])
    }
}
