//! Errors that become HTTP answers. Every one maps to a status and a stable `code` in one
//! place, and is written as `{"code":"…","message":"…"}`.

use hyper::StatusCode;

/// An error answer; [`ApiError::status`] and [`ApiError::code`] map it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input; the message says what was wrong (400 `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// No route at this path (404 `not_found`).
    #[error("no such route")]
    NotFound,
    /// Unknown, expired or revoked channel id (404 `not_found`).
    #[error("no such channel")]
    ChannelNotFound,
    /// The route exists, not for this method (405); `allow` is its `Allow` header.
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The methods the route takes.
        allow: &'static str,
    },
    /// `--internal-token-file` is set and the bearer token is missing or wrong (401).
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// A body past [`MAX_BODY`](crate::http::internal::MAX_BODY) bytes (413).
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// `--max-polls-per-channel` polls are already parked on the channel (429).
    #[error("too many polls parked on this channel")]
    TooManyPolls,
    /// `--max-parked` polls are already parked on the node (503).
    #[error("this node is at its parked-poll limit; retry later or elsewhere")]
    OverCapacity,
    /// Past `--max-channels` or `--max-topic-bytes`; answered with `Retry-After`.
    /// The `Retry-After` is set where it is known (`http::internal::register`).
    #[error("{0}")]
    TooManyChannels(String),
    /// A publish could not go on the bus, so no node applied it (503 `bus_unavailable`).
    #[error("the publish bus is unavailable; nothing was published")]
    BusUnavailable,
    /// A revocation is applied where it was posted before it goes on the bus; this says the
    /// second half failed, so the main API retries (revoking again is harmless).
    #[error(
        "revoked {revoked} channel(s) on this node, but the publish bus is unavailable: the other nodes were not told; retry"
    )]
    RevokedHereOnly {
        /// Channels removed on this node.
        revoked: usize,
    },
    /// `/readyz` while starting, draining or without the bus; says which (503).
    #[error("not ready: {0}")]
    NotReady(&'static str),
    /// A browser sent it (`Origin`, or `Sec-Fetch-Site` naming another site): web pages
    /// must not reach the internal listener.
    #[error("the internal listener does not take requests from web pages ({0})")]
    CrossSite(&'static str),
    /// Without a token, only loopback names reach the internal listener (DNS rebinding).
    #[error(
        "without --internal-token-file the internal listener answers only a loopback Host (localhost, 127.0.0.1, [::1])"
    )]
    HostNotAllowed,
    /// A body not sent as JSON (NDJSON for `/v1/publish`): a web page cannot send
    /// those without a CORS preflight (403).
    #[error("a body must be sent as application/json (or application/x-ndjson to /v1/publish)")]
    UnsupportedContentType,
    /// A body that did not arrive within `--header-read-timeout` of its head (408).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
}

impl ApiError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound | ApiError::ChannelNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyPolls => StatusCode::TOO_MANY_REQUESTS,
            ApiError::CrossSite(_)
            | ApiError::HostNotAllowed
            | ApiError::UnsupportedContentType => StatusCode::FORBIDDEN,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::OverCapacity
            | ApiError::TooManyChannels(_)
            | ApiError::BusUnavailable
            | ApiError::RevokedHereOnly { .. }
            | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound | ApiError::ChannelNotFound => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::TooManyPolls => "too_many_polls",
            ApiError::OverCapacity => "over_capacity",
            ApiError::TooManyChannels(_) => "too_many_channels",
            ApiError::BusUnavailable | ApiError::RevokedHereOnly { .. } => "bus_unavailable",
            ApiError::NotReady(_) => "not_ready",
            ApiError::CrossSite(_) => "cross_site",
            ApiError::HostNotAllowed => "host_not_allowed",
            ApiError::UnsupportedContentType => "unsupported_content_type",
            ApiError::BodyTimeout(_) => "body_timeout",
        }
    }

    /// The answer's JSON body, `{"code":…,"message":…}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "code": self.code(), "message": self.to_string() }))
            .expect("a JSON object of two strings serialises")
    }
}
