//! The bad-input catalogue: each kind of malformed, oversized, slow or odd input gets the
//! answer SPEC §2/§4 (and docs/protocol.md's "choices where the spec is silent") give it, and a
//! well-behaved client polling beside it is served normally throughout: a poll parked
//! before the bad input is woken by a publish after it, and the next poll is answered.
//!
//! Requests here are written by hand on raw sockets, since well-behaved HTTP clients refuse
//! to send most of them.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::support::{TestServer, eventually};

/// One response read off a raw socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_owned()
    }
    fn message(&self) -> String {
        self.json()["message"].as_str().unwrap_or("").to_owned()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// A raw connection with its read buffer, so pipelined answers can be read one by one.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn open(addr: SocketAddr) -> Wire {
        Wire {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next whole response, or `None` if the server closes first. Panics after 10 s.
    async fn response(&mut self) -> Option<Raw> {
        read_raw(&mut self.stream, &mut self.buf).await
    }

    /// Whether the server closes the connection within `within` (EOF or reset).
    async fn closed_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            let mut chunk = [0u8; 4096];
            let left = until.saturating_duration_since(Instant::now());
            match timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {} // whatever it says, keep reading until it closes
            }
        }
    }
}

/// Reads the next whole response from `r` (bytes kept in `buf` between calls), or `None` if
/// the server closes first. Panics after 10 s.
async fn read_raw<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<Raw> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head[9..12].parse().unwrap();
            let len: usize = head
                .split("\r\n")
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some(Raw { status, head, body });
            }
        }
        let mut chunk = [0u8; 4096];
        let left = until.saturating_duration_since(Instant::now());
        match timeout(left, r.read(&mut chunk)).await {
            Err(_) => panic!(
                "no response within 10 s; got {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `bytes` on a fresh connection while reading the answer, for requests the server
/// may answer (and stop reading) before they are fully sent. The write side stays open
/// until the answer is read: a half-close would be a different test.
async fn send_while_reading(addr: SocketAddr, bytes: Vec<u8>) -> Option<Raw> {
    let (mut read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&bytes).await;
        write
    });
    let res = read_raw(&mut read, &mut Vec::new()).await;
    drop(writer);
    res
}

/// Sends `bytes` on a fresh connection and reads one response.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Raw> {
    let mut w = Wire::open(addr).await;
    w.send(bytes).await;
    w.response().await
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: nudge\r\n\r\n").into_bytes()
}

/// Expects a JSON error with this status and code.
#[track_caller]
fn assert_error(res: &Option<Raw>, status: u16, code: &str) {
    let res = res.as_ref().expect("an answer, not a closed connection");
    assert_eq!(res.status, status, "{res:?}");
    assert_eq!(res.code(), code, "{res:?}");
    assert_eq!(
        res.header("content-type").as_deref(),
        Some("application/json")
    );
}

#[track_caller]
fn assert_answer(res: &Option<Raw>, message: &str) {
    let res = res.as_ref().expect("an answer, not a closed connection");
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.message(), message, "{res:?}");
}

/// The well-behaved client beside the bad input: a poll parked before it.
struct Bystander {
    topic: String,
    url: String,
    poll: JoinHandle<String>,
}

impl Bystander {
    async fn park(s: &TestServer) -> Bystander {
        let topic = format!("bystander:{}", fastrand::u32(..));
        let ch = s.register_topic(&topic).await;
        let before = s.hub.counts().parked;
        let poll = s.spawn_poll(&ch.url);
        let hub = s.hub.clone();
        eventually(
            "the bystander's poll parked",
            Duration::from_secs(5),
            || {
                let hub = hub.clone();
                async move { hub.counts().parked > before }
            },
        )
        .await;
        Bystander {
            topic,
            url: ch.url,
            poll,
        }
    }

    /// A publish now wakes the parked poll within 2 s, and the next poll is answered.
    async fn still_served(self, s: &TestServer) {
        s.publish(json!({ "topic": self.topic })).await;
        let answer = timeout(Duration::from_secs(2), self.poll)
            .await
            .expect("the bystander's parked poll was woken within 2 s")
            .unwrap();
        assert_eq!(answer, "new_change");
        assert_eq!(s.message(&self.url, "&dont_block=true").await, "no_change");
    }
}

/// A server with a 1 s header read timeout. Its keep-alive connections are cut after 1 s
/// idle too, so the test's own client must not reuse one the server may be closing.
async fn impatient_server() -> TestServer {
    let mut s = TestServer::with(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    s.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    s
}

fn channel_param(url: &str) -> &str {
    let start = url.find("channel=").unwrap() + "channel=".len();
    let rest = &url[start..];
    &rest[..rest.find('&').unwrap_or(rest.len())]
}

#[tokio::test]
async fn oversized_request_line_headers_and_query() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;

    // A query over 4096 bytes: the spec's 400, in JSON.
    let long = format!("/subscribe?channel={}", "a".repeat(5000));
    assert_error(&exchange(s.public, &get(&long)).await, 400, "bad_request");

    // A request head over 64 KiB is refused by hyper before any handler (the fast path
    // hands it over), with no body (docs/protocol.md: choices) and the connection closed: 431, or 414
    // for a request target over 65,534 bytes when hyper's URI check comes first.
    let huge_line = format!("/subscribe?channel={}", "a".repeat(70 * 1024));
    let huge_header = format!(
        "GET /subscribe?channel=x HTTP/1.1\r\nHost: nudge\r\nX-Big: {}\r\n\r\n",
        "b".repeat(256 * 1024)
    );
    let many_headers = format!(
        "GET /subscribe?channel=x HTTP/1.1\r\nHost: nudge\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    for (bytes, statuses) in [
        (get(&huge_line), &[414, 431][..]),
        (huge_header.into_bytes(), &[431]),
        (many_headers.into_bytes(), &[431]),
    ] {
        // `None`: reset before the answer could be read, which also closes the connection.
        if let Some(res) = send_while_reading(s.public, bytes).await {
            assert!(statuses.contains(&res.status), "{res:?}");
            assert!(res.body.is_empty());
            assert_eq!(res.header("connection").as_deref(), Some("close"));
        }
    }

    by.still_served(&s).await;
}

#[tokio::test]
async fn oversized_bodies_are_413_or_never_read() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;

    // Internal: bodies over 1 MiB, announced by Content-Length or streamed chunked.
    let big = vec![b' '; 1024 * 1024 + 1];
    let res = s
        .http
        .post(s.internal_url("/v1/publish"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");

    let mut chunked =
        b"POST /v1/channels HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend_from_slice(&[b' '; 64 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_error(
        &send_while_reading(s.internal, chunked).await,
        413,
        "payload_too_large",
    );

    // Public: a body on the one route is never read; POST is 405 with `Allow: GET`.
    let mut post =
        b"POST /subscribe?channel=x HTTP/1.1\r\nHost: nudge\r\nContent-Length: 2097152\r\n\r\n"
            .to_vec();
    post.extend_from_slice(&vec![b'x'; 2 * 1024 * 1024]);
    let res = send_while_reading(s.public, post).await;
    assert_error(&res, 405, "method_not_allowed");
    assert_eq!(res.unwrap().header("allow").as_deref(), Some("GET"));

    by.still_served(&s).await;
}

#[tokio::test]
async fn invalid_utf8_and_percent_encoding() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("utf8").await;
    let id = ch.id.clone();

    // A channel that decodes to nonsense is simply unknown: max_retries, never a 4xx.
    for target in [
        "/subscribe?channel=%FF%FE%FD",
        "/subscribe?channel=%ZZ%",
        "/subscribe?channel=%",
        "/subscribe?channel=%E2%82",
    ] {
        assert_answer(&exchange(s.public, &get(target)).await, "max_retries");
    }
    // A percent-encoded well-formed id is that id.
    let encoded: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
    let target = format!("/subscribe?channel={encoded}&dont_block=true");
    assert_answer(&exchange(s.public, &get(&target)).await, "no_change");
    // A position that is not an integer once decoded is the spec's 400.
    let target = format!("/subscribe?channel={id}&stream_position=%FF");
    assert_error(&exchange(s.public, &get(&target)).await, 400, "bad_request");
    // Raw bytes above 0x7F in a header value (obs-text) are ignored like any header.
    let mut req =
        format!("GET /subscribe?channel={id}&dont_block=true HTTP/1.1\r\nHost: nudge\r\nX-Odd: ")
            .into_bytes();
    req.extend_from_slice(b"\xff\xfe\r\nAuthorization: Bearer \xc3\x28\r\n\r\n");
    assert_answer(&exchange(s.public, &req).await, "no_change");
    // Raw bytes above 0x7F in the request target are not a valid URI: hyper answers 400
    // before any handler (no body), or closes.
    let mut req = b"GET /subscribe?channel=\xff\xfe HTTP/1.1\r\nHost: nudge\r\n\r\n".to_vec();
    if let Some(res) = exchange(s.public, &req).await {
        assert!(res.status == 400 || res.status == 200, "{res:?}");
        if res.status == 200 {
            assert_eq!(res.message(), "max_retries");
        }
    }

    // Internal: invalid UTF-8 in a JSON body is a 400 with a reason.
    for (path, body) in [
        ("/v1/channels", &b"{\"topics\":[\"\xff\xfe\"]}"[..]),
        ("/v1/publish", &b"{\"topic\":\"a\xc3\x28\"}"[..]),
        ("/v1/revoke", &b"{\"subject\":\"\xed\xa0\x80\"}"[..]),
    ] {
        req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        assert_error(&exchange(s.internal, &req).await, 400, "bad_request");
    }
    // NDJSON with a bad line.
    let body = b"{\"topic\":\"a\"}\n\xff\n";
    req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    assert_error(&exchange(s.internal, &req).await, 400, "bad_request");

    by.still_served(&s).await;
}

#[tokio::test]
async fn duplicated_and_conflicting_query_parameters() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("dup").await;
    let id = ch.id.clone();

    for target in [
        format!("/subscribe?channel={id}&channel={id}&dont_block=true"),
        format!("/subscribe?channel={id}&stream_position=5&stream_position=5&dont_block=true"),
        format!("/subscribe?dont_block=true&channel={id}&dont_block=true"),
        format!("/subscribe?channel={id}&dont_block=true&stream_type=a&stream_type=b"),
    ] {
        assert_answer(&exchange(s.public, &get(&target)).await, "no_change");
    }
    for target in [
        format!("/subscribe?channel={id}&channel=other"),
        format!("/subscribe?channel={id}&stream_position=1&stream_position=2"),
        format!("/subscribe?channel={id}&dont_block=true&dont_block=false"),
        format!("/subscribe?channel={id}&stream_position=now&stream_position=3"),
        "/subscribe?channel=&channel=".to_owned(),
        "/subscribe?channel".to_owned(),
        "/subscribe?&&&=&".to_owned(),
        "/subscribe".to_owned(),
    ] {
        assert_error(&exchange(s.public, &get(&target)).await, 400, "bad_request");
    }

    by.still_served(&s).await;
}

#[tokio::test]
async fn sixty_five_topics_and_other_bad_registrations() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let topics = |n: usize| (0..n).map(|i| format!("t:{i}")).collect::<Vec<_>>();
    let register = |body: Value| {
        let (http, url) = (s.http.clone(), s.internal_url("/v1/channels"));
        async move {
            let res = http.post(url).json(&body).send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };

    assert_eq!(register(json!({ "topics": topics(64) })).await.0, 201);
    for body in [
        json!({ "topics": topics(65) }),
        json!({ "topics": [] }),
        json!({ "topics": ["a".repeat(257)] }),
        json!({ "topics": ["has space"] }),
        json!({ "topics": ["tab\there"] }),
        json!({ "topics": ["é"] }),
        json!({ "topics": "user:42" }),
        json!({ "topics": [42] }),
        json!({}),
        json!({ "topics": ["a"], "subject": "" }),
        json!({ "topics": ["a"], "stream_type": "" }),
        json!({ "topics": ["a"], "ttl": "0s" }),
        json!({ "topics": ["a"], "ttl": "soon" }),
        json!({ "topics": ["a"], "ttl": -5 }),
        json!({ "topics": ["a"], "retry_timeout": 0.5 }),
        json!({ "topics": ["a"], "max_retries": -1 }),
        json!({ "topics": ["a"], "max_retries": "1e3" }),
        json!({ "topics": ["a"], "max_retries": 4294967296u64 }),
        json!({ "topics": ["a"], "topic": "typo" }),
        json!([{ "topics": ["a"] }]),
    ] {
        let (status, answer) = register(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["code"], "bad_request", "{body}");
    }
    // Huge but valid numbers are clamped to the node's limits, not refused.
    let (status, answer) = register(json!({
        "topics": ["a"], "ttl": u64::MAX, "retry_timeout": "100000h", "max_retries": u32::MAX
    }))
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["entries"][0]["ttl"], "10");
    assert_eq!(answer["entries"][0]["max_retries"], "10");
    assert_eq!(answer["entries"][0]["retry_timeout"], 60);

    by.still_served(&s).await;
}

#[tokio::test]
async fn negative_fractional_and_overflowing_positions() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("pos").await;
    let id = ch.id.clone();

    for p in [
        "-1",
        "1.5",
        "1e3",
        "%2B1",
        "%201",
        "0x10",
        "18446744073709551616",
        "99999999999999999999999999999",
        "NaN",
        "Infinity",
    ] {
        let target = format!("/subscribe?channel={id}&stream_position={p}&dont_block=true");
        assert_error(&exchange(s.public, &get(&target)).await, 400, "bad_request");
    }
    for p in ["0", "18446744073709551615", "now", "007"] {
        let target = format!("/subscribe?channel={id}&stream_position={p}&dont_block=true");
        assert_answer(&exchange(s.public, &get(&target)).await, "no_change");
    }

    for position in [
        json!(-1),
        json!(1.5),
        json!(1e3),
        json!("12"),
        json!("null"),
    ] {
        let res = s
            .http
            .post(s.internal_url("/v1/publish"))
            .json(&json!({ "topic": "pos", "position": position }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "position {position}");
        assert_eq!(res.json::<Value>().await.unwrap()["code"], "bad_request");
    }
    // 2^64 does not fit (serde_json reads it as a float); u64::MAX does.
    let res = s
        .http
        .post(s.internal_url("/v1/publish"))
        .header("content-type", "application/json")
        .body(r#"{"topic":"pos","position":18446744073709551616}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        s.publish(json!({ "topic": "pos", "position": u64::MAX }))
            .await,
        (1, 0)
    );
    // A batch with one bad entry publishes nothing.
    let res = s
        .http
        .post(s.internal_url("/v1/publish"))
        .json(&json!([{ "topic": "pos", "position": 1 }, { "topic": "pos", "position": -1 }]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // The position u64::MAX was accepted: a cursor below it gets new_change.
    assert_eq!(s.message(&ch.url, "&stream_position=5").await, "new_change");

    by.still_served(&s).await;
}

#[tokio::test]
async fn http_1_0_and_pipelined_requests() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let a = s.register_topic("pipe:a").await;
    let b = s.register_topic("pipe:b").await;

    // HTTP/1.0, no Host: answered, then the connection closes (no keep-alive in 1.0).
    let mut w = Wire::open(s.public).await;
    w.send(b"GET /subscribe?channel=unknown HTTP/1.0\r\n\r\n")
        .await;
    assert_answer(&w.response().await, "max_retries");
    assert!(w.closed_within(Duration::from_secs(5)).await);
    // HTTP/1.0 asking for keep-alive gets a second answer on the same connection.
    let mut w = Wire::open(s.public).await;
    let req = format!(
        "GET /subscribe?channel={}&dont_block=true HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        channel_param(&a.url)
    );
    w.send(req.as_bytes()).await;
    assert_answer(&w.response().await, "no_change");
    w.send(b"GET /nope HTTP/1.0\r\n\r\n").await;
    assert_error(&w.response().await, 404, "not_found");

    // Pipelined: three requests in one write are answered in order.
    let mut w = Wire::open(s.public).await;
    let mut burst = get(&format!(
        "/subscribe?channel={}&dont_block=true",
        channel_param(&a.url)
    ));
    burst.extend(get("/other"));
    burst.extend(get(&format!(
        "/subscribe?channel={}&stream_position=x",
        channel_param(&b.url)
    )));
    w.send(&burst).await;
    assert_answer(&w.response().await, "no_change");
    assert_error(&w.response().await, 404, "not_found");
    assert_error(&w.response().await, 400, "bad_request");

    // Pipelined behind a parked poll: the second waits its turn, then is answered.
    let mut w = Wire::open(s.public).await;
    let parked_before = s.hub.counts().parked;
    let mut two = get(&format!("/subscribe?channel={}", channel_param(&a.url)));
    two.extend(get(&format!(
        "/subscribe?channel={}&dont_block=true",
        channel_param(&b.url)
    )));
    w.send(&two).await;
    let hub = s.hub.clone();
    eventually("the pipelined poll parked", Duration::from_secs(5), || {
        let hub = hub.clone();
        async move { hub.counts().parked > parked_before }
    })
    .await;
    s.publish(json!({ "topic": "pipe:a" })).await;
    assert_answer(&w.response().await, "new_change");
    assert_answer(&w.response().await, "no_change");

    by.still_served(&s).await;
}

#[tokio::test]
async fn expect_100_continue() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;

    // Internal: the server asks for the body with `100 Continue`, then answers.
    let body = br#"{"topic":"expect"}"#;
    let mut w = Wire::open(s.internal).await;
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    w.send(head.as_bytes()).await;
    let interim = w.response().await.expect("100 Continue");
    assert_eq!(interim.status, 100);
    w.send(body).await;
    let res = w.response().await;
    let res = res.expect("an answer");
    assert_eq!(res.status, 200);
    assert_eq!(res.json(), json!({ "published": 1, "woken": 0 }));

    // Public: a GET with `Expect` is answered as usual (there is no body to ask for).
    let ch = s.register_topic("expect").await;
    let req = format!(
        "GET /subscribe?channel={}&dont_block=true HTTP/1.1\r\nHost: nudge\r\nExpect: 100-continue\r\n\r\n",
        channel_param(&ch.url)
    );
    assert_answer(&exchange(s.public, req.as_bytes()).await, "no_change");
    // A POST with `Expect` is refused without the body ever being sent.
    let mut w = Wire::open(s.public).await;
    w.send(b"POST /subscribe HTTP/1.1\r\nHost: nudge\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_error(&w.response().await, 405, "method_not_allowed");

    by.still_served(&s).await;
}

#[tokio::test]
async fn half_closed_sockets() {
    let s = TestServer::start().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("half").await;
    let target = format!("/subscribe?channel={}", channel_param(&ch.url));

    // A poll answered at once still gets its answer when the client has shut its write side.
    let mut w = Wire::open(s.public).await;
    w.send(&get(&format!("{target}&dont_block=true"))).await;
    w.stream.shutdown().await.unwrap();
    assert_answer(&w.response().await, "no_change");

    // A poll that would park: a half-closed client counts as gone (as a disconnect would),
    // the node closes its side and frees the poll, and no change is lost: the next poll
    // gets the one published meanwhile.
    let parked_before = s.hub.counts().parked;
    let mut w = Wire::open(s.public).await;
    w.send(&get(&target)).await;
    w.stream.shutdown().await.unwrap();
    assert!(
        w.closed_within(Duration::from_secs(5)).await,
        "the node closes a half-closed poll"
    );
    let hub = s.hub.clone();
    eventually(
        "the half-closed poll is freed",
        Duration::from_secs(5),
        || {
            let hub = hub.clone();
            async move { hub.counts().parked == parked_before }
        },
    )
    .await;
    s.publish(json!({ "topic": "half" })).await;
    assert_eq!(s.message(&ch.url, "").await, "new_change");

    by.still_served(&s).await;
}

#[tokio::test]
async fn a_slow_sender_is_cut_at_the_header_read_timeout() {
    let s = impatient_server().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("slow").await;
    let request = get(&format!(
        "/subscribe?channel={}&dont_block=true",
        channel_param(&ch.url)
    ));

    // One byte every 100 ms: the head would take ~6 s; the node cuts it at about 1 s.
    let mut w = Wire::open(s.public).await;
    let started = Instant::now();
    let mut cut = false;
    for &byte in &request {
        if w.stream.write_all(&[byte]).await.is_err() {
            cut = true;
            break;
        }
        match timeout(Duration::from_millis(100), w.stream.peek(&mut [0u8; 1])).await {
            Err(_) => {} // nothing said yet: send the next byte
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => {
                // The node spoke before the head was complete: not with an answer.
                let res = w.response().await;
                assert!(res.as_ref().is_none_or(|r| r.status != 200), "{res:?}");
                cut = true;
                break;
            }
        }
    }
    assert!(
        cut || w.closed_within(Duration::from_secs(3)).await,
        "a slow sender is cut"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "cut after {took:?}");

    // A slow but timely sender (the head in five pieces over ~0.4 s) is served.
    let mut w = Wire::open(s.public).await;
    for piece in request.chunks(request.len().div_ceil(5)) {
        w.send(piece).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_answer(&w.response().await, "no_change");

    by.still_served(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_silent_connections_are_cut_and_the_node_stays_healthy() {
    // Each connection is two descriptors in this process (both ends): size to the limit.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let n = 2000.min((limit.saturating_sub(300) / 2) as usize);
    let s = impatient_server().await;
    let by = Bystander::park(&s).await;
    let ch = s.register_topic("silent").await;

    let mut silent = Vec::with_capacity(n);
    for _ in 0..n {
        silent.push(TcpStream::connect(s.public).await.unwrap());
    }
    // While they sit there, the node answers a well-behaved poll at once.
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");
    let health = s.http.get(s.internal_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Every one of them is cut soon after the header read timeout.
    let until = Instant::now() + Duration::from_secs(10);
    let mut cut = 0;
    for mut conn in silent {
        let left = until.saturating_duration_since(Instant::now());
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = timeout(left, conn.read(&mut byte)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, n, "silent connections cut within 10 s");
    let s_ref = &s;
    eventually(
        "open connections back to the bystander's",
        Duration::from_secs(5),
        || async move { s_ref.metric("nudge_open_connections").await <= 2.0 },
    )
    .await;

    by.still_served(&s).await;
}
