//! Connections for a service's hot MySQL reads, kept without sqlx's
//! per-query ping.
//!
//! sqlx's pool pings every connection on its way back, so each query through
//! it is two round trips to the server, each one waking a server thread and a
//! client task. On a machine the database shares, those wake-ups cost more
//! than the statement. [`MySqlReads`] lends connections for one read at a time
//! and takes them back without a ping when the read finished; a connection
//! whose read did not finish (an error, or a caller that gave up mid-way) is
//! dropped instead, as its state is unknown. Like the main pool, a connection
//! that sat idle for a while is pinged before it is lent, so one the server or
//! a proxy dropped meanwhile is replaced without a failed call, and one idle
//! for minutes or open for half an hour is closed instead of lent.
//!
//! Upstream: sqlx's `PoolConnection` pings on its way back to the pool
//! (`return_to_pool` in sqlx-core's pool), whatever `test_before_acquire`
//! says; sqlx issue #1743 asked for pings only after idleness and was
//! closed by #1901, which made the ping on acquire optional but kept the one
//! on release. An option to give a connection back without the ping (or
//! only after it sat idle) would let this module go: the hot reads would
//! then use a second sqlx pool with both pings off.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use sqlx::{Connection as _, MySqlConnection, mysql::MySqlConnectOptions};
use storegate::db::MYSQL_CHECK_IF_IDLE_FOR as CHECK_IF_IDLE_FOR;
use tokio::sync::{Semaphore, SemaphorePermit};

/// An idle connection this old is closed rather than lent (servers and
/// proxies drop idle connections after their own timeouts).
const CLOSE_IF_IDLE_FOR: Duration = Duration::from_secs(5 * 60);
/// A connection this old is closed rather than lent again, as sqlx's pool
/// does, so that a failover behind a DNS name is followed.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Up to `size` connections to one MySQL database, lent for one read each.
#[derive(Debug)]
pub struct MySqlReads {
    options: MySqlConnectOptions,
    idle: Mutex<Vec<Kept>>,
    permits: Semaphore,
    acquire_timeout: Duration,
}

/// A connection lent for one read; call [`Lease::finish`] when the read has
/// finished to give it back.
pub struct Lease<'a> {
    reads: &'a MySqlReads,
    kept: Option<Kept>,
    _permit: SemaphorePermit<'a>,
}

/// A connection and its age.
#[derive(Debug)]
struct Kept {
    connection: MySqlConnection,
    opened: Instant,
    idle_since: Instant,
}

impl MySqlReads {
    pub fn new(options: MySqlConnectOptions, size: usize, acquire_timeout: Duration) -> Arc<MySqlReads> {
        Arc::new(MySqlReads {
            options,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size),
            acquire_timeout,
        })
    }

    /// A connection for one read: an idle one (pinged first if it sat idle
    /// for a while), or a new one. Fails like sqlx's pool: `PoolTimedOut`
    /// when all are lent for longer than the acquire timeout, or the error
    /// of connecting.
    pub async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        // One limit for all of it, as sqlx's pool has: a ping or a connect
        // to a peer that vanished must not hold the caller for minutes.
        tokio::time::timeout(self.acquire_timeout, self.lease_untimed())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn lease_untimed(&self) -> Result<Lease<'_>, sqlx::Error> {
        let permit = self.permits.acquire().await.map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let (idle, stale) = {
                let mut idle = self.idle();
                // Lent newest first (its pages are warm); the oldest is
                // looked at too, so that a connection left at the bottom
                // after a burst does not stay open for ever.
                let stale = match idle.first() {
                    Some(oldest) if idle.len() > 1 && oldest.idle_since.elapsed() >= CLOSE_IF_IDLE_FOR => {
                        Some(idle.remove(0))
                    }
                    _ => None,
                };
                (idle.pop(), stale)
            };
            if let Some(stale) = stale {
                let _ = stale.connection.close().await;
            }
            let Some(mut kept) = idle else {
                let connection = storegate::db::connect_mysql(&self.options).await?;
                let kept = Kept { connection, opened: Instant::now(), idle_since: Instant::now() };
                return Ok(Lease { reads: self, kept: Some(kept), _permit: permit });
            };
            let idle_for = kept.idle_since.elapsed();
            if idle_for >= CLOSE_IF_IDLE_FOR || kept.opened.elapsed() >= MAX_LIFETIME {
                let _ = kept.connection.close().await;
                continue;
            }
            let check = idle_for >= CHECK_IF_IDLE_FOR
                || storegate::db_health::opened_before_last_outage(kept.opened.elapsed());
            if check && kept.connection.ping().await.is_err() {
                tracing::info!("a pooled MySQL connection was gone; replacing it");
                continue;
            }
            return Ok(Lease { reads: self, kept: Some(kept), _permit: permit });
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        // A poisoned lock only means a panic elsewhere; the list is whole.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections kept idle now.
    pub fn idle_connections(&self) -> usize {
        self.idle().len()
    }
}

impl Lease<'_> {
    pub fn connection(&mut self) -> &mut MySqlConnection {
        &mut self.kept.as_mut().expect("a lease holds its connection until it ends").connection
    }

    /// The read finished: the connection goes back as it is.
    pub fn finish(mut self) {
        if let Some(mut kept) = self.kept.take() {
            kept.idle_since = Instant::now();
            self.reads.idle().push(kept);
        }
    }
}

// A lease dropped without `finish` drops its connection (closing the socket):
// a read cut short may have left a reply unread on it.

#[cfg(test)]
pub(crate) mod tests {
    use std::str::FromStr as _;

    use super::*;

    /// Reads on the test server (no database needed), or `None` to skip
    /// outside CI, as every MySQL test does.
    pub(crate) fn reads(size: usize, acquire_timeout: Duration) -> Option<Arc<MySqlReads>> {
        match std::env::var("STOREGATE_TEST_MYSQL_URL") {
            Ok(url) if !url.is_empty() => {
                let options = MySqlConnectOptions::from_str(&url).expect("a MySQL URL");
                Some(MySqlReads::new(options, size, acquire_timeout))
            }
            _ if std::env::var_os("CI").is_some() => panic!("STOREGATE_TEST_MYSQL_URL must be set in CI"),
            _ => None,
        }
    }

    async fn connection_id(lease: &mut Lease<'_>) -> u64 {
        sqlx::query_scalar("SELECT CONNECTION_ID()").fetch_one(lease.connection()).await.unwrap()
    }

    /// The server's id of the connection a finished read was lent.
    async fn lent_connection_id(reads: &MySqlReads) -> u64 {
        let mut lease = reads.lease().await.unwrap();
        let id = connection_id(&mut lease).await;
        lease.finish();
        id
    }

    #[tokio::test]
    async fn a_finished_read_gives_its_connection_back() {
        let Some(reads) = reads(4, Duration::from_secs(5)) else { return };
        let first = lent_connection_id(&reads).await;
        assert_eq!(reads.idle_connections(), 1);
        assert_eq!(lent_connection_id(&reads).await, first, "the same connection, lent again");
    }

    #[tokio::test]
    async fn a_read_cut_short_does_not_give_its_connection_back() {
        let Some(reads) = reads(4, Duration::from_secs(5)) else { return };
        let mut lease = reads.lease().await.unwrap();
        let first = connection_id(&mut lease).await;
        // The caller gives up while the server is still answering.
        let cut_short = tokio::time::timeout(
            Duration::from_millis(100),
            sqlx::query("SELECT SLEEP(2)").execute(lease.connection()),
        )
        .await;
        assert!(cut_short.is_err());
        drop(lease);
        assert_eq!(reads.idle_connections(), 0);
        assert_ne!(lent_connection_id(&reads).await, first, "a fresh connection");
    }

    #[tokio::test]
    async fn a_connection_the_server_dropped_while_idle_is_replaced() {
        let Some(reads) = reads(4, Duration::from_secs(5)) else { return };
        let first = lent_connection_id(&reads).await;
        let mut killer = sqlx::ConnectOptions::connect(&reads.options).await.unwrap();
        sqlx::query(&format!("KILL {first}")).execute(&mut killer).await.unwrap();
        tokio::time::sleep(CHECK_IF_IDLE_FOR + Duration::from_millis(200)).await;
        assert_ne!(lent_connection_id(&reads).await, first);
    }

    #[tokio::test]
    async fn all_connections_lent_for_too_long_is_a_pool_timeout() {
        let Some(reads) = reads(1, Duration::from_millis(200)) else { return };
        let held = reads.lease().await.unwrap();
        assert!(matches!(reads.lease().await, Err(sqlx::Error::PoolTimedOut)));
        held.finish();
        reads.lease().await.unwrap().finish();
    }
}
