//! Password hashing with argon2id, off the async runtime and bounded.
//!
//! Each hash costs ~19 MiB and ~20 ms of one core. Hashes run on the blocking
//! pool, at most one per core at a time; a bounded queue in front of them
//! makes a login storm fail fast with RESOURCE_EXHAUSTED instead of piling up
//! memory and starving the other calls.

use std::sync::{Arc, Mutex};

use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, Version,
    password_hash::{Output, ParamsString, SaltString},
};
use storegate::ApiError;
use tokio::sync::Semaphore;

/// OWASP's argon2id minimum: 19 MiB, 2 passes, 1 lane.
const MEMORY_KIB: u32 = 19_456;
const ITERATIONS: u32 = 2;
const PARALLELISM: u32 = 1;
const OUTPUT_LEN: usize = 32;

/// How many hash requests may wait per core before new ones are refused.
const QUEUE_PER_CORE: usize = 32;

#[derive(Clone)]
pub struct PasswordHasher {
    /// Bounds running hashes to the number of cores.
    running: Arc<Semaphore>,
    /// Bounds running + waiting hashes.
    admitted: Arc<Semaphore>,
    admitted_capacity: usize,
    /// argon2's working memory, kept between hashes while more are waiting.
    spare_memory: Arc<Mutex<Vec<Vec<Block>>>>,
    /// A hash of a random password: unknown usernames are verified against it
    /// so that they take as long as known ones.
    dummy_hash: Arc<str>,
}

fn params() -> Params {
    Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, Some(OUTPUT_LEN))
        .expect("argon2 parameters are valid constants")
}

impl PasswordHasher {
    pub fn new() -> anyhow::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dummy_password = crate::crypto::random_token();
        let mut memory = vec![Block::default(); params().block_count()];
        let dummy_hash = hash_with(&dummy_password, &mut memory)?;
        Ok(PasswordHasher {
            running: Arc::new(Semaphore::new(cores)),
            admitted: Arc::new(Semaphore::new(cores * QUEUE_PER_CORE)),
            admitted_capacity: cores * QUEUE_PER_CORE,
            spare_memory: Arc::default(),
            dummy_hash: dummy_hash.into(),
        })
    }

    /// The PHC string of a fresh salted argon2id hash.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let this = self.clone();
        let blocks = params().block_count();
        self.run(move || this.with_memory(blocks, |memory| hash_with(&password, memory)))
            .await?
            .map_err(ApiError::Internal)
    }

    /// Checks `password` against `stored` (a PHC string), or against the
    /// dummy hash when there is no such user, so both take the same time.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let this = self.clone();
        let matches = self
            .run(move || {
                let Ok(parsed) = PasswordHash::new(&stored) else { return false };
                let Ok(params) = Params::try_from(&parsed) else { return false };
                this.with_memory(params.block_count(), |memory| {
                    verify_with(&password, &parsed, params, memory).unwrap_or(false)
                })
            })
            .await?;
        Ok(known && matches)
    }

    /// Lends `work` argon2 memory of at least `blocks` blocks: a spare one
    /// when there is one, else fresh. Afterwards the memory is kept for the
    /// next hash while others are admitted, and all spare memory is released
    /// when this was the last: a login storm does not pay for fresh pages
    /// on every hash (~30% of its time), and an idle service holds none.
    /// At most one block per running hash exists, so at most one per core.
    fn with_memory<T>(&self, blocks: usize, work: impl FnOnce(&mut [Block]) -> T) -> T {
        let spare = {
            let mut spare = self.spare_memory.lock().unwrap_or_else(|e| e.into_inner());
            spare.iter().position(|m| m.len() >= blocks).map(|i| spare.swap_remove(i))
        };
        let mut memory = spare.unwrap_or_else(|| vec![Block::default(); blocks]);
        let result = work(&mut memory);
        // Our own admission is still held: more than one means others wait.
        let others_admitted = self.admitted_capacity - self.admitted.available_permits() > 1;
        let mut spare = self.spare_memory.lock().unwrap_or_else(|e| e.into_inner());
        if others_admitted {
            spare.push(memory);
        } else {
            spare.clear();
        }
        result
    }

    #[cfg(test)]
    fn spare_blocks(&self) -> usize {
        self.spare_memory.lock().unwrap().len()
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

/// A fresh salted argon2id hash of `password` as a PHC string, computed in
/// `memory`.
fn hash_with(password: &str, memory: &mut [Block]) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let mut salt_bytes = [0; 64];
    let salt_bytes =
        salt.as_salt().decode_b64(&mut salt_bytes).map_err(|e| anyhow::anyhow!("argon2 salt: {e}"))?;
    let mut output = [0; OUTPUT_LEN];
    let params = params();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut output, memory)
        .map_err(|e| anyhow::anyhow!("argon2 hashing failed: {e}"))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&output).map_err(|e| anyhow::anyhow!("argon2 output: {e}"))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` hashes to `stored` with the stored algorithm,
/// version, parameters and salt, computed in `memory`. `None` when the
/// stored hash cannot be checked at all.
fn verify_with(
    password: &str,
    stored: &PasswordHash<'_>,
    params: Params,
    memory: &mut [Block],
) -> Option<bool> {
    let algorithm = Algorithm::try_from(stored.algorithm).ok()?;
    let version = stored.version.map_or(Ok(Version::default()), Version::try_from).ok()?;
    let (salt, expected) = (stored.salt?, stored.hash?);
    let mut salt_bytes = [0; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).ok()?;
    let mut output = vec![0; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt_bytes, &mut output, memory)
        .ok()?;
    // Output's equality is constant-time.
    Some(Output::new(&output).ok()? == expected)
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
    async fn hashes_interoperate_with_the_stock_argon2_verifier_and_hasher() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let hasher = PasswordHasher::new().unwrap();
        let ours = hasher.hash("correct horse battery".into()).await.unwrap();
        let stock = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        assert!(stock.verify_password(b"correct horse battery", &PasswordHash::new(&ours).unwrap()).is_ok());
        assert!(stock.verify_password(b"correct horse batter", &PasswordHash::new(&ours).unwrap()).is_err());

        // A stored hash with other parameters (an older or newer policy)
        // still verifies: parameters, salt and length come from the hash.
        let other = Params::new(8 * 1024, 1, 1, Some(24)).unwrap();
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, other)
            .hash_password(b"correct horse battery", &salt)
            .unwrap()
            .to_string();
        assert!(hasher.verify("correct horse battery".into(), Some(theirs.clone())).await.unwrap());
        assert!(!hasher.verify("correct horse batter".into(), Some(theirs)).await.unwrap());
        assert!(
            !hasher.verify("correct horse battery".into(), Some("$argon2id$garbage".into())).await.unwrap()
        );
    }

    #[test]
    fn working_memory_is_kept_only_while_other_hashes_are_admitted() {
        let hasher = PasswordHasher::new().unwrap();
        let blocks = params().block_count();
        let ours = hasher.admitted.clone().try_acquire_owned().unwrap();
        hasher.with_memory(blocks, |memory| assert!(memory.len() >= blocks));
        assert_eq!(hasher.spare_blocks(), 0, "alone: the memory goes back to the system");

        let waiting = hasher.admitted.clone().try_acquire_owned().unwrap();
        hasher.with_memory(blocks, |_| ());
        assert_eq!(hasher.spare_blocks(), 1, "another hash waits: kept for it");
        let spare_address = hasher.spare_memory.lock().unwrap()[0].as_ptr();
        hasher.with_memory(blocks, |memory| assert_eq!(memory.as_ptr(), spare_address, "reused"));
        assert_eq!(hasher.spare_blocks(), 1);

        drop(waiting);
        hasher.with_memory(blocks, |_| ());
        assert_eq!(hasher.spare_blocks(), 0, "the last one releases every spare");
        drop(ours);
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies_even_with_the_dummy_password() {
        let hasher = PasswordHasher::new().unwrap();
        assert!(!hasher.verify("anything".into(), None).await.unwrap());
    }
}
