//! Service accounts: the identities of backend services, kept apart from
//! users. A service account has no password and no second factor and never
//! logs in through BeginLogin; it gets access tokens from the token
//! endpoint by OAuth 2.0 client credentials. Its access tokens name it as
//! `sub` = `svc:<client_id>` (a user's `sub` is a decimal id: they cannot
//! collide) and carry its roles.

use chrono::{DateTime, Duration, Utc};
use storegate::ApiError;

use crate::{
    audit::{self, Actor, Entry, Event},
    client::Client,
    crypto::{random_bytes, random_token, token_hash},
    domain::Username,
    store::{AuthStore, ServiceAccount},
};

/// How long a rotated secret keeps working by default: a day, time for
/// every replica of the service to pick up the new one.
pub const DEFAULT_SECRET_GRACE_SECS: u64 = 24 * 60 * 60;
/// The longest grace a rotation may give the old secret.
pub const MAX_SECRET_GRACE_SECS: u64 = 30 * 24 * 60 * 60;

/// The `sub` of a service account's access tokens.
pub fn subject_of(client_id: &str) -> String {
    format!("svc:{client_id}")
}

/// A new client id: `svc_` and 20 characters of a-z and 2-7 (100 random
/// bits, base32): unguessable is not needed, unique is.
fn new_client_id() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bytes = random_bytes::<20>();
    let id: String = bytes.iter().map(|b| ALPHABET[usize::from(b % 32)] as char).collect();
    format!("svc_{id}")
}

/// What a creation or a rotation shows once: the secret is stored only as
/// its SHA-256.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Credentials {
    pub name: String,
    pub client_id: String,
    pub client_secret: String,
    pub roles: Vec<String>,
    /// Until when the secrets current before a rotation keep working.
    #[serde(skip_serializing_if = "Option::is_none")]
    /// (RFC 3339).
    pub previous_secret_expires_at: Option<String>,
}

/// Administration of service accounts on behalf of `actor`.
#[derive(Clone)]
pub struct ServiceAccounts {
    pub store: AuthStore,
    pub actor: Actor,
    /// The caller's address (AdminService); None for the binary's commands.
    pub client: Option<Client>,
}

/// A service account's name: the rules of a username.
pub fn parse_name(raw: &str) -> Result<String, String> {
    Username::parse(raw).map(|name| name.as_str().to_owned()).map_err(|v| format!("name {}", v.description))
}

impl ServiceAccounts {
    pub fn new(store: AuthStore, actor: Actor) -> Self {
        ServiceAccounts { store, actor, client: None }
    }

    async fn record(&self, event: Event, account: &ServiceAccount, detail: Option<String>) {
        let mut entry = Entry::new(event, self.actor)
            .detail(detail.unwrap_or_else(|| format!("{} ({})", account.name, account.client_id)));
        if let Some(client) = self.client {
            entry = entry.client(client);
        }
        audit::record(&self.store, entry).await;
    }

    /// Creates an account holding `roles` (already checked), and shows its
    /// credentials this once.
    pub async fn create(
        &self,
        name: &str,
        roles: &[&str],
        now: DateTime<Utc>,
    ) -> Result<Credentials, ApiError> {
        let client_id = new_client_id();
        let client_secret = random_token();
        let id = self
            .store
            .create_service_account(name, &client_id, roles, &token_hash(&client_secret), now)
            .await?;
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        let account = ServiceAccount {
            id,
            name: name.to_owned(),
            client_id: client_id.clone(),
            created_at: now,
            disabled_at: None,
            roles: roles.clone(),
        };
        let detail = format!("{} ({}), roles: {}", name, client_id, roles.join(","));
        self.record(Event::ServiceAccountCreated, &account, Some(detail)).await;
        Ok(Credentials {
            name: name.to_owned(),
            client_id,
            client_secret,
            roles,
            previous_secret_expires_at: None,
        })
    }

    pub async fn find(&self, name: &str) -> Result<Option<ServiceAccount>, ApiError> {
        self.store.service_account(name).await
    }

    /// A new secret; the old ones keep working for `grace`.
    pub async fn rotate_secret(
        &self,
        account: &ServiceAccount,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<Credentials, ApiError> {
        let client_secret = random_token();
        let old_until = now + grace;
        if !self.store.rotate_service_secret(account.id, &token_hash(&client_secret), old_until, now).await? {
            return Err(ApiError::NotFound("no such service account".to_owned()));
        }
        let detail =
            format!("{} ({}), old secret until {}", account.name, account.client_id, old_until.to_rfc3339());
        self.record(Event::ServiceSecretRotated, account, Some(detail)).await;
        Ok(Credentials {
            name: account.name.clone(),
            client_id: account.client_id.clone(),
            client_secret,
            roles: account.roles.clone(),
            previous_secret_expires_at: Some(old_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        })
    }

    /// Disables (or enables) it; false when it already was so.
    pub async fn set_disabled(
        &self,
        account: &ServiceAccount,
        disabled: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let changed = self.store.set_service_account_disabled(account.id, disabled, now).await?;
        if changed {
            let event = if disabled { Event::ServiceAccountDisabled } else { Event::ServiceAccountEnabled };
            self.record(event, account, None).await;
        }
        Ok(changed)
    }

    pub async fn delete(&self, account: &ServiceAccount) -> Result<bool, ApiError> {
        let deleted = self.store.delete_service_account(account.id).await?;
        if deleted {
            self.record(Event::ServiceAccountDeleted, account, None).await;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_distinct_and_never_a_users_subject() {
        let (a, b) = (new_client_id(), new_client_id());
        assert_ne!(a, b);
        assert!(a.starts_with("svc_") && a.len() == 24, "{a}");
        assert!(subject_of(&a).parse::<i64>().is_err());
        assert!(a[4..].bytes().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
    }
}

/// How an operator command prints what it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for a person.
    #[default]
    Text,
    /// One JSON object (or array), for a script.
    Json,
}

/// The operator's commands (`auth-service …-service-account`), on the
/// configured database, audited as `operator`.
pub mod commands {
    use anyhow::Context as _;
    use storegate::db;

    use super::{Credentials, MAX_SECRET_GRACE_SECS, Output, ServiceAccounts, parse_name};
    use crate::{AuthConfig, admin, audit::Actor, store::ServiceAccount};

    async fn open(config: &AuthConfig) -> anyhow::Result<ServiceAccounts> {
        Ok(ServiceAccounts::new(crate::admin_store(config).await?, Actor::Operator))
    }

    async fn named(accounts: &ServiceAccounts, name: &str) -> anyhow::Result<ServiceAccount> {
        let name = parse_name(name).map_err(anyhow::Error::msg)?;
        accounts
            .find(&name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_context(|| format!("no service account named {name}"))
    }

    fn print_credentials(credentials: &Credentials, output: Output) -> anyhow::Result<()> {
        match output {
            Output::Json => println!("{}", serde_json::to_string(credentials)?),
            Output::Text => {
                println!("client_id:     {}", credentials.client_id);
                println!("client_secret: {}", credentials.client_secret);
                println!("roles:         {}", describe_roles(&credentials.roles));
                if let Some(until) = &credentials.previous_secret_expires_at {
                    println!("the previous secret works until {until}");
                }
                println!("the secret is shown this once; keep it in a secret store");
            }
        }
        Ok(())
    }

    fn describe_roles(roles: &[String]) -> String {
        if roles.is_empty() { "- (reads only)".to_owned() } else { roles.join(",") }
    }

    fn as_json(account: &ServiceAccount) -> serde_json::Value {
        let time = |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        serde_json::json!({
            "name": account.name,
            "client_id": account.client_id,
            "roles": account.roles,
            "created_at": time(&account.created_at),
            "disabled_at": account.disabled_at.as_ref().map(time),
        })
    }

    /// `auth-service create-service-account NAME --role R…`.
    pub async fn create(
        config: &AuthConfig,
        name: &str,
        roles: &[String],
        output: Output,
    ) -> anyhow::Result<Credentials> {
        let name = parse_name(name).map_err(anyhow::Error::msg)?;
        let roles: Vec<&str> = roles
            .iter()
            .map(|r| admin::parse_role(r))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let mut roles = roles;
        roles.sort_unstable();
        roles.dedup();
        let accounts = open(config).await?;
        let credentials =
            accounts.create(&name, &roles, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        print_credentials(&credentials, output)?;
        accounts.store.db().close().await;
        Ok(credentials)
    }

    /// `auth-service list-service-accounts`.
    pub async fn list(config: &AuthConfig, output: Output) -> anyhow::Result<Vec<ServiceAccount>> {
        let accounts = open(config).await?;
        let all = accounts.store.service_accounts().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        match output {
            Output::Json => println!("{}", serde_json::Value::Array(all.iter().map(as_json).collect())),
            Output::Text => {
                println!("{:<24} {:<26} {:<9} roles", "name", "client_id", "state");
                for account in &all {
                    let state = if account.disabled_at.is_some() { "disabled" } else { "active" };
                    println!(
                        "{:<24} {:<26} {:<9} {}",
                        account.name,
                        account.client_id,
                        state,
                        describe_roles(&account.roles)
                    );
                }
            }
        }
        accounts.store.db().close().await;
        Ok(all)
    }

    /// `auth-service show-service-account NAME`.
    pub async fn show(config: &AuthConfig, name: &str, output: Output) -> anyhow::Result<ServiceAccount> {
        let accounts = open(config).await?;
        let account = named(&accounts, name).await?;
        match output {
            Output::Json => println!("{}", as_json(&account)),
            Output::Text => {
                println!("name:      {}", account.name);
                println!("client_id: {}", account.client_id);
                println!("roles:     {}", describe_roles(&account.roles));
                println!(
                    "created:   {}",
                    account.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                let state = account
                    .disabled_at
                    .map_or("active".to_owned(), |t| format!("disabled since {}", t.to_rfc3339()));
                println!("state:     {state}");
            }
        }
        accounts.store.db().close().await;
        Ok(account)
    }

    /// `auth-service rotate-service-secret NAME [--grace-secs N]`.
    pub async fn rotate_secret(
        config: &AuthConfig,
        name: &str,
        grace_secs: u64,
        output: Output,
    ) -> anyhow::Result<Credentials> {
        anyhow::ensure!(
            grace_secs <= MAX_SECRET_GRACE_SECS,
            "--grace-secs is at most {MAX_SECRET_GRACE_SECS}"
        );
        let accounts = open(config).await?;
        let account = named(&accounts, name).await?;
        let grace = chrono::Duration::seconds(grace_secs as i64);
        let credentials =
            accounts.rotate_secret(&account, grace, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        print_credentials(&credentials, output)?;
        accounts.store.db().close().await;
        Ok(credentials)
    }

    /// `auth-service disable-service-account NAME` (or enable): a disabled
    /// account gets no new token; tokens already issued live out their 15
    /// minutes. True when it changed.
    pub async fn set_disabled(config: &AuthConfig, name: &str, disabled: bool) -> anyhow::Result<bool> {
        let accounts = open(config).await?;
        let account = named(&accounts, name).await?;
        let changed =
            accounts.set_disabled(&account, disabled, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let state = if disabled { "disabled" } else { "enabled" };
        if changed {
            println!("{} is {state}", account.name);
        } else {
            println!("{} was already {state}", account.name);
        }
        accounts.store.db().close().await;
        Ok(changed)
    }

    /// `auth-service delete-service-account NAME`.
    pub async fn delete(config: &AuthConfig, name: &str) -> anyhow::Result<()> {
        let accounts = open(config).await?;
        let account = named(&accounts, name).await?;
        accounts.delete(&account).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("deleted {}; tokens already issued live out their 15 minutes", account.name);
        accounts.store.db().close().await;
        Ok(())
    }
}
