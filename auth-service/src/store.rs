//! Every SQL statement of auth-service. Placeholders are `?` on both
//! backends; each statement here runs unchanged on SQLite and MySQL.

use std::future::Future;

use chrono::{DateTime, Utc};
use storegate::{
    ApiError, Db,
    db::{BeginWrite as _, InsertId as _, is_unique_violation, retry_conflicts},
    on_db,
};

mod audit;
mod service_accounts;

pub use service_accounts::ServiceAccount;

/// A wrong code is allowed this many times per ticket; then the ticket dies.
pub const MAX_WRONG_CODES_PER_TICKET: i32 = 5;

const INSERT_REFRESH_TOKEN: &str = "INSERT INTO refresh_tokens \
     (token_hash, family, user_id, expires_at, session_expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?)";

/// Ends every live session of a user (`?` now, user id).
const REVOKE_USER_SESSIONS: &str =
    "UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL";

/// Revokes every live token of a family (`?` now, family).
const REVOKE_FAMILY_SQL: &str =
    "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL";

/// Gives back one counted attempt, and any lock with it (see
/// [`AuthStore::refund_login_attempt`]).
const REFUND_ATTEMPT_SQL: &str = "UPDATE login_throttle SET failures = failures - 1, locked_until = NULL WHERE subject = ? AND failures > 0";

/// Gives back one use of a quota (see [`AuthStore::refund_quota`]).
const REFUND_QUOTA_SQL: &str = "UPDATE client_quotas SET used = used - 1 WHERE subject = ? AND used > 0";

/// Forgets a subject's failures and lock (a completed login).
const CLEAR_THROTTLE_SQL: &str =
    "UPDATE login_throttle SET failures = 0, locked_until = NULL, updated_at = ? WHERE subject = ?";

/// How long a device token lives: each login from the device replaces it.
pub const DEVICE_TOKEN_TTL_DAYS: i64 = 90;
/// How long a subject is locked after each failure from the first that
/// locks it: a throttle's policy (`throttle::LADDER`, the account-wide
/// ladder), applied by the database in the UPDATE that counts an attempt.
#[derive(Debug, Clone, Copy)]
pub struct LockLadder<'a> {
    /// Failures allowed before the first lock.
    pub free_failures: i64,
    /// The lock after failure `free_failures`, the next, …, in seconds; the
    /// last one for every failure after.
    pub delays_secs: &'a [i64],
}

impl LockLadder<'_> {
    /// Counts one attempt unless the name is locked, and sets the lock when
    /// the count reaches `free_failures`. `locked_until` is assigned before
    /// `failures` on purpose: MySQL evaluates SET assignments left to right
    /// with the new values, SQLite with the old ones; in this order both
    /// read the old count.
    fn admit_attempt_sql(&self) -> String {
        let free = self.free_failures;
        let ladder: String = self
            .delays_secs
            .iter()
            .enumerate()
            .map(|(i, delay)| format!("WHEN {} THEN {delay} ", free + i as i64))
            .collect();
        let longest = self.delays_secs.last().copied().unwrap_or(0);
        format!(
            "UPDATE login_throttle SET \
             locked_until = CASE WHEN failures + 1 < {free} THEN NULL \
                            ELSE ? + CASE failures + 1 {ladder}ELSE {longest} END END, \
             failures = failures + 1, \
             updated_at = ? \
             WHERE subject = ? AND (locked_until IS NULL OR locked_until <= ?)"
        )
    }
}

/// The window of [`AuthStore::admit_quota`]: an hour.
pub const QUOTA_WINDOW_SECS: i64 = 60 * 60;

/// Counts one use for a subject in its window unless the window is full. A
/// window that has ended starts afresh at this use. `used` is assigned
/// before `window_start` so that both backends read the old window (MySQL
/// evaluates SET left to right with new values).
const ADMIT_QUOTA_SQL: &str = "UPDATE client_quotas SET \
     used = CASE WHEN window_start <= ? THEN 1 ELSE used + 1 END, \
     window_start = CASE WHEN window_start <= ? THEN ? ELSE window_start END \
     WHERE subject = ? AND (window_start <= ? OR used < ?)";

/// When a quota's window (started at `start`, `used` times) is spent: the
/// unix time it ends; None when it ended (before `window_ended`) or has uses
/// left.
fn spent_until(start: i64, used: i64, window_ended: i64, limit: i64) -> Option<i64> {
    (start > window_ended && used >= limit).then_some(start + QUOTA_WINDOW_SECS)
}

/// Whether a counted call may go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Refused until this unix time.
    RefusedUntil(i64),
}

#[derive(Clone, Debug)]
pub struct AuthStore {
    db: Db,
}

/// What BeginLogin needs to know about an account, read in one statement
/// (the TOTP state is used only after the password proved right).
#[derive(sqlx::FromRow)]
pub struct LoginUser {
    pub id: i64,
    pub password_hash: String,
    /// Set by `auth-service disable-user`: no login until `enable-user`.
    pub disabled_at: Option<DateTime<Utc>>,
    #[sqlx(flatten)]
    pub totp: TotpState,
}

/// An account as an operator sees it (`auth-service list-users`, `show-user`).
#[derive(Debug, sqlx::FromRow)]
pub struct Account {
    pub id: i64,
    pub username: String,
    pub created_at: DateTime<Utc>,
    /// When the second factor was confirmed; None while enrolling.
    pub totp_confirmed_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
    /// Logins (refresh token families) live now.
    pub sessions: i64,
    #[sqlx(skip)]
    pub roles: Vec<String>,
    /// The account-wide lock in force now (see `throttle.rs`), read by
    /// [`AuthStore::account_lock`].
    #[sqlx(skip)]
    pub lock: Option<AccountLock>,
}

/// The account-wide lock of a name while it refuses unrecognised clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountLock {
    /// When the failure that set the current lock was counted.
    pub since: DateTime<Utc>,
    /// Unix seconds when it ends.
    pub until: i64,
}

/// What an account query selects by.
#[derive(Clone, Copy)]
enum AccountKey<'a> {
    Id(i64),
    Name(&'a str),
}

/// An account's TOTP state, for CompleteLogin and enrollment.
#[derive(sqlx::FromRow)]
pub struct TotpState {
    pub username: String,
    pub totp_secret: Vec<u8>,
    pub totp_last_step: Option<i64>,
    pub totp_confirmed_at: Option<DateTime<Utc>>,
}

/// Which of its ticket's code attempts an attempt is (see
/// [`AuthStore::count_code_attempt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeAttempt {
    /// The first counted: it uses the account count its ticket carries
    /// (see `throttle.rs`).
    First,
    Later,
}

/// A live login ticket and its account's TOTP state, read in one statement.
#[derive(sqlx::FromRow)]
pub struct Ticket {
    pub user_id: i64,
    /// The sealed secret this ticket offers for enrollment, if it does.
    pub enrollment_secret: Option<Vec<u8>>,
    /// The device token (hash) its BeginLogin was recognised by.
    pub device_hash: Option<Vec<u8>>,
    pub disabled_at: Option<DateTime<Utc>>,
    #[sqlx(flatten)]
    pub totp: TotpState,
}

/// The TOTP columns of `users`, as [`TotpState`] reads them.
macro_rules! totp_columns {
    () => {
        "users.username, users.totp_secret, users.totp_last_step, users.totp_confirmed_at"
    };
}

#[derive(sqlx::FromRow)]
pub struct StoredSigningKey {
    pub kid: String,
    pub public_key: Vec<u8>,
    pub private_key: Vec<u8>,
}

/// What RefreshToken found.
pub enum Rotation {
    Rotated {
        user_id: i64,
    },
    /// Redeemed again within the reuse grace of its rotation, while its
    /// successor is unused: the successor, still sealed.
    Again {
        user_id: i64,
        successor_sealed: Vec<u8>,
    },
    /// An already rotated token came back: its family is now revoked.
    Reused {
        user_id: i64,
    },
    /// Unknown, expired or revoked.
    Invalid,
}

#[derive(sqlx::FromRow)]
struct StoredRefreshToken {
    user_id: i64,
    family: Vec<u8>,
    expires_at: DateTime<Utc>,
    /// NULL on tokens stored before sessions had an end: their expires_at.
    session_expires_at: Option<DateTime<Utc>>,
    rotated_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl StoredRefreshToken {
    fn session_end(&self) -> DateTime<Utc> {
        self.session_expires_at.unwrap_or(self.expires_at)
    }

    fn live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// A rotated refresh token's rotation time, sealed successor and revocation.
type RotatedToken = (Option<DateTime<Utc>>, Option<Vec<u8>>, Option<DateTime<Utc>>);

/// A refresh token as stored: only its hash.
pub struct NewRefreshToken {
    pub token_hash: Vec<u8>,
    pub family: Vec<u8>,
    pub expires_at: DateTime<Utc>,
    /// The end of the session, which no refresh extends.
    pub session_expires_at: DateTime<Utc>,
}

/// What the last step of a login does once the ticket and the second factor
/// are proven.
pub enum LoginAction<'a> {
    /// Starts a session.
    SignIn,
    /// Confirms the enrollment the ticket offered (its sealed secret, and
    /// the keyed hashes of the new recovery codes), then signs in.
    Enroll { sealed_secret: &'a [u8], recovery_codes: &'a [Vec<u8>] },
    /// Replaces the password hash, ends every session, then signs in.
    ChangePassword { password_hash: &'a str },
    /// Forgets the second factor and its recovery codes and ends every
    /// session: the next login enrolls afresh. No session is started.
    ResetTotp,
}

/// An open session of a user, for the refresh token that shows it.
pub struct Session {
    pub user_id: i64,
    pub family: Vec<u8>,
}

/// What proved the second factor.
pub enum SecondFactor {
    /// A TOTP code of this time step.
    TotpStep(i64),
    /// A recovery code, by its keyed hash.
    RecoveryCode(Vec<u8>),
}

/// The login CompleteLogin is finishing.
pub struct CompletingLogin<'a> {
    pub ticket_hash: &'a [u8],
    pub user_id: i64,
    /// Whose failed attempts a completed login clears (the name's subjects
    /// in `throttle.rs`: with this client, and the account's).
    pub throttle_subjects: &'a [&'a [u8]],
    /// The known device the ticket's BeginLogin came from: its token is
    /// replaced.
    pub device_hash: Option<&'a [u8]>,
}

/// A login ticket to store.
pub struct NewTicket<'a> {
    pub ticket_hash: &'a [u8],
    pub user_id: i64,
    /// The sealed TOTP secret this ticket offers for enrollment.
    pub enrollment_secret: Option<&'a [u8]>,
    /// The known device BeginLogin was recognised by.
    pub device_hash: Option<&'a [u8]>,
    pub expires_at: DateTime<Utc>,
}

/// A device token to store with a completed login.
pub struct NewDevice {
    pub token_hash: Vec<u8>,
    pub expires_at: DateTime<Utc>,
}

/// What the last step of a login did.
pub enum Completion {
    /// Committed: the ticket burned, the factor spent, the action done.
    Completed,
    /// The ticket is unknown, used, expired or out of attempts.
    TicketInvalid,
    /// The TOTP step was already used (a replay), or the recovery code is
    /// unknown or used.
    FactorSpent,
    /// Another login confirmed an enrollment first: this ticket's secret is
    /// not the account's.
    EnrollmentTaken,
}

impl AuthStore {
    pub fn new(db: Db) -> Self {
        AuthStore { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Creates an account. Its TOTP secret comes later, with the login
    /// ticket whose code confirms it.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<i64, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => {
                let inserted = sqlx::query(
                    "INSERT INTO users (username, password_hash, totp_secret, created_at) VALUES (?, ?, ?, ?)",
                )
                .bind(username)
                .bind(password_hash)
                .bind(Vec::<u8>::new())
                .bind(now)
                .execute(pool)
                .await;
                match inserted {
                    Ok(result) => Ok(result.insert_id()),
                    Err(e) if is_unique_violation(&e) => Err(ApiError::AlreadyExists("that username is taken")),
                    Err(e) => Err(e.into()),
                }
            })
        })
        .await
    }

    pub async fn find_login_user(&self, username: &str) -> Result<Option<LoginUser>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(concat!(
                "SELECT users.id, users.password_hash, users.disabled_at, ",
                totp_columns!(),
                " FROM users WHERE username = ?"
            ))
                .bind(username)
                .fetch_optional(pool)
                .await
        })?)
    }

    pub async fn username(&self, user_id: i64) -> Result<Option<String>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT username FROM users WHERE id = ?").bind(user_id).fetch_optional(pool).await
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

    /// Whether the account's TOTP enrollment is confirmed now.
    pub async fn totp_confirmed(&self, user_id: i64) -> Result<bool, ApiError> {
        let confirmed_at: Option<Option<DateTime<Utc>>> = on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT totp_confirmed_at FROM users WHERE id = ?")
                .bind(user_id)
                .fetch_optional(pool)
                .await
        })?;
        Ok(confirmed_at.flatten().is_some())
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
        retry_conflicts(move || async move {
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
        })
        .await
    }

    /// Stores a login ticket and gives back the attempt's counts (a right
    /// password is no failure: `throttle_subjects`), in one transaction:
    /// one commit instead of several on every login.
    pub async fn create_ticket(
        &self,
        ticket: &NewTicket<'_>,
        throttle_subjects: &[&[u8]],
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO login_tickets \
                 (ticket_hash, user_id, enrollment_secret, device_hash, failed_codes, expires_at, created_at) \
                 VALUES (?, ?, ?, ?, 0, ?, ?)",
            )
            .bind(ticket.ticket_hash)
            .bind(ticket.user_id)
            .bind(ticket.enrollment_secret)
            .bind(ticket.device_hash)
            .bind(ticket.expires_at)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for subject in throttle_subjects {
                sqlx::query(REFUND_ATTEMPT_SQL).bind(subject).execute(&mut *tx).await?;
            }
            Ok(tx.commit().await?)
        }
        .await)
        })
        .await
    }

    /// Whether `device_hash` is a live device token of the account named
    /// `username`.
    pub async fn recognised_device(
        &self,
        device_hash: &[u8],
        username: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let found: Option<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT login_devices.user_id FROM login_devices JOIN users ON users.id = login_devices.user_id \
                 WHERE login_devices.token_hash = ? AND users.username = ? AND login_devices.expires_at > ?",
            )
            .bind(device_hash)
            .bind(username)
            .bind(now)
            .fetch_optional(pool)
            .await
        })?;
        Ok(found.is_some())
    }

    /// A ticket that may still be used (known, not expired, attempts left),
    /// with its account's TOTP state.
    pub async fn live_ticket(
        &self,
        ticket_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<Ticket>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(concat!(
                "SELECT login_tickets.user_id, login_tickets.enrollment_secret, login_tickets.device_hash, \
                 users.disabled_at, ",
                totp_columns!(),
                " FROM login_tickets JOIN users ON users.id = login_tickets.user_id \
                 WHERE login_tickets.ticket_hash = ? AND login_tickets.expires_at > ? \
                 AND login_tickets.failed_codes < ?"
            ))
            .bind(ticket_hash)
            .bind(now)
            .bind(MAX_WRONG_CODES_PER_TICKET)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Counts a code attempt on the ticket *before* the code is evaluated,
    /// unless the ticket is out of attempts or expired (None): conditional
    /// UPDATEs, so that of any number of parallel attempts on any replicas
    /// at most [`MAX_WRONG_CODES_PER_TICKET`] are evaluated, and exactly one
    /// of them is the ticket's first. A wrong code stays counted; a right
    /// one burns the ticket.
    pub async fn count_code_attempt(
        &self,
        ticket_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<CodeAttempt>, ApiError> {
        let counted = |sql: &'static str| {
            retry_conflicts(move || async move {
                Ok(on_db!(&self.db, pool => {
                    sqlx::query(sql)
                        .bind(ticket_hash)
                        .bind(now)
                        .bind(MAX_WRONG_CODES_PER_TICKET)
                        .execute(pool)
                        .await
                        .map(|r| r.rows_affected() == 1)
                })?)
            })
        };
        if counted(
            "UPDATE login_tickets SET failed_codes = 1 \
             WHERE ticket_hash = ? AND expires_at > ? AND failed_codes = 0 AND ? > 0",
        )
        .await?
        {
            return Ok(Some(CodeAttempt::First));
        }
        let later = counted(
            "UPDATE login_tickets SET failed_codes = failed_codes + 1 \
             WHERE ticket_hash = ? AND expires_at > ? AND failed_codes < ?",
        )
        .await?;
        Ok(later.then_some(CodeAttempt::Later))
    }

    /// Gives back a code attempt that was never evaluated (throttled, or
    /// failed before its answer).
    pub async fn refund_code_attempt(&self, ticket_hash: &[u8]) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query(
                    "UPDATE login_tickets SET failed_codes = failed_codes - 1 WHERE ticket_hash = ? AND failed_codes > 0",
                )
                .bind(ticket_hash)
                .execute(pool)
                .await
                .map(drop)
            })?)
        })
        .await
    }

    /// The last step of a login, all or nothing: burns the ticket (only one
    /// caller can delete it), spends the second factor (a TOTP step only if
    /// later than the last one used; a recovery code only if unused; an
    /// enrollment only if no other was confirmed first), does what `action`
    /// asks, stores the refresh token (when the action signs in) and the
    /// device token (replacing the one the login came from), clears the
    /// failed attempts counted against `login.throttle_subjects` and gives
    /// back the address's budget.
    pub async fn complete_login(
        &self,
        login: &CompletingLogin<'_>,
        factor: &SecondFactor,
        action: &LoginAction<'_>,
        refresh: &NewRefreshToken,
        device: Option<&NewDevice>,
        now: DateTime<Utc>,
    ) -> Result<Completion, ApiError> {
        // Parallel completions for one user lock the same rows; InnoDB may
        // end one as a deadlock victim (Galera: a failed certification),
        // rolling all of it back, so rerunning it is safe (and it then meets
        // the winner's committed state).
        retry_conflicts(move || async move {
            Ok(self.complete_login_once(login, factor, action, refresh, device, now).await?)
        })
        .await
    }

    async fn complete_login_once(
        &self,
        login: &CompletingLogin<'_>,
        factor: &SecondFactor,
        action: &LoginAction<'_>,
        refresh: &NewRefreshToken,
        device: Option<&NewDevice>,
        now: DateTime<Utc>,
    ) -> Result<Completion, sqlx::Error> {
        let &CompletingLogin { ticket_hash, user_id, throttle_subjects, device_hash } = login;
        on_db!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            // The attempt was counted on the ticket before its code was
            // evaluated (`count_code_attempt`): whatever it counted, the
            // ticket is this attempt's to burn.
            let burned = sqlx::query(
                "DELETE FROM login_tickets WHERE ticket_hash = ? AND user_id = ? AND expires_at > ?",
            )
            .bind(ticket_hash)
            .bind(user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if burned.rows_affected() != 1 {
                return Ok(Completion::TicketInvalid);
            }
            let spent = match (factor, action) {
                // The first code of a secret confirms that secret, unless
                // another ticket's confirmed one first.
                (SecondFactor::TotpStep(step), LoginAction::Enroll { sealed_secret, .. }) => {
                    let confirmed = sqlx::query(
                        "UPDATE users SET totp_secret = ?, totp_confirmed_at = ?, totp_last_step = ? \
                         WHERE id = ? AND totp_confirmed_at IS NULL",
                    )
                    .bind(sealed_secret)
                    .bind(now)
                    .bind(step)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                    if confirmed.rows_affected() != 1 {
                        return Ok(Completion::EnrollmentTaken);
                    }
                    confirmed
                }
                (_, LoginAction::Enroll { .. }) => return Ok(Completion::FactorSpent),
                (SecondFactor::TotpStep(step), _) => sqlx::query(
                    "UPDATE users SET totp_last_step = ? WHERE id = ? AND totp_confirmed_at IS NOT NULL \
                     AND (totp_last_step IS NULL OR totp_last_step < ?)",
                )
                .bind(step)
                .bind(user_id)
                .bind(step)
                .execute(&mut *tx)
                .await?,
                (SecondFactor::RecoveryCode(code_hash), _) => sqlx::query(
                    "UPDATE recovery_codes SET used_at = ? WHERE user_id = ? AND code_hash = ? AND used_at IS NULL",
                )
                .bind(now)
                .bind(user_id)
                .bind(code_hash)
                .execute(&mut *tx)
                .await?,
            };
            if spent.rows_affected() != 1 {
                return Ok(Completion::FactorSpent);
            }
            match action {
                LoginAction::SignIn => {}
                LoginAction::Enroll { recovery_codes, .. } => {
                    for code_hash in *recovery_codes {
                        sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)")
                            .bind(user_id)
                            .bind(code_hash)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                LoginAction::ChangePassword { password_hash } => {
                    sqlx::query("UPDATE users SET password_hash = ? WHERE id = ?")
                        .bind(password_hash)
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?;
                }
                LoginAction::ResetTotp => {
                    sqlx::query(
                        // The last step belonged to the old secret: the new
                        // one's first code may come in the same 30 seconds.
                        "UPDATE users SET totp_secret = ?, totp_confirmed_at = NULL, totp_last_step = NULL WHERE id = ?",
                    )
                    .bind(Vec::<u8>::new())
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            // The device this login came from keeps its first login's date.
            let device_since: Option<DateTime<Utc>> = match device_hash {
                Some(hash) => {
                    sqlx::query_scalar("SELECT created_at FROM login_devices WHERE token_hash = ? AND user_id = ?")
                        .bind(hash)
                        .bind(user_id)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                None => None,
            };
            if matches!(action, LoginAction::ChangePassword { .. } | LoginAction::ResetTotp) {
                // Whatever the old password or factor let in ends here: other
                // sessions, known devices, and tickets waiting for a code.
                sqlx::query(REVOKE_USER_SESSIONS).bind(now).bind(user_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM login_tickets WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM login_devices WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
            } else if let Some(hash) = device_hash {
                sqlx::query("DELETE FROM login_devices WHERE token_hash = ?").bind(hash).execute(&mut *tx).await?;
            }
            if let Some(device) = device {
                sqlx::query(
                    "INSERT INTO login_devices (token_hash, user_id, created_at, last_used_at, expires_at) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&device.token_hash)
                .bind(user_id)
                .bind(device_since.unwrap_or(now))
                .bind(now)
                .bind(device.expires_at)
                .execute(&mut *tx)
                .await?;
            }
            if !matches!(action, LoginAction::ResetTotp) {
                sqlx::query(INSERT_REFRESH_TOKEN)
                    .bind(&refresh.token_hash)
                    .bind(&refresh.family)
                    .bind(user_id)
                    .bind(refresh.expires_at)
                    .bind(refresh.session_expires_at)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            // Zeroed, not deleted: the next login's count is then one UPDATE
            // (a missing row costs a read and an insert first); the sweeper
            // deletes the row after a day without attempts.
            for subject in throttle_subjects {
                sqlx::query(CLEAR_THROTTLE_SQL).bind(now).bind(subject).execute(&mut *tx).await?;
            }
            // The row is this transaction's already (its factor was spent).
            sqlx::query("UPDATE users SET last_login_at = ? WHERE id = ?")
                .bind(now)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Completion::Completed)
        })
    }

    /// The account-wide lock of `account_subject` in force at `now_unix`.
    pub async fn account_lock(
        &self,
        account_subject: &[u8],
        now_unix: i64,
    ) -> Result<Option<AccountLock>, ApiError> {
        let row: Option<(Option<i64>, DateTime<Utc>)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT locked_until, updated_at FROM login_throttle WHERE subject = ?")
                .bind(account_subject)
                .fetch_optional(pool)
                .await
        })?;
        // A locked subject is not updated until its lock ends: updated_at
        // is when the failure that set the lock was counted.
        Ok(row.and_then(|(until, since)| {
            until.filter(|until| *until > now_unix).map(|until| AccountLock { since, until })
        }))
    }

    /// Forgets the account-wide count of `account_subject` and lifts its
    /// lock; whether a lock was in force at `now_unix`. The lock columns of
    /// `users` (before migration 0010), which replicas of the previous
    /// version still read during a rolling upgrade, are cleared with it.
    pub async fn clear_account_lock(
        &self,
        account_subject: &[u8],
        user_id: i64,
        now_unix: i64,
    ) -> Result<bool, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                let locked: Option<i64> = sqlx::query_scalar(
                    "SELECT locked_until FROM login_throttle WHERE subject = ? AND locked_until > ?",
                )
                .bind(account_subject)
                .bind(now_unix)
                .fetch_optional(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM login_throttle WHERE subject = ?")
                    .bind(account_subject)
                    .execute(&mut *tx)
                    .await?;
                let locked_before = sqlx::query(
                    "UPDATE users SET failed_logins = 0, locked_at = NULL WHERE id = ? AND locked_at IS NOT NULL",
                )
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query("UPDATE users SET failed_logins = 0 WHERE id = ? AND failed_logins <> 0")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<bool, ApiError>(locked.is_some() || locked_before == 1)
            }
            .await)
        })
        .await
    }

    /// Counts a login attempt for `subject` unless it is locked, locking it
    /// by `ladder`. See `throttle.rs`.
    pub async fn admit_login_attempt(
        &self,
        subject: &[u8],
        ladder: &LockLadder<'_>,
        now_unix: i64,
    ) -> Result<Admission, ApiError> {
        let admit_sql = &ladder.admit_attempt_sql();
        self.admit_attempt_with(subject, now_unix, || async move {
            // One statement standing alone: a conflict reruns just it.
            retry_conflicts(move || async move {
                Ok(on_db!(&self.db, pool => {
                    sqlx::query(admit_sql)
                        .bind(now_unix)
                        .bind(storegate::db::now())
                        .bind(subject)
                        .bind(now_unix)
                        .execute(pool)
                        .await
                        .map(|r| r.rows_affected())
                })?)
            })
            .await
        })
        .await
    }

    /// As [`AuthStore::admit_login_attempt`], and whether this attempt's
    /// count is the one that reached `ladder.free_failures`, the first lock
    /// (read in the transaction that counted it, so exactly one attempt
    /// reaches it however many run in parallel).
    pub async fn admit_counting(
        &self,
        subject: &[u8],
        ladder: &LockLadder<'_>,
        now_unix: i64,
    ) -> Result<(Admission, bool), ApiError> {
        let admit_sql = &ladder.admit_attempt_sql();
        let reached = std::sync::atomic::AtomicBool::new(false);
        let reached = &reached;
        let admission = self
            .admit_attempt_with(subject, now_unix, || async move {
                retry_conflicts(move || async move {
                    on_db!(&self.db, pool => async {
                        let mut tx = pool.begin_write().await?;
                        let counted = sqlx::query(admit_sql)
                            .bind(now_unix)
                            .bind(storegate::db::now())
                            .bind(subject)
                            .bind(now_unix)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        let failures: Option<i64> = if counted == 1 {
                            sqlx::query_scalar("SELECT CAST(failures AS SIGNED) FROM login_throttle WHERE subject = ?")
                                .bind(subject)
                                .fetch_optional(&mut *tx)
                                .await?
                        } else {
                            None
                        };
                        tx.commit().await?;
                        reached.store(failures == Some(ladder.free_failures), std::sync::atomic::Ordering::Relaxed);
                        Ok::<u64, ApiError>(counted)
                    }
                    .await)
                })
                .await
            })
            .await?;
        Ok((admission, reached.load(std::sync::atomic::Ordering::Relaxed)))
    }

    /// The loop of a login throttle's admission around `count`.
    async fn admit_attempt_with<C, CF>(
        &self,
        subject: &[u8],
        now_unix: i64,
        count: C,
    ) -> Result<Admission, ApiError>
    where
        C: Fn() -> CF,
        CF: Future<Output = Result<u64, ApiError>>,
    {
        self.admit_counted(
            now_unix,
            count,
            || async move {
                let lock: Option<Option<i64>> = on_db!(&self.db, pool => {
                    sqlx::query_scalar("SELECT locked_until FROM login_throttle WHERE subject = ?")
                        .bind(subject)
                        .fetch_optional(pool)
                        .await
                })?;
                Ok(lock.map(|until| until.filter(|until| *until > now_unix)))
            },
            || {
                self.create_counter_row(
                    "INSERT INTO login_throttle (subject, failures, updated_at) VALUES (?, 0, ?)",
                    subject,
                    storegate::db::now(),
                )
            },
        )
        .await
    }

    /// The loop both counters (login throttle, client quota) share: count
    /// with one conditional UPDATE (`count`: rows it changed); when it
    /// changed none, read why (`refusal`: no row yet, or the unix time the
    /// refusal ends, None when it ended in between), create a missing row
    /// (a parallel call may win that race) and count again.
    async fn admit_counted<C, CF, R, RF, N, NF>(
        &self,
        now_unix: i64,
        count: C,
        refusal: R,
        create_row: N,
    ) -> Result<Admission, ApiError>
    where
        C: Fn() -> CF,
        CF: Future<Output = Result<u64, ApiError>>,
        R: Fn() -> RF,
        RF: Future<Output = Result<Option<Option<i64>>, ApiError>>,
        N: Fn() -> NF,
        NF: Future<Output = Result<(), ApiError>>,
    {
        for _ in 0..3 {
            if count().await? == 1 {
                return Ok(Admission::Admitted);
            }
            match refusal().await? {
                Some(Some(until)) => return Ok(Admission::RefusedUntil(until)),
                None => create_row().await?,
                Some(None) => {}
            }
        }
        Ok(Admission::RefusedUntil(now_unix + 1))
    }

    /// Inserts the row of a counter keyed by `subject` (`sql` binds the
    /// subject and one more value); a parallel call that inserted it first
    /// is as good.
    async fn create_counter_row<V>(&self, sql: &'static str, subject: &[u8], value: V) -> Result<(), ApiError>
    where
        V: for<'q> sqlx::Encode<'q, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + for<'q> sqlx::Encode<'q, sqlx::MySql>
            + sqlx::Type<sqlx::MySql>
            + Copy
            + Send
            + Sync
            + 'static,
    {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => {
                match sqlx::query(sql).bind(subject).bind(value).execute(pool).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_unique_violation(&e) => Ok(()),
                    Err(e) => Err(ApiError::from(e)),
                }
            })
        })
        .await
    }

    /// Gives back the count of an attempt that was right or never evaluated.
    /// Any lock goes with it: the attempt was admitted, so no earlier lock
    /// was in force, and a failure in parallel keeps its own count.
    pub async fn refund_login_attempt(&self, subject: &[u8]) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => sqlx::query(REFUND_ATTEMPT_SQL).bind(subject).execute(pool).await.map(drop))?)
        })
        .await
    }

    /// Counts a use of `subject`'s quota of `limit` an hour, unless it is
    /// spent. The count is settled by one conditional UPDATE, so parallel
    /// calls on any number of replicas cannot overshoot it.
    pub async fn admit_quota(
        &self,
        subject: &[u8],
        limit: i64,
        now_unix: i64,
    ) -> Result<Admission, ApiError> {
        let window_ended = now_unix - QUOTA_WINDOW_SECS;
        self.admit_counted(
            now_unix,
            || async move {
                retry_conflicts(move || async move {
                    Ok(on_db!(&self.db, pool => {
                        sqlx::query(ADMIT_QUOTA_SQL)
                            .bind(window_ended)
                            .bind(window_ended)
                            .bind(now_unix)
                            .bind(subject)
                            .bind(window_ended)
                            .bind(limit)
                            .execute(pool)
                            .await
                            .map(|r| r.rows_affected())
                    })?)
                })
                .await
            },
            || async move {
                // Spent only when full: a row a parallel call created after
                // our UPDATE found none is counted on the next round.
                let window = self.quota_window(subject).await?;
                Ok(window.map(|(start, used)| spent_until(start, used, window_ended, limit)))
            },
            || {
                self.create_counter_row(
                    "INSERT INTO client_quotas (subject, window_start, used) VALUES (?, ?, 0)",
                    subject,
                    now_unix,
                )
            },
        )
        .await
    }

    /// When `subject`'s quota of `limit` an hour is spent: the unix time its
    /// window ends, None while uses are left. A read only.
    pub async fn quota_spent_until(
        &self,
        subject: &[u8],
        limit: i64,
        now_unix: i64,
    ) -> Result<Option<i64>, ApiError> {
        let window_ended = now_unix - QUOTA_WINDOW_SECS;
        let window = self.quota_window(subject).await?;
        Ok(window.and_then(|(start, used)| spent_until(start, used, window_ended, limit)))
    }

    /// A quota's window: when it started, and the uses counted in it.
    async fn quota_window(&self, subject: &[u8]) -> Result<Option<(i64, i64)>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as("SELECT window_start, CAST(used AS SIGNED) FROM client_quotas WHERE subject = ?")
                .bind(subject)
                .fetch_optional(pool)
                .await
        })?)
    }

    /// Gives back one use of a quota (a call that turned out not to count).
    pub async fn refund_quota(&self, subject: &[u8]) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query(REFUND_QUOTA_SQL)
                    .bind(subject)
                    .execute(pool)
                    .await
                    .map(drop)
            })?)
        })
        .await
    }

    /// Rotates a refresh token: the old one is marked rotated (only one
    /// caller can do that) and keeps its successor sealed
    /// (`successor_sealed`, None without a reuse grace), and the successor
    /// is stored in the same family, living `ttl` but never past the end of
    /// its session. An already rotated token presented again within `grace`
    /// of its rotation is [`Rotation::Again`] (the caller checks that the
    /// successor is still unused); otherwise its whole family is revoked.
    pub async fn rotate_refresh_token(
        &self,
        old_hash: &[u8],
        new_hash: &[u8],
        successor_sealed: Option<&[u8]>,
        ttl: chrono::Duration,
        grace: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Rotation, ApiError> {
        let Some(old) = &self.refresh_token(old_hash).await? else { return Ok(Rotation::Invalid) };
        if !old.live(now) {
            return Ok(Rotation::Invalid);
        }
        let session_end = old.session_end();
        let new_expires_at = (now + ttl).min(session_end);
        // An async block, so that `return` leaves only the transaction.
        // On a cluster, the same token redeemed on two nodes at once: one
        // commit fails certification, and its rerun finds the token rotated.
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            let claimed = sqlx::query(
                "UPDATE refresh_tokens SET rotated_at = ?, successor_sealed = ? \
                 WHERE token_hash = ? AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > ?",
            )
            .bind(now)
            .bind(successor_sealed)
            .bind(old_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 1 {
                sqlx::query(INSERT_REFRESH_TOKEN)
                    .bind(new_hash)
                    .bind(&old.family)
                    .bind(old.user_id)
                    .bind(new_expires_at)
                    .bind(session_end)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok::<_, ApiError>(Rotation::Rotated { user_id: old.user_id });
            }
            // Rotated already (perhaps a moment ago, by a parallel redeem
            // whose UPDATE held ours until it committed): read in this
            // transaction, which sees that redeem's rotation (on SQLite it
            // may be a member of the same group commit, not yet committed)
            // and commits only after it.
            let rotated: Option<RotatedToken> = sqlx::query_as(
                "SELECT rotated_at, successor_sealed, revoked_at FROM refresh_tokens WHERE token_hash = ?",
            )
            .bind(old_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let rotation = match rotated {
                Some((Some(rotated_at), Some(successor_sealed), None)) if now < rotated_at + grace => {
                    Rotation::Again { user_id: old.user_id, successor_sealed }
                }
                _ => {
                    sqlx::query(REVOKE_FAMILY_SQL).bind(now).bind(&old.family).execute(&mut *tx).await?;
                    Rotation::Reused { user_id: old.user_id }
                }
            };
            tx.commit().await?;
            Ok(rotation)
        }
        .await)
        })
        .await
    }

    async fn refresh_token(&self, token_hash: &[u8]) -> Result<Option<StoredRefreshToken>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT user_id, family, expires_at, session_expires_at, rotated_at, revoked_at \
                 FROM refresh_tokens WHERE token_hash = ?",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// The session a refresh token shows, if the token may still be
    /// redeemed (live and not rotated away).
    pub async fn session(&self, token_hash: &[u8], now: DateTime<Utc>) -> Result<Option<Session>, ApiError> {
        Ok(self
            .refresh_token(token_hash)
            .await?
            .filter(|t| t.live(now) && t.rotated_at.is_none())
            .map(|t| Session { user_id: t.user_id, family: t.family }))
    }

    /// Revokes every token of the family `token_hash` belongs to; false if
    /// there is no such token.
    pub async fn revoke_refresh_family(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, ApiError> {
        let Some(token) = self.refresh_token(token_hash).await? else { return Ok(None) };
        self.revoke_family(&token.family, now).await?;
        Ok(Some(token.user_id))
    }

    async fn revoke_family(&self, family: &[u8], now: DateTime<Utc>) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query(REVOKE_FAMILY_SQL)
                    .bind(now)
                    .bind(family)
                    .execute(pool)
                    .await
                    .map(drop)
            })?)
        })
        .await
    }

    /// Ends every session of a user but the one of `keep_family`; the
    /// number of sessions ended (live ones: an expired login is no session).
    pub async fn revoke_user_sessions(
        &self,
        user_id: i64,
        keep_family: Option<&[u8]>,
        now: DateTime<Utc>,
    ) -> Result<i64, ApiError> {
        // An empty family matches no token: "keep none".
        let keep = keep_family.unwrap_or_default();
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                let sessions: i64 = sqlx::query_scalar(
                    "SELECT COUNT(DISTINCT family) FROM refresh_tokens \
                     WHERE user_id = ? AND revoked_at IS NULL AND expires_at > ? AND family <> ?",
                )
                .bind(user_id)
                .bind(now)
                .bind(keep)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL AND family <> ?",
                )
                .bind(now)
                .bind(user_id)
                .bind(keep)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<i64, ApiError>(sessions)
            }
            .await)
        })
        .await
    }

    /// Every account as an operator sees it, by username.
    pub async fn accounts(&self, now: DateTime<Utc>) -> Result<Vec<Account>, ApiError> {
        self.accounts_where("1 = 1", None, None, now).await
    }

    /// One account as an operator sees it.
    pub async fn account(&self, user_id: i64, now: DateTime<Utc>) -> Result<Option<Account>, ApiError> {
        Ok(self
            .accounts_where("users.id = ?", Some(AccountKey::Id(user_id)), None, now)
            .await?
            .into_iter()
            .next())
    }

    /// Up to `limit` accounts in username order, after `after` when given.
    pub async fn accounts_page(
        &self,
        after: Option<&str>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Account>, ApiError> {
        let condition = if after.is_some() { "users.username > ?" } else { "1 = 1" };
        self.accounts_where(condition, after.map(AccountKey::Name), Some(limit), now).await
    }

    async fn accounts_where(
        &self,
        condition: &str,
        key: Option<AccountKey<'_>>,
        limit: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Account>, ApiError> {
        // Roles and live sessions as subqueries: plain SQL both backends
        // run alike (no GROUP_CONCAT / group_concat difference).
        let sql = format!(
            "SELECT users.id, users.username, users.created_at, users.totp_confirmed_at, \
             users.disabled_at, users.last_login_at, \
             (SELECT COUNT(DISTINCT family) FROM refresh_tokens WHERE refresh_tokens.user_id = users.id \
              AND refresh_tokens.revoked_at IS NULL AND refresh_tokens.expires_at > ?) AS sessions \
             FROM users WHERE {condition} ORDER BY users.username{}",
            if limit.is_some() { " LIMIT ?" } else { "" }
        );
        let mut accounts: Vec<Account> = on_db!(&self.db, pool => {
            let query = sqlx::query_as(&sql).bind(now);
            let query = match key {
                Some(AccountKey::Id(id)) => query.bind(id),
                Some(AccountKey::Name(name)) => query.bind(name),
                None => query,
            };
            let query = match limit {
                Some(limit) => query.bind(limit),
                None => query,
            };
            query.fetch_all(pool).await
        })?;
        for account in &mut accounts {
            account.roles = self.roles(account.id).await?;
            account.lock = self
                .account_lock(&crate::throttle::account_subject(&account.username), now.timestamp())
                .await?;
        }
        Ok(accounts)
    }

    /// Disables an account (or enables it again): a disabled account's
    /// sessions, known devices and pending tickets end with it, in one
    /// transaction. False
    /// when it already was so.
    pub async fn set_disabled(
        &self,
        user_id: i64,
        disabled: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                let changed = if disabled {
                    sqlx::query("UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL")
                        .bind(now)
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?
                } else {
                    sqlx::query("UPDATE users SET disabled_at = NULL WHERE id = ? AND disabled_at IS NOT NULL")
                        .bind(user_id)
                        .execute(&mut *tx)
                        .await?
                };
                if disabled && changed.rows_affected() == 1 {
                    sqlx::query(REVOKE_USER_SESSIONS).bind(now).bind(user_id).execute(&mut *tx).await?;
                    sqlx::query("DELETE FROM login_tickets WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                    sqlx::query("DELETE FROM login_devices WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok::<_, ApiError>(changed.rows_affected() == 1)
            }
            .await)
        })
        .await
    }

    /// Forgets an account's second factor (secret, recovery codes) and ends
    /// its sessions, known devices and pending tickets: the next login
    /// enrolls afresh.
    pub async fn forget_second_factor(&self, user_id: i64, now: DateTime<Utc>) -> Result<(), ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
                let mut tx = pool.begin_write().await?;
                sqlx::query(
                    "UPDATE users SET totp_secret = ?, totp_confirmed_at = NULL, totp_last_step = NULL WHERE id = ?",
                )
                .bind(Vec::<u8>::new())
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                sqlx::query(REVOKE_USER_SESSIONS).bind(now).bind(user_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM login_tickets WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM login_devices WHERE user_id = ?").bind(user_id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok::<_, ApiError>(())
            }
            .await)
        })
        .await
    }

    /// Deletes an account; its roles, tickets, refresh tokens, known
    /// devices and recovery codes go with it (foreign keys, ON DELETE
    /// CASCADE), so its sessions end; its audit trail stays (no foreign
    /// key), found by its id. Products keep its id as who made or changed them. False when
    /// there was no such account.
    pub async fn delete_user(&self, user_id: i64) -> Result<bool, ApiError> {
        let deleted: u64 = retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query("DELETE FROM users WHERE id = ?").bind(user_id).execute(pool).await.map(|r| r.rows_affected())
            })?)
        })
        .await?;
        Ok(deleted == 1)
    }

    /// Takes `role` away; false if the user did not have it.
    pub async fn revoke_role(&self, user_id: i64, role: &str) -> Result<bool, ApiError> {
        let removed = retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query("DELETE FROM user_roles WHERE user_id = ? AND role = ?")
                    .bind(user_id)
                    .bind(role)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            })?)
        })
        .await?;
        Ok(removed == 1)
    }

    /// Deletes tickets, refresh tokens and device tokens that can no longer
    /// be used, and forgets the successors of refresh tokens rotated longer
    /// than `reuse_grace` ago.
    pub async fn sweep_expired(
        &self,
        now: DateTime<Utc>,
        reuse_grace: chrono::Duration,
    ) -> Result<u64, ApiError> {
        Ok(on_db!(&self.db, pool => {
            let tickets = sqlx::query("DELETE FROM login_tickets WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?;
            let tokens = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?;
            let successors = sqlx::query(
                "UPDATE refresh_tokens SET successor_sealed = NULL WHERE successor_sealed IS NOT NULL AND rotated_at <= ?",
            )
            .bind(now - reuse_grace)
            .execute(pool)
            .await?;
            let devices = sqlx::query("DELETE FROM login_devices WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?;
            // A day without attempts and without a lock forgets the failures.
            let throttles = sqlx::query(
                "DELETE FROM login_throttle WHERE updated_at <= ? AND (locked_until IS NULL OR locked_until <= ?)",
            )
            .bind(now - chrono::Duration::days(1))
            .bind(now.timestamp())
            .execute(pool)
            .await?;
            let quotas = sqlx::query("DELETE FROM client_quotas WHERE window_start <= ?")
                .bind(now.timestamp() - QUOTA_WINDOW_SECS)
                .execute(pool)
                .await?;
            // Keys retired a day ago signed nothing that is still valid.
            let keys = sqlx::query("DELETE FROM signing_keys WHERE retired_at <= ? OR withdrawn_at <= ?")
                .bind(now - chrono::Duration::days(1))
                .bind(now - chrono::Duration::days(1))
                .execute(pool)
                .await?;
            Ok::<u64, sqlx::Error>(
                tickets.rows_affected()
                    + tokens.rows_affected()
                    + successors.rows_affected()
                    + devices.rows_affected()
                    + throttles.rows_affected()
                    + quotas.rows_affected()
                    + keys.rows_affected(),
            )
        })? + self.sweep_service_secrets(now).await?)
    }

    /// The key to sign with now: the newest one already active and not yet
    /// retired. Every replica picks the same one.
    pub async fn current_signing_key(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<StoredSigningKey>, ApiError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT kid, public_key, private_key FROM signing_keys \
                 WHERE active_at <= ? AND (retired_at IS NULL OR retired_at > ?) AND withdrawn_at IS NULL \
                 ORDER BY active_at DESC, kid LIMIT 1",
            )
            .bind(now)
            .bind(now)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// Adds a key that signs from `active_at` and retires every other key
    /// at that moment, in one transaction. (The first key: retires nothing.)
    pub async fn rotate_signing_key(
        &self,
        key: &StoredSigningKey,
        now: DateTime<Utc>,
        active_at: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        retry_conflicts(move || async move { on_db!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "UPDATE signing_keys SET retired_at = ? WHERE retired_at IS NULL OR retired_at > ?",
            )
            .bind(active_at)
            .bind(active_at)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO signing_keys (kid, public_key, private_key, created_at, active_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&key.kid)
            .bind(&key.public_key)
            .bind(&key.private_key)
            .bind(now)
            .bind(active_at)
            .execute(&mut *tx)
            .await?;
            Ok(tx.commit().await?)
        }) })
        .await
    }

    /// Withdraws a key at once: no longer published nor used for signing.
    /// False if there is no such key still in use.
    pub async fn withdraw_signing_key(&self, kid: &str, now: DateTime<Utc>) -> Result<bool, ApiError> {
        retry_conflicts(move || async move {
            Ok(on_db!(&self.db, pool => {
                sqlx::query("UPDATE signing_keys SET withdrawn_at = ? WHERE kid = ? AND withdrawn_at IS NULL")
                    .bind(now)
                    .bind(kid)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected() == 1)
            })?)
        })
        .await
    }

    /// Keys to publish: every key not retired, and retired keys whose tokens
    /// may still be alive.
    pub async fn published_signing_keys(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<StoredSigningKey>, sqlx::Error> {
        let tokens_dead_before = now
            - chrono::Duration::seconds(
                storegate::token::ACCESS_TOKEN_TTL_SECS + storegate::token::CLOCK_LEEWAY_SECS as i64,
            );
        on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT kid, public_key, private_key FROM signing_keys \
                 WHERE (retired_at IS NULL OR retired_at > ?) AND withdrawn_at IS NULL ORDER BY created_at, kid",
            )
            .bind(tokens_dead_before)
            .fetch_all(pool)
            .await
        })
    }
}
