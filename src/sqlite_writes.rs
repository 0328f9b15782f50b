//! Group commit for SQLite: the writes of one file that queue up behind
//! each other share one transaction and one commit.
//!
//! SQLite lets one writer in at a time, and in WAL mode with
//! `synchronous=FULL` every commit waits for an fsync. Written one after
//! the other, 64 creates in flight each waited for the commits of all
//! before it (BENCHMARKS.md, "SQLite writes: group commit").
//! Neither SQLite nor sqlx batch commits, so this does: a writer takes the
//! file's turn (first come, first served), runs its statements inside a
//! SAVEPOINT of the group's open transaction, releases it, and passes the
//! turn on; the writer that finds nobody waiting behind it (or the group
//! full, or old) commits for everyone. Every writer is answered only after
//! the commit that made its writes durable, and with that commit's
//! outcome: a failed group commit fails every member, whose writes then
//! did not happen (callers retry, idempotently). A writer that fails or is
//! dropped rolls back to its savepoint and touches no other member's work.
//!
//! Durability is unchanged (`synchronous=FULL`); what changes is that one
//! fsync serves many writes.

use std::{
    collections::HashMap,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection as _, Executor as _, Pool, Sqlite, SqliteConnection, pool::PoolConnection};
use tokio::sync::{OwnedMutexGuard, oneshot};

/// At most this many writes share a commit, so that under steady load a
/// group still ends.
const MAX_GROUP: usize = 64;
/// A group older than this commits at its next writer's end.
const MAX_GROUP_AGE: Duration = Duration::from_millis(10);
/// A member whose group nobody has committed after this long takes the
/// turn and commits it (the writer behind it gave up waiting for the turn).
const LINGER: Duration = Duration::from_millis(2);

const SAVEPOINT: &str = "SAVEPOINT storegate_write";
const RELEASE: &str = "RELEASE storegate_write";
const ROLLBACK_TO: &str = "ROLLBACK TO storegate_write";

type Outcome = Result<(), String>;

/// The open transaction of a group and who waits for its commit.
struct OpenGroup {
    conn: PoolConnection<Sqlite>,
    members: Vec<oneshot::Sender<Outcome>>,
    started: Instant,
    id: u64,
    /// What it ran at BEGIN, and so runs before its COMMIT.
    statements: Option<GroupStatements>,
}

/// What a group runs once for all its members, outside their savepoints:
/// work that may wait for the group's end, such as the product store's
/// full-text index (migrations/sqlite/0009_search_queue.sql), which would
/// otherwise write a segment at every member's SAVEPOINT.
#[derive(Clone, Copy, Debug)]
pub struct GroupStatements {
    /// Right after the group's BEGIN.
    pub at_begin: &'static str,
    /// Right before its COMMIT, in the same transaction; if it fails, the
    /// group fails.
    pub before_commit: &'static str,
}

/// One SQLite file's writes in this process.
struct FileWrites {
    group: Arc<tokio::sync::Mutex<Option<OpenGroup>>>,
    /// Set once by whoever owns the schema's work (see [`run_in_every_group`]).
    statements: Mutex<Option<GroupStatements>>,
    /// Writers waiting for the turn.
    waiting: AtomicUsize,
    next_id: AtomicU64,
}

/// The writes of `pool`'s file, shared by every pool of this process on it
/// (`storegate up` has one per service). An in-memory database is its
/// pool's own.
fn file_writes(pool: &Pool<Sqlite>) -> Arc<FileWrites> {
    static FILES: LazyLock<Mutex<HashMap<PathBuf, Arc<FileWrites>>>> = LazyLock::new(Mutex::default);
    let options = pool.connect_options();
    let path = options.get_filename();
    let key = if path.as_os_str().is_empty() || path == Path::new(":memory:") {
        PathBuf::from(format!(":memory:{:p}", Arc::as_ptr(&options)))
    } else {
        path.to_owned()
    };
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    files
        .entry(key)
        .or_insert_with(|| {
            Arc::new(FileWrites {
                group: Arc::default(),
                statements: Mutex::default(),
                waiting: AtomicUsize::new(0),
                next_id: AtomicU64::new(0),
            })
        })
        .clone()
}

/// Every group of `pool`'s file in this process that begins after this
/// runs `statements` (a later call replaces them for the groups after it; a
/// group runs the pair it began with).
pub fn run_in_every_group(pool: &Pool<Sqlite>, statements: GroupStatements) {
    *file_writes(pool).statements.lock().unwrap_or_else(|e| e.into_inner()) = Some(statements);
}

impl FileWrites {
    fn statements(&self) -> Option<GroupStatements> {
        *self.statements.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One writer waiting for the turn, for as long as it lives.
struct Waiting<'a>(&'a FileWrites);

impl<'a> Waiting<'a> {
    fn on(file: &'a FileWrites) -> Waiting<'a> {
        file.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(file)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A write on SQLite: used as its connection (`&mut *tx`), ended by
/// [`SqliteWrite::commit`] or, dropped, rolled back to where it began.
pub struct SqliteWrite {
    /// The turn, with the group's transaction; None once ended.
    turn: Option<OwnedMutexGuard<Option<OpenGroup>>>,
    file: Arc<FileWrites>,
}

/// Starts a write on `pool`'s file: waits for the turn, then opens a
/// savepoint in the current group (or starts a group).
pub async fn begin(pool: &Pool<Sqlite>) -> Result<SqliteWrite, sqlx::Error> {
    let file = file_writes(pool);
    let turn = {
        // Counted while waiting, also when the wait is given up (dropped).
        let _waiting = Waiting::on(&file);
        file.group.clone().lock_owned().await
    };
    let mut write = SqliteWrite { turn: Some(turn), file };
    let group = write.turn.as_mut().expect("the turn is held");
    if group.is_none() {
        let mut conn = pool.acquire().await?;
        conn.execute("BEGIN IMMEDIATE").await?;
        let statements = write.file.statements();
        if let Some(statements) = statements
            && let Err(e) = conn.execute(statements.at_begin).await
        {
            let _ = conn.execute("ROLLBACK").await;
            return Err(e);
        }
        let id = write.file.next_id.fetch_add(1, Ordering::Relaxed);
        **group = Some(OpenGroup { conn, members: Vec::new(), started: Instant::now(), id, statements });
    }
    if let Err(e) = write.conn().execute(SAVEPOINT).await {
        let group = write.turn.as_mut().expect("the turn is held");
        end_group(group, Err(e.to_string())).await;
        write.turn = None;
        return Err(e);
    }
    Ok(write)
}

impl SqliteWrite {
    fn conn(&mut self) -> &mut SqliteConnection {
        let group = self.turn.as_mut().and_then(|g| g.as_mut()).expect("a write in progress has its group");
        &mut group.conn
    }

    /// Keeps this write, and returns once the group's commit has made it
    /// durable (or failed).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let mut turn = self.turn.take().expect("a write in progress holds the turn");
        let group = turn.as_mut().expect("a write in progress has its group");
        if let Err(e) = group.conn.execute(RELEASE).await {
            end_group(&mut turn, Err(e.to_string())).await;
            return Err(e);
        }
        let (done, mut outcome) = oneshot::channel();
        group.members.push(done);
        let id = group.id;
        let full = group.members.len() >= MAX_GROUP || group.started.elapsed() >= MAX_GROUP_AGE;
        if full || self.file.waiting.load(Ordering::SeqCst) == 0 {
            commit_group(&mut turn).await;
        }
        drop(turn);
        loop {
            tokio::select! {
                committed = &mut outcome => return answer(committed),
                () = tokio::time::sleep(LINGER) => {
                    // Nobody took the turn after us (a writer that gave up
                    // waiting for it): commit our group ourselves.
                    let mut turn = self.file.group.clone().lock_owned().await;
                    if turn.as_ref().is_some_and(|g| g.id == id) {
                        commit_group(&mut turn).await;
                    }
                }
            }
        }
    }
}

fn answer(committed: Result<Outcome, oneshot::error::RecvError>) -> Result<(), sqlx::Error> {
    match committed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(sqlx::Error::Protocol(format!("the group commit failed: {message}"))),
        Err(_) => Err(sqlx::Error::Protocol("the group commit was abandoned".to_owned())),
    }
}

/// Group commits done (tests count them).
#[cfg(test)]
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Commits the open group and tells its members.
async fn commit_group(group: &mut Option<OpenGroup>) {
    #[cfg(test)]
    COMMITS.fetch_add(1, Ordering::SeqCst);
    let Some(open) = group.as_mut() else { return };
    let mut committed = Ok(());
    if let Some(statements) = open.statements {
        committed = open.conn.execute(statements.before_commit).await.map(drop).map_err(|e| e.to_string());
    }
    if committed.is_ok() {
        committed = open.conn.execute("COMMIT").await.map(drop).map_err(|e| e.to_string());
    }
    end_group(group, committed).await;
}

/// Ends the open group with `outcome` for every member: rolled back first
/// if it failed (the connection goes back to the pool either way).
async fn end_group(group: &mut Option<OpenGroup>, outcome: Outcome) {
    let Some(mut open) = group.take() else { return };
    if outcome.is_err() {
        // Whatever state the transaction is in, it must not stay open.
        let _ = open.conn.execute("ROLLBACK").await;
    }
    for member in open.members.drain(..) {
        let _ = member.send(outcome.clone());
    }
    if outcome.is_err() {
        // A connection whose transaction failed is not reused.
        let _ = open.conn.detach().close().await;
    }
}

impl Drop for SqliteWrite {
    /// Not committed: back to the savepoint, in a task that holds the turn
    /// until it is done; the group commits then if nobody is waiting.
    fn drop(&mut self) {
        let Some(mut turn) = self.turn.take() else { return };
        let file = self.file.clone();
        let cleanup = async move {
            let Some(open) = turn.as_mut() else { return };
            let rolled_back = match open.conn.execute(ROLLBACK_TO).await {
                Ok(_) => open.conn.execute(RELEASE).await,
                Err(e) => Err(e),
            };
            if let Err(e) = rolled_back {
                end_group(&mut turn, Err(e.to_string())).await;
                return;
            }
            let empty = open.members.is_empty();
            if empty {
                // Nothing of anyone's to keep: end the transaction, so that
                // the file's write lock is not held for nothing.
                let _ = open.conn.execute("ROLLBACK").await;
                *turn = None;
            } else if file.waiting.load(Ordering::SeqCst) == 0 {
                commit_group(&mut turn).await;
            }
        };
        // Without a runtime (the process is ending) the connection closes
        // with its transaction uncommitted, which SQLite rolls back.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(cleanup));
        }
    }
}

impl Deref for SqliteWrite {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        let group = self.turn.as_ref().and_then(|g| g.as_ref()).expect("a write in progress has its group");
        &group.conn
    }
}

impl DerefMut for SqliteWrite {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool on a fresh file named after the test, as the services open it.
    async fn pool(test: &str) -> Pool<Sqlite> {
        let dir = std::env::temp_dir().join(format!("storegate-writes-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/t.db", dir.display());
        let crate::Db::Sqlite(pool) = crate::Db::connect(&url).await.unwrap() else { unreachable!() };
        pool.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)").await.unwrap();
        pool
    }

    async fn rows(pool: &Pool<Sqlite>) -> Vec<String> {
        // A connection of its own: only what was committed.
        let mut conn = SqliteConnection::connect_with(&pool.connect_options()).await.unwrap();
        sqlx::query_scalar("SELECT v FROM t ORDER BY v").fetch_all(&mut conn).await.unwrap()
    }

    async fn insert(pool: &Pool<Sqlite>, value: String, keep: bool) -> Result<(), sqlx::Error> {
        let mut write = begin(pool).await?;
        sqlx::query("INSERT INTO t (v) VALUES (?)").bind(value).execute(&mut *write).await?;
        if keep { write.commit().await } else { Ok(()) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writes_in_flight_share_commits_and_each_is_durable_when_answered() {
        let pool = pool("share").await;
        let before = COMMITS.load(Ordering::SeqCst);
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    insert(&pool, format!("{i:02}"), true).await.unwrap();
                    // Answered: on disk for any other connection.
                    let seen: i64 = {
                        let mut conn = SqliteConnection::connect_with(&pool.connect_options()).await.unwrap();
                        sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE v = ?")
                            .bind(format!("{i:02}"))
                            .fetch_one(&mut conn)
                            .await
                            .unwrap()
                    };
                    assert_eq!(seen, 1, "write {i} answered before its commit");
                })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
        assert_eq!(rows(&pool).await.len(), 64);
        let commits = COMMITS.load(Ordering::SeqCst) - before;
        assert!(commits < 64, "64 writes in flight took {commits} commits");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_write_that_fails_or_is_dropped_leaves_the_others_of_its_group() {
        let pool = pool("rollback").await;
        let writes: Vec<_> = (0..30)
            .map(|i| {
                let pool = pool.clone();
                // Every third write is dropped without commit, every fifth
                // fails on a statement.
                tokio::spawn(async move {
                    if i % 5 == 0 {
                        let mut write = begin(&pool).await.unwrap();
                        sqlx::query("INSERT INTO t (v) VALUES (?)")
                            .bind(format!("{i:02}"))
                            .execute(&mut *write)
                            .await
                            .unwrap();
                        let failed =
                            sqlx::query("INSERT INTO t (v) VALUES (NULL)").execute(&mut *write).await;
                        assert!(failed.is_err());
                        drop(write);
                        return;
                    }
                    insert(&pool, format!("{i:02}"), i % 3 != 0).await.unwrap();
                })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
        let kept: Vec<String> =
            (0..30).filter(|i| i % 5 != 0 && i % 3 != 0).map(|i| format!("{i:02}")).collect();
        // The dropped writes' rollbacks run in tasks of their own.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(rows(&pool).await, kept);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_dropped_write_alone_releases_the_file_at_once() {
        let pool = pool("alone").await;
        drop(insert(&pool, "gone".into(), false).await);
        // Another process's writer (a connection outside the group) gets
        // the lock without waiting for a busy timeout.
        let mut other = SqliteConnection::connect_with(
            &pool.connect_options().as_ref().clone().busy_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        let started = Instant::now();
        other.execute("BEGIN IMMEDIATE").await.unwrap();
        other.execute("INSERT INTO t (v) VALUES ('other')").await.unwrap();
        other.execute("COMMIT").await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(rows(&pool).await, ["other"]);
        // And the next write here starts a new group.
        insert(&pool, "next".into(), true).await.unwrap();
        assert_eq!(rows(&pool).await, ["next", "other"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_member_whose_follower_gave_up_is_still_committed() {
        let pool = pool("linger").await;
        let file = file_writes(&pool);
        let mut a = begin(&pool).await.unwrap();
        sqlx::query("INSERT INTO t (v) VALUES ('a')").execute(&mut *a).await.unwrap();
        // A writer waits for the turn when A ends, so A leaves the commit
        // to it; but it never takes the turn (it is stuck, or gives up):
        // A commits its group itself after LINGER.
        let follower = Waiting::on(&file);
        tokio::time::timeout(Duration::from_secs(2), a.commit()).await.expect("A is answered").unwrap();
        drop(follower);
        assert_eq!(rows(&pool).await, ["a"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_statements_run_once_a_group_and_a_failing_one_fails_the_group() {
        let pool = pool("statements").await;
        pool.execute("CREATE TABLE groups (phase TEXT NOT NULL, members INTEGER NOT NULL)").await.unwrap();
        run_in_every_group(
            &pool,
            GroupStatements {
                at_begin: "INSERT INTO groups (phase, members) SELECT 'begin', COUNT(*) FROM t",
                before_commit: "INSERT INTO groups (phase, members) SELECT 'commit', COUNT(*) FROM t",
            },
        );
        let before = COMMITS.load(Ordering::SeqCst);
        let writes: Vec<_> = (0..32)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { insert(&pool, format!("{i:02}"), true).await.unwrap() })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
        let phases: Vec<(String, i64)> = sqlx::query_as("SELECT phase, members FROM groups ORDER BY rowid")
            .fetch_all(&pool)
            .await
            .unwrap();
        let commits = COMMITS.load(Ordering::SeqCst) - before;
        // Other tests commit groups too; these 32 writes took at most that many.
        assert!(phases.len() as u64 <= 2 * commits && phases.len().is_multiple_of(2), "{phases:?}");
        // Each group: begin, then commit after all its members' writes.
        let mut seen = 0;
        for pair in phases.chunks(2) {
            assert_eq!((pair[0].0.as_str(), pair[0].1), ("begin", seen));
            assert_eq!(pair[1].0, "commit");
            assert!(pair[1].1 > seen);
            seen = pair[1].1;
        }
        assert_eq!(seen, 32);

        // A failing statement before the commit fails the group: its write
        // is refused and did not happen.
        run_in_every_group(
            &pool,
            GroupStatements { at_begin: "SELECT 1", before_commit: "SELECT * FROM missing" },
        );
        assert!(insert(&pool, "refused".into(), true).await.is_err());
        assert_eq!(rows(&pool).await.len(), 32);
    }
}
