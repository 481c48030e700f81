//! A delivery as a CloudEvents 1.0 HTTP request (the HTTP protocol
//! binding). Binary mode by default: the body is the payload, the context
//! attributes are `ce-*` headers. Structured mode: the whole event as JSON
//! (`application/cloudevents+json`, the payload in `data_base64`, or in
//! `data` when the message says it is JSON). Pure.
//!
//! Attributes: `id` = message id, `source` = `replicast://<origin replica>`,
//! `type` = `io.replicast.message`, `subject` = topic, `time` = when the
//! origin accepted it, and the extensions `sequence` (this replica's
//! sequence number, decimal zero-padded to 20 digits so that it orders as
//! a string, as the extension requires), `replicastincarnation` (this replica's
//! incarnation, decimal, as `subscribe` and grpcurl print it), `replicastheaders` (the message's headers
//! as a JSON object) and, when messages were lost before this one,
//! `replicastlost` (how many). A `content-type` message header is the
//! event's `datacontenttype` (default `application/octet-stream`).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};

use crate::proto::v1::Message;

/// `type` of every event.
pub const EVENT_TYPE: &str = "io.replicast.message";

/// Which CloudEvents HTTP mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    #[default]
    Binary,
    Structured,
}

/// What this replica adds to a message.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub sequence: u64,
    pub incarnation: u64,
    /// Deliveries lost (fell out of the ring) just before this one.
    pub lost_before: u64,
}

/// A POST's headers and body.
#[derive(Debug, Clone)]
pub struct EventRequest {
    pub headers: HeaderMap,
    pub body: Bytes,
}

fn content_type(message: &Message) -> &str {
    message
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map_or("application/octet-stream", |(_, v)| v.as_str())
}

fn time(message: &Message) -> Option<String> {
    crate::timestamp::from_proto(message.sent_at.as_ref()?).map(crate::timestamp::rfc3339_micros)
}

/// The CloudEvents `sequence` extension orders as a string: zero-padded
/// to the 20 digits of the largest u64.
fn sequence(sequence: u64) -> String {
    format!("{sequence:020}")
}

/// The message headers as one JSON object, keys sorted.
fn headers_json(message: &Message) -> String {
    let sorted: BTreeMap<&String, &String> = message.headers.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_default()
}

/// CloudEvents' HTTP binding: header values are percent-encoded outside
/// printable ASCII, and for space, `"` and `%`.
fn ce_header(value: &str) -> HeaderValue {
    const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'"').add(b'%');
    let encoded = percent_encoding::utf8_percent_encode(value, ENCODE).to_string();
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The request for `message` in `mode`.
pub fn build(mode: Mode, message: &Message, context: Context) -> EventRequest {
    let source = format!("replicast://{}", message.origin);
    let incarnation = context.incarnation.to_string();
    let mut headers = HeaderMap::new();
    match mode {
        Mode::Binary => {
            let mut put = |name: &'static str, value: &str| {
                headers.insert(HeaderName::from_static(name), ce_header(value));
            };
            put("ce-specversion", "1.0");
            put("ce-id", &message.id);
            put("ce-source", &source);
            put("ce-type", EVENT_TYPE);
            put("ce-subject", &message.topic);
            if let Some(time) = time(message) {
                put("ce-time", &time);
            }
            put("ce-sequence", &sequence(context.sequence));
            put("ce-replicastincarnation", &incarnation);
            if !message.headers.is_empty() {
                put("ce-replicastheaders", &headers_json(message));
            }
            if context.lost_before > 0 {
                put("ce-replicastlost", &context.lost_before.to_string());
            }
            // A media type as is (its parameters have spaces), not
            // percent-encoded as the ce-* attributes are.
            let content_type = HeaderValue::from_str(content_type(message))
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            headers.insert(CONTENT_TYPE, content_type);
            EventRequest {
                headers,
                body: message.payload.clone(),
            }
        }
        Mode::Structured => {
            let datacontenttype = content_type(message);
            let mut event = serde_json::json!({
                "specversion": "1.0",
                "id": message.id,
                "source": source,
                "type": EVENT_TYPE,
                "subject": message.topic,
                "datacontenttype": datacontenttype,
                "sequence": sequence(context.sequence),
                "replicastincarnation": incarnation,
            });
            let object = event.as_object_mut().expect("a JSON object");
            if let Some(time) = time(message) {
                object.insert("time".into(), time.into());
            }
            if !message.headers.is_empty() {
                object.insert("replicastheaders".into(), headers_json(message).into());
            }
            if context.lost_before > 0 {
                object.insert("replicastlost".into(), context.lost_before.to_string().into());
            }
            let json_data = datacontenttype
                .starts_with("application/json")
                .then(|| serde_json::from_slice::<serde_json::Value>(&message.payload).ok())
                .flatten();
            match json_data {
                Some(data) => object.insert("data".into(), data),
                None => {
                    use base64::Engine as _;
                    let data = base64::engine::general_purpose::STANDARD.encode(&message.payload);
                    object.insert("data_base64".into(), data.into())
                }
            };
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
            );
            EventRequest {
                headers,
                body: Bytes::from(serde_json::to_vec(&event).unwrap_or_default()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn message() -> Message {
        Message {
            id: "m-1".into(),
            topic: "cache.invalidate".into(),
            payload: Bytes::from_static(b"{\"key\":\"user:1\"}"),
            headers: HashMap::from([
                ("content-type".into(), "application/json".into()),
                ("who".into(), "Zoë \"z\"".into()),
            ]),
            origin: "10.0.0.7:7420".into(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5_000,
            }),
        }
    }

    const CONTEXT: Context = Context {
        sequence: 42,
        incarnation: 0xabc,
        lost_before: 0,
    };

    #[test]
    fn binary_mode_puts_the_payload_in_the_body_and_the_attributes_in_headers() {
        let request = build(Mode::Binary, &message(), CONTEXT);
        let h = |name: &str| request.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(request.body, Bytes::from_static(b"{\"key\":\"user:1\"}"));
        assert_eq!(h("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(h("ce-id").as_deref(), Some("m-1"));
        assert_eq!(h("ce-source").as_deref(), Some("replicast://10.0.0.7:7420"));
        assert_eq!(h("ce-type").as_deref(), Some(EVENT_TYPE));
        assert_eq!(h("ce-subject").as_deref(), Some("cache.invalidate"));
        assert_eq!(h("ce-time").as_deref(), Some("2027-01-15T08:00:00.000005Z"));
        assert_eq!(h("ce-sequence").as_deref(), Some("00000000000000000042"));
        assert_eq!(h("ce-replicastincarnation").as_deref(), Some("2748"));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(
            h("ce-replicastheaders").as_deref(),
            Some("{%22content-type%22:%22application/json%22,%22who%22:%22Zo%C3%AB%20\\%22z\\%22%22}")
        );
        assert_eq!(h("ce-replicastlost"), None);
        let lost = build(
            Mode::Binary,
            &message(),
            Context {
                lost_before: 3,
                ..CONTEXT
            },
        );
        assert_eq!(lost.headers["ce-replicastlost"], "3");
    }

    #[test]
    fn structured_mode_is_one_json_event() {
        let request = build(Mode::Structured, &message(), CONTEXT);
        let event: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], "m-1");
        assert_eq!(event["data"]["key"], "user:1");
        assert_eq!(event["sequence"], "00000000000000000042");
        assert!(
            request.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/cloudevents+json")
        );
        let mut binary = message();
        binary.headers.clear();
        binary.payload = Bytes::from_static(&[0, 159, 146, 150]);
        let event: serde_json::Value =
            serde_json::from_slice(&build(Mode::Structured, &binary, CONTEXT).body).unwrap();
        assert_eq!(event["data_base64"], "AJ+Slg==");
        assert_eq!(event["datacontenttype"], "application/octet-stream");
    }
}
