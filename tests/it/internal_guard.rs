//! What the internal listener refuses so that nothing can take it over: web pages in a
//! browser on the same host (issue 11.8), and clients that stall a request or exhaust the
//! open-files limit (issue 11.3).

use std::process::Command;
use std::time::Duration;

use nudge_testkit::Node;
use nudge_testkit::node::{FREE_PORTS, Options};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::raw;
use crate::support::{TestServer, eventually};

/// A `POST` by hand, so that every header is exactly what a browser (or a buggy client)
/// would send.
fn post(path: &str, host: &str, headers: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn answer(s: &TestServer, request: &str) -> raw::Response {
    let mut conn = TcpStream::connect(s.internal).await.unwrap();
    raw::exchange(&mut conn, request, Duration::from_secs(5))
        .await
        .unwrap()
}

fn code(res: &raw::Response) -> String {
    let body: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
    body["code"].as_str().unwrap_or_default().to_owned()
}

/// The probe's request: a page on `rebind.evil.example` (resolving to 127.0.0.1) posting a
/// revocation as `text/plain`, which a browser sends without a CORS preflight.
#[tokio::test]
async fn a_web_page_cannot_publish_register_or_revoke() {
    let s = TestServer::start().await;
    let ch = s
        .register(serde_json::json!({"topics": ["user:42"], "subject": "user:42"}))
        .await;
    let host = s.internal.to_string();
    let revoke = r#"{"subject":"user:42"}"#;
    let publish = r#"{"topic":"user:42"}"#;
    let evil = "rebind.evil.example";
    let json = "application/json";
    // (path, Host, extra headers, Content-Type, body, the code it gets)
    let refused: [(&str, &str, &str, &str, &str, &str); 11] = [
        (
            "/v1/revoke",
            evil,
            "Origin: http://evil.example\r\n",
            "text/plain",
            revoke,
            "cross_site",
        ),
        // Each signal alone is enough.
        (
            "/v1/revoke",
            &host,
            "Origin: http://evil.example\r\n",
            json,
            revoke,
            "cross_site",
        ),
        (
            "/v1/publish",
            &host,
            "Origin: null\r\n",
            json,
            publish,
            "cross_site",
        ),
        (
            "/v1/revoke",
            &host,
            "Sec-Fetch-Site: cross-site\r\n",
            json,
            revoke,
            "cross_site",
        ),
        (
            "/v1/publish",
            &host,
            "Sec-Fetch-Site: same-site\r\n",
            json,
            publish,
            "cross_site",
        ),
        (
            "/v1/revoke",
            &host,
            "",
            "text/plain",
            revoke,
            "unsupported_content_type",
        ),
        (
            "/v1/publish",
            &host,
            "",
            "application/x-www-form-urlencoded",
            publish,
            "unsupported_content_type",
        ),
        (
            "/v1/channels",
            &host,
            "",
            "multipart/form-data; boundary=x",
            "{}",
            "unsupported_content_type",
        ),
        (
            "/v1/channels",
            &host,
            "",
            "application/x-ndjson",
            r#"{"topics":["t"]}"#,
            "unsupported_content_type",
        ),
        ("/v1/revoke", evil, "", json, revoke, "host_not_allowed"),
        (
            "/v1/publish",
            "localhost.evil.example:8081",
            "",
            json,
            publish,
            "host_not_allowed",
        ),
    ];
    let requests = refused
        .iter()
        .map(|&(path, host, headers, content_type, body, code)| {
            (post(path, host, headers, content_type, body), code)
        })
        // DNS rebinding reads too: no metrics for a foreign name.
        .chain([(
            format!("GET /metrics HTTP/1.1\r\nHost: {evil}\r\n\r\n"),
            "host_not_allowed",
        )]);
    for (request, expected) in requests {
        let res = answer(&s, &request).await;
        assert_eq!(res.status, 403, "{request}\n{}", res.text());
        assert_eq!(code(&res), expected, "{request}");
    }
    // None of it was applied: the channel lives and no change was published.
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");

    // What a main API sends still works: loopback names, a typed-in or same-origin fetch,
    // and no Content-Type parameters in the way.
    for (host, headers, content_type) in [
        ("localhost:8081", "", "application/json"),
        (
            "127.0.0.1",
            "Sec-Fetch-Site: none\r\n",
            "application/json; charset=utf-8",
        ),
        (
            "[::1]:8081",
            "Sec-Fetch-Site: same-origin\r\n",
            "Application/JSON",
        ),
    ] {
        let res = answer(
            &s,
            &post("/v1/publish", host, headers, content_type, publish),
        )
        .await;
        assert_eq!(res.status, 200, "{host} {headers}: {}", res.text());
    }
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "new_change");
    s.stop().await;
}

/// With a token the listener may face a network: any `Host` is fine with the right bearer,
/// but browser signals are still refused.
#[tokio::test]
async fn with_a_token_any_host_but_still_no_web_pages() {
    let token = "a-token-of-some-length";
    let s = TestServer::with(|c| c.internal_token = Some(nudge::config::Token::new(token))).await;
    let auth = format!("Authorization: Bearer {token}\r\n");
    let publish = r#"{"topic":"t"}"#;
    let res = answer(
        &s,
        &post(
            "/v1/publish",
            "nudge.internal.example",
            &auth,
            "application/json",
            publish,
        ),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = answer(
        &s,
        &post(
            "/v1/publish",
            "nudge.internal.example",
            &format!("{auth}Origin: https://app.example\r\n"),
            "application/json",
            publish,
        ),
    )
    .await;
    assert_eq!((res.status, code(&res)), (403, "cross_site".to_owned()));
    s.stop().await;
}

/// A head that announces a body, then silence: answered `408` and closed once the body is
/// overdue, instead of holding the connection for ever.
#[tokio::test]
async fn a_stalled_body_is_cut() {
    let s = TestServer::with(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    let host = s.internal.to_string();
    for request in [
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{\"to"
        ),
        format!(
            "POST /v1/channels HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{{\"t\r\n"
        ),
    ] {
        let mut conn = TcpStream::connect(s.internal).await.unwrap();
        let started = Instant::now();
        let res = raw::exchange(&mut conn, &request, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("no answer to a stalled body: {e}\n{request}"));
        assert_eq!(res.status, 408, "{}", res.text());
        assert_eq!(code(&res), "body_timeout");
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert!(raw::closed_within(&mut conn, Duration::from_secs(2)).await);
    }
    // The listener is fine.
    let res = answer(
        &s,
        &format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
    .await;
    assert_eq!(res.status, 200);
    s.stop().await;
}

/// An announced body over the limit is refused before its bytes are sent.
#[tokio::test]
async fn an_oversized_content_length_gets_413_at_once() {
    let s = TestServer::with(|c| c.header_read_timeout = Duration::from_secs(30)).await;
    let mut conn = TcpStream::connect(s.internal).await.unwrap();
    let request = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n",
        s.internal
    );
    let res = raw::exchange(&mut conn, &request, Duration::from_secs(3))
        .await
        .expect("413 without waiting for the body");
    assert_eq!(res.status, 413);
    assert_eq!(code(&res), "payload_too_large");
    assert!(raw::closed_within(&mut conn, Duration::from_secs(2)).await);
    s.stop().await;
}

/// Under a low open-files limit, connections past it wait in the backlog: nudge backs off
/// accepting, warns once (not every 50 ms), keeps its parked polls and publishes, and
/// accepts again as soon as descriptors are free.
#[tokio::test]
async fn an_exhausted_open_files_limit_degrades_gracefully() {
    let mut command = Command::new("bash");
    command
        .args([
            "-c",
            r#"ulimit -n 64 && exec "$0" "$@""#,
            env!("CARGO_BIN_EXE_nudge"),
        ])
        .args(["--max-parked", "1000", "--header-read-timeout", "60s"])
        .args(FREE_PORTS)
        .env("RUST_LOG", "info");
    let node = Node::spawn(command, Options::default()).unwrap();
    let accept_warnings = || {
        node.logs()
            .iter()
            .filter(|l| l.contains("accept failed"))
            .count()
    };

    // Before the limit: an internal connection kept open, a channel, a parked poll.
    let mut api = TcpStream::connect(node.internal).await.unwrap();
    let mut call = async |path: &str, body: &str| {
        let request = post(
            path,
            &node.internal.to_string(),
            "",
            "application/json",
            body,
        );
        raw::exchange(&mut api, &request, Duration::from_secs(5))
            .await
            .unwrap()
    };
    let reg = call("/v1/channels", r#"{"topics":["t"]}"#).await;
    assert_eq!(reg.status, 201, "{}", reg.text());
    let reg: serde_json::Value = serde_json::from_slice(&reg.body).unwrap();
    let url = reg["entries"][0]["url"].as_str().unwrap();
    let path = &url[url.find("/subscribe").unwrap()..];
    let mut parked = TcpStream::connect(node.public).await.unwrap();
    parked
        .write_all(raw::get(path, "").as_bytes())
        .await
        .unwrap();

    // Far more idle connections than descriptors: the kernel completes them all, nudge
    // can accept only some.
    let mut idle = Vec::new();
    for _ in 0..120 {
        idle.push(TcpStream::connect(node.public).await.unwrap());
    }
    node.wait_log("accept failed", Duration::from_secs(10));
    // Held there for three seconds: once warned, nudge stays quiet (it used to log every
    // 50 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(accept_warnings(), 1, "{:#?}", node.logs());

    // Meanwhile the parked poll and the publish work as ever.
    let published = call("/v1/publish", r#"{"topic":"t"}"#).await;
    assert_eq!(published.text(), r#"{"published":1,"woken":1}"#);
    let woken = raw::read_response(&mut parked, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(woken.text(), r#"{"message":"new_change"}"#);

    // Descriptors free again: new polls are served within the longest backoff.
    drop(idle);
    eventually(
        "a new poll is accepted",
        Duration::from_secs(10),
        || async {
            let Ok(mut conn) = TcpStream::connect(node.public).await else {
                return false;
            };
            let request = raw::get(&format!("{path}&dont_block=true"), "");
            matches!(
                raw::exchange(&mut conn, &request, Duration::from_secs(2)).await,
                Ok(res) if res.status == 200
            )
        },
    )
    .await;
}
