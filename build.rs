//! Generates the protobuf types from `proto/` with prost, using protox as the
//! compiler so that no system `protoc` is needed, and saves the compiled
//! descriptors for server reflection.

const PROTOS: &[&str] = &[
    "proto/sluice/v1/sluice.proto",
    "proto/grpc/health/v1/health.proto",
    "proto/grpc/reflection/v1/reflection.proto",
    "proto/grpc/reflection/v1alpha/reflection.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(PROTOS, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&files),
    )?;
    prost_build::Config::new().bytes(["."]).compile_fds(files)?;
    Ok(())
}
