//! The nodekeeper wire contract (`nodekeeper.v1`).
//!
//! The `.proto` files under `proto/` are the source of truth. The Rust code and the encoded file
//! descriptor set in `src/gen/` are generated from them by `tests/codegen.rs` (protox, so no
//! `protoc` is needed) and committed; that test fails when they are stale.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    include!("gen/nodekeeper.v1.rs");
}

pub mod json;

/// Encoded `FileDescriptorSet` of the whole contract, for gRPC server reflection and for
/// protobuf's canonical JSON mapping.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/nodekeeper.v1.bin");
