//! The wire types, generated from `proto/` by `build.rs`: `sluice.v1` at the
//! top level, and the standard gRPC health and reflection services. Nothing
//! here is hand-written.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/sluice.v1.rs"));

/// Fully qualified service name, as it appears in request paths.
pub const SERVICE: &str = "sluice.v1.Sluice";

/// Compiled descriptors of every .proto file served (a `FileDescriptorSet`).
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

pub mod health {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
}

pub mod reflection_v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/grpc.reflection.v1.rs"));
}

pub mod reflection_v1alpha {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/grpc.reflection.v1alpha.rs"));
}
