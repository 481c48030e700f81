//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! replicast never needs a system `protoc`. The encoded descriptor set is also
//! written to `OUT_DIR` for gRPC server reflection.
//!
//! Two servers come out of it. The one prost generates from the proto
//! (`proto::v1::replicast_server`) speaks the public types, for anyone who
//! wants to play a replica (the tests' fake peers do). The one a replica
//! serves (`proto::replica`) is described here by hand with tonic-build's
//! `manual` builder: the same service and routes, but its hot methods use the
//! wire-identical types of `src/wire.rs`, so a message is decoded and encoded
//! once per replica instead of once per peer and per subscriber.

use std::{env, fs, path::PathBuf};

use prost::Message as _;
use tonic_build::manual::{Builder, Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/replicast/v1/replicast.proto";
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("replicast_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .bytes(".replicast.v1.Message.payload")
        .bytes(".replicast.v1.BroadcastRequest.payload")
        .compile_fds(fds)?;

    let replica_dir = out_dir.join("replica");
    fs::create_dir_all(&replica_dir)?;
    Builder::new()
        .build_client(false)
        .out_dir(&replica_dir)
        .compile(&[replica_service()]);
    Ok(())
}

/// `replicast.v1.Replicast` as a replica serves it. Every route and message
/// is the proto's; `wire::` types are wire-identical stand-ins.
fn replica_service() -> Service {
    let v1 = |name: &str| format!("crate::proto::v1::{name}");
    let method = |name: &str, route: &str, input: String, output: String| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path("tonic_prost::ProstCodec")
    };
    Service::builder()
        .name("Replicast")
        .package("replicast.v1")
        .method(
            method(
                "broadcast",
                "Broadcast",
                v1("BroadcastRequest"),
                v1("BroadcastResponse"),
            )
            .build(),
        )
        .method(
            method("publish", "Publish", v1("PublishRequest"), v1("PublishResponse"))
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(method("deliver", "Deliver", v1("DeliverRequest"), v1("DeliverResponse")).build())
        .method(
            method(
                "deliver_stream",
                "DeliverStream",
                "crate::wire::InboundFrame".into(),
                v1("DeliverAck"),
            )
            .client_streaming()
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "subscribe",
                "Subscribe",
                v1("SubscribeRequest"),
                "crate::wire::EncodedDelivery".into(),
            )
            // Small buffers per stream: there may be 10,000 of them.
            .codec_path("crate::wire::SubscribeCodec")
            .server_streaming()
            .build(),
        )
        .method(
            method(
                "list_peers",
                "ListPeers",
                v1("ListPeersRequest"),
                v1("ListPeersResponse"),
            )
            .build(),
        )
        .method(
            method(
                "announce",
                "Announce",
                v1("AnnounceRequest"),
                v1("AnnounceResponse"),
            )
            .build(),
        )
        .build()
}
