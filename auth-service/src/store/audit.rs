//! The audit trail's SQL (see `crate::audit`).

use chrono::{DateTime, Utc};
use storegate::{ApiError, db::Backend, on_db};

use super::AuthStore;
use crate::audit::{Entry, Record};

const AUDIT_COLUMNS: &str = "id, occurred_at, event, user_id, username, actor, client_addr, detail";

impl AuthStore {
    /// Appends one entry.
    pub async fn record_audit(&self, entry: &Entry, now: DateTime<Utc>) -> Result<(), ApiError> {
        let client_addr = entry.client_label();
        on_db!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO audit_events (occurred_at, event, user_id, username, actor, client_addr, detail) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(now)
            .bind(entry.event.name())
            .bind(entry.user_id)
            .bind(entry.username.as_deref())
            .bind(entry.actor.label())
            .bind(client_addr.as_deref())
            .bind(entry.detail.as_deref())
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// Up to `limit` entries, newest first, older than the entry
    /// `before_id` when given, of one account when `user_id` is given.
    pub async fn audit_events(
        &self,
        user_id: Option<i64>,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Record>, ApiError> {
        let mut conditions = Vec::new();
        if user_id.is_some() {
            conditions.push("user_id = ?");
        }
        if before_id.is_some() {
            conditions.push("id < ?");
        }
        let filter =
            if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events {filter} ORDER BY id DESC LIMIT ?");
        Ok(on_db!(&self.db, pool => {
            let mut query = sqlx::query_as::<_, Record>(&sql);
            for value in [user_id, before_id].into_iter().flatten() {
                query = query.bind(value);
            }
            query.bind(limit).fetch_all(pool).await
        })?)
    }

    /// Deletes up to `batch` entries that occurred before `cutoff`, oldest
    /// first; how many went. Batches keep each statement's locks short.
    pub async fn prune_audit(&self, cutoff: DateTime<Utc>, batch: i64) -> Result<u64, ApiError> {
        // MySQL cannot LIMIT a subquery of IN; SQLite's DELETE has no LIMIT
        // unless built with it.
        let sql = match self.db.backend() {
            Backend::MySql => "DELETE FROM audit_events WHERE occurred_at < ? ORDER BY occurred_at LIMIT ?",
            Backend::Sqlite => {
                "DELETE FROM audit_events WHERE id IN \
                 (SELECT id FROM audit_events WHERE occurred_at < ? ORDER BY occurred_at LIMIT ?)"
            }
        };
        Ok(on_db!(&self.db, pool => {
            sqlx::query(sql).bind(cutoff).bind(batch).execute(pool).await.map(|r| r.rows_affected())
        })?)
    }
}
