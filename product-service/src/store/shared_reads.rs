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

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicU64, Ordering},
};

use sqlx::MySqlConnection;
use tokio::sync::oneshot;

use super::mysql_reads::{self, MySqlReads};

/// What lends connections to shared reads, one read at a time: the MySQL
/// read connections ([`MySqlReads`]), or a fake in tests.
pub trait Lender {
    type Connection;
    type Lease<'a>: Leased<Connection = Self::Connection>
    where
        Self: 'a;
    /// A connection for one read, or the error of getting none in time.
    fn lease(&self) -> impl Future<Output = Result<Self::Lease<'_>, sqlx::Error>>;
}

/// A connection lent for one read.
pub trait Leased {
    type Connection;
    fn connection(&mut self) -> &mut Self::Connection;
    /// The read finished: the connection goes back as it is. A lease
    /// dropped without it closes its connection (a read cut short may have
    /// left a reply unread on it).
    fn finish(self);
}

impl Lender for MySqlReads {
    type Connection = MySqlConnection;
    type Lease<'a> = mysql_reads::Lease;
    fn lease(&self) -> impl Future<Output = Result<Self::Lease<'_>, sqlx::Error>> {
        MySqlReads::lease(self)
    }
}

impl Leased for mysql_reads::Lease {
    type Connection = MySqlConnection;
    fn connection(&mut self) -> &mut MySqlConnection {
        mysql_reads::Lease::connection(self)
    }
    fn finish(self) {
        mysql_reads::Lease::finish(self)
    }
}

/// Which waiting reads one statement answers.
#[derive(Clone, Copy, Debug)]
pub struct Sharing<K> {
    /// At most this many callers per statement (at least one).
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
    next_caller: AtomicU64,
    statements: AtomicU64,
    answers: AtomicU64,
}

#[derive(Debug)]
struct Waiting<K, V> {
    caller: u64,
    key: K,
    answer: oneshot::Sender<Answer<V>>,
}

/// What a caller hears from the statement that took its key.
#[derive(Debug)]
enum Answer<V> {
    Value(V),
    /// The statement failed: read alone, to get an error of one's own.
    ReadAlone,
}

/// How many statements ran for shared reads and how many callers they
/// answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedCounts {
    pub statements: u64,
    pub answers: u64,
}

impl<K: Clone, V> SharedReads<K, V> {
    pub fn new(sharing: Sharing<K>) -> Self {
        SharedReads {
            waiting: Mutex::new(Vec::new()),
            sharing: Sharing { up_to: sharing.up_to.max(1), ..sharing },
            next_caller: AtomicU64::new(0),
            statements: AtomicU64::new(0),
            answers: AtomicU64::new(0),
        }
    }

    /// `key`'s answer. `run` reads the answers of a list of keys in one
    /// statement, in their order, on the connection it is lent; it may be
    /// given `key` alone or with others. A statement that fails answers no
    /// one: each of its callers then reads alone, so that every caller gets
    /// its own error. One whose caller gave up mid-way (its future dropped)
    /// leaves its other callers to queue again.
    pub async fn read<L: Lender>(
        &self,
        reads: &L,
        key: K,
        run: impl AsyncFn(&mut L::Connection, &[K]) -> Result<Vec<V>, sqlx::Error>,
    ) -> Result<V, sqlx::Error> {
        'queue: loop {
            let caller = self.next_caller.fetch_add(1, Ordering::Relaxed);
            let (answer, mut answered) = oneshot::channel();
            self.waiting().push(Waiting { caller, key: key.clone(), answer });
            // Until a statement took this key, compete for a connection and
            // serve whoever waits when one comes.
            let mut queued = true;
            loop {
                tokio::select! {
                    biased;
                    answer = &mut answered => match answer {
                        Ok(Answer::Value(value)) => return Ok(value),
                        Ok(Answer::ReadAlone) => break 'queue,
                        // Its statement's caller gave up mid-way.
                        Err(_) => continue 'queue,
                    },
                    lease = reads.lease(), if queued => {
                        let mut lease = match lease {
                            Ok(lease) => lease,
                            // Unless a statement has taken this key already,
                            // its caller gets the error (and leaves the queue).
                            Err(e) if self.leave_queue(caller) => return Err(e),
                            Err(_) => {
                                queued = false;
                                continue;
                            }
                        };
                        let batch = self.take_batch();
                        if batch.is_empty() {
                            // A statement has taken this key.
                            lease.finish();
                            queued = false;
                            continue;
                        }
                        let keys: Vec<K> = batch.iter().map(|waiting| waiting.key.clone()).collect();
                        self.statements.fetch_add(1, Ordering::Relaxed);
                        let values = match run(lease.connection(), &keys).await {
                            Ok(values) if values.len() == batch.len() => values,
                            _ => {
                                // The lease is dropped, closing the connection.
                                tracing::warn!(callers = batch.len(), "a shared read failed; its callers read alone");
                                for waiting in batch {
                                    let _ = waiting.answer.send(Answer::ReadAlone);
                                }
                                continue;
                            }
                        };
                        lease.finish();
                        self.answers.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        for (waiting, value) in batch.into_iter().zip(values) {
                            // A caller that gave up has no one to answer.
                            let _ = waiting.answer.send(Answer::Value(value));
                        }
                    }
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
                let take = taken == 0 || (taken < up_to && joins(&first, &w.key));
                taken += usize::from(take);
                take
            })
            .collect()
    }

    /// Takes `caller` out of the queue, with any caller that gave up; false
    /// when a statement had taken it already.
    fn leave_queue(&self, caller: u64) -> bool {
        let mut waiting = self.waiting();
        let was_queued = waiting.iter().any(|w| w.caller == caller);
        waiting.retain(|w| w.caller != caller && !w.answer.is_closed());
        was_queued
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<Waiting<K, V>>> {
        // A poisoned lock only means a panic elsewhere; the list is whole.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Statements run and callers they answered, so far.
    pub fn counts(&self) -> SharedCounts {
        SharedCounts {
            statements: self.statements.load(Ordering::Relaxed),
            answers: self.answers.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex as StdMutex},
        time::Duration,
    };

    use tokio::{
        sync::{Semaphore, SemaphorePermit},
        task::{JoinHandle, LocalSet, spawn_local},
    };

    use super::*;

    /// Lends stand-ins for connections as [`MySqlReads`] lends connections:
    /// a limited number at once, an error after waiting too long for one,
    /// kept for the next read when the read finished, dropped when not.
    struct FakeLender {
        permits: Semaphore,
        idle: StdMutex<Vec<FakeConnection>>,
        acquire_timeout: Duration,
    }

    /// A connection's stand-in: the statements are the tests' own.
    struct FakeConnection;

    struct FakeLease<'a> {
        lender: &'a FakeLender,
        connection: Option<FakeConnection>,
        _permit: SemaphorePermit<'a>,
    }

    impl FakeLender {
        fn idle_connections(&self) -> usize {
            self.idle.lock().unwrap().len()
        }
    }

    impl Lender for FakeLender {
        type Connection = FakeConnection;
        type Lease<'a> = FakeLease<'a>;
        async fn lease(&self) -> Result<FakeLease<'_>, sqlx::Error> {
            let permit = tokio::time::timeout(self.acquire_timeout, self.permits.acquire())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
            let connection = self.idle.lock().unwrap().pop().unwrap_or(FakeConnection);
            Ok(FakeLease { lender: self, connection: Some(connection), _permit: permit })
        }
    }

    impl Leased for FakeLease<'_> {
        type Connection = FakeConnection;
        fn connection(&mut self) -> &mut FakeConnection {
            self.connection.as_mut().expect("lent until finished")
        }
        fn finish(mut self) {
            if let Some(connection) = self.connection.take() {
                self.lender.idle.lock().unwrap().push(connection);
            }
        }
    }

    /// Runs `test` with one connection to lend, lent for at most
    /// `acquire_timeout`, in paused time. Its reads run as local tasks: a
    /// test's `run` closure borrows from its caller, and the compiler cannot
    /// yet show such an async closure's future to be `Send` for every
    /// lifetime (the services pass named `async fn`s, which it can).
    async fn with_one_connection(acquire_timeout: Duration, test: impl AsyncFnOnce(Arc<FakeLender>)) {
        let reads =
            Arc::new(FakeLender { permits: Semaphore::new(1), idle: StdMutex::default(), acquire_timeout });
        LocalSet::new().run_until(test(reads)).await;
    }

    /// Each statement's keys, in the order they ran.
    type Statements = Arc<StdMutex<Vec<Vec<u32>>>>;

    /// What a test's statement does for its keys.
    enum Step {
        Answer,
        Fail,
        /// Holds the connection for seconds first.
        Stall,
    }

    fn answer_all(_: &[u32]) -> Step {
        Step::Answer
    }

    fn fail_shared(keys: &[u32]) -> Step {
        if keys.len() > 1 { Step::Fail } else { Step::Answer }
    }

    /// Reads `key` as ten times itself, in a statement that is recorded and
    /// does what `step` says.
    async fn read_ten_times(
        shared: &SharedReads<u32, u32>,
        reads: &FakeLender,
        statements: &Statements,
        key: u32,
        step: fn(&[u32]) -> Step,
    ) -> Result<u32, sqlx::Error> {
        shared
            .read(reads, key, async |_connection, keys| {
                statements.lock().unwrap().push(keys.to_vec());
                match step(keys) {
                    Step::Answer => {}
                    Step::Fail => return Err(sqlx::Error::Protocol("the statement failed".into())),
                    Step::Stall => tokio::time::sleep(Duration::from_secs(5)).await,
                }
                Ok(keys.iter().map(|k| k * 10).collect())
            })
            .await
    }

    /// Starts a read of each key while the only connection is lent, waits
    /// until all of them queue, then gives the connection back.
    async fn queued_reads(
        reads: &Arc<FakeLender>,
        shared: &Arc<SharedReads<u32, u32>>,
        keys: &[u32],
        step: fn(&[u32]) -> Step,
    ) -> (Vec<JoinHandle<Result<u32, sqlx::Error>>>, Statements) {
        let statements = Statements::default();
        let held = reads.lease().await.unwrap();
        let calls = keys
            .iter()
            .map(|&key| {
                let (reads, shared, statements) = (reads.clone(), shared.clone(), statements.clone());
                spawn_local(async move { read_ten_times(&shared, &reads, &statements, key, step).await })
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

    #[tokio::test(start_paused = true)]
    async fn reads_waiting_for_a_connection_share_statements() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let keys: Vec<u32> = (1..=10).collect();
            let (calls, statements) = queued_reads(&reads, &any_reads(4), &keys, answer_all).await;
            for (call, key) in calls.into_iter().zip(&keys) {
                assert_eq!(call.await.unwrap().unwrap(), key * 10, "each caller gets its own answer");
            }
            // Oldest first, at most four a statement.
            let statements = statements.lock().unwrap().clone();
            assert_eq!(statements, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_connection_reads_at_once_alone() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let (shared, statements) = (any_reads(4), Statements::default());
            for key in [3, 4, 3] {
                assert_eq!(
                    read_ten_times(&shared, &reads, &statements, key, answer_all).await.unwrap(),
                    key * 10
                );
            }
            assert_eq!(*statements.lock().unwrap(), [vec![3], vec![4], vec![3]]);
            assert_eq!(reads.idle_connections(), 1, "the connection went back");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn only_reads_that_may_join_share_a_statement() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let same = Arc::new(SharedReads::new(Sharing { up_to: usize::MAX, joins: |a, b| a == b }));
            let (calls, statements) = queued_reads(&reads, &same, &[7, 7, 8, 7, 8], answer_all).await;
            for (call, key) in calls.into_iter().zip([7, 7, 8, 7, 8]) {
                assert_eq!(call.await.unwrap().unwrap(), key * 10);
            }
            assert_eq!(*statements.lock().unwrap(), [vec![7, 7, 7], vec![8, 8]]);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failed_shared_statement_each_caller_reads_alone() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let (calls, statements) = queued_reads(&reads, &any_reads(8), &[1, 2, 3], fail_shared).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gave_up_is_left_out() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let shared = any_reads(8);
            let statements = Statements::default();
            let held = reads.lease().await.unwrap();
            let start = |key| {
                let (reads, shared, statements) = (reads.clone(), shared.clone(), statements.clone());
                spawn_local(
                    async move { read_ten_times(&shared, &reads, &statements, key, answer_all).await },
                )
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

    #[tokio::test(start_paused = true)]
    async fn a_failed_statement_gives_each_caller_an_error_of_its_own() {
        with_one_connection(Duration::from_secs(5), async |reads| {
            let (calls, statements) = queued_reads(&reads, &any_reads(8), &[1, 2, 3], |_| Step::Fail).await;
            for call in calls {
                assert!(matches!(call.await.unwrap(), Err(sqlx::Error::Protocol(_))));
            }
            let mut statements = statements.lock().unwrap().clone();
            assert_eq!(statements.remove(0), [1, 2, 3]);
            statements.sort();
            assert_eq!(statements, [vec![1], vec![2], vec![3]], "then each alone");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn when_a_statement_is_cut_short_its_other_callers_queue_again() {
        with_one_connection(Duration::from_secs(10), async |reads| {
            let stall_for_1 = |keys: &[u32]| if keys.contains(&1) { Step::Stall } else { Step::Answer };
            let (mut calls, statements) = queued_reads(&reads, &any_reads(8), &[1, 2, 3], stall_for_1).await;
            while statements.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The caller running the statement for all three gives up.
            let leader = calls.remove(0);
            leader.abort();
            assert!(leader.await.unwrap_err().is_cancelled());
            for (call, key) in calls.into_iter().zip([2, 3]) {
                assert_eq!(call.await.unwrap().unwrap(), key * 10);
            }
            let mut statements = statements.lock().unwrap().clone();
            statements[1].sort();
            assert_eq!(statements, [vec![1, 2, 3], vec![2, 3]], "the other two shared again");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gets_no_connection_in_time_leaves_the_queue() {
        with_one_connection(Duration::from_millis(200), async |reads| {
            let (shared, statements) = (any_reads(8), Statements::default());
            let held = reads.lease().await.unwrap();
            let read = read_ten_times(&shared, &reads, &statements, 4, answer_all).await;
            assert!(matches!(read, Err(sqlx::Error::PoolTimedOut)));
            assert!(shared.waiting().is_empty());
            held.finish();
            assert_eq!(read_ten_times(&shared, &reads, &statements, 4, answer_all).await.unwrap(), 40);
            assert_eq!(shared.counts(), SharedCounts { statements: 1, answers: 1 });
        })
        .await;
    }
}
