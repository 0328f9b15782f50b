//! Settings both services read, with the same flag and environment names.

use crate::db::DEFAULT_DATABASE_URL;
use crate::telemetry::LogFormat;
use crate::token::{DEFAULT_AUDIENCE, DEFAULT_ISSUER};

/// Flags (with environment fallbacks) shared by both services.
///
/// Deliberately not `Debug`: `DATABASE_URL` may hold a password.
#[derive(clap::Args, Clone)]
pub struct CommonConfig {
    /// `sqlite://path/to/file.db` (created on first start) or `mysql://user:pass@host/db`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Origins allowed to call over gRPC-Web from a browser, comma separated; `*` for any.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// The `iss` claim auth-service writes and product-service requires.
    #[arg(long, env = "JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,

    /// The `aud` claim auth-service writes and product-service requires.
    #[arg(long, env = "JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,

    /// On SIGTERM, how long to keep serving while health reports
    /// NOT_SERVING (for load balancers to notice) before draining.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 2)]
    pub shutdown_grace_secs: u64,
}

impl CommonConfig {
    /// The defaults, as if no flag or variable were given, but without a
    /// shutdown grace (for tests and embedding).
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        CommonConfig {
            database_url: database_url.into(),
            cors_allowed_origins: Vec::new(),
            log_format: LogFormat::Text,
            jwt_issuer: DEFAULT_ISSUER.to_owned(),
            jwt_audience: DEFAULT_AUDIENCE.to_owned(),
            shutdown_grace_secs: 0,
        }
    }
}
