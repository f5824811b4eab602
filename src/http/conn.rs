//! hyper's HTTP/1.1 connection, as both listeners and the fast path's hand-off use it: the
//! builder with nudge's limits, and serving one connection until it ends or the drain asks
//! it to close, or (an internal connection, at an upgrade) hands it on between requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use hyper::Request;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tracing::debug;

use crate::drain::Watcher;
use crate::http::watched::Watched;

/// Largest request head (line + headers) hyper buffers; past it hyper answers 431. The fast
/// path hands larger heads to hyper, so both answer them alike.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// hyper's HTTP/1 settings for both listeners: the head timeout and the head size limit.
pub(crate) fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    // Without a timer, hyper silently ignores header_read_timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // max_buf_size alone is no limit on the head: hyper checks it only between reads,
        // and a big head that arrives in a few large reads gets parsed whole. This is the
        // exact check (431, then close).
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

/// Serves one hyper connection until it ends, or shuts it down gracefully on the drain.
pub(crate) async fn serve<I, S>(builder: &http1::Builder, io: I, service: S, mut drain: Watcher)
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<crate::http::Body>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                debug!(error = %e, "connection ended with an error");
            }
        }
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A hyper connection taken off hyper between requests: the socket and the bytes hyper had
/// already read of the next request (a head that had begun to arrive), to be read first by
/// whoever serves it next.
pub struct Between {
    /// The client's connection.
    pub stream: TcpStream,
    /// Read, not yet parsed.
    pub read_ahead: Vec<u8>,
}

/// Where [`serve_movable`] connections go, instead of being closed, while an upgrade
/// collects them.
///
/// Closing a connection that has no request in flight is racy whatever the server does: a
/// keep-alive client may be sending its next request at that moment, and a new connection
/// may have been accepted before its request arrived (hyper closes such a connection at
/// once on a graceful shutdown). The client sees the connection closed without an answer
/// and cannot know whether its `POST` was applied. Handed to the new process instead, the
/// connection is simply answered by it.
#[derive(Default)]
pub struct Handoff {
    collect: Mutex<Option<mpsc::UnboundedSender<Between>>>,
}

impl Handoff {
    /// Opens the collection: from now on a drained connection comes to the receiver.
    pub fn begin(&self) -> mpsc::UnboundedReceiver<Between> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.collect.lock() = Some(tx);
        rx
    }

    /// Closes it: drained connections close again.
    pub fn end(&self) {
        *self.collect.lock() = None;
    }

    fn is_open(&self) -> bool {
        self.collect.lock().is_some()
    }

    fn take(&self, between: Between) -> bool {
        match &*self.collect.lock() {
            Some(tx) => tx.send(between).is_ok(),
            None => false,
        }
    }
}

/// Serves one connection as [`serve`] does, except when the drain signals while `handoff`
/// is open: then the request in flight, if any, is answered (hyper adds `Connection:
/// close`) and the socket, not closed, goes to the handoff with what hyper read beyond. A
/// connection that has not yet had a request goes at once, with what hyper has read of
/// its first head: hyper would wait for the rest of that head, as long as the client takes.
pub(crate) async fn serve_movable<S>(
    builder: &http1::Builder,
    io: Watched,
    service: S,
    mut drain: Watcher,
    handoff: &Handoff,
) where
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<crate::http::Body>>
        + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + Unpin + 'static,
{
    let asked = Arc::new(AtomicBool::new(false));
    let service = Asked {
        inner: service,
        asked: asked.clone(),
    };
    let mut conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let (ended, drained) = tokio::select! {
        res = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => (res, false),
        _ = drain.signaled() => {
            // Polled by this task only: no request can arrive between the look and the move.
            if !asked.load(Ordering::Relaxed) && handoff.is_open() {
                (Ok(()), true)
            } else {
                std::pin::Pin::new(&mut conn).graceful_shutdown();
                (std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await, true)
            }
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "connection ended with an error");
        return;
    }
    if !drained {
        // Ended by the client or by `Connection: close`: closed here, as hyper would.
        return;
    }
    let parts = conn.into_parts();
    let Some((stream, rest)) = parts.io.into_inner().into_parts() else {
        return;
    };
    let mut read_ahead = parts.read_buf.to_vec();
    read_ahead.extend_from_slice(&rest);
    handoff.take(Between { stream, read_ahead });
}

/// A service that notes that hyper has handed it a request.
struct Asked<S> {
    inner: S,
    asked: Arc<AtomicBool>,
}

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for Asked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> S::Future {
        self.asked.store(true, Ordering::Relaxed);
        self.inner.call(req)
    }
}
