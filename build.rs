//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! replicast never needs a system `protoc`. The encoded descriptor set is also
//! written to `OUT_DIR` for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

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
    Ok(())
}
