//! The public listener's one route, `GET /subscribe` (SPEC §2), and CORS for it.
//! The `Authorization` header clients send along is never read or logged.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::debug;

use super::watched::ClientWatch;
use super::{Body, error, json};
use crate::error::ApiError;
use crate::hub::{Answer, Hub, PollRequest, PollStart};
use crate::id::log_tag;
use crate::metrics::{ParkedOn, outcome};

/// Longest query string accepted (`400 bad_request` past it).
pub const MAX_QUERY_LEN: usize = 4096;

/// What the public route shares.
pub struct PublicState {
    /// The node's hub.
    pub hub: Arc<Hub>,
    /// `--cors-origin`: which browser origins may long-poll.
    pub cors: Cors,
}

/// The answer bodies, serialised once.
pub fn answer_body(answer: Answer) -> Bytes {
    Bytes::from_static(answer.body())
}

/// A decoded `/subscribe` query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeQuery {
    /// `channel=`: the channel id as the client sent it (not yet parsed).
    pub channel: String,
    /// `stream_position=`: the newest position the client has seen.
    pub stream_position: Option<u64>,
    /// `dont_block=true`: answer at once instead of parking.
    pub dont_block: bool,
}

/// Decodes a `/subscribe` query string. Unknown parameters are ignored (SDKs add their
/// own); a parameter given twice with different values is an error, since we could only
/// guess which one the client meant.
pub fn parse_query(query: Option<&str>) -> Result<SubscribeQuery, String> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_LEN {
        return Err(format!("query longer than {MAX_QUERY_LEN} bytes"));
    }
    let mut channel: Option<String> = None;
    let mut position: Option<String> = None;
    let mut dont_block: Option<String> = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "channel" => &mut channel,
            "stream_position" => &mut position,
            "dont_block" => &mut dont_block,
            _ => continue,
        };
        match slot {
            Some(old) if *old != value => {
                return Err(format!("{key} is given twice with different values"));
            }
            Some(_) => {}
            None => *slot = Some(value.into_owned()),
        }
    }
    let channel = match channel {
        Some(c) if !c.is_empty() => c,
        _ => return Err("the channel parameter is missing or empty".into()),
    };
    let stream_position = match position.as_deref() {
        None | Some("") | Some("now") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(
            p.parse::<u64>()
                .map_err(|_| "stream_position is larger than 18446744073709551615".to_owned())?,
        ),
        Some(_) => return Err("stream_position must be a non-negative integer or now".into()),
    };
    let dont_block =
        matches!(dont_block.as_deref(), Some(v) if v.eq_ignore_ascii_case("true") || v == "1");
    Ok(SubscribeQuery {
        channel,
        stream_position,
        dont_block,
    })
}

/// The answer to a poll, as both paths write it.
pub fn answer_response(answer: Answer) -> Response<Body> {
    json(StatusCode::OK, answer_body(answer))
}

/// The public listener's hyper service for one connection; `client` watches that
/// connection's client while a poll is parked.
pub fn service(
    state: Arc<PublicState>,
    client: ClientWatch,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = ClientGone,
    Future: Send,
> + Send {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let (state, client) = (state.clone(), client.clone());
        async move { handle(req, &state, &client).await }
    })
}

/// The client left while its poll was parked: there is no one to answer, and hyper closes
/// the connection when a service fails.
#[derive(Debug, thiserror::Error)]
#[error("the client left while its poll was parked")]
pub struct ClientGone;

/// Answers one request; `Err` when the client left before its answer.
pub async fn handle(
    req: Request<Incoming>,
    state: &PublicState,
    client: &ClientWatch,
) -> Result<Response<Body>, ClientGone> {
    state
        .hub
        .metrics()
        .public_requests_total
        .with_label_values(&["hyper"])
        .inc();
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut res = route(req, state, client).await?;
    state.cors.decorate(origin.as_ref(), res.headers_mut());
    if state.hub.is_draining() {
        // The server also asks hyper to close every connection when the drain starts, but
        // an answer can be written before its connection sees that; this header makes
        // hyper close after *this* answer, so the client reconnects elsewhere.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(res)
}

async fn route(
    req: Request<Incoming>,
    state: &PublicState,
    client: &ClientWatch,
) -> Result<Response<Body>, ClientGone> {
    if let Err(e) = check_host(req.version(), req.headers()) {
        state.hub.metrics().count_outcome(outcome::BAD_REQUEST);
        return Ok(error(&e));
    }
    if req.uri().path() != "/subscribe" {
        return Ok(error(&ApiError::NotFound));
    }
    match *req.method() {
        Method::GET => {}
        Method::OPTIONS if state.cors.enabled() => {
            return Ok(state.cors.preflight(req.headers()));
        }
        _ => {
            let allow = if state.cors.enabled() {
                "GET, OPTIONS"
            } else {
                "GET"
            };
            return Ok(error(&ApiError::MethodNotAllowed { allow }));
        }
    }
    let query = match parse_query(req.uri().query()) {
        Ok(q) => q,
        Err(message) => {
            state.hub.metrics().count_outcome(outcome::BAD_REQUEST);
            return Ok(error(&ApiError::BadRequest(message)));
        }
    };
    // The request head is all we need: let go of it before parking.
    drop(req);
    let poll = PollRequest {
        stream_position: query.stream_position,
        dont_block: query.dont_block,
    };
    // The client's leaving is looked at first, for the reason given at the fast path's
    // `watch_client`: an answer taken when the client has already gone would be lost;
    // dropping the poll instead keeps its change pending.
    let answer = match state.hub.poll(&query.channel, poll) {
        PollStart::Answer(a) => a,
        PollStart::Hold(held) => tokio::select! {
            biased;
            _ = client.gone() => return Err(ClientGone),
            a = held.wait() => a,
        },
        PollStart::Park(parked) => {
            state.hub.metrics().count_parked(ParkedOn::Hyper);
            tokio::select! {
                biased;
                _ = client.gone() => return Err(ClientGone),
                a = parked.wait() => a,
            }
        }
        PollStart::TooManyPolls => return Ok(error(&ApiError::TooManyPolls)),
        PollStart::OverCapacity => return Ok(error(&ApiError::OverCapacity)),
        // An upgrade in place is handing the node's polls over, and hyper's connections do
        // not move: `reconnect`, as in a drain.
        PollStart::Moving => {
            state.hub.metrics().count_answer(Answer::Reconnect);
            Answer::Reconnect
        }
    };
    // The id is the credential: its short hash only (evaluated only when debug is on).
    debug!(channel = %log_tag(&query.channel), answer = answer.as_str(), "poll answered");
    Ok(answer_response(answer))
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host` header (HTTP/1.0 needs
/// none). Both listeners and both paths of the public one refuse it the same way.
pub fn check_host(version: hyper::Version, headers: &HeaderMap) -> Result<(), ApiError> {
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && version == hyper::Version::HTTP_11) {
        return Err(ApiError::BadRequest(HOST_RULE.into()));
    }
    Ok(())
}

/// What a request with no or several `Host` headers is told.
pub const HOST_RULE: &str = "a request must carry exactly one Host header";

/// `--cors-origin`: which browser origins may long-poll.
#[derive(Clone, Debug, Default)]
pub struct Cors {
    origins: Vec<String>,
}

impl Cors {
    /// The allowed origins (`--cors-origin`); `*` allows any.
    pub fn new(origins: Vec<String>) -> Cors {
        Cors { origins }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.origins.is_empty()
    }

    /// Whether `origin` (an `Origin` header's bytes) may long-poll.
    pub(crate) fn allows(&self, origin: &[u8]) -> bool {
        self.origins
            .iter()
            .any(|o| o == "*" || o.as_bytes() == origin)
    }

    /// Adds the CORS headers to an answer for an allowed origin.
    fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if !self.enabled() {
            return;
        }
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = origin.filter(|o| self.allows(o.as_bytes())) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            // Not a CORS-safelisted response header: without this a page cannot read
            // how long to wait after `503 over_capacity`.
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Retry-After"),
            );
        }
    }

    fn preflight(&self, headers: &HeaderMap) -> Response<Body> {
        let Some(origin) = headers
            .get(header::ORIGIN)
            .filter(|o| self.allows(o.as_bytes()))
        else {
            let mut res = json(
                StatusCode::FORBIDDEN,
                &br#"{"code":"origin_not_allowed","message":"this origin may not long-poll here"}"#
                    [..],
            );
            res.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Origin"));
            return res;
        };
        let mut res = json(StatusCode::NO_CONTENT, Bytes::new());
        let h = res.headers_mut();
        h.remove(header::CONTENT_TYPE);
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, OPTIONS"),
        );
        let asked = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static("Authorization, Content-Type")),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_in_any_order_with_extras_ignored() {
        let q = parse_query(Some(
            "x=1&stream_position=42&channel=abc&dont_block=true&stream_type=all",
        ))
        .unwrap();
        assert_eq!(
            q,
            SubscribeQuery {
                channel: "abc".into(),
                stream_position: Some(42),
                dont_block: true
            }
        );
        let q = parse_query(Some("channel=abc&stream_position=now")).unwrap();
        assert_eq!(q.stream_position, None);
        assert!(!q.dont_block);
    }

    #[test]
    fn bad_queries_are_refused_with_a_reason() {
        for bad in [
            None,
            Some(""),
            Some("channel="),
            Some("channel=a&channel=b"),
            Some("channel=a&stream_position=-1"),
            Some("channel=a&stream_position=1.5"),
            Some("channel=a&stream_position=99999999999999999999"),
            Some("channel=a&stream_position=later"),
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?}");
        }
        let long = format!("channel={}", "a".repeat(MAX_QUERY_LEN));
        assert!(parse_query(Some(&long)).unwrap_err().contains("longer"));
        assert!(
            parse_query(Some("channel=a&channel=a")).is_ok(),
            "same value twice is fine"
        );
    }
}
