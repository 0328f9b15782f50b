//! The Ed25519 keys that sign access tokens.
//!
//! Keys live in the database (private halves sealed with the master key), so
//! every replica signs with the same key and publishes the same set. The
//! first start creates one. Key ids are RFC 7638 thumbprints of the public key.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest as _, Sha256};
use storegate::{
    ApiError,
    token::{ACCESS_TOKEN_TYPE, Claims, Jwks, PublicJwk},
};
use tokio::sync::RwLock;

use crate::audit;
use crate::crypto::MasterKey;
use crate::store::{AuthStore, StoredSigningKey};

/// A key that signs tokens.
struct Signer {
    kid: String,
    key: EncodingKey,
    /// When this replica last asked the database which key is current.
    checked_at: Instant,
}

/// The signing key in use, and the published set.
#[derive(Clone)]
pub struct SigningKeys {
    store: AuthStore,
    master_key: MasterKey,
    signer: Arc<RwLock<Arc<Signer>>>,
    /// The serialised JWK Set and when it was read: GetJwks is called by
    /// every verifier, and must answer at once even while the database is
    /// busy with a login storm.
    published: Arc<RwLock<Option<PublishedJson>>>,
}

/// The JWK Set as JSON, and when it was read from the database.
type PublishedJson = (Instant, Arc<str>);

/// How often a replica re-reads which key signs, to follow a rotation.
const SIGNER_RECHECK: Duration = Duration::from_secs(2);

/// How long a read of the published keys is served from memory. Rotation
/// publishes a key long before signing with it, so replicas agreeing a few
/// seconds late changes nothing.
const PUBLISHED_CACHE_TTL: Duration = Duration::from_secs(5);

fn seal_context(kid: &str) -> String {
    format!("signing_key:{kid}")
}

/// The RFC 7638 thumbprint of an Ed25519 public key.
fn thumbprint(public_key: &[u8; 32]) -> String {
    let canonical =
        format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, URL_SAFE_NO_PAD.encode(public_key));
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn public_key_bytes(stored: &StoredSigningKey) -> Option<[u8; 32]> {
    stored.public_key.as_slice().try_into().ok()
}

impl SigningKeys {
    /// Loads the signing key, creating the first one if the database has
    /// none. Fails clearly when the master key cannot open it.
    pub async fn load(store: AuthStore, master_key: MasterKey) -> anyhow::Result<Self> {
        let now = storegate::db::now();
        if store.current_signing_key(now).await?.is_none() {
            let key = Self::new_key(&master_key)?;
            store.rotate_signing_key(&key, now, now).await?;
            tracing::info!(kid = key.kid, "created the first signing key");
            let entry = audit::Entry::new(audit::Event::KeyRotated, audit::Actor::System);
            audit::record(&store, entry.detail(format!("first key {}", key.kid))).await;
        }
        let signer = Self::current(&store, &master_key).await?;
        Ok(SigningKeys {
            store,
            master_key,
            signer: Arc::new(RwLock::new(Arc::new(signer))),
            published: Arc::default(),
        })
    }

    /// A fresh key pair, its private half sealed with the master key.
    fn new_key(master_key: &MasterKey) -> anyhow::Result<StoredSigningKey> {
        let signing_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let public_key = signing_key.verifying_key().to_bytes();
        let kid = thumbprint(&public_key);
        let pkcs8 = signing_key.to_pkcs8_der().context("cannot encode the signing key")?;
        let private_key = master_key.encrypt(pkcs8.as_bytes(), &seal_context(&kid))?;
        Ok(StoredSigningKey { kid, public_key: public_key.to_vec(), private_key })
    }

    /// Key rotation: adds a key that is published now and signs from
    /// `now + activate_after`, when every other key retires. Verifiers must
    /// have fetched the new key set by then; retired keys stay published
    /// until the tokens they signed have expired. Returns the new kid.
    pub async fn rotate(
        store: &AuthStore,
        master_key: &MasterKey,
        activate_after: Duration,
    ) -> anyhow::Result<String> {
        let key = Self::new_key(master_key)?;
        let now = storegate::db::now();
        store.rotate_signing_key(&key, now, now + chrono::Duration::from_std(activate_after)?).await?;
        Ok(key.kid)
    }

    async fn current(store: &AuthStore, master_key: &MasterKey) -> anyhow::Result<Signer> {
        let stored = store
            .current_signing_key(storegate::db::now())
            .await?
            .context("no signing key is active; run `auth-service rotate-keys`")?;
        Self::open(master_key, &stored)
    }

    fn open(master_key: &MasterKey, stored: &StoredSigningKey) -> anyhow::Result<Signer> {
        let pkcs8 = master_key.decrypt(&stored.private_key, &seal_context(&stored.kid)).context(
            "the signing key in the database cannot be decrypted: STOREGATE_MASTER_KEY is not \
             the key this database was set up with",
        )?;
        Ok(Signer {
            kid: stored.kid.clone(),
            key: EncodingKey::from_ed_der(&pkcs8),
            checked_at: Instant::now(),
        })
    }

    /// Signs `claims` as an access token with the current key.
    pub async fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        self.sign_with(header, claims).await
    }

    /// Signs any payload under `header` (its alg and kid are set here) with
    /// the current key.
    pub async fn sign_with(
        &self,
        mut header: Header,
        payload: &impl serde::Serialize,
    ) -> anyhow::Result<String> {
        let signer = self.signer().await?;
        header.alg = Algorithm::EdDSA;
        header.kid = Some(signer.kid.clone());
        jsonwebtoken::encode(&header, payload, &signer.key).context("cannot sign the token")
    }

    /// The key to sign with, re-read from the database every few seconds so
    /// that all replicas follow a rotation.
    async fn signer(&self) -> anyhow::Result<Arc<Signer>> {
        let cached = self.signer.read().await.clone();
        if cached.checked_at.elapsed() < SIGNER_RECHECK {
            return Ok(cached);
        }
        let fresh = match Self::current(&self.store, &self.master_key).await {
            Ok(signer) => Arc::new(signer),
            Err(e) => {
                // Keep signing with the known key rather than fail logins.
                tracing::warn!(error = format!("{e:#}"), "cannot re-read the signing key");
                return Ok(cached);
            }
        };
        if fresh.kid != cached.kid {
            tracing::info!(kid = fresh.kid, "signing with a new key");
        }
        *self.signer.write().await = fresh.clone();
        Ok(fresh)
    }

    /// The published public keys as a JWK Set.
    pub async fn jwks(&self) -> Result<Jwks, sqlx::Error> {
        let keys = self.store.published_signing_keys(storegate::db::now()).await?;
        Ok(Jwks {
            keys: keys
                .iter()
                .filter_map(|k| Some(PublicJwk::ed25519(&k.kid, &public_key_bytes(k)?)))
                .collect(),
        })
    }

    /// [`Self::jwks`] as JSON, read from the database at most every few
    /// seconds; while the database is unreachable, the last set read.
    pub async fn jwks_json(&self) -> Result<Arc<str>, ApiError> {
        let cached = self.published.read().await.clone();
        if let Some((read_at, json)) = &cached
            && read_at.elapsed() < PUBLISHED_CACHE_TTL
        {
            return Ok(json.clone());
        }
        match self.jwks().await {
            Ok(jwks) => {
                let json: Arc<str> = serde_json::to_string(&jwks).map_err(anyhow::Error::new)?.into();
                *self.published.write().await = Some((Instant::now(), json.clone()));
                Ok(json)
            }
            Err(e) => match cached {
                Some((_, json)) => {
                    tracing::warn!(error = %e, "cannot re-read the published keys; serving the last set");
                    Ok(json)
                }
                None => Err(e.into()),
            },
        }
    }

    pub fn master_key(&self) -> &MasterKey {
        &self.master_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 8037 Appendix A.3: the thumbprint of the A.2 public key.
        let x = URL_SAFE_NO_PAD.decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        let x: [u8; 32] = x.try_into().unwrap();
        assert_eq!(thumbprint(&x), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }
}
