//! Compiles proto/ into Rust stubs without a system `protoc`: protox parses the
//! files in pure Rust, tonic-prost-build generates the code, and the encoded
//! descriptor set is written for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/storegate/auth/v1/auth.proto",
    "proto/storegate/auth/v1/admin.proto",
    "proto/storegate/product/v1/product.proto",
];

/// Messages that carry passwords, codes, tickets or tokens: their Debug is
/// written by hand (redacted) so that no log line can print them.
const SECRET_MESSAGES: &[&str] = &[
    "storegate.auth.v1.RegisterRequest",
    "storegate.auth.v1.BeginLoginRequest",
    "storegate.auth.v1.BeginLoginResponse",
    "storegate.auth.v1.TotpEnrollment",
    "storegate.auth.v1.CompleteLoginRequest",
    "storegate.auth.v1.CompleteLoginResponse",
    "storegate.auth.v1.RefreshTokenRequest",
    "storegate.auth.v1.RefreshTokenResponse",
    "storegate.auth.v1.LogoutRequest",
    "storegate.auth.v1.RevokeSessionsRequest",
    "storegate.auth.v1.ChangePasswordRequest",
    "storegate.auth.v1.ChangePasswordResponse",
    "storegate.auth.v1.ResetTotpRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["proto"])?;

    // compile_fds neither writes the descriptor set nor tells cargo what to
    // watch, so both happen here.
    fs::write(out_dir.join("storegate_descriptor.bin"), descriptors.encode_to_vec())?;
    // One set per service as well: reflection on a server must list only
    // the services it serves, and lists every service of the sets it has.
    for (protos, out) in
        [(&PROTOS[..2], "storegate_auth_descriptor.bin"), (&PROTOS[2..], "storegate_product_descriptor.bin")]
    {
        fs::write(out_dir.join(out), protox::compile(protos, ["proto"])?.encode_to_vec())?;
    }
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds these at compile time.
    println!("cargo:rerun-if-changed=migrations");
    for file in &descriptors.file {
        if let Some(name) = &file.name {
            let path = PathBuf::from("proto").join(name);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }

    tonic_prost_build::configure()
        .skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".{m}")))
        .compile_fds(descriptors)?;
    Ok(())
}
