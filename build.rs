//! Compiles `proto/` with a vendored `protoc`, so a fresh machine builds with
//! `cargo` alone, and keeps the descriptor set for server reflection; and
//! rebuilds when the PostgreSQL migrations change.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/kongtie/v1/auth.proto",
    "proto/kongtie/v1/ticket.proto",
    "proto/kongtie/v1/payment.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the
        // environment concurrently.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT (see src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::Codec")
        .file_descriptor_set_path(out_dir.join("kongtie_descriptor.bin"))
        .compile_protos(
            &PROTOS.iter().map(PathBuf::from).collect::<Vec<_>>(),
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds these; a new migration must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
