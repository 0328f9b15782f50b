//! Settings both services read, with the same flag and environment names.

use std::path::PathBuf;

use secrecy::{ExposeSecret as _, SecretString};

use crate::db::DEFAULT_DATABASE_URL;
use crate::telemetry::LogFormat;
use crate::token::{DEFAULT_AUDIENCE, DEFAULT_ISSUER};

/// Parses a binary's command line as `T`, refusing secrets in it (see
/// [`refuse_passwords_in_arguments`]); exits as clap does on an error.
pub fn parse_command_line<T: clap::Parser>() -> T {
    let matches = T::command().get_matches();
    if let Err(e) = refuse_passwords_in_arguments(&matches) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Refuses a database URL with a password given as `--database-url`: every
/// user of the machine can read a process's arguments (`ps`), while its
/// environment is its owner's alone. (The master key is no flag at all.)
pub fn refuse_passwords_in_arguments(matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let mut level = Some(matches);
    while let Some(matches) = level {
        let given_as_flag = matches.ids().any(|id| id.as_str() == "database_url")
            && matches.value_source("database_url") == Some(clap::parser::ValueSource::CommandLine);
        let url = || matches.try_get_one::<SecretString>("database_url").ok().flatten();
        if given_as_flag && url().is_some_and(|url| has_password(url.expose_secret())) {
            anyhow::bail!(
                "--database-url holds a password, which every user of this machine can read in the \
                 process list: set DATABASE_URL in the environment instead"
            );
        }
        level = matches.subcommand().map(|(_, sub)| sub);
    }
    Ok(())
}

/// Whether a URL's authority carries a password (`scheme://user:pass@host`).
fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, password)| !password.is_empty())
}

/// Flags (with environment fallbacks) shared by both services.
///
/// Deliberately not `Debug`: `DATABASE_URL` may hold a password.
#[derive(clap::Args, Clone)]
pub struct CommonConfig {
    /// `sqlite://path/to/file.db` (created on first start) or `mysql://user:pass@host/db`.
    /// A secret: it may hold a password, so it is never printed or logged.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: SecretString,

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

    /// PEM certificate chain: serve TLS (gRPC over h2, gRPC-Web over
    /// HTTP/1.1). Needs TLS_KEY_FILE; both are re-read when they change.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA certificates: require a client certificate signed by one (mTLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// How often the certificate and key files are checked for changes.
    #[arg(long, env = "TLS_RELOAD_INTERVAL_SECS", default_value_t = 10)]
    pub tls_reload_interval_secs: u64,

    #[command(flatten)]
    pub limits: Limits,
}

/// What one client, or all of them together, may hold of a server: the
/// bounds that keep a stranger from exhausting it (docs/security.md, "Abuse
/// limits"). The defaults hold the benchmark's load (200 concurrent calls on
/// one connection) with room to spare.
#[derive(clap::Args, Clone, Debug)]
pub struct Limits {
    /// Open connections (TLS or not). At the cap, a new connection replaces
    /// the longest-idle one (no call in flight), or is closed when none is.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// HTTP/2 streams (calls) one connection may have open at once
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Calls in flight on the whole server (a call counts until its
    /// response has been sent); beyond it a call is answered
    /// RESOURCE_EXHAUSTED at once. One client address may take another only
    /// while it holds fewer than half of the places still free, so a few
    /// addresses cannot fill it. Long-lived streams count apart
    /// (MAX_STREAMING_CALLS).
    #[arg(long, env = "MAX_CONCURRENT_CALLS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_calls: u32,

    /// Calls in flight from one client address (the connection's peer), so
    /// that one client's stalled calls leave room for everyone else's.
    /// Behind a gateway every call comes from the gateway: raise it to
    /// MAX_CONCURRENT_CALLS there and limit clients at the gateway.
    #[arg(long, env = "MAX_CONCURRENT_CALLS_PER_CLIENT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_calls_per_client: u32,

    /// Long-lived streams open on the whole server: Health/Watch and server
    /// reflection, which a client may hold open as long as it likes. They
    /// are counted apart from the calls above, so held streams never take
    /// a unary call's place. The same fair share per address applies.
    #[arg(long, env = "MAX_STREAMING_CALLS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streaming_calls: u32,

    /// Long-lived streams open from one client address. Behind a gateway,
    /// raise it as MAX_CONCURRENT_CALLS_PER_CLIENT.
    #[arg(long, env = "MAX_STREAMING_CALLS_PER_CLIENT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streaming_calls_per_client: u32,

    /// A response the client leaves unread this long (the HTTP/2 flow
    /// control window closed, or the socket not read) is ended: its HTTP/2
    /// stream is reset, while the connection's other calls go on (an
    /// HTTP/1.1 connection, one response at a time, is closed). A unary
    /// call's response must also be sent within REQUEST_TIMEOUT_SECS.
    #[arg(long, env = "WRITE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_secs: u64,

    /// Request headers, in bytes: HTTP/2 max header list size, HTTP/1 read
    /// buffer (at least 8192).
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,

    /// Largest request message decoded (default: the service's own, 2 MiB
    /// for auth-service, 256 KiB for product-service).
    #[arg(long, env = "MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,

    /// Largest response message sent.
    #[arg(long, env = "MAX_RESPONSE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_response_bytes: usize,

    /// A unary call must be answered within this, from the first byte of
    /// its request to the last of its response: a call still waiting for
    /// its request or its handler gets DEADLINE_EXCEEDED, and a response
    /// still unsent then closes the connection. Long-lived streams are not
    /// cut by it.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,

    /// Time for a TLS handshake, and for an HTTP/1.1 request's headers
    /// (also how long an idle HTTP/1.1 connection stays open).
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,

    /// A connection with no call in flight for this long is closed (above
    /// the keepalive timeouts of proxies in front, e.g. nginx's 60 s).
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// HTTP/2 PING interval on a connection; one unanswered for 20 s (or the
    /// interval, if shorter) closes it, with its streams. 0 (the default):
    /// no pings. hyper's keep-alive notes every frame of the connection, which
    /// cost a quarter of GetProduct's throughput at 64 callers on one
    /// connection (BENCHMARKS.md); stalled calls end at REQUEST_TIMEOUT_SECS
    /// and quiet connections at IDLE_TIMEOUT_SECS without them.
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL_SECS", default_value_t = 0)]
    pub http2_keepalive_interval_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_concurrent_streams: 256,
            max_concurrent_calls: 1024,
            max_concurrent_calls_per_client: 256,
            max_streaming_calls: 512,
            max_streaming_calls_per_client: 64,
            write_timeout_secs: 10,
            max_header_bytes: 16 * 1024,
            max_request_bytes: None,
            max_response_bytes: 32 * 1024 * 1024,
            request_timeout_secs: 30,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 300,
            http2_keepalive_interval_secs: 0,
        }
    }
}

impl CommonConfig {
    /// The database URL itself: to connect with, never to print or log (it
    /// may hold a password).
    pub fn expose_database_url(&self) -> &str {
        self.database_url.expose_secret()
    }

    /// Connects to the database and makes sure its schema is this build's:
    /// migrating it, or waiting for it when `migrate_on_start` is off.
    pub async fn open_database(&self) -> anyhow::Result<crate::Db> {
        let db = crate::Db::connect(self.expose_database_url()).await?;
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
        let db = crate::Db::connect(self.expose_database_url()).await?;
        let migrated = crate::migrate::run(&db, self.migration_lock_timeout()).await;
        db.close().await;
        migrated.map_err(|e| e.context("database migration failed"))
    }

    /// The server's TLS, when a certificate is configured.
    pub fn server_tls(&self) -> anyhow::Result<Option<crate::tls::ServerTls>> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::ServerTls::load(crate::tls::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            })?)),
            (None, None) if self.tls_client_ca_file.is_some() => {
                anyhow::bail!("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
            }
            (None, None) => Ok(None),
            _ => anyhow::bail!("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither"),
        }
    }

    fn migration_lock_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.migration_lock_timeout_secs)
    }

    /// The defaults, as if no flag or variable were given, but without a
    /// shutdown grace (for tests and embedding).
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        CommonConfig {
            database_url: SecretString::from(database_url.into()),
            cors_allowed_origins: Vec::new(),
            log_format: LogFormat::Text,
            jwt_issuer: DEFAULT_ISSUER.to_owned(),
            jwt_audience: DEFAULT_AUDIENCE.to_owned(),
            migrate_on_start: true,
            migration_lock_timeout_secs: crate::migrate::DEFAULT_LOCK_TIMEOUT.as_secs(),
            shutdown_grace_secs: 0,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_reload_interval_secs: 10,
            limits: Limits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Binary {
        #[command(flatten)]
        common: CommonConfig,
        #[command(subcommand)]
        command: Option<Sub>,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Up(Nested),
    }

    #[derive(clap::Args)]
    struct Nested {
        #[command(flatten)]
        common: CommonConfig,
    }

    fn check(args: &[&str]) -> anyhow::Result<()> {
        refuse_passwords_in_arguments(&Binary::command().try_get_matches_from(args).unwrap())
    }

    #[test]
    fn a_password_in_a_database_url_flag_is_refused() {
        let err = check(&["bin", "--database-url", "mysql://app:s3cret@db:3306/storegate"]).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL in the environment"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "the message never repeats the password");
        check(&["bin", "up", "--database-url", "mysql://app:s3cret@db/storegate"]).unwrap_err();
        for fine in [
            &["bin"][..],
            &["bin", "--database-url", "mysql://app@db:3306/storegate"],
            &["bin", "--database-url", "sqlite://data/storegate.db"],
            &["bin", "--database-url", "mysql://db/storegate?user=app"],
            &["bin", "up"],
        ] {
            check(fine).unwrap();
        }
    }

    #[test]
    fn passwords_are_found_in_the_authority_only() {
        assert!(has_password("mysql://app:pw@host/db"));
        assert!(has_password("mysql://app:p%40w@host:3306/db?ssl-mode=required"));
        assert!(!has_password("mysql://app:@host/db"));
        assert!(!has_password("mysql://host/db?note=a:b@c"));
        assert!(!has_password("sqlite://dir:with:colons/a@b.db"));
    }
}
