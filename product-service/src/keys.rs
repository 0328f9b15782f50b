//! The public keys that verify access tokens, kept fresh in the background.
//!
//! The interceptor is synchronous and must never wait on the network, so it
//! only reads the cached [`KeySet`]. A background task refreshes it on a
//! timer, and sooner when a token names a kid the cache does not know (at
//! most once per [`MIN_REFETCH_GAP`], so a flood of made-up kids cannot
//! hammer auth-service). A failed refresh keeps the cached keys: tokens keep
//! verifying while auth-service is down.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use storegate::{
    pb::auth::v1::{GetJwksRequest, auth_service_client::AuthServiceClient},
    tls::ClientTlsFiles,
    token::KeySet,
};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use tracing::Instrument as _;

pub const MIN_REFETCH_GAP: Duration = Duration::from_secs(5);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// Where the JWK Set comes from.
#[derive(Clone)]
pub enum KeySource {
    /// auth-service's GetJwks.
    Auth(AuthServiceClient<Channel>),
    /// A JWK Set file, for deployments that distribute keys themselves.
    File(PathBuf),
    /// A JWK Set by HTTP GET (JWKS_URL).
    Url(crate::jwks_url::JwksUrl),
}

impl KeySource {
    /// GetJwks at `url`: over TLS, verified, for https:// (the key set is
    /// the service's only trust anchor: never fetched over a downgrade).
    pub fn auth(url: &str, tls: &ClientTlsFiles) -> anyhow::Result<Self> {
        let endpoint = storegate::tls::client_endpoint(url, "AUTH_SERVICE_URL", tls)?
            .connect_timeout(FETCH_TIMEOUT)
            .timeout(FETCH_TIMEOUT);
        Ok(KeySource::Auth(AuthServiceClient::new(endpoint.connect_lazy())))
    }

    async fn fetch(&self) -> anyhow::Result<KeySet> {
        let json = match self {
            KeySource::Auth(client) => {
                client
                    .clone()
                    .get_jwks(storegate::telemetry::traced_request(GetJwksRequest {}))
                    .await
                    .context("GetJwks failed")?
                    .into_inner()
                    .jwks_json
            }
            KeySource::File(path) => tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("cannot read JWKS_FILE {}", path.display()))?,
            KeySource::Url(url) => tokio::time::timeout(FETCH_TIMEOUT, url.fetch())
                .await
                .context("JWKS_URL did not answer in time")??,
        };
        KeySet::parse_jwks_json(&json).context("the JWK Set is not valid JSON")
    }
}

/// Fetch attempts so far, and whether any of them brought a key set.
#[derive(Clone, Copy, Default)]
struct Fetches {
    attempts: u64,
    loaded: bool,
    last: Option<tokio::time::Instant>,
}

/// The cached key set, shared by the interceptor and the refresher.
#[derive(Clone)]
pub struct JwksCache {
    keys: Arc<RwLock<Arc<KeySet>>>,
    refresh_wanted: Arc<Notify>,
    /// The span of the call that asked for the next fetch: the fetch is
    /// part of that call's trace.
    requested_by: Arc<std::sync::Mutex<Option<tracing::Span>>>,
    fetches: watch::Sender<Fetches>,
}

impl Default for JwksCache {
    fn default() -> Self {
        JwksCache {
            keys: Arc::default(),
            refresh_wanted: Arc::new(Notify::new()),
            requested_by: Arc::default(),
            fetches: watch::Sender::new(Fetches::default()),
        }
    }
}

impl JwksCache {
    pub fn current(&self) -> Arc<KeySet> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc;
        // the value inside is still whole.
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    fn record_fetch(&self, loaded: bool) {
        self.fetches.send_modify(|f| {
            f.attempts += 1;
            f.loaded |= loaded;
            f.last = Some(tokio::time::Instant::now());
        });
    }

    /// For a token naming a kid we do not know: fetch now, unless a fetch
    /// happened within [`MIN_REFETCH_GAP`] (then the kid is simply unknown),
    /// and wait up to `timeout` for it.
    pub async fn refresh_for_unknown_kid(&self, timeout: Duration) {
        let mut fetches = self.fetches.subscribe();
        let seen = *fetches.borrow();
        if seen.last.is_some_and(|last| last.elapsed() < MIN_REFETCH_GAP) {
            return;
        }
        self.request_refresh();
        let _ = tokio::time::timeout(timeout, fetches.wait_for(|f| f.attempts > seen.attempts)).await;
    }

    /// Asks the refresher to fetch now (a token named an unknown kid).
    pub fn request_refresh(&self) {
        *self.requested_by.lock().unwrap_or_else(|e| e.into_inner()) = Some(tracing::Span::current());
        self.refresh_wanted.notify_one();
    }

    /// Whether a key set has arrived (health says SERVING only then: no call
    /// can be answered without keys).
    pub fn is_loaded(&self) -> bool {
        self.fetches.borrow().loaded
    }

    /// Waits until the first key set has arrived, or `timeout` passes.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let mut fetches = self.fetches.subscribe();
        tokio::time::timeout(timeout, fetches.wait_for(|f| f.loaded)).await.is_ok_and(|r| r.is_ok())
    }

    /// Refreshes forever: every `interval`, on request (rate-limited), and
    /// with growing retries until the first fetch succeeds.
    pub async fn keep_fresh(self, source: KeySource, interval: Duration) {
        let mut retry = FIRST_RETRY;
        loop {
            let fetched_at = tokio::time::Instant::now();
            let requested_by = self.requested_by.lock().unwrap_or_else(|e| e.into_inner()).take();
            let span = match requested_by {
                Some(call) => tracing::info_span!(parent: &call, "fetch signing keys"),
                None => tracing::info_span!(parent: None, "fetch signing keys"),
            };
            // The fetch and what it logs belong to the call that asked for it.
            let wait = async {
                match source.fetch().await {
                    Ok(keys) if keys.is_empty() => {
                        // Never trade working keys for none: keep the cached set.
                        tracing::warn!("the JWK Set has no usable Ed25519 key; keeping the cached keys");
                        self.record_fetch(false);
                        let wait = retry;
                        retry = (retry * 2).min(interval);
                        wait
                    }
                    Ok(keys) => {
                        tracing::debug!(keys = keys.len(), "signing keys refreshed");
                        self.replace(keys);
                        self.record_fetch(true);
                        retry = FIRST_RETRY;
                        interval
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "cannot refresh signing keys; keeping the cached ones"
                        );
                        self.record_fetch(false);
                        let wait = retry;
                        retry = (retry * 2).min(interval);
                        wait
                    }
                }
            }
            .instrument(span)
            .await;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.refresh_wanted.notified() => {
                    // Requested early: still leave a gap since the last fetch.
                    tokio::time::sleep_until(fetched_at + MIN_REFETCH_GAP.min(wait)).await;
                }
            }
        }
    }
}
