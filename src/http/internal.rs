//! The internal listener (SPEC §4): the main API registers channels and publishes here;
//! operators probe and scrape here. A bearer token guards every route but the probes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tracing::debug;

use super::{Body, error, json, json_value};
use crate::bus::{Bus, BusError};
use crate::config::Token;
use crate::error::ApiError;
use crate::hub::{Hub, Publish, Registration, RevokeFilter};
use crate::id::log_tag;
use crate::wire::{
    NDJSON, RevokeBody, channel_info_json, media_type, parse_json, parse_publish_body,
    parse_register_body,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// What the internal listener's routes share.
pub struct InternalState {
    /// The node's hub.
    pub hub: Arc<Hub>,
    /// Base of channel URLs, without a trailing `/`.
    pub public_url: String,
    /// `--internal-token-file`'s token; `None`: only loopback `Host`s are served.
    pub token: Option<Token>,
    /// False until the listeners are up, and again from the start of the drain.
    pub ready: AtomicBool,
    /// The publish bus, when `--redis-url` is set.
    pub bus: Option<Arc<Bus>>,
    /// How long a body may take to arrive once its head has (`--header-read-timeout`):
    /// a client that announces a body and stalls must not hold a connection forever.
    pub body_timeout: Duration,
}

impl InternalState {
    /// Without a bus, applies publishes on this node: `{"published":N,"woken":M}`. With
    /// one, appends them to the bus stream and answers once Redis has taken them; every
    /// node, this one included, applies them when its reader gets to them, so nothing is
    /// woken yet: `{"published":N,"woken":0,"entry":"<stream entry id>"}`.
    async fn publish(&self, batch: Vec<Publish>) -> Result<serde_json::Value, ApiError> {
        let Some(bus) = &self.bus else {
            let report = self.hub.publish(&batch, "api");
            return Ok(json!({ "published": report.published, "woken": report.woken }));
        };
        match bus.publish(&batch).await {
            Ok(entry) => Ok(json!({
                "published": batch.len(),
                "woken": 0,
                "entry": entry.to_string(),
            })),
            Err(e) => {
                log_bus_error(&e, "publish refused");
                Err(ApiError::BusUnavailable)
            }
        }
    }

    /// Revokes on this node at once, then tells the other nodes through the bus.
    async fn revoke(&self, filter: &RevokeFilter) -> Result<usize, ApiError> {
        let revoked = self.hub.revoke(filter);
        if let Some(bus) = &self.bus
            && let Err(e) = bus.revoke(filter).await
        {
            log_bus_error(&e, "revocation applied on this node only");
            return Err(ApiError::RevokedHereOnly { revoked });
        }
        Ok(revoked)
    }

    fn readiness(&self) -> Result<(), ApiError> {
        if self.hub.is_draining() {
            return Err(ApiError::NotReady("draining"));
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err(ApiError::NotReady("starting"));
        }
        if self.bus.as_ref().is_some_and(|bus| !bus.is_connected()) {
            return Err(ApiError::NotReady("the publish bus is not connected"));
        }
        Ok(())
    }
}

/// A Redis that failed a command is worth a warning (its reader logs outages too).
fn log_bus_error(e: &BusError, what: &str) {
    tracing::warn!(error = %e, "{what}");
}

/// Answers one request on the internal listener; every error becomes its JSON answer.
pub(crate) async fn handle(req: Request<Incoming>, state: &InternalState) -> Response<Body> {
    match route(req, state).await {
        Ok(res) => res,
        Err(e) => error(&e),
    }
}

async fn route(req: Request<Incoming>, state: &InternalState) -> Result<Response<Body>, ApiError> {
    super::subscribe::check_host(req.version(), req.headers())?;
    refuse_browsers(req.headers())?;
    if state.token.is_none() {
        loopback_host_only(req.headers())?;
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    // Probes answer without a token: load balancers and kubelets have none.
    match path.as_str() {
        "/healthz" => {
            return only(&method, Method::GET)
                .map(|_| json(StatusCode::OK, &br#"{"status":"ok"}"#[..]));
        }
        "/readyz" => {
            only(&method, Method::GET)?;
            state.readiness()?;
            return Ok(json(StatusCode::OK, &br#"{"status":"ready"}"#[..]));
        }
        _ => {}
    }
    authorize(&req, state)?;
    match path.as_str() {
        "/metrics" => {
            only(&method, Method::GET)?;
            let mut res = Response::new(Body::new(Bytes::from(state.hub.metrics().render())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(res)
        }
        "/v1/channels" => {
            only(&method, Method::POST)?;
            let registration = parse_register_body(&read_body(req, Json::Only, state).await?)?;
            register(state, registration)
        }
        "/v1/publish" => {
            only(&method, Method::POST)?;
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = read_body(req, Json::OrNdjson, state).await?;
            let batch =
                parse_publish_body(content_type.as_deref(), &body).map_err(ApiError::BadRequest)?;
            let answer = state.publish(batch).await?;
            debug!(%answer, "published");
            Ok(json_value(StatusCode::OK, &answer))
        }
        "/v1/revoke" => {
            only(&method, Method::POST)?;
            let body: RevokeBody = parse_json(&read_body(req, Json::Only, state).await?)?;
            let filter = body.into_filter()?;
            let revoked = state.revoke(&filter).await?;
            // Subjects and topics name users and objects: counted, not logged.
            debug!(revoked, "revoked");
            Ok(json_value(StatusCode::OK, &json!({ "revoked": revoked })))
        }
        p if p.starts_with("/v1/channels/") => {
            let id = &p["/v1/channels/".len()..];
            match method {
                Method::GET => state
                    .hub
                    .channel_info(id)
                    .map(|info| json_value(StatusCode::OK, &channel_info_json(&info)))
                    .ok_or(ApiError::ChannelNotFound),
                Method::DELETE => {
                    let deleted = state.hub.delete(id);
                    debug!(channel = %log_tag(id), deleted, "delete");
                    if deleted {
                        let mut res = json(StatusCode::NO_CONTENT, Bytes::new());
                        res.headers_mut().remove(header::CONTENT_TYPE);
                        Ok(res)
                    } else {
                        Err(ApiError::ChannelNotFound)
                    }
                }
                _ => Err(ApiError::MethodNotAllowed {
                    allow: "GET, DELETE",
                }),
            }
        }
        _ => Err(ApiError::NotFound),
    }
}

fn only(method: &Method, allowed: Method) -> Result<(), ApiError> {
    if *method == allowed {
        Ok(())
    } else if allowed == Method::GET {
        Err(ApiError::MethodNotAllowed { allow: "GET" })
    } else {
        Err(ApiError::MethodNotAllowed { allow: "POST" })
    }
}

/// Checks `Authorization: Bearer <token>` in constant time when a token is set. The scheme
/// name is case-insensitive (RFC 9110 §11.1); the token is not.
fn authorize(req: &Request<Incoming>, state: &InternalState) -> Result<(), ApiError> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| match v.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => Some(rest),
            _ => None,
        })
        .unwrap_or(b"");
    if constant_time_eq(given, token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares without an early exit, so the time taken says nothing about where the first
/// difference is (the length of the token is not a secret worth hiding).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which body types a route takes. Anything else is refused before a byte of the body is
/// read: a web page can send `text/plain` or a form without asking the browser's CORS
/// preflight, but not JSON.
#[derive(Clone, Copy)]
enum Json {
    Only,
    OrNdjson,
}

/// Reads a body of an accepted type, at most [`MAX_BODY`] bytes (an announced larger one is
/// refused at once) and within `state.body_timeout`.
async fn read_body(
    req: Request<Incoming>,
    accepts: Json,
    state: &InternalState,
) -> Result<Bytes, ApiError> {
    let sent = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type);
    let accepted = match sent {
        Some(t) if t.eq_ignore_ascii_case("application/json") => true,
        Some(t) if t.eq_ignore_ascii_case(NDJSON) => matches!(accepts, Json::OrNdjson),
        _ => false,
    };
    if !accepted {
        return Err(ApiError::UnsupportedContentType);
    }
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::PayloadTooLarge { limit: MAX_BODY });
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(state.body_timeout, collect).await {
        Err(_) => Err(ApiError::BodyTimeout(state.body_timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge { limit: MAX_BODY })
        }
        Ok(Err(e)) => Err(ApiError::BadRequest(format!(
            "could not read the body: {e}"
        ))),
    }
}

/// Refuses what only a browser sends: `Origin` (every cross-origin `POST` carries it) and a
/// `Sec-Fetch-Site` other than `none` (typed by the user) or `same-origin`. The internal
/// listener serves no page, so no legitimate caller is a web page.
fn refuse_browsers(headers: &hyper::HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::ORIGIN) {
        return Err(ApiError::CrossSite("it carries Origin"));
    }
    for site in headers.get_all("sec-fetch-site") {
        let site = site.as_bytes();
        if !site.eq_ignore_ascii_case(b"none") && !site.eq_ignore_ascii_case(b"same-origin") {
            return Err(ApiError::CrossSite("Sec-Fetch-Site names another site"));
        }
    }
    Ok(())
}

/// Without a token, a page on a rebound DNS name (`rebind.evil.example` resolving to
/// 127.0.0.1) would otherwise reach the listener; its `Host` still names the page's site.
/// HTTP/1.0 requests without `Host` come from no browser and pass.
fn loopback_host_only(headers: &hyper::HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::HOST) {
        None => Ok(()),
        Some(host) if is_loopback_host(host.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::HostNotAllowed),
    }
}

/// `localhost`, `*.localhost` (RFC 6761), an IPv4 address in 127.0.0.0/8 or `[::1]`, each
/// with an optional port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    // `name` or `name:port`; an IPv6 address is bracketed, so its colons are not a port's.
    let (name, port) = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => (&host[..i], Some(&host[i + 1..])),
        _ => (host, None),
    };
    if port.is_some_and(|p| !((1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())))
    {
        return false;
    }
    if let Some(ip) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return ip
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn register(state: &InternalState, registration: Registration) -> Result<Response<Body>, ApiError> {
    let topic_count = registration.topics.len();
    let reg = match state.hub.register(registration) {
        Ok(reg) => reg,
        Err(e @ crate::hub::RegisterError::TooManyChannels { retry_after, .. }) => {
            let mut res = error(&ApiError::TooManyChannels(e.to_string()));
            res.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
            return Ok(res);
        }
        Err(e) => return Err(ApiError::BadRequest(e.to_string())),
    };
    // A channel id is a credential: logs carry its short hash only.
    debug!(channel = %reg.id.short(), topics = topic_count, "channel registered");
    let stream_type = reg.stream_type.as_deref().unwrap_or("all");
    let url = format!(
        "{}/subscribe?channel={}&stream_type={}",
        state.public_url,
        reg.id,
        form_urlencoded::byte_serialize(stream_type.as_bytes()).collect::<String>()
    );
    // Box's shape, to the letter: `ttl` (whole minutes, rounded up) and `max_retries` are
    // strings, `retry_timeout` a number of seconds. Some SDKs reject anything else.
    let body = json!({
        "chunk_size": 1,
        "entries": [{
            "type": "realtime_server",
            "url": url,
            "ttl": reg.limits.ttl.as_secs().div_ceil(60).to_string(),
            "max_retries": reg.limits.max_retries.to_string(),
            "retry_timeout": reg.limits.retry_timeout.as_secs_f64().ceil() as u64,
        }],
        "channel": reg.id.to_string(),
    });
    Ok(json_value(StatusCode::CREATED, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST:8081",
            "localhost.",
            "api.localhost:1",
            "127.0.0.1",
            "127.1.2.3:8081",
            "[::1]",
            "[::1]:8081",
        ] {
            assert!(is_loopback_host(host.as_bytes()), "{host}");
        }
        for host in [
            "rebind.evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8081",
            "[::2]:8081",
            "[::1]x",
            "localhost:",
            "localhost:808100",
            "127.0.0.1:80:80",
            "",
        ] {
            assert!(!is_loopback_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
