//! A client's life: register through the main API, long-poll with raw HTTP/1.1 on a
//! keep-alive connection, cancel a poll mid-park now and then (closing the socket, sometimes
//! with bytes queued behind it or by RST), pause, re-register on `max_retries`, leave and
//! come back; every answer goes to the checker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nudge_testkit::raw::Conn;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use crate::checker::Kind;
use crate::{Ctx, Registered, inc};

/// Resolves once the flag is set.
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

pub(crate) enum Life {
    /// Polls until the end, leaving and coming back now and then.
    Resident,
    /// Arrives with the burst, stays this long, and leaves for good.
    Visitor(Duration),
}

/// How a client that gives up on a parked poll leaves (issue 11.1): with nothing, or with
/// bytes queued behind the poll, or having announced a body it never finished; by FIN or RST.
#[derive(Clone, Copy)]
struct Leaving {
    trailer: &'static [u8],
    /// The poll announced `Content-Length: 2` and sent one byte: its connection is never
    /// reused, even when the answer came first.
    partial_body: bool,
    reset: bool,
}

impl Leaving {
    const PLAIN: Leaving = Leaving {
        trailer: b"",
        partial_body: false,
        reset: false,
    };

    fn pick(rng: &mut fastrand::Rng) -> Leaving {
        const TRAILERS: [&[u8]; 4] = [
            b"",
            b"\r\n",
            b"x",
            b"GET /subscribe?channel=pipelined HTTP/1.1\r\nHost: soak\r\n\r\n",
        ];
        Leaving {
            trailer: TRAILERS[rng.usize(..TRAILERS.len())],
            partial_body: rng.u8(..) < 40,
            reset: rng.bool(),
        }
    }
}

enum PollEnd {
    Answer(String),
    Status(u16),
    Cancelled,
    Transport,
    Stop,
}

pub(crate) async fn client(ctx: Arc<Ctx>, slot: usize, life: Life, mut rng: fastrand::Rng) {
    let a = &ctx.args;
    let kind = ctx.ledger.kind(slot);
    let park_max = a.retry_timeout;
    let arrived = Instant::now();
    let mut first_poll = true;
    'life: loop {
        ctx.ledger.start_incarnation(slot, ctx.head());
        let Some(mut channel) = ctx.register_retrying(slot).await else {
            break 'life;
        };
        let mut conn: Option<Conn> = None;
        loop {
            if *ctx.stop_clients.borrow() {
                break 'life;
            }
            let position = match kind {
                Kind::Cursor => format!("&stream_position={}", ctx.ledger.cursor(slot)),
                Kind::Mark if rng.bool() => "&stream_position=now".to_owned(),
                Kind::Mark => String::new(),
            };
            let cancel_after =
                (rng.f64() < a.cancel_prob).then(|| park_max.mul_f64(0.05 + 0.9 * rng.f64()));
            // Half the clients that will give up leave with bytes behind their poll.
            let leaving = match cancel_after {
                Some(_) if rng.bool() => Leaving::pick(&mut rng),
                _ => Leaving::PLAIN,
            };
            let body = if leaving.partial_body {
                "Content-Length: 2\r\n\r\na"
            } else {
                "\r\n"
            };
            let request = format!(
                "GET {}{position} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer soak-api-token-{slot}\r\nUser-Agent: nudge-soak\r\n{body}",
                channel.target, channel.node.public
            );
            let (end, sent) = poll_once(
                &ctx,
                &mut conn,
                channel.node.public,
                &request,
                cancel_after.map(|after| (after, leaving)),
            )
            .await;
            if first_poll {
                first_poll = false;
                if matches!(life, Life::Visitor(_)) {
                    ctx.figures.burst_parked.fetch_add(1, Ordering::Relaxed);
                }
            }
            match end {
                PollEnd::Stop => break 'life,
                PollEnd::Answer(m) if m == "new_change" => {
                    inc(&ctx.figures.new_change);
                    ctx.ledger.new_change(slot, ctx.head());
                }
                PollEnd::Answer(m) if m == "reconnect" => inc(&ctx.figures.reconnect),
                PollEnd::Answer(m) if m == "max_retries" => {
                    inc(&ctx.figures.max_retries);
                    ctx.ledger.max_retries(slot, sent, channel.node.internal);
                    match ctx.register_retrying(slot).await {
                        Some(c) => {
                            // The new channel may live on another node: so must the socket.
                            if c.node.public != channel.node.public {
                                conn = None;
                            }
                            channel = c;
                        }
                        None => break 'life,
                    }
                }
                PollEnd::Answer(m) => ctx.protocol_error(format!("poll answered {m:?}")),
                PollEnd::Status(429) => {
                    inc(&ctx.figures.too_many_polls);
                    sleep(Duration::from_millis(50)).await;
                }
                PollEnd::Status(503) => {
                    inc(&ctx.figures.over_capacity);
                    sleep(Duration::from_millis(200)).await;
                }
                PollEnd::Status(s) => ctx.protocol_error(format!("poll answered status {s}")),
                PollEnd::Cancelled => {
                    inc(&ctx.figures.cancelled);
                    ctx.ledger.cancelled(slot);
                }
                PollEnd::Transport => {
                    ctx.ledger.cancelled(slot);
                    if ctx.cut_by_crash(&channel.node) {
                        // Killed, coming back where it was: the same URL again, soon.
                        inc(&ctx.figures.cut_by_crash);
                        drop(conn.take());
                        sleep(Duration::from_millis(50)).await;
                    } else if ctx.node_current(&channel.node) {
                        inc(&ctx.figures.transport_errors);
                        sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if !ctx.node_current(&channel.node) {
                // Its node is draining or gone: back to the main API for a URL elsewhere.
                inc(&ctx.figures.moved);
                ctx.ledger.node_lost(slot);
                drop(conn.take());
                match ctx.register_retrying(slot).await {
                    Some(c) => channel = c,
                    None => break 'life,
                }
            }
            match life {
                Life::Visitor(stay) if arrived.elapsed() > stay => break 'life,
                Life::Resident if rng.f64() < a.leave_prob => {
                    // Away for longer than ttl: the channel must expire meanwhile.
                    ctx.ledger.leave(slot);
                    inc(&ctx.figures.leaves);
                    drop(conn.take());
                    let away = a.ttl + Duration::from_millis(2500 + rng.u64(0..1000));
                    tokio::select! {
                        _ = sleep(away) => {}
                        _ = stopped(ctx.stop_clients.clone()) => return,
                    }
                    check_expired(&ctx, &channel).await;
                    continue 'life;
                }
                _ => {}
            }
            if rng.f64() < a.pause_prob {
                let pause = a.pause_max.mul_f64(rng.f64());
                ctx.ledger.pause_begin(slot);
                tokio::select! {
                    _ = sleep(pause) => {}
                    _ = stopped(ctx.stop_clients.clone()) => {}
                }
                ctx.ledger.pause_end(slot);
            }
        }
    }
    ctx.ledger.leave(slot);
}

/// Sends one poll and waits for its end. Returns the end and when the request was written.
async fn poll_once(
    ctx: &Ctx,
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    request: &str,
    cancel: Option<(Duration, Leaving)>,
) -> (PollEnd, Instant) {
    let (cancel_after, leaving) = cancel.unzip();
    let leaving = leaving.unwrap_or(Leaving::PLAIN);
    let mut c = match conn.take() {
        Some(c) => c,
        None => match Conn::connect(addr).await {
            Ok(c) => c,
            Err(_) => return (PollEnd::Transport, Instant::now()),
        },
    };
    if c.send(request.as_bytes()).await.is_err() {
        return (PollEnd::Transport, Instant::now());
    }
    let sent = Instant::now();
    inc(&ctx.figures.polls);
    let cancel = sleep(cancel_after.unwrap_or(Duration::from_secs(3600)));
    let res = tokio::select! {
        res = c.read_response() => Some(res),
        _ = cancel => None,
        _ = stopped(ctx.stop_clients.clone()) => return (PollEnd::Stop, sent),
    };
    let res = match res {
        Some(Ok(r)) => r,
        Some(Err(_)) => return (PollEnd::Transport, sent),
        None => match c.try_complete() {
            // The answer was already here: it was delivered, not cancelled.
            Some(r) => {
                inc(&ctx.figures.answered_at_cancel);
                r
            }
            None => {
                if !leaving.trailer.is_empty() || leaving.partial_body || leaving.reset {
                    inc(&ctx.figures.left_with_bytes_or_reset);
                }
                c.leave(leaving.trailer, leaving.reset).await;
                return (PollEnd::Cancelled, sent);
            }
        },
    };
    if !res.closes() && !leaving.partial_body {
        *conn = Some(c);
    }
    if res.status != 200 {
        return (PollEnd::Status(res.status), sent);
    }
    match message(&res.body) {
        Some(m) => (PollEnd::Answer(m), sent),
        None => {
            ctx.protocol_error(format!(
                "unparsable answer {:?}",
                String::from_utf8_lossy(&res.body)
            ));
            (PollEnd::Status(0), sent)
        }
    }
}

/// After a client's absence longer than ttl, its old channel must be gone.
async fn check_expired(ctx: &Ctx, channel: &Registered) {
    let url = format!(
        "http://{}/v1/channels/{}",
        channel.node.internal, channel.id
    );
    match ctx.http.get(url).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => inc(&ctx.figures.expired_on_time),
        Ok(_) => inc(&ctx.figures.expiry_late),
        Err(_) => {} // its node is gone (drills): nothing to check
    }
}

/// The `message` of a poll answer body, e.g. `new_change`.
fn message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("message")?.as_str().map(str::to_owned)
}
