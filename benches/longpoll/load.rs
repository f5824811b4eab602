//! The client load: parking many long-polls, churning short connections, and publishing in a
//! closed loop. Every loop here is bounded in count and by a deadline.
//!
//! A parked poll is one tokio task holding one `TcpStream`: connect from one of several
//! `127.0.0.x` sources, write the request, wait for the answer bytes, note the instant the answer
//! was complete. Connections are opened at a bounded rate with a bounded number of handshakes in
//! flight, so neither server's accept queue overflows (an overflow costs a one-second SYN
//! retransmit and would be measured as the server's). All tasks live in one `JoinSet`, so dropping
//! a [`Parked`] closes every connection it opened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::http::{self, Connection, Response};

/// How the client opens connections.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Source addresses 127.0.0.2 .. 127.0.0.(1 + sources).
    pub sources: usize,
    /// New connections per second.
    pub connect_rate: f64,
    /// Handshakes in flight at most.
    pub connect_window: usize,
}

/// What became of one parked poll.
pub struct Outcome {
    pub index: usize,
    /// When the answer was complete (or the failure seen).
    pub at: Instant,
    pub result: Result<Response, String>,
    /// Kept open until the whole set is dropped, so that closing answered connections does not
    /// add work to the server while it is still answering the others.
    _stream: Option<TcpStream>,
}

/// A set of long-polls parked on one server.
pub struct Parked {
    tasks: JoinSet<()>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// Requests written in full.
    sent: Arc<AtomicUsize>,
    /// Polls that failed before their request was written.
    failed: Arc<AtomicUsize>,
    pub count: usize,
    pub received: Vec<Outcome>,
}

impl Parked {
    /// Opens `count` connections to `target` at the pace given and sends poll `i` the request
    /// for `paths[i % paths.len()]`. Returns once every request has been written or `deadline`
    /// passed; the polls stay parked until the set is dropped.
    pub async fn open(
        target: SocketAddr,
        paths: Arc<Vec<String>>,
        count: usize,
        pace: Pace,
        deadline: Instant,
    ) -> Parked {
        let (tx, outcomes) = mpsc::unbounded_channel();
        let sent = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let window = Arc::new(Semaphore::new(pace.connect_window.max(1)));
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        for index in 0..count {
            let due = start + Duration::from_secs_f64(index as f64 / pace.connect_rate.max(1.0));
            if Instant::now() < due {
                tokio::time::sleep_until(due.min(deadline)).await;
            }
            let Ok(Ok(permit)) =
                tokio::time::timeout_at(deadline, window.clone().acquire_owned()).await
            else {
                break;
            };
            let source = http::source_address(index, pace.sources);
            let request = http::request_bytes("GET", &paths[index % paths.len()], None, b"");
            let (tx, sent, failed) = (tx.clone(), sent.clone(), failed.clone());
            tasks.spawn(async move {
                let outcome = |result, stream| Outcome {
                    index,
                    at: Instant::now(),
                    result,
                    _stream: stream,
                };
                let connected = http::connect_from(source, target).await;
                drop(permit);
                let mut stream = match connected {
                    Ok(stream) => stream,
                    Err(error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(outcome(Err(format!("connect: {error}")), None));
                        return;
                    }
                };
                if let Err(error) = stream.write_all(&request).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(outcome(Err(format!("write: {error}")), None));
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                let mut buf = Vec::with_capacity(512);
                let result = http::read_response(&mut stream, &mut buf).await;
                let _ = tx.send(outcome(
                    result.map_err(|e| format!("read: {e}")),
                    Some(stream),
                ));
            });
        }
        // Every request written (or failed), within the deadline.
        let done = || sent.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        while done() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Parked {
            tasks,
            outcomes,
            sent,
            failed,
            count,
            received: Vec::new(),
        }
    }

    /// Requests written in full so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Polls that failed before their request was written.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Takes every outcome that has arrived; returns how many there are in all.
    pub fn drain(&mut self) -> usize {
        while let Ok(outcome) = self.outcomes.try_recv() {
            self.received.push(outcome);
        }
        self.received.len()
    }

    /// Waits until every poll has an outcome, or `deadline`. Returns how many have one.
    pub async fn collect(&mut self, deadline: Instant) -> usize {
        while self.received.len() < self.count {
            match tokio::time::timeout_at(deadline, self.outcomes.recv()).await {
                Ok(Some(outcome)) => self.received.push(outcome),
                // Every task has finished (`None`) or time is up.
                Ok(None) | Err(_) => break,
            }
        }
        self.drain()
    }

    /// Closes every connection (RST, see [`http::connect_from`]) and waits for the tasks to end.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.received.clear();
    }
}

/// The result of a closed loop of requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopResult {
    pub completed: usize,
    pub errors: usize,
    pub elapsed: Duration,
}

impl LoopResult {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A request: path, content type, body.
pub type Request = (String, Option<&'static str>, Vec<u8>);

/// `total` requests made by `concurrency` workers, each over its own keep-alive connection, one
/// request at a time; an answer other than 2xx counts as an error. Stops at `deadline`.
pub async fn request_loop(
    target: SocketAddr,
    make: Arc<dyn Fn(usize) -> Request + Send + Sync>,
    total: usize,
    concurrency: usize,
    deadline: Instant,
) -> LoopResult {
    let tally = Arc::new(Tally::default());
    let mut workers = JoinSet::new();
    let mut connections = Vec::new();
    for _ in 0..concurrency.max(1) {
        // Connections are opened before the clock starts.
        match Connection::open(target).await {
            Ok(connection) => connections.push(connection),
            Err(_) => {
                return LoopResult {
                    errors: total,
                    ..LoopResult::default()
                };
            }
        }
    }
    let start = Instant::now();
    for mut connection in connections {
        let (make, tally) = (make.clone(), tally.clone());
        workers.spawn(async move {
            while let Some(i) = tally.claim(total, deadline) {
                let (path, content_type, body) = make(i);
                let answer = tokio::time::timeout_at(
                    deadline,
                    connection.request("POST", &path, content_type, &body),
                )
                .await;
                tally.record(matches!(answer, Ok(Ok(r)) if (200..300).contains(&r.status)));
            }
        });
    }
    tally.result(workers, start).await
}

/// `total` short connections made by `concurrency` workers: connect, send `GET path`, read the
/// whole answer (which the server gives at once), close. Measures how fast a server takes new
/// connections and answers their first request. Stops at `deadline`.
pub async fn connection_loop(
    target: SocketAddr,
    path: String,
    total: usize,
    concurrency: usize,
    sources: usize,
    deadline: Instant,
) -> LoopResult {
    let tally = Arc::new(Tally::default());
    let request: Arc<[u8]> = http::request_bytes("GET", &path, None, b"").into();
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (tally, request) = (tally.clone(), request.clone());
        workers.spawn(async move {
            while let Some(i) = tally.claim(total, deadline) {
                let once = async {
                    let mut stream =
                        http::connect_from(http::source_address(i, sources), target).await?;
                    stream.write_all(&request).await?;
                    let mut buf = Vec::with_capacity(512);
                    http::read_response(&mut stream, &mut buf).await
                };
                let answer = tokio::time::timeout_at(deadline, once).await;
                tally.record(matches!(answer, Ok(Ok(r)) if r.status == 200));
            }
        });
    }
    tally.result(workers, start).await
}

/// What the workers of a closed loop share: the next request's number and the outcomes.
#[derive(Default)]
struct Tally {
    next: AtomicUsize,
    completed: AtomicUsize,
    errors: AtomicUsize,
}

impl Tally {
    /// The number of the next request to make, while there is one and `deadline` is ahead.
    fn claim(&self, total: usize, deadline: Instant) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < total && Instant::now() < deadline).then_some(i)
    }

    fn record(&self, ok: bool) {
        let counter = if ok { &self.completed } else { &self.errors };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for every worker, then counts from `start`.
    async fn result(&self, mut workers: JoinSet<()>, start: Instant) -> LoopResult {
        while workers.join_next().await.is_some() {}
        LoopResult {
            completed: self.completed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            elapsed: start.elapsed(),
        }
    }
}
