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

    /// Bring the schema up to date at start-up (under a lock, safe with any
    /// number of replicas). `false`: wait, reporting NOT_SERVING, until a
    /// `migrate` step (or another replica) has done it.
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// How long a migration waits for another process's before giving up.
    #[arg(long, env = "MIGRATION_LOCK_TIMEOUT_SECS", default_value_t = 120)]
    pub migration_lock_timeout_secs: u64,

    /// On SIGTERM, how long to keep serving while health reports
    /// NOT_SERVING (for load balancers to notice) before draining.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 2)]
    pub shutdown_grace_secs: u64,
}

impl CommonConfig {
    /// Connects to the database and makes sure its schema is this build's:
    /// migrating it, or waiting for it when `migrate_on_start` is off.
    pub async fn open_database(&self) -> anyhow::Result<crate::Db> {
        let db = crate::Db::connect(&self.database_url).await?;
        let prepared = if self.migrate_on_start {
            crate::migrate::run(&db, self.migration_lock_timeout())
                .await
                .map_err(|e| e.context("database migration failed"))
        } else {
            crate::migrate::wait_for_schema(&db, std::time::Duration::from_secs(1)).await
        };
        if let Err(e) = prepared {
            db.close().await;
            return Err(e);
        }
        Ok(db)
    }

    /// Migrates the database now (the `migrate` command of either service).
    pub async fn migrate_database(&self) -> anyhow::Result<()> {
        let db = crate::Db::connect(&self.database_url).await?;
        let migrated = crate::migrate::run(&db, self.migration_lock_timeout()).await;
        db.close().await;
        migrated.map_err(|e| e.context("database migration failed"))
    }

    fn migration_lock_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.migration_lock_timeout_secs)
    }

    /// The defaults, as if no flag or variable were given, but without a
    /// shutdown grace (for tests and embedding).
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        CommonConfig {
            database_url: database_url.into(),
            cors_allowed_origins: Vec::new(),
            log_format: LogFormat::Text,
            jwt_issuer: DEFAULT_ISSUER.to_owned(),
            jwt_audience: DEFAULT_AUDIENCE.to_owned(),
            migrate_on_start: true,
            migration_lock_timeout_secs: crate::migrate::DEFAULT_LOCK_TIMEOUT.as_secs(),
            shutdown_grace_secs: 0,
        }
    }
}
