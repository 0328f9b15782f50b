//! Schema migrations that any number of processes may start at once, on
//! SQLite, MySQL, MariaDB and a MariaDB Galera cluster.
//!
//! sqlx's own MySQL migration lock is `GET_LOCK(name, -1)` with its answer
//! ignored: MariaDB answers a negative timeout with NULL at once, so no lock is
//! taken there, and on Galera `GET_LOCK` is local to one node anyway. Two
//! replicas starting together then ran the same migration twice (1062 on
//! `_sqlx_migrations`) and could leave a `success = 0` row that made sqlx
//! refuse every later start. So on MySQL the migrations here run under a
//! lease: one row of `storegate_migration_lock`, taken by a conditional
//! UPDATE, which is a real row lock on one server and a certified write on
//! Galera (two nodes taking it at once: one commit fails certification), and
//! which expires if its holder dies. A migration left half-applied (MySQL
//! DDL commits as it goes) is finished by the next holder: its statements run
//! again one by one, and "already exists" answers count as done.
//!
//! The bookkeeping stays sqlx's `_sqlx_migrations` table, so databases
//! migrated by earlier versions (through sqlx) carry on unchanged.
//!
//! SQLite migrations go through sqlx (each one is a transaction there)
//! under an exclusive lock on a file beside the database.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use sqlx::{MySql, Pool, migrate::Migration};

use crate::Db;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

/// How long a process waits for another one's migration before giving up,
/// unless told otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// A lease not renewed for this long is free for the next process: its
/// holder died. Renewed every [`LEASE_RENEW_EVERY`] while migrations run.
const LEASE_SECS: u32 = 60;
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(10);
const LOCK_POLL: Duration = Duration::from_millis(200);

/// sqlx's own table, created the same way so that either may create it.
const CREATE_MYSQL_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
)";

const CREATE_LOCK_TABLE: &str = "CREATE TABLE IF NOT EXISTS storegate_migration_lock (
    id         TINYINT     NOT NULL PRIMARY KEY,
    holder     VARCHAR(64) NULL,
    expires_at DATETIME(6) NULL
) ENGINE=InnoDB";

/// Brings the schema up to date, waiting up to `lock_timeout` for another
/// process that is doing the same.
pub async fn run(db: &Db, lock_timeout: Duration) -> anyhow::Result<()> {
    match db {
        Db::MySql(pool) => run_mysql(pool, lock_timeout).await,
        Db::Sqlite(pool) => {
            // Checks the applied migrations too, with the same error as on MySQL.
            if schema_state(db).await? == SchemaState::Current {
                return Ok(());
            }
            let lock = sqlite_lock_file(db, lock_timeout).await?;
            let result = SQLITE_MIGRATIONS.run(pool).await;
            drop(lock);
            Ok(result?)
        }
    }
}

/// A row of `_sqlx_migrations`: version, checksum, success.
type AppliedRow = (i64, Vec<u8>, bool);

/// What the database's schema is, next to the migrations this build has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    /// Every migration of this build is applied (newer ones may be too).
    Current,
    /// These versions are missing or half-applied.
    Behind(Vec<i64>),
}

/// Reads the schema's state without changing anything. Errors when the
/// database cannot be read or an applied migration differs from this
/// build's (a schema this build must not touch).
pub async fn schema_state(db: &Db) -> anyhow::Result<SchemaState> {
    let (applied, ours): (Vec<AppliedRow>, &sqlx::migrate::Migrator) = match db {
        Db::MySql(pool) => (applied_rows(pool).await?, &MYSQL_MIGRATIONS),
        Db::Sqlite(pool) => {
            let exists: Option<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            )
            .fetch_optional(pool)
            .await?;
            let rows = if exists.is_some() {
                sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version")
                    .fetch_all(pool)
                    .await?
            } else {
                Vec::new()
            };
            (rows, &SQLITE_MIGRATIONS)
        }
    };
    check_checksums(&applied, ours)?;
    let behind: Vec<i64> = ours
        .iter()
        .filter(|m| !applied.iter().any(|(version, _, success)| *version == m.version && *success))
        .map(|m| m.version)
        .collect();
    Ok(if behind.is_empty() { SchemaState::Current } else { SchemaState::Behind(behind) })
}

/// Waits until another process (a `migrate` step, another replica) has
/// brought the schema up to this build's, checking every `poll`. Read
/// errors (the database not up yet) are logged and waited out.
pub async fn wait_for_schema(db: &Db, poll: Duration) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        match schema_state(db).await {
            Ok(SchemaState::Current) => return Ok(()),
            Ok(SchemaState::Behind(missing)) => {
                if !said {
                    tracing::info!(
                        ?missing,
                        "waiting for the schema to be migrated (by `migrate` or a replica)"
                    );
                    said = true;
                }
            }
            Err(e) if e.downcast_ref::<ChecksumMismatch>().is_some() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "cannot read the schema version yet"),
        }
        tokio::time::sleep(poll).await;
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "migration {0} in the database differs from this build's: the schema was made by another \
     version of storegate, or the migration file was edited after it was applied"
)]
struct ChecksumMismatch(i64);

fn check_checksums(applied: &[AppliedRow], ours: &sqlx::migrate::Migrator) -> anyhow::Result<()> {
    for (version, checksum, _) in applied {
        match ours.iter().find(|m| m.version == *version) {
            Some(m) if m.checksum.as_ref() != checksum.as_slice() => {
                return Err(ChecksumMismatch(*version).into());
            }
            Some(_) => {}
            // A newer release's migration: schemas only grow, so an older
            // replica keeps working beside it during a rolling upgrade.
            None => tracing::debug!(version, "the database has a migration newer than this build"),
        }
    }
    Ok(())
}

async fn applied_rows(pool: &Pool<MySql>) -> anyhow::Result<Vec<AppliedRow>> {
    // A count, not the name: MySQL 8 sends information_schema's names as
    // binary strings.
    let exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await?)
}

async fn run_mysql(pool: &Pool<MySql>, lock_timeout: Duration) -> anyhow::Result<()> {
    // Nothing to do is the common start: no lease, no write.
    if schema_state(&Db::MySql(pool.clone())).await? == SchemaState::Current {
        return Ok(());
    }
    let Some(lease) = Lease::take(pool, lock_timeout).await? else {
        // Another process finished the migrations while this one waited.
        return Ok(());
    };
    let renewer = tokio::spawn(lease.clone().keep_renewed());
    let result = apply_mysql(pool, &lease).await;
    renewer.abort();
    lease.release().await;
    result
}

/// Applies every migration not yet applied, and finishes half-applied ones.
/// Runs only under the lease, and stops between statements if it was lost.
async fn apply_mysql(pool: &Pool<MySql>, lease: &Lease) -> anyhow::Result<()> {
    conflicts_retried(|| sqlx::query(CREATE_MYSQL_MIGRATIONS_TABLE).execute(pool)).await?;
    let applied = applied_rows(pool).await?;
    check_checksums(&applied, &MYSQL_MIGRATIONS)?;
    for migration in MYSQL_MIGRATIONS.iter() {
        let row = applied.iter().find(|(version, _, _)| *version == migration.version);
        match row {
            Some((_, _, true)) => continue,
            Some((_, _, false)) => {
                tracing::warn!(
                    version = migration.version,
                    "finishing a migration a process left half-applied"
                );
            }
            None => {
                conflicts_retried(|| {
                    sqlx::query(
                        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                         VALUES (?, ?, FALSE, ?, -1)",
                    )
                    .bind(migration.version)
                    .bind(migration.description.as_ref())
                    .bind(migration.checksum.as_ref())
                    .execute(pool)
                })
                .await?;
            }
        }
        let started = Instant::now();
        apply_statements(pool, migration, lease).await?;
        // Done only if the lease is still this process's: a holder that lost
        // it (stalled past its expiry) leaves the migration to the next one.
        let elapsed = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
        let done = conflicts_retried(|| {
            sqlx::query(
                "UPDATE _sqlx_migrations SET success = TRUE, execution_time = ? WHERE version = ? \
                 AND EXISTS (SELECT 1 FROM storegate_migration_lock WHERE id = 1 AND holder = ?)",
            )
            .bind(elapsed)
            .bind(migration.version)
            .bind(&lease.holder)
            .execute(pool)
        })
        .await?;
        anyhow::ensure!(
            done.rows_affected() == 1,
            "the migration lock was lost during migration {}",
            migration.version
        );
        tracing::info!(version = migration.version, description = %migration.description, "applied migration");
    }
    Ok(())
}

/// Runs a migration's statements one at a time on one connection, counting
/// "that already exists" as done, so that a migration cut short (MySQL DDL
/// commits as it goes) can simply run again. So a statement may run twice:
/// data statements in migrations must give the same result when they do
/// (seed rows under a key, UPDATEs to fixed values).
async fn apply_statements(pool: &Pool<MySql>, migration: &Migration, lease: &Lease) -> anyhow::Result<()> {
    let mut connection = pool.acquire().await?;
    for (index, statement) in statements(&migration.sql).enumerate() {
        anyhow::ensure!(
            !lease.is_lost(),
            "the migration lock was lost during migration {}",
            migration.version
        );
        if let Err(e) = sqlx::query(statement).execute(&mut *connection).await {
            if already_done(&e, statement) {
                tracing::debug!(version = migration.version, index, "statement was applied before");
                continue;
            }
            // The statement's text stays out of the error: it names the
            // migration and the position instead.
            let code = e.as_database_error().and_then(|d| d.code()).unwrap_or_default().into_owned();
            anyhow::bail!(
                "migration {} ({}) failed at statement {} (database error {code})",
                migration.version,
                migration.description,
                index + 1
            );
        }
    }
    Ok(())
}

/// The statements of a migration file: `--` comment lines dropped, split at
/// every `;` that ends a line. The migration files keep to that shape (a
/// test checks it).
pub fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split_inclusive('\n')
        .fold((Vec::new(), 0usize, 0usize), |(mut out, start, pos), line| {
            let end = pos + line.len();
            if line.trim_end().ends_with(';') && !line.trim_start().starts_with("--") {
                out.push(&sql[start..end]);
                (out, end, end)
            } else {
                (out, start, end)
            }
        })
        .0
        .into_iter()
        .map(|chunk| {
            // Strip leading comment lines and the final `;`.
            let body = chunk
                .split_inclusive('\n')
                .skip_while(|line| line.trim().is_empty() || line.trim_start().starts_with("--"))
                .map(str::len)
                .sum::<usize>();
            let text = &chunk[chunk.len() - body..];
            text.trim_end().trim_end_matches(';').trim_end()
        })
        .filter(|s| !s.is_empty())
}

/// MySQL answers that mean a re-run statement's effect is already there.
fn already_done(err: &sqlx::Error, statement: &str) -> bool {
    let Some(mysql) =
        err.as_database_error().and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
    else {
        return false;
    };
    let keyword = statement.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
    match mysql.number() {
        // Table, column, index, foreign key already there.
        1050 | 1060 | 1061 | 1068 | 1826 => true,
        // Duplicate row: only a seeding INSERT may meet its own earlier run;
        // an index that finds duplicate data is a real failure.
        1062 => keyword == "INSERT",
        // Nothing to drop: dropped before.
        1091 => keyword == "ALTER" || keyword == "DROP",
        _ => false,
    }
}

/// The migration lease on MySQL: one row, held until released or expired.
#[derive(Clone)]
struct Lease {
    pool: Pool<MySql>,
    holder: String,
    /// Set by the renewer when the row no longer names this holder.
    lost: Arc<AtomicBool>,
}

impl Lease {
    /// The lease, once free; None when the schema became current meanwhile.
    async fn take(pool: &Pool<MySql>, timeout: Duration) -> anyhow::Result<Option<Lease>> {
        let holder = format!("{}-{:016x}", std::process::id(), rand_u64());
        let lease = Lease { pool: pool.clone(), holder, lost: Arc::default() };
        let deadline = Instant::now() + timeout;
        // The table and its one row, once: CREATE TABLE is a cluster-wide
        // DDL on Galera even when the table exists, so it is not polled.
        while let Err(e) = lease.create_row().await {
            if !crate::db::is_transaction_conflict(&e) || Instant::now() >= deadline {
                return Err(anyhow::Error::new(e).context("cannot create the migration lock"));
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
        let mut said = false;
        loop {
            match lease.try_take().await {
                Ok(true) => return Ok(Some(lease)),
                Ok(false) => {}
                // Taken on two nodes of a cluster at once: one commit fails
                // certification; the next poll finds the winner's.
                Err(e) if crate::db::is_transaction_conflict(&e) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("cannot take the migration lock")),
            }
            if schema_state(&Db::MySql(pool.clone())).await? == SchemaState::Current {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "another process has held the migration lock for over {}s; if none is migrating, \
                     it is freed {LEASE_SECS}s after its holder stopped",
                    timeout.as_secs()
                );
            }
            if !said {
                tracing::info!("another process is migrating the database; waiting for it");
                said = true;
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    async fn create_row(&self) -> Result<(), sqlx::Error> {
        sqlx::query(CREATE_LOCK_TABLE).execute(&self.pool).await?;
        sqlx::query("INSERT IGNORE INTO storegate_migration_lock (id) VALUES (1)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn try_take(&self) -> Result<bool, sqlx::Error> {
        let taken = sqlx::query(&format!(
            "UPDATE storegate_migration_lock SET holder = ?, expires_at = NOW(6) + INTERVAL {LEASE_SECS} SECOND \
             WHERE id = 1 AND (holder IS NULL OR expires_at < NOW(6))"
        ))
        .bind(&self.holder)
        .execute(&self.pool)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// Runs a statement on the lease's row by its holder (waiting processes
    /// polling the same row can make it fail certification on Galera).
    async fn update_own(&self, sql: &str) -> Result<u64, sqlx::Error> {
        conflicts_retried(|| sqlx::query(sql).bind(&self.holder).execute(&self.pool))
            .await
            .map(|r| r.rows_affected())
    }

    async fn keep_renewed(self) {
        let renew = format!(
            "UPDATE storegate_migration_lock SET expires_at = NOW(6) + INTERVAL {LEASE_SECS} SECOND \
             WHERE id = 1 AND holder = ?"
        );
        loop {
            tokio::time::sleep(LEASE_RENEW_EVERY).await;
            match self.update_own(&renew).await {
                Ok(1) => {}
                Ok(_) => {
                    tracing::error!("the migration lock was lost (not renewed in time); stopping");
                    self.lost.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the migration lock"),
            }
        }
    }

    async fn release(&self) {
        let released = self
            .update_own("UPDATE storegate_migration_lock SET holder = NULL, expires_at = NULL WHERE id = 1 AND holder = ?")
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "cannot release the migration lock; it expires in {LEASE_SECS}s");
        }
    }
}

/// Runs a statement again when the database rolled it back as a conflict
/// (a few times, briefly): on Galera the lease row is polled from every node,
/// and a DDL in total order aborts what it meets, so the bookkeeping
/// statements of a migration can lose certification. Each is safe to rerun:
/// a conflict means it did nothing.
async fn conflicts_retried<T, F, Fut>(mut run: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match run().await {
            Err(e) if crate::db::is_transaction_conflict(&e) && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10) * attempt).await;
            }
            result => return result,
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// An exclusive lock on a file beside a SQLite database, held while it
/// migrates; None for a database without a file.
async fn sqlite_lock_file(db: &Db, timeout: Duration) -> anyhow::Result<Option<std::fs::File>> {
    let Some(path) = db.sqlite_path().await else {
        return Ok(None);
    };
    let lock_path = path.with_extension("migrate.lock");
    // Private like the database beside it.
    crate::private_files::create_or_tighten_file(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                anyhow::bail!(
                    "another process has held {} for over {}s",
                    lock_path.display(),
                    timeout.as_secs()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow::Error::new(e).context("cannot lock the migration lock file"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_splits_into_whole_statements() {
        for migrator in [&MYSQL_MIGRATIONS, &SQLITE_MIGRATIONS] {
            for migration in migrator.iter() {
                let statements: Vec<&str> = statements(&migration.sql).collect();
                assert!(!statements.is_empty(), "migration {} has no statement", migration.version);
                for statement in &statements {
                    let keyword = statement.split_whitespace().next().unwrap().to_ascii_uppercase();
                    assert!(
                        ["CREATE", "INSERT", "ALTER", "DROP", "UPDATE", "DELETE", "SET"]
                            .contains(&keyword.as_str()),
                        "migration {}: a statement starts with {keyword:?}",
                        migration.version
                    );
                    assert!(!statement.ends_with(';'));
                }
                // Nothing but comments and blank lines is left out.
                let kept: usize = statements.iter().map(|s| s.len()).sum();
                let code: usize = migration
                    .sql
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
                    .map(|l| l.trim_end().trim_end_matches(';').len())
                    .sum();
                assert!(kept >= code, "migration {} lost text when split", migration.version);
            }
        }
    }

    #[test]
    fn splitting_keeps_statement_text() {
        let sql = "-- a comment;\nCREATE TABLE a (x INT);\n\n-- next\nINSERT INTO a\n  VALUES (1);\n";
        let statements: Vec<&str> = statements(sql).collect();
        assert_eq!(statements, ["CREATE TABLE a (x INT)", "INSERT INTO a\n  VALUES (1)"]);
    }
}
