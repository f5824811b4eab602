//! Errors that become HTTP answers. Every one maps to a status and a stable `code` in one
//! place, and is written as `{"code":"…","message":"…"}`.

use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such route")]
    NotFound,
    #[error("no such channel")]
    ChannelNotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("too many polls parked on this channel")]
    TooManyPolls,
    #[error("this node is at its parked-poll limit; retry later or elsewhere")]
    OverCapacity,
    /// Past `--max-channels` or `--max-topic-bytes`; answered with `Retry-After`.
    /// The `Retry-After` is set where it is known (`http::internal::register`).
    #[error("{0}")]
    TooManyChannels(String),
    #[error("the publish bus is unavailable; nothing was published")]
    BusUnavailable,
    /// A revocation is applied where it was posted before it goes on the bus; this says the
    /// second half failed, so the main API retries (revoking again is harmless).
    #[error(
        "revoked {revoked} channel(s) on this node, but the publish bus is unavailable: the other nodes were not told; retry"
    )]
    RevokedHereOnly { revoked: usize },
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
    #[error("a body must be sent as application/json (or application/x-ndjson to /v1/publish)")]
    UnsupportedContentType,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
}

impl ApiError {
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

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "code": self.code(), "message": self.to_string() }))
            .expect("a JSON object of two strings serialises")
    }
}
