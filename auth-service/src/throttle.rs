//! Login throttling: failed attempts are counted per normalised username,
//! known or not, and client address, in the database, so that every replica
//! sees one count and a stranger's guesses hold up only the stranger.
//!
//! Every attempt is counted as a failure *before* it is evaluated (one
//! atomic UPDATE that also refuses attempts while the name is locked), so
//! parallel attempts cannot slip past the limit. An attempt that turns out
//! right, or is never evaluated, gives its count back; a completed login
//! clears the count, in the transaction that completes it. The policy, how
//! long a name is locked after how many consecutive failures, is
//! [`LADDER`]; the store applies it in the UPDATE that counts.

use sha2::{Digest as _, Sha256};

use crate::{
    client::Client,
    refusal::{LoginError, Refusal},
    store::{Admission, AuthStore, LockLadder},
};

/// Five failures free, then 30 s after the 5th consecutive failure,
/// doubling with each failure, capped at 15 minutes.
pub const LADDER: LockLadder = LockLadder { free_failures: 5, delays_secs: &[30, 60, 120, 240, 480, 900] };

pub const REGISTRATIONS_THROTTLED: &str = "too many registrations from this address; try again later";

/// The throttle key of a username as typed, from one client: the name's
/// normalised spelling and the client, hashed (unknown names are counted
/// too, without storing what strangers type).
pub fn subject(raw_username: &str, client: Client) -> Vec<u8> {
    let mut hash = Sha256::new_with_prefix(b"login:");
    if raw_username.len() <= 1024 {
        hash.update(raw_username.to_lowercase().as_bytes());
    } else {
        hash.update(raw_username.as_bytes());
    }
    // The name's bytes cannot hold a NUL: nothing a name can say reaches
    // into the client part.
    hash.update(b"\0");
    hash.update(client.to_string().as_bytes());
    hash.finalize().to_vec()
}

/// The key of a client's registration quota.
pub fn registration_subject(client: Client) -> Vec<u8> {
    Sha256::new_with_prefix(b"register:").chain_update(client.to_string().as_bytes()).finalize().to_vec()
}

/// An admitted attempt, counted as a failure until settled otherwise.
#[must_use = "settle the attempt"]
pub struct Attempt {
    subject: Vec<u8>,
}

/// Counts an attempt for `subject`, or refuses it while the name is locked
/// ([`Refusal::Throttled`]: RESOURCE_EXHAUSTED with a RetryInfo).
pub async fn admit(store: &AuthStore, subject: Vec<u8>, now_unix: i64) -> Result<Attempt, LoginError> {
    match store.admit_login_attempt(&subject, &LADDER, now_unix).await? {
        Admission::Admitted => Ok(Attempt { subject }),
        Admission::RefusedUntil(locked_until) => Err(Refusal::Throttled {
            retry_after: std::time::Duration::from_secs((locked_until - now_unix).max(1) as u64),
        }
        .into()),
    }
}

impl Attempt {
    /// The subject the attempt is counted against.
    pub fn subject(&self) -> &[u8] {
        &self.subject
    }

    /// Settles the attempt by its outcome: a wrong password or code stays
    /// counted; any other refusal or error (before evaluation, a ticket
    /// that died meanwhile, or one that rolled the outcome's transaction
    /// back) is given back. An Ok outcome has nothing
    /// left to settle: its own transaction gave the count back (BeginLogin's
    /// ticket) or cleared it (a completed login). A commit whose answer was
    /// lost on the way (an error, yet committed) is refunded once more here:
    /// one wrong attempt of that name is forgotten, the rare cost of never
    /// counting a right password.
    pub async fn settle<T>(self, store: &AuthStore, outcome: &Result<T, LoginError>) {
        let settled = match outcome {
            Ok(_) => Ok(()),
            Err(LoginError::Refused(refusal)) if refusal.is_wrong_credential() => Ok(()),
            Err(_) => store.refund_login_attempt(&self.subject).await,
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "cannot settle a login attempt");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_name_from_one_client_share_a_subject() {
        let here = Client::Address("192.0.2.1".parse().unwrap());
        let there = Client::Address("192.0.2.2".parse().unwrap());
        assert_eq!(subject("Alice", here), subject("alice", here));
        assert_ne!(subject("alice", here), subject("bob", here));
        assert_ne!(subject("alice", here), subject("alice", there));
        assert_eq!(subject(&"x".repeat(5000), here).len(), 32);
    }

    #[test]
    fn delays_double_from_30_seconds_up_to_15_minutes() {
        assert_eq!(LADDER.free_failures, 5);
        let delays = LADDER.delays_secs;
        assert_eq!(delays[0], 30);
        assert!(delays.windows(2).all(|w| w[1] == (w[0] * 2).min(900)));
        assert_eq!(*delays.last().unwrap(), 15 * 60);
    }
}
