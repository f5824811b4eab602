//! The reader's own connection to Redis: RESP2 over TCP or a Unix socket, one request at a
//! time, with the `XREAD` reply read straight from the bytes into entries.
//!
//! Why not the `redis` crate's connection, as everywhere else: its parser builds a `Value`
//! per element (five an entry) through `combine`, and that was half of a node's CPU at
//! ~225,000 entries a second (`perf record` over `scripts/bus-throughput.sh`: 52 % of the
//! node in the crate's parser, 20 % more in allocation); with this, a node's CPU per entry
//! is a third of what it was. The crate still resolves where Redis is and reads every
//! other reply ([`redis::parse_redis_value`]).

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, FromRedisValue, RedisResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use super::entry_id::EntryId;

/// One stream entry: its id and its `[field, value, …]`.
pub(super) type Entry = (EntryId, Vec<Vec<u8>>);

/// Room made in the buffer before each socket read: a full `XREAD` reply (4,096 entries of
/// ~75 bytes of RESP each, ~300 KB) comes in about five reads. Not tuned further: with it a
/// node spent 0.09–0.13 s of CPU on 300,000 entries (`scripts/bus-throughput.sh`).
const READ_CHUNK: usize = 64 * 1024;

/// The longest string Redis sends (its default `proto-max-bulk-len`, 512 MB).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Entries a reply is expected to hold at most (the reader's `COUNT`), for sizing.
const READ_COUNT_HINT: usize = 4096;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection that sends one command and reads its whole reply before the next.
pub(super) struct Conn {
    io: Box<dyn Io>,
    /// Bytes read and not yet consumed; a reply is taken off its front.
    buf: Vec<u8>,
    /// Every reply must come within this once it is waited for (a wedged connection is
    /// caught by it).
    response_timeout: Duration,
    /// A command was sent whose reply is still to be read.
    awaiting: bool,
}

impl Conn {
    /// Connects to `info`'s server, then authenticates and selects its database as the
    /// `redis` crate would.
    pub(super) async fn open(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Conn> {
        let connect = async {
            Ok::<Box<dyn Io>, std::io::Error>(match info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
                ConnectionAddr::Unix(path) => Box::new(UnixStream::connect(path).await?),
                other => {
                    return Err(std::io::Error::other(format!(
                        "the bus reader cannot connect to {other}"
                    )));
                }
            })
        };
        let io = timeout(connect_timeout, connect)
            .await
            .map_err(|_| timed_out())??;
        let mut conn = Conn {
            io,
            buf: Vec::with_capacity(READ_CHUNK),
            response_timeout,
            awaiting: false,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            conn.query::<()>(auth.arg(password)).await?;
        }
        if settings.db() != 0 {
            conn.query::<()>(redis::cmd("SELECT").arg(settings.db()))
                .await?;
        }
        Ok(conn)
    }

    /// Sends `cmd` and reads its reply; an error reply is an `Err`.
    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        self.send(cmd).await?;
        let len = self.receive().await?;
        let value = redis::parse_redis_value(&self.buf[..len]);
        self.buf.drain(..len);
        Ok(redis::from_redis_value(value?.extract_error()?)?)
    }

    /// Sends a command whose reply [`Conn::receive_entries`] reads. Until then no other
    /// command may be sent (one reply in flight at a time).
    pub(super) async fn send(&mut self, cmd: &redis::Cmd) -> RedisResult<()> {
        debug_assert!(!self.awaiting, "one reply in flight at a time");
        timeout(
            self.response_timeout,
            self.io.write_all(&cmd.get_packed_command()),
        )
        .await
        .map_err(|_| timed_out())??;
        self.awaiting = true;
        Ok(())
    }

    /// Reads the reply to an `XREAD` on one stream that [`Conn::send`] sent: its entries, in
    /// order (none when it timed out in Redis).
    pub(super) async fn receive_entries(&mut self) -> RedisResult<Vec<Entry>> {
        let len = self.receive().await?;
        let entries = if self.buf.first() == Some(&b'-') {
            let value = redis::parse_redis_value(&self.buf[..len]);
            value?.extract_error().map(|_| Vec::new())
        } else {
            entries_of(&self.buf[..len]).map_err(|what| {
                redis::RedisError::from(bad_data(&format!("unexpected XREAD reply: {what}")))
            })
        };
        self.buf.drain(..len);
        entries
    }

    /// Reads until the buffer holds the whole reply to what was sent last; returns its
    /// length. The reply is due `response_timeout` after this starts waiting (not after the
    /// command was sent: the reader may have spent a while applying the reply before).
    async fn receive(&mut self) -> RedisResult<usize> {
        if !std::mem::take(&mut self.awaiting) {
            return Err(bad_data("a reply read before a command was sent").into());
        }
        let mut framer = Framer::default();
        let read = async {
            loop {
                if let Some(len) = framer.advance(&self.buf)? {
                    return Ok(len);
                }
                self.buf.reserve(READ_CHUNK);
                if self.io.read_buf(&mut self.buf).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "Redis closed the connection",
                    ));
                }
            }
        };
        Ok(timeout(self.response_timeout, read)
            .await
            .map_err(|_| timed_out())??)
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply in time")
}

fn bad_data(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Finds where one RESP2 reply ends, resuming where it stopped when more bytes come (so a
/// large reply arriving in pieces is scanned once).
#[derive(Default)]
struct Framer {
    /// Where the next element starts.
    pos: usize,
    /// For each array being read, how many of its elements are still to come.
    open: Vec<usize>,
}

impl Framer {
    /// The reply's length once `buf` holds all of it.
    fn advance(&mut self, buf: &[u8]) -> std::io::Result<Option<usize>> {
        loop {
            let Some((kind, n, body)) = header(buf, self.pos)? else {
                return Ok(None);
            };
            match kind {
                b'+' | b'-' | b':' => self.pos = body,
                b'$' if n < 0 => self.pos = body,
                b'$' => {
                    // A length no reply can have (over Redis's own `proto-max-bulk-len`) is
                    // bad data: never a wait for bytes that will not come, nor a wrap-around.
                    let end = usize::try_from(n)
                        .ok()
                        .filter(|&n| n <= MAX_BULK)
                        .and_then(|n| body.checked_add(n)?.checked_add(2))
                        .ok_or_else(|| bad_data("a bad length"))?;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    self.pos = end;
                }
                b'*' if n > 0 => {
                    self.pos = body;
                    self.open.push(n as usize);
                    continue;
                }
                b'*' => self.pos = body,
                _ => return Err(bad_data("not a RESP2 reply")),
            }
            // An element is complete: it may complete the arrays it ends.
            loop {
                match self.open.last_mut() {
                    None => return Ok(Some(self.pos)),
                    Some(left) if *left > 1 => {
                        *left -= 1;
                        break;
                    }
                    Some(_) => {
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// The element header at `at`: its type byte, its number (length, count or value; 0 for
/// `+`/`-`), and where what follows the header starts. `None` when incomplete.
fn header(buf: &[u8], at: usize) -> std::io::Result<Option<(u8, i64, usize)>> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(lf) = buf[at..].iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    if lf < 2 || buf[at + lf - 1] != b'\r' {
        return Err(bad_data("a line without CRLF"));
    }
    let cr = lf - 1;
    let line = &buf[at + 1..at + cr];
    let n = match kind {
        b'$' | b'*' | b':' => number(line).ok_or_else(|| bad_data("a bad length"))?,
        _ => 0,
    };
    Ok(Some((kind, n, at + cr + 2)))
}

fn number(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Reads an `XREAD` reply on one stream from a whole reply: `*-1` (nothing new), or
/// `*1 [*2 [key, *n [*2 [id, *2k [field, value, …]]]]]`.
fn entries_of(reply: &[u8]) -> Result<Vec<Entry>, &'static str> {
    let mut r = Reader { buf: reply, pos: 0 };
    match r.array()? {
        None | Some(0) => return Ok(Vec::new()),
        Some(1) => {}
        Some(_) => return Err("more than one stream"),
    }
    if r.array()? != Some(2) {
        return Err("a stream is not [key, entries]");
    }
    r.bulk()?;
    let count = r.array()?.ok_or("no entries")?;
    // Sized by what was asked for, not by what the reply claims.
    let mut out = Vec::with_capacity(count.min(READ_COUNT_HINT));
    for _ in 0..count {
        if r.array()? != Some(2) {
            return Err("an entry is not [id, fields]");
        }
        let id = std::str::from_utf8(r.bulk()?.ok_or("an entry without an id")?)
            .map_err(|_| "an id that is not text")?
            .parse::<EntryId>()
            .map_err(|_| "an id that is not <ms>-<seq>")?;
        // A deleted entry may come back without fields (`*-1`).
        let n = r.array()?.unwrap_or(0);
        let mut fields = Vec::with_capacity(n.min(2));
        for _ in 0..n {
            fields.push(r.bulk()?.unwrap_or_default().to_vec());
        }
        out.push((id, fields));
    }
    Ok(out)
}

/// Walks a reply already known to be whole.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn line(&mut self, kind: u8) -> Result<i64, &'static str> {
        match header(self.buf, self.pos) {
            Ok(Some((k, n, body))) if k == kind => {
                self.pos = body;
                Ok(n)
            }
            _ => Err("an element of another type"),
        }
    }

    /// An array's length; `None` for a null array.
    fn array(&mut self) -> Result<Option<usize>, &'static str> {
        let n = self.line(b'*')?;
        Ok(usize::try_from(n).ok())
    }

    /// A bulk string; `None` for a null one.
    fn bulk(&mut self) -> Result<Option<&'a [u8]>, &'static str> {
        let Ok(n) = usize::try_from(self.line(b'$')?) else {
            return Ok(None);
        };
        let end = self.pos.checked_add(n).ok_or("a short string")?;
        let bytes = self.buf.get(self.pos..end).ok_or("a short string")?;
        self.pos = end + 2;
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(reply: &[u8]) -> Option<usize> {
        Framer::default().advance(reply).unwrap()
    }

    #[test]
    fn a_reply_is_framed_whole_and_only_whole() {
        let reply: &[u8] = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$2\r\n{}\r\n*2\r\n$3\r\n1-2\r\n*-1\r\n";
        assert_eq!(whole(reply), Some(reply.len()));
        let mut more = reply.to_vec();
        more.extend_from_slice(b"+OK\r\n");
        assert_eq!(whole(&more), Some(reply.len()));
        // Byte by byte, resuming: complete only at the last byte.
        let mut framer = Framer::default();
        for end in 0..reply.len() {
            assert_eq!(framer.advance(&reply[..end]).unwrap(), None, "at {end}");
        }
        assert_eq!(framer.advance(reply).unwrap(), Some(reply.len()));
        for simple in [
            &b"+OK\r\n"[..],
            b"-ERR x\r\n",
            b":12\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
        ] {
            assert_eq!(whole(simple), Some(simple.len()));
        }
        assert!(Framer::default().advance(b"%1\r\n").is_err());
        // Lengths no reply can have are refused, not wrapped around.
        for huge in [
            &b"$9223372036854775807\r\nx\r\n"[..],
            b"$18446744073709551615\r\n",
            b"*1\r\n$9223372036854775807\r\n",
        ] {
            assert!(Framer::default().advance(huge).is_err(), "{huge:?}");
        }
    }

    #[test]
    fn entries_are_read_in_order_with_their_fields() {
        let reply = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$2\r\n{}\r\n*2\r\n$3\r\n1-2\r\n*-1\r\n";
        let entries = entries_of(reply).unwrap();
        assert_eq!(
            entries,
            vec![
                ("1-1".parse().unwrap(), vec![b"m".to_vec(), b"{}".to_vec()]),
                ("1-2".parse().unwrap(), vec![]),
            ]
        );
        assert_eq!(entries_of(b"*-1\r\n").unwrap(), vec![]);
        assert!(entries_of(b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$1\r\nx\r\n*0\r\n").is_err());
        assert!(entries_of(b":1\r\n").is_err());
        // A count it cannot hold does not size anything by itself.
        assert!(entries_of(b"*1\r\n*2\r\n$1\r\ns\r\n*4611686018427387903\r\n").is_err());
    }
}
