//! The audit trail: security events (registration, logins and their
//! outcome, lockouts, role changes, key rotation, session revocation, admin
//! actions) with who and when, in the `audit_events` table. Admins read it
//! (`auth-service audit-log`, `AdminService.ListAuditEvents`); rows older
//! than `AUDIT_RETENTION_DAYS` are deleted.
//!
//! An entry is written after what it records has happened, in a statement
//! of its own: a failed write is logged (`audit entry lost`) and never
//! fails the call it records. Nothing attacker-chosen and unchecked goes
//! in: an unknown username is not stored (it may be a password typed in
//! the wrong field), and throttled attempts, which cost the caller nothing,
//! are counted in metrics instead, so that they cannot flood the table
//! (failed logins from one address are limited per hour:
//! `LOGIN_FAILURES_PER_CLIENT_PER_HOUR`). Every entry of a call carries the
//! caller's address; those of the binary's admin commands say `operator`.
//! Entries keep the account's id after the account is deleted (no foreign
//! key): its history is read by that id.

use chrono::{DateTime, Utc};

use crate::{client::Client, store::AuthStore};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Registered,
    PasswordAccepted,
    PasswordRejected,
    LoginRefusedDisabled,
    CodeRejected,
    LoginCompleted,
    PasswordChanged,
    TotpReset,
    AccountLocked,
    AccountUnlocked,
    AccountDisabled,
    AccountEnabled,
    AccountDeleted,
    RoleGranted,
    RoleRevoked,
    SessionsRevoked,
    RefreshTokenReused,
    ServiceAccountCreated,
    ServiceAccountDisabled,
    ServiceAccountEnabled,
    ServiceAccountDeleted,
    ServiceSecretRotated,
    /// A rotated refresh token redeemed again within its reuse grace.
    RefreshTokenRedeemedAgain,
    KeyRotated,
    KeyWithdrawn,
}

impl Event {
    /// The name stored in `audit_events.event`.
    pub fn name(self) -> &'static str {
        match self {
            Event::Registered => "user.registered",
            Event::PasswordAccepted => "login.password_accepted",
            Event::PasswordRejected => "login.password_rejected",
            Event::LoginRefusedDisabled => "login.refused_disabled",
            Event::CodeRejected => "login.code_rejected",
            Event::LoginCompleted => "login.completed",
            Event::PasswordChanged => "password.changed",
            Event::TotpReset => "totp.reset",
            Event::AccountLocked => "account.locked",
            Event::AccountUnlocked => "account.unlocked",
            Event::AccountDisabled => "account.disabled",
            Event::AccountEnabled => "account.enabled",
            Event::AccountDeleted => "account.deleted",
            Event::RoleGranted => "role.granted",
            Event::RoleRevoked => "role.revoked",
            Event::SessionsRevoked => "sessions.revoked",
            Event::RefreshTokenReused => "session.refresh_token_reused",
            Event::ServiceAccountCreated => "service_account.created",
            Event::ServiceAccountDisabled => "service_account.disabled",
            Event::ServiceAccountEnabled => "service_account.enabled",
            Event::ServiceAccountDeleted => "service_account.deleted",
            Event::ServiceSecretRotated => "service_account.secret_rotated",
            Event::RefreshTokenRedeemedAgain => "session.refresh_token_redeemed_again",
            Event::KeyRotated => "key.rotated",
            Event::KeyWithdrawn => "key.withdrawn",
        }
    }
}

/// Who did it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The account's owner (or whoever holds its password, ticket or
    /// refresh token).
    Owner,
    /// Someone who never proved to be a user: a failed login.
    Anonymous,
    /// An admin command of the auth-service binary, on the database.
    Operator,
    /// A user with the `admin` role, through AdminService.
    Admin(i64),
    /// auth-service itself (the account-wide lock, a first signing key).
    System,
}

impl Actor {
    /// The text stored in `audit_events.actor`.
    pub fn label(self) -> String {
        match self {
            Actor::Owner => "self".to_owned(),
            Actor::Anonymous => "anonymous".to_owned(),
            Actor::Operator => "operator".to_owned(),
            Actor::Admin(user_id) => format!("admin:{user_id}"),
            Actor::System => "system".to_owned(),
        }
    }
}

/// One event to record.
#[derive(Clone, Debug)]
pub struct Entry {
    pub event: Event,
    pub actor: Actor,
    pub user_id: Option<i64>,
    pub username: Option<String>,
    /// The caller's address; None for what no call caused (the binary's
    /// admin commands, stored as `operator`; start-up).
    pub client: Option<Client>,
    pub detail: Option<String>,
}

impl Entry {
    pub fn new(event: Event, actor: Actor) -> Entry {
        Entry { event, actor, user_id: None, username: None, client: None, detail: None }
    }

    /// The account it happened to.
    pub fn account(mut self, user_id: i64, username: &str) -> Entry {
        self.user_id = Some(user_id);
        self.username = Some(username.to_owned());
        self
    }

    /// The account it happened to, by id alone.
    pub fn user(mut self, user_id: i64) -> Entry {
        self.user_id = Some(user_id);
        self
    }

    pub fn client(mut self, client: Client) -> Entry {
        self.client = Some(client);
        self
    }

    /// What `audit_events.client_addr` says: the caller's address
    /// (`unknown` without one), or `operator` for the binary's commands.
    pub fn client_label(&self) -> Option<String> {
        match (self.client, self.actor) {
            (Some(client), _) => {
                Some(client.address().map_or_else(|| "unknown".to_owned(), |a| a.to_string()))
            }
            (None, Actor::Operator) => Some("operator".to_owned()),
            (None, _) => None,
        }
    }

    /// A role's name, a key id, a count: never a secret.
    pub fn detail(mut self, detail: impl Into<String>) -> Entry {
        self.detail = Some(detail.into());
        self
    }
}

/// A recorded event, as admins read it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Record {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub event: String,
    pub user_id: Option<i64>,
    pub username: Option<String>,
    pub actor: String,
    pub client_addr: Option<String>,
    pub detail: Option<String>,
}

/// Writes `entry`; a failure is logged, never returned (see the module
/// comment).
pub async fn record(store: &AuthStore, entry: Entry) {
    if let Err(e) = store.record_audit(&entry, storegate::db::now()).await {
        tracing::warn!(error = %e, event = entry.event.name(), "audit entry lost");
    }
}
