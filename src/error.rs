//! The one error type of the services and its one mapping to `tonic::Status`.
//!
//! Handlers return `Result<_, ApiError>`; the conversion below decides every
//! status code. Internal causes are logged here and never sent: a client sees
//! a fixed message, never SQL, a stack trace or a secret.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// One bad field of a request, reported as a `google.rpc.BadRequest`
/// field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation { field: field.into(), description: description.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(&'static str),
    #[error("{0}")]
    Aborted(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{message}")]
    ResourceExhausted { message: &'static str, retry_after: Option<Duration> },
    #[error("{0}")]
    Unavailable(&'static str),
    /// The database rolled the transaction back because it met another one
    /// (a deadlock, a failed Galera certification): safe to run again, see
    /// [`crate::db::retry_conflicts`]. Reaches a client as UNAVAILABLE only
    /// when the reruns ran out.
    #[error("the database is busy; try again")]
    TransactionConflict,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A request with exactly one bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// Ok if no violation was collected, else INVALID_ARGUMENT with all of them.
    pub fn check(violations: Vec<FieldViolation>) -> Result<(), ApiError> {
        if violations.is_empty() { Ok(()) } else { Err(ApiError::InvalidArgument(violations)) }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            // The database cannot be reached or is overloaded: the client may retry.
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::Unavailable("the database is unavailable; try again")
            }
            sqlx::Error::Database(db) if is_transaction_conflict(db.as_ref()) => {
                ApiError::TransactionConflict
            }
            sqlx::Error::Database(db) if is_server_unavailable(db.as_ref()) => {
                tracing::warn!(error = %db, "database unavailable");
                ApiError::Unavailable("the database is unavailable; try again")
            }
            sqlx::Error::Database(db) if is_contention(db.as_ref()) => {
                tracing::warn!(error = %db, "database contention");
                ApiError::Unavailable("the database is busy; try again")
            }
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

/// MySQL/MariaDB errors that say the server cannot take statements now,
/// whatever the statement: 1040 too many connections, 1047 a Galera node
/// outside the cluster's primary component, 1053 shutting down, 1180 an
/// error during COMMIT (on Galera: the node lost the primary component while
/// replicating; a write with a request_id can be retried), 1290 read-only (a
/// replica after a failover), 1927 connection killed.
fn is_server_unavailable(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|e| matches!(e.number(), 1040 | 1047 | 1053 | 1180 | 1290 | 1927))
}

/// MySQL's deadlock or Galera's certification failure (both 1213): the
/// whole transaction was rolled back.
fn is_transaction_conflict(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|e| e.number() == 1213)
}

/// Lock waits: the request was fine, the moment was not. SQLite:
/// SQLITE_BUSY / SQLITE_LOCKED (and their extended codes) after the busy
/// timeout. MySQL: lock wait timeout (1205).
fn is_contention(err: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(mysql) = err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return mysql.number() == 1205;
    }
    if err.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        let code: Option<i32> = err.code().and_then(|c| c.parse().ok());
        return code.is_some_and(|c| matches!(c & 0xff, 5 | 6));
    }
    false
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument(violations) => {
                let summary = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::Aborted(m) => Status::aborted(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted { message, retry_after } => match retry_after {
                Some(delay) => Status::with_error_details(
                    Code::ResourceExhausted,
                    message,
                    ErrorDetails::with_retry_info(Some(delay)),
                ),
                None => Status::resource_exhausted(message),
            },
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::TransactionConflict => Status::unavailable("the database is busy; try again"),
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_travel_as_bad_request_details() {
        let status: Status = ApiError::InvalidArgument(vec![
            FieldViolation::new("product.name", "must not be empty"),
            FieldViolation::new("product.price", "must be a decimal"),
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> =
            details.bad_request().unwrap().field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["product.name", "product.price"]);
    }

    #[test]
    fn internal_errors_send_a_fixed_message() {
        let status: Status = ApiError::Internal(anyhow::anyhow!("SELECT secret FROM users failed")).into();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn a_lost_database_is_unavailable() {
        let status: Status = ApiError::from(sqlx::Error::PoolTimedOut).into();
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn throttling_carries_retry_info() {
        let status: Status = ApiError::ResourceExhausted {
            message: "too many attempts",
            retry_after: Some(Duration::from_secs(30)),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(30)));
    }
}
