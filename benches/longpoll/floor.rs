//! The floor: the least a tokio long-poll server can cost on this machine, measured beside
//! nudge with the same client (issue 14). Plain tokio, no HTTP library, no timers, no metrics
//! library, no client-leaving detection: read a head, park on its topic's `Notify`, write a
//! fixed answer. It speaks just enough of nudge's internal API for the bench to drive it like
//! nudge (register a channel on a topic, publish a topic or NDJSON of topics, count parked
//! polls), so both are measured by the very same steps. A measuring stick, never shipped: it
//! runs as the bench's own executable with `NUDGE_BENCH_FLOOR_SERVE` set.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The environment variable that makes the bench executable serve as the floor.
pub const SERVE_ENV: &str = "NUDGE_BENCH_FLOOR_SERVE";

const NEW_CHANGE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 24\r\n\r\n{\"message\":\"new_change\"}";
const NO_CHANGE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 23\r\n\r\n{\"message\":\"no_change\"}";

#[derive(Default)]
struct Floor {
    /// Channel id → its topic's waiters.
    channels: Mutex<HashMap<String, Arc<Notify>>>,
    topics: Mutex<HashMap<String, Arc<Notify>>>,
    parked: AtomicUsize,
    next_id: AtomicUsize,
}

/// Serves until killed, with as many worker threads as nudge has (one per core).
pub fn serve() -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let floor = Arc::new(Floor::default());
        let public = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let internal = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let public_addr = public.local_addr().expect("bound");
        eprintln!("listening public={public_addr}");
        eprintln!(
            "listening internal={}",
            internal.local_addr().expect("bound")
        );
        let control = floor.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = internal.accept().await {
                tokio::spawn(control.clone().control(stream, public_addr));
            }
        });
        while let Ok((stream, _)) = public.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(floor.clone().poll(stream));
        }
    });
    std::process::exit(0)
}

impl Floor {
    fn topic(&self, name: &str) -> Arc<Notify> {
        self.topics
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// One public connection: polls, one after the other. Kept as small as a parked poll can
    /// be: the head read (with its 4 KiB chunk) is boxed so that it is gone while parked, the
    /// head is dropped and the buffer emptied before parking.
    async fn poll(self: Arc<Self>, mut stream: TcpStream) -> io::Result<()> {
        let mut buf = Vec::new();
        loop {
            let Some(head) = Box::pin(read_head(&mut stream, &mut buf)).await? else {
                return Ok(());
            };
            let notify =
                param(&head, "channel=").and_then(|c| self.channels.lock().get(c).cloned());
            let dont_block = head.contains("dont_block=true");
            drop(head);
            if buf.is_empty() {
                buf = Vec::new();
            }
            let answer = match notify {
                Some(_) if dont_block => NO_CHANGE,
                Some(notify) => {
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    self.parked.fetch_add(1, Ordering::Relaxed);
                    notified.await;
                    self.parked.fetch_sub(1, Ordering::Relaxed);
                    NEW_CHANGE
                }
                None => NO_CHANGE,
            };
            stream.write_all(answer).await?;
        }
    }

    /// One internal connection: registrations, publishes, the parked count.
    async fn control(self: Arc<Self>, mut stream: TcpStream, public: std::net::SocketAddr) {
        let mut buf = Vec::new();
        while let Ok(Some(head)) = read_head(&mut stream, &mut buf).await {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < length {
                let mut chunk = [0u8; 64 * 1024];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..length).collect();
            let body = String::from_utf8_lossy(&body);
            let (status, answer) = if head.starts_with("POST /v1/channels") {
                let topic = quoted_after(&body, "\"topics\":[").unwrap_or_default();
                let id = format!("f{}", self.next_id.fetch_add(1, Ordering::Relaxed));
                let notify = self.topic(topic);
                self.channels.lock().insert(id.clone(), notify);
                (
                    "201 Created",
                    format!(
                        r#"{{"entries":[{{"url":"http://{public}/subscribe?channel={id}"}}]}}"#
                    ),
                )
            } else if head.starts_with("POST /v1/publish") {
                let mut rest = &body[..];
                while let Some(at) = rest.find("\"topic\":") {
                    rest = &rest[at + 8..];
                    if let Some(topic) = quoted_after(rest, "") {
                        let notify = self.topics.lock().get(topic).cloned();
                        if let Some(notify) = notify {
                            notify.notify_waiters();
                        }
                    }
                }
                ("200 OK", "{}".to_owned())
            } else if head.starts_with("GET /metrics") {
                (
                    "200 OK",
                    format!(
                        "nudge_parked_polls {}\n",
                        self.parked.load(Ordering::Relaxed)
                    ),
                )
            } else {
                ("404 Not Found", "{}".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Reads one request head (up to its blank line) out of `buf` and the stream; `None` once
/// the client closes. What follows the head stays in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of a query parameter `key` (given with its `=`) in a request head.
fn param<'h>(head: &'h str, key: &str) -> Option<&'h str> {
    let line = head.lines().next()?;
    let at = line.find(key)? + key.len();
    line[at..].split(['&', ' ']).next()
}

/// The first `"…"` string after `marker` in `text`.
fn quoted_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(&rest[start..start + len])
}
