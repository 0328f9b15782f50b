//! Reads on the embedded SQLite file, run in-line on the calling thread.
//!
//! sqlx gives every SQLite connection a worker thread: each statement is
//! handed to it, each row handed back, and the connection is pinged on its
//! way back to the pool. For a point read those hand-offs (thread wake-ups and
//! context switches) cost several times the read itself: profiling GetProduct
//! put a third of all CPU time in them and under 3% in SQLite. SQLite is a
//! library, so a read that finds its pages in the cache takes microseconds
//! when called directly, about what answering from memory would.
//!
//! [`SqliteReads`] keeps a few read-only connections to the same file and runs
//! a read on one of them, on the caller's thread. A read never waits: the
//! connections have no busy timeout, so when the file is locked (a checkpoint,
//! WAL recovery) or anything else goes wrong, [`SqliteReads::read`] returns
//! `None` and the caller reads through the sqlx pool instead, which waits,
//! decodes every stored format and maps errors. Each read is its own
//! transaction on a committed state of the file, so a write that has
//! committed through the pool is seen at once (read-your-writes holds).
//!
//! Use it only for reads bounded by an index (a point read, a keyset page): a
//! read holds the calling thread, an async runtime's worker, until it ends.

use std::{
    path::PathBuf,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use rusqlite::{Connection, OpenFlags};

use storegate::db::{Db, SQLITE_READ_MMAP_BYTES as READ_MMAP_BYTES};

/// Connections kept for reuse; more are opened while more threads read at
/// once (at most one per thread, as a read never yields), and closed after.
const KEPT_CONNECTIONS: usize = 8;
/// Every distinct listing statement fits (sort fields × directions × cursor ×
/// query filter), so none is re-prepared.
const STATEMENT_CACHE: usize = 64;

/// Read-only connections to a SQLite file for reads on the calling thread.
#[derive(Debug)]
pub struct SqliteReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    done: AtomicU64,
    gave_way: AtomicU64,
}

/// How many reads were done in-line and how many gave way to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCounts {
    pub done: u64,
    pub gave_way: u64,
}

impl SqliteReads {
    /// In-line reads of the file behind `db`; `None` for MySQL and for an
    /// in-memory database, which other connections cannot see. The path is
    /// the one SQLite itself reports for the pool's database (absolute), so
    /// these connections open the very same file.
    pub async fn for_db(db: &Db) -> Option<SqliteReads> {
        let path = db.sqlite_path().await?;
        Some(SqliteReads {
            path,
            idle: Mutex::new(Vec::new()),
            done: AtomicU64::new(0),
            gave_way: AtomicU64::new(0),
        })
    }

    pub fn counts(&self) -> ReadCounts {
        ReadCounts {
            done: self.done.load(Ordering::Relaxed),
            gave_way: self.gave_way.load(Ordering::Relaxed),
        }
    }

    /// Runs `read` on a connection of its own, on this thread. `None` when
    /// it could not be done now (the caller then reads through the pool);
    /// the reason is logged at debug level by its SQLite code only.
    pub fn read<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        let reused = self.idle().pop();
        let connection = match reused {
            Some(connection) => connection,
            None => match self.open() {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::debug!(code = ?e.sqlite_error_code(), "in-line SQLite read unavailable");
                    self.gave_way.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        };
        let result = read(&connection);
        match &result {
            Ok(_) => self.done.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(code = ?e.sqlite_error_code(), "in-line SQLite read gave way to the pool");
                self.gave_way.fetch_add(1, Ordering::Relaxed)
            }
        };
        // Even after an error the connection is sound: a failed read leaves
        // no transaction open in autocommit mode.
        let mut idle = self.idle();
        if idle.len() < KEPT_CONNECTIONS {
            idle.push(connection);
        }
        result.ok()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A poisoned lock only means a panic elsewhere; the list is whole.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Never wait for a lock on this thread: give way to the pool instead.
        connection.busy_timeout(std::time::Duration::ZERO)?;
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Read the file through a memory map instead of a read() per page
        // into each connection's own small cache: pages of mixed listings
        // of a million products, 2.6 times as many a second on this path
        // (BENCHMARKS.md, "2026-12-02"). The map is read-only (SQLite writes through
        // write() unless built otherwise), and its pages are the kernel's
        // page cache: they show in the process's RSS as file pages, shared
        // and reclaimable, not as memory of its own.
        connection.pragma_update(None, "mmap_size", READ_MMAP_BYTES)?;
        Ok(connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{
        Pool, Sqlite,
        sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
    };

    /// A pool on a fresh file named after the test, in `journal` mode.
    async fn pool_on_file(test: &str, journal: SqliteJournalMode) -> Pool<Sqlite> {
        let dir = std::env::temp_dir().join(format!("storegate-reads-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.join("reads.db"))
            .create_if_missing(true)
            .journal_mode(journal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().connect_with(options).await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)").execute(&pool).await.unwrap();
        pool
    }

    fn value_of(reads: &SqliteReads, id: i64) -> Option<Option<String>> {
        reads.read(|c| {
            use rusqlite::OptionalExtension as _;
            c.prepare_cached("SELECT v FROM t WHERE id = ?")?.query_row([id], |row| row.get(0)).optional()
        })
    }

    #[tokio::test]
    async fn a_committed_write_is_read_at_once() {
        let pool = pool_on_file("committed", SqliteJournalMode::Wal).await;
        let reads = SqliteReads::for_db(&Db::Sqlite(pool.clone())).await.expect("a file-backed database");
        assert_eq!(value_of(&reads, 1), Some(None));
        sqlx::query("INSERT INTO t (id, v) VALUES (1, 'a')").execute(&pool).await.unwrap();
        assert_eq!(value_of(&reads, 1), Some(Some("a".into())));
        sqlx::query("UPDATE t SET v = 'b' WHERE id = 1").execute(&pool).await.unwrap();
        assert_eq!(value_of(&reads, 1), Some(Some("b".into())));
    }

    #[tokio::test]
    async fn a_locked_file_gives_way_at_once_instead_of_waiting() {
        // The services' files are in WAL mode, where readers are locked out
        // only briefly (recovery, an exclusive checkpoint); a rollback-journal
        // file shows the same refusal on demand: a writer's exclusive lock
        // keeps readers out until it commits.
        let pool = pool_on_file("locked", SqliteJournalMode::Delete).await;
        let reads = SqliteReads::for_db(&Db::Sqlite(pool.clone())).await.unwrap();
        assert_eq!(value_of(&reads, 1), Some(None));
        let mut writer = pool.acquire().await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE").execute(&mut *writer).await.unwrap();
        sqlx::query("INSERT INTO t (id, v) VALUES (1, 'c')").execute(&mut *writer).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(value_of(&reads, 1), None, "a locked file is not read in-line");
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "and not waited for");
        sqlx::query("COMMIT").execute(&mut *writer).await.unwrap();
        assert_eq!(value_of(&reads, 1), Some(Some("c".into())), "the connection is fine after giving way");
        assert_eq!(reads.counts(), ReadCounts { done: 2, gave_way: 1 });
    }

    #[tokio::test]
    async fn a_failed_read_gives_way() {
        let pool = pool_on_file("failed", SqliteJournalMode::Wal).await;
        let reads = SqliteReads::for_db(&Db::Sqlite(pool.clone())).await.unwrap();
        let missing =
            reads.read(|c| c.query_row("SELECT v FROM no_such_table", [], |row| row.get::<_, String>(0)));
        assert_eq!(missing, None);
        assert_eq!(value_of(&reads, 1), Some(None));
    }

    #[tokio::test]
    async fn an_in_memory_database_has_no_in_line_reads() {
        let pool = SqlitePoolOptions::new().connect("sqlite::memory:").await.unwrap();
        assert!(SqliteReads::for_db(&Db::Sqlite(pool)).await.is_none());
    }
}
