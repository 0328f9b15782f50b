//! storegate's root library: the generated gRPC stubs, and the code both
//! services share (token claims and verification, database access, errors,
//! server plumbing, configuration and telemetry).

pub mod alloc;
pub mod config;
pub mod connections;
pub mod db;
pub mod db_health;
pub mod error;
pub mod http_client;
pub mod keyed_limit;
pub mod metrics;
pub mod migrate;
pub mod private_files;
mod redact;
pub mod server;
pub mod sqlite_checkpoint;
pub mod sqlite_writes;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod token_source;

/// Generated code for `proto/storegate/**`.
pub mod pb {
    pub mod auth {
        pub mod v1 {
            tonic::include_proto!("storegate.auth.v1");
        }
    }
    pub mod product {
        pub mod v1 {
            tonic::include_proto!("storegate.product.v1");
        }
    }

    /// Every storegate .proto file and its imports.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/storegate_descriptor.bin"));
    /// auth.proto and its imports: what auth-service's reflection describes.
    pub const AUTH_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/storegate_auth_descriptor.bin"));
    /// product.proto and its imports: what product-service's reflection
    /// describes (a server lists only the services it serves).
    pub const PRODUCT_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/storegate_product_descriptor.bin"));
}

pub use db::Db;
pub use error::ApiError;
