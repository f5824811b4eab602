//! The public listener (SPEC §2): every answer and every error, over real sockets.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{TestServer, secs};

#[tokio::test]
async fn a_publish_answers_a_parked_poll_new_change_with_json_no_store() {
    let s = TestServer::start().await;
    let ch = s.register_topic("user:42").await;
    let poll = {
        let (http, url) = (s.http.clone(), ch.url.clone());
        tokio::spawn(async move { http.get(url).send().await.unwrap() })
    };
    s.wait_parked(1).await;
    assert_eq!(s.publish(json!({"topic": "user:42"})).await, (1, 1));
    let res = poll.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(res.headers()[CACHE_CONTROL], "no-store");
    assert_eq!(res.text().await.unwrap(), r#"{"message":"new_change"}"#);
}

#[tokio::test]
async fn a_quiet_poll_is_answered_reconnect_after_its_park_time() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(2.0)).await;
    let ch = s.register_topic("t").await;
    let start = Instant::now();
    assert_eq!(s.message(&ch.url, "").await, "reconnect");
    // 2 s minus a 0.2 s grace, minus up to 10 % jitter: 1.62 s to 1.8 s.
    let took = start.elapsed();
    assert!(
        took >= secs(1.6) && took < secs(1.95),
        "parked for {took:?}"
    );
}

#[tokio::test]
async fn unknown_and_malformed_channels_are_answered_max_retries_not_4xx() {
    let s = TestServer::start().await;
    for id in ["AAAAAAAAAAAAAAAAAAAAAA", "not-an-id", "%FF%FE"] {
        let (status, body) = s
            .poll(&s.public_url(&format!("/subscribe?channel={id}")), "")
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"message": "max_retries"}));
    }
}

#[tokio::test]
async fn dont_block_answers_no_change_when_nothing_is_pending() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");
    s.publish(json!({"topic": "t"})).await;
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "new_change");
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");
}

#[tokio::test]
async fn parameters_in_any_order_extras_and_authorization_are_ignored() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    s.publish(json!({"topic": "t"})).await;
    let url = s.public_url(&format!(
        "/subscribe?x=1&stream_position=now&foo=bar&channel={}",
        ch.id
    ));
    let res = s
        .http
        .get(url)
        .bearer_auth("the-api-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), r#"{"message":"new_change"}"#);
}

#[tokio::test]
async fn bad_requests_get_400_bad_request_with_a_reason() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let long = format!("/subscribe?channel={}&pad={}", ch.id, "x".repeat(5000));
    for path in [
        "/subscribe".to_owned(),
        "/subscribe?channel=".to_owned(),
        "/subscribe?stream_type=all".to_owned(),
        format!("/subscribe?channel={}&stream_position=-3", ch.id),
        format!("/subscribe?channel={}&stream_position=1e5", ch.id),
        format!(
            "/subscribe?channel={}&stream_position=18446744073709551616",
            ch.id
        ),
        long,
    ] {
        let (status, body) = s.poll(&s.public_url(&path), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(body["code"], "bad_request", "{path}");
        assert!(body["message"].as_str().unwrap().len() > 5);
    }
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let s = TestServer::start().await;
    for path in [
        "/",
        "/subscribe/x",
        "/v1/channels",
        "/v1/publish",
        "/metrics",
        "/healthz",
    ] {
        let res = s.http.get(s.public_url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "not_found");
    }
    let res = s
        .http
        .post(s.public_url("/v1/channels"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "no internal route on the public listener"
    );
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let res = s
            .http
            .request(
                method.parse().unwrap(),
                s.public_url("/subscribe?channel=x"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(res.headers()[ALLOW], "GET");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "method_not_allowed");
    }
}

#[tokio::test]
async fn a_fifth_poll_on_one_channel_is_429_too_many_polls() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let polls: Vec<_> = (0..4).map(|_| s.spawn_poll(&ch.url)).collect();
    s.wait_parked(4).await;
    let (status, body) = s.poll(&ch.url, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["code"], "too_many_polls");
    // The four parked ones are all answered by one publish.
    assert_eq!(s.publish(json!({"topic": "t"})).await, (1, 4));
    for p in polls {
        assert_eq!(p.await.unwrap(), "new_change");
    }
}

#[tokio::test]
async fn a_full_node_answers_503_over_capacity_with_retry_after() {
    let s = TestServer::with(|c| c.max_parked = Some(2)).await;
    let a = s.register_topic("a").await;
    let b = s.register_topic("b").await;
    let c = s.register_topic("c").await;
    let _pa = s.spawn_poll(&a.url);
    let _pb = s.spawn_poll(&b.url);
    s.wait_parked(2).await;
    let res = s.http.get(&c.url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key(RETRY_AFTER));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "over_capacity");
    assert_eq!(
        s.metric(r#"nudge_polls_total{outcome="over_capacity"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn keep_alive_connections_serve_poll_after_poll() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let path = ch.url.trim_start_matches(&format!("http://{}", s.public));
    let mut conn = TcpStream::connect(s.public).await.unwrap();
    for _ in 0..3 {
        s.publish(json!({"topic": "t"})).await;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let mut got = Vec::new();
        while !got.ends_with(br#"{"message":"new_change"}"#) {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_parked_is_removed_at_once() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let path = ch
        .url
        .trim_start_matches(&format!("http://{}", s.public))
        .to_owned();
    let mut conn = TcpStream::connect(s.public).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s.wait_parked(1).await;
    assert_eq!(s.metric("nudge_open_connections").await, 1.0);
    drop(conn);
    s.wait_parked(0).await;
    assert_eq!(s.metric("nudge_parked_polls").await, 0.0);
    assert_eq!(s.metric(r#"nudge_polls_total{outcome="gone"}"#).await, 1.0);
    // Its place in the per-channel limit is free again: four more polls park.
    let _polls: Vec<_> = (0..4).map(|_| s.spawn_poll(&ch.url)).collect();
    s.wait_parked(4).await;
}
