//! `TestServer`: a nudge bound to free loopback ports in this process, with helpers that
//! speak its HTTP API through a real client; and `eventually`, to wait on a condition.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nudge::bus::Bus;
use nudge::hub::{Hub, HubConfig, Limits};
use nudge::metrics::Metrics;
use nudge::{Config, Server};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub struct TestServer {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub hub: Arc<Hub>,
    /// The node's bus, when started with a Redis URL.
    pub bus: Option<Arc<Bus>>,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// A registered channel as the main API sees it.
pub struct Channel {
    pub id: String,
    pub url: String,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with(|_| {}).await
    }

    /// Starts a node on the bus at `redis_url` (not waiting for it to be ready: see
    /// [`TestServer::wait_ready`]).
    pub async fn with_redis(redis_url: &str) -> TestServer {
        TestServer::with_flags(&["--redis-url", redis_url]).await
    }

    /// Starts with these flags (as on the command line) over the test defaults.
    pub async fn with_flags(flags: &[&str]) -> TestServer {
        let mut config = Config::for_tests_with(flags);
        config.drain_period = Duration::from_millis(200);
        TestServer::with_config(config).await
    }

    /// Starts with the test defaults changed by `adjust`.
    pub async fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::for_tests();
        config.drain_period = Duration::from_millis(200);
        adjust(&mut config);
        TestServer::with_config(config).await
    }

    async fn with_config(config: Config) -> TestServer {
        let server = Server::bind(config).await.expect("binds to free ports");
        let (public, internal, hub, bus) = (
            server.public_addr(),
            server.internal_addr(),
            server.hub().clone(),
            server.bus().cloned(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        let http = http_client(Duration::from_secs(30));
        TestServer {
            public,
            internal,
            hub,
            bus,
            http,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn public_url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.public, path_and_query)
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    /// POSTs `body` as JSON to an internal route.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.internal_url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` to an internal route, expects `status`, returns the JSON answer.
    async fn post_internal(&self, path: &str, body: Value, status: StatusCode) -> Value {
        let res = self.post_json(path, &body).await;
        assert_eq!(res.status(), status, "POST {path}");
        res.json().await.unwrap()
    }

    /// `POST /v1/channels`, expecting 201.
    pub async fn register(&self, body: Value) -> Channel {
        let body = self
            .post_internal("/v1/channels", body, StatusCode::CREATED)
            .await;
        Channel {
            id: body["channel"].as_str().unwrap().to_owned(),
            url: body["entries"][0]["url"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn register_topic(&self, topic: &str) -> Channel {
        self.register(serde_json::json!({ "topics": [topic] }))
            .await
    }

    /// `POST /v1/publish`, expecting 200; returns `(published, woken)`.
    pub async fn publish(&self, body: Value) -> (u64, u64) {
        let body = self
            .post_internal("/v1/publish", body, StatusCode::OK)
            .await;
        (
            body["published"].as_u64().unwrap(),
            body["woken"].as_u64().unwrap(),
        )
    }

    /// `POST /v1/revoke`, expecting 200; returns how many channels were revoked.
    pub async fn revoke(&self, body: Value) -> u64 {
        let body = self.post_internal("/v1/revoke", body, StatusCode::OK).await;
        body["revoked"].as_u64().unwrap()
    }

    /// A poll of `url` (plus `extra` query parameters); returns status and JSON body.
    pub async fn poll(&self, url: &str, extra: &str) -> (StatusCode, Value) {
        let res = self.http.get(format!("{url}{extra}")).send().await.unwrap();
        let status = res.status();
        (status, res.json().await.unwrap())
    }

    /// The `message` of a 200 poll answer.
    pub async fn message(&self, url: &str, extra: &str) -> String {
        let (status, body) = self.poll(url, extra).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["message"].as_str().unwrap().to_owned()
    }

    /// Starts a poll in the background.
    pub fn spawn_poll(&self, url: &str) -> JoinHandle<String> {
        let (http, url) = (self.http.clone(), url.to_owned());
        tokio::spawn(async move {
            let res = http.get(url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body: Value = res.json().await.unwrap();
            body["message"].as_str().unwrap().to_owned()
        })
    }

    /// Waits until `n` polls are parked on the node.
    pub async fn wait_parked(&self, n: usize) {
        self.wait_parked_within(n, Duration::from_secs(5), &format!("{n} polls parked"))
            .await;
    }

    /// Waits until `n` polls are parked on the node; panics with `what` after `within`.
    pub async fn wait_parked_within(&self, n: usize, within: Duration, what: &str) {
        let hub = self.hub.clone();
        eventually(what, within, || {
            let hub = hub.clone();
            async move { hub.counts().parked == n }
        })
        .await;
    }

    /// Waits (2 s at most) until a poll of `url` that does not block finds `new_change`.
    pub async fn wait_new_change(&self, url: &str, what: &str) {
        eventually(what, Duration::from_secs(2), || async move {
            self.message(url, "&dont_block=true").await == "new_change"
        })
        .await;
    }

    /// A sample of one metric from `GET /metrics`, e.g. `nudge_polls_total{outcome="gone"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = body_text(self.http.get(self.internal_url("/metrics"))).await;
        metric_sample(&text, sample)
    }

    /// `GET /readyz`: its status and `code` (`None` when ready).
    pub async fn readyz(&self) -> (StatusCode, Option<String>) {
        let res = self
            .http
            .get(self.internal_url("/readyz"))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        (status, body["code"].as_str().map(str::to_owned))
    }

    /// Waits until `/readyz` answers 200 (with a bus: until its subscription is up).
    pub async fn wait_ready(&self) {
        eventually("/readyz answers 200", Duration::from_secs(10), || async {
            self.readyz().await.0 == StatusCode::OK
        })
        .await;
    }

    /// SIGTERM's equivalent: drains and waits for `run` to return.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Runs the `nudge` binary on free loopback ports with `args`, expects the configuration
/// error's exit code 64, and returns what it wrote to stderr.
pub fn refused(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(nudge_testkit::node::FREE_PORTS)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A hub of its own, without HTTP, for tests that drive it directly (up to 4 polls per
/// channel); with its metrics, to read them back.
pub fn hub(limits: Limits, max_parked: usize) -> (Arc<Hub>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new(), false));
    let config = HubConfig {
        limits,
        max_polls_per_channel: 4,
        max_parked,
    };
    (Hub::new(config, metrics.clone()), metrics)
}

/// Sends `request` and answers its status.
pub async fn status(request: reqwest::RequestBuilder) -> StatusCode {
    request.send().await.unwrap().status()
}

/// A client whose every request gives up after `timeout`, so a hung server fails the test.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

/// Sends `request` and reads the answer's body as text, whatever its status.
pub async fn body_text(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// Sends `request` and reads the answer's body as JSON, whatever its status.
pub async fn body_json(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The value of one sample (`name` or `name{labels}`) in a Prometheus text exposition.
pub fn metric_sample(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
        .parse()
        .unwrap()
}

/// Waits until `condition` holds, checking every 10 ms; panics with `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}
