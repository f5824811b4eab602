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

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::http::uri::PathAndQuery;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

use super::conn::MAX_HEAD_BYTES;
use super::subscribe::{self, Cors, PublicState, SubscribeQuery, parse_query};
use super::watched::{self, Queued, Watched};
use super::{Body, error};
use crate::drain::Watcher;
use crate::error::ApiError;
use crate::hub::{Answer, ParkedPoll, PollRequest, PollStart};
use crate::metrics::ParkedOn;

/// Headers a fast-path request may carry: as many as hyper takes (past it, both answer 431).
const MAX_HEADERS: usize = 100;
/// Scratch space per worker thread for reading request heads.
const SCRATCH_BYTES: usize = 8 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// A fast-path request, decoded from its head.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest {
    pub query: SubscribeQuery,
    /// The client asked for `Connection: close`.
    pub close: bool,
    /// With `--cors-origin`, the request's `Origin` when it is allowed: echoed in the answer.
    pub allowed_origin: Option<Box<[u8]>>,
}

/// What a buffer holding the start of a connection's next request is.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// A complete head of `len` bytes that the fast path serves.
    Fast { len: usize, request: FastRequest },
    /// Not incomplete, but not for the fast path: hand to hyper.
    Hyper,
    /// The head is not complete yet.
    Partial,
}

/// Decides what a request head is. Pure, so it can be fuzzed and compared with hyper.
/// Every request a browser or an SDK sends is served here; what is left to hyper is what
/// hyper answers with an error or a rarity (another method or version, a body, an upgrade).
pub fn classify(buf: &[u8], cors: &Cors) -> Classified {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Classified::Partial,
        Err(_) => return Classified::Hyper,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Classified::Hyper;
    }
    let Some(target) = req.path else {
        return Classified::Hyper;
    };
    let mut close = false;
    let mut hosts = 0;
    let mut origin = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("origin") {
            if origin.is_some() {
                return Classified::Hyper;
            }
            origin = Some(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Classified::Hyper;
        }
    }
    // hyper answers `400` for no or several `Host`s, in the same words (`check_host`).
    if hosts != 1 {
        return Classified::Hyper;
    }
    let parsed;
    let (path, query) = if target.bytes().all(plainly_valid) {
        match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        }
    } else {
        // Anything unusual (a fragment, bytes outside RFC 3986) is read by the very parser
        // hyper reads targets with, so both paths see the same path and query; what it
        // refuses, hyper refuses.
        match PathAndQuery::try_from(target) {
            Ok(p) => {
                parsed = p;
                (parsed.path(), parsed.query())
            }
            Err(_) => return Classified::Hyper,
        }
    };
    if path != "/subscribe" {
        return Classified::Hyper;
    }
    match parse_query(query) {
        Ok(query) => Classified::Fast {
            len,
            request: FastRequest {
                query,
                close,
                allowed_origin: origin
                    .filter(|o| cors.allows(o))
                    .map(|o| o.to_vec().into_boxed_slice()),
            },
        },
        // hyper answers the 400, with the same words.
        Err(_) => Classified::Hyper,
    }
}

/// Bytes that `http`'s URI parser takes as they are in a path and in a query: letters,
/// digits and RFC 3986's unreserved, sub-delims, `:`, `@`, `/`, `?` and `%`. A target made
/// only of these is split at its first `?` exactly as that parser splits it (a unit test
/// holds this against the parser); any other byte, `#` among them, goes through the parser.
fn plainly_valid(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// An answer serialised once: status line and fixed headers, and the body.
struct Prebuilt {
    head: Bytes,
    body: Bytes,
}

impl Prebuilt {
    /// Serialises the hyper path's own answer, so both paths say the same thing.
    async fn from(res: Response<Body>) -> Prebuilt {
        let mut head = Vec::new();
        let status = res.status();
        head.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
            .as_bytes(),
        );
        for (name, value) in res.headers() {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let body = res
            .into_body()
            .collect()
            .await
            .expect("a Full body never fails")
            .to_bytes();
        Prebuilt {
            head: head.into(),
            body,
        }
    }

    /// Appends the whole response, as hyper would write it, to `out`. With `--cors-origin`
    /// (`cors`), the headers `Cors::decorate` adds on hyper, in its order: `vary`, and for
    /// an allowed origin the origin echoed.
    fn write_to(&self, cors: Option<Option<&[u8]>>, close: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        if let Some(origin) = cors {
            out.extend_from_slice(b"vary: Origin\r\n");
            if let Some(origin) = origin {
                out.extend_from_slice(b"access-control-allow-origin: ");
                out.extend_from_slice(origin);
                out.extend_from_slice(b"\r\naccess-control-expose-headers: Retry-After\r\n");
            }
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(self.body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\ndate: ");
        DATE.with_borrow_mut(|(second, text)| {
            let now = SystemTime::now();
            let s = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if *second != s {
                *second = s;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&self.body);
    }
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
}

/// What the fast path answers.
#[derive(Clone, Copy)]
enum Reply {
    Answer(Answer),
    TooManyPolls,
    OverCapacity,
}

/// How one answer is written besides its kind.
struct Framing {
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
}

/// How waiting on a parked poll ended.
enum Waited {
    Answer(Answer),
    /// The client closed or reset the connection.
    Gone,
    /// The client sent more bytes behind its request: from here on they must be read for
    /// its leaving to be seen ([`FastPath::serve_queued`]).
    Queued,
}

impl FastPath {
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
        }
    }

    fn prebuilt(&self, reply: Reply) -> &Prebuilt {
        match reply {
            Reply::Answer(a) => &self.answers[a.index()],
            Reply::TooManyPolls => &self.too_many_polls,
            Reply::OverCapacity => &self.over_capacity,
        }
    }

    /// Serves one public connection until it closes, or hands it to hyper. `drain` says when
    /// to close, and is dropped (counting the connection closed) when it ends.
    ///
    /// What a parked poll costs is this future's size, so it is kept small: the states a
    /// parked poll does not need (reading a head, with its timers; hyper; a held poll; a
    /// client that queued bytes behind its poll) are boxed, and the parked state itself is
    /// [`wait_parked`].
    pub async fn serve(self: Arc<Self>, stream: TcpStream, mut close: Watcher) {
        loop {
            // Scoped so that nothing of the request outlives the start of the poll.
            let (start, framing) = match Box::pin(self.next_head(&stream, &mut close)).await {
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
                    (self.start_poll(query), framing)
                }
                NextHead::Hyper(prefix) => {
                    // Boxed: hyper's connection future is large.
                    Box::pin(self.hand_to_hyper(stream, prefix, close)).await;
                    return;
                }
                NextHead::Done => return,
            };
            let (reply, parked) = match start {
                PollStart::Answer(a) => (Reply::Answer(a), None),
                PollStart::TooManyPolls => (Reply::TooManyPolls, None),
                PollStart::OverCapacity => (Reply::OverCapacity, None),
                // Rare (ids that are not live): boxed, like the read above.
                PollStart::Hold(held) => {
                    let mut queued = Vec::new();
                    match Box::pin(answer_or_gone(&stream, &mut queued, held.wait())).await {
                        None => return, // the client went away
                        Some(a) if queued.is_empty() => (Reply::Answer(a), None),
                        Some(a) => {
                            let rest = (stream, queued, close);
                            Box::pin(self.answer_then_hyper(Reply::Answer(a), None, framing, rest))
                                .await;
                            return;
                        }
                    }
                }
                PollStart::Park(mut parked) => {
                    self.state.hub.metrics().count_parked(ParkedOn::Fast);
                    match wait_parked(&stream, &mut parked).await {
                        Waited::Answer(a) => (Reply::Answer(a), Some(parked)),
                        Waited::Gone => return, // dropping the poll keeps a change pending
                        Waited::Queued => {
                            Box::pin(self.serve_queued(stream, parked, framing, close)).await;
                            return;
                        }
                    }
                }
            };
            if !self.write(&stream, reply, parked.as_ref(), &framing).await {
                return;
            }
        }
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
        let close_after = framing.close_requested || self.state.hub.is_draining();
        let cors = self
            .state
            .cors
            .enabled()
            .then_some(framing.origin.as_deref());
        let written = match try_write_reply(stream, self.prebuilt(reply), cors, close_after) {
            Ok(None) => Ok(()),
            // Rare (a full socket buffer): boxed, so that no parked poll pays for it.
            Ok(Some(rest)) => Box::pin(write_rest(stream, rest)).await,
            Err(e) => Err(e),
        };
        if let (Err(_), Reply::Answer(answer), Some(parked)) = (&written, reply, parked) {
            parked.undelivered(answer);
        }
        written.is_ok() && !close_after
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
        let answer = {
            let mut park_time = std::pin::pin!(tokio::time::sleep_until(parked.deadline()));
            let answer = std::future::poll_fn(|cx| parked.poll_answer(park_time.as_mut(), cx));
            answer_or_gone(&stream, &mut queued, answer).await
        };
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
        tokio::select! {
            next = tokio::time::timeout(self.header_read_timeout, self.read_head(stream)) => match next {
                Ok(Ok(next)) => next,
                Ok(Err(_)) | Err(_) => NextHead::Done,
            },
            _ = close.signaled() => NextHead::Done,
        }
    }

    /// Starts the poll on the hub.
    fn start_poll(&self, query: SubscribeQuery) -> PollStart {
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
    async fn read_head(&self, stream: &TcpStream) -> io::Result<NextHead> {
        let mut pieces: Option<Vec<u8>> = None;
        loop {
            stream.readable().await?;
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
    // The park time, pinned in place: it lives as long as the poll is parked.
    let mut park_time = std::pin::pin!(tokio::time::sleep_until(parked.deadline()));
    std::future::poll_fn(|cx| {
        let mut byte = [0u8; 1];
        match stream.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Waited::Gone),
            Poll::Ready(Ok(_)) => return Poll::Ready(Waited::Queued),
            Poll::Pending => {}
        }
        parked
            .poll_answer(park_time.as_mut(), cx)
            .map(Waited::Answer)
    })
    .await
}

/// Writes a prebuilt answer with one `try_write` from a per-thread buffer; what the socket
/// did not take is returned, for [`write_rest`].
fn try_write_reply(
    stream: &TcpStream,
    reply: &Prebuilt,
    cors: Option<Option<&[u8]>>,
    close: bool,
) -> io::Result<Option<Vec<u8>>> {
    OUT.with_borrow_mut(|out| {
        out.clear();
        reply.write_to(cors, close, out);
        match stream.try_write(out) {
            Ok(n) if n == out.len() => Ok(None),
            Ok(n) => Ok(Some(out[n..].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(out.clone())),
            Err(e) => Err(e),
        }
    })
}

/// Writes what [`try_write_reply`] could not.
async fn write_rest(stream: &TcpStream, mut rest: Vec<u8>) -> io::Result<()> {
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(&rest) {
            Ok(n) => {
                rest.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(head: &str) -> Classified {
        classify(head.as_bytes(), &Cors::default())
    }

    fn fast_query(head: &str) -> SubscribeQuery {
        match fast(head) {
            Classified::Fast { request, .. } => request.query,
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn plain_subscribe_polls_are_fast() {
        let head = "GET /subscribe?channel=abc&stream_position=5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        match fast(head) {
            Classified::Fast { len, request } => {
                assert_eq!(len, head.len());
                assert_eq!(request.query.channel, "abc");
                assert_eq!(request.query.stream_position, Some(5));
                assert!(!request.close);
            }
            other => panic!("{other:?}"),
        }
        let close = "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n";
        assert!(matches!(
            fast(close),
            Classified::Fast {
                request: FastRequest { close: true, .. },
                ..
            }
        ));
    }

    #[test]
    fn everything_unusual_goes_to_hyper() {
        for head in [
            "POST /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET /subscribex?channel=a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /other HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a&stream_position=-1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            // RFC 9112 §3.2: exactly one Host (hyper answers the 400).
            "GET /subscribe?channel=a HTTP/1.1\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            // Bytes the URI parser refuses: hyper answers them.
            "GET /subscribe?channel=a\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(fast(head), Classified::Hyper, "{head:?}");
        }
        let too_many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            fast(&format!(
                "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n{too_many}\r\n"
            )),
            Classified::Hyper
        );
    }

    #[test]
    fn what_browsers_and_sdks_send_stays_fast() {
        // As many headers as hyper takes.
        let many: String = (0..99).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!("GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert!(matches!(fast(&head), Classified::Fast { .. }));
        // A browser's Origin, with and without --cors-origin.
        let cors = "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nOrigin: https://app\r\n\r\n";
        let allowed = |cors_config: Cors| match classify(cors.as_bytes(), &cors_config) {
            Classified::Fast { request, .. } => request.allowed_origin,
            other => panic!("{other:?}"),
        };
        assert_eq!(allowed(Cors::default()), None);
        assert_eq!(
            allowed(Cors::new(vec!["https://app".into()])).as_deref(),
            Some(&b"https://app"[..])
        );
        assert_eq!(allowed(Cors::new(vec!["https://other".into()])), None);
    }

    #[test]
    fn a_fragment_is_not_part_of_the_query() {
        let q = fast_query("GET /subscribe?channel=abc#f HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(q.channel, "abc");
        let q = fast_query(
            "GET /subscribe?channel=abc&dont_block=true#x&dont_block=false HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(q.dont_block);
        assert_eq!(
            fast("GET /subscribe#?channel=abc HTTP/1.1\r\nHost: x\r\n\r\n"),
            Classified::Hyper,
            "no query before the fragment: hyper's 400"
        );
    }

    /// `plainly_valid` promises that a target made of those bytes is split by hyper's URI
    /// parser at its first `?`, with nothing dropped: held here against that parser.
    #[test]
    fn plainly_valid_bytes_are_taken_as_they_are_by_the_uri_parser() {
        for b in (0u8..=255).filter(|&b| plainly_valid(b)) {
            let c = b as char;
            let target = format!("/sub{c}scribe?chan{c}nel=a{c}b?c");
            let parsed = PathAndQuery::try_from(target.as_str())
                .unwrap_or_else(|e| panic!("{c:?} refused: {e}"));
            let (path, query) = target.split_once('?').unwrap();
            assert_eq!(
                (parsed.path(), parsed.query()),
                (path, Some(query)),
                "{c:?}"
            );
        }
    }

    #[test]
    fn an_incomplete_head_is_partial() {
        assert_eq!(
            fast("GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n"),
            Classified::Partial
        );
        assert_eq!(fast("GE"), Classified::Partial);
    }
}
