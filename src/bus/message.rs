//! What travels on the bus (SPEC §5): one stream entry, whose field [`FIELD`] (`m`) holds
//! one of
//!
//! - **a publish**, exactly what `POST /v1/publish` takes: one JSON object
//!   `{"topic":"user:42","position":7,"stream_type":"changes"}`, a JSON array of them, or
//!   NDJSON (one object per line). Redis carries no content type, so NDJSON is told by its
//!   content: a payload that is not one JSON value as a whole but holds more than one line is
//!   read as NDJSON. A pretty-printed object or array spans lines too, but it *is* one JSON
//!   value, so it is read as such; the two readings can never both succeed with different
//!   meanings (two objects in a row are not one JSON value, and a one-line NDJSON body is
//!   the object itself). Nodes put a publish on the bus as a JSON array. A main API may
//!   append one itself: `XADD nudge:publish * m '{"topic":"user:42"}'`.
//! - **a revocation envelope**, `{"revoke":{"subject":"user:42","topic":"box:9"},"origin":"…"}`
//!   (`subject` and/or `topic`, as `POST /v1/revoke` takes them). `origin` is the id of the
//!   node that already applied it, which skips it when it comes back; without `origin`
//!   every node applies it. A publish can never be read as an envelope nor the other way
//!   round: both are parsed with unknown fields refused, a publish object must have
//!   `topic` and cannot have `revoke`, and an envelope must have `revoke`.

use serde::{Deserialize, Serialize};

use crate::hub::{Publish, RevokeFilter};
use crate::wire::{NDJSON, RevokeBody, encode_publishes, parse_publish_body};

/// The entry field that holds the message; other fields are ignored.
pub const FIELD: &str = "m";

/// The message among an entry's `[field, value, …]`: the value of the first [`FIELD`].
pub fn payload(fields: &[Vec<u8>]) -> Option<&[u8]> {
    fields
        .chunks_exact(2)
        .find(|pair| pair[0] == FIELD.as_bytes())
        .map(|pair| pair[1].as_slice())
}

/// A decoded bus message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A batch of publishes, in any shape `POST /v1/publish` takes.
    Publish(Vec<Publish>),
    /// A revocation: the channels matching `subject` and `topic` are removed.
    Revoke {
        /// The node that applied it already; `None` when the main API sent it.
        origin: Option<String>,
        /// Only channels registered with this subject.
        subject: Option<String>,
        /// Only channels bound to this topic.
        topic: Option<String>,
    },
}

impl Message {
    /// The channels a revocation removes; `None` for a publish.
    pub fn revoke_filter(&self) -> Option<RevokeFilter> {
        match self {
            Message::Revoke { subject, topic, .. } => Some(RevokeFilter {
                subject: subject.clone(),
                topic: topic.clone(),
            }),
            Message::Publish(_) => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeEnvelope {
    revoke: RevokeBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

/// A publish as nodes put it on the bus: a JSON array.
pub fn encode_publish(batch: &[Publish]) -> Vec<u8> {
    encode_publishes(batch)
}

/// A revocation envelope naming the node that already applied it.
pub fn encode_revoke(filter: &RevokeFilter, origin: &str) -> Vec<u8> {
    serde_json::to_vec(&RevokeEnvelope {
        revoke: RevokeBody {
            subject: filter.subject.clone(),
            topic: filter.topic.clone(),
        },
        origin: Some(origin.to_owned()),
    })
    .expect("an envelope of strings serialises")
}

/// Decodes one bus message. All or nothing, as on the internal API: one bad entry refuses
/// the whole message.
pub fn decode(payload: &[u8]) -> Result<Message, String> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'[')) {
        return Err("a bus message is a JSON object, a JSON array, or NDJSON".into());
    }
    let as_json = match parse_publish_body(None, payload) {
        Ok(batch) => return Ok(Message::Publish(batch)),
        Err(e) => e,
    };
    if first == Some(&b'{')
        && let Ok(envelope) = serde_json::from_slice::<RevokeEnvelope>(payload)
    {
        return revoke(envelope);
    }
    let lines = payload
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    if lines > 1 && first == Some(&b'{') {
        return parse_publish_body(Some(NDJSON), payload).map(Message::Publish);
    }
    Err(as_json)
}

fn revoke(envelope: RevokeEnvelope) -> Result<Message, String> {
    let filter = envelope.revoke.into_filter().map_err(|e| e.to_string())?;
    Ok(Message::Revoke {
        origin: envelope.origin,
        subject: filter.subject,
        topic: filter.topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(m: Message) -> Vec<String> {
        match m {
            Message::Publish(b) => b.into_iter().map(|p| p.topic).collect(),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn the_message_is_field_m_of_the_entry() {
        let fields = |f: &[&str]| f.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            payload(&fields(&["trace", "x", "m", "{}", "m", "second"])),
            Some(&b"{}"[..])
        );
        assert_eq!(payload(&fields(&["msg", "{}"])), None);
        // A dangling field without a value is not read as one.
        assert_eq!(payload(&fields(&["m"])), None);
    }

    #[test]
    fn publishes_are_what_the_internal_api_takes() {
        assert_eq!(
            topics(decode(br#"{"topic":"user:42"}"#).unwrap()),
            ["user:42"]
        );
        assert_eq!(
            topics(decode(br#"[{"topic":"a"},{"topic":"b","position":3}]"#).unwrap()),
            ["a", "b"]
        );
        // NDJSON, told by its lines.
        assert_eq!(
            topics(decode(b"{\"topic\":\"a\"}\n{\"topic\":\"b\"}\n\n").unwrap()),
            ["a", "b"]
        );
        // Pretty-printed JSON spans lines too, and is still one value.
        assert_eq!(
            topics(decode(b"[\n  {\"topic\":\"a\"},\n  {\"topic\":\"b\"}\n]\n").unwrap()),
            ["a", "b"]
        );
        assert_eq!(topics(decode(b"{\n  \"topic\": \"a\"\n}").unwrap()), ["a"]);
    }

    #[test]
    fn what_nodes_send_comes_back_the_same() {
        let batch = vec![
            Publish {
                topic: "a".into(),
                position: Some(9),
                stream_type: None,
            },
            Publish {
                topic: "b".into(),
                position: None,
                stream_type: Some("changes".into()),
            },
        ];
        assert_eq!(
            decode(&encode_publish(&batch)).unwrap(),
            Message::Publish(batch)
        );
        let filter = RevokeFilter {
            subject: Some("user:42".into()),
            topic: None,
        };
        let bytes = encode_revoke(&filter, "n1");
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"revoke":{"subject":"user:42"},"origin":"n1"}"#
        );
        assert_eq!(
            decode(&bytes).unwrap(),
            Message::Revoke {
                origin: Some("n1".into()),
                subject: Some("user:42".into()),
                topic: None
            }
        );
    }

    #[test]
    fn envelopes_and_publishes_are_never_confused() {
        // A publish with a stray `revoke` field is refused, not read as a revocation.
        assert!(decode(br#"{"topic":"a","revoke":{"subject":"s"}}"#).is_err());
        // An envelope with a stray `topic` at the top is refused too.
        assert!(decode(br#"{"revoke":{"subject":"s"},"topic":"a"}"#).is_err());
        // The main API may revoke straight through Redis: no origin, every node applies it.
        assert_eq!(
            decode(br#"{"revoke":{"topic":"box:9"}}"#).unwrap(),
            Message::Revoke {
                origin: None,
                subject: None,
                topic: Some("box:9".into())
            }
        );
        assert!(decode(br#"{"revoke":{}}"#).is_err());
        assert!(decode(br#"{"revoke":{"subject":""}}"#).is_err());
        // NDJSON carries publishes only.
        assert!(decode(b"{\"revoke\":{\"subject\":\"s\"}}\n{\"topic\":\"a\"}").is_err());
    }

    #[test]
    fn bad_messages_say_why() {
        assert!(decode(b"").is_err());
        assert!(decode(b"user:42").is_err());
        assert!(decode(br#"{"topic":""}"#).is_err());
        assert!(
            decode(b"{\"topic\":\"a\"}\n{\"topic\":\"b c\"}")
                .unwrap_err()
                .contains("visible ASCII")
        );
        assert!(
            decode(b"{\"topic\":\"a\"}\nnope")
                .unwrap_err()
                .contains("line 2")
        );
    }
}
