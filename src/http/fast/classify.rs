//! The fast path's head classifier: is this request head a plain `GET /subscribe` the fast
//! path serves, a head still incomplete, or anything else (for hyper)? Pure: bytes in, a
//! decision out, which is what the fuzz targets drive.

use hyper::http::uri::PathAndQuery;

use crate::http::subscribe::{Cors, SubscribeQuery, parse_query};

/// Headers a fast-path request may carry: as many as hyper takes (past it, both answer 431).
const MAX_HEADERS: usize = 100;

/// A fast-path request, decoded from its head.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest {
    /// The decoded `/subscribe` query.
    pub query: SubscribeQuery,
    /// The client asked for `Connection: close`.
    pub close: bool,
    /// With `--cors-origin`, the request's `Origin` when it is allowed: echoed in the answer.
    pub allowed_origin: Option<Box<[u8]>>,
}

/// What a buffer holding the start of a connection's next request is.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// A complete head that the fast path serves.
    Fast {
        /// The head's length in bytes, up to and including its blank line.
        len: usize,
        /// What the head asks.
        request: FastRequest,
    },
    /// Not incomplete, but not for the fast path: hand to hyper.
    Hyper,
    /// The head is not complete yet.
    Partial,
}

/// Decides what a request head is. Pure, so it can be fuzzed and compared with hyper.
/// Every request a browser or an SDK sends is served here; what is left to hyper is what
/// hyper answers with an error or a rarity (another method or version, a body, an upgrade).
pub fn classify(buf: &[u8], cors: &Cors) -> Classified {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Classified::Partial,
        Err(_) => return Classified::Hyper,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Classified::Hyper;
    }
    let Some(target) = req.path else {
        return Classified::Hyper;
    };
    let mut close = false;
    let mut hosts = 0;
    let mut origin = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Classified::Hyper;
            }
        } else if name.eq_ignore_ascii_case("origin") {
            if origin.is_some() {
                return Classified::Hyper;
            }
            origin = Some(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Classified::Hyper;
        }
    }
    // hyper answers `400` for no or several `Host`s, in the same words (`check_host`).
    if hosts != 1 {
        return Classified::Hyper;
    }
    let parsed;
    let (path, query) = if target.bytes().all(plainly_valid) {
        match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        }
    } else {
        // Anything unusual (a fragment, bytes outside RFC 3986) is read by the very parser
        // hyper reads targets with, so both paths see the same path and query; what it
        // refuses, hyper refuses.
        match PathAndQuery::try_from(target) {
            Ok(p) => {
                parsed = p;
                (parsed.path(), parsed.query())
            }
            Err(_) => return Classified::Hyper,
        }
    };
    if path != "/subscribe" {
        return Classified::Hyper;
    }
    match parse_query(query) {
        Ok(query) => Classified::Fast {
            len,
            request: FastRequest {
                query,
                close,
                allowed_origin: origin
                    .filter(|o| cors.allows(o))
                    .map(|o| o.to_vec().into_boxed_slice()),
            },
        },
        // hyper answers the 400, with the same words.
        Err(_) => Classified::Hyper,
    }
}

/// Bytes that `http`'s URI parser takes as they are in a path and in a query: letters,
/// digits and RFC 3986's unreserved, sub-delims, `:`, `@`, `/`, `?` and `%`. A target made
/// only of these is split at its first `?` exactly as that parser splits it (a unit test
/// holds this against the parser); any other byte, `#` among them, goes through the parser.
fn plainly_valid(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(head: &str) -> Classified {
        classify(head.as_bytes(), &Cors::default())
    }

    fn fast_query(head: &str) -> SubscribeQuery {
        match fast(head) {
            Classified::Fast { request, .. } => request.query,
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn plain_subscribe_polls_are_fast() {
        let head = "GET /subscribe?channel=abc&stream_position=5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        match fast(head) {
            Classified::Fast { len, request } => {
                assert_eq!(len, head.len());
                assert_eq!(request.query.channel, "abc");
                assert_eq!(request.query.stream_position, Some(5));
                assert!(!request.close);
            }
            other => panic!("{other:?}"),
        }
        let close = "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n";
        assert!(matches!(
            fast(close),
            Classified::Fast {
                request: FastRequest { close: true, .. },
                ..
            }
        ));
    }

    #[test]
    fn everything_unusual_goes_to_hyper() {
        for head in [
            "POST /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET /subscribex?channel=a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /other HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a&stream_position=-1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            // RFC 9112 §3.2: exactly one Host (hyper answers the 400).
            "GET /subscribe?channel=a HTTP/1.1\r\n\r\n",
            "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            // Bytes the URI parser refuses: hyper answers them.
            "GET /subscribe?channel=a\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(fast(head), Classified::Hyper, "{head:?}");
        }
        let too_many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            fast(&format!(
                "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n{too_many}\r\n"
            )),
            Classified::Hyper
        );
    }

    #[test]
    fn what_browsers_and_sdks_send_stays_fast() {
        // As many headers as hyper takes.
        let many: String = (0..99).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!("GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert!(matches!(fast(&head), Classified::Fast { .. }));
        // A browser's Origin, with and without --cors-origin.
        let cors = "GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\nOrigin: https://app\r\n\r\n";
        let allowed = |cors_config: Cors| match classify(cors.as_bytes(), &cors_config) {
            Classified::Fast { request, .. } => request.allowed_origin,
            other => panic!("{other:?}"),
        };
        assert_eq!(allowed(Cors::default()), None);
        assert_eq!(
            allowed(Cors::new(vec!["https://app".into()])).as_deref(),
            Some(&b"https://app"[..])
        );
        assert_eq!(allowed(Cors::new(vec!["https://other".into()])), None);
    }

    #[test]
    fn a_fragment_is_not_part_of_the_query() {
        let q = fast_query("GET /subscribe?channel=abc#f HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(q.channel, "abc");
        let q = fast_query(
            "GET /subscribe?channel=abc&dont_block=true#x&dont_block=false HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(q.dont_block);
        assert_eq!(
            fast("GET /subscribe#?channel=abc HTTP/1.1\r\nHost: x\r\n\r\n"),
            Classified::Hyper,
            "no query before the fragment: hyper's 400"
        );
    }

    /// `plainly_valid` promises that a target made of those bytes is split by hyper's URI
    /// parser at its first `?`, with nothing dropped: held here against that parser.
    #[test]
    fn plainly_valid_bytes_are_taken_as_they_are_by_the_uri_parser() {
        for b in (0u8..=255).filter(|&b| plainly_valid(b)) {
            let c = b as char;
            let target = format!("/sub{c}scribe?chan{c}nel=a{c}b?c");
            let parsed = PathAndQuery::try_from(target.as_str())
                .unwrap_or_else(|e| panic!("{c:?} refused: {e}"));
            let (path, query) = target.split_once('?').unwrap();
            assert_eq!(
                (parsed.path(), parsed.query()),
                (path, Some(query)),
                "{c:?}"
            );
        }
    }

    #[test]
    fn an_incomplete_head_is_partial() {
        assert_eq!(
            fast("GET /subscribe?channel=a HTTP/1.1\r\nHost: x\r\n"),
            Classified::Partial
        );
        assert_eq!(fast("GE"), Classified::Partial);
    }
}
