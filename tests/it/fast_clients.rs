//! Real clients stay on the fast path (issue 11.6): whatever headers a browser or an SDK
//! sends — up to hyper's 100 headers and 64 KiB of head, an `Origin` under `--cors-origin` —
//! its poll parks on the fast path, where it costs a few hundred bytes, not on hyper.
//! `nudge_polls_parked_total{path}` tells operators which.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::raw;
use crate::support::TestServer;

const ORIGIN: &str = "https://app.example";

async fn parked_on(s: &TestServer, path: &str) -> f64 {
    s.metric(&format!(r#"nudge_polls_parked_total{{path="{path}"}}"#))
        .await
}

#[tokio::test]
async fn browser_and_sdk_polls_park_on_the_fast_path_whatever_headers_they_carry() {
    let s = TestServer::with(|c| c.cors_origins = vec![ORIGIN.into()]).await;
    let ch = s.register_topic("clients").await;
    let target = ch
        .url
        .strip_prefix(&format!("http://{}", s.public))
        .unwrap();
    let browser = format!(
        "Origin: {ORIGIN}\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: cors\r\nAccept: */*\r\nAccept-Language: en\r\nUser-Agent: Mozilla/5.0\r\nConnection: keep-alive\r\n"
    );
    let many: String = (0..98).map(|i| format!("X-Header-{i}: {i}\r\n")).collect();
    let cookie = format!("Cookie: session={}\r\n", "c".repeat(60 * 1024));
    let cases = [
        ("a browser", browser),
        ("99 headers", many),
        ("a 60 KiB cookie", cookie),
        (
            "a Box SDK",
            "Authorization: Bearer t\r\nUser-Agent: python-requests/2.32\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n".into(),
        ),
    ];
    for (n, (case, headers)) in cases.iter().enumerate() {
        let mut conn = TcpStream::connect(s.public).await.unwrap();
        conn.write_all(raw::get(target, headers).as_bytes())
            .await
            .unwrap();
        s.wait_parked(1).await;
        s.publish(json!({"topic": "clients"})).await;
        let res = raw::read_response(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(res.text(), r#"{"message":"new_change"}"#, "{case}");
        if *case == "a browser" {
            assert_eq!(res.header("access-control-allow-origin"), Some(ORIGIN));
            assert_eq!(res.header("vary"), Some("Origin"));
        }
        assert_eq!(parked_on(&s, "fast").await, (n + 1) as f64, "{case}");
        assert_eq!(parked_on(&s, "hyper").await, 0.0, "{case}");
    }
    s.stop().await;
}

#[tokio::test]
async fn polls_served_by_hyper_are_counted_as_parked_there() {
    let s = TestServer::with(|c| c.fast_path = false).await;
    let ch = s.register_topic("hyper").await;
    let poll = s.spawn_poll(&ch.url);
    s.wait_parked(1).await;
    s.publish(json!({"topic": "hyper"})).await;
    assert_eq!(poll.await.unwrap(), "new_change");
    assert_eq!(parked_on(&s, "hyper").await, 1.0);
    assert_eq!(parked_on(&s, "fast").await, 0.0);
    s.stop().await;
}
