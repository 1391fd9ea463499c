//! Compiles the internal gRPC API (`proto/shoal_internal.proto`) with `protox`, a pure-Rust
//! protobuf compiler, so a fresh machine builds with plain `cargo` and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["shoal_internal.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
