//! HTTP/1.1 by hand over any byte stream (plain TCP or TLS), for what a polished client
//! hides: exact answer times, keep-alive connections left idle, a request head sent byte by
//! byte, a connection closed by the server. Every read has a deadline.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

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
}

/// `GET path` with a `Host` header and `extra` header lines (each ending in `\r\n`).
pub fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: nudge.test\r\n{extra}\r\n")
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

/// Reads one answer (head, then a `Content-Length` body) within `within`. A server that
/// closes first is an `UnexpectedEof` error.
pub async fn read_response<S>(stream: &mut S, within: Duration) -> io::Result<Response>
where
    S: AsyncRead + Unpin,
{
    let deadline = Instant::now() + within;
    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(stream, &mut buf, deadline).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = buf.split_off(head_end);
    while body.len() < length {
        read_more(stream, &mut body, deadline).await?;
    }
    body.truncate(length);
    Ok(Response {
        status,
        headers,
        body,
    })
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = timeout_at(deadline, stream.read(&mut chunk))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
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
