//! Generated protobuf and gRPC code for `replicast.v1`, plus the encoded
//! descriptor set that server reflection serves.

/// `replicast.v1`: messages, the `Replicast` client and the server trait.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("replicast.v1");
}

/// `replicast.v1.Replicast` as a replica serves it: the same routes and
/// messages, with the wire-identical types of [`crate::wire`] on the hot
/// methods (see `build.rs`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod replica {
    include!(concat!(env!("OUT_DIR"), "/replica/replicast.v1.Replicast.rs"));
}

/// The encoded `FileDescriptorSet` of `proto/`, written by `build.rs`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/replicast_descriptor.bin"));

/// Fully qualified name of the service, as health checks and reflection see it.
pub const SERVICE_NAME: &str = "replicast.v1.Replicast";
