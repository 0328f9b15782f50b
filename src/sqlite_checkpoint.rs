//! WAL checkpoints off the writers' path, for a SQLite file.
//!
//! In WAL mode SQLite appends every commit's pages to the `-wal` file and
//! copies them back into the database file in a checkpoint. By default the
//! connection whose commit takes the WAL past 1,000 pages runs that
//! checkpoint itself, at the end of its commit and while the file's write
//! lock is still held, so every write queued behind it waits for the copy
//! and its fsync. In a catalogue of a million products, where each write
//! changes pages no other write of its group touches, that was every few
//! group commits, and the writes at 1M ran at 67–76% of their rate at 10k
//! (BENCHMARKS.md, "SQLite writes: checkpoints").
//!
//! So a task with a connection of its own checkpoints every
//! [`CHECKPOINT_EVERY`] in PASSIVE mode: it copies whatever no reader still
//! needs, beside the writer, without taking the write lock, and never
//! waits. The writers' own checkpoint stays as a backstop, at
//! [`WRITER_CHECKPOINT_PAGES`], for when this task falls behind (a long
//! read pins old pages) or is gone.

use std::time::Duration;

use sqlx::{ConnectOptions as _, Connection as _, Pool, Sqlite, SqliteConnection};
use tokio::time::MissedTickBehavior;

/// How often the task copies the WAL into the database file. A checkpoint
/// with nothing to copy reads only the WAL's index; under load each one
/// copies a tenth of a second of commits (a few MiB).
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A writer checkpoints the WAL itself only once it holds this many pages
/// (40 MiB at 4 KiB pages), SQLite's `wal_autocheckpoint`.
pub const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// The `-wal` file is cut back to this size when SQLite starts it over
/// (`journal_size_limit`), so that a burst's WAL does not keep its disk.
pub const WAL_SIZE_LIMIT_BYTES: u64 = 64 << 20;

/// Starts checkpointing `pool`'s file until the pool is closed (or the
/// runtime ends). Failures are logged, once until the next success; the
/// writers' backstop checkpoints meanwhile.
pub fn spawn(pool: &Pool<Sqlite>) {
    // Ten statements a second are no one's call: no statement spans.
    let options = pool.connect_options().as_ref().clone().disable_statement_logging();
    let closed = pool.close_event();
    tokio::spawn(async move {
        let mut connection = match SqliteConnection::connect_with(&options).await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a connection for WAL checkpoints; writers checkpoint themselves");
                return;
            }
        };
        let mut ticks = tokio::time::interval(CHECKPOINT_EVERY);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(closed);
        let mut failing = false;
        loop {
            tokio::select! {
                () = &mut closed => break,
                _ = ticks.tick() => {}
            }
            match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut connection).await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "WAL checkpoint failed; writers checkpoint themselves until it works again");
                }
                Err(_) => {}
            }
        }
        let _ = connection.close().await;
    });
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sqlx::{Executor as _, sqlite::SqliteConnectOptions};

    use super::*;

    /// Rows of `t` in the database file itself, without its WAL: what
    /// checkpoints have copied there. The file may be mid-copy (an
    /// immutable open takes no lock): a failed read counts as none yet.
    async fn rows_in_file(path: &std::path::Path) -> i64 {
        let options = SqliteConnectOptions::new().filename(path).immutable(true).read_only(true);
        let Ok(mut file) = SqliteConnection::connect_with(&options).await else { return -1 };
        let rows = sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&mut file).await.unwrap_or(-1);
        let _ = file.close().await;
        rows
    }

    async fn write_rows(pool: &Pool<Sqlite>) {
        for i in 0..20 {
            sqlx::query("INSERT INTO t (v) VALUES (?)").bind(i).execute(pool).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_reach_the_database_file_without_a_writer_checkpointing() {
        let dir = std::env::temp_dir().join(format!("storegate-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        // Control: with no checkpoint task, a few commits (far below any
        // writer's checkpoint) stay in the WAL, unseen in the file.
        let control_path = dir.join("control.db");
        let control = sqlx::SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(&control_path)
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal),
        )
        .await
        .unwrap();
        control.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)").await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&control).await.unwrap();
        write_rows(&control).await;
        tokio::time::sleep(CHECKPOINT_EVERY * 5).await;
        assert_eq!(rows_in_file(&control_path).await, 0);

        // The services' pool: the same commits are copied within a few ticks.
        let path = dir.join("t.db");
        let crate::Db::Sqlite(pool) =
            crate::Db::connect(&format!("sqlite://{}", path.display())).await.unwrap()
        else {
            unreachable!()
        };
        let backstop: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint").fetch_one(&pool).await.unwrap();
        assert_eq!(backstop, i64::from(WRITER_CHECKPOINT_PAGES));
        pool.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)").await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await.unwrap();
        write_rows(&pool).await;
        let started = Instant::now();
        while rows_in_file(&path).await != 20 {
            assert!(started.elapsed() < Duration::from_secs(5), "the commits never reached the file");
            tokio::time::sleep(CHECKPOINT_EVERY / 4).await;
        }
        pool.close().await;
        control.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
