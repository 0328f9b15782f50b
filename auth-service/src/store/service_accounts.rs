//! The SQL of service accounts (see `crate::service_accounts`).

use chrono::{DateTime, Utc};
use storegate::{
    ApiError,
    db::{BeginWrite as _, InsertId as _, is_unique_violation, retry_conflicts},
    on_db,
};

use super::AuthStore;

/// A service account as the operator and the token endpoint see it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ServiceAccount {
    pub id: i64,
    pub name: String,
    pub client_id: String,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// Filled in after the row is read.
    #[sqlx(skip)]
    pub roles: Vec<String>,
}

const ACCOUNT_COLUMNS: &str = "id, name, client_id, created_at, disabled_at";

impl AuthStore {
    /// Creates an account with its roles and first secret (its SHA-256),
    /// in one transaction; ALREADY_EXISTS when the name is taken.
    pub async fn create_service_account(
        &self,
        name: &str,
        client_id: &str,
        roles: &[&str],
        secret_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<i64, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO service_accounts (name, client_id, created_at) VALUES (?, ?, ?)",
                )
                .bind(name)
                .bind(client_id)
                .bind(now)
                .execute(&mut *tx)
                .await;
                let id = match inserted {
                    Ok(result) => result.insert_id(),
                    Err(e) if is_unique_violation(&e) => {
                        return Err(ApiError::AlreadyExists("a service account of that name exists"));
                    }
                    Err(e) => return Err(e.into()),
                };
                for role in roles {
                    sqlx::query("INSERT INTO service_account_roles (account_id, role) VALUES (?, ?)")
                        .bind(id)
                        .bind(role)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO service_account_secrets (secret_hash, account_id, created_at) VALUES (?, ?, ?)",
                )
                .bind(secret_hash)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(id)
            }
            .await)
        })
        .await
    }

    /// Every service account, by name, with its roles.
    pub async fn service_accounts(&self) -> Result<Vec<ServiceAccount>, ApiError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM service_accounts ORDER BY name");
        let mut accounts: Vec<ServiceAccount> =
            on_db!(&self.db, pool => sqlx::query_as(&sql).fetch_all(pool).await)?;
        let roles: Vec<(i64, String)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT account_id, role FROM service_account_roles ORDER BY role")
                .fetch_all(pool)
                .await
        })?;
        for account in &mut accounts {
            account.roles =
                roles.iter().filter(|(id, _)| *id == account.id).map(|(_, role)| role.clone()).collect();
        }
        Ok(accounts)
    }

    /// The account named `name`, with its roles.
    pub async fn service_account(&self, name: &str) -> Result<Option<ServiceAccount>, ApiError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM service_accounts WHERE name = ?");
        let account: Option<ServiceAccount> =
            on_db!(&self.db, pool => sqlx::query_as(&sql).bind(name).fetch_optional(pool).await)?;
        let Some(mut account) = account else { return Ok(None) };
        account.roles = self.service_account_roles(account.id).await?;
        Ok(Some(account))
    }

    pub async fn service_account_roles(&self, account_id: i64) -> Result<Vec<String>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT role FROM service_account_roles WHERE account_id = ? ORDER BY role")
                .bind(account_id)
                .fetch_all(pool)
                .await
        })?)
    }

    /// The enabled account that `client_id` names and whose live secret
    /// hashes to `secret_hash`, with its roles.
    pub async fn service_account_by_secret(
        &self,
        client_id: &str,
        secret_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<ServiceAccount>, ApiError> {
        const SQL: &str = "SELECT a.id, a.name, a.client_id, a.created_at, a.disabled_at \
             FROM service_accounts a JOIN service_account_secrets s ON s.account_id = a.id \
             WHERE a.client_id = ? AND s.secret_hash = ? \
             AND (s.expires_at IS NULL OR s.expires_at > ?) AND a.disabled_at IS NULL";
        let account: Option<ServiceAccount> = on_db!(&self.db, pool => {
            sqlx::query_as(SQL).bind(client_id).bind(secret_hash).bind(now).fetch_optional(pool).await
        })?;
        let Some(mut account) = account else { return Ok(None) };
        account.roles = self.service_account_roles(account.id).await?;
        Ok(Some(account))
    }

    /// Adds `secret_hash` as the account's current secret; the secrets
    /// current until now keep working until `old_until`. False when there
    /// is no such account.
    pub async fn rotate_service_secret(
        &self,
        account_id: i64,
        secret_hash: &[u8],
        old_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                let aged = sqlx::query(
                    "UPDATE service_account_secrets SET expires_at = ? \
                     WHERE account_id = ? AND (expires_at IS NULL OR expires_at > ?)",
                )
                .bind(old_until)
                .bind(account_id)
                .bind(old_until)
                .execute(&mut *tx)
                .await?;
                if aged.rows_affected() == 0 {
                    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM service_accounts WHERE id = ?")
                        .bind(account_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if exists.is_none() {
                        return Ok(false);
                    }
                }
                sqlx::query(
                    "INSERT INTO service_account_secrets (secret_hash, account_id, created_at) VALUES (?, ?, ?)",
                )
                .bind(secret_hash)
                .bind(account_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<bool, ApiError>(true)
            }
            .await)
        })
        .await
    }

    /// Disables (or enables) an account; false when it already was so.
    pub async fn set_service_account_disabled(
        &self,
        account_id: i64,
        disabled: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let disabled_at = disabled.then_some(now);
        retry_conflicts(move || async move {
            let changed = on_db!(&self.db, pool => {
                sqlx::query(
                    "UPDATE service_accounts SET disabled_at = ? \
                     WHERE id = ? AND (disabled_at IS NULL) = (? IS NOT NULL)",
                )
                .bind(disabled_at)
                .bind(account_id)
                .bind(disabled_at)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
            })?;
            Ok(changed == 1)
        })
        .await
    }

    /// Deletes an account, and with it (the foreign keys cascade) its roles
    /// and secrets; false when there was none.
    pub async fn delete_service_account(&self, account_id: i64) -> Result<bool, ApiError> {
        retry_conflicts(move || async move {
            let deleted = on_db!(&self.db, pool => {
                sqlx::query("DELETE FROM service_accounts WHERE id = ?")
                    .bind(account_id)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            })?;
            Ok(deleted == 1)
        })
        .await
    }

    /// Forgets secrets whose rotation grace is over; how many.
    pub async fn sweep_service_secrets(&self, now: DateTime<Utc>) -> Result<u64, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query("DELETE FROM service_account_secrets WHERE expires_at IS NOT NULL AND expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })?)
    }
}
