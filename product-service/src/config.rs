//! product-service settings: flags with environment fallbacks.

use std::path::PathBuf;

use storegate::config::CommonConfig;

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9102";
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50052";
pub const DEFAULT_AUTH_SERVICE_URL: &str = "http://127.0.0.1:50051";

/// Deliberately not `Debug`: the database URL may hold a password.
#[derive(clap::Args, Clone)]
pub struct ProductConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Where Prometheus scrapes `/metrics` (HTTP); empty to turn it off.
    #[arg(long, env = "METRICS_LISTEN_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_listen_addr: String,

    /// Where the gRPC (and gRPC-Web) server listens.
    #[arg(long, visible_alias = "product-listen-addr", env = "PRODUCT_LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: String,

    /// auth-service, whose GetJwks publishes the keys that verify access tokens.
    #[arg(long, env = "AUTH_SERVICE_URL", default_value = DEFAULT_AUTH_SERVICE_URL)]
    pub auth_service_url: String,

    /// PEM CA that signs auth-service's certificate (for an https://
    /// AUTH_SERVICE_URL); without it, the system roots.
    #[arg(long, env = "AUTH_SERVICE_CA_FILE")]
    pub auth_service_ca_file: Option<PathBuf>,

    /// PEM client certificate for auth-service's mTLS (with AUTH_SERVICE_KEY_FILE).
    #[arg(long, env = "AUTH_SERVICE_CERT_FILE", requires = "auth_service_key_file")]
    pub auth_service_cert_file: Option<PathBuf>,

    /// PEM private key of AUTH_SERVICE_CERT_FILE.
    #[arg(long, env = "AUTH_SERVICE_KEY_FILE", requires = "auth_service_cert_file")]
    pub auth_service_key_file: Option<PathBuf>,

    /// Read the JWK Set from this file instead of asking auth-service
    /// (re-read on the same schedule).
    #[arg(long, env = "JWKS_FILE", conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,

    /// Fetch the JWK Set by HTTP GET from this URL instead of auth-service's
    /// GetJwks, e.g. `https://auth.example.com/.well-known/jwks.json`
    /// (refreshed on the same schedule; https:// verified with
    /// AUTH_SERVICE_CA_FILE, or the system roots, and its client certificate).
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// How often the key set is refreshed even when nothing asks for it.
    #[arg(long, env = "JWKS_REFRESH_INTERVAL_SECS", default_value_t = 300)]
    pub jwks_refresh_interval_secs: u64,

    /// The longest lifetime (exp - iat) of an access token accepted, in
    /// seconds; auth-service issues 900.
    #[arg(long, env = "JWT_MAX_LIFETIME_SECS", default_value_t = storegate::token::ACCESS_TOKEN_TTL_SECS)]
    pub jwt_max_lifetime_secs: i64,

    /// MySQL only: connections for GetProduct and unfiltered ListProducts
    /// pages, beside the pool (default: one per CPU core, at most 16).
    /// Reads waiting for one share its next statement; raise it when MySQL
    /// is across a network and many different pages are read at once.
    #[arg(long, env = "DB_READ_CONNECTIONS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub db_read_connections: Option<u16>,

    /// ListProducts calls with a `query` (full-text searches, whose cost
    /// grows with their matches) one caller (token `sub`) may have running
    /// at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SEARCH_CONCURRENCY_PER_CALLER", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub search_concurrency_per_caller: u16,

    /// ListProducts calls with a `query` the server runs at once, all callers
    /// together (default: half the database pool's connections, so that
    /// searches never hold them all).
    #[arg(long, env = "SEARCH_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    pub search_concurrency: Option<u16>,

    /// How long a search waits for a place when the server runs
    /// SEARCH_CONCURRENCY of them, before RESOURCE_EXHAUSTED (0: refused
    /// at once). A caller over its own share is always refused at once.
    #[arg(long, env = "SEARCH_WAIT_MS", default_value_t = 250)]
    pub search_wait_ms: u64,

    /// A search the catalogue's sample estimates to match more products
    /// than this is matched over a bounded read of the catalogue instead of
    /// on the full-text index (at most twice this many products read, by
    /// relevance windows of a fiftieth of it ranked at a time), and so is
    /// one whose words' lists would cost the index more than that read. A
    /// word in at most a tenth of this many products may be looked up alone
    /// and the others matched in Rust. A search's total_size is exact up to
    /// this many, an estimate for a bounded read.
    #[arg(long, env = "SEARCH_INDEX_MAX_MATCHES",
          default_value_t = crate::search_sample::DEFAULT_INDEX_MATCHES,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub search_index_max_matches: u32,
}

impl ProductConfig {
    /// How product-service reaches auth-service's TLS.
    pub fn auth_service_tls(&self) -> storegate::tls::ClientTlsFiles {
        storegate::tls::ClientTlsFiles {
            ca: self.auth_service_ca_file.clone(),
            cert: self.auth_service_cert_file.clone(),
            key: self.auth_service_key_file.clone(),
        }
    }

    /// Defaults on the given database (for tests and embedding).
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        ProductConfig {
            common: CommonConfig::with_database_url(database_url),
            listen_addr: DEFAULT_LISTEN_ADDR.to_owned(),
            metrics_listen_addr: String::new(),
            auth_service_url: DEFAULT_AUTH_SERVICE_URL.to_owned(),
            auth_service_ca_file: None,
            auth_service_cert_file: None,
            auth_service_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_interval_secs: 300,
            jwt_max_lifetime_secs: storegate::token::ACCESS_TOKEN_TTL_SECS,
            db_read_connections: None,
            search_concurrency_per_caller: 2,
            search_concurrency: None,
            search_wait_ms: 250,
            search_index_max_matches: crate::search_sample::DEFAULT_INDEX_MATCHES,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: ProductConfig,
    }

    #[test]
    fn read_connections_are_one_or_more_when_given() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["product-service"], args].concat());
        assert_eq!(parse(&[]).unwrap().config.db_read_connections, None, "one per core then");
        assert_eq!(parse(&["--db-read-connections", "4"]).unwrap().config.db_read_connections, Some(4));
        for wrong in ["0", "-1", "many", "5000"] {
            assert!(parse(&[&format!("--db-read-connections={wrong}")]).is_err(), "{wrong}");
        }
    }

    #[test]
    fn search_limits_default_to_two_per_caller_and_are_at_least_one() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["product-service"], args].concat());
        let config = parse(&[]).unwrap().config;
        assert_eq!((config.search_concurrency_per_caller, config.search_concurrency), (2, None));
        let config = parse(&["--search-concurrency-per-caller=1", "--search-concurrency=3"]).unwrap().config;
        assert_eq!((config.search_concurrency_per_caller, config.search_concurrency), (1, Some(3)));
        assert!(parse(&["--search-concurrency-per-caller=0"]).is_err());
        assert!(parse(&["--search-concurrency=0"]).is_err());
    }

    #[test]
    fn searches_on_the_index_are_bounded_at_ten_thousand_matches_unless_configured() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["product-service"], args].concat());
        assert_eq!(parse(&[]).unwrap().config.search_index_max_matches, 10_000);
        let config = parse(&["--search-index-max-matches=500"]).unwrap().config;
        assert_eq!(config.search_index_max_matches, 500);
        for wrong in ["0", "-1", "many", "1000001"] {
            assert!(parse(&[&format!("--search-index-max-matches={wrong}")]).is_err(), "{wrong}");
        }
    }
}
