//! Reads that wait for a MySQL connection, answered together.
//!
//! Under load every read connection is busy and callers queue for one. Each
//! of them would then run its own statement, and on a machine the server
//! shares, a statement's fixed cost (a round trip, a server thread woken, a
//! parse and an executor started) is most of a point read. Here the caller
//! that gets a connection first runs one statement for itself and for the
//! others waiting (`WHERE id IN (…)` for point reads; one statement for
//! callers asking the very same thing), and hands each its answer. A caller
//! that finds a free connection runs at once, alone: sharing adds no wait.
//!
//! Every answer is as fresh as a read of its own: a statement answers only
//! callers that were waiting before it started, so it sees every write that
//! committed before any of them asked.

use std::sync::{Mutex, MutexGuard, PoisonError};

use sqlx::MySqlConnection;
use tokio::sync::oneshot;

use crate::mysql_reads::MySqlReads;

/// Which waiting reads one statement answers.
#[derive(Clone, Copy, Debug)]
pub struct Sharing<K> {
    /// At most this many callers per statement.
    pub up_to: usize,
    /// Whether a read for the second key can join the first's statement.
    pub joins: fn(&K, &K) -> bool,
}

/// Callers waiting for a connection, each with its key and where its answer
/// goes.
#[derive(Debug)]
pub struct SharedReads<K, V> {
    waiting: Mutex<Vec<Waiting<K, V>>>,
    sharing: Sharing<K>,
}

#[derive(Debug)]
struct Waiting<K, V> {
    key: K,
    answer: oneshot::Sender<V>,
}

impl<K: Clone, V> SharedReads<K, V> {
    pub fn new(sharing: Sharing<K>) -> Self {
        SharedReads { waiting: Mutex::new(Vec::new()), sharing }
    }

    /// `key`'s answer. `run` reads the answers of a list of keys in one
    /// statement, in their order, on the connection it is lent; it may be
    /// given `key` alone or with others. A statement that fails or is cut
    /// short answers no one: each of its callers then reads alone, so that
    /// every caller gets its own error.
    pub async fn read(
        &self,
        reads: &MySqlReads,
        key: K,
        run: impl AsyncFn(&mut MySqlConnection, &[K]) -> Result<Vec<V>, sqlx::Error>,
    ) -> Result<V, sqlx::Error> {
        let (answer, mut answered) = oneshot::channel();
        self.waiting().push(Waiting { key: key.clone(), answer });
        // Until another caller's statement took this key, compete for a
        // connection and serve whoever waits when one comes.
        let mut queued = true;
        loop {
            tokio::select! {
                biased;
                answer = &mut answered => match answer {
                    Ok(value) => return Ok(value),
                    Err(_) => break,
                },
                lease = reads.lease(), if queued => {
                    let mut lease = lease?;
                    let batch = self.take_batch();
                    if batch.is_empty() {
                        // Another caller's statement has this key.
                        lease.finish();
                        queued = false;
                        continue;
                    }
                    let keys: Vec<K> = batch.iter().map(|waiting| waiting.key.clone()).collect();
                    if let Ok(values) = run(lease.connection(), &keys).await {
                        lease.finish();
                        for (waiting, value) in batch.into_iter().zip(values) {
                            // A caller that gave up has no one to answer.
                            let _ = waiting.answer.send(value);
                        }
                    }
                    // On an error the lease and the batch are dropped here:
                    // the connection is closed and its callers read alone.
                }
            }
        }
        let mut lease = reads.lease().await?;
        let value = run(lease.connection(), std::slice::from_ref(&key)).await?.into_iter().next();
        lease.finish();
        value.ok_or_else(|| sqlx::Error::Protocol("a read gave no answer for its key".into()))
    }

    /// The reads the next statement answers: the longest-waiting caller's,
    /// and those that may join it, oldest first. Callers that gave up are
    /// dropped on the way.
    fn take_batch(&self) -> Vec<Waiting<K, V>> {
        let mut waiting = self.waiting();
        waiting.retain(|w| !w.answer.is_closed());
        let Some(first) = waiting.first().map(|w| w.key.clone()) else { return Vec::new() };
        let Sharing { up_to, joins } = self.sharing;
        let mut taken = 0;
        waiting
            .extract_if(.., |w| {
                let take = taken < up_to && joins(&first, &w.key);
                taken += usize::from(take);
                take
            })
            .collect()
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<Waiting<K, V>>> {
        // A poisoned lock only means a panic elsewhere; the list is whole.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex as StdMutex},
        time::Duration,
    };

    use tokio::task::{JoinHandle, LocalSet, spawn_local};

    use super::*;
    use crate::mysql_reads::tests::reads;

    // The reads run as local tasks: a test's `run` closure borrows from its
    // caller, and the compiler cannot yet show such an async closure's
    // future to be `Send` for every lifetime (the services pass named
    // `async fn`s, which it can).

    /// Each statement's keys, in the order they ran.
    type Statements = Arc<StdMutex<Vec<Vec<u32>>>>;

    /// Reads `key` as ten times itself, in a statement that really runs on
    /// the lent connection and is recorded; with `fail_shared`, any
    /// statement for more than one key fails.
    async fn read_ten_times(
        shared: &SharedReads<u32, u32>,
        reads: &MySqlReads,
        statements: &Statements,
        key: u32,
        fail_shared: bool,
    ) -> Result<u32, sqlx::Error> {
        shared
            .read(reads, key, async |connection, keys| {
                statements.lock().unwrap().push(keys.to_vec());
                if fail_shared && keys.len() > 1 {
                    return Err(sqlx::query("SELECT no_such_column").execute(connection).await.unwrap_err());
                }
                let ten: i64 = sqlx::query_scalar("SELECT 10").fetch_one(connection).await?;
                Ok(keys.iter().map(|k| k * ten as u32).collect())
            })
            .await
    }

    /// Starts a read of each key while the only connection is lent, waits
    /// until all of them queue, then gives the connection back.
    async fn queued_reads(
        reads: &Arc<MySqlReads>,
        shared: &Arc<SharedReads<u32, u32>>,
        keys: &[u32],
        fail_shared: bool,
    ) -> (Vec<JoinHandle<Result<u32, sqlx::Error>>>, Statements) {
        let statements = Statements::default();
        let held = reads.lease().await.unwrap();
        let calls = keys
            .iter()
            .map(|&key| {
                let (reads, shared, statements) = (reads.clone(), shared.clone(), statements.clone());
                spawn_local(
                    async move { read_ten_times(&shared, &reads, &statements, key, fail_shared).await },
                )
            })
            .collect();
        while shared.waiting().len() < keys.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        held.finish();
        (calls, statements)
    }

    fn any_reads(up_to: usize) -> Arc<SharedReads<u32, u32>> {
        Arc::new(SharedReads::new(Sharing { up_to, joins: |_, _| true }))
    }

    #[tokio::test]
    async fn reads_waiting_for_a_connection_share_statements() {
        LocalSet::new()
            .run_until(async {
                let Some(reads) = reads(1, Duration::from_secs(5)) else { return };
                let keys: Vec<u32> = (1..=10).collect();
                let (calls, statements) = queued_reads(&reads, &any_reads(4), &keys, false).await;
                for (call, key) in calls.into_iter().zip(&keys) {
                    assert_eq!(call.await.unwrap().unwrap(), key * 10, "each caller gets its own answer");
                }
                // Oldest first, at most four a statement.
                let statements = statements.lock().unwrap().clone();
                assert_eq!(statements, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
            })
            .await;
    }

    #[tokio::test]
    async fn a_free_connection_reads_at_once_alone() {
        LocalSet::new()
            .run_until(async {
                let Some(reads) = reads(1, Duration::from_secs(5)) else { return };
                let (shared, statements) = (any_reads(4), Statements::default());
                for key in [3, 4, 3] {
                    assert_eq!(
                        read_ten_times(&shared, &reads, &statements, key, false).await.unwrap(),
                        key * 10
                    );
                }
                assert_eq!(*statements.lock().unwrap(), [vec![3], vec![4], vec![3]]);
                assert_eq!(reads.idle_connections(), 1, "the connection went back");
            })
            .await;
    }

    #[tokio::test]
    async fn only_reads_that_may_join_share_a_statement() {
        LocalSet::new()
            .run_until(async {
                let Some(reads) = reads(1, Duration::from_secs(5)) else { return };
                let same = Arc::new(SharedReads::new(Sharing { up_to: usize::MAX, joins: |a, b| a == b }));
                let (calls, statements) = queued_reads(&reads, &same, &[7, 7, 8, 7, 8], false).await;
                for (call, key) in calls.into_iter().zip([7, 7, 8, 7, 8]) {
                    assert_eq!(call.await.unwrap().unwrap(), key * 10);
                }
                assert_eq!(*statements.lock().unwrap(), [vec![7, 7, 7], vec![8, 8]]);
            })
            .await;
    }

    #[tokio::test]
    async fn after_a_failed_shared_statement_each_caller_reads_alone() {
        LocalSet::new()
            .run_until(async {
                let Some(reads) = reads(1, Duration::from_secs(5)) else { return };
                let (calls, statements) = queued_reads(&reads, &any_reads(8), &[1, 2, 3], true).await;
                for (call, key) in calls.into_iter().zip([1, 2, 3]) {
                    assert_eq!(call.await.unwrap().unwrap(), key * 10);
                }
                let mut statements = statements.lock().unwrap().clone();
                assert_eq!(statements.remove(0), [1, 2, 3], "the shared statement, which failed");
                statements.sort();
                assert_eq!(statements, [vec![1], vec![2], vec![3]]);
            })
            .await;
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_is_left_out() {
        LocalSet::new()
            .run_until(async {
                let Some(reads) = reads(1, Duration::from_secs(5)) else { return };
                let shared = any_reads(8);
                let statements = Statements::default();
                let held = reads.lease().await.unwrap();
                let start = |key| {
                    let (reads, shared, statements) = (reads.clone(), shared.clone(), statements.clone());
                    spawn_local(async move { read_ten_times(&shared, &reads, &statements, key, false).await })
                };
                let (gives_up, stays) = (start(1), start(2));
                while shared.waiting().len() < 2 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                gives_up.abort();
                assert!(gives_up.await.unwrap_err().is_cancelled());
                held.finish();
                assert_eq!(stays.await.unwrap().unwrap(), 20);
                assert_eq!(*statements.lock().unwrap(), [vec![2]]);
                assert!(shared.waiting().is_empty());
            })
            .await;
    }
}
