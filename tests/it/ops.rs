//! Operations (SPEC §6, issue 4) over real sockets, in process: metrics checked by a real
//! `promtool` and scraped by a real Prometheus, the fan-out histogram, CORS, TLS, request
//! limits and the internal token. Process-level behaviour is in `process.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nudge::config::{Args, TlsFiles, Token};
use nudge::hub::{Answer, Limits, PollRequest, PollStart, Publish, Registration};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;

use crate::raw;
use crate::support::{self, TestServer, eventually, secs};
use crate::tools::{Prometheus, TempDir, tool};

const TOKEN: &str = "ops-test-token-0123456789";

// ---- metrics ----------------------------------------------------------------------------

/// A scrape, parsed: `# TYPE` of each family, and every sample as (name, labels, value).
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            samples.push((name.to_owned(), labels, value.parse().unwrap()));
        }
        Scrape { types, samples }
    }

    fn value(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
            })
            .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
            .2
    }
}

async fn scrape(s: &TestServer, token: Option<&str>) -> (reqwest::header::HeaderMap, String) {
    let mut req = s.http.get(s.internal_url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    (res.headers().clone(), res.text().await.unwrap())
}

#[tokio::test]
async fn metrics_have_every_spec_name_and_no_channel_or_topic_label() {
    let s = TestServer::start().await;
    let ch = s.register_topic("user:4242").await;
    let poll = s.spawn_poll(&ch.url);
    s.wait_parked(1).await;
    s.publish(json!({"topic": "user:4242"})).await;
    assert_eq!(poll.await.unwrap(), "new_change");
    let (headers, text) = scrape(&s, None).await;
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "Prometheus text format"
    );
    let m = Scrape::parse(&text);
    for (name, kind) in [
        ("nudge_parked_polls", "gauge"),
        ("nudge_channels", "gauge"),
        ("nudge_topics", "gauge"),
        ("nudge_topic_bytes", "gauge"),
        ("nudge_open_connections", "gauge"),
        ("nudge_polls_total", "counter"),
        ("nudge_publishes_total", "counter"),
        ("nudge_wakeups_total", "counter"),
        ("nudge_bus_gaps_total", "counter"),
        ("nudge_bus_entries_replayed_total", "counter"),
        ("nudge_bus_stalls_total", "counter"),
        ("nudge_bus_lag_seconds", "histogram"),
        ("nudge_state_snapshots_total", "counter"),
        ("nudge_state_snapshot_failures_total", "counter"),
        ("nudge_state_snapshot_seconds", "gauge"),
        ("nudge_state_snapshot_bytes", "gauge"),
        ("nudge_state_snapshot_channels", "gauge"),
        ("nudge_state_restored_channels", "gauge"),
        ("nudge_registrations_refused_total", "counter"),
        ("nudge_positions_refused_total", "counter"),
        ("nudge_polls_parked_total", "counter"),
        ("nudge_fanout_seconds", "histogram"),
        // Process metrics: resident memory, open files, CPU.
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // Registered only with a bus (deploy/prometheus alert rules rely on that).
    assert!(!m.types.contains_key("nudge_bus_connected"));
    // Low cardinality: the only labels are the outcome, the source, which HTTP path served
    // a public request, how a bus gap was repaired and why, and histogram buckets.
    let labels: BTreeSet<&str> = m
        .samples
        .iter()
        .flat_map(|(_, l, _)| l.keys().map(String::as_str))
        .collect();
    assert_eq!(
        labels,
        BTreeSet::from(["cause", "le", "outcome", "path", "repair", "source"])
    );
    assert!(!text.contains(&ch.id) && !text.contains("user:4242"));
    // The figures say what happened.
    assert_eq!(m.value("nudge_channels", None), 1.0);
    assert_eq!(m.value("nudge_topics", None), 1.0);
    assert_eq!(m.value("nudge_wakeups_total", None), 1.0);
    assert_eq!(
        m.value("nudge_publishes_total", Some(("source", "api"))),
        1.0
    );
    assert_eq!(
        m.value("nudge_polls_total", Some(("outcome", "new_change"))),
        1.0
    );
    assert_eq!(m.value("nudge_fanout_seconds_count", None), 1.0);
    assert!(m.value("process_resident_memory_bytes", None) > 1e6);
    assert!(m.value("process_open_fds", None) >= 3.0);
}

#[tokio::test]
async fn promtool_accepts_a_real_scrape() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let _poll = s.spawn_poll(&ch.url);
    s.wait_parked(1).await;
    let (_, text) = scrape(&s, None).await;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_real_prometheus_scrapes_nudge_with_the_bearer_token() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let dir = TempDir::new("scrape");
    let token_file = dir.write("token", format!("{TOKEN}\n"));
    let s = TestServer::with(|c| c.internal_token = Some(Token::new(TOKEN))).await;
    // Without the token /metrics is refused: Prometheus must send it.
    let res = s.http.get(s.internal_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let ch = {
        let res = s
            .http
            .post(s.internal_url("/v1/channels"))
            .bearer_auth(TOKEN)
            .json(&json!({"topics": ["t"]}))
            .send()
            .await
            .unwrap();
        let body: Value = res.json().await.unwrap();
        body["entries"][0]["url"].as_str().unwrap().to_owned()
    };
    let _polls = [s.spawn_poll(&ch), s.spawn_poll(&ch)];
    s.wait_parked(2).await;

    let prometheus = Prometheus::start(&binary, &s.internal.to_string(), &token_file);
    prometheus
        .wait_for(r#"up{job="nudge"}"#, "1", Duration::from_secs(60))
        .await;
    prometheus
        .wait_for("nudge_parked_polls", "2", Duration::from_secs(10))
        .await;
    prometheus
        .wait_for("nudge_channels", "1", Duration::from_secs(10))
        .await;
}

/// `nudge_fanout_seconds` runs from a publish's arrival to its *last* answered poll: here
/// the second woken poll takes its answer 300 ms (of paused time) after the first.
#[tokio::test(start_paused = true)]
async fn the_fanout_histogram_runs_to_the_last_answered_poll() {
    let limits = Limits {
        ttl: secs(600.0),
        retry_timeout: secs(60.0),
        max_retries: 10,
    };
    let (hub, metrics) = support::hub(limits, 100);
    let id = hub
        .register(Registration {
            topics: vec!["t".into()],
            ..Default::default()
        })
        .unwrap()
        .id
        .to_string();
    let park = || match hub.poll(&id, PollRequest::default()) {
        PollStart::Park(p) => p,
        _ => panic!("parks"),
    };
    let (first, second) = (park(), park());
    let publish = [Publish {
        topic: "t".into(),
        position: None,
        stream_type: None,
    }];
    assert_eq!(hub.publish(&publish, "api").woken, 2);
    assert_eq!(first.wait().await, Answer::NewChange);
    assert_eq!(
        metrics.fanout_seconds.get_sample_count(),
        0,
        "one poll still unanswered"
    );
    tokio::time::advance(Duration::from_millis(300)).await;
    assert_eq!(second.wait().await, Answer::NewChange);
    assert_eq!(metrics.fanout_seconds.get_sample_count(), 1);
    let sum = metrics.fanout_seconds.get_sample_sum();
    assert!((0.3..0.31).contains(&sum), "fan-out {sum} s");

    // A publish whose only woken poll left before taking its answer observes nothing
    // (nobody was answered); nor does one that wakes nobody.
    let gone = park();
    assert_eq!(hub.publish(&publish, "api").woken, 1);
    drop(gone);
    assert_eq!(hub.publish(&publish, "api").woken, 0);
    assert_eq!(metrics.fanout_seconds.get_sample_count(), 1);
}

#[tokio::test]
async fn one_fanout_observation_per_publish_over_real_sockets() {
    let s = TestServer::start().await;
    let chans = [s.register_topic("t").await, s.register_topic("t").await];
    let polls: Vec<_> = chans
        .iter()
        .flat_map(|c| [s.spawn_poll(&c.url), s.spawn_poll(&c.url)])
        .collect();
    s.wait_parked(4).await;
    assert_eq!(s.publish(json!({"topic": "t"})).await, (1, 4));
    for p in polls {
        assert_eq!(p.await.unwrap(), "new_change");
    }
    eventually("the fan-out observed", Duration::from_secs(5), || async {
        s.metric("nudge_fanout_seconds_count").await == 1.0
    })
    .await;
    assert_eq!(s.metric("nudge_wakeups_total").await, 4.0);
}

// ---- CORS -------------------------------------------------------------------------------

const APP: &str = "https://app.example.com";

/// The preflight a browser at [`APP`] sends before a GET of `url` that it may not simply send.
fn preflight(s: &TestServer, url: &str) -> reqwest::RequestBuilder {
    s.http
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", APP)
        .header("access-control-request-method", "GET")
}

#[tokio::test]
async fn cors_preflight_and_headers_let_a_browser_app_long_poll() {
    let s = TestServer::with(|c| c.cors_origins = vec![APP.into()]).await;
    let ch = s.register_topic("t").await;

    // The preflight a browser sends before a GET with an Authorization header.
    let res = preflight(&s, &ch.url)
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("GET")
    );
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("authorization")
    );
    assert!(h.contains_key("access-control-max-age"));

    // The long-poll itself: parked, woken, and readable by the page.
    let poll = {
        let (http, url) = (s.http.clone(), ch.url.clone());
        tokio::spawn(async move { http.get(url).header("origin", APP).send().await.unwrap() })
    };
    s.wait_parked(1).await;
    s.publish(json!({"topic": "t"})).await;
    let res = poll.await.unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], APP);
    assert_eq!(res.headers()["vary"], "Origin");
    assert_eq!(
        res.headers()["access-control-expose-headers"],
        "Retry-After"
    );
    assert_eq!(res.text().await.unwrap(), r#"{"message":"new_change"}"#);

    // Another origin: refused at preflight, and no CORS grant on answers.
    let res = s
        .http
        .request(reqwest::Method::OPTIONS, &ch.url)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let res = s
        .http
        .get(format!("{}&dont_block=true", ch.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn cors_star_allows_any_origin_and_no_flag_means_no_cors() {
    let s = TestServer::with(|c| c.cors_origins = vec!["*".into()]).await;
    let ch = s.register_topic("t").await;
    let res = s
        .http
        .get(format!("{}&dont_block=true", ch.url))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );

    let s = TestServer::start().await;
    let ch = s.register_topic("t").await;
    let res = preflight(&s, &ch.url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET");
    let res = s
        .http
        .get(format!("{}&dont_block=true", ch.url))
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

// ---- TLS --------------------------------------------------------------------------------

/// A certificate for 127.0.0.1 and localhost, made here, written as PEM files.
pub(crate) struct TestCert {
    dir: TempDir,
    der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCert {
    pub(crate) fn new() -> TestCert {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let dir = TempDir::new("tls");
        dir.write("cert.pem", made.cert.pem());
        dir.write("key.pem", made.signing_key.serialize_pem());
        TestCert {
            der: made.cert.der().clone(),
            dir,
        }
    }

    pub(crate) fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.path().join("cert.pem"),
            key: self.dir.path().join("key.pem"),
        }
    }

    /// A TLS client that trusts this certificate only.
    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

#[tokio::test]
async fn tls_long_poll_over_https_with_a_generated_certificate() {
    let cert = TestCert::new();
    let s = TestServer::with(|c| c.tls = Some(cert.files())).await;
    let ch = s.register_topic("t").await;
    let prefix = format!("https://{}", s.public);
    assert!(ch.url.starts_with(&prefix), "{}", ch.url);
    let path = ch.url[prefix.len()..].to_owned();

    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(s.public).await.unwrap();
    let mut tls = cert.connector().connect(name, tcp).await.unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN says HTTP/1.1"
    );
    // A parked poll over HTTPS, woken by a publish; then a second poll on the same
    // (keep-alive) TLS connection.
    let poll = tokio::spawn(async move {
        let res = raw::exchange(&mut tls, &raw::get(&path, ""), secs(20.0))
            .await
            .unwrap();
        (tls, path, res)
    });
    s.wait_parked(1).await;
    s.publish(json!({"topic": "t"})).await;
    let (mut tls, path, res) = poll.await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), r#"{"message":"new_change"}"#);
    let res = raw::poll_now(&mut tls, &path).await.unwrap();
    assert_eq!(res.text(), r#"{"message":"no_change"}"#);

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(s.public).await.unwrap();
    let res = raw::exchange(&mut plain, &raw::get(&path, ""), secs(5.0)).await;
    assert!(res.is_err(), "{res:?}");
}

#[tokio::test]
async fn tls_a_client_that_never_finishes_its_handshake_is_cut() {
    let cert = TestCert::new();
    let s = TestServer::with(|c| {
        c.tls = Some(cert.files());
        c.header_read_timeout = secs(1.0);
    })
    .await;
    let start = Instant::now();
    let mut silent = TcpStream::connect(s.public).await.unwrap();
    assert!(raw::closed_within(&mut silent, secs(5.0)).await);
    let took = start.elapsed();
    assert!(took >= secs(0.9) && took < secs(3.0), "cut after {took:?}");
}

// ---- limits -----------------------------------------------------------------------------

#[tokio::test]
async fn request_size_limits_answer_the_documented_errors_on_both_paths() {
    for fast_path in [true, false] {
        request_size_limits(fast_path).await;
    }
}

async fn request_size_limits(fast_path: bool) {
    let s = TestServer::with(|c| c.fast_path = fast_path).await;
    let ch = s.register_topic("t").await;
    let path = format!("/subscribe?channel={}", ch.id);
    let mut conn = TcpStream::connect(s.public).await.unwrap();

    // A query over 4096 bytes: 400 bad_request, and the connection stays usable.
    let res = raw::exchange(
        &mut conn,
        &raw::get(&format!("{path}&pad={}", "x".repeat(5000)), ""),
        secs(5.0),
    )
    .await
    .unwrap();
    assert_eq!(res.status, 400);
    let body: Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(body["code"], "bad_request");
    let res = raw::poll_now(&mut conn, &path).await.unwrap();
    assert_eq!(res.text(), r#"{"message":"no_change"}"#);

    // A request head over 64 KiB (by its URL or its headers), or with over 100 headers:
    // hyper answers 431 itself, with no body, and closes.
    for request in [
        raw::get(&format!("{path}&pad={}", "x".repeat(70_000)), ""),
        raw::get(&path, &format!("X-Big: {}\r\n", "y".repeat(70_000))),
        raw::get(&path, &"X-Many: 1\r\n".repeat(101)),
    ] {
        let mut conn = TcpStream::connect(s.public).await.unwrap();
        let res = raw::exchange(&mut conn, &request, secs(5.0)).await.unwrap();
        assert_eq!(res.status, 431, "fast path: {fast_path}");
        assert!(raw::closed_within(&mut conn, secs(5.0)).await);
    }
    // Just under the limit is served.
    let res = raw::exchange(
        &mut conn,
        &raw::get(
            &format!("{path}&dont_block=true"),
            &format!("X-Big: {}\r\n", "y".repeat(60_000)),
        ),
        secs(5.0),
    )
    .await
    .unwrap();
    assert_eq!(res.status, 200);

    // Internal bodies: up to 1 MiB; past it 413 payload_too_large.
    let big = format!(
        r#"[{}{{"topic":"t"}}]"#,
        r#"{"topic":"t"},"#.repeat(1024 * 1024 / 14)
    );
    assert!(big.len() > 1024 * 1024);
    let res = s
        .http
        .post(s.internal_url("/v1/publish"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        res.json::<Value>().await.unwrap()["code"],
        "payload_too_large"
    );
    assert_eq!(
        s.metric(r#"nudge_publishes_total{source="api"}"#).await,
        0.0,
        "nothing published"
    );
}

#[tokio::test]
async fn over_capacity_is_503_with_retry_after_and_frees_with_the_polls() {
    let s = TestServer::with(|c| c.max_parked = Some(3)).await;
    let ch = s.register(json!({"topics": ["t"]})).await;
    let other = s.register_topic("u").await;
    let polls: Vec<_> = (0..3).map(|_| s.spawn_poll(&ch.url)).collect();
    s.wait_parked(3).await;
    for _ in 0..2 {
        let res = s.http.get(&other.url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "5");
        assert_eq!(res.json::<Value>().await.unwrap()["code"], "over_capacity");
    }
    assert_eq!(
        s.metric(r#"nudge_polls_total{outcome="over_capacity"}"#)
            .await,
        2.0
    );
    s.publish(json!({"topic": "t"})).await;
    for p in polls {
        assert_eq!(p.await.unwrap(), "new_change");
    }
    s.publish(json!({"topic": "u"})).await;
    assert_eq!(s.message(&other.url, "").await, "new_change");
}

// ---- the internal token -----------------------------------------------------------------

#[tokio::test]
async fn the_token_guards_metrics_and_every_route_but_the_probes() {
    let s = TestServer::with(|c| c.internal_token = Some(Token::new(TOKEN))).await;
    let routes = [
        ("GET", "/metrics"),
        ("POST", "/v1/channels"),
        ("POST", "/v1/publish"),
        ("POST", "/v1/revoke"),
        ("GET", "/v1/channels/AAAAAAAAAAAAAAAAAAAAAA"),
        ("DELETE", "/v1/channels/AAAAAAAAAAAAAAAAAAAAAA"),
        ("GET", "/no/such/route"),
    ];
    let wrong = [
        String::new(),
        format!("Basic {TOKEN}"),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", &TOKEN[1..]),
        format!("Bearer  {TOKEN}"),
        TOKEN.to_owned(),
    ];
    for (method, path) in routes {
        for auth in &wrong {
            let mut req = s
                .http
                .request(method.parse().unwrap(), s.internal_url(path));
            if !auth.is_empty() {
                req = req.header("authorization", auth);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(res.headers()["www-authenticate"], "Bearer");
        }
    }
    // The scheme name is case-insensitive; the token is not.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let res = s
            .http
            .get(s.internal_url("/metrics"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
    }
    let res = s
        .http
        .get(s.internal_url("/metrics"))
        .header("authorization", format!("Bearer {}", TOKEN.to_uppercase()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    for probe in ["/healthz", "/readyz"] {
        let res = s.http.get(s.internal_url(probe)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{probe}");
    }
}

#[test]
fn a_non_loopback_internal_listener_needs_a_token() {
    let dir = TempDir::new("token");
    let file = dir.write("token", TOKEN);
    let parse = |extra: &[&str]| {
        let mut argv = vec!["nudge"];
        argv.extend_from_slice(extra);
        nudge::Config::from_args(<Args as clap::Parser>::try_parse_from(argv).unwrap())
    };
    for addr in ["0.0.0.0:8081", "[::]:8081", "10.1.2.3:8081"] {
        let err = parse(&["--internal-listen", addr]).unwrap_err();
        assert!(err.contains("--internal-token-file"), "{addr}: {err}");
        parse(&[
            "--internal-listen",
            addr,
            "--internal-token-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
    }
    parse(&["--internal-listen", "[::1]:8081"]).unwrap();
}
