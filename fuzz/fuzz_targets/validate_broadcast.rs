//! A Broadcast from arbitrary bytes through every check the server makes
//! before accepting it: each answer is Ok or a typed error whose message
//! and gRPC code can be built, and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use replicast::{error::Error, proto::v1::BroadcastRequest, validate, wire::EncodedMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = BroadcastRequest::decode(data) else {
        return;
    };
    let checks = [
        validate::ack_policy(request.ack).map(|_| ()),
        validate::topic(&request.topic),
        validate::payload(request.payload.len(), 1024 * 1024),
        validate::headers(&request.headers),
        validate::id(&request.id),
    ];
    let mut valid = true;
    for check in checks {
        if let Err(error) = check {
            valid = false;
            let error = Error::from(error);
            let status = tonic::Status::from(error);
            assert!(!status.message().is_empty(), "every refusal says why");
        }
    }
    if valid {
        // What the origin does with an accepted message: encode it once.
        let encoded = EncodedMessage::from_parts(
            request.id.clone(),
            request.topic.clone(),
            &request.payload,
            &request.headers,
            "10.0.0.1:7420",
            &prost_types::Timestamp::default(),
        );
        let (decoded, message) = EncodedMessage::decode(encoded.bytes()).expect("what we encode decodes");
        assert_eq!(decoded.topic(), request.topic);
        assert_eq!(message.payload, request.payload);
    }
});
