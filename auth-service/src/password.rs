//! Password hashing with argon2id, off the async runtime and bounded.
//!
//! Each hash costs ~19 MiB and ~20 ms of one core. Hashes run on the blocking
//! pool, at most one per core at a time; a bounded queue in front of them
//! makes a login storm fail fast with RESOURCE_EXHAUSTED instead of piling up
//! memory and starving the other calls. The queue is shared fairly between
//! client addresses ([`KeyedLimit::fair`]): a client that holds places may
//! take another only while it holds fewer than half of the free ones, so
//! one address flooding it leaves room for everyone else.

use std::sync::{Arc, Mutex};

use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, Version,
    password_hash::{Output, ParamsString, SaltString},
};
use storegate::{
    ApiError,
    keyed_limit::{KeyedLimit, Permit},
};
use tokio::sync::Semaphore;

use crate::client::Client;

/// OWASP's argon2id minimum: 19 MiB, 2 passes, 1 lane.
const MEMORY_KIB: u32 = 19_456;
const ITERATIONS: u32 = 2;
const PARALLELISM: u32 = 1;
const OUTPUT_LEN: usize = 32;

/// How many hash requests may wait per core before new ones are refused
/// (and a client's fair share of them, see the module's doc).
const QUEUE_PER_CORE: usize = 32;
const BUSY: &str = "the server is busy checking passwords; try again shortly";
/// Largest stored parameters verified: a hash asking for more (tampered,
/// or from a foreign system) is refused rather than allowed to exhaust
/// memory or time.
const MAX_STORED_MEMORY_KIB: u32 = 256 * 1024;
const MAX_STORED_ITERATIONS: u32 = 16;
const MAX_STORED_PARALLELISM: u32 = 8;

/// argon2 working areas (19 MiB each) kept between hashes, and how many
/// hashes are admitted, changed together under one lock so that the last
/// hash to leave reliably releases every spare area.
#[derive(Default)]
struct SpareMemory {
    areas: Vec<Vec<Block>>,
    admitted: usize,
}

/// One admitted hash. Dropped when the hash has really finished (it moves
/// into the blocking task), or when its caller gave up before it started.
struct Admission {
    spare: Arc<Mutex<SpareMemory>>,
}

fn lock(spare: &Mutex<SpareMemory>) -> std::sync::MutexGuard<'_, SpareMemory> {
    // A poisoned lock only means a hash panicked; the bookkeeping is whole.
    spare.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    fn new(spare: &Arc<Mutex<SpareMemory>>) -> Admission {
        lock(spare).admitted += 1;
        Admission { spare: spare.clone() }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut spare = lock(&self.spare);
        spare.admitted -= 1;
        if spare.admitted == 0 {
            spare.areas.clear();
        }
    }
}

/// A place in the hashing queue for one piece of work, taken by
/// [`PasswordHasher::place`] before the work is due (a login takes it before
/// its throttles are counted, so that a call refused as busy has cost
/// nothing), and given back when the work is done or the place dropped.
pub struct Place {
    permit: Permit<Client>,
}

#[derive(Clone)]
pub struct PasswordHasher {
    /// Bounds running hashes to the number of cores.
    running: Arc<Semaphore>,
    /// Bounds running + waiting hashes, shared fairly by client.
    admitted: Arc<KeyedLimit<Client>>,
    /// argon2's working memory, kept between hashes while more are admitted.
    spare_memory: Arc<Mutex<SpareMemory>>,
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
        let queue = cores * QUEUE_PER_CORE;
        Ok(PasswordHasher {
            running: Arc::new(Semaphore::new(cores)),
            admitted: KeyedLimit::fair(queue, queue),
            spare_memory: Arc::default(),
            dummy_hash: dummy_hash.into(),
        })
    }

    /// A place in the queue for `client`'s next piece of work, or
    /// RESOURCE_EXHAUSTED (with a RetryInfo of 1 s) at once when the queue
    /// is full or the client holds its share of it.
    pub fn place(&self, client: Client) -> Result<Place, ApiError> {
        let permit = self.admitted.try_start(&client.grouped()).map_err(|_| ApiError::ResourceExhausted {
            message: BUSY,
            retry_after: Some(std::time::Duration::from_secs(1)),
        })?;
        Ok(Place { permit })
    }

    /// The PHC string of a fresh salted argon2id hash.
    pub async fn hash(&self, client: Client, password: String) -> Result<String, ApiError> {
        let this = self.clone();
        let blocks = params().block_count();
        self.run(client, move || this.with_memory(blocks, |memory| hash_with(&password, memory)))
            .await?
            .map_err(ApiError::Internal)
    }

    /// Checks `password` against `stored` (a PHC string), or against the
    /// dummy hash when there is no such user, so both take the same time.
    pub async fn verify(
        &self,
        client: Client,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        self.verify_in(self.place(client)?, password, stored).await
    }

    /// [`PasswordHasher::verify`] in a place already taken.
    pub async fn verify_in(
        &self,
        place: Place,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let this = self.clone();
        let matches = self
            .run_in(place, move || {
                let Ok(parsed) = PasswordHash::new(&stored) else {
                    tracing::warn!("a stored password hash is not a PHC string; refusing the password");
                    return false;
                };
                let Some(params) = Params::try_from(&parsed).ok().filter(within_limits) else {
                    tracing::warn!("a stored password hash has unusable parameters; refusing the password");
                    return false;
                };
                this.with_memory(params.block_count(), |memory| {
                    verify_with(&password, &parsed, params, memory).unwrap_or(false)
                })
            })
            .await?;
        Ok(known && matches)
    }

    /// Lends `work` argon2 memory of at least `blocks` 1-KiB blocks: a
    /// spare area when there is one, else fresh. Afterwards the area is kept
    /// for the next hash while others are admitted; the last admitted hash
    /// to finish releases all of them ([`Admission`]). So a login storm does
    /// not pay for fresh pages on every hash (BENCHMARKS.md, below "Criterion
    /// micro-benchmarks"), and an idle service holds none. Areas are only handed out to running
    /// hashes, so there are at most as many as cores.
    fn with_memory<T>(&self, blocks: usize, work: impl FnOnce(&mut [Block]) -> T) -> T {
        let spare = {
            let mut spare = lock(&self.spare_memory);
            spare.areas.iter().position(|m| m.len() == blocks).map(|i| spare.areas.swap_remove(i))
        };
        let mut memory = spare.unwrap_or_else(|| vec![Block::default(); blocks]);
        let result = work(&mut memory);
        let mut spare = lock(&self.spare_memory);
        // This hash's own admission still counts: more than one means others.
        if spare.admitted > 1 {
            spare.areas.push(memory);
        }
        result
    }

    #[cfg(test)]
    fn spare_areas(&self) -> usize {
        lock(&self.spare_memory).areas.len()
    }

    #[cfg(test)]
    fn admitted_total(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get()) * QUEUE_PER_CORE
    }

    /// Runs CPU-heavy work (a hash, a password check) for `client` on the
    /// blocking pool, at most one per core, failing fast when too many are
    /// waiting or the client holds its share of the queue.
    pub async fn run<T: Send + 'static>(
        &self,
        client: Client,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.run_in(self.place(client)?, work).await
    }

    /// [`PasswordHasher::run`] in a place already taken.
    pub async fn run_in<T: Send + 'static>(
        &self,
        place: Place,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let admitted = place.permit;
        let admission = Admission::new(&self.spare_memory);
        let running =
            self.running.clone().acquire_owned().await.map_err(|_| ApiError::Unavailable("shutting down"))?;
        let span = tracing::Span::current();
        // The admission and the running slot go with the work: a caller
        // that gives up does not free them while the hash still runs.
        tokio::task::spawn_blocking(move || {
            let _held = (admitted, admission, running);
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

/// Whether stored parameters are within what this service will compute.
fn within_limits(params: &Params) -> bool {
    params.m_cost() <= MAX_STORED_MEMORY_KIB
        && params.t_cost() <= MAX_STORED_ITERATIONS
        && params.p_cost() <= MAX_STORED_PARALLELISM
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

    const HERE: Client = Client::Unknown;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let hasher = PasswordHasher::new().unwrap();
        let hash = hasher.hash(HERE, "correct horse battery".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(hasher.verify(HERE, "correct horse battery".into(), Some(hash.clone())).await.unwrap());
        assert!(!hasher.verify(HERE, "correct horse batter".into(), Some(hash.clone())).await.unwrap());
        // Same password, new salt: a different hash.
        assert_ne!(hash, hasher.hash(HERE, "correct horse battery".into()).await.unwrap());
    }

    #[test]
    fn one_client_holds_at_most_its_share_of_the_queue_and_others_still_get_in() {
        let hasher = PasswordHasher::new().unwrap();
        let flooder = Client::Address("192.0.2.1".parse().unwrap());
        let places: Vec<Place> = std::iter::from_fn(|| hasher.place(flooder).ok()).take(10_000).collect();
        let queue = hasher.admitted_total();
        assert!(places.len() <= queue / 3 + 1, "{} of {queue}", places.len());
        let refused = hasher.place(flooder).err().expect("beyond its share");
        assert!(matches!(refused, ApiError::ResourceExhausted { retry_after: Some(_), .. }));
        // Another address, and one more, still find places.
        for other in ["192.0.2.2", "198.51.100.7"] {
            let _place = hasher.place(Client::Address(other.parse().unwrap())).expect(other);
        }
        // An IPv6 client is one client per /64.
        let v6 = |s: &str| Client::Address(s.parse().unwrap());
        let mine: Vec<Place> =
            std::iter::from_fn(|| hasher.place(v6("2001:db8::1")).ok()).take(10_000).collect();
        assert!(hasher.place(v6("2001:db8::2")).is_err(), "the same /64");
        assert!(hasher.place(v6("2001:db8:0:1::1")).is_ok(), "another /64");
        drop((places, mine));
    }

    #[tokio::test]
    async fn hashes_interoperate_with_the_stock_argon2_verifier_and_hasher() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let hasher = PasswordHasher::new().unwrap();
        let ours = hasher.hash(HERE, "correct horse battery".into()).await.unwrap();
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
        assert!(hasher.verify(HERE, "correct horse battery".into(), Some(theirs.clone())).await.unwrap());
        assert!(!hasher.verify(HERE, "correct horse batter".into(), Some(theirs)).await.unwrap());
        let garbage = Some("$argon2id$garbage".into());
        assert!(!hasher.verify(HERE, "correct horse battery".into(), garbage).await.unwrap());
    }

    #[test]
    fn working_memory_is_kept_only_while_other_hashes_are_admitted() {
        let hasher = PasswordHasher::new().unwrap();
        let blocks = params().block_count();
        let ours = Admission::new(&hasher.spare_memory);
        hasher.with_memory(blocks, |memory| assert_eq!(memory.len(), blocks));
        assert_eq!(hasher.spare_areas(), 0, "alone: the memory goes back to the system");

        let waiting = Admission::new(&hasher.spare_memory);
        hasher.with_memory(blocks, |_| ());
        assert_eq!(hasher.spare_areas(), 1, "another hash is admitted: kept for it");
        let spare_address = lock(&hasher.spare_memory).areas[0].as_ptr();
        hasher.with_memory(blocks, |memory| assert_eq!(memory.as_ptr(), spare_address, "reused"));
        assert_eq!(hasher.spare_areas(), 1);

        // Two finishing together: each saw the other admitted, yet when the
        // last admission ends nothing is kept.
        hasher.with_memory(blocks, |_| ());
        drop(waiting);
        assert!(hasher.spare_areas() > 0);
        drop(ours);
        assert_eq!(hasher.spare_areas(), 0, "the last one releases every spare");
    }

    #[tokio::test]
    async fn stored_hashes_beyond_the_limits_are_refused_without_computing() {
        let hasher = PasswordHasher::new().unwrap();
        // 4 GiB of memory asked for: refused at once, nothing allocated.
        let huge = "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHRzYWx0$\
                    AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let parsed = PasswordHash::new(huge).unwrap();
        assert!(!within_limits(&Params::try_from(&parsed).unwrap()), "a well-formed hash, over the limits");
        assert!(!hasher.verify(HERE, "anything".into(), Some(huge.into())).await.unwrap());
        assert_eq!(hasher.spare_areas(), 0);
    }

    #[tokio::test]
    async fn an_unknown_user_never_verifies_even_with_the_dummy_password() {
        let hasher = PasswordHasher::new().unwrap();
        assert!(!hasher.verify(HERE, "anything".into(), None).await.unwrap());
    }
}
