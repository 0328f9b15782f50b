//! Password hashing with argon2id, off the async runtime and bounded.
//!
//! Each hash costs ~19 MiB and ~20 ms of one core. Hashes run on the blocking
//! pool, at most one per core at a time; a bounded queue in front of them
//! makes a login storm fail fast with RESOURCE_EXHAUSTED instead of piling up
//! memory and starving the other calls.

use std::sync::Arc;

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
    password_hash::SaltString,
};
use storegate::ApiError;
use tokio::sync::Semaphore;

/// OWASP's argon2id minimum: 19 MiB, 2 passes, 1 lane.
const MEMORY_KIB: u32 = 19_456;
const ITERATIONS: u32 = 2;
const PARALLELISM: u32 = 1;

/// How many hash requests may wait per core before new ones are refused.
const QUEUE_PER_CORE: usize = 32;

#[derive(Clone)]
pub struct PasswordHasher {
    /// Bounds running hashes to the number of cores.
    running: Arc<Semaphore>,
    /// Bounds running + waiting hashes.
    admitted: Arc<Semaphore>,
    /// A hash of a random password: unknown usernames are verified against it
    /// so that they take as long as known ones.
    dummy_hash: Arc<str>,
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .expect("argon2 parameters are valid constants");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl PasswordHasher {
    pub fn new() -> anyhow::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dummy_password = crate::crypto::random_token();
        let dummy_hash = hash_blocking(&dummy_password)?;
        Ok(PasswordHasher {
            running: Arc::new(Semaphore::new(cores)),
            admitted: Arc::new(Semaphore::new(cores * QUEUE_PER_CORE)),
            dummy_hash: dummy_hash.into(),
        })
    }

    /// The PHC string of a fresh salted argon2id hash.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.run(move || hash_blocking(&password)).await?.map_err(ApiError::Internal)
    }

    /// Checks `password` against `stored` (a PHC string), or against the
    /// dummy hash when there is no such user, so both take the same time.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let matches = self
            .run(move || {
                PasswordHash::new(&stored)
                    .map(|parsed| argon2().verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && matches)
    }

    /// Runs CPU-heavy work (a hash, a password check) on the blocking pool,
    /// at most one per core, failing fast when too many are waiting.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _admitted =
            self.admitted.clone().try_acquire_owned().map_err(|_| ApiError::ResourceExhausted {
                message: "the server is busy checking passwords; try again shortly",
                retry_after: Some(std::time::Duration::from_secs(1)),
            })?;
        let _running =
            self.running.clone().acquire_owned().await.map_err(|_| ApiError::Unavailable("shutting down"))?;
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            lower_thread_priority();
            span.in_scope(work)
        })
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("password hashing task failed: {e}")))
    }
}

/// Hashing threads yield the CPU to the async runtime: with every core busy
/// hashing, health checks and token calls must still answer at once. On
/// Linux the nice value is per thread; raising it needs no privilege and is
/// idempotent, so repeating it on a reused blocking thread costs one syscall.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; who = 0 names
    // the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = argon2()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2 hashing failed: {e}"))?;
    Ok(hash.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let hasher = PasswordHasher::new().unwrap();
        let hash = hasher.hash("correct horse battery".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(hasher.verify("correct horse battery".into(), Some(hash.clone())).await.unwrap());
        assert!(!hasher.verify("correct horse batter".into(), Some(hash.clone())).await.unwrap());
        // Same password, new salt: a different hash.
        assert_ne!(hash, hasher.hash("correct horse battery".into()).await.unwrap());
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies_even_with_the_dummy_password() {
        let hasher = PasswordHasher::new().unwrap();
        assert!(!hasher.verify("anything".into(), None).await.unwrap());
    }
}
