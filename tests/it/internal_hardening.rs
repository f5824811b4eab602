//! The internal listener accepts exactly the documented shapes, and HTTP/1.1 framing
//! (issue 11.7, 11.9).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::net::TcpStream;

use crate::internal::post;
use crate::raw;
use crate::support::TestServer;

#[tokio::test]
async fn a_publish_is_an_object_an_array_of_objects_or_ndjson_of_objects_and_nothing_else() {
    let s = TestServer::start().await;
    let ch = s.register_topic("user:42").await;
    for (content_type, body) in [
        ("application/json", r#"["user:42",7,"changes"]"#),
        ("application/json", r#"[["user:42"],["b"]]"#),
        ("application/json", r#"[{"topic":"user:42"},["b"]]"#),
        ("application/json", r#""user:42""#),
        ("application/x-ndjson", "[\"user:42\"]\n"),
        (
            "application/x-ndjson",
            "{\"topic\":\"user:42\"}\n[\"user:42\",7]\n",
        ),
    ] {
        let (status, answer) = post(&s, "/v1/publish", body, content_type).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["code"], "bad_request", "{body}");
    }
    // Nothing of a refused batch was applied.
    assert_eq!(s.message(&ch.url, "&dont_block=true").await, "no_change");
    for (content_type, body) in [
        ("application/json", r#"{"topic":"user:42","position":7}"#),
        ("application/json", r#"[{"topic":"user:42"},{"topic":"b"}]"#),
        (
            "application/x-ndjson",
            "{\"topic\":\"user:42\"}\n{\"topic\":\"b\"}\n",
        ),
    ] {
        let (status, answer) = post(&s, "/v1/publish", body, content_type).await;
        assert_eq!(status, StatusCode::OK, "{body}: {answer}");
    }
    s.stop().await;
}

#[tokio::test]
async fn max_retries_is_a_number_or_a_string_of_digits_only() {
    let s = TestServer::start().await;
    for bad in ["+5", " 5", "5 ", "", "-1", "0x5", "5.0"] {
        let body = json!({"topics": ["t"], "max_retries": bad}).to_string();
        let (status, answer) = post(&s, "/v1/channels", &body, "application/json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {answer}");
    }
    for good in [json!("5"), json!(5)] {
        let body = json!({"topics": ["t"], "max_retries": good}).to_string();
        let (status, answer) = post(&s, "/v1/channels", &body, "application/json").await;
        assert_eq!(status, StatusCode::CREATED, "{good}: {answer}");
        assert_eq!(answer["entries"][0]["max_retries"], "5");
    }
    s.stop().await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host; HTTP/1.0 needs none.
#[tokio::test]
async fn the_internal_listener_wants_exactly_one_host_in_http_1_1() {
    let s = TestServer::start().await;
    for (request, status) in [
        ("GET /healthz HTTP/1.1\r\n\r\n", 400),
        ("GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /v1/channels/x HTTP/1.1\r\n\r\n", 400),
        ("GET /healthz HTTP/1.0\r\n\r\n", 200),
        ("GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 200),
    ] {
        let mut conn = TcpStream::connect(s.internal).await.unwrap();
        let res = raw::exchange(&mut conn, request, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(res.status, status, "{request:?}: {}", res.text());
        if status == 400 {
            assert!(res.text().contains("exactly one Host"), "{}", res.text());
        }
    }
    s.stop().await;
}
