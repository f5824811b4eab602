//! The fast path against the reference: the same raw requests go to a node with the fast
//! path and to one without it (hyper only); the answers must be the same bytes, but for
//! the `date` header.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::TestServer;

/// Reads until `n` whole responses (by `content-length`) arrived, or EOF; drops `date:` lines.
async fn read_responses(conn: &mut TcpStream, n: usize) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut eof = false;
    while complete_responses(&got) < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                break;
            }
            Ok(Ok(k)) => got.extend_from_slice(&buf[..k]),
            Err(_) => panic!(
                "no answer within 5 s; got so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let text = String::from_utf8(got).unwrap();
    let kept: Vec<&str> = text
        .split("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect();
    (kept.join("\r\n"), eof)
}

fn complete_responses(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = res.parse(bytes) else {
            return count;
        };
        let len: usize = res
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |h| {
                std::str::from_utf8(h.value).unwrap().parse().unwrap()
            });
        if bytes.len() < head + len {
            return count;
        }
        bytes = &bytes[head + len..];
        count += 1;
    }
}

struct Pair {
    fast: TestServer,
    hyper: TestServer,
}

impl Pair {
    async fn start() -> Pair {
        Pair {
            fast: TestServer::with(|c| c.fast_path = true).await,
            hyper: TestServer::with(|c| c.fast_path = false).await,
        }
    }

    /// Sends `writes` (with `{C}` replaced by each node's own channel `ch`) on one
    /// connection to each node, and compares the `n` answers.
    async fn same(&self, case: &str, chans: (&str, &str), writes: &[&str], n: usize) -> String {
        let mut answers = Vec::new();
        for (server, ch) in [(&self.fast, chans.0), (&self.hyper, chans.1)] {
            let mut conn = TcpStream::connect(server.public).await.unwrap();
            for w in writes {
                conn.write_all(w.replace("{C}", ch).as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers.push(read_responses(&mut conn, n).await);
        }
        assert_eq!(answers[0], answers[1], "{case}: fast path vs hyper");
        answers.remove(0).0
    }
}

#[tokio::test]
async fn the_fast_path_answers_exactly_as_hyper_does() {
    let p = Pair::start().await;
    let (f, h) = (
        p.fast.register_topic("t").await,
        p.hyper.register_topic("t").await,
    );
    let ids = (f.id.as_str(), h.id.as_str());
    let get = |q: &str| format!("GET /subscribe?{q} HTTP/1.1\r\nHost: x\r\n\r\n");

    let a = p
        .same("dont_block", ids, &[&get("channel={C}&dont_block=true")], 1)
        .await;
    assert!(
        a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with(r#"{"message":"no_change"}"#),
        "{a}"
    );

    for s in [&p.fast, &p.hyper] {
        s.publish(json!({"topic": "t"})).await;
    }
    let a = p
        .same("pending change", ids, &[&get("channel={C}")], 1)
        .await;
    assert!(a.ends_with(r#"{"message":"new_change"}"#));

    p.same(
        "unknown channel",
        ids,
        &[&get("channel=AAAAAAAAAAAAAAAAAAAAAA&x=1")],
        1,
    )
    .await;
    p.same("no channel", ids, &[&get("stream_type=all")], 1)
        .await;
    p.same(
        "bad position",
        ids,
        &[&get("channel={C}&stream_position=x")],
        1,
    )
    .await;
    p.same(
        "conflicting channels",
        ids,
        &[&get("channel={C}&channel=other")],
        1,
    )
    .await;
    p.same(
        "other path",
        ids,
        &["GET /subscribe/x HTTP/1.1\r\nHost: x\r\n\r\n"],
        1,
    )
    .await;
    p.same("root", ids, &["GET / HTTP/1.1\r\nHost: x\r\n\r\n"], 1)
        .await;
    p.same(
        "post",
        ids,
        &["POST /subscribe?channel={C} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],
        1,
    )
    .await;
    p.same(
        "http/1.0",
        ids,
        &["GET /subscribe?channel={C}&dont_block=true HTTP/1.0\r\n\r\n"],
        1,
    )
    .await;
    p.same(
        "authorization and many headers",
        ids,
        &["GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\nUser-Agent: box-sdk\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n\r\n"],
        1,
    )
    .await;
    let (a, eof) = {
        let a = p.same("connection close", ids, &["GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"], 1).await;
        let mut conn = TcpStream::connect(p.fast.public).await.unwrap();
        conn.write_all(
            format!(
                "GET /subscribe?channel={}&dont_block=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                f.id
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (_, _) = read_responses(&mut conn, 1).await;
        (a, read_responses(&mut conn, 2).await.1)
    };
    assert!(a.contains("connection: close\r\n"), "{a}");
    assert!(eof, "the fast path closes after Connection: close");
    for (case, head) in [
        (
            "no Host",
            "GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\n\r\n",
        ),
        (
            "two Hosts",
            "GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        ),
        (
            "a fragment",
            "GET /subscribe?dont_block=true&channel={C}#f HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "dont_block before a fragment",
            "GET /subscribe?channel={C}&dont_block=true#f HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ] {
        p.same(case, ids, &[head], 1).await;
    }
    p.same(
        "split head",
        ids,
        &[
            "GET /subscribe?channel={C}&dont_bl",
            "ock=true HTTP/1.1\r\nHost: x\r\n",
            "\r\n",
        ],
        1,
    )
    .await;
    let two = get("channel={C}&dont_block=true").repeat(2);
    p.same("pipelined", ids, &[&two], 2).await;
    p.same(
        "keep-alive",
        ids,
        &[
            &get("channel={C}&dont_block=true"),
            &get("channel={C}&dont_block=true"),
        ],
        2,
    )
    .await;
    p.same(
        "get with a body",
        ids,
        &["GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"],
        1,
    )
    .await;
    p.same(
        "expect",
        ids,
        &["GET /subscribe?channel={C}&dont_block=true HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"],
        1,
    )
    .await;
    p.same(
        "fast then unusual on one connection",
        ids,
        &[
            &get("channel={C}&dont_block=true"),
            "DELETE /subscribe HTTP/1.1\r\n\r\n",
        ],
        2,
    )
    .await;

    // The fast path really served the plain ones, and hyper none on the other node.
    let served = p
        .fast
        .metric(r#"nudge_public_requests_total{path="fast"}"#)
        .await;
    assert!(served >= 10.0, "fast path served {served}");
    assert_eq!(
        p.hyper
            .metric(r#"nudge_public_requests_total{path="fast"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_fast_path_parks_wakes_limits_and_sees_clients_leave() {
    let p = Pair::start().await;
    for s in [&p.fast, &p.hyper] {
        let ch = s.register_topic("t").await;
        let req = format!(
            "GET /subscribe?channel={} HTTP/1.1\r\nHost: x\r\n\r\n",
            ch.id
        );
        let mut parked = Vec::new();
        for _ in 0..4 {
            let mut conn = TcpStream::connect(s.public).await.unwrap();
            conn.write_all(req.as_bytes()).await.unwrap();
            parked.push(conn);
        }
        s.wait_parked(4).await;
        // A fifth is refused; then one client leaves and its place is free at once.
        let mut fifth = TcpStream::connect(s.public).await.unwrap();
        fifth.write_all(req.as_bytes()).await.unwrap();
        let (a, _) = read_responses(&mut fifth, 1).await;
        assert!(a.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{a}");
        parked.pop();
        s.wait_parked(3).await;
        assert_eq!(s.metric(r#"nudge_polls_total{outcome="gone"}"#).await, 1.0);
        // A publish wakes the three left.
        assert_eq!(s.publish(json!({"topic": "t"})).await, (1, 3));
        for conn in &mut parked {
            let (a, _) = read_responses(conn, 1).await;
            assert!(a.ends_with(r#"{"message":"new_change"}"#), "{a}");
        }
    }
}
