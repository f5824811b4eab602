//! The fast path's write side: answers serialised once (from the hyper path's own, so both
//! paths say the same), written with one `try_write` from a per-thread buffer.

use std::cell::RefCell;
use std::io;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use tokio::net::TcpStream;

use crate::http::Body;

thread_local! {
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// An answer serialised once: status line and fixed headers, and the body.
pub(super) struct Prebuilt {
    head: Bytes,
    body: Bytes,
}

impl Prebuilt {
    /// Serialises the hyper path's own answer, so both paths say the same thing.
    pub(super) async fn from(res: Response<Body>) -> Prebuilt {
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

    /// Appends the whole response, as hyper would write it, to `out`. With `--cors-origin`
    /// (`cors`), the headers `Cors::decorate` adds on hyper, in its order: `vary`, and for
    /// an allowed origin the origin echoed.
    fn write_to(&self, cors: Option<Option<&[u8]>>, close: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        if let Some(origin) = cors {
            out.extend_from_slice(b"vary: Origin\r\n");
            if let Some(origin) = origin {
                out.extend_from_slice(b"access-control-allow-origin: ");
                out.extend_from_slice(origin);
                out.extend_from_slice(b"\r\naccess-control-expose-headers: Retry-After\r\n");
            }
        }
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

/// Writes a prebuilt answer with one `try_write` from a per-thread buffer; what the socket
/// did not take is returned, for [`write_rest`].
pub(super) fn try_write_reply(
    stream: &TcpStream,
    reply: &Prebuilt,
    cors: Option<Option<&[u8]>>,
    close: bool,
) -> io::Result<Option<Vec<u8>>> {
    OUT.with_borrow_mut(|out| {
        out.clear();
        reply.write_to(cors, close, out);
        match stream.try_write(out) {
            Ok(n) if n == out.len() => Ok(None),
            Ok(n) => Ok(Some(out[n..].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(out.clone())),
            Err(e) => Err(e),
        }
    })
}

/// Writes what [`try_write_reply`] could not.
pub(super) async fn write_rest(stream: &TcpStream, mut rest: Vec<u8>) -> io::Result<()> {
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
