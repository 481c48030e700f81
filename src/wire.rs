//! Messages encoded once, and the wire-identical types that carry them.
//!
//! A message is encoded to protobuf where it enters the replica (Broadcast,
//! Publish, Deliver) and never again: every peer frame, ring entry and
//! Subscribe delivery shares those bytes ([`EncodedMessage`] is a refcount).
//!
//! Why this is wire-compatible: protobuf writes an embedded message field
//! exactly like a `bytes` field holding that message's encoding (wire type 2,
//! then the length, then the bytes). So [`OutboundFrame`], [`InboundFrame`]
//! and [`EncodedDelivery`], which declare `bytes message = 2` where the public
//! proto declares `Message message = 2`, are the public `DeliverFrame` and
//! `Delivery` on the wire: peers of any version and every client read them as
//! such (the tests below decode one as the other).

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use prost::Message as _;

use crate::proto::v1::Message;

/// A message as this replica holds it: encoded once, shared by every peer
/// frame, the replay ring and every subscriber. Cloning it is a refcount.
#[derive(Clone)]
pub struct EncodedMessage(Arc<Inner>);

struct Inner {
    /// For dedup, receipts and logs; kept decoded because it is asked for
    /// on every delivery.
    id: String,
    /// For topic filters.
    topic: String,
    /// The protobuf encoding of the whole `Message`.
    bytes: Bytes,
}

impl EncodedMessage {
    /// Encodes `message` (at the origin, or for a unary Deliver).
    pub fn encode(message: Message) -> Self {
        let bytes = Bytes::from(message.encode_to_vec());
        Self(Arc::new(Inner {
            id: message.id,
            topic: message.topic,
            bytes,
        }))
    }

    /// Encodes a message from its parts, as the origin has them: the same
    /// bytes as `Message { .. }.encode_to_vec()`, without moving the parts
    /// into a `Message` or copying `origin` per message.
    pub fn from_parts(
        id: String,
        topic: String,
        payload: &Bytes,
        headers: &HashMap<String, String>,
        origin: &str,
        sent_at: &prost_types::Timestamp,
    ) -> Self {
        use prost::encoding::{bytes as pb_bytes, hash_map, message, string};
        // Field numbers of replicast.v1.Message; proto3 skips empty fields.
        let len = if id.is_empty() {
            0
        } else {
            string::encoded_len(1, &id)
        } + if topic.is_empty() {
            0
        } else {
            string::encoded_len(2, &topic)
        } + if payload.is_empty() {
            0
        } else {
            pb_bytes::encoded_len(3, payload)
        } + hash_map::encoded_len(string::encoded_len, string::encoded_len, 4, headers)
            + if origin.is_empty() {
                0
            } else {
                prost::encoding::key_len(5)
                    + prost::encoding::encoded_len_varint(origin.len() as u64)
                    + origin.len()
            }
            + message::encoded_len(6, sent_at);
        let mut buf = Vec::with_capacity(len);
        if !id.is_empty() {
            string::encode(1, &id, &mut buf);
        }
        if !topic.is_empty() {
            string::encode(2, &topic, &mut buf);
        }
        if !payload.is_empty() {
            pb_bytes::encode(3, payload, &mut buf);
        }
        hash_map::encode(
            string::encode,
            string::encoded_len,
            string::encode,
            string::encoded_len,
            4,
            headers,
            &mut buf,
        );
        if !origin.is_empty() {
            // string::encode wants a &String; the key, length and bytes are all it writes.
            prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, &mut buf);
            prost::encoding::encode_varint(origin.len() as u64, &mut buf);
            buf.extend_from_slice(origin.as_bytes());
        }
        message::encode(6, sent_at, &mut buf);
        Self(Arc::new(Inner {
            id,
            topic,
            bytes: Bytes::from(buf),
        }))
    }

    /// Takes a message a peer sent as bytes. The bytes are copied into an
    /// allocation of their own: `raw` usually points into tonic's decode
    /// buffer (8 KiB or more), which a small message would otherwise keep
    /// alive for as long as the ring holds it. Returns the decoded message
    /// too, for validation.
    pub fn decode(raw: &[u8]) -> Result<(Self, Message), prost::DecodeError> {
        let bytes = Bytes::copy_from_slice(raw);
        let mut message = Message::decode(bytes.clone())?;
        let encoded = Self(Arc::new(Inner {
            id: std::mem::take(&mut message.id),
            topic: std::mem::take(&mut message.topic),
            bytes,
        }));
        Ok((encoded, message))
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The message topic.
    pub fn topic(&self) -> &str {
        &self.0.topic
    }

    /// The encoded `Message`, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.0.bytes
    }

    /// Length of the encoding.
    pub fn encoded_len(&self) -> usize {
        self.0.bytes.len()
    }

    /// Decodes the whole message again: for the webhook POST, which needs
    /// its fields (the payload is a slice of the shared buffer, not a copy),
    /// and for tests. It was encoded here, so it decodes.
    pub fn to_message(&self) -> Message {
        Message::decode(self.0.bytes.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for EncodedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedMessage")
            .field("id", &self.0.id)
            .field("topic", &self.0.topic)
            .field("bytes", &self.0.bytes.len())
            .finish()
    }
}

/// `DeliverFrame` as a sender writes it, its message already encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboundFrame {
    /// See `DeliverFrame.tag`.
    #[prost(uint64, tag = "1")]
    pub tag: u64,
    /// The encoded `Message`.
    #[prost(bytes = "bytes", tag = "2")]
    pub message: Bytes,
    /// See `DeliverFrame.trace_context`.
    #[prost(map = "string, string", tag = "3")]
    pub trace_context: HashMap<String, String>,
    /// See `DeliverFrame.ack_timeout_ms`.
    #[prost(uint32, tag = "4")]
    pub ack_timeout_ms: u32,
}

/// `DeliverFrame` as a receiver reads it: the message's bytes as they came,
/// decoded once for validation and stored as they are.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InboundFrame {
    /// See `DeliverFrame.tag`.
    #[prost(uint64, tag = "1")]
    pub tag: u64,
    /// The encoded `Message`; `None` when the frame has none.
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub message: Option<Bytes>,
    /// See `DeliverFrame.trace_context`.
    #[prost(map = "string, string", tag = "3")]
    pub trace_context: HashMap<String, String>,
    /// See `DeliverFrame.ack_timeout_ms`.
    #[prost(uint32, tag = "4")]
    pub ack_timeout_ms: u32,
}

/// `Delivery` as Subscribe writes it, around the ring's shared bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedDelivery {
    /// See `Delivery.sequence`.
    #[prost(uint64, tag = "1")]
    pub sequence: u64,
    /// The encoded `Message`.
    #[prost(bytes = "bytes", tag = "2")]
    pub message: Bytes,
    /// See `Delivery.incarnation`.
    #[prost(uint64, tag = "3")]
    pub incarnation: u64,
}

/// The codec of Subscribe streams: prost, with small buffers. tonic's
/// default keeps an 8 KiB buffer per stream and writes up to 32 KiB of ready
/// deliveries at once; a subscriber that reads slowly then has that chunk
/// waiting in this replica's HTTP/2 buffers. For 10,000 subscribers that was
/// 80 MB idle and 1.2 GB at 1,000 messages a second (measured with
/// `examples/subscribers.rs`). 1 KiB and 4 KiB bound it per subscriber.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeCodec;

impl tonic::codec::Codec for SubscribeCodec {
    type Encode = EncodedDelivery;
    type Decode = crate::proto::v1::SubscribeRequest;
    type Encoder = tonic_prost::ProstEncoder<EncodedDelivery>;
    type Decoder = tonic_prost::ProstDecoder<crate::proto::v1::SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<EncodedDelivery, crate::proto::v1::SubscribeRequest>::raw_encoder(
            tonic::codec::BufferSettings::new(1024, 4096),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<EncodedDelivery, crate::proto::v1::SubscribeRequest>::raw_decoder(
            tonic::codec::BufferSettings::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{DeliverFrame, Delivery};

    fn message() -> Message {
        Message {
            id: "m-1".into(),
            topic: "cache.invalidate".into(),
            payload: Bytes::from_static(b"\x00\x01payload"),
            headers: HashMap::from([("k".to_owned(), "v".to_owned())]),
            origin: "10.0.0.1:7420".into(),
            sent_at: Some(prost_types::Timestamp { seconds: 1, nanos: 2 }),
        }
    }

    #[test]
    fn from_parts_is_the_encoding_of_the_message() {
        let m = message();
        let parts = EncodedMessage::from_parts(
            m.id.clone(),
            m.topic.clone(),
            &m.payload,
            &m.headers,
            &m.origin,
            m.sent_at.as_ref().unwrap(),
        );
        assert_eq!(parts.bytes().as_ref(), m.encode_to_vec().as_slice());
        assert_eq!(parts.to_message(), m);
        let empty = Message {
            id: "x".into(),
            sent_at: Some(prost_types::Timestamp::default()),
            ..Default::default()
        };
        let parts = EncodedMessage::from_parts(
            "x".into(),
            String::new(),
            &Bytes::new(),
            &HashMap::new(),
            "",
            &prost_types::Timestamp::default(),
        );
        assert_eq!(
            parts.bytes().as_ref(),
            empty.encode_to_vec().as_slice(),
            "empty fields are skipped"
        );
    }

    #[test]
    fn an_outbound_frame_is_a_deliver_frame_on_the_wire() {
        let encoded = EncodedMessage::encode(message());
        let frame = OutboundFrame {
            tag: 7,
            message: encoded.bytes().clone(),
            trace_context: HashMap::from([("traceparent".to_owned(), "00-x".to_owned())]),
            ack_timeout_ms: 1500,
        };
        let decoded = DeliverFrame::decode(frame.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.tag, 7);
        assert_eq!(decoded.message, Some(message()));
        assert_eq!(decoded.trace_context, frame.trace_context);
        assert_eq!(decoded.ack_timeout_ms, 1500);
    }

    #[test]
    fn a_deliver_frame_reads_as_an_inbound_frame() {
        let frame = DeliverFrame {
            tag: 9,
            message: Some(message()),
            trace_context: HashMap::new(),
            ack_timeout_ms: 0,
        };
        let inbound = InboundFrame::decode(frame.encode_to_vec().as_slice()).unwrap();
        assert_eq!(inbound.tag, 9);
        let (encoded, decoded) = EncodedMessage::decode(&inbound.message.unwrap()).unwrap();
        assert_eq!(encoded.id(), "m-1");
        assert_eq!(encoded.topic(), "cache.invalidate");
        assert_eq!(decoded.payload, message().payload);
        assert_eq!(encoded.to_message(), message());
        let empty = DeliverFrame {
            tag: 1,
            message: None,
            trace_context: HashMap::new(),
            ack_timeout_ms: 0,
        };
        assert_eq!(
            InboundFrame::decode(empty.encode_to_vec().as_slice())
                .unwrap()
                .message,
            None,
            "a frame without a message stays distinguishable"
        );
    }

    #[test]
    fn an_encoded_delivery_is_a_delivery_on_the_wire() {
        let encoded = EncodedMessage::encode(message());
        let delivery = EncodedDelivery {
            sequence: 42,
            message: encoded.bytes().clone(),
            incarnation: 5,
        };
        let decoded = Delivery::decode(delivery.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            decoded,
            Delivery {
                sequence: 42,
                message: Some(message()),
                incarnation: 5
            }
        );
    }

    #[test]
    fn a_received_message_is_copied_out_of_the_decode_buffer() {
        let frame = OutboundFrame {
            tag: 1,
            message: EncodedMessage::encode(message()).bytes().clone(),
            trace_context: HashMap::new(),
            ack_timeout_ms: 0,
        };
        // As tonic hands it over: one frame at the start of a larger buffer.
        let wire = frame.encode_to_vec();
        let mut buffer = vec![0u8; 8192];
        buffer[..wire.len()].copy_from_slice(&wire);
        let buffer = Bytes::from(buffer);
        let inbound = InboundFrame::decode(buffer.slice(..wire.len())).unwrap();
        let (encoded, _) = EncodedMessage::decode(&inbound.message.unwrap()).unwrap();
        let range = buffer.as_ptr_range();
        assert!(
            !range.contains(&encoded.bytes().as_ptr()),
            "the kept message must be its own allocation, not a view that pins 8 KiB"
        );
        assert_eq!(encoded.to_message(), message());
    }
}
