//! Database connection, migrations and the few helpers that let one SQL text
//! run on both backends.
//!
//! The services keep their SQL as plain text with `?` placeholders. Where the
//! two dialects agree (most statements), the same text runs on both pools via
//! [`on_db!`]; the body is compiled once per backend, so every type used in it
//! must encode and decode on both.

use std::{path::Path, str::FromStr, time::Duration};

use crate::ApiError;
use anyhow::Context as _;
use sqlx::{
    ConnectOptions as _, MySql, Pool, Sqlite, Transaction,
    mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlQueryResult},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult},
};

/// How much of a SQLite file each connection maps, the pools' and the
/// in-line read connections' alike (a bound on address space, not memory:
/// a smaller file maps whole).
pub const SQLITE_READ_MMAP_BYTES: i64 = 1 << 30;

/// An idle MySQL connection this old is pinged before it is lent, by the
/// pools here and by product-service's own read connections.
pub const MYSQL_CHECK_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The default store: a SQLite file created on first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://storegate-data/storegate.db";

/// A connection pool on one of the two supported backends.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(Pool<Sqlite>),
    MySql(Pool<MySql>),
}

/// Runs `$body` with `$pool` bound to the backend's typed pool.
///
/// ```ignore
/// let n: i64 = on_db!(&self.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM products").fetch_one(pool).await)?;
/// ```
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::MySql($pool) => $body,
        }
    };
}

/// Statement events only for trace spans (`crate::telemetry`), every
/// statement, slow or not, at one level; off without traces. They carry SQL
/// text, which the log never shows; errors are logged where they are
/// handled, without it.
fn statement_logging<O: sqlx::ConnectOptions>(options: O) -> O {
    if crate::telemetry::traces_on() {
        options
            .log_statements(log::LevelFilter::Debug)
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1))
    } else {
        options.disable_statement_logging()
    }
}

/// Which SQL dialect a [`Db`] speaks, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

impl Db {
    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::MySql(_) => Backend::MySql,
        }
    }

    /// Opens a pool for `url` (`sqlite://…` or `mysql://…`), creating the
    /// SQLite file and its folder if needed. Does not migrate.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .context("DATABASE_URL is not a valid sqlite URL")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // Both services may write the same file; wait for the lock
                // instead of failing at once.
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // Reads through a memory map, as the in-line read connections
                // do (product-service's store): searches and writes' reads on
                // these connections otherwise copy every page with a read().
                .pragma("mmap_size", SQLITE_READ_MMAP_BYTES.to_string())
                // Pages a write changes are kept in the connection's own
                // cache (the map serves only reads): SQLite's default of
                // 2 MiB holds few of a large catalogue's index pages.
                .pragma("cache_size", "-32768")
                // WAL checkpoints are a task's of their own (crate::sqlite_checkpoint);
                // a writer copies the WAL back only if that task falls behind.
                .pragma("wal_autocheckpoint", crate::sqlite_checkpoint::WRITER_CHECKPOINT_PAGES.to_string())
                .pragma("journal_size_limit", crate::sqlite_checkpoint::WAL_SIZE_LIMIT_BYTES.to_string());
            let options = statement_logging(options);
            // An in-memory database has no files.
            let on_file = !url.contains(":memory:") && !url.contains("mode=memory");
            if on_file {
                prepare_sqlite_files(options.get_filename())?;
            }
            let pool_options = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                // A file has no connection to go stale; a ping before every
                // query would only be one more trip to the connection's
                // worker thread (measured: a third of a point read's cost).
                .test_before_acquire(false);
            let pool = open_sqlite(pool_options, options).await.context("cannot open the SQLite database")?;
            if on_file {
                crate::sqlite_checkpoint::spawn(&pool);
            }
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let options = MySqlConnectOptions::from_str(&url)
                .context("DATABASE_URL is not a valid mysql URL")?
                .charset("utf8mb4");
            let options = statement_logging(options);
            let pool = MySqlPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                // sqlx pings every connection on its way back to the pool;
                // pinging it again when it is taken out (sqlx's default) made
                // each query three round trips. Only a connection that has sat
                // idle, where the server or a proxy may have dropped it since,
                // or that was opened before the last outage, is checked
                // before use.
                .test_before_acquire(false)
                .after_connect(|connection, _| Box::pin(prepare_mysql_session(connection)))
                .before_acquire(|connection, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= MYSQL_CHECK_IF_IDLE_FOR
                            || crate::db_health::opened_before_last_outage(meta.age)
                        {
                            sqlx::Connection::ping(connection).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(options)
                .await
                .context("cannot connect to MySQL")?;
            Ok(Db::MySql(pool))
        } else {
            anyhow::bail!("DATABASE_URL must start with sqlite:// or mysql://")
        }
    }

    /// Brings the schema up to date; safe when several processes start at
    /// once (see [`crate::migrate`]).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        crate::migrate::run(self, crate::migrate::DEFAULT_LOCK_TIMEOUT).await
    }

    /// The SQLite file's path, if this is a file-backed SQLite database.
    pub async fn sqlite_path(&self) -> Option<std::path::PathBuf> {
        let Db::Sqlite(pool) = self else { return None };
        let path: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(pool)
            .await
            .ok()?;
        (!path.is_empty()).then(|| path.into())
    }

    /// Opens and migrates: what every service does at start-up.
    pub async fn open(url: &str) -> anyhow::Result<Db> {
        let db = Db::connect(url).await?;
        db.migrate().await.context("database migration failed")?;
        Ok(db)
    }

    pub async fn close(&self) {
        on_db!(self, pool => pool.close().await)
    }
}

/// Makes the SQLite file's folder (0700) and the file itself (0600) before
/// SQLite opens it: SQLite would create it 0644, and gives its WAL and SHM
/// files the database file's mode, so those follow. Files of this user's
/// left looser by an earlier version are tightened.
fn prepare_sqlite_files(database: &Path) -> anyhow::Result<()> {
    let name = database.as_os_str();
    if let Some(folder) = database.parent() {
        crate::private_files::create_dir_all(folder)
            .with_context(|| format!("cannot create the database folder {}", folder.display()))?;
    }
    crate::private_files::create_or_tighten_file(database)
        .with_context(|| format!("cannot create the database file {}", database.display()))?;
    let companions = ["-wal", "-shm"].map(|suffix| {
        let mut companion = name.to_owned();
        companion.push(suffix);
        std::path::PathBuf::from(companion)
    });
    // The migration lock (crate::migrate) is made only when migrating.
    for companion in companions.iter().chain([&database.with_extension("migrate.lock")]) {
        crate::private_files::tighten(companion)
            .with_context(|| format!("cannot make {} private", companion.display()))?;
    }
    Ok(())
}

/// How often a first connection to a SQLite file is tried again while
/// another process holds the file's lock, and how long it waits in between.
const SQLITE_OPEN_ATTEMPTS: u32 = 20;
const SQLITE_OPEN_RETRY: Duration = Duration::from_millis(100);

/// The pool's first connection, tried again while the file is busy. Two
/// processes opening a new file at once (both services of `storegate up`,
/// replicas started together) both switch it to WAL: that needs the file's
/// exclusive lock, and SQLite answers SQLITE_BUSY at once, without the busy
/// handler, where waiting could deadlock (seen in CI: "database is locked"
/// at start-up). The lock is held for moments, so a few tries settle it.
async fn open_sqlite(
    pool_options: SqlitePoolOptions,
    options: SqliteConnectOptions,
) -> Result<Pool<Sqlite>, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match pool_options.clone().connect_with(options.clone()).await {
            Err(e) if is_sqlite_busy(&e) && attempt < SQLITE_OPEN_ATTEMPTS => {
                tracing::debug!(attempt, "the SQLite file is busy at start-up; trying again");
                tokio::time::sleep(SQLITE_OPEN_RETRY).await;
                attempt += 1;
            }
            opened => return opened,
        }
    }
}

/// Whether SQLite said SQLITE_BUSY (its primary code 5, or an extended
/// code of it).
fn is_sqlite_busy(err: &sqlx::Error) -> bool {
    let code = err.as_database_error().and_then(|e| e.code()).and_then(|code| code.parse::<i32>().ok());
    code.is_some_and(|code| code & 0xff == 5)
}

/// Starting a transaction that will write. SQLite's default `BEGIN` takes the
/// write lock only at the first write, and a reader that later writes can fail
/// at once with SQLITE_BUSY; `BEGIN IMMEDIATE` waits for the lock up front.
pub trait BeginWrite {
    /// The write in progress: its connection, ended by `commit` (an
    /// inherent method of each) or rolled back when dropped.
    type Write: std::ops::DerefMut + Send;
    fn begin_write(&self) -> impl Future<Output = Result<Self::Write, sqlx::Error>> + Send;
}

/// A write transaction on MySQL: used as its connection (`&mut *tx`),
/// ended by [`WriteTx::commit`] or, dropped, rolled back.
pub struct WriteTx<DB: sqlx::Database> {
    tx: Transaction<'static, DB>,
}

impl<DB: sqlx::Database> WriteTx<DB> {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl<DB: sqlx::Database> std::ops::Deref for WriteTx<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for WriteTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

/// On SQLite a write waits for the file's turn, first come first served,
/// and shares its commit with the writes queued behind it (see
/// [`crate::sqlite_writes`]). SQLite lets one writer in at a time and makes
/// the others wait in its busy handler, which sleeps in growing steps (up
/// to 100 ms) and so lets writers in in no order, the p99 of 64 writes in
/// flight several times their median (BENCHMARKS.md, "A catalogue of a
/// million products"). Waiting here in order instead, a writer only meets SQLite's lock when another process
/// (the other service on the same file) holds it.
impl BeginWrite for Pool<Sqlite> {
    type Write = crate::sqlite_writes::SqliteWrite;
    async fn begin_write(&self) -> Result<crate::sqlite_writes::SqliteWrite, sqlx::Error> {
        crate::sqlite_writes::begin(self).await
    }
}

impl BeginWrite for Pool<MySql> {
    type Write = WriteTx<MySql>;
    async fn begin_write(&self) -> Result<WriteTx<MySql>, sqlx::Error> {
        Ok(WriteTx { tx: self.begin().await? })
    }
}

/// The id an INSERT assigned, the same way on both backends (MySQL has no
/// `RETURNING`).
pub trait InsertId {
    fn insert_id(&self) -> i64;
}

impl InsertId for SqliteQueryResult {
    fn insert_id(&self) -> i64 {
        self.last_insert_rowid()
    }
}

impl InsertId for MySqlQueryResult {
    fn insert_id(&self) -> i64 {
        // AUTO_INCREMENT ids are BIGINT columns, so this always fits.
        i64::try_from(self.last_insert_id()).unwrap_or(i64::MAX)
    }
}

/// True when `err` is a unique-key violation (MySQL does not fill in the
/// constraint name, so callers cannot rely on it).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error().is_some_and(|e| e.is_unique_violation())
}

/// True when the database rolled `err`'s whole transaction back because it
/// met another one: an InnoDB deadlock, or on Galera a write set that failed
/// certification at commit (also reported as 1213). Running it again is safe.
/// A lock wait timeout (1205) is not one: it rolls back only the statement,
/// and comes after a long wait that a rerun would repeat.
pub fn is_transaction_conflict(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|e| e.number() == 1213)
}

/// How often a transaction that ended in a conflict is run in all. Conflicts
/// on one hot row from several Galera nodes can repeat; each rerun waits a
/// random time that grows with the attempt, up to [`CONFLICT_BACKOFF_MAX`].
pub const CONFLICT_ATTEMPTS: u32 = 20;
const CONFLICT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Runs `transaction` until it ends in anything but a conflict
/// ([`ApiError::TransactionConflict`]), at most [`CONFLICT_ATTEMPTS`] times.
/// `transaction` must be one database transaction (or one statement): a
/// conflict rolled all of it back, so nothing of a failed run remains.
/// Every rerun and every give-up is counted (`storegate_db_transaction_conflicts_total`).
///
/// Call it as `retry_conflicts(move || async move { … })` with only
/// references and `Copy` values captured (an `async ||` closure's future is
/// not `Send` for tonic's handlers, rust-lang/rust#110338).
pub async fn retry_conflicts<T, Fut>(mut transaction: impl FnMut() -> Fut) -> Result<T, ApiError>
where
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Err(ApiError::TransactionConflict) if attempt < CONFLICT_ATTEMPTS => {
                crate::metrics::count_transaction_conflict("retried");
                // Full jitter: replicas that collided once do not collide
                // again in lock step.
                let ceiling = (Duration::from_millis(2) * 2u32.pow(attempt.min(8))).min(CONFLICT_BACKOFF_MAX);
                tokio::time::sleep(ceiling.mul_f64(random_fraction())).await;
                attempt += 1;
            }
            Err(ApiError::TransactionConflict) => {
                crate::metrics::count_transaction_conflict("gave_up");
                tracing::warn!(attempts = attempt, "a transaction kept conflicting with others; giving up");
                return Err(ApiError::TransactionConflict);
            }
            other => return other,
        }
    }
}

/// A number in [0, 1) that differs between calls and processes (for
/// jitter; not for anything secret).
pub fn random_fraction() -> f64 {
    use std::hash::{BuildHasher as _, RandomState};
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Settings every MySQL connection gets when it is opened. On a Galera node
/// (`wsrep_on`), reads and transactions (1) and UPDATE/DELETE (2) first
/// wait until the node has applied every write the cluster committed before
/// them: a read on one node then sees a write just acknowledged by another,
/// and a transaction rerun after a certification failure sees the write that
/// won. Costs one cluster round trip per statement; a single writer (all
/// traffic to one node) does not need it, but loses nothing by it either.
pub async fn prepare_mysql_session(connection: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    let wsrep: Option<(String, String)> =
        sqlx::query_as("SHOW VARIABLES LIKE 'wsrep_on'").fetch_optional(&mut *connection).await?;
    if wsrep.is_some_and(|(_, value)| value.eq_ignore_ascii_case("ON")) {
        sqlx::query("SET SESSION wsrep_sync_wait = 3").execute(&mut *connection).await?;
    }
    Ok(())
}

/// A new MySQL connection outside the pool, set up like the pool's.
pub async fn connect_mysql(options: &MySqlConnectOptions) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    let mut connection = options.connect().await?;
    prepare_mysql_session(&mut connection).await?;
    Ok(connection)
}

/// True when `url` names the embedded SQLite backend.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// The folder beside the SQLite database, where dev-only files (such as a
/// generated master key) are kept.
pub fn sqlite_data_dir(url: &str) -> Option<std::path::PathBuf> {
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let parent = options.get_filename().parent()?;
    Some(if parent.as_os_str().is_empty() { Path::new(".").to_path_buf() } else { parent.to_path_buf() })
}

/// The current time as the database keeps it: UTC, whole microseconds
/// (MySQL's DATETIME(6) would otherwise round what SQLite keeps exactly).
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::Timelike as _;
    let t = chrono::Utc::now();
    t.with_nanosecond(t.nanosecond() / 1_000 * 1_000).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::metrics::transaction_conflicts;

    /// Pools opening one new file at once, as the services and replicas of
    /// one host do at start-up: every one opens, in WAL mode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pools_opening_a_new_file_at_once_all_open() {
        for round in 0..50 {
            let folder = std::env::temp_dir().join(format!("storegate-open-{}-{round}", std::process::id()));
            let _ = std::fs::remove_dir_all(&folder);
            let url = format!("sqlite://{}/storegate.db", folder.display());
            let opens: Vec<_> = (0..8)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { Db::connect(&url).await })
                })
                .collect();
            for open in opens {
                let db = open.await.unwrap().unwrap_or_else(|e| panic!("round {round}: {e:#}"));
                let Db::Sqlite(pool) = &db else { panic!("a SQLite URL") };
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.unwrap();
                assert_eq!(mode, "wal");
                db.close().await;
            }
            // Best effort: the checkpoint task's connection may outlive
            // `close` by a moment and recreate the WAL's files.
            let _ = std::fs::remove_dir_all(&folder);
        }
    }

    // One test, so that the process-wide counts it reads are its own.
    #[tokio::test(start_paused = true)]
    async fn conflicts_are_rerun_counted_and_bounded() {
        // Two conflicts, then success: the third run's answer.
        let (retried, gave_up) = (transaction_conflicts("retried"), transaction_conflicts("gave_up"));
        let runs = AtomicU32::new(0);
        let answer = retry_conflicts(|| async {
            match runs.fetch_add(1, Ordering::Relaxed) {
                0 | 1 => Err(ApiError::TransactionConflict),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 2);
        assert_eq!(transaction_conflicts("retried") - retried, 2);
        assert_eq!(transaction_conflicts("gave_up"), gave_up);

        // A conflict every time: CONFLICT_ATTEMPTS runs, then UNAVAILABLE.
        let runs = AtomicU32::new(0);
        let answer: Result<(), ApiError> = retry_conflicts(|| async {
            runs.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::TransactionConflict)
        })
        .await;
        assert!(matches!(answer, Err(ApiError::TransactionConflict)));
        assert_eq!(runs.load(Ordering::Relaxed), CONFLICT_ATTEMPTS);
        assert_eq!(transaction_conflicts("gave_up") - gave_up, 1);
        let status: tonic::Status = answer.unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::Unavailable);

        // Any other error is the answer at once.
        let runs = AtomicU32::new(0);
        let answer: Result<(), ApiError> = retry_conflicts(|| async {
            runs.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::Aborted("etag"))
        })
        .await;
        assert!(matches!(answer, Err(ApiError::Aborted(_))));
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }
}
