//! The wire formats, transport-neutral: the bytes a main API sends (publish, registration
//! and revocation bodies, durations) turned into hub requests. The HTTP handlers, the bus and
//! the fuzz targets all read them here, so every way in accepts exactly the same shapes.
//! [`snapshot`] is the file format of the hub's state (`--state-dir`, the upgrade).

pub mod snapshot;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::hub::{
    ChannelInfo, MAX_STREAM_TYPE_LEN, MAX_TOPIC_LEN, Publish, Registration, RevokeFilter,
    is_visible_ascii,
};

/// A duration in humantime (`45s`, `10m`, `1h 30m`) or plain integer seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string());
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (use e.g. 45s, 10m, or whole seconds)"))
}

/// Decodes a JSON body; any error is a `400 bad_request` that quotes serde's message.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// A publish as the API documents it: a JSON object, and nothing else. serde reads a struct
/// from a sequence too (`["user:42",7]`); this accepts a map only.
struct PublishObject(Publish);

/// A publish as the API and the bus write it; the hub's [`Publish`] knows nothing of JSON.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PublishFields {
    topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream_type: Option<String>,
}

impl<'de> Deserialize<'de> for PublishObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Publish;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a publish object {"topic":…}"#)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Publish, A::Error> {
                let f =
                    PublishFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Publish {
                    topic: f.topic,
                    position: f.position,
                    stream_type: f.stream_type,
                })
            }
        }
        d.deserialize_map(Object).map(PublishObject)
    }
}

/// A batch of publishes as a JSON array, which [`parse_publish_body`] reads back.
pub fn encode_publishes(batch: &[Publish]) -> Vec<u8> {
    let fields: Vec<PublishFields> = batch
        .iter()
        .map(|p| PublishFields {
            topic: p.topic.clone(),
            position: p.position,
            stream_type: p.stream_type.clone(),
        })
        .collect();
    serde_json::to_vec(&fields).expect("publishes serialise")
}

/// What `GET /v1/channels/{id}` answers.
pub fn channel_info_json(info: &ChannelInfo) -> serde_json::Value {
    serde_json::json!({
        "channel": info.channel,
        "topics": info.topics,
        "subject": info.subject,
        "stream_type": info.stream_type,
        "ttl_seconds": info.ttl_seconds,
        "retry_timeout_seconds": info.retry_timeout_seconds,
        "max_retries": info.max_retries,
        "retries_used": info.retries_used,
        "parked_polls": info.parked_polls,
        "pending": info.pending,
        "expires_in_seconds": info.expires_in_seconds,
    })
}

/// The media type that says a publish body is NDJSON.
pub const NDJSON: &str = "application/x-ndjson";

/// The media type of a `Content-Type` value, without its parameters (`; charset=utf-8`);
/// compare it ignoring case.
pub fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Parses a publish body: one JSON object, a JSON array of them, or NDJSON (with
/// `Content-Type: application/x-ndjson`). All or nothing: one bad entry refuses the batch.
/// The bus carries the same payloads.
pub fn parse_publish_body(content_type: Option<&str>, body: &[u8]) -> Result<Vec<Publish>, String> {
    let ndjson = content_type.is_some_and(|c| media_type(c).eq_ignore_ascii_case(NDJSON));
    let batch: Vec<Publish> = if ndjson {
        let mut batch = Vec::new();
        for (n, line) in body.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            batch.push(
                serde_json::from_slice::<PublishObject>(line)
                    .map_err(|e| format!("NDJSON line {}: {e}", n + 1))?
                    .0,
            );
        }
        batch
    } else {
        // Told apart by the first byte rather than by an untagged enum, which buffers the
        // whole body and fails on one shape before trying the other: on the bus, at
        // 300,000 entries a second, that was a twentieth of a node's CPU.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        let parsed = if first == Some(&b'[') {
            serde_json::from_slice::<Vec<PublishObject>>(body)
                .map(|v| v.into_iter().map(|p| p.0).collect())
        } else {
            serde_json::from_slice::<PublishObject>(body).map(|p| vec![p.0])
        };
        parsed.map_err(|e| {
            format!("a publish body is {{\"topic\":…}}, an array of them, or NDJSON: {e}")
        })?
    };
    for p in &batch {
        if !is_visible_ascii(&p.topic, MAX_TOPIC_LEN) {
            return Err(format!(
                "topic {:?} is not 1 to {MAX_TOPIC_LEN} bytes of visible ASCII",
                p.topic.chars().take(64).collect::<String>()
            ));
        }
        if p.stream_type
            .as_ref()
            .is_some_and(|t| !is_visible_ascii(t, MAX_STREAM_TYPE_LEN))
        {
            return Err(format!(
                "stream_type must be 1 to {MAX_STREAM_TYPE_LEN} bytes of visible ASCII"
            ));
        }
    }
    Ok(batch)
}

/// A duration in a body: integer seconds or a humantime string.
#[derive(Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(u64),
    Text(String),
}

impl DurationField {
    fn to_duration(&self, name: &str) -> Result<Duration, ApiError> {
        match self {
            DurationField::Seconds(s) => Ok(Duration::from_secs(*s)),
            DurationField::Text(t) => {
                parse_duration(t).map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
            }
        }
    }
}

/// `max_retries` as a number or, as Box writes it, a string of digits.
#[derive(Deserialize)]
#[serde(untagged)]
enum CountField {
    Number(u32),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    topics: Vec<String>,
    subject: Option<String>,
    stream_type: Option<String>,
    ttl: Option<DurationField>,
    retry_timeout: Option<DurationField>,
    max_retries: Option<CountField>,
}

/// Decodes a `POST /v1/channels` body into a [`Registration`];
/// [`Hub::register`](crate::hub::Hub::register) then validates topics, subject and stream
/// type. Public for the fuzz targets.
pub fn parse_register_body(body: &[u8]) -> Result<Registration, ApiError> {
    let body: RegisterBody = parse_json(body)?;
    let max_retries = match body.max_retries {
        None => None,
        Some(CountField::Number(n)) => Some(n),
        // Box writes it as a string of digits; "+5" or " 5" is not one.
        Some(CountField::Text(t)) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            Some(t.parse::<u32>().map_err(|_| {
                ApiError::BadRequest("max_retries must be a non-negative integer".into())
            })?)
        }
        Some(CountField::Text(_)) => {
            return Err(ApiError::BadRequest(
                "max_retries must be a non-negative integer, or a string of digits".into(),
            ));
        }
    };
    Ok(Registration {
        topics: body.topics,
        subject: body.subject,
        stream_type: body.stream_type,
        ttl: body.ttl.map(|d| d.to_duration("ttl")).transpose()?,
        retry_timeout: body
            .retry_timeout
            .map(|d| d.to_duration("retry_timeout"))
            .transpose()?,
        max_retries,
    })
}

/// A `POST /v1/revoke` body; the bus carries the same object.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// Only channels registered with this subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Only channels bound to this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl RevokeBody {
    /// The filter it asks for; at least one of `subject` and `topic` must be non-empty.
    pub fn into_filter(self) -> Result<RevokeFilter, ApiError> {
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let filter = RevokeFilter {
            subject: nonempty(self.subject),
            topic: nonempty(self.topic),
        };
        if filter.subject.is_none() && filter.topic.is_none() {
            return Err(ApiError::BadRequest(
                "give a subject, a topic, or both".into(),
            ));
        }
        Ok(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies_object_array_and_ndjson() {
        let one = parse_publish_body(None, br#"{"topic":"a","position":3}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].position, Some(3));
        let many = parse_publish_body(
            Some("application/json"),
            br#"[{"topic":"a"},{"topic":"b","stream_type":"changes"}]"#,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        let nd = parse_publish_body(
            Some("application/x-ndjson; charset=utf-8"),
            b"{\"topic\":\"a\"}\n\n{\"topic\":\"b\"}\n",
        )
        .unwrap();
        assert_eq!(nd.len(), 2);
    }

    #[test]
    fn bad_publish_bodies_say_why() {
        assert!(parse_publish_body(None, b"").is_err());
        assert!(parse_publish_body(None, br#"{"topic":""}"#).is_err());
        assert!(parse_publish_body(None, br#"{"topic":"a b"}"#).is_err());
        assert!(
            parse_publish_body(None, br#"{"topic":"a","position":-1}"#)
                .unwrap_err()
                .contains("-1")
        );
        assert!(parse_publish_body(None, br#"{"topic":"a","position":1.5}"#).is_err());
        assert!(
            parse_publish_body(None, br#"{"topic":"a","extra":1}"#)
                .unwrap_err()
                .contains("extra")
        );
        assert!(
            parse_publish_body(Some("application/x-ndjson"), b"{\"topic\":\"a\"}\nnope")
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn durations_are_humantime_or_seconds() {
        assert_eq!(parse_duration("610s").unwrap(), Duration::from_secs(610));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("soon").is_err());
    }
}
