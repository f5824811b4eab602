//! The buffer-less fast path for `GET /subscribe` (SPEC §7).
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer per connection for as long as
//! the connection lives, and a parked poll lives a long time: that is more than Nchan spends
//! on the whole connection. So on the public listener (plain TCP) a connection starts here:
//! the request head is read into a per-thread scratch buffer and parsed with `httparse`.
//! A plain `GET /subscribe` — HTTP/1.1, no body, no `Expect`/`Upgrade`, a valid query, the
//! whole head in hand and nothing after it — is served here: the poll parks on the hub with
//! no buffer of its own (a client going away is seen with `peek`, which consumes nothing),
//! and the answer is written from bytes serialised once per outcome.
//!
//! Anything else goes to hyper on the same connection, with the bytes already read replayed
//! in front of the stream, and from then on hyper serves that connection exactly as it
//! serves every connection when the fast path is off (`--fast-path false`). The hyper path
//! is the reference: `tests/it/fast_path.rs` sends the same requests through both and
//! compares the answers.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::subscribe::{self, PublicState, SubscribeQuery, parse_query};
use super::{Body, error};
use crate::error::ApiError;
use crate::hub::{Answer, ParkedPoll, PollRequest, PollStart};

/// Headers a fast-path request may carry; more goes to hyper (which takes up to 100).
const MAX_HEADERS: usize = 32;
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
pub fn classify(buf: &[u8], cors_enabled: bool) -> Classified {
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
    let Some(path) = req.path else {
        return Classified::Hyper;
    };
    let query = match path.strip_prefix("/subscribe") {
        Some("") => None,
        Some(rest) => match rest.strip_prefix('?') {
            Some(q) => Some(q),
            None => return Classified::Hyper,
        },
        None => return Classified::Hyper,
    };
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
            || (cors_enabled && name.eq_ignore_ascii_case("origin"))
        {
            return Classified::Hyper;
        }
    }
    match parse_query(query) {
        Ok(query) => Classified::Fast {
            len,
            request: FastRequest { query, close },
        },
        // hyper answers the 400, with the same words.
        Err(_) => Classified::Hyper,
    }
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

    /// Appends the whole response, as hyper would write it, to `out`.
    fn write_to(&self, close: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
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
    cors_enabled: bool,
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

/// How reading the next request head ended.
enum NextHead {
    Fast(FastRequest),
    /// Bytes read so far, to replay in front of the stream for hyper.
    Hyper(Vec<u8>),
    /// The client closed, or sent nothing in time, or the node is draining.
    Done,
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
            cors_enabled: state.cors.enabled(),
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
            Reply::Answer(Answer::NewChange) => &self.answers[0],
            Reply::Answer(Answer::Reconnect) => &self.answers[1],
            Reply::Answer(Answer::MaxRetries) => &self.answers[2],
            Reply::Answer(Answer::NoChange) => &self.answers[3],
            Reply::TooManyPolls => &self.too_many_polls,
            Reply::OverCapacity => &self.over_capacity,
        }
    }

    /// Serves one public connection until it closes, or hands it to hyper. `_guard` is
    /// dropped when the connection ends (the caller's open-connection count).
    ///
    /// What a parked poll costs is this future's size, so it is kept small: the states a
    /// parked poll does not need (reading a head, with its timers; hyper; a held poll) are
    /// boxed, and the parked state itself is [`wait_parked`].
    pub async fn serve<G: Send>(
        self: Arc<Self>,
        stream: TcpStream,
        mut close: watch::Receiver<bool>,
        _guard: G,
    ) {
        loop {
            // Scoped so that nothing of the request outlives the start of the poll.
            let (start, close_requested) = match Box::pin(self.next_head(&stream, &mut close)).await
            {
                NextHead::Fast(FastRequest { query, close }) => {
                    self.served.inc();
                    (self.start_poll(query), close)
                }
                NextHead::Hyper(prefix) => {
                    // Boxed: hyper's connection future is large.
                    let io = TokioIo::new(Replay {
                        prefix,
                        at: 0,
                        stream,
                    });
                    let service = subscribe::service(self.state.clone());
                    Box::pin(crate::server::serve(&self.builder, io, service, close)).await;
                    return;
                }
                NextHead::Done => return,
            };
            let reply = match start {
                PollStart::Answer(a) => Reply::Answer(a),
                PollStart::TooManyPolls => Reply::TooManyPolls,
                PollStart::OverCapacity => Reply::OverCapacity,
                // Rare (ids that are not live): boxed, like the read above.
                PollStart::Hold(held) => match Box::pin(watch_client(&stream, held.wait())).await {
                    Some(a) => Reply::Answer(a),
                    None => return, // the client went away
                },
                PollStart::Park(parked) => match wait_parked(&stream, parked).await {
                    Some(a) => Reply::Answer(a),
                    None => return,
                },
            };
            let close_after = close_requested || self.state.hub.is_draining();
            if write_reply(&stream, self.prebuilt(reply), close_after)
                .await
                .is_err()
                || close_after
            {
                return;
            }
        }
    }

    /// The next request head, or `Done` when the client closes, sends nothing in time, or
    /// the node starts draining.
    async fn next_head(&self, stream: &TcpStream, close: &mut watch::Receiver<bool>) -> NextHead {
        tokio::select! {
            next = tokio::time::timeout(self.header_read_timeout, self.read_head(stream)) => match next {
                Ok(Ok(next)) => next,
                Ok(Err(_)) | Err(_) => NextHead::Done,
            },
            _ = crate::server::became_true(close) => NextHead::Done,
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
                Ok(match classify(buf, self.cors_enabled) {
                    // A complete head over the limit is hyper's too (431), like a partial
                    // one: the last read can complete a head that is already too big.
                    Classified::Fast { len, request }
                        if len == buf.len() && len <= crate::server::MAX_HEAD_BYTES =>
                    {
                        Some(NextHead::Fast(request))
                    }
                    // Pipelined bytes after the head, or not ours: hyper takes it all.
                    Classified::Fast { .. } | Classified::Hyper => {
                        Some(NextHead::Hyper(buf.to_vec()))
                    }
                    // hyper refuses an oversized head with its own answer.
                    Classified::Partial if buf.len() > crate::server::MAX_HEAD_BYTES => {
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

/// Awaits `answer` while watching the connection: `None` if the client closes first.
/// `peek` consumes nothing, so a request the client pipelines meanwhile is read later.
///
/// The close is looked at first (`biased`): when the client's FIN and a publish reach the
/// node together, both are ready by the time this task runs, and an answer taken then
/// would be written into a closed socket and lost. Returning `None` drops the poll instead,
/// whose guard puts a `new_change` it already holds back as the channel's pending mark.
async fn watch_client(stream: &TcpStream, answer: impl Future<Output = Answer>) -> Option<Answer> {
    tokio::pin!(answer);
    let mut byte = [0u8; 1];
    tokio::select! {
        biased;
        peeked = stream.peek(&mut byte) => match peeked {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        },
        a = &mut answer => return Some(a),
    }
    Some(answer.await)
}

/// Waits for a parked poll's answer while watching the connection, as [`watch_client`]
/// does, but with no nested future: the close is seen through `poll_peek` (the socket's own
/// readiness, nothing stored here), the answer through [`ParkedPoll::poll_answer`]. What a
/// parked poll holds for as long as it is parked is this function's state, so every byte
/// here is paid once per parked poll.
async fn wait_parked(stream: &TcpStream, mut parked: ParkedPoll) -> Option<Answer> {
    // The park time, pinned in place: it lives as long as the poll is parked.
    let mut park_time = std::pin::pin!(tokio::time::sleep_until(parked.deadline()));
    // Set once the client has sent more bytes (a pipelined request): from then on only the
    // answer is awaited, and the bytes are read after it.
    let mut pipelined = false;
    std::future::poll_fn(|cx| {
        // The close first, for the reason given at `watch_client`.
        if !pipelined {
            let mut byte = [0u8; 1];
            match stream.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => pipelined = true,
                Poll::Pending => {}
            }
        }
        parked.poll_answer(park_time.as_mut(), cx).map(Some)
    })
    .await
}

/// Writes a prebuilt answer: one `try_write` from a per-thread buffer in the common case.
async fn write_reply(stream: &TcpStream, reply: &Prebuilt, close: bool) -> io::Result<()> {
    let rest = OUT.with_borrow_mut(|out| -> io::Result<Option<Vec<u8>>> {
        out.clear();
        reply.write_to(close, out);
        match stream.try_write(out) {
            Ok(n) if n == out.len() => Ok(None),
            Ok(n) => Ok(Some(out[n..].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(out.clone())),
            Err(e) => Err(e),
        }
    })?;
    let Some(mut rest) = rest else { return Ok(()) };
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

/// A stream with bytes already read put back in front, for hyper.
struct Replay {
    prefix: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(head: &str) -> Classified {
        classify(head.as_bytes(), false)
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
        let close = "GET /subscribe?channel=a HTTP/1.1\r\nConnection: Close\r\n\r\n";
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
            "POST /subscribe?channel=a HTTP/1.1\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.0\r\n\r\n",
            "GET /subscribex?channel=a HTTP/1.1\r\n\r\n",
            "GET /other HTTP/1.1\r\n\r\n",
            "GET /subscribe HTTP/1.1\r\n\r\n",
            "GET /subscribe?channel=a&stream_position=-1 HTTP/1.1\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert_eq!(fast(head), Classified::Hyper, "{head:?}");
        }
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            fast(&format!("GET /subscribe?channel=a HTTP/1.1\r\n{many}\r\n")),
            Classified::Hyper
        );
        let cors = "GET /subscribe?channel=a HTTP/1.1\r\nOrigin: https://app\r\n\r\n";
        assert!(matches!(fast(cors), Classified::Fast { .. }));
        assert_eq!(classify(cors.as_bytes(), true), Classified::Hyper);
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
