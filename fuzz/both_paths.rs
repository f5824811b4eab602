//! Both paths of the public listener answer every request alike (issue 11.5), shown by
//! generation: request heads are built from a grammar — methods, targets, query parameters in
//! any order, repeated, percent-encoded, fragments, odd bytes, versions, header sets (Host
//! zero to two times, Connection, bodies, Expect, Origin, up to 110 headers) and pipelining —
//! and sent to a node with the fast path and to one without it (hyper only). Their answers
//! must be the same bytes (but for `date`), and their channels the same state afterwards.
//!
//! The choices come from bytes: the fuzz target `both_paths` feeds it libFuzzer's input, and
//! `cargo test` (tests/it/head_grammar.rs) a bounded number of seeded random cases.

use std::sync::Arc;
use std::time::Duration;

use nudge::config::Config;
use nudge::hub::{Hub, Publish, Registration};
use nudge::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Choices drawn from a byte string; zeros once it runs out, so every input is a case.
pub struct Draw<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Draw<'a> {
    pub fn new(bytes: &'a [u8]) -> Draw<'a> {
        Draw { bytes, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// A number below `n` (n ≤ 65,536).
    fn below(&mut self, n: usize) -> usize {
        let v = (usize::from(self.byte()) << 8) | usize::from(self.byte());
        v % n
    }

    /// True `percent` times in a hundred (never, once the input has run out).
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// The `Origin` both nodes allow.
pub const ALLOWED_ORIGIN: &str = "https://app.example";

/// A generated case: what is written on one connection, write by write (`{C}` standing
/// for the channel's id; several requests in one write are pipelined), and whether the
/// channel has a change pending first.
#[derive(Debug)]
pub struct Case {
    pub pending: bool,
    pub writes: Vec<String>,
}

/// Builds a case: one to three requests, each written alone or pipelined with the next,
/// then a last `dont_block` poll with `Connection: close` so that every node ends the
/// connection when it is done.
pub fn generate(d: &mut Draw, case_no: usize) -> Case {
    let pending = d.chance(30);
    let mut writes = vec![String::new()];
    for n in 0..1 + d.below(3) {
        writes.last_mut().unwrap().push_str(&request(d, case_no, n));
        if !d.chance(15) {
            writes.push(String::new());
        }
    }
    writes.last_mut().unwrap().push_str(
        "GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
    );
    Case { pending, writes }
}

fn request(d: &mut Draw, case_no: usize, n: usize) -> String {
    let method = if d.chance(90) {
        "GET"
    } else {
        d.pick(&["POST", "OPTIONS", "get", "PUT", "DELETE"])
    };
    let version = if d.chance(90) {
        "HTTP/1.1"
    } else {
        d.pick(&["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1"])
    };
    let mut head = format!("{method} {} {version}\r\n", target(d, case_no, n));
    let mut body = String::new();
    let host = if d.chance(30) { "HOST" } else { "Host" };
    let hosts = if d.chance(85) { 1 } else { d.pick(&[0, 2]) };
    for h in 0..hosts {
        head.push_str(&format!("{host}: n{h}.test\r\n"));
    }
    if d.chance(20) {
        head.push_str(d.pick(&[
            "Connection: close\r\n",
            "Connection: keep-alive\r\n",
            "connection: Keep-Alive\r\n",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n",
            "Connection: close, te\r\n",
        ]));
    }
    if d.chance(8) {
        match d.below(4) {
            0 => head.push_str("Content-Length: 0\r\n"),
            1 => {
                head.push_str("Content-Length: 2\r\n");
                body.push_str("ab");
            }
            2 => {
                head.push_str("Transfer-Encoding: chunked\r\n");
                body.push_str("0\r\n\r\n");
            }
            _ => head.push_str("Content-Length: 0\r\nContent-Length: 0\r\n"),
        }
    }
    if d.chance(3) {
        head.push_str("Expect: 100-continue\r\n");
    }
    if d.chance(15) {
        let origin = d.pick(&[ALLOWED_ORIGIN, "https://evil.example", "null"]);
        head.push_str(&format!("Origin: {origin}\r\n"));
    }
    if d.chance(30) {
        head.push_str("Authorization: Bearer secret-token\r\nUser-Agent: box-sdk\r\n");
    }
    if d.chance(10) {
        for i in 0..d.below(111) {
            head.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
    }
    if d.chance(3) {
        head.push_str(d.pick(&["Bad Header\r\n", "X-Odd:no-space\r\n", "X-Tab:\tt\r\n"]));
    }
    // A stray empty line before a request is allowed (RFC 9112 §2.2).
    let stray = if n > 0 && d.chance(5) { "\r\n" } else { "" };
    format!("{stray}{head}\r\n{body}")
}

fn target(d: &mut Draw, case_no: usize, n: usize) -> String {
    let path = if d.chance(85) {
        "/subscribe"
    } else {
        d.pick(&[
            "/subscribe/",
            "/Subscribe",
            "//subscribe",
            "/",
            "http://n.test/subscribe",
            "/subscribe%3F",
            "/subscribe;x",
        ])
    };
    let mut params = Vec::new();
    for _ in 0..d.below(4) {
        params.push(param(d, case_no, n));
    }
    if d.chance(90) {
        let channel = match d.below(40) {
            0 => format!("unknown-{case_no}-{n}"),
            1 => String::new(),
            2 => "%7BC%7D".into(),
            _ => "{C}".into(),
        };
        let at = d.below(params.len() + 1);
        params.insert(at, format!("channel={channel}"));
    }
    let mut query = params.join(d.pick(&["&", "&", "&", "&&", ";"]));
    if d.chance(15) {
        let at = d.below(query.len() + 1);
        let at = (0..=at)
            .rev()
            .find(|&i| query.is_char_boundary(i))
            .unwrap_or(0);
        query.insert_str(at, d.pick(&["#f", "#", "#a&dont_block=false", "#?x"]));
    }
    if d.chance(5) {
        let at = query.len();
        query.insert_str(
            at,
            d.pick(&["\"", "{", "|", "^", "`", "\\", "é", "%00", "<", "%zz"]),
        );
    }
    if d.chance(95) {
        format!("{path}?{query}")
    } else {
        format!("{path}{query}")
    }
}

fn param(d: &mut Draw, case_no: usize, n: usize) -> String {
    match d.below(14) {
        0 => format!("channel={}", {
            match d.below(3) {
                0 => "{C}".to_owned(),
                1 => format!("other-{case_no}-{n}"),
                _ => String::new(),
            }
        }),
        2 => format!(
            "stream_position={}",
            d.pick(&[
                "now",
                "0",
                "1",
                "18446744073709551615",
                "18446744073709551616",
                "-1",
                "x",
                "",
                "+1",
                "1e3",
            ])
        ),
        3 | 4 => format!(
            "dont_block={}",
            d.pick(&["true", "TRUE", "1", "false", "yes", "", "true%20"])
        ),
        5 => "stream_type=all".into(),
        6 => d
            .pick(&["x=1", "a+b=c%20d", "%zz", "=", "k", "dont%5Fblock=true"])
            .into(),
        7 => "channel=%7BC%7D".into(),
        8 | 9 => "dont_block=true".into(),
        _ => format!("x{}={}", d.below(10), "y".repeat(d.below(8))),
    }
}

/// A node of each kind, with the same settings.
pub struct Nodes {
    pub fast: Node,
    pub hyper: Node,
}

pub struct Node {
    pub public: std::net::SocketAddr,
    pub hub: Arc<Hub>,
}

impl Nodes {
    /// Starts both nodes on free loopback ports, on the current tokio runtime; they run
    /// until the runtime ends.
    pub async fn start() -> Nodes {
        Nodes {
            fast: Node::start(true).await,
            hyper: Node::start(false).await,
        }
    }

    /// Sends `case` to both nodes and compares: `Err` says how they differ.
    pub async fn compare(&self, case: &Case, case_no: usize) -> Result<(), String> {
        let fast = self.fast.run(case, case_no).await?;
        let hyper = self.hyper.run(case, case_no).await?;
        if fast != hyper {
            return Err(format!(
                "the paths differ on {:?} (pending first: {})\n-- fast path:\n{fast}\n-- hyper:\n{hyper}",
                case.writes, case.pending
            ));
        }
        Ok(())
    }
}

impl Node {
    async fn start(fast_path: bool) -> Node {
        let mut config = Config::for_tests();
        config.fast_path = fast_path;
        config.cors_origins = vec![ALLOWED_ORIGIN.into()];
        let server = Server::bind(config).await.expect("binds to free ports");
        let (public, hub) = (server.public_addr(), server.hub().clone());
        tokio::spawn(server.run(std::future::pending()));
        Node { public, hub }
    }

    /// Runs a case on a fresh channel: writes its bytes, reads until the node closes,
    /// waking each poll that parks with a publish. Returns what a client saw and what the
    /// channel holds afterwards, as text.
    async fn run(&self, case: &Case, case_no: usize) -> Result<String, String> {
        let topic = format!("grammar-{case_no}");
        let id = self
            .hub
            .register(Registration {
                topics: vec![topic.clone()],
                ..Default::default()
            })
            .map_err(|e| e.to_string())?
            .id
            .to_string();
        let publish = || {
            self.hub.publish(
                &[Publish {
                    topic: topic.clone(),
                    position: None,
                    stream_type: None,
                }],
                "api",
            )
        };
        if case.pending {
            publish();
        }
        let mut conn = TcpStream::connect(self.public)
            .await
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut wakes = 0;
        let mut ending = "open";
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut chunk = [0u8; 8192];
        let mut expected = 0;
        'writes: for write in &case.writes {
            let bytes = write.replace("{C}", &id);
            if conn.write_all(bytes.as_bytes()).await.is_err() {
                break;
            }
            expected += bytes.matches(" HTTP/").count();
            // Read until this write's answers are in, waking each poll that parks.
            while final_answers(&got) < expected {
                if Instant::now() > deadline {
                    return Err(format!(
                        "no answer within 15 s to {:?}; got {:?}",
                        case.writes,
                        String::from_utf8_lossy(&got)
                    ));
                }
                match tokio::time::timeout(Duration::from_millis(20), conn.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        ending = "ended";
                        break 'writes;
                    }
                    Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
                    // Nothing for a moment: a poll may be parked; a publish answers it.
                    Err(_) => {
                        let parked = self.hub.channel_info(&id).map_or(0, |i| i.parked_polls);
                        if parked > 0 {
                            publish();
                            wakes += 1;
                        }
                    }
                }
            }
        }
        if ending == "open" {
            // The last request asked for `Connection: close`.
            ending = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) => "ended",
                Ok(Ok(_)) => "more bytes after the last answer",
                Err(_) => "left open after Connection: close",
            };
        }
        let text = String::from_utf8_lossy(&got);
        let answers: Vec<&str> = text
            .split("\r\n")
            .filter(|l| !l.starts_with("date: "))
            .collect();
        let channel = match self.hub.channel_info(&id) {
            Some(i) => format!(
                "live, pending {}, retries used {}, parked {}",
                i.pending, i.retries_used, i.parked_polls
            ),
            None => "not live".into(),
        };
        Ok(format!(
            "{}\n-- connection {ending}, {wakes} wake(s); channel {channel}",
            answers.join("\r\n")
        ))
    }
}

/// How many final (not 1xx) answers `bytes` holds in full.
fn final_answers(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = res.parse(bytes) else {
            return count;
        };
        let interim = res.code.is_some_and(|c| c < 200);
        let len: usize = res
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .unwrap_or(0);
        if bytes.len() < head + len {
            return count;
        }
        bytes = &bytes[head + len..];
        if !interim {
            count += 1;
        }
    }
}
