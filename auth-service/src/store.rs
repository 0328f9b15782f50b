//! Every SQL statement of auth-service. Placeholders are `?` on both
//! backends; each statement here runs unchanged on SQLite and MySQL.

use chrono::{DateTime, Utc};
use storegate::{
    ApiError, Db,
    db::{BeginWrite as _, InsertId as _, is_unique_violation},
    on_db,
};

/// A wrong code is allowed this many times per ticket; then the ticket dies.
pub const MAX_WRONG_CODES_PER_TICKET: i32 = 5;

#[derive(Clone, Debug)]
pub struct AuthStore {
    db: Db,
}

/// What BeginLogin needs to know about an account.
#[derive(sqlx::FromRow)]
pub struct LoginUser {
    pub id: i64,
    pub password_hash: String,
}

/// An account's TOTP state, for CompleteLogin and enrollment.
#[derive(sqlx::FromRow)]
pub struct TotpState {
    pub username: String,
    pub totp_secret: Vec<u8>,
    pub totp_last_step: Option<i64>,
    pub totp_confirmed_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub struct Ticket {
    pub user_id: i64,
}

#[derive(sqlx::FromRow)]
pub struct StoredSigningKey {
    pub kid: String,
    pub public_key: Vec<u8>,
    pub private_key: Vec<u8>,
}

/// A refresh token as stored: only its hash.
pub struct NewRefreshToken {
    pub token_hash: Vec<u8>,
    pub family: Vec<u8>,
    pub expires_at: DateTime<Utc>,
}

/// Why the last step of a login was refused.
pub enum CompleteLoginRefused {
    /// The ticket is unknown, used, expired or out of attempts.
    TicketInvalid,
    /// The code's time step was already used (replay).
    StepUsed,
}

impl AuthStore {
    pub fn new(db: Db) -> Self {
        AuthStore { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Creates an account. The TOTP secret is sealed with the new user id as
    /// associated data, so the id must exist first: both happen in one
    /// transaction.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        seal_totp_secret: impl Fn(i64) -> anyhow::Result<Vec<u8>>,
        now: DateTime<Utc>,
    ) -> Result<i64, ApiError> {
        on_db!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            let inserted = sqlx::query(
                "INSERT INTO users (username, password_hash, totp_secret, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(username)
            .bind(password_hash)
            .bind(Vec::<u8>::new())
            .bind(now)
            .execute(&mut *tx)
            .await;
            let id = match inserted {
                Ok(result) => result.insert_id(),
                Err(e) if is_unique_violation(&e) => {
                    return Err(ApiError::AlreadyExists("that username is taken"));
                }
                Err(e) => return Err(e.into()),
            };
            sqlx::query("UPDATE users SET totp_secret = ? WHERE id = ?")
                .bind(seal_totp_secret(id)?)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    pub async fn find_login_user(&self, username: &str) -> Result<Option<LoginUser>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as("SELECT id, password_hash FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(pool)
                .await
        })?)
    }

    pub async fn user_id_by_name(&self, username: &str) -> Result<Option<i64>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT id FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(pool)
                .await
        })?)
    }

    pub async fn totp_state(&self, user_id: i64) -> Result<Option<TotpState>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT username, totp_secret, totp_last_step, totp_confirmed_at FROM users WHERE id = ?",
            )
            .bind(user_id)
            .fetch_optional(pool)
            .await
        })?)
    }

    pub async fn roles(&self, user_id: i64) -> Result<Vec<String>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT role FROM user_roles WHERE user_id = ? ORDER BY role")
                .bind(user_id)
                .fetch_all(pool)
                .await
        })?)
    }

    /// Grants `role`; false if the user already had it.
    pub async fn grant_role(&self, user_id: i64, role: &str) -> Result<bool, ApiError> {
        on_db!(&self.db, pool => {
            match sqlx::query("INSERT INTO user_roles (user_id, role) VALUES (?, ?)")
                .bind(user_id)
                .bind(role)
                .execute(pool)
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if is_unique_violation(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    pub async fn create_ticket(
        &self,
        ticket_hash: &[u8],
        user_id: i64,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        on_db!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO login_tickets (ticket_hash, user_id, failed_codes, expires_at, created_at) \
                 VALUES (?, ?, 0, ?, ?)",
            )
            .bind(ticket_hash)
            .bind(user_id)
            .bind(expires_at)
            .bind(now)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// A ticket that may still be used: known, not expired, attempts left.
    pub async fn live_ticket(
        &self,
        ticket_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<Ticket>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT user_id FROM login_tickets WHERE ticket_hash = ? AND expires_at > ? AND failed_codes < ?",
            )
            .bind(ticket_hash)
            .bind(now)
            .bind(MAX_WRONG_CODES_PER_TICKET)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Counts a wrong code against the ticket, in the database so that
    /// parallel attempts on several replicas add up; a ticket out of attempts
    /// is deleted.
    pub async fn record_wrong_code(&self, ticket_hash: &[u8]) -> Result<(), ApiError> {
        on_db!(&self.db, pool => {
            sqlx::query("UPDATE login_tickets SET failed_codes = failed_codes + 1 WHERE ticket_hash = ?")
                .bind(ticket_hash)
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM login_tickets WHERE ticket_hash = ? AND failed_codes >= ?")
                .bind(ticket_hash)
                .bind(MAX_WRONG_CODES_PER_TICKET)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// The last step of a login, all or nothing: burns the ticket (only one
    /// caller can delete it), claims the TOTP step (only if later than the
    /// last one used), confirms enrollment, and stores the refresh token.
    pub async fn complete_login(
        &self,
        ticket_hash: &[u8],
        user_id: i64,
        step: i64,
        refresh: &NewRefreshToken,
        now: DateTime<Utc>,
    ) -> Result<Result<(), CompleteLoginRefused>, ApiError> {
        on_db!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            let burned = sqlx::query(
                "DELETE FROM login_tickets WHERE ticket_hash = ? AND user_id = ? AND expires_at > ? AND failed_codes < ?",
            )
            .bind(ticket_hash)
            .bind(user_id)
            .bind(now)
            .bind(MAX_WRONG_CODES_PER_TICKET)
            .execute(&mut *tx)
            .await?;
            if burned.rows_affected() != 1 {
                return Ok(Err(CompleteLoginRefused::TicketInvalid));
            }
            let claimed = sqlx::query(
                "UPDATE users SET totp_last_step = ?, totp_confirmed_at = COALESCE(totp_confirmed_at, ?) \
                 WHERE id = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
            )
            .bind(step)
            .bind(now)
            .bind(user_id)
            .bind(step)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                return Ok(Err(CompleteLoginRefused::StepUsed));
            }
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, family, user_id, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&refresh.token_hash)
            .bind(&refresh.family)
            .bind(user_id)
            .bind(refresh.expires_at)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    /// Deletes tickets and refresh tokens that can no longer be used.
    pub async fn sweep_expired(&self, now: DateTime<Utc>) -> Result<u64, ApiError> {
        Ok(on_db!(&self.db, pool => {
            let tickets = sqlx::query("DELETE FROM login_tickets WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?;
            let tokens = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?;
            Ok::<u64, sqlx::Error>(tickets.rows_affected() + tokens.rows_affected())
        })?)
    }

    pub async fn insert_signing_key(
        &self,
        key: &StoredSigningKey,
        now: DateTime<Utc>,
        active_at: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        on_db!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO signing_keys (kid, public_key, private_key, created_at, active_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&key.kid)
            .bind(&key.public_key)
            .bind(&key.private_key)
            .bind(now)
            .bind(active_at)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// The key to sign with now: the newest active one that is not retired.
    /// Every replica picks the same one.
    pub async fn current_signing_key(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<StoredSigningKey>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT kid, public_key, private_key FROM signing_keys \
                 WHERE retired_at IS NULL AND active_at <= ? ORDER BY active_at DESC, kid LIMIT 1",
            )
            .bind(now)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Keys to publish: every key not retired, and retired keys whose tokens
    /// may still be alive.
    pub async fn published_signing_keys(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<StoredSigningKey>, sqlx::Error> {
        let tokens_dead_before = now
            - chrono::Duration::seconds(
                storegate::token::ACCESS_TOKEN_TTL_SECS
                    + storegate::token::CLOCK_LEEWAY_SECS as i64,
            );
        on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT kid, public_key, private_key FROM signing_keys \
                 WHERE retired_at IS NULL OR retired_at > ? ORDER BY created_at, kid",
            )
            .bind(tokens_dead_before)
            .fetch_all(pool)
            .await
        })
    }
}
