//! Connections for a service's hot MySQL reads, kept without sqlx's
//! per-query ping.
//!
//! sqlx's pool pings every connection on its way back, so each query through
//! it is two round trips to the server, each one waking a server thread and a
//! client task. On a machine the database shares, those wake-ups cost more
//! than the statement. [`MySqlReads`] lends connections for one read at a time
//! and takes them back without a ping when the read finished; a connection
//! whose read did not finish (an error, or a caller that gave up mid-way) is
//! taken out of the pool and dropped instead, as its state is unknown. Like
//! the main pool, a connection that sat idle for a while is pinged before it
//! is lent, so one the server or a proxy dropped meanwhile is replaced without
//! a failed call, and one idle for minutes or open for half an hour is closed
//! instead of lent.
//!
//! The pool is deadpool's; this module is its manager (how a connection is
//! opened, and when one is pinged or closed before it is lent) and the lease
//! that gives back only a connection whose read finished.
//!
//! Upstream: sqlx's `PoolConnection` pings on its way back to the pool
//! (`return_to_pool` in sqlx-core's pool), whatever `test_before_acquire`
//! says; sqlx issue #1743 asked for pings only after idleness and was
//! closed by #1901, which made the ping on acquire optional but kept the one
//! on release. An option to give a connection back without the ping (or
//! only after it sat idle) would let this module go: the hot reads would
//! then use a second sqlx pool with both pings off.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deadpool::managed::{self, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult};
use sqlx::{Connection as _, MySqlConnection, mysql::MySqlConnectOptions};
use storegate::db::MYSQL_CHECK_IF_IDLE_FOR as CHECK_IF_IDLE_FOR;

/// An idle connection this old is closed rather than lent (servers and
/// proxies drop idle connections after their own timeouts).
const CLOSE_IF_IDLE_FOR: Duration = Duration::from_secs(5 * 60);
/// A connection this old is closed rather than lent again, as sqlx's pool
/// does, so that a failover behind a DNS name is followed.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Up to `size` connections to one MySQL database, lent for one read each.
#[derive(Debug)]
pub struct MySqlReads {
    pool: managed::Pool<Connector>,
    acquire_timeout: Duration,
    /// When a lease next looks through the idle connections for ones to
    /// close. Connections are lent newest first (their pages are warm), so
    /// one left at the bottom after a burst is never lent, hence never
    /// closed, without it.
    next_sweep: Mutex<Instant>,
}

/// A connection lent for one read; call [`Lease::finish`] when the read has
/// finished to give it back. Dropped without it, the lease takes its
/// connection out of the pool and closes the socket: a read cut short may
/// have left a reply unread on it.
pub struct Lease {
    object: Option<Object<Connector>>,
}

/// A connection and when its last read finished (deadpool's own metrics
/// know when it was lent, not when it came back). The connection is taken
/// out only to be closed, as deadpool drops what it does not recycle.
#[derive(Debug)]
struct Kept {
    connection: Option<MySqlConnection>,
    idle_since: Instant,
}

impl Kept {
    fn connection(&mut self) -> &mut MySqlConnection {
        self.connection.as_mut().expect("a kept connection is taken out only to be closed")
    }
}

/// Closes connections that are done with, beside the caller: a close is a
/// round trip (COM_QUIT, so that the server does not count an aborted
/// client), not the business of the read that found them.
fn close_in_background(connections: impl IntoIterator<Item = MySqlConnection>) {
    let connections: Vec<MySqlConnection> = connections.into_iter().collect();
    if !connections.is_empty() {
        tokio::spawn(async move {
            for connection in connections {
                let _ = connection.close().await;
            }
        });
    }
}

/// Opens the read connections and checks them before they are lent again.
#[derive(Debug)]
struct Connector {
    options: MySqlConnectOptions,
    close_if_idle_for: Duration,
}

impl Connector {
    /// Whether a connection is to be closed rather than lent.
    fn is_spent(&self, kept: &Kept, metrics: &Metrics) -> bool {
        kept.idle_since.elapsed() >= self.close_if_idle_for || metrics.age() >= MAX_LIFETIME
    }

    /// Idle connections are looked through ten times as often as they may
    /// stay idle (when leases come: a service with no reads sweeps nothing,
    /// and the server's own idle timeout then closes them).
    fn sweep_every(&self) -> Duration {
        self.close_if_idle_for / 10
    }
}

impl managed::Manager for Connector {
    type Type = Kept;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Kept, sqlx::Error> {
        let connection = storegate::db::connect_mysql(&self.options).await?;
        Ok(Kept { connection: Some(connection), idle_since: Instant::now() })
    }

    async fn recycle(&self, kept: &mut Kept, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if self.is_spent(kept, metrics) {
            close_in_background(kept.connection.take());
            return Err(RecycleError::message("idle or open too long"));
        }
        let check = kept.idle_since.elapsed() >= CHECK_IF_IDLE_FOR
            || storegate::db_health::opened_before_last_outage(metrics.age());
        if check && let Err(error) = kept.connection().ping().await {
            tracing::info!("a pooled MySQL connection was gone; replacing it");
            return Err(RecycleError::Backend(error));
        }
        Ok(())
    }
}

impl MySqlReads {
    pub fn new(options: MySqlConnectOptions, size: usize, acquire_timeout: Duration) -> Arc<MySqlReads> {
        Self::closing_if_idle_for(options, size, acquire_timeout, CLOSE_IF_IDLE_FOR)
    }

    fn closing_if_idle_for(
        options: MySqlConnectOptions,
        size: usize,
        acquire_timeout: Duration,
        close_if_idle_for: Duration,
    ) -> Arc<MySqlReads> {
        let connector = Connector { options, close_if_idle_for };
        let next_sweep = Mutex::new(Instant::now() + connector.sweep_every());
        let pool = managed::Pool::builder(connector)
            .max_size(size)
            .queue_mode(QueueMode::Lifo)
            .build()
            .expect("a pool without timeouts needs no runtime");
        Arc::new(MySqlReads { pool, acquire_timeout, next_sweep })
    }

    /// A connection for one read: an idle one (pinged first if it sat idle
    /// for a while), or a new one. Fails like sqlx's pool: `PoolTimedOut`
    /// when all are lent for longer than the acquire timeout, or the error
    /// of connecting.
    pub async fn lease(&self) -> Result<Lease, sqlx::Error> {
        // One limit for all of it, as sqlx's pool has: a ping or a connect
        // to a peer that vanished must not hold the caller for minutes.
        tokio::time::timeout(self.acquire_timeout, self.lease_untimed())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn lease_untimed(&self) -> Result<Lease, sqlx::Error> {
        close_in_background(self.spent_if_sweep_due().into_iter().filter_map(|kept| kept.connection));
        match self.pool.get().await {
            Ok(object) => Ok(Lease { object: Some(object) }),
            Err(PoolError::Backend(error)) => Err(error),
            Err(PoolError::Closed) => Err(sqlx::Error::PoolClosed),
            // No timeouts, runtime or hooks are configured on the pool.
            Err(other) => Err(sqlx::Error::Protocol(format!("read connections: {other}"))),
        }
    }

    /// The idle connections to close, taken out of the pool, once every
    /// sweep interval (by whichever lease comes first).
    fn spent_if_sweep_due(&self) -> Vec<Kept> {
        let Ok(mut next_sweep) = self.next_sweep.try_lock() else { return Vec::new() };
        let now = Instant::now();
        if now < *next_sweep {
            return Vec::new();
        }
        let connector = self.pool.manager();
        *next_sweep = now + connector.sweep_every();
        drop(next_sweep);
        self.pool.retain(|kept, metrics| !connector.is_spent(kept, &metrics)).removed
    }

    /// Connections kept idle now, as deadpool counts them: those neither
    /// lent nor being handed out (so none while callers wait).
    pub fn idle_connections(&self) -> usize {
        self.pool.status().available
    }
}

impl Lease {
    pub fn connection(&mut self) -> &mut MySqlConnection {
        self.object.as_mut().expect("a lease holds its connection until it ends").connection()
    }

    /// The read finished: the connection goes back as it is.
    pub fn finish(mut self) {
        if let Some(mut object) = self.object.take() {
            object.idle_since = Instant::now();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use storegate_testkit::Backend;

    use super::*;

    /// Reads on the test server (no database needed), or `None` to skip
    /// outside CI, as every MySQL test does.
    fn reads(size: usize, acquire_timeout: Duration) -> Option<Arc<MySqlReads>> {
        Some(MySqlReads::new(test_server()?, size, acquire_timeout))
    }

    fn test_server() -> Option<MySqlConnectOptions> {
        let Some(Backend::MySql(url)) = Backend::mysql_from_env() else { return None };
        Some(MySqlConnectOptions::from_str(&url).expect("a MySQL URL"))
    }

    async fn connection_id(lease: &mut Lease) -> u64 {
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
        let mut killer = sqlx::ConnectOptions::connect(&reads.pool.manager().options).await.unwrap();
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

    #[tokio::test]
    async fn a_connection_left_idle_at_the_bottom_is_closed() {
        let Some(options) = test_server() else { return };
        let close_if_idle_for = Duration::from_secs(1);
        let reads = MySqlReads::closing_if_idle_for(options, 4, Duration::from_secs(5), close_if_idle_for);
        // A burst of two leaves two idle; the newest is lent again and
        // again, the other stays at the bottom.
        let (mut first, mut second) = (reads.lease().await.unwrap(), reads.lease().await.unwrap());
        let bottom = connection_id(&mut first).await;
        let top = connection_id(&mut second).await;
        first.finish();
        second.finish();
        tokio::time::sleep(close_if_idle_for * 6 / 10).await;
        assert_eq!(lent_connection_id(&reads).await, top);
        assert_eq!(reads.idle_connections(), 2, "neither idle too long yet");
        tokio::time::sleep(close_if_idle_for * 6 / 10).await;
        assert_eq!(lent_connection_id(&reads).await, top, "the newest, idle for a short while, lent again");
        assert_eq!(reads.idle_connections(), 1, "the one idle too long at the bottom was closed");
        let mut observer = sqlx::ConnectOptions::connect(&reads.pool.manager().options).await.unwrap();
        let open_on_server =
            format!("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {bottom}");
        for _ in 0..50 {
            let open: i64 = sqlx::query_scalar(&open_on_server).fetch_one(&mut observer).await.unwrap();
            if open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the connection idle too long is still open on the server");
    }
}
