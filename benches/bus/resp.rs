//! Just enough of Redis's protocol (RESP2) to append an entry as a main API would, to block
//! in `XREAD` as a node's reader does, and to ask `INFO`: a command is an array of bulk
//! strings written in one go, a reply is read whole. By hand rather than through the `redis`
//! crate so that the clock starts right before the command's first byte and stops when its
//! reply's last byte is read, with no client task in between.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One reply. Only what the bench looks at is kept: texts, numbers, nesting.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array (an `XREAD BLOCK` that timed out).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The text of a bulk or simple string.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// A command as RESP: `*N` then each argument as a bulk string.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("RESP: {what}"))
}

/// Parses one reply from the front of `buf`: `Ok(None)` while it is incomplete, else the
/// reply and how many bytes it took.
pub fn parse(buf: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let kind = *buf.first().ok_or_else(|| invalid("empty reply"))?;
    let line = std::str::from_utf8(&buf[1..line_end]).map_err(|_| invalid("non-UTF-8 line"))?;
    let after = line_end + 2;
    let number = || line.parse::<i64>().map_err(|_| invalid("bad length"));
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.to_owned()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_owned()), after))),
        b':' => Ok(Some((Reply::Int(number()?), after))),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Bulk(None), after)));
            };
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            let data = buf[after..after + len].to_vec();
            Ok(Some((Reply::Bulk(Some(data)), after + len + 2)))
        }
        b'*' => {
            let Ok(count) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Array(None), after)));
            };
            let mut items = Vec::with_capacity(count.min(1024));
            let mut at = after;
            for _ in 0..count {
                match parse(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(invalid(&format!("unknown reply type {:?}", other as char))),
    }
}

/// One connection to Redis and the bytes read but not yet parsed.
pub struct Redis {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Redis {
    /// Connects with `TCP_NODELAY`, so a command leaves when written.
    pub async fn connect(addr: SocketAddr) -> io::Result<Redis> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            stream,
            buf: Vec::with_capacity(512),
        })
    }

    /// Writes bytes made by [`command`] (the caller may start a clock just before).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads one whole reply; an error reply is an error.
    pub async fn reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                if let Reply::Error(e) = &reply {
                    return Err(io::Error::other(format!("Redis: {e}")));
                }
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "Redis closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one command and reads its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.send(&command(args)).await?;
        self.reply().await
    }

    /// `blocked_clients` from `INFO clients`: how many connections wait in a blocking
    /// command, such as each node's reader in `XREAD BLOCK`.
    pub async fn blocked_clients(&mut self) -> io::Result<u64> {
        let info = self.call(&[b"INFO", b"clients"]).await?;
        let text = info.text().ok_or_else(|| invalid("INFO is not a string"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| invalid("INFO clients without blocked_clients"))
    }
}

/// Checks the parser on made-up replies before anything is measured: a bench has no test
/// harness (`harness = false`), and a parser that gets a cut reply wrong would hang a round
/// or end it early rather than fail.
pub fn self_check() -> Result<(), String> {
    let xread = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nm\r\n$2\r\n{}\r\n";
    let fail = |what: &str| Err(format!("RESP self-check: {what}"));
    for cut in 0..xread.len() {
        if !matches!(parse(&xread[..cut]), Ok(None)) {
            return fail(&format!("a reply cut at byte {cut} was taken as whole"));
        }
    }
    match parse(xread) {
        Ok(Some((Reply::Array(Some(streams)), used)))
            if used == xread.len() && streams.len() == 1 => {}
        other => return fail(&format!("an XREAD reply parsed as {other:?}")),
    }
    if !matches!(parse(b"*-1\r\n"), Ok(Some((Reply::Array(None), 5)))) {
        return fail("the null array");
    }
    if command(&[b"XADD", b"k", b"*"]) != b"*3\r\n$4\r\nXADD\r\n$1\r\nk\r\n$1\r\n*\r\n" {
        return fail("a command's bytes");
    }
    Ok(())
}
