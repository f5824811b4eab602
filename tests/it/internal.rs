//! The internal listener (SPEC §4): routes, Box's body shape, validation, errors, auth.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, body_json, secs};

/// POSTs a raw body with a content type to the internal listener.
pub(crate) async fn post(
    s: &TestServer,
    path: &str,
    body: &str,
    content_type: &str,
) -> (StatusCode, Value) {
    let res = s
        .http
        .post(s.internal_url(path))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn registration_returns_boxs_realtime_server_entry_exactly() {
    let s = TestServer::start().await;
    let (status, body) = post(
        &s,
        "/v1/channels",
        r#"{"topics":["user:42"]}"#,
        "application/json",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = body["channel"].as_str().unwrap();
    assert_eq!(id.len(), 22);
    assert_eq!(
        body,
        json!({
            "chunk_size": 1,
            "entries": [{
                "type": "realtime_server",
                "url": format!("http://{}/subscribe?channel={id}&stream_type=all", s.public),
                "ttl": "10",
                "max_retries": "10",
                "retry_timeout": 60
            }],
            "channel": id
        })
    );
    // The types matter to SDKs: strings, strings, a number.
    assert!(body["entries"][0]["ttl"].is_string());
    assert!(body["entries"][0]["max_retries"].is_string());
    assert!(body["entries"][0]["retry_timeout"].is_u64());
}

#[tokio::test]
async fn limits_may_be_lowered_per_channel_and_are_clamped_to_the_node() {
    let s = TestServer::start().await;
    // The three limits a registration advertises: (ttl, max_retries, retry_timeout).
    let advertised = |body: &str| {
        let body = body.to_owned();
        let s = &s;
        async move {
            let (_, b) = post(s, "/v1/channels", &body, "application/json").await;
            let e = &b["entries"][0];
            (
                e["ttl"].clone(),
                e["max_retries"].clone(),
                e["retry_timeout"].clone(),
            )
        }
    };
    assert_eq!(
        advertised(r#"{"topics":["t"],"ttl":"5m","max_retries":5,"retry_timeout":"45s"}"#).await,
        (json!("5"), json!("5"), json!(45))
    );
    assert_eq!(
        advertised(r#"{"topics":["t"],"ttl":"2h","max_retries":"99","retry_timeout":600}"#).await,
        (json!("10"), json!("10"), json!(60))
    );
    assert_eq!(
        advertised(r#"{"topics":["t"],"ttl":61}"#).await.0,
        json!("2"),
        "whole minutes, rounded up"
    );
}

#[tokio::test]
async fn the_public_url_flag_names_the_node_in_channel_urls() {
    let s =
        TestServer::with(|c| c.public_url = Some("https://3.realtime.example.com".into())).await;
    let ch = s.register_topic("t").await;
    assert_eq!(
        ch.url,
        format!(
            "https://3.realtime.example.com/subscribe?channel={}&stream_type=all",
            ch.id
        )
    );
}

#[tokio::test]
async fn bad_registrations_are_400_with_a_reason() {
    let s = TestServer::start().await;
    let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    for body in [
        "not json".to_owned(),
        "{}".to_owned(),
        r#"{"topics":[]}"#.to_owned(),
        json!({ "topics": many }).to_string(),
        r#"{"topics":["has space"]}"#.to_owned(),
        r#"{"topics":[""]}"#.to_owned(),
        format!(r#"{{"topics":["{}"]}}"#, "x".repeat(257)),
        r#"{"topics":["t"],"ttl":"soon"}"#.to_owned(),
        r#"{"topics":["t"],"ttl":0}"#.to_owned(),
        r#"{"topics":["t"],"max_retries":-1}"#.to_owned(),
        r#"{"topics":["t"],"max_retries":"many"}"#.to_owned(),
        r#"{"topics":["t"],"colour":"red"}"#.to_owned(),
        r#"{"topics":["t"],"stream_type":""}"#.to_owned(),
    ] {
        let (status, b) = post(&s, "/v1/channels", &body, "application/json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(b["code"], "bad_request", "{body}");
    }
    assert_eq!(s.hub.counts().channels, 0, "nothing half-registered");
    let huge = format!(r#"{{"topics":["{}"]}}"#, "x".repeat(1024 * 1024 + 1));
    let (status, b) = post(&s, "/v1/channels", &huge, "application/json").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(b["code"], "payload_too_large");
}

#[tokio::test]
async fn channel_info_and_delete() {
    let s = TestServer::with(|c| c.limits.retry_timeout = secs(1.0)).await;
    let ch = s.register(json!({"topics": ["b", "a"], "subject": "user:7", "stream_type": "changes", "max_retries": 3})).await;
    s.message(&ch.url, "").await; // one reconnect
    s.publish(json!({"topic": "a"})).await;
    let info = body_json(
        s.http
            .get(s.internal_url(&format!("/v1/channels/{}", ch.id))),
    )
    .await;
    assert_eq!(info["topics"], json!(["a", "b"]));
    assert_eq!(info["subject"], "user:7");
    assert_eq!(info["stream_type"], "changes");
    assert_eq!(info["retries_used"], 1);
    assert_eq!(info["max_retries"], 3);
    assert_eq!(info["parked_polls"], 0);
    assert_eq!(info["pending"], true);
    assert!(info["expires_in_seconds"].as_f64().unwrap() > 500.0);

    let url = s.internal_url(&format!("/v1/channels/{}", ch.id));
    assert_eq!(
        s.http.delete(&url).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    for res in [
        s.http.delete(&url).send().await.unwrap(),
        s.http.get(&url).send().await.unwrap(),
    ] {
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.json::<Value>().await.unwrap()["code"], "not_found");
    }
    let res = s.http.put(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn publish_takes_an_object_an_array_or_ndjson() {
    let s = TestServer::start().await;
    let a = s.register_topic("a").await;
    let b = s.register_topic("b").await;
    let c = s.register_topic("c").await;
    let polls: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|ch| s.spawn_poll(&ch.url))
        .collect();
    s.wait_parked(3).await;
    let (st, body) = post(
        &s,
        "/v1/publish",
        r#"{"topic":"a","position":1}"#,
        "application/json",
    )
    .await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({"published": 1, "woken": 1}))
    );
    let (st, body) = post(
        &s,
        "/v1/publish",
        r#"[{"topic":"b"},{"topic":"nobody"}]"#,
        "application/json",
    )
    .await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({"published": 2, "woken": 1}))
    );
    let (st, body) = post(
        &s,
        "/v1/publish",
        "{\"topic\":\"c\",\"stream_type\":\"changes\"}\n{\"topic\":\"x\"}\n",
        "application/x-ndjson",
    )
    .await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, json!({"published": 2, "woken": 1}))
    );
    for p in polls {
        assert_eq!(p.await.unwrap(), "new_change");
    }
    assert_eq!(
        s.metric(r#"nudge_publishes_total{source="api"}"#).await,
        5.0
    );
    assert_eq!(s.metric("nudge_wakeups_total").await, 3.0);
}

#[tokio::test]
async fn bad_publishes_are_400_and_publish_nothing() {
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    for (body, ct) in [
        ("", "application/json"),
        ("{}", "application/json"),
        (r#"{"topic":""}"#, "application/json"),
        (r#"{"topic":"t","position":-1}"#, "application/json"),
        (r#"{"topic":"t","position":1.5}"#, "application/json"),
        (
            r#"{"topic":"t","position":18446744073709551616}"#,
            "application/json",
        ),
        (
            r#"[{"topic":"t"},{"topic":"bad topic"}]"#,
            "application/json",
        ),
        ("{\"topic\":\"t\"}\n{oops", "application/x-ndjson"),
    ] {
        let (status, b) = post(&s, "/v1/publish", body, ct).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(b["code"], "bad_request");
    }
    assert_eq!(
        s.message(&ch.url, "&dont_block=true").await,
        "no_change",
        "nothing half-applied"
    );
}

#[tokio::test]
async fn revoke_needs_a_subject_or_a_topic() {
    let s = TestServer::start().await;
    for body in ["{}", r#"{"subject":""}"#, r#"{"user":"x"}"#, "nope"] {
        let (status, b) = post(&s, "/v1/revoke", body, "application/json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(b["code"], "bad_request");
    }
    let (status, b) = post(
        &s,
        "/v1/revoke",
        r#"{"subject":"nobody"}"#,
        "application/json",
    )
    .await;
    assert_eq!((status, b), (StatusCode::OK, json!({"revoked": 0})));
}

#[tokio::test]
async fn probes_metrics_and_unknown_routes() {
    let s = TestServer::start().await;
    let get = |p: &str| s.http.get(s.internal_url(p)).send();
    let res = get("/healthz").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "nudge_parked_polls",
        "nudge_channels",
        "nudge_topics",
        "nudge_open_connections",
        "nudge_polls_total",
        "nudge_publishes_total",
        "nudge_wakeups_total",
        "nudge_bus_gaps_total",
        "nudge_fanout_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(
            metrics.contains(&format!("\n{name}")) || metrics.contains(&format!("# TYPE {name} ")),
            "{name}"
        );
    }
    assert!(
        !metrics.contains("nudge_bus_connected"),
        "no bus, no bus gauge"
    );
    let res = get("/nope").await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "not_found");
    let res = get("/v1/publish").await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "POST");
    let res = get("/subscribe?channel=x").await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "no public route on the internal listener"
    );
}

#[tokio::test]
async fn with_a_token_every_route_but_the_probes_needs_it() {
    let dir = std::env::temp_dir().join(format!("nudge-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "s3cret-token-of-some-length\n").unwrap();
    let args = <nudge::config::Args as clap::Parser>::try_parse_from([
        "nudge",
        "--listen",
        "127.0.0.1:0",
        "--internal-listen",
        "127.0.0.1:0",
        "--internal-token-file",
        file.to_str().unwrap(),
    ])
    .unwrap();
    let config = nudge::Config::from_args(args).unwrap();
    let s = TestServer::with(|c| c.internal_token = config.internal_token.clone()).await;
    for (method, path) in [
        ("GET", "/metrics"),
        ("POST", "/v1/channels"),
        ("POST", "/v1/publish"),
        ("POST", "/v1/revoke"),
        ("GET", "/v1/channels/x"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("s3cret-token-of-some-length"),
        ] {
            let mut req = s
                .http
                .request(method.parse().unwrap(), s.internal_url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let res = req.send().await.unwrap();
            assert_eq!(
                res.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}"
            );
            assert_eq!(res.json::<Value>().await.unwrap()["code"], "unauthorized");
        }
    }
    let res = s
        .http
        .post(s.internal_url("/v1/channels"))
        .bearer_auth("s3cret-token-of-some-length")
        .json(&json!({"topics": ["t"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            s.http
                .get(s.internal_url(probe))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
