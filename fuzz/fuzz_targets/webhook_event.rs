//! A delivered message, whatever a peer put in it (any time, any header,
//! any payload), turned into a webhook POST in both CloudEvents modes: never
//! a panic, and binary mode keeps the payload as the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use replicast::{
    proto::v1::Message,
    webhook::event::{Context, Mode, build},
};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::decode(data) else { return };
    let context = Context {
        sequence: u64::from(data.first().copied().unwrap_or(0)) << 56,
        incarnation: u64::MAX,
        lost_before: data.len() as u64,
    };
    let binary = build(Mode::Binary, &message, context);
    assert_eq!(binary.body, message.payload);
    let structured = build(Mode::Structured, &message, context);
    assert!(serde_json::from_slice::<serde_json::Value>(&structured.body).is_ok());
});
