//! Secrets at rest: AES-256-GCM under the master key, and the random values
//! (tickets, refresh tokens) the service hands out.

use std::path::Path;

use aes_gcm::{
    Aes256Gcm, KeyInit as _, Nonce,
    aead::{Aead as _, Payload},
};
use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

const NONCE_LEN: usize = 12;

/// The key that encrypts TOTP secrets and private signing keys, and keys
/// the hashes of recovery codes.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
    /// A separate key derived from the master key, so the same key bytes are
    /// never used for two algorithms.
    mac_key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Parses base64 of exactly 32 bytes.
    pub fn from_base64(encoded: &str) -> anyhow::Result<Self> {
        let bytes = STANDARD.decode(encoded.trim()).context("STOREGATE_MASTER_KEY is not valid base64")?;
        if bytes.len() != 32 {
            bail!("STOREGATE_MASTER_KEY must be base64 of exactly 32 bytes, got {}", bytes.len());
        }
        let mac_key =
            Sha256::new_with_prefix(b"storegate keyed-hash key v1\0").chain_update(&bytes).finalize().into();
        Ok(MasterKey { cipher: Aes256Gcm::new_from_slice(&bytes)?, mac_key })
    }

    /// A fresh random key, base64 encoded.
    pub fn generate_base64() -> String {
        STANDARD.encode(random_bytes::<32>())
    }

    /// The key in a file (`STOREGATE_MASTER_KEY_FILE`): owned by this user
    /// (or root, as mounted secrets are), writable by no one else, readable
    /// at most by the owner's group (a Kubernetes secret mounted with
    /// `defaultMode: 0440` and an `fsGroup`).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        #[cfg(unix)]
        if let Some(why) = storegate::private_files::not_private(path, 0o040, true)
            .with_context(|| format!("cannot read the master key file {}", path.display()))?
        {
            bail!(
                "the master key file {} {why}; make it private to the service's user: \
                 `chown <that user> {0}` and `chmod 600 {0}`",
                path.display()
            );
        }
        let encoded = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the master key file {}", path.display()))?;
        Self::from_base64(&encoded).with_context(|| format!("{} is not a valid master key", path.display()))
    }

    /// The configured key, or for the SQLite development default, the key in
    /// `master.key` beside the database (created on first start).
    pub fn load(configured: Option<&SecretString>, dev_key_dir: Option<&Path>) -> anyhow::Result<Self> {
        // An empty variable (as compose files pass through) means "not set".
        if let Some(key) = configured.filter(|k| !k.expose_secret().trim().is_empty()) {
            return Self::from_base64(key.expose_secret());
        }
        let Some(dir) = dev_key_dir else {
            bail!(
                "STOREGATE_MASTER_KEY is required with MySQL: set it to base64 of 32 random \
                 bytes (e.g. `openssl rand -base64 32`) and keep it safe"
            );
        };
        let path = dir.join("master.key");
        if path.exists() {
            // A key others can read is known to them; one others can write
            // (or that someone else owns) may be theirs.
            #[cfg(unix)]
            if let Some(why) = storegate::private_files::not_private(&path, 0, false)
                .with_context(|| format!("cannot read {}", path.display()))?
            {
                bail!(
                    "refusing the master key {}: it {why}; make it the service user's own and \
                     private (`chown <that user> {0}` and `chmod 600 {0}`), or set \
                     STOREGATE_MASTER_KEY instead",
                    path.display()
                );
            }
            let encoded =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            return Self::from_base64(&encoded)
                .with_context(|| format!("{} is not a valid master key", path.display()));
        }
        storegate::private_files::create_dir_all(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let encoded = Self::generate_base64();
        // Written whole under a private name, then linked into place: a
        // process starting beside this one either links first or finds the
        // complete file of the one that did, never a half-written one.
        // A random name: processes in containers sharing the folder all
        // have pid 1.
        let staging = dir.join(format!(".master.key.{}", URL_SAFE_NO_PAD.encode(random_bytes::<12>())));
        write_private_file(&staging, encoded.as_bytes())?;
        let linked = std::fs::hard_link(&staging, &path);
        let _ = std::fs::remove_file(&staging);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(None, Some(dir)),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot create {}", path.display()))),
        }
        tracing::warn!(
            path = %path.display(),
            "no STOREGATE_MASTER_KEY configured: created a development master key; \
             set STOREGATE_MASTER_KEY for anything beyond local use"
        );
        Self::from_base64(&encoded)
    }

    /// nonce || ciphertext || tag; `context` binds the ciphertext to its row
    /// so that it cannot be moved to another one.
    pub fn encrypt(&self, plaintext: &[u8], context: &str) -> anyhow::Result<Vec<u8>> {
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), Payload { msg: plaintext, aad: context.as_bytes() })
            .map_err(|_| anyhow::anyhow!("encryption failed"))?;
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// HMAC-SHA-256 of `data` for `purpose`: a stored hash that a database
    /// dump alone cannot be brute-forced against.
    pub fn keyed_hash(&self, purpose: &str, data: &[u8]) -> Vec<u8> {
        use hmac::{Hmac, Mac};
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    pub fn decrypt(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, WrongKey> {
        if sealed.len() < NONCE_LEN {
            return Err(WrongKey);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: context.as_bytes() })
            .map_err(|_| WrongKey)
    }
}

/// `STOREGATE_MASTER_KEY`, unless unset or empty (as compose files pass an
/// unset variable through). Read here, not as a flag: a flag's value is on
/// the command line, which every user of the machine can read (`ps`).
pub fn master_key_from_env() -> Option<SecretString> {
    std::env::var("STOREGATE_MASTER_KEY").ok().filter(|k| !k.trim().is_empty()).map(SecretString::from)
}

/// A ciphertext did not open: the master key differs from the one that
/// sealed it, or the data was changed.
#[derive(Debug, thiserror::Error)]
#[error("stored secret cannot be decrypted with the configured master key")]
pub struct WrongKey;

fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A random opaque token (256 bits, base64url) for tickets and refresh tokens.
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// How tickets and refresh tokens are stored: only their SHA-256, so a
/// database dump does not hand out live credentials. The tokens are 256-bit
/// random values, so a fast hash is enough.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_context() {
        let key = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let sealed = key.encrypt(b"secret bytes", "totp:1").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"secret bytes"));
        assert_eq!(key.decrypt(&sealed, "totp:1").unwrap(), b"secret bytes");
        assert!(key.decrypt(&sealed, "totp:2").is_err(), "moved to another row");
        let other = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        assert!(other.decrypt(&sealed, "totp:1").is_err(), "another master key");
    }

    #[test]
    fn master_keys_must_be_32_bytes_of_base64() {
        assert!(MasterKey::from_base64("not base64!").is_err());
        assert!(MasterKey::from_base64(&STANDARD.encode([0u8; 16])).is_err());
        assert!(MasterKey::from_base64(&STANDARD.encode([0u8; 32])).is_ok());
    }

    #[test]
    fn without_a_configured_key_mysql_refuses_and_sqlite_creates_one_once() {
        assert!(MasterKey::load(None, None).is_err());
        let dir = std::env::temp_dir().join(format!("storegate-key-{}", random_token()));
        let first = MasterKey::load(None, Some(&dir)).unwrap();
        let second = MasterKey::load(None, Some(&dir)).unwrap();
        let sealed = first.encrypt(b"x", "c").unwrap();
        assert_eq!(second.decrypt(&sealed, "c").unwrap(), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("master.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// What another user could read or have written is not a master key.
    #[cfg(unix)]
    #[test]
    fn a_development_key_others_can_reach_or_that_is_not_ours_is_refused() {
        let dir = std::env::temp_dir().join(format!("storegate-key-{}", random_token()));
        let first = MasterKey::load(None, Some(&dir)).unwrap();
        let path = dir.join("master.key");
        for loose in [0o644, 0o640, 0o604, 0o620, 0o660] {
            chmod(&path, loose);
            let message = format!("{:#}", MasterKey::load(None, Some(&dir)).unwrap_err());
            assert!(message.contains(&path.display().to_string()), "names the file: {message}");
            assert!(message.contains(&format!("mode {loose:04o}")), "{message}");
            assert!(message.contains("chmod 600"), "says the fix: {message}");
        }
        chmod(&path, 0o600);
        let sealed = first.encrypt(b"x", "c").unwrap();
        assert_eq!(MasterKey::load(None, Some(&dir)).unwrap().decrypt(&sealed, "c").unwrap(), b"x");
        // Another owner: only root can make one.
        if storegate::private_files::current_uid() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let message = format!("{:#}", MasterKey::load(None, Some(&dir)).unwrap_err());
            assert!(message.contains("belongs to another user (uid 65534"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        } else {
            eprintln!("not root: the other-owner case needs chown, skipped");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_must_not_be_open_to_others() {
        let dir = std::env::temp_dir().join(format!("storegate-key-{}", random_token()));
        storegate::private_files::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, MasterKey::generate_base64()).unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, true), (0o644, false), (0o660, false)] {
            chmod(&path, mode);
            let loaded = MasterKey::from_file(&path);
            assert_eq!(loaded.is_ok(), ok, "mode {mode:o}: {:?}", loaded.err());
        }
        if storegate::private_files::current_uid() == 0 {
            chmod(&path, 0o600);
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let message = format!("{:#}", MasterKey::from_file(&path).unwrap_err());
            assert!(message.contains("belongs to another user") && message.contains("chown"), "{message}");
        }
        std::fs::write(dir.join("bad"), "not a key").unwrap();
        chmod(&dir.join("bad"), 0o600);
        assert!(MasterKey::from_file(&dir.join("bad")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The key never travels as a flag (any user can read a command line).
    #[test]
    fn the_master_key_is_no_flag() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: crate::AuthConfig,
        }
        let key = MasterKey::generate_base64();
        assert!(Cli::try_parse_from(["auth-service", "--master-key", &key]).is_err());
        assert!(Cli::try_parse_from(["auth-service", &format!("--master-key={key}")]).is_err());
        let cli = Cli::try_parse_from(["auth-service", "--master-key-file", "/run/secrets/key"]).unwrap();
        assert_eq!(cli.config.master_key_file.as_deref(), Some(Path::new("/run/secrets/key")));
    }
}
