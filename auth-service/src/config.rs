//! auth-service settings: flags with environment fallbacks.

use secrecy::SecretString;
use storegate::config::CommonConfig;

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9101";
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50051";

/// Deliberately not `Debug`: it holds the master key and the database URL.
#[derive(clap::Args, Clone)]
pub struct AuthConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Where Prometheus scrapes `/metrics` (HTTP); empty to turn it off.
    #[arg(long, env = "METRICS_LISTEN_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_listen_addr: String,

    /// Where the gRPC (and gRPC-Web) server listens.
    #[arg(long, visible_alias = "auth-listen-addr", env = "AUTH_LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: String,

    /// base64 of 32 random bytes; encrypts TOTP secrets and signing keys at
    /// rest. Required with MySQL; with SQLite a development key is created
    /// beside the database when it is missing. Only from the environment
    /// (`STOREGATE_MASTER_KEY`) or `--master-key-file`: never a flag, whose
    /// value any user could read in `ps`.
    #[arg(skip = crate::crypto::master_key_from_env())]
    pub master_key: Option<SecretString>,

    /// A file holding the master key (instead of STOREGATE_MASTER_KEY); it
    /// must not be writable by others nor readable by anyone but its owner
    /// and group.
    #[arg(long, env = "STOREGATE_MASTER_KEY_FILE")]
    pub master_key_file: Option<std::path::PathBuf>,

    /// The issuer name authenticator apps show next to the account.
    #[arg(long, env = "TOTP_ISSUER", default_value = "storegate")]
    pub totp_issuer: String,
}

impl AuthConfig {
    /// Defaults on the given database (for tests and embedding).
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        AuthConfig {
            common: CommonConfig::with_database_url(database_url),
            listen_addr: DEFAULT_LISTEN_ADDR.to_owned(),
            metrics_listen_addr: String::new(),
            master_key: None,
            master_key_file: None,
            totp_issuer: "storegate".to_owned(),
        }
    }
}
