//! HTTP handlers on hyper's `http1` connections (`conn.rs`): the public listener
//! (`subscribe.rs`, one route, and `fast/`, its buffer-less path for parked polls) and the
//! internal listener (`internal.rs`). Both answer JSON only, through the helpers here, so
//! every answer carries the same headers.

pub mod conn;
pub mod fast;
pub mod internal;
pub mod subscribe;
pub mod watched;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::error::ApiError;

/// The body of every hyper answer: whole, never streamed.
pub type Body = Full<Bytes>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A JSON answer with `Cache-Control: no-store`.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    res
}

/// A serialisable value as a JSON answer.
pub fn json_value(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    json(
        status,
        serde_json::to_vec(value).expect("our answer types serialise"),
    )
}

/// The one mapping from an error to its answer.
pub fn error(err: &ApiError) -> Response<Body> {
    let mut res = json(err.status(), err.body());
    let h = res.headers_mut();
    match err {
        ApiError::MethodNotAllowed { allow } => {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        ApiError::OverCapacity | ApiError::BusUnavailable | ApiError::RevokedHereOnly { .. } => {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        ApiError::Unauthorized => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The rest of the body is not read: the connection cannot carry another request.
        ApiError::PayloadTooLarge { .. } | ApiError::BodyTimeout(_) => {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    res
}
