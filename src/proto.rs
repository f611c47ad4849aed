//! The `sluice.v1` wire types, generated from `proto/sluice/v1/sluice.proto`
//! by `build.rs`. Nothing here is hand-written.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/sluice.v1.rs"));

/// Fully qualified service name, as it appears in request paths.
pub const SERVICE: &str = "sluice.v1.Sluice";
