//! Compiles the .proto files with protox (pure Rust), so building phaul needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/criu/rpc.proto",
        "proto/criu/stats.proto",
        "proto/criu/tty.proto",
        "proto/criu/fdinfo.proto",
        "proto/phaul/wire.proto",
        "proto/phaul/external.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
