//! hyper's HTTP/1.1 connection, as both listeners and the fast path's hand-off use it: the
//! builder with nudge's limits, and serving one connection until it ends or the drain asks
//! it to close.

use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tracing::debug;

use crate::drain::Watcher;

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
