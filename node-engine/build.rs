//! Compiles the internal gRPC API (`proto/shoal_internal.proto`) and Shoal's own description of
//! the Milvus client API (`proto/milvus/`, Milvus's wire format) with `protox`, a pure-Rust
//! protobuf compiler, so a fresh machine builds with plain `cargo` and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["shoal_internal.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // Milvus has an RPC named `Connect`, which would clash with the generated client's
    // `connect` constructor: its client is built without it (make one from a `Channel`).
    let fds = protox::compile(["milvus/milvus.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
