//! The buffer-less fast path for `GET /subscribe` (SPEC §7).
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer per connection for as long as
//! the connection lives, and a parked poll lives a long time: that is more than Nchan spends
//! on the whole connection. So on the public listener (plain TCP) a connection starts here:
//! the request head is read into a per-thread scratch buffer and parsed with `httparse`.
//! A `GET /subscribe` over HTTP/1.1 with no body and no `Expect`/`Upgrade`, the whole head in
//! hand and nothing after it, is served here, whatever else it carries (up to hyper's 100
//! headers and 64 KiB): every poll a browser or a Box SDK sends. The poll parks on the hub
//! with no buffer of its own (a client going away is seen with `peek`, which consumes
//! nothing; once the client has sent more bytes behind its request, they are read, so that
//! its leaving stays visible), and the answer is written from bytes serialised once per
//! outcome.
//!
//! Anything else goes to hyper on the same connection, with the bytes already read replayed
//! in front of the stream, and from then on hyper serves that connection exactly as it
//! serves every connection when the fast path is off (`--fast-path false`). The hyper path
//! is the reference: `tests/it/fast_path.rs` sends the same requests through both and
//! compares the answers.
//!
//! Here: the connection loop. Beside it: `classify.rs` reads a request head (what the fuzz
//! targets drive), `write.rs` writes prebuilt answers.

mod classify;
mod handover;
mod write;

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

pub use classify::{Classified, FastRequest, classify};
use handover::{FastTask, Mover};
pub use handover::{Moved, MovedState};
use write::{Prebuilt, try_write_reply, write_rest};

use super::conn::MAX_HEAD_BYTES;
use super::error;
use super::subscribe::{self, PublicState, SubscribeQuery};
use super::watched::{self, Queued, Watched};
use crate::drain::Watcher;
use crate::error::ApiError;
use crate::hub::{Answer, Outcome, ParkedPoll, PollRequest, PollStart};
use crate::metrics::ParkedOn;

/// Scratch space per worker thread for reading request heads.
const SCRATCH_BYTES: usize = 8 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// The fast path of one public listener.
pub struct FastPath {
    state: Arc<PublicState>,
    served: prometheus::IntCounter,
    builder: http1::Builder,
    header_read_timeout: Duration,
    answers: [Prebuilt; 4],
    too_many_polls: Prebuilt,
    over_capacity: Prebuilt,
    /// Moving connections to another process (an upgrade in place).
    mover: Mover,
}

/// What the fast path answers.
#[derive(Clone, Copy)]
enum Reply {
    Answer(Answer),
    TooManyPolls,
    OverCapacity,
}

/// How one answer is written besides its kind.
pub(crate) struct Framing {
    /// The client asked for `Connection: close`.
    close_requested: bool,
    /// The allowed `Origin` to echo (see [`FastRequest::allowed_origin`]).
    origin: Option<Box<[u8]>>,
}

/// How reading the next request head ended.
enum NextHead {
    Fast(FastRequest),
    /// Bytes read so far, to replay in front of the stream for hyper.
    Hyper(Vec<u8>),
    /// The client closed, or sent nothing in time, or the node is draining.
    Done,
    /// Idle, and the node is handing its connections over: nothing of the next request
    /// has been read.
    Move,
}

/// The part of an answer the socket did not take at once, and whether the connection
/// closes after it.
struct Unwritten {
    rest: Vec<u8>,
    close_after: bool,
}

/// An answer that could not be written: a `new_change` goes back to its channel.
fn undelivered(reply: Reply, parked: Option<&ParkedPoll>) {
    if let (Reply::Answer(answer), Some(parked)) = (reply, parked) {
        parked.undelivered(answer);
    }
}

/// How a connection leaves [`FastPath::serve_from`]'s loop: the rare ways on are awaited
/// after it, so that nothing of theirs takes room in the state of a parked poll.
enum Tail {
    /// Closed, moved to another process, or done.
    Done,
    /// Not a fast-path request: hyper serves the connection, these bytes first.
    Hyper(TcpStream, Vec<u8>),
    /// The client queued bytes behind its parked poll ([`FastPath::serve_queued`]).
    Queued(TcpStream, ParkedPoll, Framing),
    /// A held poll's answer, with bytes the client queued behind it for hyper.
    AnswerThenHyper(TcpStream, Reply, Framing, Vec<u8>),
}

/// What a connection does with the poll it started.
enum Next {
    Reply(Reply),
    Park(ParkedPoll),
    Hold(crate::hub::HeldPoll),
    /// Taken out: held elsewhere, or handed over.
    Taken,
}

impl Next {
    /// The parked poll, leaving `Taken` in its place.
    fn take_parked(&mut self) -> Option<ParkedPoll> {
        match std::mem::replace(self, Next::Taken) {
            Next::Park(parked) => Some(parked),
            _ => None,
        }
    }
}

/// How waiting on a parked poll ended.
enum Waited {
    Answer(Answer),
    /// The client closed or reset the connection.
    Gone,
    /// The client sent more bytes behind its request: from here on they must be read for
    /// its leaving to be seen ([`FastPath::serve_queued`]).
    Queued,
    /// Taken off its channel to be handed to another process.
    Handover(crate::hub::HandoverToken),
}

impl FastPath {
    /// The fast path of the public listener, with its answers prebuilt once.
    pub async fn new(
        state: Arc<PublicState>,
        builder: http1::Builder,
        header_read_timeout: Duration,
    ) -> FastPath {
        let answer = |a| Prebuilt::from(subscribe::answer_response(a));
        FastPath {
            served: state
                .hub
                .metrics()
                .public_requests_total
                .with_label_values(&["fast"]),
            answers: [
                answer(Answer::NewChange).await,
                answer(Answer::Reconnect).await,
                answer(Answer::MaxRetries).await,
                answer(Answer::NoChange).await,
            ],
            too_many_polls: Prebuilt::from(error(&ApiError::TooManyPolls)).await,
            over_capacity: Prebuilt::from(error(&ApiError::OverCapacity)).await,
            state,
            builder,
            header_read_timeout,
            mover: Mover::new(),
        }
    }

    fn prebuilt(&self, reply: Reply) -> &Prebuilt {
        match reply {
            Reply::Answer(a) => &self.answers[a.index()],
            Reply::TooManyPolls => &self.too_many_polls,
            Reply::OverCapacity => &self.over_capacity,
        }
    }

    /// Serves one public connection until it closes, or hands it to hyper. `close` says when
    /// to close, and is dropped (counting the connection closed) when it ends.
    ///
    /// What a parked poll costs is this future's size, so it is kept small: the states a
    /// parked poll does not need (reading a head, with its timers; hyper; a held poll; a
    /// client that queued bytes behind its poll) are boxed, and the parked state itself is
    /// `wait_parked`. Not an `async fn` itself: a wrapper's future would hold its arguments
    /// beside the inner one's for the whole life of the connection (80 B more future, 123 B
    /// more per parked poll with the allocator's rounding, measured by the longpoll bench).
    pub fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        close: Watcher,
    ) -> impl Future<Output = ()> + Send + 'static {
        let task = self.mover.enter();
        self.serve_from(stream, close, task, None)
    }

    /// [`FastPath::serve`], beginning with `first` (a poll already started, with its
    /// framing) when given: a connection moved here by an upgrade in place.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` moves its arguments into
    /// locals of its own and keeps room for both in every state, 80 bytes; the parked state
    /// is also arranged so that nothing but the poll outlives the start of its wait (see
    /// `benches/README.md` for what each byte here costs a parked poll).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice"
    )]
    fn serve_from(
        self: Arc<Self>,
        mut stream: TcpStream,
        mut close: Watcher,
        task: FastTask,
        mut first: Option<Box<(PollStart, Framing)>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let tail = loop {
                // Scoped so that nothing of the request outlives the start of the poll, and
                // the start itself is gone before any wait: only `next` holds the poll.
                let (mut next, mut framing) = {
                    let (start, framing) = match first.take() {
                        Some(first) => *first,
                        None => match Box::pin(self.next_head(&stream, &mut close)).await {
                            NextHead::Fast(FastRequest {
                                query,
                                close,
                                allowed_origin,
                            }) => {
                                self.served.inc();
                                let framing = Framing {
                                    close_requested: close,
                                    origin: allowed_origin,
                                };
                                match self.start_poll(&query) {
                                    // The node is handing its connections over: this one
                                    // goes with its request, to be started by the new process.
                                    PollStart::Moving => {
                                        match self.move_pending(stream, query, framing) {
                                            Ok(()) => break Tail::Done,
                                            Err((back, framing)) => {
                                                stream = back;
                                                (PollStart::Moving, framing)
                                            }
                                        }
                                    }
                                    start => (start, framing),
                                }
                            }
                            NextHead::Hyper(prefix) => break Tail::Hyper(stream, prefix),
                            NextHead::Move => {
                                match self.mover.try_move(stream, MovedState::Idle) {
                                    Ok(()) => break Tail::Done,
                                    // The handover ended meanwhile: read the head as usual.
                                    Err((back, _)) => {
                                        stream = back;
                                        continue;
                                    }
                                }
                            }
                            NextHead::Done => break Tail::Done,
                        },
                    };
                    (self.next_step(start), framing)
                };
                let reply = match &mut next {
                    Next::Reply(reply) => *reply,
                    Next::Park(poll) => {
                        self.state.hub.metrics().count_parked(ParkedOn::Fast);
                        match wait_parked(&stream, poll).await {
                            Waited::Answer(a) => Reply::Answer(a),
                            // Dropping the poll keeps a change it held pending.
                            Waited::Gone => break Tail::Done,
                            Waited::Queued => {
                                let poll = next.take_parked().expect("parked");
                                break Tail::Queued(stream, poll, framing);
                            }
                            Waited::Handover(token) => {
                                let poll = next.take_parked().expect("parked");
                                match self.move_parked(stream, poll, framing, token) {
                                    Ok(()) => break Tail::Done,
                                    Err((back, back_framing)) => {
                                        stream = back;
                                        framing = back_framing;
                                        Reply::Answer(self.reconnect())
                                    }
                                }
                            }
                        }
                    }
                    // Rare (ids that are not live): boxed, like the read above.
                    Next::Hold(_) => {
                        let Next::Hold(held) = std::mem::replace(&mut next, Next::Taken) else {
                            unreachable!("matched above")
                        };
                        let mut queued = Vec::new();
                        match Box::pin(answer_or_gone(&stream, &mut queued, held.wait())).await {
                            None => break Tail::Done, // the client went away
                            Some(a) if queued.is_empty() => Reply::Answer(a),
                            Some(a) => {
                                let reply = Reply::Answer(a);
                                break Tail::AnswerThenHyper(stream, reply, framing, queued);
                            }
                        }
                    }
                    Next::Taken => unreachable!("taken only on the way out"),
                };
                let parked = match &next {
                    Next::Park(poll) => Some(poll),
                    _ => None,
                };
                let keep = match self.write_now(&stream, reply, parked, &framing) {
                    Ok(keep) => keep,
                    // Rare (a full socket buffer): boxed, so that no parked poll pays for it.
                    Err(rest) => Box::pin(self.write_rest(&stream, rest, reply, parked)).await,
                };
                if !keep {
                    break Tail::Done;
                }
            };
            // What follows is no longer this fast path's to count (nor to hand over).
            drop(task);
            if let Some(rest) = self.after_loop(tail, close) {
                rest.await;
            }
        }
    }

    /// The rest of a connection that left the loop of [`FastPath::serve_from`] another way
    /// than closing: built here, boxed, and awaited as one future, so that the loop's state
    /// (a parked poll's) has nothing of it. Boxed: hyper's connection future is large.
    fn after_loop(
        self: Arc<Self>,
        tail: Tail,
        close: Watcher,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        Some(match tail {
            Tail::Done => return None,
            Tail::Hyper(stream, prefix) => Box::pin(self.hand_to_hyper(stream, prefix, close)),
            Tail::Queued(stream, poll, framing) => {
                Box::pin(self.serve_queued(stream, poll, framing, close))
            }
            Tail::AnswerThenHyper(stream, reply, framing, queued) => {
                let rest = (stream, queued, close);
                Box::pin(self.answer_then_hyper(reply, None, framing, rest))
            }
        })
    }

    /// What a started poll comes to on this connection.
    fn next_step(&self, start: PollStart) -> Next {
        match start {
            PollStart::Answer(a) => Next::Reply(Reply::Answer(a)),
            PollStart::TooManyPolls => Next::Reply(Reply::TooManyPolls),
            PollStart::OverCapacity => Next::Reply(Reply::OverCapacity),
            // Could not move (the handover ended meanwhile): as in a drain.
            PollStart::Moving => Next::Reply(Reply::Answer(self.reconnect())),
            PollStart::Hold(held) => Next::Hold(held),
            PollStart::Park(parked) => Next::Park(parked),
        }
    }

    /// Hands a connection whose poll the hub would not start (a handover is under way) to
    /// the collector with its request; gives it back when the collection has ended.
    fn move_pending(
        &self,
        stream: TcpStream,
        query: SubscribeQuery,
        framing: Framing,
    ) -> Result<(), (TcpStream, Framing)> {
        let state = MovedState::Pending {
            query,
            close: framing.close_requested,
            origin: framing.origin.map(Vec::from),
        };
        self.mover
            .try_move(stream, state)
            .map_err(|(back, framing)| (back, framing.expect("a poll's framing")))
    }

    /// Hands a parked connection, its poll taken off its channel, to the collector.
    fn move_parked(
        &self,
        stream: TcpStream,
        parked: ParkedPoll,
        framing: Framing,
        token: crate::hub::HandoverToken,
    ) -> Result<(), (TcpStream, Framing)> {
        let state = MovedState::Parked {
            channel: parked.channel().to_string(),
            deadline: parked.deadline(),
            close: framing.close_requested,
            origin: framing.origin.map(Vec::from),
        };
        // Settled: dropping it touches nothing on the hub.
        drop(parked);
        let moved = self.mover.try_move(stream, state);
        // Only now: the collector holds the connection before the handover counts this
        // poll as dealt with.
        drop(token);
        moved.map_err(|(back, framing)| (back, framing.expect("a poll's framing")))
    }

    /// A `reconnect` for a poll that neither moved nor parked during a handover, counted.
    fn reconnect(&self) -> Answer {
        self.state.hub.metrics().count_answer(Answer::Reconnect);
        Answer::Reconnect
    }

    /// Writes an answer; `false` when the connection ends after it (asked for, draining,
    /// or the client gone). A `new_change` that could not be written because the client is
    /// known to be gone goes back to its channel as the pending mark.
    async fn write(
        &self,
        stream: &TcpStream,
        reply: Reply,
        parked: Option<&ParkedPoll>,
        framing: &Framing,
    ) -> bool {
        match self.write_now(stream, reply, parked, framing) {
            Ok(keep) => keep,
            Err(rest) => self.write_rest(stream, rest, reply, parked).await,
        }
    }

    /// [`FastPath::write`] as far as it goes without waiting: `Err` with what the socket
    /// did not take (its buffer is full), for [`FastPath::write_rest`].
    fn write_now(
        &self,
        stream: &TcpStream,
        reply: Reply,
        parked: Option<&ParkedPoll>,
        framing: &Framing,
    ) -> Result<bool, Unwritten> {
        let close_after = framing.close_requested || self.state.hub.is_draining();
        let cors = self
            .state
            .cors
            .enabled()
            .then_some(framing.origin.as_deref());
        match try_write_reply(stream, self.prebuilt(reply), cors, close_after) {
            Ok(None) => Ok(!close_after),
            Ok(Some(rest)) => Err(Unwritten { rest, close_after }),
            Err(_) => {
                undelivered(reply, parked);
                Ok(false)
            }
        }
    }

    /// Writes what [`FastPath::write_now`] could not.
    async fn write_rest(
        &self,
        stream: &TcpStream,
        unwritten: Unwritten,
        reply: Reply,
        parked: Option<&ParkedPoll>,
    ) -> bool {
        match write_rest(stream, unwritten.rest).await {
            Ok(()) => !unwritten.close_after,
            Err(_) => {
                undelivered(reply, parked);
                false
            }
        }
    }

    /// A parked poll whose client sent more bytes behind it: waits for its answer while
    /// reading those bytes (so a FIN or an RST behind them is seen), writes the answer, and
    /// lets hyper serve what the client queued.
    async fn serve_queued(
        self: Arc<Self>,
        stream: TcpStream,
        mut parked: ParkedPoll,
        framing: Framing,
        close: Watcher,
    ) {
        let mut queued = Vec::new();
        let answer = std::future::poll_fn(|cx| parked.poll_answer(cx));
        let answer = answer_or_gone(&stream, &mut queued, answer).await;
        // The client left: dropping the poll keeps a change it held pending.
        let Some(answer) = answer else { return };
        let rest = (stream, queued, close);
        self.answer_then_hyper(Reply::Answer(answer), Some(parked), framing, rest)
            .await;
    }

    /// Writes the answer of a poll behind which the client queued `rest.1`, then hands the
    /// connection to hyper with those bytes in front: pipelining behind a long poll is rare,
    /// and hyper is the reference for it.
    async fn answer_then_hyper(
        self: Arc<Self>,
        reply: Reply,
        parked: Option<ParkedPoll>,
        framing: Framing,
        (stream, queued, close): (TcpStream, Vec<u8>, Watcher),
    ) {
        if self.write(&stream, reply, parked.as_ref(), &framing).await {
            drop(parked);
            self.hand_to_hyper(stream, queued, close).await;
        }
    }

    /// Lets hyper serve the rest of the connection, `prefix` (bytes already read) first.
    async fn hand_to_hyper(self: Arc<Self>, stream: TcpStream, prefix: Vec<u8>, close: Watcher) {
        let (io, client) = Watched::new(stream, prefix);
        let service = subscribe::service(self.state.clone(), client);
        super::conn::serve(&self.builder, TokioIo::new(io), service, close).await;
    }

    /// The next request head, or `Done` when the client closes, sends nothing in time, or
    /// the node starts draining.
    async fn next_head(&self, stream: &TcpStream, close: &mut Watcher) -> NextHead {
        let mut moving = self.mover.watch();
        tokio::select! {
            next = tokio::time::timeout(self.header_read_timeout, self.read_head(stream, &mut moving)) => match next {
                Ok(Ok(next)) => next,
                Ok(Err(_)) | Err(_) => NextHead::Done,
            },
            _ = close.signaled() => NextHead::Done,
        }
    }

    /// Starts the poll on the hub.
    fn start_poll(&self, query: &SubscribeQuery) -> PollStart {
        let request = PollRequest {
            stream_position: query.stream_position,
            dont_block: query.dont_block,
        };
        // Logged when the poll starts: keeping the channel's tag until the answer would cost
        // every parked poll its room. The id is a credential: its short hash only.
        tracing::debug!(channel = %crate::id::log_tag(&query.channel), "poll (fast path)");
        self.state.hub.poll(&query.channel, request)
    }

    /// Reads the next request head: from the per-thread scratch buffer when it arrives in
    /// one piece (the common case, nothing allocated), into a buffer of its own otherwise.
    /// Between requests (nothing read yet) it gives way to a handover: `Move`.
    async fn read_head(
        &self,
        stream: &TcpStream,
        moving: &mut tokio::sync::watch::Receiver<bool>,
    ) -> io::Result<NextHead> {
        let mut pieces: Option<Vec<u8>> = None;
        loop {
            if pieces.is_none() {
                tokio::select! {
                    biased;
                    _ = moving.wait_for(|m| *m) => return Ok(NextHead::Move),
                    readable = stream.readable() => readable?,
                }
            } else {
                stream.readable().await?;
            }
            let step = SCRATCH.with_borrow_mut(|scratch| -> io::Result<Option<NextHead>> {
                let n = match stream.try_read(scratch) {
                    Ok(0) => return Ok(Some(NextHead::Done)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(e),
                };
                let buf: &[u8] = match &mut pieces {
                    None => &scratch[..n],
                    Some(sofar) => {
                        sofar.extend_from_slice(&scratch[..n]);
                        sofar
                    }
                };
                Ok(match classify(buf, &self.state.cors) {
                    // A complete head over the limit is hyper's too (431), like a partial
                    // one: the last read can complete a head that is already too big.
                    Classified::Fast { len, request }
                        if len == buf.len() && len <= MAX_HEAD_BYTES =>
                    {
                        Some(NextHead::Fast(request))
                    }
                    // Pipelined bytes after the head, or not ours: hyper takes it all.
                    Classified::Fast { .. } | Classified::Hyper => {
                        Some(NextHead::Hyper(buf.to_vec()))
                    }
                    // hyper refuses an oversized head with its own answer.
                    Classified::Partial if buf.len() > MAX_HEAD_BYTES => {
                        Some(NextHead::Hyper(buf.to_vec()))
                    }
                    Classified::Partial => {
                        if pieces.is_none() {
                            pieces = Some(scratch[..n].to_vec());
                        }
                        None
                    }
                })
            })?;
            if let Some(next) = step {
                return Ok(next);
            }
        }
    }
}

/// Awaits `answer` while reading whatever the client queues behind its request into
/// `queued`: `None` once the client leaves (ends or resets the stream, or queues more than
/// [`watched::MAX_QUEUED_BYTES`]). Its leaving is looked at first, for the reason given at
/// [`wait_parked`].
async fn answer_or_gone(
    stream: &TcpStream,
    queued: &mut Vec<u8>,
    answer: impl Future<Output = Answer>,
) -> Option<Answer> {
    let mut answer = std::pin::pin!(answer);
    std::future::poll_fn(|cx| {
        let held = queued.len();
        if let Poll::Ready(Queued::Gone(_) | Queued::TooMuch) =
            watched::read_queued(stream, cx, queued, held)
        {
            return Poll::Ready(None);
        }
        answer.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Waits for a parked poll's answer while watching the connection, with no nested future:
/// the client's leaving is seen through `poll_peek` (the socket's own readiness, nothing
/// stored here), the answer through [`ParkedPoll::poll_answer`]. What a parked poll holds
/// for as long as it is parked is this function's state, so every byte here is paid once
/// per parked poll.
///
/// The close is looked at first: when the client's FIN and a publish reach the node
/// together, both are ready by the time this task runs, and an answer taken then would be
/// written into a closed socket and lost. Returning `Gone` drops the poll instead, whose
/// guard puts a `new_change` it already holds back as the channel's pending mark. A peek
/// that finds bytes cannot see past them, so then the bytes must be read: `Queued`.
async fn wait_parked(stream: &TcpStream, parked: &mut ParkedPoll) -> Waited {
    // No timer: the hub answers `reconnect` at the deadline (`hub/deadlines.rs`).
    std::future::poll_fn(|cx| {
        let mut byte = [0u8; 1];
        match stream.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Waited::Gone),
            Poll::Ready(Ok(_)) => return Poll::Ready(Waited::Queued),
            Poll::Pending => {}
        }
        parked.poll_outcome(cx).map(|outcome| match outcome {
            Outcome::Answer(a) => Waited::Answer(a),
            Outcome::Handover(token) => Waited::Handover(token),
        })
    })
    .await
}
