//! A client connection whose leaving stays visible while a poll is parked on it, whatever
//! the client queued behind its request.
//!
//! hyper stops reading a connection while a request is in flight once it holds unread bytes
//! of the next one (a pipelined request, a stray `\r\n`, the rest of a body): from then on a
//! FIN or an RST from the client goes unseen until the answer is written, and a `new_change`
//! taken for a parked poll is written into a dead socket. So hyper is not given the
//! `TcpStream` itself but a [`Watched`] stream, and the service gets a [`ClientWatch`] on the
//! same socket: while a poll is parked, the watch reads whatever arrives into a stash (which
//! hyper reads first, in order, once it reads again) and so sees the end of the stream or a
//! reset the moment it comes. A client that queues more than [`MAX_QUEUED_BYTES`] behind a
//! parked poll is taken as gone: nothing legitimate does, and the bytes must not grow without
//! bound.
//!
//! The fast path uses the same reading loop ([`read_queued`]) on its own bare `TcpStream`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes a client may queue behind a parked poll before it is taken as gone: as much as a
/// request head may hold.
pub const MAX_QUEUED_BYTES: usize = super::conn::MAX_HEAD_BYTES;

/// A TCP stream with bytes already read in front (a head the fast path read before handing
/// the connection to hyper, or what a [`ClientWatch`] read while a poll was parked).
pub struct Watched {
    shared: Arc<Shared>,
}

/// Watches a [`Watched`] stream's client while a poll is parked on it.
#[derive(Clone)]
pub struct ClientWatch {
    shared: Arc<Shared>,
}

struct Shared {
    stream: TcpStream,
    stash: Mutex<Stash>,
}

#[derive(Default)]
struct Stash {
    bytes: Vec<u8>,
    /// How much of `bytes` was handed on already.
    at: usize,
    /// The client ended the stream (`Ok`) or reset it (`Err`): what the next read returns
    /// once `bytes` is used up.
    end: Option<Result<(), io::ErrorKind>>,
}

impl Watched {
    /// Wraps `stream`; `prefix` is read before anything from the socket.
    pub fn new(stream: TcpStream, prefix: Vec<u8>) -> (Watched, ClientWatch) {
        let shared = Arc::new(Shared {
            stream,
            stash: Mutex::new(Stash {
                bytes: prefix,
                ..Stash::default()
            }),
        });
        (
            Watched {
                shared: shared.clone(),
            },
            ClientWatch { shared },
        )
    }
}

impl Watched {
    /// The socket back, with the bytes of the prefix not read yet; `None` once the client
    /// has left (or while a [`ClientWatch`] on it is alive).
    pub fn into_parts(self) -> Option<(TcpStream, Vec<u8>)> {
        let shared = Arc::into_inner(self.shared)?;
        let stash = shared.stash.into_inner();
        if stash.end.is_some() {
            return None;
        }
        let mut left = stash.bytes;
        left.drain(..stash.at);
        Some((shared.stream, left))
    }
}

impl ClientWatch {
    /// Resolves when the client has gone: it ended the stream, reset it, or queued more than
    /// [`MAX_QUEUED_BYTES`]. Whatever it sends meanwhile is kept for the connection's next
    /// read. Cancel-safe: dropping it loses nothing.
    pub async fn gone(&self) {
        std::future::poll_fn(|cx| self.poll_gone(cx)).await
    }

    fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut stash = self.shared.stash.lock();
        if stash.end.is_some() {
            return Poll::Ready(());
        }
        let queued = stash.bytes.len() - stash.at;
        match ready!(read_queued(
            &self.shared.stream,
            cx,
            &mut stash.bytes,
            queued
        )) {
            Queued::Gone(end) => {
                stash.end = Some(end);
                Poll::Ready(())
            }
            Queued::TooMuch => Poll::Ready(()),
        }
    }
}

/// Why [`read_queued`] stopped.
pub enum Queued {
    /// The client ended the stream (`Ok`) or reset it (`Err`).
    Gone(Result<(), io::ErrorKind>),
    /// It queued more than [`MAX_QUEUED_BYTES`].
    TooMuch,
}

/// Reads what a client queues behind a parked poll into `into` until the socket has nothing
/// more (`Pending`, this task woken when it has), the client leaves, or `queued` (what is
/// already held for it) passes [`MAX_QUEUED_BYTES`]. Reading consumes the bytes, which is
/// what lets the next event on the socket, a FIN or an RST, be seen at all.
pub fn read_queued(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    into: &mut Vec<u8>,
    mut queued: usize,
) -> Poll<Queued> {
    let mut chunk = [0u8; 1024];
    loop {
        if queued > MAX_QUEUED_BYTES {
            return Poll::Ready(Queued::TooMuch);
        }
        if let Err(e) = ready!(stream.poll_read_ready(cx)) {
            return Poll::Ready(Queued::Gone(Err(e.kind())));
        }
        match stream.try_read(&mut chunk) {
            Ok(0) => return Poll::Ready(Queued::Gone(Ok(()))),
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                queued += n;
            }
            // Readiness is cleared: the next `poll_read_ready` registers this task.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Queued::Gone(Err(e.kind()))),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        {
            let mut stash = shared.stash.lock();
            if stash.at < stash.bytes.len() {
                let n = buf.remaining().min(stash.bytes.len() - stash.at);
                let at = stash.at;
                buf.put_slice(&stash.bytes[at..at + n]);
                stash.at += n;
                if stash.at == stash.bytes.len() {
                    // Let go of the memory: the stash is rarely used twice.
                    stash.bytes = Vec::new();
                    stash.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match stash.end {
                Some(Ok(())) => return Poll::Ready(Ok(())),
                Some(Err(kind)) => return Poll::Ready(Err(kind.into())),
                None => {}
            }
        }
        loop {
            ready!(shared.stream.poll_read_ready(cx))?;
            match shared.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Writes with `write` once the socket is writable, as tokio's own `TcpStream` does.
fn poll_write_with(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    write: impl Fn(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match write(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return Poll::Ready(done),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_with(&self.shared.stream, cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_write_with(&self.shared.stream, cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What tokio's own `TcpStream` does: end the write side (FIN), keep reading.
        let end = socket2::SockRef::from(&self.shared.stream).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match end {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}
