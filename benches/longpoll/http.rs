//! A minimal HTTP/1.1 client over raw TCP, the same for both servers.
//!
//! The load generator holds up to ~18,000 connections in one process, so a connection is a
//! `TcpStream` and a small buffer, nothing more: no HTTP client library per connection, whose own
//! costs would blur what is measured. Requests are written whole, answers read until complete
//! (`Content-Length` or chunked), and keep-alive connections carry one request at a time.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One complete answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Parses an answer from the front of `buf`: `Ok(None)` while it is incomplete, else the answer
/// and how many bytes of `buf` it took.
pub fn parse_response(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(invalid("response head over 64 KiB"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("malformed status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| invalid("bad length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body_start = head_end + 4;
    if chunked {
        return Ok(parse_chunked(&buf[body_start..])?
            .map(|(body, used)| (Response { status, body }, body_start + used)));
    }
    // Neither header: the answers these servers give here always carry one of them, and a body
    // that runs to the end of the connection would never be "complete" on a keep-alive stream.
    let length = content_length.unwrap_or(0);
    if buf.len() < body_start + length {
        return Ok(None);
    }
    let body = buf[body_start..body_start + length].to_vec();
    Ok(Some((Response { status, body }, body_start + length)))
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

/// Reads one complete answer from `stream` into `buf` (which may already hold some of it) and
/// removes it from `buf`. An end of stream before the answer is complete is an error.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Response> {
    loop {
        if let Some((response, used)) = parse_response(buf)? {
            buf.drain(..used);
            return Ok(response);
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before an answer",
            ));
        }
        buf.extend_from_slice(&chunk[..read]);
    }
}

/// Serialises a request. `Host` is required by HTTP/1.1, and nudge's internal listener takes
/// only a loopback name when it has no token.
pub fn request_bytes(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
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

/// Opens a client socket from `source` (port chosen by the kernel) to `target`.
///
/// Binding client sockets across several `127.0.0.x` addresses gives each address its own range
/// of ephemeral ports, so 18,000 connections (and the ones before them) never exhaust one range.
/// `SO_LINGER` 0 makes a close send RST: no `TIME_WAIT` is left to hold a port for a minute.
pub async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_zero_linger()?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The `i`th of `count` client source addresses, starting at 127.0.0.2 (127.0.0.1 is left to the
/// control connections). All of 127.0.0.0/8 is routed to `lo` on Linux, with no setup.
pub fn source_address(i: usize, count: usize) -> Ipv4Addr {
    let k = (i % count.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k)
}

/// A keep-alive connection for control requests (registering, publishing, reading metrics).
pub struct Connection {
    target: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Connection {
    pub fn new(target: SocketAddr) -> Connection {
        Connection {
            target,
            stream: None,
            buf: Vec::new(),
        }
    }

    /// Opens the connection now, so that a later request's timing does not include the handshake.
    pub async fn open(target: SocketAddr) -> io::Result<Connection> {
        let mut connection = Connection::new(target);
        connection.ensure_open().await?;
        Ok(connection)
    }

    async fn ensure_open(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.target).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        Ok(self.stream.as_mut().expect("just opened"))
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
        let reused = self.stream.is_some();
        match self.send(&bytes).await {
            Err(error) if reused && is_stale(&error) => {
                self.stream = None;
                self.send(&bytes).await
            }
            result => result,
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<Response> {
        let result = async {
            let stream = self.ensure_open().await?;
            stream.write_all(bytes).await?;
            let stream = self.stream.as_mut().expect("open");
            read_response(stream, &mut self.buf).await
        }
        .await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

/// Errors that mean "the server closed this keep-alive connection while it was idle".
fn is_stale(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}
