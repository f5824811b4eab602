//! What each fuzz target checks, shared with the regression test that replays the committed
//! corpus (`tests/it/fuzz_corpus.rs` includes this file by path). Each function takes any
//! bytes; it panics only when nudge breaks a property, never on input that is merely bad.

use std::sync::Arc;
use std::time::Duration;

use nudge::http::subscribe::{MAX_QUERY_LEN, parse_query};
use nudge::hub::{Hub, HubConfig, Limits, MAX_TOPICS_PER_CHANNEL, Publish};
use nudge::id::ChannelId;
use nudge::metrics::Metrics;
use nudge::wire::{parse_publish_body, parse_register_body};

fn hub() -> Arc<Hub> {
    Hub::new(
        HubConfig {
            limits: Limits {
                ttl: Duration::from_secs(600),
                retry_timeout: Duration::from_secs(60),
                max_retries: 10,
            },
            max_polls_per_channel: 4,
            max_parked: 1000,
        },
        Arc::new(Metrics::new(prometheus::Registry::new(), false)),
    )
}

/// `GET /subscribe?…`: the query parser, then the channel id parser on what it found.
pub fn subscribe_query(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    match parse_query(Some(query)) {
        Ok(q) => {
            assert!(query.len() <= MAX_QUERY_LEN);
            assert!(!q.channel.is_empty());
            // An id that parses prints back as itself (22 characters of base64url).
            if let Some(id) = ChannelId::parse(&q.channel) {
                assert_eq!(id.to_string(), q.channel);
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}

/// `POST /v1/publish`: the first byte picks the content type, the rest is the body. A batch
/// that parses survives a round trip through JSON and is applied to a hub.
pub fn publish_body(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 4 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("application/x-ndjson"),
        _ => Some("Application/X-NDJSON; charset=utf-8"),
    };
    let Ok(batch) = parse_publish_body(content_type, body) else {
        return;
    };
    for p in &batch {
        assert!(!p.topic.is_empty() && p.topic.len() <= 256);
        assert!(p.topic.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    let json = nudge::wire::encode_publishes(&batch);
    let again: Vec<Publish> = parse_publish_body(None, &json).expect("a serialised batch parses");
    assert_eq!(again, batch);
    let hub = hub();
    let report = hub.publish(&batch, "fuzz");
    assert_eq!(report.published, batch.len());
    assert_eq!(report.woken, 0);
}

/// `POST /v1/channels`: the body parser, then registration on a hub; a registered channel
/// is then deleted, and nothing may be left behind.
pub fn register_body(data: &[u8]) {
    let Ok(registration) = parse_register_body(data) else {
        return;
    };
    let hub = hub();
    let asked_topics = registration.topics.clone();
    let Ok(registered) = hub.register(registration) else {
        return;
    };
    let limits = registered.limits;
    assert!(limits.ttl >= Duration::from_secs(1) && limits.ttl <= Duration::from_secs(600));
    assert!(limits.retry_timeout >= Duration::from_secs(1));
    assert!(limits.retry_timeout <= Duration::from_secs(60));
    assert!(limits.max_retries <= 10);
    let id = registered.id.to_string();
    let info = hub
        .channel_info(&id)
        .expect("a registered channel is there");
    assert!(!info.topics.is_empty() && info.topics.len() <= MAX_TOPICS_PER_CHANNEL);
    assert!(info.topics.iter().all(|t| asked_topics.contains(t)));
    assert!(hub.delete(&id));
    let counts = hub.counts();
    assert_eq!((counts.channels, counts.topics, counts.parked), (0, 0, 0));
}

/// The public listener's own request-head reader (`src/http/fast/classify.rs`): the first byte says
/// whether CORS is on (for every origin), the rest is what arrived on the socket. A head it
/// serves itself is served the same from its own bytes alone, with the query read as the
/// hyper path reads it, and CORS changes only which origin is echoed, never the path.
pub fn fast_classify(data: &[u8]) {
    use nudge::http::fast::{Classified, classify};
    use nudge::http::subscribe::Cors;
    let Some((&flags, buf)) = data.split_first() else {
        return;
    };
    let cors = if flags & 1 == 1 {
        Cors::new(vec!["*".into()])
    } else {
        Cors::default()
    };
    match classify(buf, &cors) {
        Classified::Fast { len, request } => {
            assert!(len <= buf.len());
            assert_eq!(
                buf[..len].last(),
                Some(&b'\n'),
                "a head ends with its blank line"
            );
            assert_eq!(
                classify(&buf[..len], &cors),
                Classified::Fast {
                    len,
                    request: nudge::http::fast::FastRequest {
                        query: request.query.clone(),
                        close: request.close,
                        allowed_origin: request.allowed_origin.clone(),
                    },
                }
            );
            assert!(!request.query.channel.is_empty());
            if flags & 1 == 0 {
                assert_eq!(request.allowed_origin, None);
            }
            assert!(matches!(
                classify(buf, &Cors::new(vec!["*".into()])),
                Classified::Fast { .. }
            ));
        }
        Classified::Hyper => assert_eq!(classify(buf, &Cors::default()), Classified::Hyper),
        Classified::Partial => {}
    }
}
