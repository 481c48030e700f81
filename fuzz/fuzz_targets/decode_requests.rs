//! Every message the server accepts, decoded from arbitrary bytes, then the
//! checks the handlers run on it: nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use replicast::{
    proto::v1::{
        AnnounceRequest, BroadcastRequest, DeliverRequest, ListPeersRequest, PublishRequest, SubscribeRequest,
    },
    validate,
    wire::{EncodedMessage, InboundFrame},
};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = BroadcastRequest::decode(data) {
        let _ = validate::topic(&request.topic);
        let _ = validate::headers(&request.headers);
    }
    if let Ok(request) = PublishRequest::decode(data) {
        let _ = request.timeout.map(std::time::Duration::try_from);
    }
    if let Ok(request) = DeliverRequest::decode(data)
        && let Some(message) = request.message
    {
        let _ = validate::id(&message.id);
        let _ = EncodedMessage::encode(message);
    }
    // The peer hop: a frame around encoded bytes, decoded on receipt.
    if let Ok(frame) = InboundFrame::decode(data)
        && let Some(raw) = frame.message
        && let Ok((encoded, decoded)) = EncodedMessage::decode(&raw)
    {
        assert!(
            decoded.id.is_empty(),
            "decode moves the id out of the Message, not a copy"
        );
        let _ = (encoded.id().len(), encoded.topic().len(), decoded.payload.len());
    }
    if let Ok(request) = SubscribeRequest::decode(data) {
        let _ = validate::topic_filters(&request.topics);
    }
    let _ = AnnounceRequest::decode(data);
    let _ = ListPeersRequest::decode(data);
});
