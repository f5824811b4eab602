//! A minimal HTTP/1.1 client over a raw `TcpStream`, for the polls. Raw on purpose: the
//! soak must know exactly when a request was written, cancel a poll by closing its socket
//! mid-park, and, before it does, look at what already arrived (an answer already in the
//! socket buffer was delivered, not lost).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head or body the soak accepts from nudge (its answers are tiny).
const MAX_RESPONSE: usize = 64 * 1024;

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server said `Connection: close`: don't reuse the connection.
    pub close: bool,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(512),
        })
    }

    /// Leaves mid-poll as a careless or hostile client does (README, Reliability): first
    /// `trailer` (bytes queued behind the parked poll: a pipelined request, a stray CRLF),
    /// then a FIN, or an RST when `reset`. nudge must see it go all the same.
    pub async fn leave(mut self, trailer: &[u8], reset: bool) {
        if !trailer.is_empty() {
            let _ = self.stream.write_all(trailer).await;
        }
        if reset {
            let _ =
                socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
        }
    }

    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await
    }

    /// Reads one whole response. Cancel-safe in the sense the soak needs: bytes read so far
    /// stay in the buffer, so [`Conn::try_complete`] can still find the answer.
    pub async fn read_response(&mut self) -> io::Result<Response> {
        loop {
            if let Some(res) = self.parse()? {
                return Ok(res);
            }
            let mut chunk = [0u8; 2048];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a whole response",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Without waiting: reads what the kernel already holds and returns a whole response
    /// if there is one.
    pub fn try_complete(&mut self) -> Option<Response> {
        let mut chunk = [0u8; 2048];
        for _ in 0..16 {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        self.parse().ok().flatten()
    }

    fn parse(&mut self) -> io::Result<Option<Response>> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let Some(head_end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.buf.len() > MAX_RESPONSE {
                return Err(bad("response head too large"));
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut length = 0usize;
        let mut close = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| bad("bad content-length"))?;
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        if length > MAX_RESPONSE {
            return Err(bad("response body too large"));
        }
        let total = head_end + 4 + length;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[head_end + 4..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Response {
            status,
            body,
            close,
        }))
    }
}

/// The `message` of a poll answer body, e.g. `new_change`.
pub fn message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("message")?.as_str().map(str::to_owned)
}
