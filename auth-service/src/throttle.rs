//! Login throttling: every failed attempt is counted, in the database (so
//! that every replica sees one count), against
//!
//! 1. the client's address, whatever the names: an hourly budget of
//!    failures (`LOGIN_FAILURES_PER_CLIENT_PER_HOUR`, in `client_quotas`),
//!    which bounds the work, audit rows and throttle rows one address can
//!    cause with made-up names. Unlike 2 and 3 it is read before and
//!    counted once an attempt turns out wrong: a right attempt (nearly
//!    every one) then writes nothing here, and attempts already in flight
//!    when it fills (at most the address's share of the hashing queue)
//!    still finish;
//! 2. the normalised username, known or not, and the client: the client's
//!    address, or the device token of one of the account's earlier logins
//!    when BeginLogin sent one ([`LADDER`]: a stranger's guesses hold up
//!    only the stranger);
//! 3. the account, from every unrecognised client together (keyed by the
//!    name, so unknown names behave as known ones): `MAX_FAILED_LOGINS` free,
//!    then each further failure locks it for `ACCOUNT_LOCK_SECS`. Its known
//!    devices are neither counted nor refused, so strangers cannot lock the
//!    owner out, and guessing stays bounded in total.
//!
//! They are admitted in that order, each before the attempt is evaluated;
//! a refusal gives back what was admitted before it, and nothing is hashed.
//! Every count is taken *before* the attempt is evaluated (one atomic
//! UPDATE that also refuses attempts while the subject is locked), so
//! parallel attempts cannot slip past a limit. An attempt that turns out
//! wrong stays counted; one never evaluated gives its counts back; a
//! completed login clears the name's counts (both 2 and 3), in the
//! transaction that completes it. The store applies a [`LockLadder`] in the
//! UPDATE that counts.
//!
//! A right password from an unrecognised client gives back its counts 1
//! and 2 but not 3: its ticket carries that account count, and the
//! ticket's first code is evaluated on it, without being admitted (or
//! refused) again. So a lock that strangers set between the owner's
//! password and code does not refuse the owner's code, and still every
//! evaluated guess, password or code, is one account count: a login begun
//! and never finished counts as one failure.

use sha2::{Digest as _, Sha256};

use crate::{
    client::Client,
    config::LoginPolicy,
    refusal::{LoginError, Refusal},
    store::{Admission, AuthStore, CodeAttempt, LockLadder},
};

/// Per name and client: five failures free, then 30 s after the 5th
/// consecutive failure, doubling with each failure, capped at 15 minutes.
pub const LADDER: LockLadder<'static> =
    LockLadder { free_failures: 5, delays_secs: &[30, 60, 120, 240, 480, 900] };

pub const REGISTRATIONS_THROTTLED: &str = "too many registrations from this address; try again later";

/// A username as the throttles key it: lower-cased (unless absurdly long:
/// then as given, it is no account's name either way).
fn normalised(raw_username: &str) -> String {
    if raw_username.len() <= 1024 { raw_username.to_lowercase() } else { raw_username.to_owned() }
}

/// A name and a client, hashed (unknown names are counted too, without
/// storing what strangers type). The name's bytes cannot hold a NUL:
/// nothing a name can say reaches into the client part.
fn name_and(raw_username: &str, client_part: &[u8]) -> Vec<u8> {
    Sha256::new_with_prefix(b"login:")
        .chain_update(normalised(raw_username).as_bytes())
        .chain_update(b"\0")
        .chain_update(client_part)
        .finalize()
        .to_vec()
}

/// The throttle key of a username as typed, from one client address.
pub fn subject(raw_username: &str, client: Client) -> Vec<u8> {
    name_and(raw_username, client.to_string().as_bytes())
}

/// The throttle key of a username from one of its known devices (by its
/// token's hash): the device is the client, wherever it calls from.
pub fn device_subject(raw_username: &str, device_hash: &[u8]) -> Vec<u8> {
    // No address is written "device:…".
    name_and(raw_username, &[b"device:".as_slice(), device_hash].concat())
}

/// The key of the account-wide count: the normalised name alone.
pub fn account_subject(raw_username: &str) -> Vec<u8> {
    Sha256::new_with_prefix(b"account:").chain_update(normalised(raw_username).as_bytes()).finalize().to_vec()
}

/// The key of a client's registration quota.
pub fn registration_subject(client: Client) -> Vec<u8> {
    Sha256::new_with_prefix(b"register:").chain_update(client.to_string().as_bytes()).finalize().to_vec()
}

/// The key of a client address's hourly budget of failed logins.
pub fn login_failures_subject(client: Client) -> Vec<u8> {
    Sha256::new_with_prefix(b"login-failures:")
        .chain_update(client.to_string().as_bytes())
        .finalize()
        .to_vec()
}

/// The account-wide ladder: `max_failed_logins` free, then
/// `account_lock_secs` after each further failure.
fn account_ladder<'a>(policy: &LoginPolicy, lock_secs: &'a [i64; 1]) -> LockLadder<'a> {
    LockLadder { free_failures: i64::from(policy.max_failed_logins), delays_secs: lock_secs }
}

/// Who makes an attempt, as the throttles see it.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The client's address (see `client.rs`).
    pub client: Client,
    /// The token hash of the account's device that BeginLogin recognised.
    pub device: Option<&'a [u8]>,
}

/// Which step of a login an attempt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// BeginLogin's password.
    Password,
    /// A code (or recovery code) on a ticket: which of the ticket's
    /// attempts it is.
    Code(CodeAttempt),
}

/// An admitted attempt, counted as a failure until settled otherwise.
/// Dropped unsettled (the client went away before its answer), it gives
/// its counts back: an outcome that reached nobody told nobody anything.
#[must_use = "settle the attempt"]
pub struct Attempt {
    store: AuthStore,
    step: Step,
    /// The address's failure budget and its size, when there is one:
    /// counted if the attempt turns out wrong.
    quota: Option<(Vec<u8>, i64)>,
    now_unix: i64,
    /// The name-and-client subject, once counted.
    pair: Option<Vec<u8>>,
    /// The account's subject, when this attempt is counted on it (an
    /// unrecognised client).
    account: Option<Vec<u8>>,
    /// The account count is the one the ticket carries (the first code of
    /// an unrecognised client's ticket): never given back by this attempt.
    carried: bool,
    /// This attempt's count is the one that reached the account-wide lock:
    /// if it stays counted, it locked the account.
    reaches_account_lock: bool,
}

/// The refusal of a subject locked or spent until `until`: the delay is
/// counted from now, not from when the call began (it may have waited).
fn throttled(until: i64, began_unix: i64) -> LoginError {
    let now_unix = storegate::db::now().timestamp().max(began_unix);
    Refusal::Throttled { retry_after: std::time::Duration::from_secs((until - now_unix).max(1) as u64) }
        .into()
}

/// Counts an attempt of `raw_username` by `caller` against each throttle
/// in turn, or refuses it ([`Refusal::Throttled`]: RESOURCE_EXHAUSTED with a
/// RetryInfo) at the first one that is spent or locked, giving back what
/// the others counted.
pub async fn admit(
    store: &AuthStore,
    policy: &LoginPolicy,
    raw_username: &str,
    caller: Caller<'_>,
    step: Step,
    now_unix: i64,
) -> Result<Attempt, LoginError> {
    let mut attempt = Attempt::nothing(store, step, now_unix);
    let budget = i64::from(policy.login_failures_per_client_per_hour);
    if budget > 0 {
        let subject = login_failures_subject(caller.client);
        if let Some(until) = store.quota_spent_until(&subject, budget, now_unix).await? {
            return Err(throttled(until, now_unix));
        }
        attempt.quota = Some((subject, budget));
    }
    let pair = match caller.device {
        Some(device) => device_subject(raw_username, device),
        None => subject(raw_username, caller.client),
    };
    let admitted = store.admit_login_attempt(&pair, &LADDER, now_unix).await;
    if let Some(refused) = attempt.admitted(admitted, now_unix).await {
        return Err(refused);
    }
    attempt.pair = Some(pair);
    if caller.device.is_none() {
        let account = account_subject(raw_username);
        if step == Step::Code(CodeAttempt::First) {
            attempt.account = Some(account);
            attempt.carried = true;
            return Ok(attempt);
        }
        let lock_secs = [i64::from(policy.account_lock_secs)];
        let admitted = store.admit_counting(&account, &account_ladder(policy, &lock_secs), now_unix).await;
        let reaches_lock = matches!(admitted, Ok((_, true)));
        if let Some(refused) = attempt.admitted(admitted.map(|(a, _)| a), now_unix).await {
            return Err(refused);
        }
        attempt.account = Some(account);
        attempt.reaches_account_lock = reaches_lock;
    }
    Ok(attempt)
}

impl Attempt {
    fn nothing(store: &AuthStore, step: Step, now_unix: i64) -> Attempt {
        Attempt {
            store: store.clone(),
            step,
            now_unix,
            quota: None,
            pair: None,
            account: None,
            carried: false,
            reaches_account_lock: false,
        }
    }

    /// Leaves every count as it is: settled.
    fn keep(&mut self) {
        (self.quota, self.pair, self.account) = (None, None, None);
    }

    /// None when admitted; else the refusal or error to answer, with what
    /// was counted so far given back.
    async fn admitted(
        &mut self,
        admission: Result<Admission, storegate::ApiError>,
        now_unix: i64,
    ) -> Option<LoginError> {
        let refused = match admission {
            Ok(Admission::Admitted) => return None,
            Ok(Admission::RefusedUntil(until)) => throttled(until, now_unix),
            Err(e) => e.into(),
        };
        self.give_back().await;
        Some(refused)
    }

    /// The name-and-client subject: what a right password gives back (the
    /// account's count stays, carried by the ticket).
    pub fn pair(&self) -> Option<&[u8]> {
        self.pair.as_deref()
    }

    /// Gives back every count of an attempt that was never evaluated,
    /// except an account count its ticket carries: the ticket still does.
    async fn give_back(&mut self) {
        let (pair, account) = (self.pair.take(), self.account.take());
        self.quota = None;
        let account = account.filter(|_| !self.carried);
        for subject in pair.iter().chain(&account) {
            if let Err(e) = self.store.refund_login_attempt(subject).await {
                tracing::warn!(error = %e, "cannot give back a login attempt");
            }
        }
    }

    /// Counts a wrong attempt against the address's failure budget.
    async fn count_failure(&mut self) {
        if let Some((subject, budget)) = self.quota.take()
            && let Err(e) = self.store.admit_quota(&subject, budget, self.now_unix).await
        {
            tracing::warn!(error = %e, "cannot count a failed login against its address");
        }
    }

    /// Settles the attempt by its outcome: a wrong password or code stays
    /// counted; any other refusal or error (before evaluation, a ticket
    /// that died meanwhile, or one that rolled the outcome's transaction
    /// back) is given back. An Ok outcome has nothing left to settle: its
    /// own transaction gave the counts back (BeginLogin's ticket, but for
    /// the account count the ticket carries) or cleared them (a completed
    /// login). A commit whose answer was lost on the way (an error, yet
    /// committed) is refunded once more here: one wrong attempt of that
    /// name is forgotten, the rare cost of never counting a right password.
    ///
    /// True when this attempt's count stays and locked the account (it
    /// reached the account-wide lock).
    pub async fn settle<T>(mut self, outcome: &Result<T, LoginError>) -> bool {
        match outcome {
            Ok(_) => {
                self.keep();
                self.step == Step::Password && self.reaches_account_lock
            }
            Err(LoginError::Refused(refusal)) if refusal.is_wrong_credential() => {
                self.count_failure().await;
                self.keep();
                self.reaches_account_lock
            }
            Err(_) => {
                self.give_back().await;
                false
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.quota.is_none() && self.pair.is_none() && self.account.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut unsettled = Attempt {
            store: self.store.clone(),
            step: self.step,
            now_unix: self.now_unix,
            quota: self.quota.take(),
            pair: self.pair.take(),
            account: self.account.take(),
            carried: self.carried,
            reaches_account_lock: false,
        };
        runtime.spawn(async move { unsettled.give_back().await });
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
    fn a_device_an_account_and_an_address_budget_are_subjects_of_their_own() {
        let here = Client::Address("192.0.2.1".parse().unwrap());
        let device = [7u8; 32];
        assert_eq!(device_subject("Alice", &device), device_subject("alice", &device));
        assert_ne!(device_subject("alice", &device), device_subject("alice", &[8u8; 32]));
        assert_ne!(device_subject("alice", &device), subject("alice", here));
        assert_eq!(account_subject("Alice"), account_subject("alice"));
        assert_ne!(account_subject("alice"), account_subject("bob"));
        let all = [
            subject("alice", here),
            device_subject("alice", &device),
            account_subject("alice"),
            login_failures_subject(here),
            registration_subject(here),
        ];
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.len(), 32);
            assert!(all[i + 1..].iter().all(|b| a != b), "subject {i} is shared");
        }
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
