//! HTTP/1.1 by hand over any byte stream (plain TCP or TLS), for what a polished client
//! hides: exact answer times, keep-alive connections left idle, a request head sent byte by
//! byte, a connection closed by the server, a poll cancelled mid-park. A connection is a
//! stream and a small buffer, nothing more, so the bench can hold thousands of them.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

/// Largest response head accepted (nudge's are a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;

/// The `Host` of a poll written here; its value matters to no server under test.
pub const HOST: &str = "nudge.test";

/// The `Host` of a control request: nudge's internal listener takes only a loopback name
/// when it has no token.
pub const CONTROL_HOST: &str = "localhost";

/// One answer: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The server said `Connection: close`: the connection is not to be reused.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// `GET path` with a `Host` header and `extra` header lines (each ending in `\r\n`).
pub fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n")
}

/// A whole request, to either listener: `Content-Type` when given, `Content-Length` unless a
/// bodiless GET.
pub fn request_bytes(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {CONTROL_HOST}\r\n");
    if let Some(content_type) = content_type {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Parses an answer from the front of `buf`: `Ok(None)` while it is incomplete, else the
/// answer and how many bytes of `buf` it took (`Content-Length` or chunked; neither means
/// an empty body, as a body running to the end of a keep-alive stream never completes).
pub fn parse_response(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(invalid("response head over 64 KiB"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let body_start = head_end + 4;
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return Ok(parse_chunked(&buf[body_start..])?.map(|(body, used)| {
            response.body = body;
            (response, body_start + used)
        }));
    }
    let length: usize = match response.header("content-length") {
        Some(v) => v.parse().map_err(|_| invalid("bad content-length"))?,
        None => 0,
    };
    if buf.len() < body_start + length {
        return Ok(None);
    }
    response.body = buf[body_start..body_start + length].to_vec();
    Ok(Some((response, body_start + length)))
}

/// Decodes a chunked body from the front of `buf`: `Ok(None)` while incomplete.
fn parse_chunked(buf: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text =
            std::str::from_utf8(&buf[at..at + line_end]).map_err(|_| invalid("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        at += line_end + 2;
        if size == 0 {
            // No trailers from these servers: the last chunk is followed by one empty line.
            if buf.len() < at + 2 {
                return Ok(None);
            }
            return Ok(Some((body, at + 2)));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// Reads one complete answer from `stream` into `buf` (which may already hold some of it)
/// and removes it from `buf`, leaving what follows. Cancel-safe: bytes read stay in `buf`.
/// An end of stream first is an `UnexpectedEof` error.
pub async fn read_buffered<S>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<Response>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some((response, used)) = parse_response(buf)? {
            buf.drain(..used);
            return Ok(response);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a whole answer",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one answer within `within`; a late one is a `TimedOut` error.
pub async fn read_response<S>(stream: &mut S, within: Duration) -> io::Result<Response>
where
    S: AsyncRead + Unpin,
{
    timeout(within, read_buffered(stream, &mut Vec::with_capacity(512)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Writes `request` and reads one answer, within `within`.
pub async fn exchange<S>(stream: &mut S, request: &str, within: Duration) -> io::Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    read_response(stream, within).await
}

/// `GET path&dont_block=true`: the answer a poll of `path` gets at once, within 5 s.
pub async fn poll_now<S>(stream: &mut S, path: &str) -> io::Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = get(&format!("{path}&dont_block=true"), "");
    exchange(stream, &request, Duration::from_secs(5)).await
}

/// Waits until the server closes the connection (end of stream or reset), reading and
/// discarding anything it still sends; `false` if it is still open at the deadline.
pub async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// One TCP connection and what it has read but not yet answered.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        Ok(Conn::from(TcpStream::connect(addr).await?))
    }

    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await
    }

    /// Reads one whole answer, with no deadline of its own. Cancel-safe: bytes read so far
    /// stay, so [`Conn::try_complete`] can still find the answer.
    pub async fn read_response(&mut self) -> io::Result<Response> {
        read_buffered(&mut self.stream, &mut self.buf).await
    }

    /// Without waiting: reads what the kernel already holds and returns a whole answer if
    /// there is one.
    pub fn try_complete(&mut self) -> Option<Response> {
        let mut chunk = [0u8; 2048];
        for _ in 0..16 {
            match self.stream.try_read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        let (response, used) = parse_response(&self.buf).ok().flatten()?;
        self.buf.drain(..used);
        Some(response)
    }

    /// Leaves mid-poll as a careless or hostile client does: first `trailer` (bytes queued
    /// behind the parked poll: a pipelined request, a stray CRLF), then a FIN, or an RST
    /// when `reset`.
    pub async fn leave(mut self, trailer: &[u8], reset: bool) {
        if !trailer.is_empty() {
            let _ = self.stream.write_all(trailer).await;
        }
        if reset {
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

impl From<TcpStream> for Conn {
    /// With `TCP_NODELAY`: a request goes out when written, so its send time is exact.
    fn from(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: Vec::with_capacity(512),
        }
    }
}

/// A keep-alive connection for one request at a time (registering, publishing, reading
/// metrics), opened when first needed and opened again when the server closed it while idle.
pub struct Client {
    target: SocketAddr,
    conn: Option<Conn>,
}

impl Client {
    pub fn new(target: SocketAddr) -> Client {
        Client { target, conn: None }
    }

    /// Opens the connection now, so that a later request's timing leaves out the handshake.
    pub async fn open(target: SocketAddr) -> io::Result<Client> {
        Ok(Client {
            target,
            conn: Some(Conn::connect(target).await?),
        })
    }

    /// Sends one request and reads its answer. A connection the server closed while idle is
    /// reopened once; any other failure drops the connection and is returned.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<Response> {
        let bytes = request_bytes(method, path, content_type, body);
        let reused = self.conn.is_some();
        match self.send(&bytes).await {
            Err(error) if reused && is_stale(&error) => self.send(&bytes).await,
            result => result,
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<Response> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn::connect(self.target).await?,
        };
        conn.send(bytes).await?;
        let response = conn.read_response().await?;
        self.conn = Some(conn);
        Ok(response)
    }
}

/// Errors that mean "the server closed this keep-alive connection while it was idle".
fn is_stale(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_complete_only_with_its_whole_body_and_leaves_what_follows() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nokHTTP/1.1";
        assert!(parse_response(&two[..40]).unwrap().is_none());
        let (res, used) = parse_response(two).unwrap().unwrap();
        assert_eq!((res.status, res.text(), used), (200, "ok", two.len() - 8));
        assert!(res.closes());
        let chunked =
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n";
        let (res, used) = parse_response(chunked).unwrap().unwrap();
        assert_eq!((res.status, res.text(), used), (404, "no", chunked.len()));
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }
}
