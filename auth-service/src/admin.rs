//! What an administrator may do to accounts, shared by the admin commands
//! of the binary (actor `operator`) and AdminService (actor `admin:<id>`):
//! each operation changes the store and writes its audit entry.

use chrono::{DateTime, Utc};
use storegate::ApiError;

use crate::{
    audit::{self, Actor, Entry, Event},
    client::Client,
    domain::Username,
    store::{Account, AuthStore},
    throttle,
};

/// The account an operation is about: its id and its name.
#[derive(Clone, Debug)]
pub struct Target {
    pub user_id: i64,
    pub username: String,
}

/// Why an account cannot be acted on.
pub const NO_SUCH_USER: &str = "no user by that name";

/// A role's name: 1 to 32 characters of a-z, 0-9, '_' and '-'.
pub fn parse_role(role: &str) -> Result<&str, &'static str> {
    let role = role.trim();
    let valid = !role.is_empty()
        && role.len() <= 32
        && role.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    valid.then_some(role).ok_or("a role is 1 to 32 characters of a-z, 0-9, '_' and '-'")
}

/// Administration of accounts on behalf of `actor`.
#[derive(Clone)]
pub struct Accounts {
    pub store: AuthStore,
    pub actor: Actor,
    /// The caller's address (AdminService); None for the binary's commands,
    /// audited as `operator`.
    pub client: Option<Client>,
}

impl Accounts {
    pub fn new(store: AuthStore, actor: Actor) -> Accounts {
        Accounts { store, actor, client: None }
    }

    /// The same, for a call from `client`.
    pub fn called_from(mut self, client: Client) -> Accounts {
        self.client = Some(client);
        self
    }

    /// The account named `username`: None when the name is not valid or
    /// not taken.
    pub async fn find(&self, username: &str) -> Result<Option<Target>, ApiError> {
        let Ok(username) = Username::parse(username) else { return Ok(None) };
        let user_id = self.store.user_id_by_name(username.as_str()).await?;
        Ok(user_id.map(|user_id| Target { user_id, username: username.as_str().to_owned() }))
    }

    async fn record(&self, event: Event, target: &Target, detail: Option<String>) {
        let mut entry = Entry::new(event, self.actor).account(target.user_id, &target.username);
        entry.client = self.client;
        audit::record(&self.store, if let Some(detail) = detail { entry.detail(detail) } else { entry })
            .await;
    }

    pub async fn account(&self, target: &Target, now: DateTime<Utc>) -> Result<Option<Account>, ApiError> {
        self.store.account(target.user_id, now).await
    }

    /// Gives `target` a role; false when it had it.
    pub async fn grant_role(&self, target: &Target, role: &str) -> Result<bool, ApiError> {
        let granted = self.store.grant_role(target.user_id, role).await?;
        if granted {
            self.record(Event::RoleGranted, target, Some(role.to_owned())).await;
        }
        Ok(granted)
    }

    /// Takes a role away and ends the sessions (which would otherwise mint
    /// tokens with it); None when it did not have it, else the sessions ended.
    pub async fn revoke_role(
        &self,
        target: &Target,
        role: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, ApiError> {
        if !self.store.revoke_role(target.user_id, role).await? {
            return Ok(None);
        }
        let sessions = self.store.revoke_user_sessions(target.user_id, None, now).await?;
        self.record(Event::RoleRevoked, target, Some(role.to_owned())).await;
        Ok(Some(sessions))
    }

    /// Ends every session; how many.
    pub async fn revoke_sessions(&self, target: &Target, now: DateTime<Utc>) -> Result<i64, ApiError> {
        let sessions = self.store.revoke_user_sessions(target.user_id, None, now).await?;
        self.record(Event::SessionsRevoked, target, Some(format!("{sessions} session(s)"))).await;
        Ok(sessions)
    }

    /// Lifts the account-wide lock and forgets the failures counted for
    /// it; false when no lock was in force.
    pub async fn unlock(&self, target: &Target, now: DateTime<Utc>) -> Result<bool, ApiError> {
        let subject = throttle::account_subject(&target.username);
        let unlocked = self.store.clear_account_lock(&subject, target.user_id, now.timestamp()).await?;
        if unlocked {
            self.record(Event::AccountUnlocked, target, None).await;
        }
        Ok(unlocked)
    }

    /// Disables (or enables) the account; false when it already was so.
    pub async fn set_disabled(
        &self,
        target: &Target,
        disabled: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let changed = self.store.set_disabled(target.user_id, disabled, now).await?;
        if changed {
            let event = if disabled { Event::AccountDisabled } else { Event::AccountEnabled };
            self.record(event, target, None).await;
        }
        Ok(changed)
    }

    /// Deletes the account; false when it was gone already.
    pub async fn delete(&self, target: &Target) -> Result<bool, ApiError> {
        let deleted = self.store.delete_user(target.user_id).await?;
        if deleted {
            self.record(Event::AccountDeleted, target, None).await;
        }
        Ok(deleted)
    }

    /// Forgets the second factor and ends the sessions.
    pub async fn reset_totp(&self, target: &Target, now: DateTime<Utc>) -> Result<(), ApiError> {
        self.store.forget_second_factor(target.user_id, now).await?;
        self.record(Event::TotpReset, target, None).await;
        Ok(())
    }
}
