//! auth-service settings: flags with environment fallbacks.

use secrecy::SecretString;
use storegate::config::CommonConfig;

use crate::client::TrustedProxies;

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

    /// Where clients reach this service, e.g. `https://auth.example.com`:
    /// the base of `jwks_uri` in `/.well-known/openid-configuration`.
    /// Without it, each request's own scheme and Host.
    #[arg(long, env = "AUTH_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// The issuer name authenticator apps show next to the account.
    #[arg(long, env = "TOTP_ISSUER", default_value = "storegate")]
    pub totp_issuer: String,

    /// Days the audit trail keeps an entry; 0 keeps them forever.
    #[arg(long, env = "AUDIT_RETENTION_DAYS", default_value_t = DEFAULT_AUDIT_RETENTION_DAYS)]
    pub audit_retention_days: u32,

    #[command(flatten)]
    pub login: LoginPolicy,
}

/// A year and a bit: long enough to look back over a yearly review.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u32 = 400;

/// Throttles and session lifetimes.
#[derive(clap::Args, Clone, Debug)]
pub struct LoginPolicy {
    /// Gateways (addresses or CIDR ranges, comma separated) whose
    /// `x-forwarded-for` names the client that throttles count against.
    /// Empty: the connection's peer is the client.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,

    /// Consecutive failed logins from unrecognised clients, all together,
    /// before the account-wide lock (NIST SP 800-63B: at most 100); then
    /// each further failure locks the account for `ACCOUNT_LOCK_SECS` to
    /// every client that is not one of its known devices.
    #[arg(long, env = "MAX_FAILED_LOGINS", default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub max_failed_logins: i32,

    /// How long each failure beyond `MAX_FAILED_LOGINS` locks the account
    /// to unrecognised clients (seconds). Unrecognised clients together
    /// then get at most MAX_FAILED_LOGINS + 86400 / ACCOUNT_LOCK_SECS
    /// evaluated guesses a day.
    #[arg(long, env = "ACCOUNT_LOCK_SECS", default_value_t = 900, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub account_lock_secs: u32,

    /// Failed logins (wrong passwords and codes, any names) and failed
    /// client authentications at the token endpoint that one client
    /// address may make an hour; 0 for no limit.
    #[arg(long, env = "LOGIN_FAILURES_PER_CLIENT_PER_HOUR", default_value_t = 100)]
    pub login_failures_per_client_per_hour: u32,

    /// Seconds after a refresh token's rotation in which redeeming it again
    /// answers the same successor instead of ending the session (two tabs
    /// refreshing at once); 0 turns the grace off.
    #[arg(long, env = "REFRESH_REUSE_GRACE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=300))]
    pub refresh_reuse_grace_secs: u32,

    /// Registrations one client address may attempt an hour (taken names
    /// count too); 0 for no limit.
    #[arg(long, env = "REGISTRATIONS_PER_CLIENT_PER_HOUR", default_value_t = 300)]
    pub registrations_per_client_per_hour: u32,

    /// How long a refresh token lives unused; each refresh starts a new one.
    #[arg(long, env = "REFRESH_TOKEN_TTL_SECS", default_value_t = 30 * 24 * 60 * 60)]
    pub refresh_token_ttl_secs: u32,

    /// How long a login lasts however often it is refreshed; then the user
    /// logs in again.
    #[arg(long, env = "SESSION_MAX_LIFETIME_SECS", default_value_t = 30 * 24 * 60 * 60)]
    pub session_max_lifetime_secs: u32,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            trusted_proxies: TrustedProxies::default(),
            max_failed_logins: 100,
            account_lock_secs: 900,
            login_failures_per_client_per_hour: 100,
            refresh_reuse_grace_secs: 10,
            registrations_per_client_per_hour: 300,
            refresh_token_ttl_secs: 30 * 24 * 60 * 60,
            session_max_lifetime_secs: 30 * 24 * 60 * 60,
        }
    }
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
            public_url: None,
            totp_issuer: "storegate".to_owned(),
            audit_retention_days: DEFAULT_AUDIT_RETENTION_DAYS,
            login: LoginPolicy::default(),
        }
    }
}
